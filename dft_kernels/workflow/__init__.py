"""The DFT workflow behind the ``dft-kernels`` command (docs/design.md sec. 7):
presets (``presets``), training (``train``), evaluation with a report
(``evaluate``) and the memory plan of a training step (``plan``); ``inputs`` reads
the data files and models they share. ``dft_kernels.cli`` parses and dispatches."""

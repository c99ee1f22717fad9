"""Developer tools: the ahead-of-time compile gate (``python -m dft_kernels.tools.compile_check``)."""

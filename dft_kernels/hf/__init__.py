"""Hugging Face integration: one generic adapter for every ``*ForCausalLM``.

- :func:`patch` / :func:`unpatch`: make a model compute the DFT loss from its last
  hidden states with :func:`dft_kernels.fused_linear_dft_loss` (see ``patch.py``).
- :class:`DFTConfig`: every DFT option in one place.
- :class:`DFTDataCollator`: pads ids, labels and sparse teacher targets together.
- :class:`DFTTrainer` / :class:`DFTTrainerMixin`: a ``transformers.Trainer`` that
  trains with it and logs the divergence and accuracy terms separately (imported
  on first use: it imports transformers).
"""
from .collator import DFTDataCollator
from .config import DFTConfig
from .patch import is_patched, last_loss_components, patch, unpatch


def __getattr__(name):
    if name in ("DFTTrainer", "DFTTrainerMixin"):
        from . import trainer
        return getattr(trainer, name)
    raise AttributeError(f"module 'dft_kernels.hf' has no attribute {name!r}")


__all__ = ["patch", "unpatch", "is_patched", "last_loss_components", "DFTConfig", "DFTDataCollator",
           "DFTTrainer", "DFTTrainerMixin"]

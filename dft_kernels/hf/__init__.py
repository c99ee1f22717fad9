"""Hugging Face integration: one generic adapter for every ``*ForCausalLM``.

- :func:`patch` / :func:`unpatch`: make a model compute the DFT loss from its last
  hidden states with :func:`dft_kernels.fused_linear_dft_loss` (see ``patch.py``); a
  PEFT LoRA / ``modules_to_save`` lm_head or a style head keeps the fused path
  (``dft_kernels/lm_head.py`` reads it).
- :class:`DFTConfig`: every DFT option in one place.
- :class:`DFTDataCollator`: pads ids, labels and sparse teacher targets together.
- :class:`DFTTrainer` / :class:`DFTTrainerMixin`: a ``transformers.Trainer`` that
  trains with it and logs the divergence and accuracy terms separately (imported
  on first use: it imports transformers).
- Style heads (``style_head.py``, ``style_head_io.py``): :func:`add_style_head`,
  :func:`save_style_head`, :func:`load_style_head`, :func:`blend_style_heads`,
  :func:`merge_style_head` / :func:`unmerge_style_head`, :func:`remove_style_head`,
  :func:`get_style_head` (imported on first use).
"""
from .collator import DFTDataCollator
from .config import DFTConfig
from .patch import is_patched, last_loss_components, patch, unpatch

_STYLE = ("StyleHead", "add_style_head", "remove_style_head", "merge_style_head", "unmerge_style_head", "get_style_head",
          "base_fingerprint")
_STYLE_IO = ("StyleHeadWeights", "save_style_head", "load_style_head", "read_style_head", "blend_style_heads")


def __getattr__(name):
    if name in ("DFTTrainer", "DFTTrainerMixin"):
        from . import trainer
        return getattr(trainer, name)
    if name in _STYLE:
        from . import style_head
        return getattr(style_head, name)
    if name in _STYLE_IO:
        from . import style_head_io
        return getattr(style_head_io, name)
    raise AttributeError(f"module 'dft_kernels.hf' has no attribute {name!r}")


__all__ = ["patch", "unpatch", "is_patched", "last_loss_components", "DFTConfig", "DFTDataCollator",
           "DFTTrainer", "DFTTrainerMixin", "StyleHead", "add_style_head", "remove_style_head", "merge_style_head",
           "unmerge_style_head", "get_style_head", "base_fingerprint", "StyleHeadWeights", "save_style_head",
           "load_style_head", "read_style_head", "blend_style_heads"]

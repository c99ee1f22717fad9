"""What a Hugging Face causal LM does to its lm_head output, read in one place for
the student (:func:`dft_kernels.hf.patch`) and the teacher (``dk.targets.build``).

The model's logits are ``softcap(scale * (h @ W.T + bias))`` with
``softcap(z) = c * tanh(z / c)``:

- Gemma-2 style ``final_logit_softcapping`` -> ``softcap`` (``c``; None: no softcap)
- Cohere style ``logit_scale`` (multiply; the model attribute, else the config) and
  Granite style ``logits_scaling`` (divide) -> ``scale``
- the lm_head's own ``bias`` (None for most models)

The text config (``config.get_text_config()``) is read first, then the top-level one.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class LogitTransforms(NamedTuple):
    softcap: float | None
    scale: float | torch.Tensor
    bias: torch.Tensor | None


def _number(value) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def logit_transforms(model) -> LogitTransforms:
    """The logit transforms of a transformers causal LM.

    Args:
        model: a ``*ForCausalLM`` (``config`` and ``get_output_embeddings()`` are read;
            either may be missing).
    Returns:
        ``(softcap, scale, bias)``: ``softcap`` a float or None; ``scale`` a float, or a
        one-element tensor when the model keeps a tensor ``logit_scale``; ``bias`` the
        lm_head's bias ``[V]`` or None. The logits are ``softcap(scale * (h @ W.T + bias))``.
    """
    cfg = getattr(model, "config", None)
    text_cfg = cfg
    if cfg is not None and callable(getattr(cfg, "get_text_config", None)):
        try:
            text_cfg = cfg.get_text_config()
        except Exception:  # noqa: BLE001 -- unusual configs: fall back to the top-level one
            text_cfg = cfg

    def option(name):
        for c in (text_cfg, cfg):
            value = getattr(c, name, None) if c is not None else None
            if value is not None:
                return value
        return None

    softcap = _number(option("final_logit_softcapping")) or None     # 0 / absent: no softcap
    scale: float | torch.Tensor = 1.0
    logit_scale = getattr(model, "logit_scale", None)          # Cohere keeps config.logit_scale on the model
    if logit_scale is None:
        logit_scale = option("logit_scale")
    if isinstance(logit_scale, torch.Tensor):
        scale = logit_scale if logit_scale.numel() == 1 else scale
    elif _number(logit_scale) is not None:
        scale = _number(logit_scale)
    logits_scaling = _number(option("logits_scaling"))         # Granite divides by it
    if logits_scaling not in (None, 0.0, 1.0):
        scale = scale / logits_scaling
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    bias = getattr(head, "bias", None)
    return LogitTransforms(softcap, scale, bias if isinstance(bias, torch.Tensor) else None)

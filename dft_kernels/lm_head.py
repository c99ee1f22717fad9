"""A causal LM's output embeddings (the lm_head), read in one place for the student
(:func:`dft_kernels.hf.patch`), the online teacher (``dft_kernels.hf.online``) and the
offline one (``dk.targets.build``), so that all three see the same thing.

The head's input: :func:`run_capturing_hidden` runs the model's own forward with a
pre-hook on the head that records its input -- the final hidden states, after whatever
the forward does between the decoder and the head -- and feeds the head one row only,
so the ``[B, T, V]`` logits are never formed.

The head's output: the model's logits are ``softcap(scale * (h @ W.T + bias))`` with
``softcap(z) = c * tanh(z / c)`` (:func:`logit_transforms`):

- Gemma-2 style ``final_logit_softcapping`` -> ``softcap`` (``c``; None: no softcap)
- Cohere style ``logit_scale`` (multiply; the model attribute, else the config) and
  Granite style ``logits_scaling`` (divide) -> ``scale``
- the lm_head's own ``bias`` (None for most models)

The text config (``config.get_text_config()``) is read first, then the top-level one.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


# --------------------------------------------------------------------------- the head's input


def run_capturing_hidden(call, head, *, who: str, fix: str):
    """Run ``call()`` with the output embeddings ``head`` fed one row only.

    Args:
        call: runs the model's forward; head: its output embeddings (lm_head).
        who / fix: the model's name and the way out, for the error messages.
    Returns:
        ``(output, hidden)``: what ``call()`` returned and the input of ``head``
        ([B, T, D], the final hidden states); the [B, T, V] logits are never formed.
    """
    captured = []

    def take_hidden(module, h_args, h_kwargs):
        if captured:
            raise RuntimeError(f"{who}.forward calls its output embeddings more than once; the fused path "
                               f"cannot tell which call gives the logits: {fix}")
        h = h_args[0] if h_args else h_kwargs["input"]
        captured.append(h)
        one = h[(slice(0, 1),) * (h.dim() - 1)].detach()     # one row: the model finishes its forward cheaply
        if h_args:
            return (one,) + tuple(h_args[1:]), h_kwargs
        return h_args, {**h_kwargs, "input": one}

    handle = head.register_forward_pre_hook(take_hidden, with_kwargs=True)
    try:
        out = call()
    finally:
        handle.remove()
    if not captured:
        raise ValueError(f"{who}.forward never called its output embeddings ({type(head).__name__}), so the "
                         f"final hidden states could not be captured; {fix}")
    return out, captured[0]


# --------------------------------------------------------------------------- the head's output


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

"""A causal LM's output embeddings (the lm_head), read in one place for the student
(:func:`dft_kernels.hf.patch`), the online teacher (``dft_kernels.hf.online``) and the
offline one (``dk.targets.build``), so that all three see the same thing: its input, its
logit transforms and its parts (a low-rank correction included).

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

The head's parts (docs/design.md sec. 17.2): :func:`resolve_head` turns the output
embeddings into the operands of :func:`dft_kernels.fused_linear_dft_loss`: the base
``weight`` / ``bias`` and, for a low-rank correction, ``lora_A`` [r, D], ``lora_B`` [V, r],
``lora_scaling`` and ``lora_dropout`` -- so that ``h @ W.T + b + s * (d(h) @ A.T) @ B.T``
equals what the module's own forward computes. It understands

- a plain ``nn.Linear`` (an accelerate device hook included, see :func:`is_plain_linear`);
- a PEFT LoRA layer (``peft.tuners.lora.Linear``) with one active adapter on the head, as
  PEFT's forward computes it: a disabled or merged adapter is the base layer alone
  (``merged``: the base weight already holds it), ``lora_bias`` folds into the bias;
  DoRA, other LoRA variants and several active adapters are refused (ValueError naming the
  variant and the way out);
- PEFT's ``ModulesToSaveWrapper`` (``modules_to_save=["lm_head"]``): the active copy;
- a style head (``dft_kernels.hf.StyleHead``, recognised by its class marker
  ``_dft_kernels_style_head`` so that this module imports nothing of it).

Anything else -- a quantised head (bitsandbytes & co.), another wrapper -- is a
:class:`Fallback`: the patch computes the loss from the model's logits and says so once,
with the bytes that costs; the online teacher and ``targets build`` refuse it.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
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


def fold_logit_scale(h: torch.Tensor, bias: torch.Tensor | None, scale: float):
    """``(scale * h, scale * bias)``: ``(s*h) @ W.T + s*b == s * (h @ W.T + b)`` (a low-rank
    term ``(s*h) @ A.T @ B.T`` scales alike), so a logit scale becomes inputs of the fused
    ops. Returned unchanged for ``scale == 1``."""
    if scale == 1.0:
        return h, bias
    return h * scale, None if bias is None else bias * scale


# --------------------------------------------------------------------------- the head's parts

#: module prefixes of quantised linear layers: their weight is not a dense [V, D] matrix
_QUANTISED_MODULES = ("bitsandbytes", "torchao", "optimum.quanto", "hqq", "auto_gptq", "gptqmodel", "awq",
                      "compressed_tensors", "fp_quant", "transformers.integrations")
_QUANTISED_PARAMS = ("Params4bit", "Int8Params", "QTensor", "AffineQuantizedTensor")


@dataclass(frozen=True)
class HeadParts:
    """The operands of the fused loss for one head (``lora_*`` None without a correction)."""
    weight: torch.Tensor
    bias: torch.Tensor | None
    what: str                                  # for messages: "nn.Linear", "PEFT LoRA adapter 'default'", ...
    lora_A: torch.Tensor | None = None
    lora_B: torch.Tensor | None = None
    lora_scaling: float = 1.0
    lora_dropout: Callable | None = None

    @property
    def has_lora(self) -> bool:
        return self.lora_A is not None

    def lora_kwargs(self, prefix: str = "", dropout: bool = True) -> dict:
        """The low-rank keywords of a fused call (``{prefix}lora_A``, ``{prefix}lora_B``,
        ``{prefix}lora_scaling`` and, with ``dropout``, ``{prefix}lora_dropout``), A and B cast
        to the weight's dtype and device (PEFT keeps fp32 adapters over a 16-bit base; the cast
        is differentiable); ``{}`` without a correction."""
        if self.lora_A is None:
            return {}
        w = self.weight
        out = {f"{prefix}lora_A": self.lora_A.to(w.device, w.dtype), f"{prefix}lora_B": self.lora_B.to(w.device, w.dtype),
               f"{prefix}lora_scaling": self.lora_scaling}
        if dropout:
            out[f"{prefix}lora_dropout"] = self.lora_dropout
        return out


@dataclass(frozen=True)
class Fallback:
    """A head the fused path cannot read: ``reason`` says what it is, ``fix`` how to keep the fused path."""
    reason: str
    fix: str
    quantised: bool = False


def is_plain_linear(head) -> bool:
    """An ``nn.Linear`` whose output is ``h @ W.T + b``: the fused path applies. An
    accelerate device hook (``device_map=...``) only moves tensors, so it qualifies
    while the weight is materialised; LoRA / quantised / other wrappers do not."""
    if not (isinstance(head, torch.nn.Linear) and type(head).forward is torch.nn.Linear.forward):
        return False
    w = head.weight
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.device.type == "meta" or not w.is_floating_point():
        return False
    if type(w).__name__ in _QUANTISED_PARAMS:
        return False
    return "forward" not in head.__dict__ or hasattr(head, "_hf_hook")


def is_quantised(module) -> bool:
    """A quantised linear layer (bitsandbytes 8-/4-bit, torchao, quanto, GPTQ, AWQ, HQQ...):
    recognised by its class's module or its weight's class / dtype."""
    mod = type(module).__module__ or ""
    if mod.startswith(_QUANTISED_MODULES) or ".bnb" in mod or "quant" in type(module).__name__.lower():
        return True
    w = getattr(module, "weight", None)
    return isinstance(w, torch.Tensor) and (type(w).__name__ in _QUANTISED_PARAMS or not w.is_floating_point())


def _is_peft(module) -> bool:
    return (type(module).__module__ or "").startswith("peft")


def resolve_head(head, who: str = "dk.hf.patch") -> HeadParts | Fallback:
    """The operands of the fused loss for the output embeddings ``head``.

    Args:
        head: ``model.get_output_embeddings()``.
        who: what reads the head, for the messages ("dk.hf.patch", "targets build", ...).
    Returns:
        :class:`HeadParts` when the fused path reproduces the module's forward, else a
        :class:`Fallback` (the logits path applies).
    Raises:
        ValueError: a PEFT LoRA variant the fused path does not compute (DoRA, other
            variants, several active adapters on the head), naming it and the fix.
    """
    if is_plain_linear(head):
        return HeadParts(head.weight, head.bias, "nn.Linear")
    cls = type(head)
    if getattr(cls, "_dft_kernels_style_head", False):          # hf/style_head.py: its own weight / bias
        w = head.weight
        if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point() or w.device.type == "meta":
            return Fallback("a style head whose weight is not a materialised floating [V, D] matrix",
                            "keep the lm_head weight materialised (not offloaded or quantised)")
        if head.merged:
            return HeadParts(w, head.bias, "style head (merged)")
        return HeadParts(w, head.bias, "style head", head.lora_A, head.lora_B, float(head.scaling),
                         _dropout_fn(head.lora_dropout))
    if _is_peft(head) and cls.__name__ == "ModulesToSaveWrapper":
        inner = head.original_module
        actives = list(head.active_adapters) if not head.disable_adapters else []
        if actives and all(a in head._adapters for a in actives) and actives[0] in head.modules_to_save:
            inner = head.modules_to_save[actives[0]]
        parts = resolve_head(inner, who)
        if isinstance(parts, HeadParts):
            return HeadParts(parts.weight, parts.bias, f"modules_to_save copy of {parts.what}", parts.lora_A,
                             parts.lora_B, parts.lora_scaling, parts.lora_dropout)
        return parts
    if _is_peft(head) and hasattr(head, "lora_A") and callable(getattr(head, "get_base_layer", None)):
        return _resolve_peft_lora(head, who)
    if is_quantised(head) or (_is_peft(head) and callable(getattr(head, "get_base_layer", None))
                              and is_quantised(head.get_base_layer())):
        return Fallback(f"a quantised layer ({cls.__module__}.{cls.__name__})",
                        "load the lm_head unquantised (bitsandbytes: BitsAndBytesConfig(llm_int8_skip_modules="
                        "['lm_head']); transformers keeps it unquantised by default)", quantised=True)
    w = getattr(head, "weight", None)
    if isinstance(w, torch.Tensor) and w.device.type == "meta":
        return Fallback(f"a {cls.__name__} whose weight is not materialised (offloaded: on the meta device)",
                        "keep the lm_head on a device (device_map without offloading it)")
    return Fallback(f"a {cls.__module__}.{cls.__name__}, not a plain nn.Linear",
                    "use a plain nn.Linear lm_head, a PEFT LoRA on it or a dk.hf style head")


def _resolve_peft_lora(layer, who: str) -> HeadParts | Fallback:
    base = layer.get_base_layer()
    if layer.disable_adapters or layer.merged:
        # PEFT's forward: the base layer alone (a merged adapter lives in the base weight)
        return resolve_head(base, who)
    actives = [a for a in layer.active_adapters if a in layer.lora_A]
    if not actives:
        return resolve_head(base, who)
    cls = f"{type(layer).__module__}.{type(layer).__name__}"
    if len(actives) > 1:
        raise ValueError(f"{who}: the lm_head ({cls}) has {len(actives)} active LoRA adapters "
                         f"{actives}; the fused path computes one. Fix: model.set_adapter(<one name>), merge the "
                         "others into the base weights (add_weighted_adapter / merge_and_unload), or patch with "
                         "skip_logits=False to compute the loss from the model's logits")
    name = actives[0]
    magnitude = getattr(layer, "lora_magnitude_vector", {})
    if getattr(layer, "use_dora", {}).get(name, False) or (name in magnitude):
        raise ValueError(f"{who}: the lm_head's LoRA adapter {name!r} is DoRA (use_dora=True, "
                         "lora_magnitude_vector): its per-row weight norm is not a low-rank term the fused path "
                         "computes. Fix: LoraConfig(use_dora=False) for the lm_head (DoRA elsewhere is fine: "
                         "target_modules without 'lm_head'), or patch with skip_logits=False (logits materialised)")
    variant = getattr(layer, "lora_variant", {}).get(name)
    if variant is not None:
        raise ValueError(f"{who}: the lm_head's LoRA adapter {name!r} is the variant "
                         f"{type(variant).__name__}, which the fused path does not compute (plain LoRA only). "
                         "Fix: plain LoRA on the lm_head, or patch with skip_logits=False (logits materialised)")
    if type(layer).__name__ != "Linear" or not (type(layer).__module__ or "").startswith("peft.tuners.lora"):
        if is_quantised(base) or is_quantised(layer):
            return Fallback(f"a LoRA layer over a quantised head ({cls})",
                            "load the lm_head unquantised (bitsandbytes: BitsAndBytesConfig(llm_int8_skip_modules="
                            "['lm_head'])); the LoRA on it then keeps the fused path", quantised=True)
        return Fallback(f"a {cls}, not PEFT's LoRA Linear", "a plain LoRA (peft.tuners.lora.Linear) on an nn.Linear")
    A, B = layer.lora_A[name], layer.lora_B[name]
    if not (isinstance(A, torch.nn.Linear) and isinstance(B, torch.nn.Linear)) or A.bias is not None:
        return Fallback(f"a LoRA layer whose lora_A / lora_B are {type(A).__name__} / {type(B).__name__}",
                        "a plain LoRA (nn.Linear lora_A / lora_B) on the lm_head")
    parts = _resolve_low_rank(base, f"PEFT LoRA adapter {name!r}", A.weight, B.weight, layer.scaling[name],
                              layer.lora_dropout[name], who)
    if isinstance(parts, HeadParts) and B.bias is not None:           # lora_bias=True: s * lora_B.bias
        extra = (B.bias * parts.lora_scaling).to(parts.weight.dtype)
        bias = extra if parts.bias is None else parts.bias + extra
        parts = HeadParts(parts.weight, bias, parts.what, parts.lora_A, parts.lora_B, parts.lora_scaling,
                          parts.lora_dropout)
    return parts


def _resolve_low_rank(base, what, lora_A, lora_B, scaling, dropout, who) -> HeadParts | Fallback:
    inner = resolve_head(base, who)
    if not isinstance(inner, HeadParts):
        return inner
    if inner.has_lora:
        raise ValueError(f"{who}: the lm_head is a {what} over another low-rank head ({inner.what}); the "
                         "fused path computes one. Fix: merge one of them (merge_style_head / merge_and_unload)")
    return HeadParts(inner.weight, inner.bias, what, lora_A, lora_B, float(scaling), _dropout_fn(dropout))


def _dropout_fn(dropout):
    """PEFT's ``lora_dropout`` module as the loss takes it: None when it does nothing."""
    if dropout is None or isinstance(dropout, torch.nn.Identity):
        return None
    if isinstance(dropout, torch.nn.Dropout) and dropout.p == 0:
        return None
    return dropout


def logits_bytes_message(logits: torch.Tensor, k: int) -> str:
    """What the logits path costs for this batch: the ``[B, T, V]`` logits and the naive
    loss on them (``memory.loss_extra_bytes("naive")``), in bytes."""
    from .memory import loss_extra_bytes
    shape = tuple(logits.shape)
    n = logits.numel() // max(1, shape[-1])
    own = logits.numel() * logits.element_size()
    total = loss_extra_bytes("naive", n_rows=n, hidden=1, vocab=shape[-1], k=k, dtype_bytes=logits.element_size())
    return (f"the {list(shape)} {str(logits.dtype).replace('torch.', '')} logits take {own} bytes for this batch "
            f"(about {total} bytes with the loss's fp32 copies and gradients on them)")

"""Style heads (docs/design.md sec. 17.2): a trainable low-rank correction of a frozen
model's lm_head, ``logits = h @ W.T + b + s * (d(h) @ A.T) @ B.T``.

:func:`add_style_head` freezes every parameter of the model and replaces its output
embeddings with a :class:`StyleHead` holding the same weight / bias parameters (tied
embeddings stay tied: the head keeps the very same weight). ``dk.hf.patch`` reads it like a PEFT LoRA on the
lm_head (``dft_kernels/lm_head.py``): ``A`` / ``B`` go to the fused loss, the logits are never formed.

Only the correction trains, so nothing needs a gradient through the decoder: the decoder
runs under ``torch.no_grad()`` (a forward pre-hook / always-called forward hook pair on
``model.get_decoder()``) and the head's input is detached (a pre-hook on the head, which
runs before the patch's capture hook). The decoder then saves no activation for a
backward that would never come, and the loss computes no gradient for the hidden states
(no ``dz @ W``). A decoder parameter that requires grad while this is on raises: train it
with ``add_style_head(..., train_decoder=True)``.

Why an own module rather than PEFT's LoRA: PEFT is not a dependency of dft_kernels (only of
its tests), the head must be recognised by the patch, the online teacher and the targets
build alike, and save / load / blend / merge need the base model's fingerprint next to
A / B (``hf/style_head_io.py``).
"""
from __future__ import annotations

import hashlib
import math

import torch

from ..lm_head import is_plain_linear
from .patch import _unwrap

#: the fields of a base-model fingerprint that must match for a style head to load / blend
STRICT_FIELDS = ("vocab_size", "hidden_size", "lm_head_sha256")
_FINGERPRINT_ROWS = 8


class StyleHead(torch.nn.Module):
    """An lm_head with a low-rank correction: ``x @ weight.T + bias + scaling * B(A(dropout(x)))``.

    ``weight`` / ``bias`` are the lm_head's own parameters (the same objects: tied embeddings
    stay tied, and the state dict keeps ``lm_head.weight``, so transformers' tied-weight
    bookkeeping, ``save_pretrained`` and Trainer checkpoints work unchanged); the original
    ``nn.Linear`` is kept aside (``base_layer``, not a submodule) to be put back by
    :func:`remove_style_head`. ``lora_A`` [r, D] (Kaiming-uniform, as PEFT), ``lora_B`` [V, r]
    (zeros: the head starts as the base), ``scaling = alpha / rank``. Adapter parameters are
    fp32 over a 16-bit base (the optimizer updates fp32 values; the loss casts them to the
    head's dtype), else the base's dtype.
    """

    _dft_kernels_style_head = True          # lm_head.resolve_head recognises the class by this marker

    def __init__(self, base_layer: torch.nn.Linear, rank: int, alpha: float | None = None, dropout: float = 0.0, *,
                 dtype: torch.dtype | None = None, detach_input: bool = True, fingerprint: dict | None = None):
        super().__init__()
        if not is_plain_linear(base_layer):
            raise TypeError(f"a style head wraps a plain nn.Linear lm_head, got {type(base_layer).__name__}")
        rank, alpha, dropout = check_style_options(rank, alpha, dropout)
        w = base_layer.weight
        V, D = w.shape
        if dtype is None:
            dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
        self.__dict__["base_layer"] = base_layer          # kept aside, not a submodule (no second state-dict key)
        self.weight = base_layer.weight
        if base_layer.bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = base_layer.bias
        self.in_features, self.out_features = int(D), int(V)
        self.rank, self.alpha = rank, alpha
        self.lora_A = torch.nn.Parameter(torch.empty(rank, D, device=w.device, dtype=dtype))
        torch.nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = torch.nn.Parameter(torch.zeros(V, rank, device=w.device, dtype=dtype))
        self.lora_dropout = torch.nn.Dropout(dropout) if dropout > 0 else torch.nn.Identity()
        self.merged = False
        self.detach_input = bool(detach_input)
        self.base_fingerprint = dict(fingerprint) if fingerprint is not None else None
        self.register_forward_pre_hook(_detach_hidden, with_kwargs=True)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``scaling * B @ A`` [V, D] in ``dtype`` (for merging; the fused path never forms it)."""
        return (self.lora_B.detach().to(dtype) @ self.lora_A.detach().to(dtype)) * self.scaling

    def plain(self) -> torch.nn.Linear:
        """The original ``nn.Linear``, holding this head's current weight / bias again."""
        base = self.__dict__["base_layer"]
        base.weight = self.weight
        base.bias = self.bias
        return base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        out = torch.nn.functional.linear(x.to(w.device), w, self.bias)
        if self.merged:
            return out
        a = self.lora_A
        u = torch.nn.functional.linear(self.lora_dropout(x.to(a.device, a.dtype)), a)
        delta = torch.nn.functional.linear(u, self.lora_B) * self.scaling
        return out + delta.to(out.device, out.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"rank={self.rank}, alpha={self.alpha:g}, scaling={self.scaling:g}, merged={self.merged}")


def check_style_options(rank, alpha, dropout) -> tuple[int, float, float]:
    """``(rank, alpha, dropout)`` checked; ``alpha=None`` is ``rank`` (scaling 1)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank={rank!r} must be an integer >= 1")
    if alpha is None:
        alpha = float(rank)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha == 0:
        raise ValueError(f"alpha={alpha!r} must be a finite non-zero number (scaling = alpha / rank), or None")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"dropout={dropout!r} must be in [0, 1)")
    return rank, float(alpha), float(dropout)


# --------------------------------------------------------------------------- hooks (module-level: deepcopy-safe)


def _detach_hidden(module, args, kwargs):
    if not module.detach_input or module.merged:
        return None
    if args:
        return (args[0].detach(),) + tuple(args[1:]), kwargs
    return args, {**kwargs, "input": kwargs["input"].detach()}


def _decoder_no_grad(module, args):
    if torch.is_grad_enabled():
        for name, p in module.named_parameters():
            if p.requires_grad:
                raise ValueError(f"the decoder parameter {name!r} requires grad, but the model has a style head that "
                                 "runs the decoder without gradients (only the head's correction trains). Freeze it, "
                                 "or add the style head with add_style_head(model, ..., train_decoder=True)")
    module.__dict__.setdefault("_dft_grad_modes", []).append(torch.is_grad_enabled())
    torch.set_grad_enabled(False)


def _decoder_restore_grad(module, args, output):
    modes = module.__dict__.get("_dft_grad_modes")
    if modes:
        torch.set_grad_enabled(modes.pop())


def _decoder(model):
    """The decoder module to run without gradients, or None (unknown layout)."""
    dec = model.get_decoder() if callable(getattr(model, "get_decoder", None)) else None
    if not isinstance(dec, torch.nn.Module) or dec is model:
        dec = getattr(model, "base_model", None)
    if not isinstance(dec, torch.nn.Module) or dec is model:
        return None
    head = model.get_output_embeddings()
    if any(m is head for m in dec.modules()):
        return None                                   # the head inside it: the head must see grad mode on
    return dec


def _remove_decoder_hooks(dec) -> None:
    for fn, hooks in ((_decoder_no_grad, dec._forward_pre_hooks), (_decoder_restore_grad, dec._forward_hooks)):
        for key in [k for k, h in hooks.items() if h is fn]:
            del hooks[key]
            getattr(dec, "_forward_hooks_always_called", {}).pop(key, None)


# --------------------------------------------------------------------------- fingerprint


def base_fingerprint(model, weight: torch.Tensor | None = None) -> dict:
    """What identifies the base model a style head belongs to: its config's name (kept for the
    messages, not compared), model type, vocab and hidden size, and a sha256 of 8 lm_head rows
    spread over the vocab (rounded to bf16, so fp32 / bf16 loads of one checkpoint agree)."""
    cfg = getattr(model, "config", None)
    w = weight if weight is not None else model.get_output_embeddings().weight
    V, D = (int(n) for n in w.shape)
    idx = torch.linspace(0, V - 1, steps=min(_FINGERPRINT_ROWS, V)).round().long().unique()
    rows = w.detach()[idx.to(w.device)].to("cpu", torch.float32).to(torch.bfloat16).contiguous()
    digest = hashlib.sha256(rows.view(torch.int16).numpy().tobytes()).hexdigest()
    name = getattr(cfg, "_name_or_path", None) or getattr(cfg, "name_or_path", None) or ""
    return {"name_or_path": str(name), "model_type": getattr(cfg, "model_type", None), "vocab_size": V,
            "hidden_size": D, "lm_head_sha256": digest}


def fingerprint_mismatch(a: dict, b: dict, a_name: str = "a", b_name: str = "b") -> str | None:
    """The first strict field that differs, worded ``"field: <a_name> x, <b_name> y"``, or None."""
    for f in STRICT_FIELDS:
        va, vb = a.get(f), b.get(f)
        if va != vb:
            if f == "lm_head_sha256":
                va, vb = str(va)[:12], str(vb)[:12]
            return f"{f}: {a_name} {va}, {b_name} {vb}"
    return None


# --------------------------------------------------------------------------- public


def get_style_head(model) -> StyleHead | None:
    """The :class:`StyleHead` of ``model`` (PEFT / DDP wrappers looked through), or None."""
    head = _unwrap(model).get_output_embeddings()
    return head if isinstance(head, StyleHead) else None


def _require(model, what: str) -> StyleHead:
    head = get_style_head(model)
    if head is None:
        raise ValueError(f"{what}: the model has no style head; add one with dk.hf.add_style_head(model, rank=...) "
                         "or dk.hf.load_style_head(model, path)")
    return head


def add_style_head(model, rank: int = 16, alpha: float | None = None, dropout: float = 0.0, *,
                   train_decoder: bool = False, dtype: torch.dtype | None = None):
    """Freeze every parameter of ``model`` and give its lm_head a trainable low-rank
    correction. Returns ``model``.

    Args:
        model: a transformers causal LM (PEFT / DDP wrappers looked through) whose output
            embeddings are a plain ``nn.Linear`` (tied to the input embeddings or not).
        rank: r, the correction's rank. alpha: ``scaling = alpha / rank`` (None: rank,
            scaling 1). dropout: on the head's input, for the correction only.
        train_decoder: False (default): the decoder runs without gradients and the head's
            input is detached (nothing upstream trains; see the module docstring); True: both
            stay as they are (for a decoder you unfreeze or adapt yourself).
        dtype: of A / B (default fp32 over a 16-bit head, else the head's dtype).
    """
    target = _unwrap(model)
    if get_style_head(target) is not None:
        raise ValueError("the model has a style head already: dk.hf.remove_style_head(model) first, or "
                         "dk.hf.load_style_head(model, path) to replace it")
    head = target.get_output_embeddings() if callable(getattr(target, "get_output_embeddings", None)) else None
    if not is_plain_linear(head):
        raise ValueError(f"add_style_head needs a plain nn.Linear lm_head; {type(target).__name__}'s is a "
                         f"{type(head).__name__} (a PEFT adapter on it: merge_and_unload() first; quantised: load "
                         "the lm_head unquantised)")
    fp = base_fingerprint(target, head.weight)
    flags = {n: p.requires_grad for n, p in target.named_parameters()}
    sh = StyleHead(head, rank, alpha, dropout, dtype=dtype, detach_input=not train_decoder, fingerprint=fp)
    for p in target.parameters():
        p.requires_grad_(False)
    sh.__dict__["_requires_grad_before"] = flags
    target.set_output_embeddings(sh)
    if target.get_output_embeddings() is not sh:
        target.set_output_embeddings(head)
        raise ValueError(f"{type(target).__name__}.set_output_embeddings did not install the style head")
    dec = _decoder(target) if not train_decoder else None
    if dec is not None:
        dec.register_forward_pre_hook(_decoder_no_grad)
        dec.register_forward_hook(_decoder_restore_grad, always_call=True)
    return model


def remove_style_head(model, *, merge: bool = False):
    """Put the plain lm_head back (with the correction folded into its weight when
    ``merge=True`` or when it is merged already; ``merge`` follows :func:`merge_style_head`'s
    rule for tied embeddings), drop the decoder hooks and restore every parameter's
    ``requires_grad``. Returns ``model``."""
    target = _unwrap(model)
    sh = _require(target, "remove_style_head")
    if merge and not sh.merged:
        merge_style_head(target)
    dec = _decoder(target)
    if dec is not None:
        _remove_decoder_hooks(dec)
    target.set_output_embeddings(sh.plain())
    flags = sh.__dict__.get("_requires_grad_before", {})
    for n, p in target.named_parameters():
        if n in flags:
            p.requires_grad_(flags[n])
    return model


def _tied(target, sh: StyleHead) -> bool:
    emb = target.get_input_embeddings() if callable(getattr(target, "get_input_embeddings", None)) else None
    return emb is not None and getattr(emb, "weight", None) is sh.weight


def merge_style_head(model, *, untie: bool = False):
    """Fold ``scaling * B @ A`` into the lm_head weight (zero added latency: the head is a plain
    matmul again; the fused path sees no correction). Returns ``model``.

    With tied input / output embeddings the weight is the input embeddings too, and merging
    would change them: refused (ValueError) unless ``untie=True``, which first gives the lm_head
    its own copy of the weight (V x D more memory) and sets ``config.tie_word_embeddings=False``.
    The sum is formed in fp32 (fp64 for an fp64 weight) and rounded once to the weight's dtype.
    """
    target = _unwrap(model)
    sh = _require(target, "merge_style_head")
    if sh.merged:
        return model
    if _tied(target, sh):
        if not untie:
            raise ValueError("merge_style_head: the lm_head weight is tied to the input embeddings, so merging would "
                             "change the input embeddings too. Pass untie=True (the lm_head gets its own copy of the "
                             "weight, V x D more memory) or keep the head unmerged (the fused path computes the "
                             "correction at rank r)")
        w = sh.weight
        sh.weight = torch.nn.Parameter(w.detach().clone(), requires_grad=w.requires_grad)
        for cfg in (getattr(target, "config", None), _text_config(target)):
            if cfg is not None:
                cfg.tie_word_embeddings = False
        tied = getattr(target, "all_tied_weights_keys", None)
        if isinstance(tied, dict):
            head_name = next((n for n, m in target.named_modules() if m is sh), "lm_head")
            tied.pop(f"{head_name}.weight", None)
    w = sh.weight
    ct = torch.promote_types(w.dtype, torch.float32)
    with torch.no_grad():
        w.copy_((w.to(ct) + sh.delta_weight(ct).to(w.device)).to(w.dtype))
    sh.merged = True
    return model


def unmerge_style_head(model):
    """Take the correction out of the lm_head weight again (``W - scaling * B @ A`` in fp32:
    the original weight within one rounding of its dtype). An untied head stays untied.
    Returns ``model``."""
    target = _unwrap(model)
    sh = _require(target, "unmerge_style_head")
    if not sh.merged:
        return model
    w = sh.weight
    ct = torch.promote_types(w.dtype, torch.float32)
    with torch.no_grad():
        w.copy_((w.to(ct) - sh.delta_weight(ct).to(w.device)).to(w.dtype))
    sh.merged = False
    return model


def _text_config(target):
    cfg = getattr(target, "config", None)
    try:
        return cfg.get_text_config() if callable(getattr(cfg, "get_text_config", None)) else None
    except Exception:  # noqa: BLE001 -- unusual configs: the top-level one only
        return None

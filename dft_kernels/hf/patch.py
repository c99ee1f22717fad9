"""One generic Hugging Face adapter: :func:`patch` / :func:`unpatch`.

How it works -- no per-family forward is copied:

``patch(model)`` replaces the *instance* attribute ``model.forward`` with a thin
wrapper. Without ``labels`` / ``shift_labels`` / ``target_index`` the wrapper calls
the model's original forward with exactly the arguments it got (generation,
evaluation without labels: unchanged behaviour). With them, it calls the original
forward *without* ``labels`` (so the model computes no loss of its own) and

- fused path (training mode by default): a forward pre-hook on the output
  embeddings module (``model.get_output_embeddings()``, the ``lm_head``) records
  its input -- the final hidden states, after whatever the forward does between
  the decoder and the head -- and hands the head a single row instead, so the
  ``[B, T, V]`` logits are never computed. The loss is then
  :func:`dft_kernels.fused_linear_dft_loss` on the recorded hidden states and the
  head's own ``weight`` / ``bias`` (tied embeddings included: it is the same
  parameter), with the model's known logit transforms (``dft_kernels/lm_head.py``,
  shared with the targets build's teacher) folded in: Gemma-style
  ``final_logit_softcapping`` -> ``softcap``; Cohere-style ``logit_scale`` and
  Granite-style ``1 / logits_scaling`` -> the hidden states and the bias are
  multiplied by the scale (``(s*h) @ W.T + s*b == s * (h @ W.T + b)``). On the
  first call the single row of logits the model produced itself is compared with
  the same row computed the fused way: an unknown transform raises instead of
  silently training on the wrong logits. The output has ``logits=None``.
  The head may be a plain ``nn.Linear``, a PEFT LoRA layer (one active adapter), PEFT's
  ``modules_to_save`` copy or a style head (``dft_kernels/lm_head.py``): a low-rank correction
  goes to the loss as ``lora_A`` / ``lora_B`` / ``lora_scaling`` / ``lora_dropout``, so
  the logits are never formed with it either (docs/design.md sec. 17.2).
- logits path (eval mode by default, ``skip_logits=False``, or an output module the
  fused path cannot read -- e.g. a quantised lm_head, which warns once with the bytes
  the logits cost): the original forward computes its logits as usual (every
  transform applied by the model itself) and the loss is :func:`dft_kernels.dft_loss`
  on them.

Why a hook on the head rather than calling ``model.get_decoder()`` ourselves: the
original forward keeps doing all its own argument handling (cache, masks,
position ids, multimodal inputs, PEFT, gradient checkpointing) and any step
between decoder and head, and the hook sees exactly the tensor the head would
have multiplied. ``logits_to_keep`` is not needed, so models without it work too.

Label alignment follows transformers' ``ForCausalLMLoss`` exactly: ``labels`` are
padded on the right with ``ignore_index`` and shifted left by one, so position t
is scored against token t+1 and the last position against nothing; a pre-shifted
``shift_labels=`` is used as is. The targets are *not* shifted: row t already is
the teacher's distribution of the token after position t (docs/design.md sec. 2), i.e.
aligned with the logits row t like the shifted labels. A position counts when its
shifted label is not ``ignore_index`` (sec. 5), so the last position -- whose
shifted label is always ``ignore_index`` -- drops out together with its targets,
and so do prompt and padding positions. Without any labels, positions count where
they have a valid target slot; the last position's targets are then dropped
explicitly, so that the same positions count with and without labels.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import types
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from ..losses import dft_loss, fused_linear_dft_loss
from ..lm_head import (Fallback, HeadParts, fold_logit_scale, logit_transforms, logits_bytes_message, resolve_head,
                       run_capturing_hidden)
from ..options import DFTLossOutput, check_options
from .first_batch import check_first_batch, check_label_arguments

_STATE_ATTR = "_dft_kernels_patch"
_FORWARD_MARK = "_dft_kernels_forward"
#: keyword arguments the patched forward adds to the model's own
EXTRA_FORWARD_ARGS = ("target_index", "target_logprobs", "shift_labels", "num_items_in_batch")

_P = inspect.Parameter
_FUSED_KEYWORDS = {n: p.default for n, p in inspect.signature(fused_linear_dft_loss).parameters.items()
                   if p.kind is _P.KEYWORD_ONLY}
_LOGITS_KEYWORDS = {n for n, p in inspect.signature(dft_loss).parameters.items() if p.kind is _P.KEYWORD_ONLY}
_NOT_PATCH_KEYWORDS = {
    "softcap": "the softcap comes from the model (config.final_logit_softcapping)",
    "bias": "the bias is the model's own lm_head bias",
    "num_items_in_batch": "pass it to each forward call (the Trainer does)",
    "return_components": "the components are always computed: read output.loss_components or "
                         "dft_kernels.hf.last_loss_components(model)",
    "vocab_parallel": "a vocab-sharded lm_head is not supported by dk.hf.patch; call "
                      "dk.fused_linear_dft_loss yourself",
}
#: loss keywords dk.hf.patch accepts
PATCH_LOSS_KEYWORDS = tuple(n for n in _FUSED_KEYWORDS if n not in _NOT_PATCH_KEYWORDS)


@dataclass
class _PatchState:
    loss_kwargs: dict
    skip_logits: bool | None
    check: bool
    orig_forward: Any                  # instance-level forward found at patch time, None = the class's
    param_names: tuple                 # positional parameter names of the original forward
    var_positional: bool
    accepts_loss_kwargs: tuple         # (was set on the instance, old value)
    active: bool = True
    checked: bool = False
    warned: bool = False
    data_checked: bool = False       # the first batch's data / alignment (hf/first_batch.py)
    last_components: DFTLossOutput | None = None


# --------------------------------------------------------------------------- public


def patch(model, config=None, **keywords):
    """Make ``model`` (a transformers ``*ForCausalLM``, possibly inside a PEFT or DDP
    wrapper) compute the DFT loss itself. Returns ``model``.

    ``config`` is an optional :class:`~dft_kernels.hf.DFTConfig`; ``keywords`` are
    loss keywords of :func:`dft_kernels.fused_linear_dft_loss` (``lam``,
    ``divergence``, ``beta``, ``tail``, ``accuracy``, ``temperature``,
    ``ignore_index``, ``reduction``, ``impl``, ``validate``, ``chunk_elems``,
    ``accum_fp32``) and the adapter options ``skip_logits``
    (``None`` = fused and ``logits=None`` in training mode, logits path in eval
    mode; ``True`` / ``False`` to force) and ``check`` (verify the logit transforms
    on the first fused call); they override ``config``. Patching a patched model
    replaces its options.

    The patched forward takes ``labels``, ``shift_labels``, ``target_index`` and
    ``target_logprobs`` (``[B, T, K]``, aligned with the input positions: row t is
    the teacher's distribution of the token after position t) and
    ``num_items_in_batch`` besides the model's own arguments; see the module
    docstring for the alignment rules.
    """
    opts = dict(config.patch_kwargs()) if config is not None else {}
    opts.update(keywords)
    skip_logits = opts.pop("skip_logits", None)
    check = opts.pop("check", True)
    if skip_logits not in (None, True, False):
        raise ValueError(f"skip_logits={skip_logits!r} must be None (auto: fused in training mode), True or False")
    loss_kwargs = _check_loss_keywords(opts)

    target = _unwrap(model)
    _check_model(target)
    if skip_logits is not False:        # a LoRA variant the fused path refuses: say so now, not at the first step
        resolve_head(target.get_output_embeddings())

    state = target.__dict__.get(_STATE_ATTR)
    if state is not None:                    # re-patch: new options, same wrapper
        state.loss_kwargs, state.skip_logits, state.check = loss_kwargs, skip_logits, bool(check)
        state.active, state.checked, state.warned = True, False, False
        target.accepts_loss_kwargs = True
        return model

    orig_inst = target.__dict__.get("forward")
    orig = orig_inst if orig_inst is not None else types.MethodType(type(target).forward, target)
    sig = inspect.signature(orig)
    params = list(sig.parameters.values())
    param_names = tuple(p.name for p in params if p.kind in (_P.POSITIONAL_ONLY, _P.POSITIONAL_OR_KEYWORD))
    var_positional = any(p.kind is _P.VAR_POSITIONAL for p in params)
    names = {p.name for p in params}
    var_kw = [p for p in params if p.kind is _P.VAR_KEYWORD]
    plain = [p for p in params if p.kind is not _P.VAR_KEYWORD]
    extras = [_P(n, _P.KEYWORD_ONLY, default=None) for n in EXTRA_FORWARD_ARGS if n not in names]
    # a **kwargs tells the Trainer that the model takes num_items_in_batch
    var_kw = var_kw or [_P("kwargs", _P.VAR_KEYWORD)]
    new_sig = sig.replace(parameters=[_P("self", _P.POSITIONAL_OR_KEYWORD)] + plain + extras + var_kw)

    state = _PatchState(
        loss_kwargs=loss_kwargs, skip_logits=skip_logits, check=bool(check), orig_forward=orig_inst,
        param_names=param_names, var_positional=var_positional,
        accepts_loss_kwargs=("accepts_loss_kwargs" in target.__dict__, target.__dict__.get("accepts_loss_kwargs")))
    target.__dict__[_STATE_ATTR] = state
    target.forward = types.MethodType(_make_forward(new_sig, type(target).__name__), target)
    # the patched loss honours num_items_in_batch (the Trainer reads this first)
    target.accepts_loss_kwargs = True
    return model


def unpatch(model) -> bool:
    """Restore the original forward of a patched model. Returns whether it was patched.

    If something wrapped the patched forward afterwards (e.g. accelerate), that
    wrapper stays and the DFT forward underneath becomes a pass-through."""
    target = _unwrap(model)
    state = target.__dict__.get(_STATE_ATTR)
    if state is None:
        return False
    had, old = state.accepts_loss_kwargs
    if had:
        target.accepts_loss_kwargs = old
    else:
        target.__dict__.pop("accepts_loss_kwargs", None)
    top = target.__dict__.get("forward")
    if getattr(getattr(top, "__func__", None), _FORWARD_MARK, False):
        if state.orig_forward is None:
            del target.__dict__["forward"]
        else:
            target.forward = state.orig_forward
        del target.__dict__[_STATE_ATTR]
    else:
        state.active = False
    return True


def is_patched(model) -> bool:
    """Whether ``model`` (or the transformers model inside it) is patched and active."""
    state = _unwrap(model).__dict__.get(_STATE_ATTR)
    return state is not None and state.active


def last_loss_components(model) -> DFTLossOutput | None:
    """The :class:`~dft_kernels.DFTLossOutput` of the patched model's last loss
    computation (loss, divergence, accuracy, n_tokens, teacher_mass, student_mass;
    all but ``loss`` detached), or None."""
    state = _unwrap(model).__dict__.get(_STATE_ATTR)
    return None if state is None else state.last_components


# --------------------------------------------------------------------------- checks


def _unwrap(model):
    """The transformers model inside DDP / DataParallel / torch.compile / PEFT wrappers."""
    m = model
    for _ in range(16):
        if isinstance(m, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            m = m.module
        elif isinstance(getattr(m, "_orig_mod", None), torch.nn.Module):       # torch.compile
            m = m._orig_mod
        elif type(m).__module__.startswith("peft") and callable(getattr(m, "get_base_model", None)):
            m = m.get_base_model()                                              # PeftModel
        elif type(m).__module__.startswith("peft") and isinstance(getattr(m, "model", None), torch.nn.Module):
            m = m.model                                                         # LoraModel & co.
        else:
            break
    return m


def _check_loss_keywords(opts: dict) -> dict:
    for k in opts:
        if k in _NOT_PATCH_KEYWORDS:
            raise TypeError(f"dk.hf.patch does not take {k!r}: {_NOT_PATCH_KEYWORDS[k]}")
        if k not in _FUSED_KEYWORDS:
            raise TypeError(f"dk.hf.patch got an unknown keyword {k!r}; loss keywords are "
                            f"{list(PATCH_LOSS_KEYWORDS)}, adapter options 'skip_logits' and 'check'")
    full = {**_FUSED_KEYWORDS, **opts}
    check_options(**{k: full[k] for k in ("lam", "divergence", "beta", "tail", "accuracy", "temperature",
                                          "reduction", "impl")}, softcap=None)
    return dict(opts)


def _check_model(target) -> None:
    if not isinstance(target, torch.nn.Module):
        raise TypeError(f"dk.hf.patch expects a transformers *ForCausalLM model (a torch.nn.Module), got "
                        f"{type(target).__name__}")
    cls = type(target).__name__
    if not callable(getattr(target, "get_output_embeddings", None)):
        raise ValueError(f"dk.hf.patch: {cls} has no get_output_embeddings() method; it needs a transformers "
                         "causal LM (decoder + lm_head), e.g. one loaded with AutoModelForCausalLM")
    head = target.get_output_embeddings()
    if head is None:
        raise ValueError(f"dk.hf.patch: {cls} has no output embeddings (get_output_embeddings() returned None), "
                         "so there is no lm_head to compute the loss with; patch the causal LM that holds it "
                         f"(e.g. AutoModelForCausalLM), not the bare decoder {cls}")
    if not isinstance(head, torch.nn.Module) or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError(f"dk.hf.patch: the output embeddings of {cls} ({type(head).__name__}) have no weight "
                         "tensor; a linear lm_head is needed")
    cfg = getattr(target, "config", None)
    if getattr(cfg, "is_encoder_decoder", False):
        raise ValueError(f"dk.hf.patch: {cls} is an encoder-decoder model; its labels are not shifted like a "
                         "causal LM's. Only decoder-only causal LMs are supported")
    loss_type = getattr(target, "loss_type", None)
    if isinstance(loss_type, str):
        try:
            from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss
        except ImportError:                       # older transformers: no loss mapping to consult
            LOSS_MAPPING, ForCausalLMLoss = {}, None
        fn = LOSS_MAPPING.get(loss_type)
        if fn is not None and fn is not ForCausalLMLoss:
            raise ValueError(f"dk.hf.patch: {cls} computes a {loss_type!r} loss, not a causal-LM loss over "
                             "shifted labels; only causal LMs are supported")


def _check_batch(kwargs, labels, shift_labels, target_idx, target_lp):
    """Shape checks that cost nothing; returns the (batch, seq_len) of the input."""
    ref, lead = None, None
    for name in ("input_ids", "inputs_embeds"):
        t = kwargs.get(name)
        if isinstance(t, torch.Tensor) and t.dim() >= 2:
            ref, lead = name, tuple(t.shape[:2])
            break
    if (target_idx is None) != (target_lp is None):
        raise ValueError("target_index and target_logprobs go together: pass both or neither")
    if target_idx is not None:
        for name, t in (("target_index", target_idx), ("target_logprobs", target_lp)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor of shape [batch, seq_len, K], got {type(t).__name__}")
            if t.dim() != 3:
                raise ValueError(f"{name} must have shape [batch, seq_len, K] (K teacher slots per input "
                                 f"position), got {tuple(t.shape)}")
            if lead is not None and tuple(t.shape[:2]) != lead:
                raise ValueError(
                    f"{name} has shape {tuple(t.shape)} but {ref} has shape {lead}: the targets need one row per "
                    "input position, [batch, seq_len, K], row t = the teacher's distribution of the token after "
                    "position t (not shifted). Were the targets computed on a different tokenisation, truncation "
                    "or padding of the batch?")
    for name, t in (("labels", labels), ("shift_labels", shift_labels)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape [batch, seq_len], got {type(t).__name__}")
        if lead is not None and tuple(t.shape) != lead:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but {ref} has shape {lead}; pass one label per "
                             "input position (the model shifts them)" if name == "labels" else
                             f"{name} has shape {tuple(t.shape)} but {ref} has shape {lead}")
    return lead


# --------------------------------------------------------------------------- the forward


def _make_forward(signature: inspect.Signature, cls_name: str):
    # a new function per patch (its __signature__ is the patched model's), closing
    # over no model: deepcopy rebinds the bound method to the copy
    def forward(self, *args, **kwargs):
        return _patched_forward(self, args, kwargs)

    forward.__signature__ = signature
    forward.__name__ = "forward"
    forward.__qualname__ = f"{cls_name}.forward"
    forward.__doc__ = (f"{cls_name}.forward patched by dft_kernels.hf.patch: also takes target_index / "
                       "target_logprobs [B, T, K], shift_labels and num_items_in_batch, and computes the DFT loss.")
    setattr(forward, _FORWARD_MARK, True)
    return forward


def _original_forward(model, state):
    if state is not None and state.orig_forward is not None:
        return state.orig_forward
    return types.MethodType(type(model).forward, model)


def _patched_forward(model, args, kwargs):
    state = model.__dict__.get(_STATE_ATTR)
    orig = _original_forward(model, state)
    if state is None or not state.active:
        for n in ("target_index", "target_logprobs"):
            if kwargs.get(n) is not None:
                raise ValueError(f"{type(model).__name__} is not patched (any more): {n} is not understood; "
                                 "call dk.hf.patch(model) first")
            kwargs.pop(n, None)
        return orig(*args, **kwargs)
    if args and not state.var_positional:
        if len(args) > len(state.param_names):
            raise TypeError(f"{type(model).__name__}.forward takes at most {len(state.param_names)} positional "
                            f"arguments, got {len(args)}")
        for name, value in zip(state.param_names, args):
            if name in kwargs:
                raise TypeError(f"{type(model).__name__}.forward got multiple values for argument {name!r}")
            kwargs[name] = value
        args = ()
    wants_loss = any(kwargs.get(n) is not None for n in ("labels", "shift_labels", "target_index"))
    if not wants_loss:
        if kwargs.get("target_logprobs") is not None:
            raise ValueError("target_logprobs was passed without target_index: pass both or neither")
        kwargs.pop("target_index", None)
        kwargs.pop("target_logprobs", None)
        return orig(*args, **kwargs)
    return _loss_forward(model, state, orig, args, kwargs)


def _loss_forward(model, state: _PatchState, orig, args, kwargs):
    labels = kwargs.pop("labels", None)
    shift_labels = kwargs.pop("shift_labels", None)
    target_idx = kwargs.pop("target_index", None)
    target_lp = kwargs.pop("target_logprobs", None)
    nib = kwargs.pop("num_items_in_batch", None)
    return_dict = kwargs.pop("return_dict", None)
    kwargs["return_dict"] = True
    ignore_index = state.loss_kwargs.get("ignore_index", _FUSED_KEYWORDS["ignore_index"])
    _check_batch(kwargs, labels, shift_labels, target_idx, target_lp)
    check_label_arguments(labels, shift_labels)

    # ForCausalLMLoss's alignment: pad right with ignore_index, shift left by one
    if shift_labels is not None:
        shifted = shift_labels
    elif labels is not None:
        shifted = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    else:
        shifted = None
    if shifted is None and target_idx is not None and target_idx.shape[1] > 0:
        # no labels: positions count by their targets; drop the last one like the label shift does
        target_idx = target_idx.clone()
        target_idx[:, -1] = -1
    shifted, target_idx = mask_padding(kwargs.get("attention_mask"), shifted, target_idx, ignore_index)

    if not state.data_checked:      # once per model, even with validate=False (docs/design.md sec. 7)
        check_first_batch(kwargs.get("input_ids"), labels, shifted, target_idx, target_lp,
                          model.get_output_embeddings().weight.shape[0], ignore_index)
        state.data_checked = True
    skip = state.skip_logits if state.skip_logits is not None else model.training
    head = model.get_output_embeddings()
    parts = resolve_head(head) if skip else None
    if isinstance(parts, HeadParts):
        out, comps = _fused_loss(model, state, orig, head, parts, args, kwargs, shifted, target_idx, target_lp, nib)
        logits = None
    else:
        out, comps = _logits_loss(model, state, orig, args, kwargs, shifted, target_idx, target_lp, nib)
        logits = out.logits
        if isinstance(parts, Fallback) and not state.warned:     # never silently: once per patch
            state.warned = True
            k = 0 if target_idx is None else int(target_idx.shape[-1])
            warnings.warn(f"dk.hf.patch: the output embeddings of {type(model).__name__} are {parts.reason}, which "
                          f"the fused path cannot read: the loss is computed from the model's logits instead; "
                          f"{logits_bytes_message(logits, k)}. Fix: {parts.fix}", stacklevel=3)
    state.last_components = comps
    out = _rebuild(model, out, loss=comps.loss, logits=logits)
    out.loss_components = comps          # plain attribute: not part of the dict / tuple view
    if return_dict is None:
        return_dict = getattr(getattr(model, "config", None), "return_dict", True)
    if return_dict is False:
        return out.to_tuple()
    return out


def mask_padding(attention_mask, shifted, target_idx, ignore_index):
    """A padding position (``attention_mask == 0``, a 2-D mask) predicts nothing, whatever the
    padding side: left padding would otherwise score the last pad against the first token.
    Returns ``(shifted, target_idx)`` with such positions ignored / emptied."""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        return shifted, target_idx
    pad = attention_mask == 0
    if shifted is not None and tuple(shifted.shape) == tuple(pad.shape):
        shifted = shifted.masked_fill(pad.to(shifted.device), ignore_index)
    elif shifted is None and target_idx is not None and tuple(target_idx.shape[:2]) == tuple(pad.shape):
        target_idx = target_idx.masked_fill(pad.to(target_idx.device).unsqueeze(-1), -1)
    return shifted, target_idx


def _fused_loss(model, state, orig, head, parts: HeadParts, args, kwargs, shifted, target_idx, target_lp, nib):
    cls = type(model).__name__
    with _dropout_off(parts.lora_dropout):     # the head's own one row: deterministic, for the check
        out, h = run_capturing_hidden(lambda: orig(*args, **kwargs), head, who=f"dk.hf.patch: {cls}",
                                      fix="patch with skip_logits=False to compute the loss from the model's logits")
    softcap, scale, _ = logit_transforms(model)
    weight, bias, lora_A, lora_B = parts.weight, parts.bias, parts.lora_A, parts.lora_B
    if h.device != weight.device:          # e.g. device_map: the head's hook would have moved it
        h = h.to(weight.device)
    their_logits = getattr(out, "logits", None)
    if isinstance(their_logits, torch.Tensor) and their_logits.dim() and their_logits.shape[-1] < weight.shape[0]:
        # the model drops padded vocab rows from its logits: so do we
        V = their_logits.shape[-1]
        weight = weight[:V]
        bias = bias[:V] if bias is not None else None
        lora_B = lora_B[:V] if lora_B is not None else None
    rows = tuple(h.shape[:-1])
    for name, t in (("labels", shifted), ("target_index", target_idx)):
        if t is not None and tuple(t.shape[:2]) != rows:
            raise ValueError(f"{name} is {tuple(t.shape)[:2]} per batch but the final hidden states of {cls} "
                             f"cover {rows}; do not pass logits_to_keep (or other arguments that drop positions) "
                             "together with labels / targets")
    if state.check and not state.checked:
        _verify(model, their_logits, h, weight, bias, scale, softcap, (lora_A, lora_B, parts.lora_scaling),
                parts.what)
        state.checked = True
    h, bias = fold_logit_scale(h, bias, scale)     # the low-rank term scales too
    dev = h.device.type
    ac_dtype = _autocast_dtype(dev)
    if ac_dtype is not None:           # do what autocast does to the lm_head's matmul, then switch it off
        h, weight = h.to(ac_dtype), weight.to(ac_dtype)
        bias = bias.to(ac_dtype) if bias is not None else None
    elif h.dtype != weight.dtype:
        h = h.to(weight.dtype)
    if bias is not None and bias.dtype != weight.dtype:
        bias = bias.to(weight.dtype)
    lora = {}
    if lora_A is not None:             # PEFT keeps adapters in fp32 over a 16-bit base: one dtype for the op
        lora = dict(lora_A=lora_A.to(weight.dtype), lora_B=lora_B.to(weight.dtype),
                    lora_scaling=parts.lora_scaling, lora_dropout=parts.lora_dropout)
    ctx = torch.autocast(dev, enabled=False) if ac_dtype is not None else contextlib.nullcontext()
    with ctx:
        comps = fused_linear_dft_loss(
            h, weight, _to(target_idx, h.device), _to(target_lp, h.device), _to(shifted, h.device), bias=bias,
            softcap=softcap, num_items_in_batch=nib, return_components=True, **lora, **state.loss_kwargs)
    return out, comps


@contextlib.contextmanager
def _dropout_off(dropout):
    """The adapter's dropout module in eval mode for the model's own forward: the head then
    sees one row only (its output is the first call's check, nothing else), and the check
    compares it without a random mask. The loss applies the dropout itself."""
    if not (isinstance(dropout, torch.nn.Module) and dropout.training):
        yield
        return
    dropout.eval()
    try:
        yield
    finally:
        dropout.train()


def _logits_loss(model, state, orig, args, kwargs, shifted, target_idx, target_lp, nib):
    out = orig(*args, **kwargs)
    logits = getattr(out, "logits", None)
    cls = type(model).__name__
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"dk.hf.patch: {cls}.forward returned no logits tensor to compute the loss from")
    rows = tuple(logits.shape[:-1])
    for name, t in (("labels", shifted), ("target_index", target_idx)):
        if t is not None and tuple(t.shape[:2]) != rows:
            raise ValueError(f"{name} is {tuple(t.shape)[:2]} per batch but the logits of {cls} cover {rows}; "
                             "do not pass logits_to_keep together with labels / targets")
    kw = {k: v for k, v in state.loss_kwargs.items() if k in _LOGITS_KEYWORDS}
    comps = dft_loss(logits, _to(target_idx, logits.device), _to(target_lp, logits.device), _to(shifted, logits.device),
                     num_items_in_batch=nib, return_components=True, **kw)
    return out, comps


def _to(t, device):
    return t.to(device) if isinstance(t, torch.Tensor) else t


def _rebuild(model, out, **updates):
    if not dataclasses.is_dataclass(out):
        raise TypeError(f"dk.hf.patch: {type(model).__name__}.forward returned a {type(out).__name__}, not a "
                        "ModelOutput, even with return_dict=True")
    values = {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}
    values.update(updates)
    return type(out)(**values)


# --------------------------------------------------------------------------- transforms, dtype, check


def _autocast_dtype(device_type: str):
    try:
        on = torch.is_autocast_enabled(device_type)
    except TypeError:                                  # torch < 2.4
        on = (torch.is_autocast_enabled() if device_type == "cuda"
              else torch.is_autocast_cpu_enabled() if device_type == "cpu" else False)
    if not on:
        return None
    try:
        return torch.get_autocast_dtype(device_type)
    except AttributeError:                             # torch < 2.4
        return torch.get_autocast_gpu_dtype() if device_type == "cuda" else torch.get_autocast_cpu_dtype()


def _verify(model, their_logits, h, weight, bias, scale, softcap, low_rank=(None, None, 1.0), what="") -> None:
    """Compare the one row of logits the model computed itself with the fused view of it
    (the low-rank term ``(A, B, scaling)`` of a LoRA / style head included)."""
    cls = type(model).__name__
    lora_A, lora_B, lora_scaling = low_rank
    with torch.no_grad():
        h1, b1 = fold_logit_scale(h[(slice(0, 1),) * (h.dim() - 1)], bias, scale)
        if _autocast_dtype(h1.device.type) is None:     # outside autocast: what the loss does
            h1 = h1.to(weight.dtype)
            b1 = b1.to(weight.dtype) if b1 is not None else None
        z = torch.nn.functional.linear(h1, weight, b1)
        if lora_A is not None:
            u = torch.nn.functional.linear(h1.to(lora_A.dtype), lora_A)
            z = z + (torch.nn.functional.linear(u, lora_B) * lora_scaling).to(z.dtype)
        if softcap is not None:
            z = softcap * torch.tanh(z.float() / softcap)
        if not isinstance(their_logits, torch.Tensor) or their_logits.numel() != z.numel():
            shape = tuple(their_logits.shape) if isinstance(their_logits, torch.Tensor) else None
            raise ValueError(f"dk.hf.patch: {cls} turned one row of lm_head output into logits of shape {shape}, "
                             f"expected {tuple(z.shape)}; the fused path does not understand this model. Patch "
                             "with skip_logits=False to compute the loss from the model's logits")
        theirs, ours = their_logits.float().reshape(-1).to(z.device), z.float().reshape(-1)
        low = {theirs.dtype, their_logits.dtype, z.dtype, weight.dtype} & {torch.float16, torch.bfloat16}
        tol = 3e-2 if low else 1e-3
        err = float((theirs - ours).abs().max())
        bound = tol * max(1.0, float(ours.abs().max()))
    if not err <= bound:
        raise ValueError(
            f"dk.hf.patch: {cls} transforms the output of its lm_head in a way the fused path does not reproduce "
            f"(max |difference| {err:.3g} on one row of logits; lm_head: {what or 'nn.Linear'}). Known transforms: "
            f"final_logit_softcapping "
            f"(softcap={softcap}), logit_scale / logits_scaling (scale={float(scale):.6g}). Patch with "
            "skip_logits=False to compute the loss from the model's own logits instead")

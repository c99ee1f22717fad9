"""Style heads on disk (docs/design.md sec. 17.2): save, load, blend.

A saved style head is a directory with two files, each written atomically (a temp file in
the same directory, then ``os.replace``):

- ``style_head.safetensors``: ``lora_A`` [r, D] and ``lora_B`` [V, r];
- ``style_head.json``, written last: ``format``, ``version``, ``rank``, ``alpha``,
  ``scaling``, ``dropout``, ``dtype``, the ``base`` model's fingerprint (config name, model
  type, vocab and hidden size, a hash of lm_head rows: ``style_head.base_fingerprint``), the
  ``targets`` it was trained on when given, a preset ``name``, a ``description``, the ``blend`` it came from
  and the sha256 of the tensor file (a torn pair is refused).

A head loads into / blends with heads of the same base only: vocab size, hidden size and
the lm_head hash must match (the error names the field that differs).
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..targets.store import atomic_write
from .patch import _unwrap
from .style_head import (STRICT_FIELDS, add_style_head, base_fingerprint, check_style_options, fingerprint_mismatch,
                         get_style_head, remove_style_head)

FORMAT = "dft_kernels.style_head"
VERSION = 1
TENSORS = "style_head.safetensors"
META = "style_head.json"


@dataclass(eq=False)
class StyleHeadWeights:
    """A style head outside a model: ``lora_A`` [r, D], ``lora_B`` [V, r], ``scaling`` and the
    metadata of its JSON file (``meta["base"]`` the base model's fingerprint)."""
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float
    meta: dict = field(default_factory=dict)
    source: str = "<memory>"

    @property
    def rank(self) -> int:
        return int(self.lora_A.shape[0])

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A`` [V, D] in fp32 (tests / inspection; [V, D] is formed)."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling


def _weights_of(model) -> StyleHeadWeights:
    sh = get_style_head(model)
    if sh is None:
        raise ValueError("save_style_head: the model has no style head; add one with dk.hf.add_style_head(model, "
                         "rank=...) and train it")
    fp = sh.base_fingerprint or base_fingerprint(_unwrap(model), sh.weight)
    dropout = sh.lora_dropout.p if isinstance(sh.lora_dropout, torch.nn.Dropout) else 0.0
    meta = {"rank": sh.rank, "alpha": sh.alpha, "scaling": sh.scaling, "dropout": dropout, "base": fp}
    return StyleHeadWeights(sh.lora_A.detach(), sh.lora_B.detach(), sh.scaling, meta)


def write_style_head(weights: StyleHeadWeights, path) -> Path:
    """Write ``weights`` to the directory ``path`` (created): the tensors, then the JSON."""
    from safetensors.torch import save
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file: a style head is saved to a directory (style_head.safetensors + "
                         "style_head.json)")
    out.mkdir(parents=True, exist_ok=True)
    data = save({"lora_A": weights.lora_A.detach().contiguous().cpu(),
                 "lora_B": weights.lora_B.detach().contiguous().cpu()})
    meta = {k: v for k, v in weights.meta.items() if k not in ("format", "version", "sha256", "dtype")}
    meta.update(format=FORMAT, version=VERSION, rank=weights.rank, scaling=float(weights.scaling),
                dtype=str(weights.lora_A.dtype).replace("torch.", ""), sha256=hashlib.sha256(data).hexdigest())
    meta.setdefault("alpha", float(weights.scaling) * weights.rank)
    meta.setdefault("dropout", 0.0)
    atomic_write(out / TENSORS, data)
    atomic_write(out / META, (json.dumps(meta, indent=1, sort_keys=True) + "\n").encode())
    return out


def save_style_head(model, path, *, targets=None, name: str | None = None, description: str | None = None) -> Path:
    """Save the model's style head to the directory ``path`` (atomic, see the module docstring).

    Args:
        model: a model with a style head (merged or not: A / B are saved, the fingerprint is
            the unmerged base's, taken when the head was added).
        path: a directory (created).
        targets: what it was trained on (a targets directory, a preset name, a list of them),
            recorded as given.
        name: a preset name (``dft-kernels eval --style-head NAME`` finds it by it).
        description: a short free text.
    Returns:
        The directory.
    """
    w = _weights_of(model)
    if name is not None:
        w.meta["name"] = str(name)
    if targets is not None:
        w.meta["targets"] = [str(t) for t in targets] if isinstance(targets, (list, tuple)) else str(targets)
    if description is not None:
        w.meta["description"] = str(description)
    return write_style_head(w, path)


def read_style_head(path) -> StyleHeadWeights:
    """The style head in the directory ``path`` (its JSON checked, the tensor file's sha256 too)."""
    from safetensors.torch import load
    d = Path(path)
    if not (d / META).is_file():
        raise FileNotFoundError(f"{d} holds no {META}: not a style head directory (dk.hf.save_style_head writes one)")
    try:
        meta = json.loads((d / META).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{d / META} is not JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{d / META} is not a style head file (format {meta.get('format')!r} if a mapping, "
                         f"expected {FORMAT!r})")
    if meta.get("version") != VERSION:
        raise ValueError(f"{d / META} has version {meta.get('version')!r}; this dft_kernels reads version {VERSION}")
    if not (d / TENSORS).is_file():
        raise FileNotFoundError(f"{d} has {META} but no {TENSORS}: save the style head again")
    data = (d / TENSORS).read_bytes()
    if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        raise ValueError(f"{d / TENSORS} does not match {META} (sha256): a partial or foreign write; save the style "
                         "head again")
    tensors = load(data)
    A, B = tensors.get("lora_A"), tensors.get("lora_B")
    base = meta.get("base") or {}
    if A is None or B is None or A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0] \
            or A.shape[0] != meta.get("rank") or [B.shape[0], A.shape[1]] != [base.get("vocab_size"),
                                                                               base.get("hidden_size")]:
        raise ValueError(f"{d / TENSORS}: lora_A / lora_B do not match {META} (rank {meta.get('rank')}, vocab "
                         f"{base.get('vocab_size')}, hidden {base.get('hidden_size')})")
    scaling = meta.get("scaling")
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
        raise ValueError(f"{d / META}: scaling {scaling!r} is not a finite number")
    return StyleHeadWeights(A, B, float(scaling), meta, str(d))


def _as_weights(src) -> StyleHeadWeights:
    return src if isinstance(src, StyleHeadWeights) else read_style_head(src)


def _check_base(a: dict, b: dict, a_name: str, b_name: str, what: str) -> None:
    diff = fingerprint_mismatch(a, b, a_name, b_name)
    if diff is not None:
        names = [f"{n} {d.get('name_or_path')!r}" for n, d in ((a_name, a), (b_name, b)) if d.get("name_or_path")]
        raise ValueError(f"{what}: different base models ({diff}{'; ' + ', '.join(names) if names else ''}). A style "
                         "head only loads into / blends with the base model it was trained on (compared: "
                         f"{', '.join(STRICT_FIELDS)})")


def load_style_head(model, source, *, train_decoder: bool = False):
    """Give ``model`` the style head saved in ``source`` (a directory or a
    :class:`StyleHeadWeights`), replacing a style head it has. Returns ``model``.

    Refused (ValueError, naming the field that differs) when the head was trained on another
    base model: vocab size, hidden size or the lm_head rows' hash differ. Like
    :func:`add_style_head`, every base parameter is frozen (``train_decoder`` as there)."""
    w = _as_weights(source)
    target = _unwrap(model)
    sh = get_style_head(target)
    if sh is not None and sh.merged:
        raise ValueError("load_style_head: the model's style head is merged into its lm_head; "
                         "dk.hf.unmerge_style_head(model) first")
    ours = (sh.base_fingerprint if sh is not None else None) or base_fingerprint(target)
    _check_base(w.meta.get("base") or {}, ours, "the head's", "the model's",
                f"style head {w.source} does not fit this model")
    if sh is not None:
        remove_style_head(target)
    dropout = w.meta.get("dropout", 0.0)
    check_style_options(w.rank, w.scaling * w.rank, dropout)
    add_style_head(target, rank=w.rank, alpha=w.scaling * w.rank, dropout=dropout, train_decoder=train_decoder)
    new = get_style_head(target)
    with torch.no_grad():
        new.lora_A.copy_(w.lora_A)
        new.lora_B.copy_(w.lora_B)
    return model


def blend_style_heads(heads: Mapping, *, out=None, description: str | None = None) -> StyleHeadWeights:
    """One style head whose correction is the weighted sum of the heads' corrections:
    ``sum_i w_i * s_i * B_i @ A_i`` as ``A = cat(A_i)``, ``B = cat(w_i * s_i * B_i)`` along the
    rank, scaling 1 (rank = the sum of the ranks; weights are used as given, not normalised).

    Args:
        heads: ``{directory or StyleHeadWeights: weight}``, weights finite numbers.
        out: a directory to save the blend to (atomic), or None.
        description: recorded with it.
    Returns:
        The blended :class:`StyleHeadWeights` (load it with :func:`load_style_head`).
    Raises:
        ValueError: no heads, a weight that is not a finite number, heads of different base
            models (the field and both heads named).
    """
    if not isinstance(heads, Mapping) or not heads:
        raise ValueError("blend_style_heads takes a non-empty mapping {style head directory: weight}")
    loaded = []
    for src, wt in heads.items():
        if isinstance(wt, bool) or not isinstance(wt, (int, float)) or not math.isfinite(wt):
            raise ValueError(f"blend_style_heads: the weight of {src} is {wt!r}; weights are finite numbers")
        loaded.append((_as_weights(src), float(wt)))
    first = loaded[0][0]
    for w, _ in loaded[1:]:
        _check_base(first.meta.get("base") or {}, w.meta.get("base") or {}, first.source, w.source,
                    f"cannot blend style heads {first.source} and {w.source}")
    dtype = first.lora_A.dtype
    A = torch.cat([w.lora_A.to(dtype) for w, _ in loaded], 0)
    B = torch.cat([(w.lora_B.double() * (wt * w.scaling)).to(dtype) for w, wt in loaded], 1)
    meta = {"rank": A.shape[0], "alpha": float(A.shape[0]), "scaling": 1.0, "dropout": 0.0,
            "base": dict(first.meta.get("base") or {}),
            "blend": [{"source": w.source, "weight": wt, "rank": w.rank, "scaling": w.scaling} for w, wt in loaded]}
    if description is not None:
        meta["description"] = str(description)
    blended = StyleHeadWeights(A, B, 1.0, meta)
    if out is not None:
        write_style_head(blended, out)
        blended.source = str(out)
    return blended


__all__ = ["StyleHeadWeights", "save_style_head", "load_style_head", "read_style_head", "write_style_head",
           "blend_style_heads"]

"""``DFTDataCollator``: pads token ids, labels and sparse teacher targets together."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..validation import validate_target_data

_SEQ_KEYS = ("input_ids", "attention_mask", "labels")
_TARGET_KEYS = ("target_index", "target_logprobs")


class DFTDataCollator:
    """Batch features ``{input_ids, attention_mask, labels, target_index [T, K],
    target_logprobs [T, K]}`` (lists or tensors) into padded tensors.

    Padding values: ``input_ids`` -> ``pad_token_id`` (or the tokenizer's),
    ``attention_mask`` -> 0, ``labels`` -> ``label_pad_token_id`` (-100),
    ``target_index`` -> -1 (empty slot), ``target_logprobs`` -> -inf (no mass). All
    are padded on the same side, so targets stay aligned with their positions.
    Features with different K are padded to the largest K with empty slots; a
    feature without targets (plain SFT data mixed in) gets empty slots only. A
    missing ``attention_mask`` is all ones; missing ``labels`` are ``input_ids``.
    Other keys are stacked as they are (they must then have equal shapes).

    ``pad_to_multiple_of`` rounds the padded length up; ``padding_side`` is
    "right" (default) or "left". Left padding counts the same positions as right
    padding: the label of a left-padded row's first token is set to
    ``label_pad_token_id`` (otherwise the last pad would be scored against it, one
    extra row per sequence; unpadded, no position predicts the first token).
    """

    def __init__(self, tokenizer=None, *, pad_token_id: int | None = None, label_pad_token_id: int = -100,
                 padding_side: str = "right", pad_to_multiple_of: int | None = None):
        if pad_token_id is None and tokenizer is not None:
            pad_token_id = getattr(tokenizer, "pad_token_id", None)
            if pad_token_id is None:
                pad_token_id = getattr(tokenizer, "eos_token_id", None)
        if pad_token_id is None:
            pad_token_id = 0
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side={padding_side!r} must be 'right' or 'left'")
        if pad_to_multiple_of is not None and (not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1):
            raise ValueError(f"pad_to_multiple_of={pad_to_multiple_of!r} must be None or a positive int")
        self.pad_token_id = int(pad_token_id)
        self.label_pad_token_id = int(label_pad_token_id)
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        """Pad and stack a list of features.

        Args:
            features: dicts with ``input_ids`` [T] (and optionally ``attention_mask`` /
                ``labels`` [T], ``target_index`` / ``target_logprobs`` [T, K]); T and K
                may differ between features.
        Returns:
            ``input_ids``, ``attention_mask``, ``labels`` [B, L] and, when any feature has
            targets, ``target_index`` / ``target_logprobs`` [B, L, K_max]; L = the longest
            T (rounded up to ``pad_to_multiple_of``)."""
        if not features:
            raise ValueError("DFTDataCollator got an empty list of features")
        feats = []
        for i, f in enumerate(features):
            if not isinstance(f, Mapping) or "input_ids" not in f:
                raise TypeError(f"feature {i} must be a dict with at least 'input_ids', got "
                                f"{type(f).__name__}{' with keys ' + str(list(f)) if isinstance(f, Mapping) else ''}")
            feats.append(self._feature(i, f))
        L = max(f["input_ids"].shape[0] for f in feats)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            L = (L + m - 1) // m * m
        batch = {
            "input_ids": self._stack([f["input_ids"] for f in feats], L, self.pad_token_id),
            "attention_mask": self._stack([f["attention_mask"] for f in feats], L, 0),
            "labels": self._stack([f["labels"] for f in feats], L, self.label_pad_token_id),
        }
        if self.padding_side == "left":
            # the last pad before a sequence would predict its first token: no position does that unpadded
            for b, f in enumerate(feats):
                n = f["input_ids"].shape[0]
                if 0 < n < L:
                    batch["labels"][b, L - n] = self.label_pad_token_id
        with_targets = [f for f in feats if "target_index" in f]
        if with_targets:
            K = max(f["target_index"].shape[1] for f in with_targets)
            idx_dtype = _common_dtype([f["target_index"] for f in with_targets], torch.int64)
            lp_dtype = _common_dtype([f["target_logprobs"] for f in with_targets], torch.float32)
            idx, lps = [], []
            for f in feats:
                T = f["input_ids"].shape[0]
                if "target_index" in f:
                    target_idx = f["target_index"].to(idx_dtype)
                    target_lp = f["target_logprobs"].to(lp_dtype)
                else:
                    target_idx = torch.full((T, 0), -1, dtype=idx_dtype)
                    target_lp = torch.full((T, 0), -torch.inf, dtype=lp_dtype)
                k = target_idx.shape[1]
                if k < K:
                    target_idx = torch.cat([target_idx, target_idx.new_full((T, K - k), -1)], dim=1)
                    target_lp = torch.cat([target_lp, target_lp.new_full((T, K - k), -torch.inf)], dim=1)
                idx.append(target_idx)
                lps.append(target_lp)
            batch["target_index"] = self._stack(idx, L, -1)
            batch["target_logprobs"] = self._stack(lps, L, -torch.inf)
        extra = set(feats[0]) - set(_SEQ_KEYS) - set(_TARGET_KEYS)
        for key in sorted(extra):
            vals = [f.get(key) for f in features]
            try:
                batch[key] = torch.stack([torch.as_tensor(v) for v in vals])
            except (RuntimeError, TypeError, ValueError) as e:
                raise ValueError(f"DFTDataCollator does not know how to pad {key!r} (it pads input_ids, "
                                 "attention_mask, labels, target_index, target_logprobs); drop that column or "
                                 f"give it the same shape in every feature ({e})") from None
        return batch

    # ------------------------------------------------------------------ helpers

    def _feature(self, i: int, f: Mapping) -> dict:
        ids = _as_1d(f["input_ids"], torch.int64, f"feature {i}: input_ids")
        T = ids.shape[0]
        out = {"input_ids": ids}
        am = f.get("attention_mask")
        out["attention_mask"] = (torch.ones(T, dtype=torch.int64) if am is None
                                 else _as_1d(am, torch.int64, f"feature {i}: attention_mask"))
        lab = f.get("labels")
        out["labels"] = ids.clone() if lab is None else _as_1d(lab, torch.int64, f"feature {i}: labels")
        for key in ("attention_mask", "labels"):
            if out[key].shape[0] != T:
                raise ValueError(f"feature {i}: {key} has length {out[key].shape[0]} but input_ids has {T}")
        target_idx, target_lp = f.get("target_index"), f.get("target_logprobs")
        if (target_idx is None) != (target_lp is None):
            raise ValueError(f"feature {i}: target_index and target_logprobs go together: give both or neither")
        if target_idx is not None:
            target_idx = torch.as_tensor(target_idx)
            target_lp = torch.as_tensor(target_lp)
            if target_idx.is_floating_point():
                raise TypeError(f"feature {i}: target_index must hold integer token ids, got {target_idx.dtype}")
            if not target_lp.is_floating_point():
                target_lp = target_lp.to(torch.float32)
            if target_idx.dim() == 1 and T == 0:
                target_idx, target_lp = target_idx.reshape(0, 0), target_lp.reshape(0, 0)
            if target_idx.dim() != 2 or target_idx.shape != target_lp.shape:
                raise ValueError(f"feature {i}: target_index {tuple(target_idx.shape)} and target_logprobs "
                                 f"{tuple(target_lp.shape)} must both have shape [seq_len, K]")
            if target_idx.shape[0] != T:
                raise ValueError(f"feature {i}: the targets have {target_idx.shape[0]} rows but input_ids has {T} "
                                 "tokens; give one row of teacher slots per input position (row t = the teacher's "
                                 "distribution of the token after position t)")
            try:  # cheap on CPU: ids >= -1, log-probs <= 0, mass <= 1 + 1e-3 (docs/design.md sec. 7)
                validate_target_data(target_idx, target_lp, None)
            except ValueError as e:
                raise ValueError(f"feature {i}: {e}") from None
            out["target_index"], out["target_logprobs"] = target_idx, target_lp
        for key, value in f.items():
            if key not in out and key not in _SEQ_KEYS and key not in _TARGET_KEYS:
                out[key] = value
        return out

    def _stack(self, rows: list[torch.Tensor], L: int, value) -> torch.Tensor:
        first = rows[0]
        out = first.new_full((len(rows), L) + tuple(first.shape[1:]), value)
        for b, r in enumerate(rows):
            n = r.shape[0]
            if self.padding_side == "right":
                out[b, :n] = r
            else:
                out[b, L - n:] = r
        return out


def _as_1d(x, dtype, what: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.dim() != 1:
        raise ValueError(f"{what} must be a 1-D sequence, got shape {tuple(t.shape)}")
    if t.is_floating_point():
        raise TypeError(f"{what} must hold integers, got {t.dtype}")
    return t.to(dtype)


def _common_dtype(ts: list[torch.Tensor], default: torch.dtype) -> torch.dtype:
    dtypes = {t.dtype for t in ts}
    return dtypes.pop() if len(dtypes) == 1 else default

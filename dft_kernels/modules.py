"""nn.Module wrappers that hold the loss keywords."""
from __future__ import annotations

import torch

from .options import check_options
from .losses import dft_loss, fused_linear_dft_loss

_DEFAULTS = dict(lam=0.2, divergence="forward_kl", beta=0.5, tail="bucket", accuracy="ce",
                 temperature=1.0, softcap=None, ignore_index=-100, reduction="mean", impl="auto",
                 validate=False, return_components=False)


class _Base(torch.nn.Module):
    _extra: dict = {}

    def __init__(self, **kwargs):
        super().__init__()
        unknown = set(kwargs) - set(_DEFAULTS) - set(self._extra)
        if unknown:
            raise TypeError(f"{type(self).__name__} got unknown keyword(s) {sorted(unknown)}")
        self.kwargs = {**_DEFAULTS, **self._extra, **kwargs}
        check_options(**{k: self.kwargs[k] for k in ("lam", "divergence", "beta", "tail", "accuracy",
                                                      "temperature", "softcap", "reduction", "impl")})

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items() if _DEFAULTS.get(k, None) != v)


class DFTLoss(_Base):
    """``DFTLoss(**keywords)(logits, target_index, target_logprobs, labels, num_items_in_batch=None)``."""

    _extra = {"chunk_elems": None}

    def forward(self, logits, target_index=None, target_logprobs=None, labels=None, num_items_in_batch=None):
        return dft_loss(logits, target_index, target_logprobs, labels,
                        num_items_in_batch=num_items_in_batch, **self.kwargs)


class FusedLinearDFTLoss(_Base):
    """``FusedLinearDFTLoss(**keywords)(hidden, weight, target_index, target_logprobs, labels, bias=None)``."""

    _extra = {"chunk_elems": None, "accum_fp32": True}

    def forward(self, hidden, weight, target_index=None, target_logprobs=None, labels=None, bias=None,
                num_items_in_batch=None):
        return fused_linear_dft_loss(hidden, weight, target_index, target_logprobs, labels, bias=bias,
                                     num_items_in_batch=num_items_in_batch, **self.kwargs)

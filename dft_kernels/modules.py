"""nn.Module wrappers that hold the loss keywords."""
from __future__ import annotations

import torch

from .losses import dft_loss, fused_linear_dft_loss
from .options import LOSS_DEFAULTS, STRATEGY_DEFAULTS, check_options, check_strategy


class _Base(torch.nn.Module):
    _extra: dict = {}

    def __init__(self, **kwargs):
        super().__init__()
        unknown = set(kwargs) - set(LOSS_DEFAULTS) - set(self._extra)
        if unknown:
            raise TypeError(f"{type(self).__name__} got unknown keyword(s) {sorted(unknown)}")
        self.kwargs = {**LOSS_DEFAULTS, **self._extra, **kwargs}
        check_options(**{k: self.kwargs[k] for k in ("lam", "divergence", "beta", "tail", "accuracy",
                                                      "temperature", "softcap", "reduction", "impl")})
        if "strategy" in self.kwargs:
            check_strategy(self.kwargs["strategy"], self.kwargs["memory_budget"])

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items() if LOSS_DEFAULTS.get(k, None) != v)


class DFTLoss(_Base):
    """:func:`dft_kernels.dft_loss` as a module: ``DFTLoss(**keywords)`` holds the loss
    keywords (``lam``, ``divergence``, ..., ``chunk_elems``; defaults in
    ``options.LOSS_DEFAULTS``), checked once here.

    ``forward(logits, target_index=None, target_logprobs=None, labels=None, num_items_in_batch=None)``

    Args:
        logits (torch.Tensor):
            student logits of shape `[..., V]`.
        target_index, target_logprobs, labels, num_items_in_batch:
            as in :func:`dft_kernels.dft_loss`: teacher ids and log-probs of shape
            `[..., K]` (or None), next-token ids of shape `[...]` (or None), the
            denominator of ``reduction="mean"`` (or None).

    Returns:
        The loss: a scalar, of shape `[...]` with ``reduction="none"``, or a
        :class:`~dft_kernels.DFTLossOutput` with ``return_components=True``.
    """

    _extra = {"chunk_elems": None}

    def forward(self, logits, target_index=None, target_logprobs=None, labels=None, num_items_in_batch=None):
        return dft_loss(logits, target_index, target_logprobs, labels,
                        num_items_in_batch=num_items_in_batch, **self.kwargs)


class FusedLinearDFTLoss(_Base):
    """:func:`dft_kernels.fused_linear_dft_loss` as a module: ``FusedLinearDFTLoss(**keywords)``
    holds the loss keywords (as :class:`DFTLoss`, plus ``accum_fp32``, ``strategy`` and
    ``memory_budget``: docs/design.md sec. 10).

    ``forward(hidden, weight, target_index=None, target_logprobs=None, labels=None, bias=None,
    num_items_in_batch=None, lora_A=None, lora_B=None, lora_scaling=1.0, lora_dropout=None)``

    Args:
        hidden (torch.Tensor):
            last hidden states of shape `[..., D]`.
        weight (torch.Tensor):
            lm_head weight of shape `[V, D]`.
        target_index, target_logprobs, labels, num_items_in_batch:
            as in :class:`DFTLoss`.
        bias (torch.Tensor):
            lm_head bias of shape `[V]`, or None.
        lora_A, lora_B, lora_scaling, lora_dropout:
            a low-rank correction of the lm_head, as in :func:`dft_kernels.fused_linear_dft_loss`
            (docs/design.md sec. 17).

    Returns:
        As :class:`DFTLoss`; the `[N, V]` logits are never materialised.
    """

    _extra = {"chunk_elems": None, "accum_fp32": True, **STRATEGY_DEFAULTS}

    def forward(self, hidden, weight, target_index=None, target_logprobs=None, labels=None, bias=None,
                num_items_in_batch=None, lora_A=None, lora_B=None, lora_scaling=1.0, lora_dropout=None):
        return fused_linear_dft_loss(hidden, weight, target_index, target_logprobs, labels, bias=bias,
                                     num_items_in_batch=num_items_in_batch, lora_A=lora_A, lora_B=lora_B,
                                     lora_scaling=lora_scaling, lora_dropout=lora_dropout, **self.kwargs)

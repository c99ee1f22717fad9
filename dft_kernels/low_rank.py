"""A low-rank (LoRA) correction of the lm_head inside the fused losses (docs/design.md sec. 17).

The logits become ``h @ W.T + b + s * (d(h) @ A.T) @ B.T`` with ``A`` [r, D], ``B``
[V, r], the scaling ``s`` and the adapter's dropout ``d`` -- PEFT's ``lora_A``,
``lora_B``, ``scaling`` and ``lora_dropout``. The rank-r activations
``u = s * d(h) @ A.T`` [N, r] are formed here with autograd (so gradients reach A and
h through u); the fused ops take ``(u, B)`` as a second segment of the contraction,
``[h | u] @ [W | B].T``, and return ``du`` and ``dB`` beside dH and dW. No [N, V]
tensor exists on any path.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class LowRankHead:
    """The checked adapter of one call: ``lora_A`` [r, D], ``lora_B`` [V, r], ``scaling``
    and ``dropout`` (a callable on h, or None)."""
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float
    dropout: Callable | None

    def activations(self, h: torch.Tensor) -> torch.Tensor:
        """``u = scaling * dropout(h) @ lora_A.T`` ([..., r], h's dtype, differentiable)."""
        x = h if self.dropout is None else self.dropout(h)
        u = torch.nn.functional.linear(x, self.lora_A)
        return u * self.scaling if self.scaling != 1.0 else u

    def segment(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(u [N, r], lora_B)`` for 2-D ``h``: what the ops take as ``lora=``."""
        return self.activations(h), self.lora_B

    def joined(self, h: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``([h | u], [W | B])``: one contraction whose logits equal the corrected head's
        (the reference's and the teacher's form; the fused losses never build it for W)."""
        return self.joined_hidden(h), self.joined_weight(w)

    def joined_hidden(self, h: torch.Tensor) -> torch.Tensor:
        """``[h | u]`` ([..., D + r])."""
        return torch.cat([h, self.activations(h)], -1)

    def joined_weight(self, w: torch.Tensor) -> torch.Tensor:
        """``[W | B]`` ([V, D + r])."""
        return torch.cat([w, self.lora_B], -1)

    def merged_weight(self, w: torch.Tensor) -> torch.Tensor:
        """``W + scaling * B @ A`` (the weight of the merged head)."""
        return w + self.scaling * (self.lora_B @ self.lora_A)


def check_low_rank(weight: torch.Tensor, lora_A, lora_B, lora_scaling, lora_dropout, *,
                   prefix: str = "") -> LowRankHead | None:
    """The adapter of a fused call, checked against ``weight`` [V, D]; None without one.

    Args:
        weight: the lm_head weight (this rank's rows with vocab_parallel).
        lora_A: [r, D] or None; lora_B: [V, r] or None (both or neither).
        lora_scaling: a finite number (PEFT's ``lora_alpha / r``).
        lora_dropout: a callable on the hidden states (e.g. PEFT's ``nn.Dropout``) or None.
        prefix: "teacher_" for a teacher's head (names in messages).
    """
    a, b = f"{prefix}lora_A", f"{prefix}lora_B"
    if lora_A is None and lora_B is None:
        return None
    if lora_A is None or lora_B is None:
        raise ValueError(f"{a} and {b} come together: pass both (A [r, D], B [V, r]) or neither")
    for name, t in ((a, lora_A), (b, lora_B)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != 2:
            raise TypeError(f"{name} must be a 2-D floating tensor, got {type(t).__name__} "
                            f"{tuple(getattr(t, 'shape', ()))}")
        if t.dtype != weight.dtype:
            raise TypeError(f"{name} ({t.dtype}) must have the lm_head weight's dtype ({weight.dtype}); "
                            f"cast it (e.g. {name}.to(weight.dtype))")
        if t.device != weight.device:
            raise ValueError(f"{name} is on {t.device} but the lm_head weight on {weight.device}: move it there")
    V, D = weight.shape
    r = lora_A.shape[0]
    if lora_A.shape[1] != D:
        raise ValueError(f"{a} has shape {tuple(lora_A.shape)}; the lm_head weight {tuple(weight.shape)} "
                         f"needs [r, {D}]")
    if tuple(lora_B.shape) != (V, r):
        raise ValueError(f"{b} has shape {tuple(lora_B.shape)}; with {a} of rank {r} and a vocab of {V} "
                         f"it must be [{V}, {r}]")
    if isinstance(lora_scaling, bool) or not isinstance(lora_scaling, (int, float)) \
            or not torch.isfinite(torch.tensor(float(lora_scaling))):
        raise ValueError(f"{prefix}lora_scaling={lora_scaling!r} must be a finite number (PEFT: lora_alpha / r)")
    if lora_dropout is not None and not callable(lora_dropout):
        raise TypeError(f"{prefix}lora_dropout must be a callable on the hidden states (e.g. torch.nn.Dropout) "
                        f"or None, got {type(lora_dropout).__name__}")
    return LowRankHead(lora_A, lora_B, float(lora_scaling), lora_dropout)


LORA_ARGS_DOC = """\
        lora_A (torch.Tensor), lora_B (torch.Tensor):
            a low-rank correction of the lm_head (PEFT's ``lora_A.weight`` `[r, D]` and
            ``lora_B.weight`` `[V, r]`): logits ``h @ W.T + b + lora_scaling * (lora_dropout(h)
            @ lora_A.T) @ lora_B.T``, never materialised (docs/design.md sec. 17). Gradients
            reach both when they require grad.
        lora_scaling (float):
            PEFT's ``scaling`` (``lora_alpha / r``).
        lora_dropout (callable):
            the adapter's dropout on the hidden states (PEFT's ``lora_dropout``), or None.
"""

"""Option names, defaults and checks shared by the losses, the reference and the
Hugging Face config (the one place each of them is written)."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
TAILS = ("bucket", "renorm", "raw")
ACCURACIES = ("ce", "dft")
REDUCTIONS = ("mean", "sum", "none")
IMPLS = ("auto", "triton", "torch", "reference")
STRATEGIES = ("auto", "lean", "fast")

#: Defaults of the fused path's strategy keywords (docs/design.md sec. 10): fast when its
#: extra memory (``memory.loss_extra_bytes``) fits ``memory_budget`` bytes, else lean.
STRATEGY_DEFAULTS = dict(strategy="auto", memory_budget=1 << 30)

#: Defaults of the loss keywords (signatures, modules and DFTConfig derive from here).
LOSS_DEFAULTS = dict(lam=0.2, divergence="forward_kl", beta=0.5, tail="bucket", accuracy="ce",
                     temperature=1.0, softcap=None, ignore_index=-100, reduction="mean", impl="auto",
                     validate=False, return_components=False)

#: The smallest loss temperature: logits / temperature must keep the softmax from being one-hot.
MIN_TEMPERATURE = 1e-2

#: float32's smallest normal number: the floor of both tails inside logarithms.
TINY = float(torch.finfo(torch.float32).tiny)
LOG_TINY = math.log(TINY)


class DFTLossOutput(NamedTuple):
    """What ``return_components=True`` returns; every field but ``loss`` is detached.

    ``divergence`` and ``accuracy`` are reduced like the loss (``loss = divergence +
    lam * accuracy``); ``n_tokens`` counts the positions that count;
    ``teacher_mass`` / ``student_mass`` are the mean P and Q over positions with
    at least one valid slot (NaN when there is none)."""

    loss: torch.Tensor
    divergence: torch.Tensor
    accuracy: torch.Tensor
    n_tokens: torch.Tensor
    teacher_mass: torch.Tensor
    student_mass: torch.Tensor


def check_options(*, lam, divergence, beta, tail, accuracy, temperature, softcap, reduction, impl):
    """Checks that cost nothing: option values. Raises ValueError naming the option."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence={divergence!r} is not one of {DIVERGENCES}")
    if tail not in TAILS:
        raise ValueError(f"tail={tail!r} is not one of {TAILS}")
    if accuracy not in ACCURACIES:
        raise ValueError(f"accuracy={accuracy!r} is not one of {ACCURACIES}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not one of {REDUCTIONS}")
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {IMPLS}")
    if not isinstance(beta, (int, float)) or not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"beta={beta!r} must be a number in [0, 1] (0 = forward KL, 1 = reverse KL)")
    if not isinstance(temperature, (int, float)) or not float(temperature) > 0.0 or math.isinf(temperature):
        raise ValueError(f"temperature={temperature!r} must be a finite number > 0")
    if float(temperature) < MIN_TEMPERATURE:
        raise ValueError(f"temperature={temperature!r} must be >= {MIN_TEMPERATURE}: below it the scaled logits "
                         "make the student's softmax one-hot in float32 and the divergence term vanishes "
                         "(silently trains on the accuracy term only)")
    if not isinstance(lam, (int, float)) or not float(lam) >= 0.0 or math.isinf(lam):
        raise ValueError(f"lam={lam!r} must be a finite number >= 0 (0 turns the accuracy term off)")
    if softcap is not None and (not isinstance(softcap, (int, float)) or not float(softcap) > 0.0):
        raise ValueError(f"softcap={softcap!r} must be None or a number > 0")
    kind = effective_divergence(divergence, beta)
    if tail == "raw" and kind != "forward_kl":
        raise ValueError(f"tail='raw' is defined for forward KL only, not divergence={divergence!r} "
                         f"(beta={beta}); use tail='bucket'")
    if tail == "renorm" and kind == "reverse_kl":
        raise ValueError("reverse KL is undefined with tail='renorm' (the teacher's tail mass is 0 "
                         "where the student's is not); use tail='bucket'")


def check_strategy(strategy, memory_budget) -> None:
    """The fused path's strategy keywords (docs/design.md sec. 10). Raises ValueError / TypeError."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} is not one of {STRATEGIES}")
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, float)):
        raise TypeError(f"memory_budget={memory_budget!r} must be a number of bytes (e.g. 1 << 30 for 1 GiB)")
    if not memory_budget >= 0:
        raise ValueError(f"memory_budget={memory_budget!r} must be >= 0 bytes (0 always picks lean)")


def effective_divergence(divergence: str, beta: float) -> str:
    """JSD at beta = 0 / 1 is forward / reverse KL (TRL's GKD special cases)."""
    if divergence == "jsd" and float(beta) == 0.0:
        return "forward_kl"
    if divergence == "jsd" and float(beta) == 1.0:
        return "reverse_kl"
    return divergence


def needs_student_tail(divergence: str, beta: float, tail: str) -> bool:
    """Whether the divergence reads the student's tail bucket q_tail."""
    kind = effective_divergence(divergence, beta)
    return tail == "bucket" or (tail == "renorm" and kind == "jsd")

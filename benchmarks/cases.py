"""Shapes, cases, their inputs and their work floors.

A *case* is one measurement: a path ("logits": inputs are logits [N, V]; "fused":
inputs are hidden [N, D] and the lm_head weight [V, D]), a head shape (D, V), N
positions, K teacher slots, a dtype, a device and a method. Every method computes
a scalar loss and its gradients w.r.t. the inputs that require grad (the logits,
or hidden and weight).

The loss measured everywhere: forward KL on the K+1 buckets (tail="bucket") plus
``lam`` * CE, mean over positions whose label is not ignored; ``lam`` = 0.2 when
K > 0, and K = 0 means pure cross-entropy (``lam`` = 1), which is what the CE
peers compute.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass

import torch

IGNORE_INDEX = -100
#: fraction of positions whose label is ``IGNORE_INDEX``
IGNORE_FRACTION = 0.03
LAM_DISTILL = 0.2

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# name -> (D, V)
HEADS = {
    # lm_heads of real models (GPU preset)
    "llama3-8b": (4096, 128256),
    "qwen2.5-7b": (3584, 152064),
    "gemma2-2b": (2304, 256000),
    # CPU shapes
    "d256-v8k": (256, 8000),
    "d512-v32k": (512, 32000),
    "d64-v1k": (64, 1000),
    "d1024-v32064": (1024, 32064),   # ~1/4 of a Llama-3 head, fused-path memory check
    "v32000": (0, 32000),            # logits path only (D is not used there)
}


PATHS = ("logits", "fused")


@dataclass
class Case:
    path: str
    head: str
    D: int
    V: int
    N: int
    K: int
    dtype: str
    device: str
    method: str            # base name, e.g. "ours-fused"
    impl: str | None = None  # "auto" / "torch" / "triton" for ours-*, None otherwise
    seed: int = 0
    repeats: int = 5
    warmup: int = 1
    time_budget_s: float = 30.0

    @property
    def label(self) -> str:
        return self.method + (f":{self.impl}" if self.impl and self.impl != "auto" else "")

    @property
    def lam(self) -> float:
        return LAM_DISTILL if self.K > 0 else 1.0

    def to_dict(self) -> dict:
        return asdict(self)



# --------------------------------------------------------------------------- inputs


def make_inputs(case: Case) -> dict:
    """Deterministic random inputs for a case (the same for every method of a shape).

    Teacher ids are distinct per row (a random start plus a cumulative sum of
    positive steps whose total stays below V, modulo V); teacher log-probs are a
    random softmax scaled to a top-K mass in [0.6, 0.99], sorted descending.
    Nothing of size [N, V] is allocated besides the logits themselves.
    """
    dev = torch.device(case.device)
    dt = DTYPES[case.dtype]
    g = torch.Generator(device=dev)
    # a stable seed (str hashes are salted per process; every method must see the same data)
    g.manual_seed(zlib.crc32(repr((case.seed, case.path, case.head, case.N, case.K)).encode()))
    N, D, V, K = case.N, case.D, case.V, case.K
    out = {}
    if case.path == "logits":
        x = torch.randn(N, V, generator=g, device=dev, dtype=torch.float32).mul_(2.0)
        out["logits"] = x.to(dt).requires_grad_(True)
        del x
    else:
        out["hidden"] = torch.randn(N, D, generator=g, device=dev, dtype=torch.float32).to(dt).requires_grad_(True)
        w = torch.randn(V, D, generator=g, device=dev, dtype=torch.float32).mul_(2.0 / math.sqrt(D))
        out["weight"] = w.to(dt).requires_grad_(True)
        del w
        if case.method in ("liger-jsd", "trl-distill"):
            out["teacher_hidden"] = torch.randn(N, D, generator=g, device=dev, dtype=torch.float32).to(dt)
            tw = torch.randn(V, D, generator=g, device=dev, dtype=torch.float32).mul_(2.0 / math.sqrt(D))
            out["teacher_weight"] = tw.to(dt)
            del tw
    if K > 0:
        if K > V:
            raise ValueError(f"K = {K} > V = {V}")
        start = torch.randint(0, V, (N, 1), generator=g, device=dev)
        hi = max(2, V // K)
        steps = torch.randint(1, hi, (N, K), generator=g, device=dev)
        steps[:, 0] = 0
        out["target_index"] = (start + steps.cumsum(1)) % V
        raw = torch.randn(N, K, generator=g, device=dev) * 2.0
        mass = 0.6 + 0.39 * torch.rand(N, 1, generator=g, device=dev)
        lp = torch.log_softmax(raw, dim=-1) + mass.log()
        out["target_logprobs"] = lp.sort(dim=-1, descending=True).values
    else:
        out["target_index"] = out["target_logprobs"] = None
    labels = torch.randint(0, V, (N,), generator=g, device=dev)
    drop = torch.rand(N, generator=g, device=dev) < IGNORE_FRACTION
    out["labels"] = labels.masked_fill(drop, IGNORE_INDEX)
    return out


def input_bytes(inputs: dict) -> int:
    return sum(t.numel() * t.element_size() for t in inputs.values() if isinstance(t, torch.Tensor))


# --------------------------------------------------------------------------- floors


def floors(case: Case) -> dict:
    """The work no implementation can avoid: matmul FLOPs and bytes moved (fwd+bwd).

    Fused path: forward 2NDV (logits), backward 6NDV (recompute 2NDV + dH 2NDV +
    dW 2NDV): 8NDV. Bytes: inputs read once (hidden, weight, targets, labels) and
    the gradients written once. Logits path: no matmul; bytes = logits read +
    dlogits written + targets + labels.
    """
    s = torch.tensor([], dtype=DTYPES[case.dtype]).element_size()
    N, D, V, K = case.N, case.D, case.V, case.K
    small = N * K * (8 + 4) + N * 8
    if case.path == "fused":
        return {"flops_fwd": 2 * N * D * V, "flops_bwd": 6 * N * D * V, "flops": 8 * N * D * V,
                "bytes": 2 * (N * D + V * D) * s + small}
    return {"flops_fwd": 0, "flops_bwd": 0, "flops": 0, "bytes": 2 * N * V * s + small}

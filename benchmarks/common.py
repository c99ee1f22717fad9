"""Shapes, presets, inputs and the methods being compared.

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

import importlib
import importlib.metadata
import math
import zlib
from dataclasses import asdict, dataclass, field

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

LOGITS_METHODS = ("reference", "ours-logits")
FUSED_METHODS = ("reference", "ours-fused", "torch-lce", "liger-flce", "liger-jsd", "cce", "compile-chunked")
ALL_METHODS = tuple(dict.fromkeys(LOGITS_METHODS + FUSED_METHODS))

#: what each method is, for the reports
METHOD_NOTES = {
    "reference": "naive PyTorch (dft_kernels.reference): [N, V] logits and log-softmax materialised; "
                 "fused path: logits = hidden @ weight.T first",
    "ours-logits": "dft_kernels.dft_loss on the given logits",
    "ours-fused": "dft_kernels.fused_linear_dft_loss on hidden + weight",
    "torch-lce": "torch.nn.functional.linear_cross_entropy with LinearCrossEntropyOptions() (chunked), K = 0 only",
    "liger-flce": "Liger-Kernel LigerFusedLinearCrossEntropyLoss, K = 0 only",
    "liger-jsd": "Liger-Kernel LigerFusedLinearJSD (beta 0.5) against a DENSE teacher (teacher hidden [N, D] + "
                 "teacher weight [V, D], i.e. full teacher logits, not top-K): K > 0 rows; its loss is a "
                 "different quantity, so only time and memory compare; its time includes the teacher's "
                 "2*N*D*V forward matmul",
    "cce": "Cut Cross-Entropy cut_cross_entropy.linear_cross_entropy, K = 0 only",
    "compile-chunked": "torch.compile of a small chunked PyTorch DFT loss (benchmarks/chunked.py), chunks "
                       "recomputed in backward by torch.utils.checkpoint",
}

PATHS = ("logits", "fused")


@dataclass
class Preset:
    device: str
    heads: list
    n: list
    k: list
    dtype: str
    paths: list = field(default_factory=lambda: list(PATHS))
    methods: list = field(default_factory=lambda: list(ALL_METHODS))
    repeats: int = 5
    warmup: int = 1
    rounds: int = 1         # timing processes per case, interleaved across the methods of a shape
    check: str | None = None
    doc: str = ""


PRESETS = {
    "gpu": Preset("cuda", ["llama3-8b", "qwen2.5-7b", "gemma2-2b"], [1024, 2048, 4096, 8192, 16384],
                  [0, 8, 32, 128], "bf16", repeats=20, warmup=3,
                  doc="lm_heads of Llama-3-8B, Qwen2.5-7B, Gemma-2-2B, bf16"),
    "cpu": Preset("cpu", ["d256-v8k", "d512-v32k"], [256, 512, 1024, 2048], [0, 32], "fp32", repeats=5,
                  doc="small fp32 heads for CPU"),
    "cpu-small": Preset("cpu", ["d64-v1k"], [64, 128], [0, 8], "fp32", repeats=3,
                        doc="tiny fp32 shapes for CI (seconds)"),
    "check-logits": Preset("cpu", ["v32000"], [4096], [32], "fp32", paths=["logits"],
                           methods=["reference", "ours-logits:torch"], repeats=5, rounds=3, check="logits",
                           doc="logits path target: dft_loss(impl='torch') needs <= 1/8 of the reference's "
                               "peak extra memory (beyond the logits and their gradient) and runs <= 1.1x "
                               "the reference's time (forward + backward)"),
    "check-fused": Preset("cpu", ["d1024-v32064"], [2048], [32], "fp32", paths=["fused"],
                          methods=["reference", "ours-fused:torch"], repeats=3, rounds=3, check="fused",
                          doc="fused path target: peak memory beyond inputs and gradients < 1/16 of the "
                              "reference's"),
}


# --------------------------------------------------------------------------- cases


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


def parse_method(spec: str) -> tuple[str, str | None]:
    """"ours-fused:torch" -> ("ours-fused", "torch"); the suffix is for ours-* only."""
    base, _, impl = spec.partition(":")
    if base not in ALL_METHODS:
        raise ValueError(f"unknown method {base!r}; choose from {', '.join(ALL_METHODS)}")
    if impl and not base.startswith("ours-"):
        raise ValueError(f"method {spec!r}: an ':impl' suffix is only for ours-logits / ours-fused")
    if impl and impl not in ("auto", "torch", "triton"):
        raise ValueError(f"method {spec!r}: impl must be auto, torch or triton")
    if base.startswith("ours-"):
        impl = impl or "auto"
    return base, (impl or None)


def applies(method: str, path: str, K: int) -> bool:
    """Whether a method is part of the comparison at this path and K."""
    if path == "logits":
        return method in LOGITS_METHODS
    if method not in FUSED_METHODS:
        return False
    if method in ("torch-lce", "liger-flce", "cce"):
        return K == 0
    if method == "liger-jsd":
        return K > 0
    return True


# --------------------------------------------------------------------------- peers


PEER_MODULES = {
    # method -> (distribution name for the version, module to import)
    "liger-flce": ("liger-kernel", "liger_kernel.transformers"),
    "liger-jsd": ("liger-kernel", "liger_kernel.transformers"),
    "cce": ("cut-cross-entropy", "cut_cross_entropy"),
}


def _import_status(module: str, dist: str) -> str:
    try:
        importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 -- any import failure means "missing"
        return f"missing: {type(e).__name__}: {e}"
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "installed (version unknown)"


def torch_lce_status() -> str:
    F = torch.nn.functional
    if not hasattr(F, "linear_cross_entropy"):
        return f"missing: torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy"
    if not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        return f"torch {torch.__version__} (no LinearCrossEntropyOptions: unchunked reference path)"
    return f"torch {torch.__version__} (chunked, LinearCrossEntropyOptions())"


def peer_versions() -> dict:
    """Version string of every peer, or "missing: <reason>"."""
    out = {}
    for dist, mod in {v for v in PEER_MODULES.values()}:
        out[dist] = _import_status(mod, dist)
    out["torch.nn.functional.linear_cross_entropy"] = torch_lce_status()
    out["torch.compile"] = (f"torch {torch.__version__}" if hasattr(torch, "compile")
                            else f"missing: torch {torch.__version__} has no torch.compile")
    return dict(sorted(out.items()))


def method_status(method: str, versions: dict) -> str | None:
    """None if the method can be tried, else "missing: ..." (a peer that is not installed)."""
    if method in PEER_MODULES:
        s = versions.get(PEER_MODULES[method][0], "")
        return s if s.startswith("missing") else None
    if method == "torch-lce":
        s = versions.get("torch.nn.functional.linear_cross_entropy", "")
        return s if s.startswith("missing") else None
    if method == "compile-chunked":
        s = versions.get("torch.compile", "")
        return s if s.startswith("missing") else None
    return None


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
        if case.method == "liger-jsd":
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


# --------------------------------------------------------------------------- methods


def build(case: Case, inputs: dict):
    """Returns ``(loss_fn, grad_tensors, resolved_impl, note)``; ``loss_fn()`` -> scalar loss."""
    import dft_kernels as dk
    from dft_kernels.losses import resolve_impl

    idx, lp, labels = inputs["target_index"], inputs["target_logprobs"], inputs["labels"]
    lam = case.lam
    m = case.method
    if case.path == "logits":
        x = inputs["logits"]
        if m == "reference":
            return (lambda: dk.reference.dft_loss(x, idx, lp, labels, lam=lam)), [x], "reference", ""
        if m == "ours-logits":
            impl = case.impl or "auto"
            return ((lambda: dk.dft_loss(x, idx, lp, labels, lam=lam, impl=impl)), [x],
                    resolve_impl(impl, x.device), "")
        raise ValueError(f"method {m} is not on the logits path")

    h, w = inputs["hidden"], inputs["weight"]
    grads = [h, w]
    if m == "reference":
        return ((lambda: dk.fused_linear_dft_loss(h, w, idx, lp, labels, lam=lam, impl="reference")), grads,
                "reference", "")
    if m == "ours-fused":
        impl = case.impl or "auto"
        return ((lambda: dk.fused_linear_dft_loss(h, w, idx, lp, labels, lam=lam, impl=impl)), grads,
                resolve_impl(impl, h.device), "")
    if m == "torch-lce":
        F = torch.nn.functional
        opts_cls = getattr(torch.nn, "LinearCrossEntropyOptions", None)
        opts = opts_cls() if opts_cls is not None else None
        note = "chunked (LinearCrossEntropyOptions())" if opts is not None else "options=None (unchunked)"
        return ((lambda: F.linear_cross_entropy(h, w, labels, ignore_index=IGNORE_INDEX, options=opts)), grads,
                None, note)
    if m == "liger-flce":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        mod = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="mean")
        return (lambda: mod(w, h, labels)), grads, None, ""
    if m == "liger-jsd":
        from liger_kernel.transformers import LigerFusedLinearJSD
        try:
            mod = LigerFusedLinearJSD(jsd_beta=0.5, ignore_index=IGNORE_INDEX, temperature=1.0)
        except TypeError:  # older releases: no ignore_index
            mod = LigerFusedLinearJSD(jsd_beta=0.5, temperature=1.0)
        th, tw = inputs["teacher_hidden"], inputs["teacher_weight"]

        def f():
            try:
                return mod(h, w, th, tw, labels)
            except TypeError:
                return mod(h, w, th, tw)
        return f, grads, None, "dense teacher: loss not comparable"
    if m == "cce":
        from cut_cross_entropy import linear_cross_entropy
        return ((lambda: linear_cross_entropy(h, w, labels, ignore_index=IGNORE_INDEX, reduction="mean")), grads,
                None, "")
    if m == "compile-chunked":
        from .chunked import CompiledChunkedDFT
        fn = CompiledChunkedDFT(lam=lam, V=case.V)
        return (lambda: fn(h, w, idx, lp, labels)), grads, None, f"chunk rows {fn.rows}"
    raise ValueError(f"unknown method {m}")


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


def dft_kernels_version() -> str:
    try:
        import dft_kernels
        return getattr(dft_kernels, "__version__", "unknown")
    except Exception as e:  # noqa: BLE001
        return f"missing: {type(e).__name__}: {e}"

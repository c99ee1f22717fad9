"""The methods being compared: names, what each is, which peers they need, and
``build``, which turns a case and its inputs into a loss function."""
from __future__ import annotations

import importlib
import importlib.metadata

import torch

from .cases import IGNORE_INDEX, Case

LOGITS_METHODS = ("reference", "ours-logits")
FUSED_METHODS = ("reference", "ours-fused", "ours-fused-fast", "torch-lce", "liger-flce", "liger-jsd", "cce",
                 "trl-chunked", "trl-distill", "compile-chunked")
#: methods whose loss is a different quantity (a dense teacher): only time and memory compare
DENSE_TEACHER_METHODS = ("liger-jsd", "trl-distill")
ALL_METHODS = tuple(dict.fromkeys(LOGITS_METHODS + FUSED_METHODS))

#: what each method is, for the reports
METHOD_NOTES = {
    "reference": "naive PyTorch (dft_kernels.reference): [N, V] logits and log-softmax materialised; "
                 "fused path: logits = hidden @ weight.T first",
    "ours-logits": "dft_kernels.dft_loss on the given logits",
    "ours-fused": "dft_kernels.fused_linear_dft_loss on hidden + weight, strategy='lean' (logits recomputed in "
                  "backward)",
    "ours-fused-fast": "dft_kernels.fused_linear_dft_loss, strategy='fast' (each row chunk's logits once, "
                       "gradients formed in the forward; more memory, less matmul work)",
    "torch-lce": "torch.nn.functional.linear_cross_entropy with LinearCrossEntropyOptions() (chunked), K = 0 only",
    "liger-flce": "Liger-Kernel LigerFusedLinearCrossEntropyLoss, K = 0 only",
    "liger-jsd": "Liger-Kernel LigerFusedLinearJSD (beta 0.5) against a DENSE teacher (teacher hidden [N, D] + "
                 "teacher weight [V, D], i.e. full teacher logits, not top-K): K > 0 rows; its loss is a "
                 "different quantity, so only time and memory compare; its time includes the teacher's "
                 "2*N*D*V forward matmul",
    "cce": "Cut Cross-Entropy cut_cross_entropy.linear_cross_entropy, K = 0 only",
    "trl-chunked": "TRL trl.kernels.ChunkedLogProbFunction (chunk 32768), token log-probs -> masked mean NLL, "
                   "K = 0 only",
    "trl-distill": "TRL _chunked_divergence_loss (trl/trainer/distillation_trainer.py, forward KL, beta 0) "
                   "against a DENSE teacher (teacher hidden + weight): K > 0 rows; a different loss, so only "
                   "time and memory compare; its time includes the teacher's projection",
    "compile-chunked": "torch.compile of a small chunked PyTorch DFT loss (benchmarks/chunked.py), chunks "
                       "recomputed in backward by torch.utils.checkpoint",
}


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
    if method in ("torch-lce", "liger-flce", "cce", "trl-chunked"):
        return K == 0
    if method in DENSE_TEACHER_METHODS:
        return K > 0
    return True


# --------------------------------------------------------------------------- peers


PEER_MODULES = {
    # method -> (distribution name for the version, module to import)
    "liger-flce": ("liger-kernel", "liger_kernel.transformers"),
    "liger-jsd": ("liger-kernel", "liger_kernel.transformers"),
    "cce": ("cut-cross-entropy", "cut_cross_entropy"),
}
#: peers that also run on the CPU (plain PyTorch off CUDA)
CPU_PEER_MODULES = {
    "trl-chunked": ("trl", "trl.kernels"),
    "trl-distill": ("trl", "trl.trainer.distillation_trainer"),
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
    for dist, mod in {v for v in (*PEER_MODULES.values(), *CPU_PEER_MODULES.values())}:
        out[dist] = _import_status(mod, dist)
    out["torch.nn.functional.linear_cross_entropy"] = torch_lce_status()
    out["torch.compile"] = (f"torch {torch.__version__}" if hasattr(torch, "compile")
                            else f"missing: torch {torch.__version__} has no torch.compile")
    return dict(sorted(out.items()))


#: the version key of ``peer_versions()`` that each method needs
NEEDS = {**{m: dist for m, (dist, _) in (*PEER_MODULES.items(), *CPU_PEER_MODULES.items())},
         "torch-lce": "torch.nn.functional.linear_cross_entropy", "compile-chunked": "torch.compile"}


def method_status(method: str, versions: dict, device: str = "cuda") -> str | None:
    """None if the method can be tried, else why not: "missing: ..." (a peer that is not
    installed) or "skipped: ..." (a peer whose kernels run on CUDA only, on another device)."""
    s = versions.get(NEEDS.get(method), "")
    if s.startswith("missing"):
        return s
    if method in PEER_MODULES and not device.startswith("cuda"):
        return f"skipped: {PEER_MODULES[method][0]} runs Triton GPU kernels only (device {device})"
    return None


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
    if m in ("ours-fused", "ours-fused-fast"):
        impl = case.impl or "auto"
        strategy = "fast" if m == "ours-fused-fast" else "lean"
        return ((lambda: dk.fused_linear_dft_loss(h, w, idx, lp, labels, lam=lam, impl=impl, strategy=strategy)),
                grads, resolve_impl(impl, h.device), "")
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
    if m == "trl-chunked":
        from trl.kernels import ChunkedLogProbFunction
        mask = labels != IGNORE_INDEX

        def trl_nll():   # as TRL's trainer calls it: every position scored, then masked
            out = ChunkedLogProbFunction.apply(h, w, None, labels.clamp(min=0), 1.0, 32768, None, 1.0, ())
            tok = out[0] if isinstance(out, tuple) else out
            return -(tok * mask).sum() / mask.sum().clamp(min=1)
        return trl_nll, grads, None, "chunk 32768"
    if m == "trl-distill":
        from trl.trainer.distillation_trainer import _chunked_divergence_loss
        th, tw = inputs["teacher_hidden"], inputs["teacher_weight"]
        mask = (labels != IGNORE_INDEX).to(h.dtype)[None]
        return ((lambda: _chunked_divergence_loss(h[None], th[None], w, tw, mask, 0.0)[0]), grads, None,
                "dense teacher: loss not comparable")
    if m == "compile-chunked":
        from .chunked import CompiledChunkedDFT
        fn = CompiledChunkedDFT(lam=lam, V=case.V)
        return (lambda: fn(h, w, idx, lp, labels)), grads, None, f"chunk rows {fn.rows}"
    raise ValueError(f"unknown method {m}")

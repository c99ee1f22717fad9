"""Presets of the sweep (``--shapes``): which heads, N, K, dtype, paths and methods."""
from __future__ import annotations

from dataclasses import dataclass, field

from .cases import PATHS
from .methods import ALL_METHODS


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

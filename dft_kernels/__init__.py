"""dft_kernels: fused Triton kernels for Distribution Fine-Tuning losses."""
from . import reference
from .distill import fused_linear_distill_loss, teacher_topk
from .losses import dft_loss, fused_linear_dft_loss
from .modules import DFTLoss, FusedLinearDFTLoss
from .options import DFTLossOutput
from .targets import SparseTargets, blend

__version__ = "0.1.0"


def __getattr__(name):
    # heavier submodules load on first use: dk.hf (transformers), dk.distributed
    if name in ("hf", "distributed", "targets", "data", "cli"):
        import importlib
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'dft_kernels' has no attribute {name!r}")


__all__ = ["dft_loss", "fused_linear_dft_loss", "DFTLoss", "FusedLinearDFTLoss", "SparseTargets", "blend",
           "DFTLossOutput", "reference", "__version__", "teacher_topk", "fused_linear_distill_loss"]

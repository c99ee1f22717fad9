"""dft_kernels: fused Triton kernels for Distribution Fine-Tuning losses."""
from . import reference
from .losses import DFTLossOutput, dft_loss, fused_linear_dft_loss
from .modules import DFTLoss, FusedLinearDFTLoss
from .targets import SparseTargets, blend

__version__ = "0.1.0"

__all__ = ["dft_loss", "fused_linear_dft_loss", "DFTLoss", "FusedLinearDFTLoss", "SparseTargets", "blend", "blend",
           "DFTLossOutput", "reference", "__version__"]

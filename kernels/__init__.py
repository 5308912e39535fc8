"""specialize.kernels: Triton kernels for the distillation loss (sparse top-k KL + CE)."""
from .fused_linear_sparse_kl_ce import FusedLinearSparseKLCELoss, fused_linear_sparse_kl_ce
from .sparse_kl_ce import SparseKLCELoss, sparse_kl_ce

__all__ = ["sparse_kl_ce", "fused_linear_sparse_kl_ce", "SparseKLCELoss", "FusedLinearSparseKLCELoss"]

"""specialize.kernels: Triton kernels for the distillation loss (sparse top-k KL + CE)."""
from .sparse_kl_ce import SparseKLCELoss, sparse_kl_ce

__all__ = ["sparse_kl_ce", "SparseKLCELoss"]

"""specialize.kernels: Triton kernels for the distillation loss (sparse top-k KL + CE)."""
from .fused_linear_sparse_kl_ce import FusedLinearSparseKLCELoss, fused_linear_sparse_kl_ce
from .sparse_kl_ce import SparseKLCELoss, sparse_kl_ce
from .utils import check_teacher_inputs, default_chunk_rows

__all__ = ["sparse_kl_ce", "fused_linear_sparse_kl_ce", "SparseKLCELoss", "FusedLinearSparseKLCELoss",
           # what the engine checks and sizes with: the ids the kernels accept, the rows of a fused chunk
           "check_teacher_inputs", "default_chunk_rows"]

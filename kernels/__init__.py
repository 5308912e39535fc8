"""specialize.kernels: Triton kernels for the distillation loss."""

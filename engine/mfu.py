"""Model FLOPs utilisation: the one place that defines the FLOP count and the peaks it is divided by.

    MFU = model FLOPs per second per GPU / the GPU's dense bf16 peak

Model FLOPs of one step (matmuls of forward + backward = 3 x forward = 6 FLOPs per parameter per token;
attention scores and the embedding lookup are left out):

    6 * ((P_encoder + P_cross_kv) * source_tokens + (P_decoder - P_cross_kv + P_lm_head) * target_tokens)

P_cross_kv are the decoder's cross-attention K and V projections: they act on the encoder output, once
per *source* token, not per target token. P_lm_head counts once per target token even when it is tied
to the embedding. Tokens are the unpadded ones (attention-mask ones, labels != -100): padding is waste,
not work.

The peak is looked up by the exact name CUDA reports (`torch.cuda.get_device_name()`), dense bf16
tensor-core figures from the vendors' datasheets; an unknown name gives no MFU unless
SPECIALIZE_PEAK_TFLOPS is set (a substring match would read an L40S as an L4, or an H100 PCIe as an SXM).
"""
from __future__ import annotations

import os
from typing import Optional

# Dense (no sparsity) bf16 tensor TFLOP/s by the full device name CUDA reports.
PEAK_BF16_TFLOPS: dict[str, float] = {
    "NVIDIA H100 80GB HBM3": 989.4,      # SXM5
    "NVIDIA H100 PCIe": 756.5,
    "NVIDIA H100 NVL": 835.5,
    "NVIDIA H200": 989.4,                # SXM
    "NVIDIA H200 NVL": 835.5,
    "NVIDIA GH200 480GB": 989.4,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0,
    "NVIDIA L40S": 362.1,
    "NVIDIA L4": 121.0,
    # No NVIDIA datasheet exists for AWS's A10G; 70 is the commonly quoted dense figure (half the A10's
    # rate with fp32 accumulation). Set SPECIALIZE_PEAK_TFLOPS where a measured ceiling is known.
    "NVIDIA A10G": 70.0,
    # V100 and T4 have no bf16 tensor cores: deliberately absent (no MFU).
}


def peak_tflops(device_name: Optional[str] = None) -> Optional[float]:
    """SPECIALIZE_PEAK_TFLOPS if set, else the table's figure for `device_name` (default: this process's
    CUDA device), else None (CPU, or a GPU not in the table)."""
    if os.environ.get("SPECIALIZE_PEAK_TFLOPS"):
        return float(os.environ["SPECIALIZE_PEAK_TFLOPS"])
    if device_name is None:
        import torch
        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    return PEAK_BF16_TFLOPS.get(device_name.strip())


def model_flops(counts: dict, source_tokens: float, target_tokens: float) -> float:
    """Matmul FLOPs of forward + backward for these token counts; `counts` from models.param_counts."""
    cross_kv = counts.get("cross_kv", 0)
    return 6.0 * ((counts["encoder"] + cross_kv) * source_tokens
                  + (counts["decoder"] - cross_kv + counts["lm_head"]) * target_tokens)


def mfu(counts: dict, source_tokens: float, target_tokens: float, seconds: float, gpus: int,
        peak: Optional[float]) -> Optional[float]:
    if not peak or seconds <= 0:
        return None
    return model_flops(counts, source_tokens, target_tokens) / seconds / gpus / (peak * 1e12)

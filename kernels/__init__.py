"""Triton kernels of lorafuse (installed as lorafuse.kernels).

shrink / shrink_backward: x -> S' = ((x a_cat^T) [a_map^T b_map^T]) * scale, and its backward.
lora_gemm: out = a @ b + s @ c + bias, the expand run as extra K-steps of the base GEMM.
lora_gemm_fused: the whole layer in one launch (few tokens).
lora_gemm_persistent: the whole layer in one persistent launch, the shrink as its first phase (Hopper, many
  tokens; opt-in).
"""
from .lora_gemm import lora_gemm, lora_gemm_fused, lora_gemm_persistent
from .shrink import shrink, shrink_backward
from .utils import can_run, is_interpreting

__all__ = ["shrink", "shrink_backward", "lora_gemm", "lora_gemm_fused", "lora_gemm_persistent", "can_run",
           "is_interpreting"]

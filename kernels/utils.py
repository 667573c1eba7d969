"""Shared helpers for the launch functions: input checks, block sizes, the interpreter switch."""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl


# Opt-in autotuning (LORAFUSE_AUTOTUNE=1): every new shape then benchmarks the candidate configs
# once. By default each launch takes a config from a small table measured on an H100, so nothing
# is compiled beyond what runs.
AUTOTUNE = os.environ.get("LORAFUSE_AUTOTUNE", "0") == "1"


def launch_kwargs(cfg: triton.Config) -> dict:
    """A triton.Config as keyword arguments of a direct kernel launch."""
    return dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def is_interpreting() -> bool:
    """True when Triton runs kernels on the CPU (TRITON_INTERPRET=1, read when kernels were defined)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def can_run(t: torch.Tensor) -> bool:
    """Whether the Triton kernels can take this tensor: CUDA always, CPU only under the interpreter."""
    return t.is_cuda or (t.device.type == "cpu" and is_interpreting())


TORCH_TO_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def block_for(n: int, minimum: int = 16) -> int:
    """Smallest power of two >= n and >= minimum (tl.dot needs every dimension >= 16)."""
    return max(minimum, triton.next_power_of_2(max(int(n), 1)))


def dot_precision(dtype: torch.dtype) -> str:
    """Precision of tl.dot on float32 operands, following torch's own matmul setting."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def check_tensor(
    name: str,
    t: torch.Tensor,
    shape: tuple,
    device: Optional[torch.device] = None,
    dtype: Optional[torch.dtype] = None,
) -> None:
    """Raise a ValueError naming `name` when t does not have `shape` (None = any), device or dtype."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device} (like x), got {t.device}")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{name} must have dtype {dtype}, got {t.dtype}")


def check_runnable(name: str, t: torch.Tensor) -> None:
    if not can_run(t):
        raise ValueError(
            f"{name} is on {t.device}: the Triton kernels need CUDA tensors "
            "(or CPU tensors with TRITON_INTERPRET=1 set before triton is imported)"
        )
    if t.dtype not in TORCH_TO_TL:
        raise ValueError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")


# Tests set this so that every buffer a launch function allocates starts as NaN: an element a
# kernel fails to write then shows up instead of passing as leftover memory (often zeros).
POISON_OUTPUTS = False


def new_empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=device)
    if POISON_OUTPUTS and t.numel():
        t.fill_(float("nan"))
    return t


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    # Cached: the property query costs tens of microseconds per launch on the host.
    return torch.cuda.get_device_properties(index).multi_processor_count

"""Shared helpers for the launch functions: input checks, block sizes, the interpreter switch."""
from __future__ import annotations

import functools
import inspect
import os
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction


# Opt-in autotuning (LORAFUSE_AUTOTUNE=1): every new shape then benchmarks the candidate configs
# once. By default each launch takes a config from a small table measured on an H100, so nothing
# is compiled beyond what runs.
AUTOTUNE = os.environ.get("LORAFUSE_AUTOTUNE", "0") == "1"


def launch_kwargs(cfg: triton.Config) -> dict:
    """A triton.Config as keyword arguments of a direct kernel launch."""
    return dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


# Triton picks the interpreter when a kernel is decorated, i.e. when lorafuse is imported: read the
# variable once then, so that setting it later gives the plain-torch path on the CPU, not CPU tensors
# sent to compiled kernels (a "0 active drivers" crash).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def is_interpreting() -> bool:
    """True when Triton runs kernels on the CPU (TRITON_INTERPRET=1 when lorafuse was imported)."""
    return INTERPRET


def can_run(t: torch.Tensor) -> bool:
    """Whether the Triton kernels can take this tensor: CUDA always; CPU only under the interpreter,
    and not in bfloat16 there (the interpreter's tl.dot on bfloat16 operands gives wrong results,
    triton issue 11584)."""
    return t.is_cuda or (t.device.type == "cpu" and is_interpreting() and t.dtype != torch.bfloat16)


TORCH_TO_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for launch arithmetic on the host. (triton.cdiv is a constexpr function whose
    host-side call costs microseconds: a visible share of a small layer's launch.)"""
    return -(-a // b)


def split_range(n: int, splits: int, block: int) -> Tuple[int, int]:
    """(length, count) of at most `splits` ranges covering n, each length a multiple of `block` (the
    split-K grids of the shrinks). n = 0 gives one empty range, whose programs write zeros, not a
    division by zero."""
    per = max(block, cdiv(cdiv(n, splits), block) * block)
    return per, max(1, cdiv(n, per))


def onchip_rank_limit(dtype: torch.dtype) -> int:
    """The most rank columns a kernel that keeps a (rows x R) tile on chip takes: lora_gemm_fused
    ran out of shared memory on an H200 above R = 512 in 16-bit and at R = 384 in float32, the
    grouped segmented shrink from r_max = 384 in float16."""
    return 256 if dtype in (torch.float16, torch.bfloat16) else 128


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (n >= 1), on the host (see cdiv)."""
    return 1 << (int(n) - 1).bit_length() if n > 1 else 1


def block_for(n: int, minimum: int = 16) -> int:
    """Smallest power of two >= n and >= minimum (tl.dot needs every dimension >= 16)."""
    return max(minimum, next_pow2(max(int(n), 1)))


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


def check_tensors(**named) -> None:
    """Raise a TypeError naming the first argument that is not a tensor."""
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def check_runnable(name: str, t: torch.Tensor) -> None:
    check_tensors(**{name: t})
    if t.layout != torch.strided:
        raise ValueError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    if not t.is_cuda and t.dtype == torch.bfloat16 and t.device.type == "cpu" and is_interpreting():
        raise ValueError(f"{name} is bfloat16 on the CPU: under TRITON_INTERPRET=1 the kernels' bfloat16 "
                         "products are wrong (triton issue 11584); use float16 or float32 there")
    if not can_run(t):
        raise ValueError(
            f"{name} is on {t.device}: the Triton kernels need CUDA tensors "
            "(or CPU tensors with TRITON_INTERPRET=1 set before triton is imported)"
        )
    if t.dtype not in TORCH_TO_TL:
        raise ValueError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")


def expect(name: str, t, shape: Sequence[Optional[int]], device: torch.device,
           dtype: Optional[torch.dtype] = None) -> None:
    """Raise a ValueError naming the argument unless t is a tensor on `device` with this shape
    (None: any size) and dtype (None: any floating-point dtype). The passing case is kept cheap:
    launchers call this on every launch."""
    if isinstance(t, torch.Tensor):
        ts = t.shape
        if (len(ts) == len(shape) and t.device == device and t.layout == torch.strided
                and (t.dtype == dtype if dtype is not None else t.is_floating_point())
                and all(n is None or n == m for n, m in zip(shape, ts))):
            return
    want = "(" + ", ".join("*" if n is None else str(n) for n in shape) + ("," if len(shape) == 1 else "") + ")"
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {want}, got {type(t).__name__}")
    if t.dim() != len(shape) or any(n is not None and n != m for n, m in zip(shape, t.shape)):
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")
    if t.layout != torch.strided:
        raise ValueError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    if dtype is not None:
        raise ValueError(f"{name} must be {dtype}, got {t.dtype}")
    raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")


def unit_vector(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A 1-D operand the kernels index without a stride (bias, scale, router bias): itself when
    contiguous, else a contiguous copy (a sliced or expanded vector would be read wrongly)."""
    return t if t is None or t.is_contiguous() else t.contiguous()


# Tests set this so that every buffer a launch function allocates starts as NaN (integer ones at
# their type's minimum): an element a kernel fails to write then shows up instead of passing as
# leftover memory (often zeros).
POISON_OUTPUTS = False


def new_empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=device)
    if POISON_OUTPUTS and t.numel():
        t.fill_(float("nan") if t.is_floating_point() else torch.iinfo(dtype).min)
    return t


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    # Cached: the property query costs tens of microseconds per launch on the host.
    return torch.cuda.get_device_properties(index).multi_processor_count


# ----------------------------------------------------------------------------------------------
# Direct launches.
#
# `kernel[grid](*args)` binds and specialises every argument, builds a cache key and checks
# globals before it reaches the compiled launcher: tens of microseconds per launch on the host,
# which a small layer (decoding) pays on every call. `launch` keeps, per kernel and per argument
# key, the compiled launcher of the first launch and calls it directly afterwards. The key is finer
# than Triton's own specialisation (every int by value, every tensor by dtype and address modulo
# 16, every constexpr and launch option), so it never maps to a kernel compiled for other
# argument properties. Anything else (autotuned kernels, grids that depend on the config, launch
# hooks set, the interpreter) takes Triton's own path. LORAFUSE_FAST_LAUNCH=0 turns it off.
FAST_LAUNCH = os.environ.get("LORAFUSE_FAST_LAUNCH", "1") == "1"
_LAUNCHERS: dict = {}
_MAX_LAUNCHERS = 8192  # ints are keyed by value: bound the cache for workloads of many shapes
_RUNTIME = None  # (get_current_device, get_current_stream, knobs.runtime), bound once


class _NoDirect(Exception):
    """An argument of a kind the direct path does not key (not an int, tensor, tensor descriptor,
    float, bool or None)."""


def _other_key(a):
    c = a.__class__
    if a is None or c is bool:
        return c, a
    if c is float:  # not specialised by Triton
        return c, None
    if c.__name__ == "TensorDescriptor":  # host-side tensor-memory-accelerator descriptor
        b = a.base
        return c, b.dtype, b.data_ptr() & 15, tuple(a.shape), tuple(a.strides), tuple(a.block_shape), a.padding
    raise _NoDirect


def _spec_key(args: tuple):
    """A key at least as fine as Triton's specialisation of the runtime arguments: ints by value,
    tensors by dtype and address modulo 16, tensor descriptors by all their fields, None and bools
    by value, floats by type. None when an argument is of another kind."""
    try:
        return tuple([a if a.__class__ is int else (a.dtype, a.data_ptr() & 15) if isinstance(a, torch.Tensor)
                      else _other_key(a) for a in args])
    except _NoDirect:
        return None


def _runtime():
    global _RUNTIME
    if _RUNTIME is None:
        from triton import knobs
        from triton.runtime import driver

        _RUNTIME = (driver.active.get_current_device, driver.active.get_current_stream, knobs.runtime)
    return _RUNTIME


def _hooks_set(hook) -> bool:
    # Triton 3.6 keeps a (usually empty) chain of hooks; older versions None or a function.
    return hook is not None and bool(getattr(hook, "calls", True))


def _launcher_entry(kernel, compiled, n_args: int, const: dict):
    """(launcher, function handle, packed metadata, constexpr values in parameter order), or None
    when the kernel's parameters do not follow the layout the direct call assumes."""
    if hasattr(compiled, "result"):  # asynchronous compilation
        compiled = compiled.result()
    params = kernel.params
    if any(p.is_constexpr for p in params[:n_args]):
        return None
    tail = []
    for p in params[n_args:]:
        if not p.is_constexpr:
            return None
        if p.name in const:
            tail.append(const[p.name])
        elif p.default is not inspect.Parameter.empty:
            tail.append(p.default)
        else:
            return None
    run = compiled.run  # loads the binary on first access
    return run, compiled.function, compiled.packed_metadata, tuple(tail)


def launch(kernel: JITFunction, grid: Union[Tuple[int, ...], Callable[[dict], Tuple[int, ...]]], *args,
           **const) -> None:
    """kernel[grid](*args, **const), calling the compiled launcher directly once this argument
    specialisation has been launched before. grid: a tuple of 1-3 ints (or a callable of the
    config, which takes Triton's own path); args: the runtime arguments, positionally, in order;
    const: the constexpr arguments and launch options (num_warps, num_stages) by name."""
    # (Under the interpreter kernels are not JITFunctions.)
    if not FAST_LAUNCH or callable(grid) or not isinstance(kernel, JITFunction):
        kernel[grid](*args, **const)
        return
    get_device, get_stream, rt = _runtime()
    if _hooks_set(rt.launch_enter_hook) or _hooks_set(rt.launch_exit_hook):  # e.g. a profiler's
        kernel[grid](*args, **const)
        return
    spec = _spec_key(args)
    device = get_device()
    key = (kernel, device, spec, tuple(const.items())) if spec is not None else None
    entry = _LAUNCHERS.get(key, False) if key is not None else None
    if not entry:
        compiled = kernel[grid](*args, **const)
        if entry is False and compiled is not None:
            if len(_LAUNCHERS) >= _MAX_LAUNCHERS:
                _LAUNCHERS.clear()
            try:
                _LAUNCHERS[key] = _launcher_entry(kernel, compiled, len(args), const)
            except (AttributeError, TypeError):  # another Triton's internals: stay on its own path
                _LAUNCHERS[key] = None
        return
    run, function, metadata, tail = entry
    n = len(grid)
    run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, get_stream(device), function, metadata,
        None, None, None, *args, *tail)

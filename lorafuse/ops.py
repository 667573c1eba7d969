"""The functional op with autograd and dispatch: every module of lorafuse calls through here.

    y = lora_linear(x, weight, bias, a_cat, b_cat, scale, a_map=None, b_map=None)

CUDA tensors (and CPU tensors under TRITON_INTERPRET=1) run the Triton kernels through two
torch.library custom ops, `lorafuse::lora_linear_fwd` and `lorafuse::lora_linear_bwd`, so that
torch.compile traces through the layer without a graph break; other tensors run the same math in
plain torch.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
from typing import Callable, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lorafuse.kernels import lora_gemm, lora_gemm_fused, shrink, shrink_backward
from lorafuse.kernels.lora_gemm import lora_gemm_persistent, persistent_ok
from lorafuse.kernels.shrink import alloc_rows
from lorafuse.kernels.utils import can_run, unit_vector

__all__ = ["lora_linear", "use_backend", "check_lora_args"]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# "auto": kernels where they can run, plain torch elsewhere; "torch": always plain torch;
# "triton": always the kernels (an error where they cannot run).
_BACKEND = "auto"

# Up to this many tokens the whole layer runs as one launch (the shrink recomputed per column
# block); above it, shrink + one GEMM with the expand as extra K-steps. Tuned on an H100.
FUSED_MAX_T = 64
FUSED_MAX_R = 128

# Many tokens on Hopper: the whole layer in one persistent launch, the shrink as its first phase
# (kernels.lora_gemm.persistent_ok says where it can run), instead of shrink + lora_gemm. Off unless
# LORAFUSE_PERSISTENT=1: from CUDA graphs it measured 1-6 points slower than the two launches at
# T = 2048-16384 on the three benchmark shapes (bench/NOTES.md, entries 8 and 23).
PERSISTENT = os.environ.get("LORAFUSE_PERSISTENT", "0") == "1"

# From EXPAND_CUBLAS_MIN_T to EXPAND_CUBLAS_MAX_T rows the expand of 16-bit inputs runs on cuBLAS:
# Z = S' b_cat^T (+ bias) first, then the base product accumulated onto it in place (Z.addmm_(x, W^T),
# cuBLAS's beta = 1), instead of the Triton GEMM with the expand as R extra K-steps; the backward's dx
# likewise. Z is rounded to x's dtype before the base product is added (one rounding more than the fused
# GEMM, as in peft). Where the Triton GEMM's tiles fill the GPU poorly this wins: expand-cublas-ab-*.json
# (H200, LoraMap, R = 48, forward from a CUDA graph, 4 rounds, the order reversed every other one), the
# layer over the base GEMM on 4096 x 4096 / 4096 x 14336 / 14336 x 4096: T = 128 2.51 / 1.38 / 2.44x ->
# 1.85 / 1.40 / 1.50x; T = 256 1.99 / 1.71 / 2.07x -> 1.70 / 1.42 / 1.41x; T = 512 1.77 / 1.44 / 1.41x ->
# 1.68 / 1.27 / 1.27x; T = 1024 1.41 / 1.30 / 1.14x -> 1.48 / 1.19 / 1.17x (mixed); from 2048 rows +0.00
# to +0.04x (beta = 1 costs cuBLAS 3-6 %, and Z is written once more). The routed layer (K = 16, top-1,
# T = 512): 2.16 / 1.61x -> 2.06 / 1.41x. Below 65 rows the Triton GEMM's few-row tiles win
# (routing-expand-6b519c3-*.json: the routed layer at T = 16, K = 4 / 16 / 64, from a graph 1.62 / 1.61 /
# 1.96x -> 1.78 / 1.84 / 2.19x on cuBLAS; LoraMap R = 512 at T = 16 mixed). With the GEMM's tiles chosen
# by waves from 512 rows, expand-cublas-ab-t640-t1024-42c1bd4-*.json (same method): T = 640 1.88 / 1.44 /
# 1.63x -> 1.63 / 1.23 / 1.26x; T = 768 1.63 / 1.27 / 1.37x -> 1.56 / 1.23 / 1.23x; T = 1024 still mixed
# (1.36 / 1.29 / 1.13x -> 1.46 / 1.19 / 1.18x); forward+backward likewise (-backward-t640-t1024-bb20100-*:
# T = 768 1.74 / 1.41 / 1.32x -> 1.66 / 1.28 / 1.24x): up to 768 rows. The routed layer's expand takes the same
# switch; at K = 16 top-1 (routed-expand-cublas-ab-t640-t768-e7c5fc8-*.json) T = 640 2.34 / 1.60 / 2.13x
# -> 2.04 / 1.36 / 1.74x, T = 768 2.13 / 1.46 / 1.93x -> 2.03 / 1.39 / 1.73x. EXPAND_CUBLAS_MAX_T = 0
# turns it off.
EXPAND_CUBLAS_MIN_T = 65
try:
    EXPAND_CUBLAS_MAX_T = int(os.environ.get("LORAFUSE_EXPAND_CUBLAS_MAX_T", "768"))
except ValueError:
    raise ValueError("LORAFUSE_EXPAND_CUBLAS_MAX_T must be an integer row count (0 turns it off), got "
                     f"{os.environ['LORAFUSE_EXPAND_CUBLAS_MAX_T']!r}") from None


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force the implementation inside the block: "auto", "torch" or "triton"."""
    global _BACKEND
    if name not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {name!r}")
    old, _BACKEND = _BACKEND, name
    try:
        yield
    finally:
        _BACKEND = old


# One cheap call on every layer call (x.device.type alone costs more): is any autocast on at all?
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def autocast_inputs(fn: Callable) -> Callable:
    """Make an op whose first three arguments are (x, weight, bias) behave like F.linear under
    torch.autocast: those three cast to the autocast dtype (float64 is left alone, as autocast does),
    the op then run with autocast off so that its own float32 parts stay float32."""

    @functools.wraps(fn)
    def wrapper(x, weight, bias, *args, **kwargs):
        if _any_autocast() and isinstance(x, Tensor) and torch.is_autocast_enabled(x.device.type):
            dev = x.device.type
            dt = torch.get_autocast_dtype(dev)
            x, weight, bias = (t.to(dt) if isinstance(t, Tensor) and t.dtype in _KERNEL_DTYPES else t
                               for t in (x, weight, bias))
            with torch.autocast(dev, enabled=False):
                return fn(x, weight, bias, *args, **kwargs)
        return fn(x, weight, bias, *args, **kwargs)

    return wrapper


def rows_of(x: Tensor) -> Tensor:
    """x (..., d) as (rows, d), a view where possible; also for d = 0 (where reshape(-1, 0) cannot
    infer the row count)."""
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


def _use_kernels(x: Tensor) -> bool:
    if _BACKEND == "torch":
        return False
    # torch.func transforms (grad, vmap, jacrev) cannot see into the kernels' autograd Functions; the
    # plain-torch path computes the same function and composes with them. (Under torch.compile the
    # custom ops are traced instead, and Dynamo should not meet this private call.)
    if not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active():
        if _BACKEND == "triton":
            raise ValueError("backend 'triton' cannot run under torch.func transforms (grad, vmap, ...); "
                             "use backend 'auto' or 'torch' there")
        return False
    ok = can_run(x) and x.dtype in _KERNEL_DTYPES
    if _BACKEND == "triton" and not ok:
        raise ValueError(
            f"backend 'triton' needs x on CUDA in float16/bfloat16/float32 (or on the CPU with TRITON_INTERPRET=1 "
            f"in float16/float32: the interpreter's bfloat16 products are wrong), got {x.dtype} on {x.device}"
        )
    return ok


# The dtypes lora_linear computes in (x, weight and bias share one).
_X_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_STRIDED = torch.strided


def _args_ok(x, weight, bias, a_cat, b_cat, scale, a_map, b_map) -> bool:
    """The common case in one expression; check_lora_args explains any failure."""
    try:
        d_out, d_in = weight.shape
        R = a_cat.shape[0]
        dev, dt = x.device, x.dtype
        ok = (x.shape[-1] == d_in and a_cat.dim() == 2 and a_cat.shape[1] == d_in and b_cat.shape == (d_out, R)
              and scale.shape == (R,) and weight.dtype == dt and dt in _X_DTYPES
              and a_cat.is_floating_point() and b_cat.is_floating_point() and scale.is_floating_point()
              and weight.device == dev and a_cat.device == dev and b_cat.device == dev and scale.device == dev
              and x.layout == _STRIDED and weight.layout == _STRIDED and a_cat.layout == _STRIDED
              and b_cat.layout == _STRIDED and scale.layout == _STRIDED)
        if bias is not None:
            ok = ok and bias.shape == (d_out,) and bias.dtype == dt and bias.device == dev and bias.layout == _STRIDED
        if a_map is not None or b_map is not None:
            m = a_map.shape[0]
            ok = ok and a_map.shape == (m, R) and b_map.shape == (R, m) and a_map.device == dev \
                and b_map.device == dev and a_map.is_floating_point() and b_map.is_floating_point() \
                and a_map.layout == _STRIDED and b_map.layout == _STRIDED
        return bool(ok)
    except (AttributeError, TypeError, ValueError, IndexError):
        return False


def check_lora_args(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    a_cat: Tensor,
    b_cat: Tensor,
    scale: Tensor,
    a_map: Optional[Tensor] = None,
    b_map: Optional[Tensor] = None,
) -> None:
    """Raise a ValueError/TypeError naming the argument and the expected shape, dtype or device."""
    if _args_ok(x, weight, bias, a_cat, b_cat, scale, a_map, b_map):
        return
    named = {"x": x, "weight": weight, "a_cat": a_cat, "b_cat": b_cat, "scale": scale}
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("bias", bias), ("a_map", a_map), ("b_map", b_map)):
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    for name, t in list(named.items()) + [("bias", bias), ("a_map", a_map), ("b_map", b_map)]:
        if t is not None and t.layout != _STRIDED:
            raise ValueError(f"{name} must be a dense (strided) tensor, got layout {t.layout}; call .to_dense() first")
    if x.dim() < 1:
        raise ValueError("x must have shape (..., d_in), got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape (d_out, d_in), got {tuple(weight.shape)}")
    d_out, d_in = weight.shape
    if x.shape[-1] != d_in:
        raise ValueError(f"x must have shape (..., {d_in}) to match weight {tuple(weight.shape)}, got {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (d_out,):
        raise ValueError(f"bias must have shape ({d_out},), got {tuple(bias.shape)}")
    if a_cat.dim() != 2 or a_cat.shape[1] != d_in:
        raise ValueError(f"a_cat must have shape (R, {d_in}), got {tuple(a_cat.shape)}")
    R = a_cat.shape[0]
    if tuple(b_cat.shape) != (d_out, R):
        raise ValueError(f"b_cat must have shape ({d_out}, {R}) (d_out, R of a_cat), got {tuple(b_cat.shape)}")
    if tuple(scale.shape) != (R,):
        raise ValueError(f"scale must have shape ({R},) (one entry per rank column of a_cat), got {tuple(scale.shape)}")
    if (a_map is None) != (b_map is None):
        raise ValueError("a_map and b_map must be given together (LoraMap needs both), got only "
                         + ("a_map" if b_map is None else "b_map"))
    if a_map is not None:
        if a_map.dim() != 2 or a_map.shape[1] != R:
            raise ValueError(f"a_map must have shape (m, {R}), got {tuple(a_map.shape)}")
        m = a_map.shape[0]
        if tuple(b_map.shape) != (R, m):
            raise ValueError(f"b_map must have shape ({R}, {m}), got {tuple(b_map.shape)}")
    for name, t in list(named.items())[1:] + [("bias", bias), ("a_map", a_map), ("b_map", b_map)]:
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} must be on {x.device} like x, got {t.device}")
    if x.dtype not in _X_DTYPES:
        raise ValueError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if weight.dtype != x.dtype:
        raise ValueError(f"weight must have x's dtype {x.dtype}, got {weight.dtype}")
    if bias is not None and bias.dtype != x.dtype:
        raise ValueError(f"bias must have x's dtype {x.dtype}, got {bias.dtype}")
    for name, t in (("a_cat", a_cat), ("b_cat", b_cat), ("scale", scale), ("a_map", a_map), ("b_map", b_map)):
        if t is not None and not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")


# ----------------------------------------------------------------------------------------------
# Plain torch: the same math as the kernels (shrink in float32, S' rounded to x's dtype).


def _torch_path(x, weight, bias, a_cat, b_cat, scale, a_map, b_map):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    s = x.to(acc) @ a_cat.to(acc).t()
    if a_map is not None:
        s = (s @ a_map.to(acc).t()) @ b_map.to(acc).t()
    sp = (s * scale.to(acc)).to(x.dtype)
    return F.linear(x, weight, bias) + sp @ b_cat.to(x.dtype).t()


# ----------------------------------------------------------------------------------------------
# Kernel path as custom ops.


def _empty(x: Tensor) -> Tensor:
    return x.new_empty((0,), dtype=torch.float32)


def _x_to_save(x: Tensor, needs) -> Tensor:
    """x itself only where a gradient reads it (weight's and a_cat's): a LoraMap or weighted layer
    keeps no (T, d_in) activation, and an inference-mode x may feed the maps' gradients."""
    return x if (needs[1] or needs[3]) else _empty(x)


def _forward_impl(x, weight, bias, a_cat, b_cat, scale, a_map, b_map, save: bool):
    """x (T, d_in) -> (y (T, d_out), S' (T, R), S (T, R) f32, U (T, m) f32); the last three are
    None unless `save` (they are what the backward needs)."""
    # The kernels index bias and scale without a stride: a sliced or expanded vector is copied
    # (here, under every entry: lora_linear, its autograd Function and the custom op).
    bias, scale = unit_vector(bias), unit_vector(scale)
    T = x.shape[0]
    R = a_cat.shape[0]
    if T <= FUSED_MAX_T and R <= FUSED_MAX_R:
        return lora_gemm_fused(x, weight, bias, a_cat, b_cat, scale, a_map, b_map, save=save, check=False)
    if PERSISTENT and persistent_ok(x, weight, a_cat):
        y, sp, s, u = lora_gemm_persistent(x, weight, bias, a_cat, b_cat, scale, a_map, b_map, save=save,
                                           check=False)
        return y, (sp if save else None), s, u
    sp, s, u = shrink(x, a_cat, scale, a_map, b_map, save=save, check=False)
    y = expand(x, weight, bias, sp, b_cat)
    return y, (sp if save else None), s, u


def expand_uses_cublas(x: Tensor) -> bool:
    """Whether expand() takes cuBLAS's path for x (T, d_in). (The CPU's interpreter tests force the same
    path, on torch's CPU matmul, by replacing this function.)"""
    return EXPAND_CUBLAS_MIN_T <= x.shape[0] <= EXPAND_CUBLAS_MAX_T and x.is_cuda and x.dtype != torch.float32


def expand(x: Tensor, weight: Tensor, bias: Optional[Tensor], sp: Tensor, b_cat: Tensor) -> Tensor:
    """y = x W^T + bias + S' b_cat^T.  x: (T, d_in), weight: (d_out, d_in), bias: (d_out,) or None,
    sp: (T, R) in x's dtype, b_cat: (d_out, R); any strides. The backward's dx = dy W + dS a_cat is the
    same product: expand(dy, W^T, None, dS, a_cat^T). The operands have been checked (lora_linear and
    the routed op check them): no second round of checks."""
    if expand_uses_cublas(x):
        y = torch.mm(sp, b_cat.t()) if bias is None else torch.addmm(bias, sp, b_cat.t())
        return y.addmm_(x, weight.t())
    return lora_gemm(x, weight.t(), sp, b_cat.t(), bias, check=False)


def _backward_impl(dy, x, weight, a_cat, b_cat, scale, a_map, b_map, sp, s, u, needs):
    """Gradients for [x, weight, bias, a_cat, b_cat, scale, a_map, b_map]; None where not needed."""
    n_x, n_w, n_b, n_a, n_bc, n_sc, n_am, n_bm = needs
    has_map = a_map is not None
    dy, scale = dy.contiguous(), unit_vector(scale)  # scale: read without a stride, as in _forward_impl
    ds = dscale = da_map = db_map = None
    # dy b_cat (the shrink's backward) feeds only the grads of x, a_cat, scale and the maps.
    if n_x or n_a or n_sc or n_am or n_bm:
        ds, dscale, da_map, db_map = shrink_backward(
            dy, b_cat, scale, s, u if has_map else None, a_map, b_map,
            need_ds=n_x or n_a, need_dmap=(n_am or n_bm), need_dscale=n_sc, check=False,
        )
    return [
        expand(dy, weight.t(), None, ds, a_cat.t()) if n_x else None,
        dy.t() @ x if n_w else None,
        dy.sum(0, dtype=torch.float32).to(dy.dtype) if n_b else None,
        ds.t() @ x if n_a else None,
        dy.t() @ sp if n_bc else None,
        dscale if n_sc else None,
        da_map if (n_am and has_map) else None,
        db_map if (n_bm and has_map) else None,
    ]


@torch.library.custom_op("lorafuse::lora_linear_fwd", mutates_args=())
def _fwd_op(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    a_cat: Tensor,
    b_cat: Tensor,
    scale: Tensor,
    a_map: Optional[Tensor],
    b_map: Optional[Tensor],
    save: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The forward as a custom op for torch.compile (outputs cannot be None: empty instead)."""
    y, sp, s, u = _forward_impl(x, weight, bias, a_cat, b_cat, scale, a_map, b_map, save)
    if not save:
        return y, _empty(x), _empty(x), _empty(x)
    return y, sp, s, (u if u is not None else _empty(x))


@_fwd_op.register_fake
def _(x, weight, bias, a_cat, b_cat, scale, a_map, b_map, save):
    T, R = x.shape[0], a_cat.shape[0]
    y = x.new_empty((T, weight.shape[0]))
    if not save:
        return y, _empty(x), _empty(x), _empty(x)
    sp = alloc_rows(T, R, x.dtype, x.device)
    s = x.new_empty((T, R), dtype=torch.float32)
    u = x.new_empty((T, a_map.shape[0]), dtype=torch.float32) if a_map is not None else _empty(x)
    return y, sp, s, u


# needs = [x, weight, bias, a_cat, b_cat, scale, a_map, b_map]
@torch.library.custom_op("lorafuse::lora_linear_bwd", mutates_args=())
def _bwd_op(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    a_cat: Tensor,
    b_cat: Tensor,
    scale: Tensor,
    a_map: Optional[Tensor],
    b_map: Optional[Tensor],
    sp: Tensor,
    s: Tensor,
    u: Tensor,
    needs: List[bool],
) -> List[Tensor]:
    """The backward as a custom op for torch.compile; empty tensors where not needed."""
    grads = _backward_impl(dy, x, weight, a_cat, b_cat, scale, a_map, b_map, sp, s, u, needs)
    # Outputs must not alias each other: a fresh empty tensor for each missing gradient.
    return [g if g is not None else _empty(x) for g in grads]


@_bwd_op.register_fake
def _(dy, x, weight, a_cat, b_cat, scale, a_map, b_map, sp, s, u, needs):
    # x may be saved as a placeholder (_x_to_save): shapes and dtypes come from dy and the weights.
    f32, dt = torch.float32, dy.dtype
    shapes = [
        ((dy.shape[0], weight.shape[1]), dt), (weight.shape, dt), ((weight.shape[0],), dt), (a_cat.shape, dt),
        (b_cat.shape, dt), (scale.shape, f32),
        (a_map.shape if a_map is not None else None, f32), (b_map.shape if b_map is not None else None, f32),
    ]
    return [x.new_empty(shp, dtype=dt) if (n and shp is not None) else _empty(x) for n, (shp, dt) in zip(needs, shapes)]


def _setup_context(ctx, inputs, output):
    x, weight, bias, a_cat, b_cat, scale, a_map, b_map, save = inputs
    y, sp, s, u = output
    ctx.mark_non_differentiable(sp, s, u)
    ctx.save_for_backward(_x_to_save(x, ctx.needs_input_grad), weight, a_cat, b_cat, scale, a_map, b_map, sp, s, u)
    ctx.dtypes = [t.dtype if t is not None else None for t in (x, weight, bias, a_cat, b_cat, scale, a_map, b_map)]


def first_order_only(op: str = "lorafuse.lora_linear") -> None:
    """Called first in a kernel backward, which is not itself differentiable: create_graph=True is
    refused rather than second-order terms dropped."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"{op}'s kernels give first-order gradients only (create_graph=True, as in double "
                           f"backward or a gradient penalty, is not supported); run the layer under "
                           f"lorafuse.use_backend('torch') for higher-order gradients")


def _backward(ctx, dy, _dsp, _ds, _du):
    first_order_only()
    x, weight, a_cat, b_cat, scale, a_map, b_map, sp, s, u = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:8])
    if not any(needs):
        return (None,) * 9
    if s.numel() == 0 and dy.shape[0] > 0 and a_cat.shape[0] > 0:
        raise RuntimeError("lorafuse::lora_linear_fwd was called with save=False, so it kept nothing to "
                           "differentiate; call it with save=True (lorafuse.lora_linear does) when a "
                           "gradient is needed")
    grads = torch.ops.lorafuse.lora_linear_bwd(dy, x, weight, a_cat, b_cat, scale, a_map, b_map, sp, s, u, needs)
    return (*[g.to(dt) if n else None for n, g, dt in zip(needs, grads, ctx.dtypes)], None)


torch.library.register_autograd("lorafuse::lora_linear_fwd", _backward, setup_context=_setup_context)


class _LoraLinearFunction(torch.autograd.Function):
    """The eager path: same implementation as the custom ops, without their dispatch cost (about
    70 us of Python per call with autograd on a 2-core CPU, measured by bench/host_overhead.py),
    which small batches on a GPU would otherwise pay on every layer."""

    @staticmethod
    def forward(ctx, x, weight, bias, a_cat, b_cat, scale, a_map, b_map):
        y, sp, s, u = _forward_impl(x, weight, bias, a_cat, b_cat, scale, a_map, b_map, True)
        ctx.save_for_backward(_x_to_save(x, ctx.needs_input_grad), weight, a_cat, b_cat, scale, a_map, b_map,
                              sp, s, u)
        ctx.dtypes = [t.dtype if t is not None else None for t in (x, weight, bias, a_cat, b_cat, scale, a_map, b_map)]
        return y

    @staticmethod
    def backward(ctx, dy):
        first_order_only()
        x, weight, a_cat, b_cat, scale, a_map, b_map, sp, s, u = ctx.saved_tensors
        needs = list(ctx.needs_input_grad)
        grads = _backward_impl(dy, x, weight, a_cat, b_cat, scale, a_map, b_map, sp, s, u, needs)
        return tuple(g if g is None or g.dtype == dt else g.to(dt) for g, dt in zip(grads, ctx.dtypes))


# ----------------------------------------------------------------------------------------------
# Public entry point


@autocast_inputs
def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    a_cat: Tensor,
    b_cat: Tensor,
    scale: Tensor,
    a_map: Optional[Tensor] = None,
    b_map: Optional[Tensor] = None,
) -> Tensor:
    """y = x W^T + b + ((x a_cat^T [a_map^T b_map^T]) * scale) b_cat^T.

    x: (..., d_in); weight: (d_out, d_in); bias: (d_out,) or None; a_cat: (R, d_in);
    b_cat: (d_out, R); scale: (R,); a_map: (m, R) and b_map: (R, m) for LoraMap, else None.
    Returns (..., d_out) in x's dtype. weight and bias must have x's dtype; a_cat and b_cat are used
    in x's dtype and scale, a_map and b_map in float32 (their gradients come back in their own
    dtype). Differentiable in every tensor argument; only the gradients asked for are computed.
    Under torch.autocast, x, weight and bias are first cast to the autocast dtype, as for F.linear.
    """
    check_lora_args(x, weight, bias, a_cat, b_cat, scale, a_map, b_map)
    # (The common cases skip no-op reshapes and casts: each costs host time on every small call.)
    flat = x.dim() == 2
    x2 = x if flat else rows_of(x)
    if x2.shape[0] == 0 or weight.shape[0] == 0 or weight.shape[1] == 0 or not _use_kernels(x2):
        y = _torch_path(x2, weight, bias, a_cat, b_cat, scale, a_map, b_map)
        return y if flat else y.reshape(*x.shape[:-1], weight.shape[0])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if weight.stride(-1) != 1 and weight.stride(0) != 1:
        weight = weight.contiguous()
    dt = x.dtype
    a_c = a_cat if a_cat.dtype == dt else a_cat.to(dt)
    b_c = b_cat if b_cat.dtype == dt else b_cat.to(dt)
    sc = scale if scale.dtype == torch.float32 else scale.to(torch.float32)
    tensors = (x2, weight, bias, a_c, b_c, sc, a_map, b_map)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if torch.compiler.is_compiling():
        y = torch.ops.lorafuse.lora_linear_fwd(*tensors, save)[0]
    elif save:
        y = _LoraLinearFunction.apply(*tensors)
    else:
        y = _forward_impl(*tensors, False)[0]
    return y if flat else y.reshape(*x.shape[:-1], weight.shape[0])

"""Routed shrink: the thin d_in -> R half of a routed multi-LoRA layer, with the router fused in.

    [S | Z] = x [a_cat; router]^T          one thin GEMM: the K router logits are K extra columns
    L = |Z| (Arrow) or Z + router_bias (linear router), divided by the temperature
    g = softmax over the top-k entries of each row of L (all K when dense; the others are 0)
    S' = S * scale * g[:, block]           block[r] = the adapter that rank column r belongs to

x is read once: one partial kernel gives both products per step. Below STACK_MIN_T rows it loads its
(d_in x columns) operand tile from a_cat for the first R columns and from the router for the last K
(stacked on chip, no copy in memory) and splits d_in over programs when T is small (as shrink.py's
partial kernel does); from STACK_MIN_T rows the two are copied into one tensor for the shrink's
one-operand kernel, whose single unmasked load per step is 1.7-2.7x faster (or, for 16-bit inputs
from SHRINK_CUBLAS_MIN_R columns, for cuBLAS with a float32 product);
the gates are computed on chip by the finish kernel and broadcast to the rank columns through a one-hot product
with the block-id vector, so S' (T x R) is the only intermediate that goes back to memory. The
expand is then lorafuse.kernels.lora_gemm.lora_gemm(x, W^T, S', b_cat^T, bias), as for the other
methods.
"""
from __future__ import annotations

import numbers
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .shrink import (_mm_f32, _rows_partial, _sum_splits, alloc_rows, shrink_uses_cublas, split_config,
                     split_group)
from .utils import (block_for, cdiv, check_runnable, check_tensors, dot_precision, is_interpreting, launch, new_empty,
                    split_range, unit_vector)

# The gates of one row stay in registers: K up to this many adapters per layer.
MAX_ROUTED_K = 256
# Rows per program of the routed finishing kernel.
ROUTED_FINISH_BLOCK_T = 32


@triton.jit
def _stacked_partial_kernel(
    x_ptr, a_ptr, rt_ptr, part_ptr,
    T, D, R, K, D_PER_SPLIT,
    stride_xt, stride_xd, stride_ar, stride_ad, stride_rk, stride_rd,
    stride_ps, stride_pt,
    PREC: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    EVEN_D: tl.constexpr,
):
    """part[split, t, c] = sum over d in the split of x[t, d] * [a_cat; router][c, d] (float32), for the
    R + K columns c. Grid (column chunks, splits, row blocks), as shrink's _rows_partial_kernel.
    EVEN_D: D is a multiple of BLOCK_D (split ranges then always are): no mask along d, so that the
    compiler can prove the loads aligned (as the shrink's EVEN_K)."""
    pid_r = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_t = tl.program_id(2)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_c = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    t_mask = offs_t < T
    from_a = offs_c < R
    from_router = (offs_c >= R) & (offs_c < R + K)
    offs_t_c = tl.where(t_mask, offs_t, 0)
    offs_a = tl.where(from_a, offs_c, 0)
    offs_rt = tl.where(from_router, offs_c - R, 0)
    d_start = pid_s * D_PER_SPLIT
    d_end = tl.minimum(d_start + D_PER_SPLIT, D)
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for d0 in range(d_start, d_end, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        x_ptrs = x_ptr + offs_t_c[:, None] * stride_xt + offs_d[None, :] * stride_xd
        # The (BLOCK_D, BLOCK_R) tile of [a_cat; router]^T: each column from one of the two sources.
        a_ptrs = a_ptr + offs_a[None, :] * stride_ar + offs_d[:, None] * stride_ad
        r_ptrs = rt_ptr + offs_rt[None, :] * stride_rk + offs_d[:, None] * stride_rd
        if EVEN_D:
            x = tl.load(x_ptrs)
            w = tl.load(a_ptrs, mask=from_a[None, :], other=0.0)
            w += tl.load(r_ptrs, mask=from_router[None, :], other=0.0)
        else:
            d_mask = offs_d < d_end
            x = tl.load(x_ptrs, mask=d_mask[None, :], other=0.0)
            w = tl.load(a_ptrs, mask=d_mask[:, None] & from_a[None, :], other=0.0)
            w += tl.load(r_ptrs, mask=d_mask[:, None] & from_router[None, :], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=PREC)
    tl.store(part_ptr + pid_s * stride_ps + offs_t[:, None] * stride_pt + offs_c[None, :], acc,
             mask=t_mask[:, None] & (offs_c < R + K)[None, :])


def _stacked_partial(x, a_cat, router, cfg):
    """float32 partial sums of x [a_cat; router]^T over cfg["SPLITS"] ranges of d_in: (splits, T, R + K)."""
    T, D = x.shape
    R, K = a_cat.shape[0], router.shape[0]
    d_per, splits = split_range(D, cfg["SPLITS"], cfg["BLOCK_K"])
    part = new_empty((splits, T, R + K), torch.float32, x.device)
    grid = (cdiv(R + K, cfg["BLOCK_R"]), splits, cdiv(T, cfg["BLOCK_T"]))
    launch(_stacked_partial_kernel, grid,
        x, a_cat, router, part, T, D, R, K, d_per,
        x.stride(0), x.stride(1), a_cat.stride(0), a_cat.stride(1), router.stride(0), router.stride(1),
        part.stride(0), part.stride(1),
        PREC=dot_precision(x.dtype), BLOCK_T=cfg["BLOCK_T"], BLOCK_D=cfg["BLOCK_K"], BLOCK_R=cfg["BLOCK_R"],
        EVEN_D=D % cfg["BLOCK_K"] == 0, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return part, splits


# From this many rows the partial products run on [a_cat; router] copied into one tensor (torch.cat,
# (R + K) x d_in: a few microseconds) by the shrink's one-operand kernel: the two masked loads per
# step of _stacked_partial_kernel made it 1.7-2.7x slower (routed-shrink-sweep-e310a07-*.json,
# H200, bf16, d_in = 4096, r = 16, GPU time from CUDA graphs, same tile shapes: T = 8192, K = 64
# 374 -> 147 us; K = 16 122 -> 53 us; K = 4 60 -> 36 us; T = 2048, K = 64 129 -> 49 us). Below it the
# copy's extra launch would cost more host time than the kernel saves.
STACK_MIN_T = 2048


def stacked_config(T: int, D: int, cols: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Launch shape of the one-operand partial kernel over the R + K stacked columns: split_config's,
    except wide 16-bit ones, where larger tiles won in routed-shrink-sweep-e310a07-*.json (T = 2048
    and 8192 only): 128 x 256 tiles, 8 warps, from 512 columns, and above 256 at T >= 8192 (146-49 us
    against 183-105 us); 64 x 128 tiles for the other 129-511 columns (measured at T = 2048, 272
    columns: 26 against 41 us; taken for the T between as well)."""
    cfg = split_config(T, D, cols, dtype, device)
    if is_interpreting() or dtype == torch.float32 or T < STACK_MIN_T:
        return cfg
    if cols >= 512 or (cols > 256 and T >= 8192):
        return {"BLOCK_T": 128, "BLOCK_K": 64, "BLOCK_R": 256, "SPLITS": 1, "num_warps": 8, "num_stages": 3}
    if cols > 128:
        return {"BLOCK_T": 64, "BLOCK_K": 64, "BLOCK_R": 128, "SPLITS": 1, "num_warps": 4, "num_stages": 4}
    return cfg


def _routed_partial(x, a_cat, router, config):
    """float32 partial sums of x [a_cat; router]^T: (splits, T, R + K) or, from cuBLAS, (T, R + K);
    and the split count."""
    T, D = x.shape
    cols = a_cat.shape[0] + router.shape[0]
    if T >= STACK_MIN_T:
        stacked = torch.cat([a_cat, router], 0)
        # Wide 16-bit products from cuBLAS (float32 out), as the plain shrink takes them from
        # SHRINK_CUBLAS_MIN_R columns: routed-shrink-sweep-e310a07-*.json had cuBLAS at 33 against the
        # one-operand kernel's 53 us (T = 8192, K = 16, r = 16: 272 columns) and 107 against 147 us
        # (K = 64), but 46 against 36 us at 68 columns (K = 4). Through the op, from CUDA graphs with the
        # variants' order swapped every other round (routed-cublas-ab-dense*-eeeaae3-*.json, top-1, r = 16):
        # T = 8192, K = 16 1.27x -> 1.22x the base GEMM at 4096 x 4096; K = 64 1.79x -> 1.68x; T = 2048, K = 16
        # 1.43x -> 1.34x; at 4096 x 14336 0.02-0.03x less, within that run's noise.
        if config is None and shrink_uses_cublas(x, stacked):
            part = _mm_f32(x, stacked)
            if part is not None:
                return part, 1
        return _rows_partial(x, stacked.t(), T, D, cols, config or stacked_config(T, D, cols, x.dtype, x.device))
    return _stacked_partial(x, a_cat, router, config or split_config(T, D, cols, x.dtype, x.device))


@triton.jit
def _routing_logits(part_ptr, rbias_ptr, n_splits, stride_ps, stride_pt, offs_t, offs_k, tk_mask, k_mask, inv_temp,
                    ABS_LOGITS: tl.constexpr, HAS_RBIAS: tl.constexpr, SPLIT_GROUP: tl.constexpr):
    """(z, logits) of a row block: z the summed partials (+ router_bias), logits = (|z| or z) / the
    temperature, -inf past K. A NaN logit (a diverged learned router) counts as +inf, the largest, as
    torch.sort and torch.topk take it: top-k then selects it and the softmax turns the row's output
    to NaN on every path, where a max that skips NaN would route around it and hide the fault."""
    z = _sum_splits(part_ptr, n_splits, stride_ps, stride_pt, offs_t, offs_k, tk_mask, SPLIT_GROUP)
    if HAS_RBIAS:
        z += tl.load(rbias_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)[None, :]
    if ABS_LOGITS:
        logits = tl.abs(z) * inv_temp
    else:
        logits = z * inv_temp
    logits = tl.where(logits != logits, float("inf"), logits)
    return z, tl.where(k_mask[None, :], logits, float("-inf"))


@triton.jit
def _next_choice(work, offs_k, BLOCK_K: tl.constexpr):
    """One step of the iterative top-k: (each row's largest remaining logit, its index (the lowest among
    equals), work with that entry removed)."""
    row_max = tl.max(work, axis=1)
    first = tl.min(tl.where(work == row_max[:, None], offs_k[None, :], BLOCK_K), axis=1)
    return row_max, first, tl.where(offs_k[None, :] == first[:, None], float("-inf"), work)


@triton.jit
def _routed_finish_kernel(
    part_ptr, scale_ptr, block_ptr, rbias_ptr,
    sp_ptr, s_ptr, z_ptr, g_ptr,
    T, R, K, n_splits, inv_temp,
    stride_ps, stride_pt, stride_spt, stride_st, stride_zt, stride_gt,
    ABS_LOGITS: tl.constexpr,
    TOP_K: tl.constexpr,
    HAS_RBIAS: tl.constexpr,
    SAVE_S: tl.constexpr,
    SAVE_GATES: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_GROUP: tl.constexpr,
):
    """Sum the partials of [S | Z]; gates from Z (top-k, softmax); S' = S * scale * g[:, block].
    TOP_K = 0 means dense (softmax over all K). Grid (row blocks, R chunks of BLOCK_R): every
    program computes its rows' gates (K logits, cheap) and finishes one chunk of rank columns, so
    that a wide R (64 adapters of rank 16) spreads over the GPU instead of looping in a few
    row-block programs (T = 2048: 64 programs for 132 SMs took 41 us at R = 1024 on an H200)."""
    pid = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = offs_t < T
    offs_k = tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    tk_mask = t_mask[:, None] & k_mask[None, :]

    # The router logits are columns R .. R+K-1 of the partial sums.
    z, logits = _routing_logits(part_ptr + R, rbias_ptr, n_splits, stride_ps, stride_pt, offs_t, offs_k, tk_mask,
                                k_mask, inv_temp, ABS_LOGITS, HAS_RBIAS, SPLIT_GROUP)
    neg_inf = float("-inf")
    if TOP_K > 0:
        # Iterative max: each step keeps the largest remaining logit (the lowest index among equals).
        work = logits
        keep = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
        for _ in tl.static_range(TOP_K):
            _, first, work = _next_choice(work, offs_k, BLOCK_K)
            keep = tl.where(offs_k[None, :] == first[:, None], 1, keep)
        kept = (keep != 0) & k_mask[None, :]
    else:
        kept = (offs_t[:, None] >= 0) & k_mask[None, :]
    row_max = tl.max(tl.where(kept, logits, neg_inf), axis=1)
    e = tl.where(kept, tl.exp(logits - row_max[:, None]), 0.0)
    g = e / tl.sum(e, axis=1)[:, None]
    if SAVE_GATES:
        if pid_r == 0:
            tl.store(z_ptr + offs_t[:, None] * stride_zt + offs_k[None, :], z, mask=tk_mask)
            tl.store(g_ptr + offs_t[:, None] * stride_gt + offs_k[None, :], g, mask=tk_mask)

    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    tr_mask = t_mask[:, None] & r_mask[None, :]
    s = _sum_splits(part_ptr, n_splits, stride_ps, stride_pt, offs_t, offs_r, tr_mask, SPLIT_GROUP)
    if SAVE_S:
        tl.store(s_ptr + offs_t[:, None] * stride_st + offs_r[None, :], s, mask=tr_mask)
    # Each rank column takes its adapter's gate: g (T, K) times the one-hot (K, R) of the block ids
    # ("ieee": the products with 0 and 1 are exact, tf32 would round the gates).
    blk = tl.load(block_ptr + offs_r, mask=r_mask, other=-1)
    onehot = (offs_k[:, None] == blk[None, :]).to(tl.float32)
    g_cols = tl.dot(g, onehot, input_precision="ieee")
    scale = tl.load(scale_ptr + offs_r, mask=r_mask, other=0.0).to(tl.float32)
    tl.store(sp_ptr + offs_t[:, None] * stride_spt + offs_r[None, :],
             (s * scale[None, :] * g_cols).to(sp_ptr.dtype.element_ty), mask=tr_mask)


# Below this the gates' float32 logits / temperature can overflow (a NaN output); top_k=1 is the way
# to route each row to one adapter.
MIN_TEMPERATURE = 1e-6


def _check_matrix_like_x(name: str, t, rows: str, x: torch.Tensor) -> None:
    """t must be a (rows >= 1, d_in) tensor in x's dtype on x's device."""
    check_tensors(**{name: t})
    D = x.shape[1]
    if t.dim() != 2 or t.shape[1] != D or t.shape[0] < 1:
        raise ValueError(f"{name} must have shape ({rows}, {D}) (d_in of x), got {tuple(t.shape)}")
    if t.dtype != x.dtype or t.device != x.device:
        raise ValueError(f"{name} must be {x.dtype} on {x.device} like x, got {t.dtype} on {t.device}")


def _check_router_args(x, router, top_k, temperature, router_bias, dense_ok=True):
    """The checks every routed kernel makes of x (T, d_in) and the router's arguments; raise naming them."""
    check_runnable("x", x)
    if x.dim() != 2:
        raise ValueError(f"x must have shape (T, d_in), got {tuple(x.shape)}")
    _check_matrix_like_x("router", router, "K", x)
    K = router.shape[0]
    if K > MAX_ROUTED_K:
        raise ValueError(f"the routed kernels take at most {MAX_ROUTED_K} adapters, got K = {K}")
    if router_bias is not None:
        check_tensors(router_bias=router_bias)
        if tuple(router_bias.shape) != (K,) or router_bias.dtype != torch.float32 or router_bias.device != x.device:
            raise ValueError(f"router_bias must be float32 of shape ({K},) on {x.device}, got {router_bias.dtype} "
                             f"{tuple(router_bias.shape)} on {router_bias.device}")
    integral = isinstance(top_k, numbers.Integral) and not isinstance(top_k, bool)
    if (top_k is None and not dense_ok) or (top_k is not None and not (integral and 1 <= top_k <= K)):
        raise ValueError(f"top_k must be {'None or ' if dense_ok else ''}an integer in 1..{K}, got {top_k!r}")
    if not (MIN_TEMPERATURE <= temperature < float("inf")):
        raise ValueError(f"temperature must be a positive finite number >= {MIN_TEMPERATURE:g} (smaller ones "
                         f"overflow the float32 gates), got {temperature!r}")


def _check_routed_shrink_args(x, a_cat, router, scale, block_ids, top_k, temperature, router_bias):
    """Raise naming the argument; returns (scale, router_bias, block_ids) as the kernels index them."""
    _check_router_args(x, router, top_k, temperature, router_bias)
    _check_matrix_like_x("a_cat", a_cat, "rows", x)
    check_tensors(scale=scale, block_ids=block_ids)
    R = a_cat.shape[0]
    if tuple(scale.shape) != (R,):
        raise ValueError(f"scale must have shape ({R},) (rows of a_cat), got {tuple(scale.shape)}")
    if scale.dtype != torch.float32 or scale.device != x.device:
        raise ValueError(f"scale must be float32 on {x.device}, got {scale.dtype} on {scale.device}")
    if tuple(block_ids.shape) != (R,) or block_ids.dtype != torch.int32 or block_ids.device != x.device:
        raise ValueError(f"block_ids must be int32 of shape ({R},) on {x.device}, got {block_ids.dtype} "
                         f"{tuple(block_ids.shape)} on {block_ids.device}")
    K = router.shape[0]
    if R and not (block_ids.is_cuda and torch.cuda.is_current_stream_capturing()):
        # one read-back (a capture cannot have it): an id outside 0..K-1 would leave its column zero
        lo, hi = (int(v) for v in torch.aminmax(block_ids))
        if lo < 0 or hi >= K:
            raise ValueError(f"block_ids must lie in 0..{K - 1} (one adapter per rank column), got "
                             f"values in {lo}..{hi}")
    # Indexed without a stride in the kernels: a sliced or expanded vector is copied first.
    return unit_vector(scale), unit_vector(router_bias), unit_vector(block_ids)


def routed_shrink(
    x: torch.Tensor,
    a_cat: torch.Tensor,
    router: torch.Tensor,
    scale: torch.Tensor,
    block_ids: torch.Tensor,
    top_k: Optional[int] = None,
    temperature: float = 1.0,
    abs_logits: bool = True,
    router_bias: Optional[torch.Tensor] = None,
    save: bool = False,
    config: Optional[dict] = None,
    check: bool = True,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """x: (T, d_in); a_cat: (R, d_in) and router: (K, d_in) in x's dtype; scale: (R,) float32;
    block_ids: (R,) int32, the adapter (0..K-1) of each rank column; router_bias: (K,) float32 or None.

    Returns (sp, s, z, g): sp = S' (T, R) in x's dtype; when save, s = S = x a_cat^T (T, R),
    z = the raw router logits x router^T (+ router_bias) (T, K) and g = the gates (T, K), all
    float32 (s may be a strided view), else all three None. top_k: None (dense softmax) or
    1..K; abs_logits: Arrow's |z|. config: the partial kernel's launch shape (split_config's keys).
    check=False skips the operand checks (for callers that have made these guarantees already:
    lorafuse.routing's op, where they are a visible share of a small call's host time); with check,
    block_ids' range is read back to the host (one synchronisation), except while a CUDA graph is
    being captured.
    """
    if check:
        scale, router_bias, block_ids = _check_routed_shrink_args(x, a_cat, router, scale, block_ids, top_k,
                                                                  temperature, router_bias)
    T, D = x.shape
    R, K = a_cat.shape[0], router.shape[0]
    f32 = torch.float32
    sp = alloc_rows(T, R, x.dtype, x.device)
    if T == 0:
        empty = lambda w: new_empty((0, w), f32, x.device)  # noqa: E731
        return (sp, empty(R), empty(K), empty(K)) if save else (sp, None, None, None)
    part, splits = _routed_partial(x, a_cat, router, config)
    # One split: the partials are [S | Z] itself and S is a view of them.
    direct = splits == 1
    s = (part.view(T, R + K)[:, :R] if direct else new_empty((T, R), f32, x.device)) if save else None
    z = new_empty((T, K), f32, x.device) if save else None
    g = new_empty((T, K), f32, x.device) if save else None
    dummy = part
    block_r = min(block_for(R), 32 if is_interpreting() else 64)
    launch(_routed_finish_kernel, (cdiv(T, ROUTED_FINISH_BLOCK_T), cdiv(R, block_r)),
        part, scale, block_ids, router_bias if router_bias is not None else dummy,
        sp, s if (save and not direct) else dummy, z if save else dummy, g if save else dummy,
        T, R, K, splits, 1.0 / float(temperature),
        part.stride(0) if part.dim() == 3 else 0, part.stride(-2),
        sp.stride(0), s.stride(0) if (save and not direct) else 0,
        z.stride(0) if save else 0, g.stride(0) if save else 0,
        ABS_LOGITS=bool(abs_logits), TOP_K=int(top_k or 0), HAS_RBIAS=router_bias is not None,
        SAVE_S=save and not direct, SAVE_GATES=save,
        BLOCK_T=ROUTED_FINISH_BLOCK_T, BLOCK_R=block_r, BLOCK_K=block_for(K), SPLIT_GROUP=split_group(), num_warps=4,
    )
    return sp, s, z, g


@triton.jit
def _route_select_kernel(
    part_ptr, rbias_ptr, ids_ptr, gates_ptr,
    T, K, n_splits, inv_temp,
    stride_ps, stride_pt,
    ABS_LOGITS: tl.constexpr,
    TOP_K: tl.constexpr,
    HAS_RBIAS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_GROUP: tl.constexpr,
):
    """From the partial sums of the logits x router^T (splits, T, K): each row's TOP_K adapters and
    their gates (the softmax over the kept logits), written as ids (TOP_K, T) int32 and gates
    (TOP_K, T) float32, one row per choice. Same selection as _routed_finish_kernel: the largest
    logits, the lowest index among equal ones, a NaN counted as the largest (its row's gates NaN)."""
    pid = tl.program_id(0)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = offs_t < T
    offs_k = tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    _, work = _routing_logits(part_ptr, rbias_ptr, n_splits, stride_ps, stride_pt, offs_t, offs_k,
                              t_mask[:, None] & k_mask[None, :], k_mask, inv_temp, ABS_LOGITS, HAS_RBIAS,
                              SPLIT_GROUP)
    # Choice 0 holds the row's largest logit: every gate is exp(l_j - l_0) / sum (1 for top-1, NaN
    # where l_0 is inf, as the softmax gives). Two passes of the (cheap) selection: the first sums
    # the kept exponentials, the second writes; nothing is read back from memory.
    top = tl.max(work, axis=1)
    denom = tl.zeros((BLOCK_T,), dtype=tl.float32)
    scan = work
    for _ in tl.static_range(TOP_K):
        row_max, _, scan = _next_choice(scan, offs_k, BLOCK_K)
        denom += tl.exp(row_max - top)
    for j in tl.static_range(TOP_K):
        row_max, first, work = _next_choice(work, offs_k, BLOCK_K)
        tl.store(ids_ptr + j * T + offs_t, first, mask=t_mask)
        tl.store(gates_ptr + j * T + offs_t, tl.exp(row_max - top) / denom, mask=t_mask)


# Logits per program of the selection kernel (rows x adapters): 16 rows at K = 64. route_select (the
# logits' product and this kernel) from a CUDA graph on an H200, grouped-plan-sweep-1453a14-*.json:
# T = 8192, K = 64 35.1 us at 1024 logits against 39.6 at 4096; T = 2048 16.5 against 20.4.
SELECT_ELEMS = 1024


def route_select(
    x: torch.Tensor,
    router: torch.Tensor,
    top_k: int,
    temperature: float = 1.0,
    abs_logits: bool = True,
    router_bias: Optional[torch.Tensor] = None,
    check: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Each row's top_k adapters and gates, for the grouped schedule (rows then grouped by adapter).

    x: (T, d_in); router: (K, d_in) in x's dtype; router_bias: (K,) float32 or None. Returns ids
    (top_k, T) int32 (row j: every row's j-th largest logit's adapter) and gates (top_k, T) float32
    (the softmax over each row's kept logits / temperature). The logits are |x router^T| (abs_logits,
    Arrow) or x router^T + router_bias, in float32; one thin GEMM and one selection kernel.
    check=False skips the operand checks (lorafuse.routing's op has made them already)."""
    if check:
        _check_router_args(x, router, top_k, temperature, router_bias, dense_ok=False)
    T, D = x.shape
    K = router.shape[0]
    router_bias = unit_vector(router_bias)
    ids = new_empty((top_k, T), torch.int32, x.device)
    gates = new_empty((top_k, T), torch.float32, x.device)
    if T == 0:
        return ids, gates
    part, splits = _rows_partial(x, router.t(), T, D, K, split_config(T, D, K, x.dtype, x.device))
    block_k = block_for(K)
    block_t = 16 if is_interpreting() else max(16, min(128, SELECT_ELEMS // block_k))
    launch(_route_select_kernel, (cdiv(T, block_t),),
           part, router_bias if router_bias is not None else part, ids, gates,
           T, K, splits, 1.0 / float(temperature),
           part.stride(0), part.stride(1),
           ABS_LOGITS=bool(abs_logits), TOP_K=int(top_k), HAS_RBIAS=router_bias is not None,
           BLOCK_T=block_t, BLOCK_K=block_k, SPLIT_GROUP=split_group(), num_warps=4)
    return ids, gates

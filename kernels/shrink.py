"""Shrink: the thin d_in -> R half of a multi-LoRA layer, with everything that acts on the R-wide row
(per-column scale, the LoraMap R -> m -> R mapping) applied while the row is still on chip.

Forward:  S = x a_cat^T;  [U = S a_map^T;  V = U b_map^T | V = S];  S' = V * scale
Backward: dS' = dY b_cat;  dV = dS' * scale;  [dB_map = dV^T U;  dU = dV b_map;  dA_map = dU^T S;
          dS = dU a_map | dS = dV];  dscale = sum_t dS' * V

x is read once; S' (T x R) is the only intermediate that goes back to memory (the expand reads it).
"""
from __future__ import annotations

from typing import Optional, Tuple

import os

import torch
import triton
import triton.language as tl

from .utils import (AUTOTUNE, block_for, cdiv, check_runnable, dot_precision, expect, is_interpreting, launch,
                    launch_kwargs, new_empty, next_pow2, num_sms, split_range, unit_vector)


# The finishing steps sum their rows' split partials (float32, in split order: deterministic) with
# SPLIT_GROUP loads in flight per step. One load per step (1) waits an L2 round trip per split:
# 5-8 splits in the pointer shrink's finish below 4096 rows at d_in = 4096 (more at a wider d_in),
# up to 16 in the decode layer's shared band.
# shrink-floor-group-42c1bd4-*.json (H200): the shrink 0.3-0.7 us faster at T = 1024-4096, the op at
# T = 256 0.026x lower (split-group-ab-42c1bd4-*.json); the decode layer's shared band not timed. A module setting so
# that bench/shrink_floor.py and bench/decode_ab.py can time the two side by side.
SPLIT_GROUP = 8


def split_group() -> int:
    """SPLIT_GROUP as set now (the kernels of other modules read it at launch)."""
    return SPLIT_GROUP


@triton.jit
def sum_partials(ptrs, n, stride, mask, GROUP: tl.constexpr, CACHE: tl.constexpr):
    """sum over i < n of the float32 block at ptrs + i * stride (masked by mask, None: all of it), in
    order of i; GROUP loads issued per step (the additions keep their order: the same bits). CACHE:
    the loads' cache modifier ("" or ".cg")."""
    acc = tl.zeros(ptrs.shape, dtype=tl.float32)
    for i0 in range(0, n, GROUP):
        for j in tl.static_range(GROUP):
            live = (tl.zeros(ptrs.shape, dtype=tl.int32) + (i0 + j)) < n
            if mask is not None:
                live = live & mask
            acc += tl.load(ptrs + (i0 + j) * stride, mask=live, other=0.0, cache_modifier=CACHE)
    return acc


@triton.jit
def map_and_scale(
    s,
    offs_r,
    scale_ptr,
    a_map_ptr,
    b_map_ptr,
    R,
    M,
    stride_amm,
    stride_amr,
    stride_bmr,
    stride_bmm,
    HAS_MAP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    PREC: tl.constexpr,
):
    """s: (BLOCK_T, BLOCK_R) float32 rows of x a_cat^T.  Returns (u, v, s') where u = s a_map^T
    (BLOCK_T, BLOCK_M), v = u b_map^T (or s without a mapping) and s' = v * scale.

    PREC is "ieee" or "tf32x3", never "tf32": tf32 would round the float32 rows to 10 mantissa
    bits (~1e-3 error). The forward shrink's finishing steps take FINISH_MAP_PREC, the small products
    of the backward and the opt-in persistent layer "ieee", the decode layer "tf32x3"
    (kernels.lora_gemm.MAP_PRECISION)."""
    r_mask = offs_r < R
    scale = tl.load(scale_ptr + offs_r, mask=r_mask, other=0.0).to(tl.float32)
    if HAS_MAP:
        offs_m = tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        # a_map is (m, R) and b_map (R, m): both read transposed.
        am_t = tl.load(a_map_ptr + offs_m[None, :] * stride_amm + offs_r[:, None] * stride_amr,
                       mask=m_mask[None, :] & r_mask[:, None], other=0.0).to(tl.float32)
        bm_t = tl.load(b_map_ptr + offs_r[None, :] * stride_bmr + offs_m[:, None] * stride_bmm,
                       mask=r_mask[None, :] & m_mask[:, None], other=0.0).to(tl.float32)
        u = tl.dot(s, am_t, input_precision=PREC)
        v = tl.dot(u, bm_t, input_precision=PREC)
    else:
        u = s
        v = s
    return u, v, v * scale[None, :]


def _row_configs(inner: str):
    """Candidate configs of the memory-bound row kernels (rows x the reduced dimension)."""
    if is_interpreting():
        return [triton.Config({"BLOCK_T": 32, inner: 64}, num_warps=4)]
    return [
        triton.Config({"BLOCK_T": bt, inner: bd}, num_warps=w, num_stages=s)
        for bt in (16, 32, 64, 128)
        for bd in (64, 128, 256)
        for w in (4, 8)
        for s in (2, 3, 4)
        if not (bt == 128 and bd == 256)
    ]


def row_config(T: int, R: int, inner: str, dtype: torch.dtype) -> triton.Config:
    """Heuristic config for the shrink kernels: R-wide float32 accumulators must fit in registers
    and the (inner x R) operand tile in shared memory; more rows per program when T is large."""
    if is_interpreting():
        return _row_configs(inner)[0]
    br = block_for(R)
    bt = 16 if T <= 1024 else 32 if T <= 4096 else 64
    bt = min(bt, max(16, 4096 // br))
    bd = max(32, min(128 if dtype != torch.float32 else 64, 16384 // br))
    return triton.Config({"BLOCK_T": bt, inner: bd}, num_warps=4, num_stages=3)


@triton.jit
def _shrink_fwd_kernel(
    x_ptr, a_ptr, scale_ptr, a_map_ptr, b_map_ptr,
    sp_ptr, s_ptr, u_ptr,
    T, D, R, M, T_BUCKET,
    stride_xt, stride_xd,
    stride_ar, stride_ad,
    stride_amm, stride_amr,
    stride_bmr, stride_bmm,
    stride_spt, stride_st, stride_ut,
    HAS_MAP: tl.constexpr,
    SAVE: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_r = tl.arange(0, BLOCK_R)
    t_mask = offs_t < T
    r_mask = offs_r < R

    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        x = tl.load(
            x_ptr + offs_t[:, None] * stride_xt + offs_d[None, :] * stride_xd,
            mask=t_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        # a_cat is (R, d_in): read it transposed, (BLOCK_D, BLOCK_R).
        a = tl.load(
            a_ptr + offs_r[None, :] * stride_ar + offs_d[:, None] * stride_ad,
            mask=r_mask[None, :] & d_mask[:, None],
            other=0.0,
        )
        acc = tl.dot(x, a, acc, input_precision=PREC)

    u, v, sp = map_and_scale(
        acc, offs_r, scale_ptr, a_map_ptr, b_map_ptr, R, M,
        stride_amm, stride_amr, stride_bmr, stride_bmm,
        HAS_MAP, BLOCK_M, "ieee",
    )
    tr_mask = t_mask[:, None] & r_mask[None, :]
    tl.store(sp_ptr + offs_t[:, None] * stride_spt + offs_r[None, :],
             sp.to(sp_ptr.dtype.element_ty), mask=tr_mask)
    if SAVE:
        tl.store(s_ptr + offs_t[:, None] * stride_st + offs_r[None, :], acc, mask=tr_mask)
        if HAS_MAP:
            offs_m = tl.arange(0, BLOCK_M)
            tl.store(u_ptr + offs_t[:, None] * stride_ut + offs_m[None, :], u,
                     mask=t_mask[:, None] & (offs_m[None, :] < M))


_shrink_fwd_tuned = triton.autotune(configs=_row_configs("BLOCK_D"),
                                    key=["T_BUCKET", "D", "R", "M", "HAS_MAP", "SAVE"])(_shrink_fwd_kernel)


def alloc_rows(T: int, width: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A (T, width) view of a buffer whose row stride is a multiple of 16 elements: rows start on
    16-byte boundaries (tensor-memory-accelerator rule), and Triton, which specialises integer
    arguments on divisibility by 16, can then vectorise the loads of kernels that read these rows
    (with a stride of 24 the GEMM's low-rank tail ran 27 % slower on an H100 at T = 8192)."""
    padded = cdiv(max(width, 1), 16) * 16
    return new_empty((T, padded), dtype, device)[:, :width]


def t_bucket(T: int) -> int:
    """Autotuning key for the token count: a new power of two re-tunes, other sizes reuse."""
    return next_pow2(max(T, 1))


def _shrink_single(
    x: torch.Tensor,
    a_cat: torch.Tensor,
    scale: torch.Tensor,
    a_map: Optional[torch.Tensor] = None,
    b_map: Optional[torch.Tensor] = None,
    save: bool = False,
    config: Optional[triton.Config] = None,
):
    """x: (T, d_in), a_cat: (R, d_in) in x's dtype, scale: (R,), a_map: (m, R), b_map: (R, m).

    Returns (sp, s, u): sp = S' (T, R) in x's dtype; when save, s = S (T, R) and u = U (T, m) in
    float32 (u is None without a mapping), else both None.
    """
    check_runnable("x", x)
    T, D = x.shape
    R = a_cat.shape[0]
    has_map = a_map is not None
    M = a_map.shape[0] if has_map else 1
    sp = alloc_rows(T, R, x.dtype, x.device)
    s = new_empty((T, R), torch.float32, x.device) if save else sp
    u = new_empty((T, M), torch.float32, x.device) if (save and has_map) else s
    if T == 0:
        return sp, (s if save else None), (u if save and has_map else None)
    am = a_map if has_map else scale
    bm = b_map if has_map else scale
    if AUTOTUNE and config is None:
        kernel, cfg = _shrink_fwd_tuned, {}
        grid = lambda meta: (cdiv(T, meta["BLOCK_T"]),)
    else:
        kernel = _shrink_fwd_kernel
        cfg = launch_kwargs(config or row_config(T, R, "BLOCK_D", x.dtype))
        grid = (cdiv(T, cfg["BLOCK_T"]),)
    launch(
        kernel, grid,
        x, a_cat, scale, am, bm,
        sp, s, u,
        T, D, R, M, t_bucket(T),
        x.stride(0), x.stride(1),
        a_cat.stride(0), a_cat.stride(1),
        am.stride(0) if has_map else 0, am.stride(1) if has_map else 0,
        bm.stride(0) if has_map else 0, bm.stride(1) if has_map else 0,
        sp.stride(0), s.stride(0), u.stride(0),
        HAS_MAP=has_map, SAVE=save, PREC=dot_precision(x.dtype),
        BLOCK_R=block_for(R), BLOCK_M=block_for(M), **cfg,
    )
    return sp, (s if save else None), (u if save and has_map else None)


# ----------------------------------------------------------------------------------------------
# Backward


@triton.jit
def _shrink_bwd_kernel(
    dy_ptr, b_ptr, scale_ptr, a_map_ptr, b_map_ptr, s_ptr, u_ptr,
    ds_ptr, dscale_ptr, da_map_ptr, db_map_ptr,
    T, N, R, M, T_BUCKET,
    stride_dyt, stride_dyn,
    stride_bn, stride_br,
    stride_amm, stride_amr,
    stride_bmr, stride_bmm,
    stride_st, stride_ut, stride_dst,
    HAS_MAP: tl.constexpr,
    NEED_DS: tl.constexpr,
    NEED_DMAP: tl.constexpr,
    NEED_DSCALE: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # A fixed number of programs, each striding over row blocks, so that the partial sums for the
    # reductions over T (dscale, da_map, db_map) have one slot per program whatever BLOCK_T the
    # autotuner picks: deterministic, no atomics.
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    offs_r = tl.arange(0, BLOCK_R)
    offs_m = tl.arange(0, BLOCK_M)
    r_mask = offs_r < R
    m_mask = offs_m < M
    scale = tl.load(scale_ptr + offs_r, mask=r_mask, other=0.0).to(tl.float32)
    if HAS_MAP:
        # a_map (m, R) and b_map (R, m) as stored; both tiny.
        am = tl.load(a_map_ptr + offs_m[:, None] * stride_amm + offs_r[None, :] * stride_amr,
                     mask=m_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)
        bm = tl.load(b_map_ptr + offs_r[:, None] * stride_bmr + offs_m[None, :] * stride_bmm,
                     mask=r_mask[:, None] & m_mask[None, :], other=0.0).to(tl.float32)
    dscale_acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    da_map_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    db_map_acc = tl.zeros((BLOCK_R, BLOCK_M), dtype=tl.float32)

    for tb in range(pid, tl.cdiv(T, BLOCK_T), nprog):
        offs_t = tb * BLOCK_T + tl.arange(0, BLOCK_T)
        t_mask = offs_t < T
        dsp = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < N
            dy = tl.load(dy_ptr + offs_t[:, None] * stride_dyt + offs_n[None, :] * stride_dyn,
                         mask=t_mask[:, None] & n_mask[None, :], other=0.0)
            b = tl.load(b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                        mask=n_mask[:, None] & r_mask[None, :], other=0.0)
            dsp = tl.dot(dy, b, dsp, input_precision=PREC)
        dv = dsp * scale[None, :]
        tr_mask = t_mask[:, None] & r_mask[None, :]
        if HAS_MAP:
            u = tl.load(u_ptr + offs_t[:, None] * stride_ut + offs_m[None, :],
                        mask=t_mask[:, None] & m_mask[None, :], other=0.0)
            if NEED_DSCALE:
                v = tl.dot(u, tl.trans(bm), input_precision="ieee")
                dscale_acc += tl.sum(dsp * v, axis=0)
            du = tl.dot(dv, bm, input_precision="ieee")
            if NEED_DMAP:
                s = tl.load(s_ptr + offs_t[:, None] * stride_st + offs_r[None, :], mask=tr_mask, other=0.0)
                db_map_acc += tl.dot(tl.trans(dv), u, input_precision="ieee")
                da_map_acc += tl.dot(tl.trans(du), s, input_precision="ieee")
            ds = tl.dot(du, am, input_precision="ieee")
        else:
            if NEED_DSCALE:
                s = tl.load(s_ptr + offs_t[:, None] * stride_st + offs_r[None, :], mask=tr_mask, other=0.0)
                dscale_acc += tl.sum(dsp * s, axis=0)
            ds = dv
        if NEED_DS:
            tl.store(ds_ptr + offs_t[:, None] * stride_dst + offs_r[None, :],
                     ds.to(ds_ptr.dtype.element_ty), mask=tr_mask)

    if NEED_DSCALE:
        tl.store(dscale_ptr + pid * R + offs_r, dscale_acc, mask=r_mask)
    if NEED_DMAP:
        tl.store(da_map_ptr + pid * M * R + offs_m[:, None] * R + offs_r[None, :], da_map_acc,
                 mask=m_mask[:, None] & r_mask[None, :])
        tl.store(db_map_ptr + pid * R * M + offs_r[:, None] * M + offs_m[None, :], db_map_acc,
                 mask=r_mask[:, None] & m_mask[None, :])


_shrink_bwd_tuned = triton.autotune(configs=_row_configs("BLOCK_N"),
                                    key=["T_BUCKET", "N", "R", "M", "HAS_MAP", "NEED_DS", "NEED_DMAP",
                                         "NEED_DSCALE"])(_shrink_bwd_kernel)


def _program_totals(*partials):
    """Sum per-program partial gradients (nprog, ...) over programs; None stays None. With one
    program its partials are the result: a view saves a reduction launch per gradient (decoding-
    sized batches)."""
    return tuple(None if p is None else p[0] if p.shape[0] == 1 else p.sum(0) for p in partials)


def _shrink_backward_single(
    dy: torch.Tensor,
    b_cat: torch.Tensor,
    scale: torch.Tensor,
    s: Optional[torch.Tensor],
    u: Optional[torch.Tensor],
    a_map: Optional[torch.Tensor] = None,
    b_map: Optional[torch.Tensor] = None,
    need_ds: bool = True,
    need_dmap: bool = False,
    need_dscale: bool = False,
    config: Optional[triton.Config] = None,
):
    """dy: (T, d_out), b_cat: (d_out, R) in dy's dtype; s: (T, R), u: (T, m) float32 from shrink(save=True).

    Returns (ds, dscale, da_map, db_map): ds = dS (T, R) in dy's dtype (the operand of dx and
    da_cat), dscale (R,), da_map (m, R), db_map (R, m) in float32; each None unless asked for.
    """
    check_runnable("grad_output", dy)
    T, N = dy.shape
    R = b_cat.shape[1]
    has_map = a_map is not None
    M = a_map.shape[0] if has_map else 1
    need_dmap = need_dmap and has_map
    dev = dy.device
    nprog = max(1, min(cdiv(T, 16), 2 * num_sms(dev)))
    ds = alloc_rows(T, R, dy.dtype, dev) if need_ds else None
    dscale_p = new_empty((nprog, R), torch.float32, dev) if need_dscale else None
    da_p = new_empty((nprog, M, R), torch.float32, dev) if need_dmap else None
    db_p = new_empty((nprog, R, M), torch.float32, dev) if need_dmap else None
    if T == 0:
        z = lambda *shape: torch.zeros(shape, dtype=torch.float32, device=dev)
        return (ds, z(R) if need_dscale else None, z(M, R) if need_dmap else None,
                z(R, M) if need_dmap else None)
    dummy = scale
    am = a_map if has_map else dummy
    bm = b_map if has_map else dummy
    s_ = s if s is not None else dummy
    u_ = u if u is not None else dummy
    tuned = AUTOTUNE and config is None
    kernel = _shrink_bwd_tuned if tuned else _shrink_bwd_kernel
    cfg = {} if tuned else launch_kwargs(config or row_config(T, R, "BLOCK_N", dy.dtype))
    launch(
        kernel, (nprog,),
        dy, b_cat, scale, am, bm, s_, u_,
        ds if need_ds else dummy, dscale_p if need_dscale else dummy,
        da_p if need_dmap else dummy, db_p if need_dmap else dummy,
        T, N, R, M, t_bucket(T),
        dy.stride(0), dy.stride(1),
        b_cat.stride(0), b_cat.stride(1),
        am.stride(0) if has_map else 0, am.stride(1) if has_map else 0,
        bm.stride(0) if has_map else 0, bm.stride(1) if has_map else 0,
        s_.stride(0) if s is not None else 0, u_.stride(0) if u is not None else 0,
        ds.stride(0) if need_ds else 0,
        HAS_MAP=has_map, NEED_DS=need_ds, NEED_DMAP=need_dmap, NEED_DSCALE=need_dscale,
        PREC=dot_precision(dy.dtype), BLOCK_R=block_for(R), BLOCK_M=block_for(M), **cfg,
    )
    return (ds, *_program_totals(dscale_p, da_p, db_p))


# ----------------------------------------------------------------------------------------------
# Split path (the default): the x-read as a grid over (R chunks, d splits, row blocks) writing
# float32 partial sums, then a small finishing kernel that adds the partials and applies the
# mapping and scale in R chunks. Measured on an H100 (bench/results/tune-*.json), the one-kernel
# path above keeps an R-wide float32 block per program: at R = 512 that spills (0.36 ms and worse
# for an 8192 x 4096 x; the base GEMM takes 0.35 ms), and at T = 2048 its 32 row blocks cannot
# pull the memory bandwidth (62 us for 16 MB). Splitting R and d gives every shape enough
# programs with small accumulators, for one extra write and read of T x R float32.

# "split" (default) or "single" (the one-kernel path; LORAFUSE_SHRINK=single selects it).
SHRINK_IMPL = os.environ.get("LORAFUSE_SHRINK", "split")


@triton.jit
def _rows_partial_kernel(
    a_ptr, b_ptr, part_ptr,
    T, K, R, K_PER_SPLIT,
    stride_at, stride_ak, stride_bk, stride_br,
    stride_ps, stride_pt,
    PREC: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """part[split, t, r] = sum over k in the split of a[t, k] * b[k, r] (float32).
    Grid (R chunks, splits, row blocks): the R chunks of one row block run side by side, so their
    repeated reads of the same rows of a come from L2. EVEN_K: K is a multiple of BLOCK_K (split
    ranges always are), so the loads need no mask along K: a mask against the runtime split end
    would keep the compiler from proving the loads aligned and vectorising them."""
    pid_r = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_t = tl.program_id(2)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    t_mask = offs_t < T
    r_mask = offs_r < R
    offs_t_c = tl.where(t_mask, offs_t, 0)
    k_start = pid_s * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + offs_t_c[:, None] * stride_at + offs_k[None, :] * stride_ak
        b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_r[None, :] * stride_br
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs, mask=r_mask[None, :], other=0.0)
        else:
            k_mask = offs_k < k_end
            a = tl.load(a_ptrs, mask=k_mask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC)
    tl.store(part_ptr + pid_s * stride_ps + offs_t[:, None] * stride_pt + offs_r[None, :], acc,
             mask=t_mask[:, None] & r_mask[None, :])


@triton.jit
def _band_finish(acc_s, off_m, scale_ptr, a_map_ptr, b_map_ptr, sp_ptr, s_ptr, u_ptr,
                 T, R, MR, stride_amm, stride_amr, stride_bmr, stride_bmm, stride_spm, stride_sm, stride_um,
                 HAS_MAP: tl.constexpr, SAVE: tl.constexpr, MAP_PREC: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_MR: tl.constexpr):
    """From S (rows off_m .. off_m + BLOCK_M of x a_cat^T, float32): the mapping and the scale, S'
    stored to sp_ptr (and S, U to s_ptr, u_ptr when SAVE)."""
    offs_m = off_m + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    u, v, sp = map_and_scale(acc_s, offs_r, scale_ptr, a_map_ptr, b_map_ptr, R, MR,
                             stride_amm, stride_amr, stride_bmr, stride_bmm, HAS_MAP, BLOCK_MR, MAP_PREC)
    mr_mask = (offs_m < T)[:, None] & (offs_r < R)[None, :]
    tl.store(sp_ptr + offs_m[:, None] * stride_spm + offs_r[None, :], sp.to(sp_ptr.dtype.element_ty), mask=mr_mask)
    if SAVE:
        tl.store(s_ptr + offs_m[:, None] * stride_sm + offs_r[None, :], acc_s, mask=mr_mask)
        if HAS_MAP:
            offs_mr = tl.arange(0, BLOCK_MR)
            tl.store(u_ptr + offs_m[:, None] * stride_um + offs_mr[None, :], u,
                     mask=(offs_m < T)[:, None] & (offs_mr < MR)[None, :])


@triton.jit
def _shrink_block(a_desc, b_desc, off_t, k_lo, k_hi, split, SPLITS, part_ptr, part_rows, count_ptr,
                  scale_ptr, a_map_ptr, b_map_ptr, sp_ptr, s_ptr, u_ptr,
                  T, R, M, stride_amm, stride_amr, stride_bmr, stride_bmm, stride_spt, stride_st, stride_ut,
                  HAS_MAP: tl.constexpr, SAVE: tl.constexpr, PREC: tl.constexpr, MAP_PREC: tl.constexpr,
                  BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
                  STAGES: tl.constexpr, SPLIT_GROUP: tl.constexpr):
    """One work item of the copy-engine shrink: x a_cat^T for rows off_t .. off_t + BLOCK_T over columns
    k_lo .. k_hi of d_in (a_desc: x, b_desc: a_cat, both read by the copy engine; parts past T, d_in
    or R come back as zeros). With one split it finishes the rows itself (_band_finish). Else it
    stores its partial to part_ptr[split] (part_rows rows of BLOCK_R columns per split) and counts
    itself in at count_ptr; the last of the rows' SPLITS items sums the partials in split order
    (deterministic) and finishes. Returns whether this program finished the rows. STAGES: the loop's
    own pipeline depth (None: the launch's num_stages); SPLIT_GROUP: partials loaded per step (sum_partials)."""
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=STAGES):
        acc = tl.dot(a_desc.load([off_t, k0]), b_desc.load([0, k0]).T, acc, input_precision=PREC)
    done = SPLITS == 1
    if not done:
        part = part_ptr + (off_t + tl.arange(0, BLOCK_T))[:, None] * BLOCK_R + tl.arange(0, BLOCK_R)[None, :]
        tl.store(part + split * part_rows * BLOCK_R, acc)
        tl.debug_barrier()  # every thread's partial stored before this program counts itself in
        done = tl.atomic_add(count_ptr, 1, sem="acq_rel") == SPLITS - 1
        if done:
            # ".cg": other programs' partials, from L2
            acc = sum_partials(part, SPLITS, part_rows * BLOCK_R, None, SPLIT_GROUP, ".cg")
    if done:
        _band_finish(acc, off_t, scale_ptr, a_map_ptr, b_map_ptr, sp_ptr, s_ptr, u_ptr,
                     T, R, M, stride_amm, stride_amr, stride_bmr, stride_bmm, stride_spt, stride_st, stride_ut,
                     HAS_MAP, SAVE, MAP_PREC, BLOCK_T, BLOCK_R, BLOCK_M)
    return done


@triton.jit
def _shrink_tma_kernel(
    a_desc, b_desc, part_ptr, count_ptr, scale_ptr, a_map_ptr, b_map_ptr, sp_ptr, s_ptr, u_ptr,
    T, K, R, M, K_PER_SPLIT, SPLITS,
    stride_amm, stride_amr, stride_bmr, stride_bmm,
    stride_spt, stride_st, stride_ut,
    HAS_MAP: tl.constexpr,
    SAVE: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    SPLIT_GROUP: tl.constexpr,
    MAP_PREC: tl.constexpr = "ieee",
):
    """The whole forward shrink in one launch (Hopper): grid (splits of K, row blocks), each program
    one _shrink_block (its row block's count at count_ptr[block]); the program that finishes a row
    block writes S' (and S, U when SAVE)."""
    pid_s = tl.program_id(0)
    pid_t = tl.program_id(1)
    k_start = pid_s * K_PER_SPLIT
    _shrink_block(a_desc, b_desc, pid_t * BLOCK_T, k_start, tl.minimum(k_start + K_PER_SPLIT, K), pid_s, SPLITS,
                  part_ptr, tl.num_programs(1) * BLOCK_T, count_ptr + pid_t, scale_ptr, a_map_ptr, b_map_ptr,
                  sp_ptr, s_ptr, u_ptr, T, R, M, stride_amm, stride_amr, stride_bmr, stride_bmm,
                  stride_spt, stride_st, stride_ut, HAS_MAP, SAVE, PREC, MAP_PREC, BLOCK_T, BLOCK_K, BLOCK_R, BLOCK_M,
                  None, SPLIT_GROUP)


@triton.jit
def _sum_splits(part_ptr, n_splits, stride_ps, stride_pt, offs_t, offs_r, mask, GROUP: tl.constexpr):
    """Rows offs_t, columns offs_r of the sum of part_ptr's n_splits partials (stride_ps apart)."""
    return sum_partials(part_ptr + offs_t[:, None] * stride_pt + offs_r[None, :], n_splits, stride_ps, mask, GROUP, "")


@triton.jit
def _shrink_finish_kernel(
    part_ptr, scale_ptr, a_map_ptr, b_map_ptr, sp_ptr, s_ptr, u_ptr,
    T, R, M, n_splits,
    stride_ps, stride_pt,
    stride_amm, stride_amr, stride_bmr, stride_bmm,
    stride_spt, stride_st, stride_ut,
    HAS_MAP: tl.constexpr,
    SAVE_S: tl.constexpr,
    SAVE_U: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    SPLIT_GROUP: tl.constexpr,
    MAP_PREC: tl.constexpr = "ieee",
):
    """S = sum of the partials; [U = S a_map^T; V = U b_map^T | V = S]; S' = V * scale, R in chunks."""
    pid = tl.program_id(0)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = offs_t < T
    offs_m = tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    u = tl.zeros((BLOCK_T, BLOCK_M), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_mask = offs_r < R
        tr_mask = t_mask[:, None] & r_mask[None, :]
        s = _sum_splits(part_ptr, n_splits, stride_ps, stride_pt, offs_t, offs_r, tr_mask, SPLIT_GROUP)
        if SAVE_S:
            tl.store(s_ptr + offs_t[:, None] * stride_st + offs_r[None, :], s, mask=tr_mask)
        if HAS_MAP:
            am_t = tl.load(a_map_ptr + offs_m[None, :] * stride_amm + offs_r[:, None] * stride_amr,
                           mask=m_mask[None, :] & r_mask[:, None], other=0.0).to(tl.float32)
            u = tl.dot(s, am_t, u, input_precision=MAP_PREC)
        else:
            scale = tl.load(scale_ptr + offs_r, mask=r_mask, other=0.0).to(tl.float32)
            tl.store(sp_ptr + offs_t[:, None] * stride_spt + offs_r[None, :],
                     (s * scale[None, :]).to(sp_ptr.dtype.element_ty), mask=tr_mask)
    if HAS_MAP:
        if SAVE_U:
            tl.store(u_ptr + offs_t[:, None] * stride_ut + offs_m[None, :], u,
                     mask=t_mask[:, None] & m_mask[None, :])
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_mask = offs_r < R
            bm_t = tl.load(b_map_ptr + offs_r[None, :] * stride_bmr + offs_m[:, None] * stride_bmm,
                           mask=r_mask[None, :] & m_mask[:, None], other=0.0).to(tl.float32)
            v = tl.dot(u, bm_t, input_precision=MAP_PREC)
            scale = tl.load(scale_ptr + offs_r, mask=r_mask, other=0.0).to(tl.float32)
            tl.store(sp_ptr + offs_t[:, None] * stride_spt + offs_r[None, :],
                     (v * scale[None, :]).to(sp_ptr.dtype.element_ty), mask=t_mask[:, None] & r_mask[None, :])


@triton.jit
def _shrink_bwd_finish_kernel(
    part_ptr, scale_ptr, a_map_ptr, b_map_ptr, s_ptr, u_ptr,
    ds_ptr, dscale_ptr, da_map_ptr, db_map_ptr,
    T, R, M, n_splits,
    stride_ps, stride_pt,
    stride_amm, stride_amr, stride_bmr, stride_bmm,
    stride_st, stride_ut, stride_dst,
    HAS_MAP: tl.constexpr,
    NEED_DS: tl.constexpr,
    NEED_DMAP: tl.constexpr,
    NEED_DSCALE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    SPLIT_GROUP: tl.constexpr,
    MAP_PREC: tl.constexpr = "ieee",
):
    """From dS' (the summed partials of dY b_cat): dV = dS' * scale; [dB_map = dV^T U; dU = dV b_map;
    dA_map = dU^T S; dS = dU a_map | dS = dV]; dscale = sum_t dS' * V. The reductions over T are
    written per program (one slot each) and summed by the caller."""
    pid = tl.program_id(0)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = offs_t < T
    offs_m = tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    if HAS_MAP:
        u = tl.load(u_ptr + offs_t[:, None] * stride_ut + offs_m[None, :], mask=t_mask[:, None] & m_mask[None, :],
                    other=0.0)
    du = tl.zeros((BLOCK_T, BLOCK_M), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_mask = offs_r < R
        tr_mask = t_mask[:, None] & r_mask[None, :]
        dsp = _sum_splits(part_ptr, n_splits, stride_ps, stride_pt, offs_t, offs_r, tr_mask, SPLIT_GROUP)
        scale = tl.load(scale_ptr + offs_r, mask=r_mask, other=0.0).to(tl.float32)
        dv = dsp * scale[None, :]
        if HAS_MAP:
            # b_map rows of this chunk, (BLOCK_R, BLOCK_M).
            bm = tl.load(b_map_ptr + offs_r[:, None] * stride_bmr + offs_m[None, :] * stride_bmm,
                         mask=r_mask[:, None] & m_mask[None, :], other=0.0).to(tl.float32)
            if NEED_DSCALE:
                v = tl.dot(u, tl.trans(bm), input_precision=MAP_PREC)
                tl.store(dscale_ptr + pid * R + offs_r, tl.sum(dsp * v, axis=0), mask=r_mask)
            du = tl.dot(dv, bm, du, input_precision=MAP_PREC)
            if NEED_DMAP:
                tl.store(db_map_ptr + pid * R * M + offs_r[:, None] * M + offs_m[None, :],
                         tl.dot(tl.trans(dv), u, input_precision=MAP_PREC), mask=r_mask[:, None] & m_mask[None, :])
        else:
            if NEED_DSCALE:
                s = tl.load(s_ptr + offs_t[:, None] * stride_st + offs_r[None, :], mask=tr_mask, other=0.0)
                tl.store(dscale_ptr + pid * R + offs_r, tl.sum(dsp * s, axis=0), mask=r_mask)
            if NEED_DS:
                tl.store(ds_ptr + offs_t[:, None] * stride_dst + offs_r[None, :], dv.to(ds_ptr.dtype.element_ty),
                         mask=tr_mask)
    if HAS_MAP:
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_mask = offs_r < R
            tr_mask = t_mask[:, None] & r_mask[None, :]
            am = tl.load(a_map_ptr + offs_m[:, None] * stride_amm + offs_r[None, :] * stride_amr,
                         mask=m_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)
            if NEED_DS:
                ds = tl.dot(du, am, input_precision=MAP_PREC)
                tl.store(ds_ptr + offs_t[:, None] * stride_dst + offs_r[None, :], ds.to(ds_ptr.dtype.element_ty),
                         mask=tr_mask)
            if NEED_DMAP:
                s = tl.load(s_ptr + offs_t[:, None] * stride_st + offs_r[None, :], mask=tr_mask, other=0.0)
                tl.store(da_map_ptr + pid * M * R + offs_m[:, None] * R + offs_r[None, :],
                         tl.dot(tl.trans(du), s, input_precision=MAP_PREC), mask=m_mask[:, None] & r_mask[None, :])


def split_config(T: int, K: int, R: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Launch shape of the partial kernel: R chunks of at most 128 columns, enough programs
    (splits of K) to fill the GPU twice over, rows per program growing with T."""
    if is_interpreting():
        # Small blocks so that the CPU tests exercise several R chunks and K splits.
        br = min(block_for(R), 32)
        bk = 32
        splits = 2 if K > 2 * bk else 1
        return {"BLOCK_T": 16, "BLOCK_K": bk, "BLOCK_R": br, "SPLITS": splits, "num_warps": 4, "num_stages": 1}
    br = min(block_for(R), 128)
    bt = 16 if T <= 256 else 32 if T <= 4096 else 64
    # The one-kernel sweep's winners read 256 columns of x per step (32 or 64 rows, 3 stages).
    bk = 256 if (dtype != torch.float32 and br <= 64) else 128 if dtype != torch.float32 else 64
    programs = cdiv(R, br) * cdiv(T, bt)
    splits = max(1, min(cdiv(2 * num_sms(device), programs), K // 512))
    return {"BLOCK_T": bt, "BLOCK_K": bk, "BLOCK_R": br, "SPLITS": splits, "num_warps": 4, "num_stages": 3}


# Rows per program of the forward finishing kernel (FINISH_BLOCK_T; the backward's by bwd_finish_rows
# below, the routed layer's kernels.routing.ROUTED_FINISH_BLOCK_T), and the precision
# of the forward finishing step's two small mapping products, in the finishing kernel and in the
# copy-engine shrink's last program per row block ("ieee" or "tf32x3": never "tf32", see
# map_and_scale). Module settings so that bench/shrink_floor.py can time the other values (H200, bf16,
# d = 4096, R = 48, m = 16, from graphs, 4 rounds; bench/NOTES.md, entries 31-33). tf32x3 (three
# tensor-core products, the decode layer's choice; error near float32's) against "ieee" (FMA):
# the finishing kernel alone 9.8 against 12.2 us at T = 1024, the op 1.316x against 1.353x the base
# GEMM (shrink-floor-finish-73c344e-*.json). 16 rows per program against 32 (the kernel's R in
# chunks of 64): the finishing kernel 7.5 against 8.6 us at T = 1024, the op 1.278x against 1.295x;
# at T = 2048 7.5 against 8.2 us, the op 1.206x against 1.204x (shrink-floor-finish-bt16-5615a8b-*.json).
# The backward's finishing kernel: rows per program by bwd_finish_rows unless BWD_FINISH_BLOCK_T
# fixes them; its five small products in BWD_FINISH_MAP_PREC ("ieee": tf32x3 took 0.1-0.7 us off
# at T = 1024-8192 at 32 rows, and at 16 rows nothing at T = 1024 and 0.5-0.7 us more at 2048 and
# 8192; shrink-floor-bwd-bd1150a-*.json).
FINISH_BLOCK_T = 16
BWD_FINISH_BLOCK_T: Optional[int] = None
FINISH_MAP_PREC = "tf32x3"
BWD_FINISH_MAP_PREC = "ieee"


def bwd_finish_rows(T: int) -> int:
    """Rows per program of the backward's finishing kernel (BWD_FINISH_BLOCK_T where set). H200, bf16,
    d = 4096, R = 48, m = 16, shrink_backward with the mapping's gradients, from graphs, 4 rounds
    within 1.4 us each (shrink-floor-bwd-rows-2101f95-*.json), us at 16 / 32 / 64 / 128 rows:
    T = 512 23.9 / 23.4 / 24.3 / 52.4; 1024 24.8 / 27.4 / 27.2 / 54.6; 2048 30.2 / 28.4 / 32.8 / 58.1;
    4096 47.1 / 43.1 / 44.2 / 71.6; 8192 61.3 / 53.2 / 50.5 / 75.1; 16384 80.0 / 83.8 / 75.2 / 96.2.
    The rule against 32 rows everywhere, again (shrink-floor-bwd-confirm-611d980-*.json): T = 1024
    24.2 / 27.0, 8192 51.1 / 53.3, 16384 75.9 / 83.4. Below 1024 rows 16 and 32 are within 0.5 us."""
    if BWD_FINISH_BLOCK_T is not None:
        return BWD_FINISH_BLOCK_T
    return 16 if T <= 1024 else 32 if T < 8192 else 64


# The forward shrink runs as one copy-engine kernel on Hopper (_shrink_tma_kernel) where the operands
# allow it (16-bit, 16-byte aligned rows, R <= TMA_MAX_R): from TMA_MIN_T rows, and from
# TMA_MIN_T_WIDE rows where d_in >= TMA_WIDE_D_IN. shrink-sweep-e6783b1-*.json (H100, direct calls):
# from T = 8192 0-25 % less time than the pointer kernel and its finishing kernel. On an H200, each
# call replayed from a CUDA graph (shrink-sweep-9caa80f-*.json, bf16, R = 48), copy engine against
# pointer kernels: d_in = 14336 T = 2048 0.036 / 0.047 ms, T = 4096 0.050 / 0.070; d_in = 4096
# T = 2048 0.020 / 0.020, T = 4096 0.025 / 0.032. Through the op (shrink-table-ab-b480b50-*.json,
# interleaved rounds, that sweep's fastest shapes from 2048 rows) only the wide layer's gain held
# (14336 x 4096 from a graph: 1.150x -> 1.128x at T = 2048, 1.166x -> 1.124x at 4096); at
# d_in = 4096 the cells moved within the run's noise, and eagerly the copy-engine path's extra host
# work (descriptors, the counters' memset) cost up to 0.1x at T = 2048.
# Timed again beside a bare read of x (shrink-floor-fe577d9-*.json, 4 interleaved rounds, d_in = 4096):
# at T = 4096 the copy engine took 25.4 us against 31.9 us for the pointer kernels (whose finishing
# launch is 7 us of it), at T = 2048 20.4 against 20.5: TMA_MIN_T 8192 -> 4096.
# LORAFUSE_SHRINK_TMA=0 keeps the pointer kernels everywhere.
SHRINK_TMA = os.environ.get("LORAFUSE_SHRINK_TMA", "1") == "1"
TMA_MIN_T = 4096
TMA_MIN_T_WIDE = 2048
TMA_WIDE_D_IN = 8192
TMA_MAX_R = 128
TMA_SMEM = 220 * 1024  # shared memory the copy-engine shrink's pipeline may take (H100/H200: 227 KB)


# From this total rank R the forward shrink's product x a_cat^T runs on cuBLAS (float32 out, then the
# finishing kernel applies the mapping and the scale): above TMA_MAX_R the pointer kernels read x once
# per 128-column chunk of R. The K x r grid (kernels-grid-ec6878e-*.json) had the layer at 1.55-1.59x
# the base GEMM for R = 512 on 4096 x 4096 (T >= 8192), slower than torch.compile's 1.46-1.50x. Through
# the op (shrink-cublas-ab-b9000da-*.json, H200, LoraMap, bf16, from a CUDA graph, 3 interleaved rounds)
# cuBLAS was faster in all 12 cells at R = 192 and 512: R = 512, T = 8192 1.58x -> 1.45x (4096 x 4096),
# 1.29x -> 1.23x, 1.33x -> 1.23x (the 14336-wide shapes); R = 192 1.31x -> 1.21x, 1.17x -> 1.12x,
# 1.16x -> 1.11x; at T = 2048 by 0.10-0.30x. That run timed the variants in a fixed order, which
# favoured the second (cuBLAS) by 3-13 %; timed again with the order swapped every other round
# (shrink-cublas-ab-eeeaae3-*.json): R = 512, T = 8192 1.59x -> 1.51x and 1.29x -> 1.24x, R = 192
# 1.29x -> 1.23x and 1.14x -> 1.10x (4096 x 4096, 4096 x 14336): smaller, still faster in every cell.
# At R = 48 the two were within the run's noise
# (shrink-cublas-ab-r48-*.json, -0.03 to +0.01x), so up to TMA_MAX_R the Triton kernels stay.
# 16-bit inputs only (float32 would meet cuBLAS's TF32 setting). LORAFUSE_SHRINK_CUBLAS_MIN_R=0 turns it off.
try:
    SHRINK_CUBLAS_MIN_R = int(os.environ.get("LORAFUSE_SHRINK_CUBLAS_MIN_R", "129"))
except ValueError:
    raise ValueError("LORAFUSE_SHRINK_CUBLAS_MIN_R must be an integer rank (0 turns the cuBLAS shrink off), got "
                     f"{os.environ['LORAFUSE_SHRINK_CUBLAS_MIN_R']!r}") from None
_MM_OUT_DTYPE: Optional[bool] = None  # whether this torch has mm(..., out_dtype=float32) on CUDA


def _mm_f32(x: torch.Tensor, a_cat: torch.Tensor) -> Optional[torch.Tensor]:
    """x a_cat^T in float32 from 16-bit operands, or None where this torch cannot on x's device."""
    global _MM_OUT_DTYPE
    if not x.is_cuda:
        return torch.mm(x.float(), a_cat.float().t())  # the interpreter's tests; products exact in float32
    if _MM_OUT_DTYPE is False:
        return None
    try:
        out = torch.mm(x, a_cat.t(), out_dtype=torch.float32)
    except (TypeError, RuntimeError, NotImplementedError):
        _MM_OUT_DTYPE = False
        return None
    _MM_OUT_DTYPE = True
    return out


def shrink_uses_cublas(x: torch.Tensor, a_cat: torch.Tensor) -> bool:
    """Whether shrink(x, a_cat, ...) takes x a_cat^T from cuBLAS: x (T, d_in), a_cat (R, d_in)."""
    return (SHRINK_CUBLAS_MIN_R > 0 and a_cat.shape[0] >= SHRINK_CUBLAS_MIN_R and x.dtype != torch.float32
            and _MM_OUT_DTYPE is not False)


# From BWD_CUBLAS_MIN_T rows (BWD_CUBLAS_MIN_T_WIDE where d_out >= BWD_CUBLAS_WIDE) the backward's
# partial product dY b_cat runs on cuBLAS (float32 out, one partial, then the finishing kernel); 0
# turns it off. H200, bf16, R = 48, m = 16, shrink_backward with the mapping's gradients, from graphs,
# 4 rounds in alternating order (shrink-floor-bwd-cublas-ef1c1fb-d*-*.json), us, Triton / cuBLAS partial:
# d_out = 4096, T = 512 23.6 / 24.5, 1024 24.3 / 24.0, 2048 28.8 / 29.1, 4096 43.5 / 35.6,
# 8192 50.6 / 47.8, 16384 76.4 / 71.9; d_out = 14336, T = 2048 57.5 / 43.6, 8192 95.2 / 93.6.
BWD_CUBLAS_MIN_T = 4096
BWD_CUBLAS_MIN_T_WIDE = 2048
BWD_CUBLAS_WIDE = 8192


def bwd_partial_uses_cublas(dy: torch.Tensor, b_cat: torch.Tensor) -> bool:
    """Whether shrink_backward takes dY b_cat from cuBLAS: dy (T, d_out), b_cat (d_out, R)."""
    min_t = BWD_CUBLAS_MIN_T_WIDE if dy.shape[1] >= BWD_CUBLAS_WIDE else BWD_CUBLAS_MIN_T
    return (BWD_CUBLAS_MIN_T > 0 and dy.shape[0] >= min_t and dy.dtype != torch.float32
            and _MM_OUT_DTYPE is not False)


def shrink_uses_tma(x: torch.Tensor, a_cat: torch.Tensor) -> bool:
    """Whether shrink(x, a_cat, ...) runs the copy-engine kernel: x (T, d_in), a_cat (R, d_in)."""
    min_t = min(TMA_MIN_T, TMA_MIN_T_WIDE) if x.shape[1] >= TMA_WIDE_D_IN else TMA_MIN_T
    if not (SHRINK_TMA and x.is_cuda and x.dtype != torch.float32 and x.shape[0] >= min_t
            and a_cat.shape[0] <= TMA_MAX_R and x.stride(1) == 1 and a_cat.stride(1) == 1):
        return False
    from .lora_gemm import _tma_available, _tma_compatible

    return _tma_available(x.device) and _tma_compatible(x, a_cat)


def tma_shrink_config(T: int, K: int, R: int, sms: int) -> dict:
    """Launch shape of the copy-engine shrink: 64 rows x 128 columns of x per step, 4 warps, 4
    stages, about one program per two SMs (shrink-sweep-e6783b1-*.json: the most frequent winner of
    the 12 shapes; one program per SM and 128-row blocks were slower, 128 x 128 tiles with R = 128
    did not fit in shared memory). The H200 sweep (shrink-sweep-9caa80f-*.json) found shapes up to
    10 % faster alone (6 stages; 128-row blocks at T = 16384), which through the op were not
    (shrink-table-ab-b480b50-*.json: within noise or up to 0.02x slower)."""
    bt, bk = 64, 128
    splits = max(1, min(cdiv(sms, 2 * cdiv(T, bt)), K // (4 * bk)))
    return {"BLOCK_T": bt, "BLOCK_K": bk, "BLOCK_R": block_for(R), "SPLITS": splits, "num_warps": 4,
            "num_stages": 4, "TMA": True}


def _shrink_tma(x, a_cat, scale, a_map, b_map, sp, s, u, cfg) -> None:
    """The forward shrink in one launch (_shrink_tma_kernel) into sp (and s, u when given)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    T, K = x.shape
    R = a_cat.shape[0]
    bt, bk, br = cfg["BLOCK_T"], cfg["BLOCK_K"], cfg["BLOCK_R"]
    k_per, splits = split_range(K, cfg["SPLITS"], bk)
    blocks = cdiv(T, bt)
    if splits > 1:
        part = torch.empty((splits, blocks * bt, br), dtype=torch.float32, device=x.device)
        count = torch.zeros(blocks, dtype=torch.int32, device=x.device)
    else:  # unused by the kernel with one split; typed as the kernel expects
        part = torch.empty(1, dtype=torch.float32, device=x.device)
        count = torch.empty(1, dtype=torch.int32, device=x.device)
    has_map = a_map is not None
    M = a_map.shape[0] if has_map else 1
    am = a_map if has_map else scale
    bm = b_map if has_map else scale
    s_ = s if s is not None else sp
    u_ = u if u is not None else sp
    launch(
        _shrink_tma_kernel, (splits, blocks),
        TensorDescriptor(x, [T, K], [x.stride(0), 1], [bt, bk]),
        TensorDescriptor(a_cat, [R, K], [a_cat.stride(0), 1], [br, bk]),
        part, count, scale, am, bm, sp, s_, u_,
        T, K, R, M, k_per, splits,
        am.stride(0) if has_map else 0, am.stride(1) if has_map else 0,
        bm.stride(0) if has_map else 0, bm.stride(1) if has_map else 0,
        sp.stride(0), s_.stride(0), u_.stride(0),
        HAS_MAP=has_map, SAVE=s is not None, PREC=dot_precision(x.dtype), BLOCK_T=bt, BLOCK_K=bk, BLOCK_R=br,
        BLOCK_M=block_for(M), SPLIT_GROUP=SPLIT_GROUP, MAP_PREC=FINISH_MAP_PREC, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )


def _rows_partial(a, b, T, K, R, cfg, part=None):
    """float32 partial sums of a @ b over cfg["SPLITS"] ranges of K: (splits, T, R)."""
    k_per, splits = split_range(K, cfg["SPLITS"], cfg["BLOCK_K"])  # K = 0: an empty d_in or d_out
    if part is None:
        part = new_empty((splits, T, R), torch.float32, a.device)
    grid = (cdiv(R, cfg["BLOCK_R"]), splits, cdiv(T, cfg["BLOCK_T"]))
    launch(
        _rows_partial_kernel, grid,
        a, b, part, T, K, R, k_per,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        part.stride(0) if part.dim() == 3 else 0, part.stride(-2),
        PREC=dot_precision(a.dtype), BLOCK_T=cfg["BLOCK_T"], BLOCK_K=cfg["BLOCK_K"], BLOCK_R=cfg["BLOCK_R"],
        EVEN_K=K % cfg["BLOCK_K"] == 0, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return part, splits


def _check_map(a_map, b_map, R: int, dev: torch.device) -> None:
    if (a_map is None) != (b_map is None):
        raise ValueError("a_map and b_map must be given together (LoraMap needs both)")
    if a_map is not None:
        expect("a_map", a_map, (None, R), dev)
        expect("b_map", b_map, (R, a_map.shape[0]), dev)


def check_shrink_operands(x, a_cat, scale, a_map, b_map) -> torch.Tensor:
    """The launchers' own checks (they are public: the op checks before them, other callers may
    not): shapes, dtypes and devices named by argument. Returns scale as a unit-stride vector."""
    check_runnable("x", x)
    if x.dim() != 2:
        raise ValueError(f"x must have shape (T, d_in), got {tuple(x.shape)}")
    dev = x.device
    expect("a_cat", a_cat, (None, x.shape[1]), dev, x.dtype)
    R = a_cat.shape[0]
    expect("scale", scale, (R,), dev)
    _check_map(a_map, b_map, R, dev)
    return unit_vector(scale)


def shrink(
    x: torch.Tensor,
    a_cat: torch.Tensor,
    scale: torch.Tensor,
    a_map: Optional[torch.Tensor] = None,
    b_map: Optional[torch.Tensor] = None,
    save: bool = False,
    config: Optional[dict] = None,
    check: bool = True,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """x: (T, d_in), a_cat: (R, d_in) in x's dtype, scale: (R,), a_map: (m, R), b_map: (R, m).

    Returns (sp, s, u): sp = S' (T, R) in x's dtype; when save, s = S (T, R) and u = U (T, m) in
    float32 (u is None without a mapping), else both None. config: the partial kernel's launch
    shape (split_config's keys), for tuning. check=False skips the operand checks, for callers
    that have made them already (lorafuse.lora_linear: a few microseconds per small call).
    """
    if check:
        scale = check_shrink_operands(x, a_cat, scale, a_map, b_map)
    if SHRINK_IMPL == "single":
        return _shrink_single(x, a_cat, scale, a_map, b_map, save=save)
    T, D = x.shape
    R = a_cat.shape[0]
    has_map = a_map is not None
    M = a_map.shape[0] if has_map else 1
    sp = alloc_rows(T, R, x.dtype, x.device)
    u = new_empty((T, M), torch.float32, x.device) if (save and has_map) else None
    part = _mm_f32(x, a_cat) if (T > 0 and config is None and shrink_uses_cublas(x, a_cat)) else None
    if part is not None:
        splits = 1
        s = part if save else None  # S itself: the finishing kernel need not copy it
    else:
        s = new_empty((T, R), torch.float32, x.device) if save else None
        if T == 0:
            return sp, s, u
        if config is not None:
            cfg = config
        elif shrink_uses_tma(x, a_cat):
            cfg = tma_shrink_config(T, D, R, num_sms(x.device))
        else:
            cfg = split_config(T, D, R, x.dtype, x.device)
        if cfg.get("TMA"):
            _shrink_tma(x, a_cat, scale, a_map, b_map, sp, s, u, cfg)
            return sp, s, u
        # With one split the partial sums are S itself: write them straight into the saved buffer.
        part, splits = _rows_partial(x, a_cat.t(), T, D, R, cfg,
                                     part=s if (save and cfg["SPLITS"] == 1) else None)
    finish(part, splits, scale, a_map, b_map, sp, s, u)
    return sp, s, u


def finish(part: torch.Tensor, splits: int, scale: torch.Tensor, a_map: Optional[torch.Tensor],
           b_map: Optional[torch.Tensor], sp: torch.Tensor, s: Optional[torch.Tensor],
           u: Optional[torch.Tensor]) -> None:
    """The shrink's finishing kernel: from part, (splits, T, R) float32 partials of x a_cat^T (or (T, R)
    with one split), S' into sp (T, R), and S into s (T, R) float32 unless s is part itself or None, U
    into u (T, m) float32 when given."""
    T, R = sp.shape
    has_map = a_map is not None
    M = a_map.shape[0] if has_map else 1
    save = s is not None
    dummy = part
    am = a_map if has_map else scale
    bm = b_map if has_map else scale
    block_r = min(block_for(R), 64)
    launch(
        _shrink_finish_kernel, (cdiv(T, FINISH_BLOCK_T),),
        part, scale, am, bm, sp, s if save else dummy, u if u is not None else dummy,
        T, R, M, splits,
        part.stride(0) if part.dim() == 3 else 0, part.stride(-2),
        am.stride(0) if has_map else 0, am.stride(1) if has_map else 0,
        bm.stride(0) if has_map else 0, bm.stride(1) if has_map else 0,
        sp.stride(0), s.stride(0) if save else 0, u.stride(0) if u is not None else 0,
        HAS_MAP=has_map, SAVE_S=save and part is not s, SAVE_U=u is not None,
        BLOCK_T=FINISH_BLOCK_T, BLOCK_R=block_r, BLOCK_M=block_for(M), SPLIT_GROUP=SPLIT_GROUP,
        MAP_PREC=FINISH_MAP_PREC, num_warps=4,
    )


def shrink_backward(
    dy: torch.Tensor,
    b_cat: torch.Tensor,
    scale: torch.Tensor,
    s: Optional[torch.Tensor],
    u: Optional[torch.Tensor],
    a_map: Optional[torch.Tensor] = None,
    b_map: Optional[torch.Tensor] = None,
    need_ds: bool = True,
    need_dmap: bool = False,
    need_dscale: bool = False,
    config: Optional[dict] = None,
    check: bool = True,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """dy: (T, d_out), b_cat: (d_out, R) in dy's dtype; s: (T, R), u: (T, m) float32 from shrink(save=True).

    Returns (ds, dscale, da_map, db_map): ds = dS (T, R) in dy's dtype (the operand of dx and
    da_cat), dscale (R,), da_map (m, R), db_map (R, m) in float32; each None unless asked for.
    """
    if check:
        s, u, scale = _check_backward_operands(dy, b_cat, scale, s, u, a_map, b_map, need_dmap, need_dscale)
    if SHRINK_IMPL == "single":
        return _shrink_backward_single(dy, b_cat, scale, s, u, a_map, b_map, need_ds=need_ds, need_dmap=need_dmap,
                                       need_dscale=need_dscale)
    T, N = dy.shape
    R = b_cat.shape[1]
    has_map = a_map is not None
    M = a_map.shape[0] if has_map else 1
    need_dmap = need_dmap and has_map
    dev = dy.device
    z = lambda *shape: torch.zeros(shape, dtype=torch.float32, device=dev)  # noqa: E731
    ds = alloc_rows(T, R, dy.dtype, dev) if need_ds else None
    if T == 0:
        return (ds, z(R) if need_dscale else None, z(M, R) if need_dmap else None,
                z(R, M) if need_dmap else None)
    return _shrink_backward_split(dy, b_cat, scale, s, u, a_map, b_map, ds, need_ds, need_dmap, need_dscale,
                                  config)


def _check_backward_operands(dy, b_cat, scale, s, u, a_map, b_map, need_dmap, need_dscale):
    """shrink_backward's operand checks; returns (s, u, scale) with unit last strides."""
    check_runnable("grad_output", dy)
    if dy.dim() != 2:
        raise ValueError(f"grad_output must have shape (T, d_out), got {tuple(dy.shape)}")
    T, N = dy.shape
    dev = dy.device
    expect("b_cat", b_cat, (N, None), dev, dy.dtype)
    R = b_cat.shape[1]
    expect("scale", scale, (R,), dev)
    scale = unit_vector(scale)
    _check_map(a_map, b_map, R, dev)
    # The saved rows the requested gradients read (rows indexed with a unit last stride).
    if need_dscale or (need_dmap and a_map is not None):
        expect("s", s, (T, R), dev, torch.float32)
        s = s if s.stride(-1) == 1 else s.contiguous()
    if a_map is not None and (need_dscale or need_dmap):
        expect("u", u, (T, a_map.shape[0]), dev, torch.float32)
        u = u if u.stride(-1) == 1 else u.contiguous()
    return s, u, scale


def _shrink_backward_split(dy, b_cat, scale, s, u, a_map, b_map, ds, need_ds, need_dmap, need_dscale, config):
    """The split grid's backward (T > 0): dy b_cat (cuBLAS where bwd_partial_uses_cublas and no config
    is given, else the Triton partial kernel), then the finishing kernel."""
    T, N = dy.shape
    R = b_cat.shape[1]
    has_map = a_map is not None
    M = a_map.shape[0] if has_map else 1
    dev = dy.device
    part = _mm_f32(dy, b_cat.t()) if (config is None and bwd_partial_uses_cublas(dy, b_cat)) else None
    if part is not None:
        splits = 1
    else:
        cfg = config or split_config(T, N, R, dy.dtype, dev)
        part, splits = _rows_partial(dy, b_cat, T, N, R, cfg)
    block_t = bwd_finish_rows(T)
    nprog = cdiv(T, block_t)
    dscale_p = new_empty((nprog, R), torch.float32, dev) if need_dscale else None
    da_p = new_empty((nprog, M, R), torch.float32, dev) if need_dmap else None
    db_p = new_empty((nprog, R, M), torch.float32, dev) if need_dmap else None
    dummy = part
    am = a_map if has_map else scale
    bm = b_map if has_map else scale
    launch(
        _shrink_bwd_finish_kernel, (nprog,),
        part, scale, am, bm, s if s is not None else dummy, u if u is not None else dummy,
        ds if need_ds else dummy, dscale_p if need_dscale else dummy,
        da_p if need_dmap else dummy, db_p if need_dmap else dummy,
        T, R, M, splits,
        part.stride(0) if part.dim() == 3 else 0, part.stride(-2),
        am.stride(0) if has_map else 0, am.stride(1) if has_map else 0,
        bm.stride(0) if has_map else 0, bm.stride(1) if has_map else 0,
        s.stride(0) if s is not None else 0, u.stride(0) if u is not None else 0,
        ds.stride(0) if need_ds else 0,
        HAS_MAP=has_map, NEED_DS=need_ds, NEED_DMAP=need_dmap, NEED_DSCALE=need_dscale,
        BLOCK_T=block_t, BLOCK_R=min(block_for(R), 64), BLOCK_M=block_for(M),
        SPLIT_GROUP=SPLIT_GROUP, MAP_PREC=BWD_FINISH_MAP_PREC, num_warps=4,
    )
    return (ds, *_program_totals(dscale_p, da_p, db_p))

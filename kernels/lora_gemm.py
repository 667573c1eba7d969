"""lora_gemm: out = a @ b + s @ c (+ bias) in one GEMM, the low-rank expand run as extra K-steps.

Forward of a multi-LoRA layer: a = x (T, d_in), b = W^T, s = S' (T, R) from the shrink, c = b_cat^T.
Backward (dx):                  a = dY (T, d_out), b = W, s = dS (T, R), c = a_cat.

Three kernels:
- `_lora_gemm_kernel`: pointer loads, runs everywhere (and under the interpreter). With FUSE_SHRINK it
  also computes the shrink itself (x a_cat^T, mapping, scale) and applies the expand in the
  epilogue: one launch for the whole layer, for few tokens (memory-bound). Either every column
  block recomputes the shrink alongside its main K loop (R / BLOCK_N extra work), or (SHARED) the
  programs first share it out as work items and each column block waits for its rows' S' by flag
  (decode_shares_shrink says which).
- `_lora_gemm_tma_kernel`: Hopper, persistent grid, tensor-memory-accelerator loads of the two big
  operands; the short low-rank tail uses plain loads.
- `_lora_layer_tma_kernel` (lora_gemm_persistent, opt-in): the whole many-token layer in one
  persistent Hopper launch, the shrink as its first phase and the GEMM tiles waiting for their row
  band's S' by flag. Through the op it measured slower than shrink + lora_gemm at T = 8192
  (bench/NOTES.md, entry 8), so lorafuse.ops uses it only with LORAFUSE_PERSISTENT=1.
"""
from __future__ import annotations

import functools
import os
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from .shrink import (_band_finish, _shrink_block, alloc_rows, check_shrink_operands, map_and_scale, shrink,
                     split_group, sum_partials, t_bucket)
from .utils import (AUTOTUNE, block_for, cdiv, check_runnable, dot_precision, expect, is_interpreting, launch,
                    launch_kwargs, new_empty, next_pow2, num_sms, onchip_rank_limit, split_range, unit_vector)


@triton.jit
def _tile_ids(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    # Grouped order: GROUP_M row blocks share each column block of b while it is in L2.
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = tile_id // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((tile_id % num_pid_in_group) % group_size_m)
    pid_n = (tile_id % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _tail_step(acc, r0, s_ptr, c_ptr, offs_m, offs_n, m_mask, n_mask, R,
               stride_sm, stride_sr, stride_cr, stride_cn,
               PREC: tl.constexpr, BLOCK_K: tl.constexpr, S_CACHE: tl.constexpr):
    offs_r = r0 + tl.arange(0, BLOCK_K)
    r_mask = offs_r < R
    s = tl.load(s_ptr + offs_m[:, None] * stride_sm + offs_r[None, :] * stride_sr,
                mask=m_mask[:, None] & r_mask[None, :], other=0.0, cache_modifier=S_CACHE)
    c = tl.load(c_ptr + offs_r[:, None] * stride_cr + offs_n[None, :] * stride_cn,
                mask=r_mask[:, None] & n_mask[None, :], other=0.0)
    return tl.dot(s, c, acc, input_precision=PREC)


@triton.jit
def _lowrank_tail(acc, s_ptr, c_ptr, offs_m, offs_n, m_mask, n_mask, R,
                  stride_sm, stride_sr, stride_cr, stride_cn,
                  PREC: tl.constexpr, BLOCK_K: tl.constexpr, S_CACHE: tl.constexpr,
                  PIPELINE: tl.constexpr = True):
    """acc += s[offs_m, :R] @ c[:R, offs_n]: the expand as extra K-steps. S_CACHE: the cache
    modifier of s's loads ("" by default; ".cg" where another program of the same launch wrote s).
    PIPELINE=False: a loop the compiler does not software-pipeline (0.1-1 point faster for a one-step
    tail, slower from two steps: bench/results/tail-loop-ab-*.json)."""
    if PIPELINE:
        for r0 in range(0, R, BLOCK_K):
            acc = _tail_step(acc, r0, s_ptr, c_ptr, offs_m, offs_n, m_mask, n_mask, R,
                             stride_sm, stride_sr, stride_cr, stride_cn, PREC, BLOCK_K, S_CACHE)
    else:
        for r0 in tl.range(0, R, BLOCK_K, num_stages=1):
            acc = _tail_step(acc, r0, s_ptr, c_ptr, offs_m, offs_n, m_mask, n_mask, R,
                             stride_sm, stride_sr, stride_cr, stride_cn, PREC, BLOCK_K, S_CACHE)
    return acc


# Precision of the decode layer's float32 mapping products (R -> m -> R): "tf32x3" (three
# tensor-core passes, float32-level error) or "ieee" (FMA). Every program of the decode layer
# computes them in its epilogue, where FMA cost adds to the whole kernel's latency:
# decode-ops-*.json, LoraMap at 4096 x 4096, T = 32 / 64: 1.42x / 1.51x (ieee) -> 1.32x / 1.32x.
MAP_PRECISION = os.environ.get("LORAFUSE_MAP_PRECISION") or "tf32x3"
if MAP_PRECISION not in ("ieee", "tf32x3"):
    raise ValueError(f"LORAFUSE_MAP_PRECISION must be 'ieee' or 'tf32x3', got {MAP_PRECISION!r}")


def _cfg(bm, bn, bk, w, s, **extra):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, **extra}, num_warps=w,
                         num_stages=s)


def gemm_candidates() -> List[triton.Config]:
    """Candidate configs of the pointer kernel (the autotuner's list, and the tuning sweep's)."""
    if is_interpreting():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4)]
    return [_cfg(*c) for c in [
        (128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (256, 128, 64, 8, 3), (128, 128, 64, 4, 4),
        (128, 128, 64, 8, 4), (128, 128, 128, 8, 3), (64, 256, 64, 4, 4), (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 4), (32, 128, 64, 4, 4), (32, 64, 128, 4, 4), (16, 64, 128, 4, 4),
        (16, 128, 128, 4, 4), (16, 32, 256, 4, 4), (16, 64, 256, 4, 3),
    ]]


def _stages(bm, bn, bk, br, esize, budget=200 * 1024, most=4):
    """Software-pipelining depth that keeps the per-stage tiles within shared memory."""
    per_stage = (bm * bk + bk * bn + bk * br) * esize
    return max(1, min(most, budget // max(per_stage, 1)))


def gemm_config(T: int, N: int, K: int, fused: bool = False, R: int = 0,
                dtype: torch.dtype = torch.bfloat16, sms: int = 132, shared: Optional[bool] = None) -> triton.Config:
    """Heuristic config of the pointer kernel, from bench/results/tune-nvidia-h100-*.json and
    decode-sweep-*.json (bf16): big tiles when T is large (tensor-core bound); small row blocks
    when T is small (memory bound on the weight). `sms`: the GPU's SM count; `shared`: whether the
    fused layer shares its shrink (lora_gemm_fused's argument; None: decode_shares_shrink)."""
    if is_interpreting():
        return gemm_candidates()[0]
    if fused:
        # Measured best: T=1..16 (16, 32|64, 256); T=64 (32, 64, 128).
        br = block_for(R)
        if dtype == torch.float32:  # as validated by the GPU suite (no tuning data)
            return _cfg(max(16, min(64, next_pow2(T))), 64, 128 if br <= 64 else 64, 4, 3)
        # One row block, and the narrowest column block that keeps the grid within one wave (one
        # program per SM): a second, partial wave costs a whole program's latency (K loop, then
        # the shrink's epilogue, longer with a mapping) for a few columns. decode-sweep-*.json
        # (R = 48, LoraMap, 4096 x 14336): T = 16 1.52x -> 1.06x the base GEMM with 112 programs
        # instead of 448; T = 64 1.45x -> 1.18x.
        # Up to 6 stages where shared memory allows (decode-stages-*.json, H200, LoraMap: T = 16,
        # 4096 x 4096 1.29x -> 1.16x the base GEMM with 6 instead of 4; 14336 x 4096 1.48x -> 1.33x;
        # T = 64 with 5: 1.41x -> 1.33x, 1.37x -> 1.30x): each program streams a narrow slice of W,
        # so bytes in flight per SM set its speed. The shared shrink keeps no a_cat tile in the main
        # loop, but its work items' loop (x and a_cat tiles) is pipelined with the same depth: both
        # loops must fit.
        bm, bk = min(64, max(16, next_pow2(T))), 128
        rows = cdiv(T, bm)
        bn = next((n for n in (32, 64, 128) if rows * cdiv(N, n) <= sms), 128)
        if shared is None:
            shared = decode_shares_shrink(T, cdiv(N, bn), K, N)
        if shared:
            stages = min(_stages(bm, bn, bk, 0, 2, most=6), _stages(bm, 0, bk, br, 2, most=6))
        else:
            stages = _stages(bm, bn, bk, br, 2, most=6)
        return _cfg(bm, bn, bk, 4, stages)
    if dtype == torch.float32:
        # float32 operands: kept to the configs the GPU suite validated (no tuning data).
        if T >= 1024:
            return _cfg(128, 256, 64, 8, 3)
        if T >= 256:
            return _cfg(128, 128, 64, 8, 4)
        if T >= 64:
            return _cfg(64, 128, 64, 4, 4)
        return _cfg(max(16, next_pow2(T)), 64, 128, 4, 4)
    if T >= 1024:
        return _cfg(128, 256, 64, 8, 4)
    if T >= 256:
        return _cfg(64, 256, 64, 4, 4)
    if T >= 64:
        return _cfg(64, 64, 64, 4, 4)
    return _cfg(16, 32, 256, 4, 4) if T <= 16 else _cfg(32, 64, 128, 4, 4)


@functools.lru_cache(maxsize=4096)
def _table_kwargs(T: int, N: int, K: int, fused: bool, R: int, dtype: torch.dtype, sms: int = 132,
                  shared: Optional[bool] = None) -> dict:
    """gemm_config as launch keyword arguments, kept per shape (read on every launch).
    Callers must not modify the dict."""
    return launch_kwargs(gemm_config(T, N, K, fused=fused, R=R, dtype=dtype, sms=sms, shared=shared))


def _prune(configs, named_args, **kwargs):
    # Few tokens: large row blocks are wasted work. The fused shrink keeps an R-wide block on chip.
    T = named_args["T"]
    out = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, next_pow2(T))]
    if kwargs.get("FUSE_SHRINK", named_args.get("FUSE_SHRINK", False)):
        out = [c for c in out if c.kwargs["BLOCK_M"] <= 64 and c.kwargs["BLOCK_N"] <= 128]
    return out or configs[-1:]


@triton.jit
def _load_rows(ptrs, row_mask, k_mask, EVEN_K: tl.constexpr, MASK_ROWS: tl.constexpr):
    """A (rows, BLOCK_K) tile of x whose rows past T point at row 0 (clamped). MASK_ROWS: those rows
    are masked (read as zeros, no memory request) instead of loading row 0 again."""
    if MASK_ROWS:
        if EVEN_K:
            return tl.load(ptrs, mask=row_mask[:, None], other=0.0)
        return tl.load(ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
    if EVEN_K:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=k_mask[None, :], other=0.0)


@triton.jit
def _shared_shrink_items(a_ptr, al_ptr, scale_ptr, a_map_ptr, b_map_ptr, s_ptr, u_ptr, sp_ptr, flag_ptr, part_ptr,
                         T, K, R, MR, SPLITS, K_PER, num_pid_m,
                         stride_am, stride_ak, stride_alr, stride_alk,
                         stride_amm, stride_amr, stride_bmr, stride_bmm, stride_sm, stride_um, stride_spm,
                         HAS_MAP: tl.constexpr, SAVE: tl.constexpr, PREC: tl.constexpr, MAP_PREC: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_MR: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, MASK_ROWS: tl.constexpr,
                         SPLIT_GROUP: tl.constexpr):
    """The decode layer's shrink computed once per launch instead of in every column block: work
    items (row block, range of K_PER columns of d_in), taken from the counter at
    flag_ptr[2 * num_pid_m] until it runs past the last. An item stores its float32 partial to
    part_ptr[split] and counts itself in at flag_ptr[num_pid_m + band]; the band's last item sums
    the partials in split order (deterministic), applies the mapping and the scale, stores S' (and
    S, U when SAVE) and sets the band's flag (release). Items wait for nothing, and a program leaves
    this loop only once every item is held by a running program, so whoever then waits on a flag
    waits for running programs (as in _lora_layer_tma_kernel)."""
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    part_rows = num_pid_m * BLOCK_M
    item = tl.atomic_add(flag_ptr + 2 * num_pid_m, 1)
    while item < num_pid_m * SPLITS:
        band = item // SPLITS
        split = item % SPLITS
        k_lo = split * K_PER
        k_hi = tl.minimum(k_lo + K_PER, K)
        offs_t = band * BLOCK_M + tl.arange(0, BLOCK_M)
        t_mask = offs_t < T
        offs_t_c = tl.where(t_mask, offs_t, 0)
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            a_ptrs = a_ptr + offs_t_c[:, None] * stride_am + offs_k[None, :] * stride_ak
            a = _load_rows(a_ptrs, t_mask, k_mask, EVEN_K, MASK_ROWS)
            al = tl.load(al_ptr + offs_r[None, :] * stride_alr + offs_k[:, None] * stride_alk,
                         mask=r_mask[None, :] & k_mask[:, None], other=0.0)
            acc = tl.dot(a, al, acc, input_precision=PREC)
        done = SPLITS == 1
        if not done:
            part = part_ptr + (band * BLOCK_M + tl.arange(0, BLOCK_M))[:, None] * BLOCK_R + offs_r[None, :]
            tl.store(part + split * part_rows * BLOCK_R, acc)
            tl.debug_barrier()  # every thread's partial stored before this program counts itself in
            done = tl.atomic_add(flag_ptr + num_pid_m + band, 1, sem="acq_rel") == SPLITS - 1
            if done:
                # ".cg": other programs' partials, from L2
                acc = sum_partials(part, SPLITS, part_rows * BLOCK_R, None, SPLIT_GROUP, ".cg")
        if done:
            _band_finish(acc, band * BLOCK_M, scale_ptr, a_map_ptr, b_map_ptr, sp_ptr, s_ptr, u_ptr,
                         T, R, MR, stride_amm, stride_amr, stride_bmr, stride_bmm, stride_spm, stride_sm, stride_um,
                         HAS_MAP, SAVE, MAP_PREC, BLOCK_M, BLOCK_R, BLOCK_MR)
            tl.debug_barrier()  # every thread's stores issued before the flag is released
            tl.atomic_xchg(flag_ptr + band, 1, sem="release")
        item = tl.atomic_add(flag_ptr + 2 * num_pid_m, 1)


@triton.jit
def _lora_gemm_kernel(
    a_ptr, b_ptr, s_ptr, c_ptr, bias_ptr, out_ptr,
    al_ptr, scale_ptr, a_map_ptr, b_map_ptr, save_s_ptr, save_u_ptr, save_sp_ptr, flag_ptr, part_ptr,
    T, N, K, R, MR, T_BUCKET, SPLITS, K_PER,
    stride_am, stride_ak, stride_bk, stride_bn,
    stride_sm, stride_sr, stride_cr, stride_cn,
    stride_om, stride_on,
    stride_alr, stride_alk,
    stride_amm, stride_amr, stride_bmr, stride_bmm,
    stride_ssm, stride_sum, stride_spm,
    HAS_BIAS: tl.constexpr,
    FUSE_SHRINK: tl.constexpr,
    HAS_MAP: tl.constexpr,
    SAVE: tl.constexpr,
    PREC: tl.constexpr,
    MAP_PREC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_MR: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
    SHARED: tl.constexpr = False,
    TAIL_PIPE: tl.constexpr = True,
    MASK_ROWS: tl.constexpr = False,
    SPLIT_GROUP: tl.constexpr = 8,
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(T, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    if SHARED:  # with FUSE_SHRINK: the shrink once per launch, S' through save_sp_ptr
        _shared_shrink_items(a_ptr, al_ptr, scale_ptr, a_map_ptr, b_map_ptr, save_s_ptr, save_u_ptr, save_sp_ptr,
                             flag_ptr, part_ptr, T, K, R, MR, SPLITS, K_PER, num_pid_m,
                             stride_am, stride_ak, stride_alr, stride_alk,
                             stride_amm, stride_amr, stride_bmr, stride_bmm, stride_ssm, stride_sum, stride_spm,
                             HAS_MAP, SAVE, PREC, MAP_PREC, BLOCK_R, BLOCK_MR, BLOCK_M, BLOCK_K, EVEN_K, MASK_ROWS,
                             SPLIT_GROUP)
    pid_m, pid_n = _tile_ids(pid, num_pid_m, num_pid_n, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < T
    n_mask = offs_n < N
    offs_m_c = tl.where(m_mask, offs_m, 0)
    offs_n_c = tl.where(n_mask, offs_n, 0)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FUSE_SHRINK and not SHARED:
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = offs_r < R
        acc_s = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        # Out-of-range columns (and rows, unless MASK_ROWS) are clamped rather than masked (their
        # results are never stored); a ragged K needs masking, since it feeds the sum.
        k_mask = offs_k < K
        a_ptrs = a_ptr + offs_m_c[:, None] * stride_am + offs_k[None, :] * stride_ak
        b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n_c[None, :] * stride_bn
        a = _load_rows(a_ptrs, m_mask, k_mask, EVEN_K, MASK_ROWS)
        if EVEN_K:
            b = tl.load(b_ptrs)
        else:
            b = tl.load(b_ptrs, mask=k_mask[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC)
        if FUSE_SHRINK and not SHARED:
            al = tl.load(al_ptr + offs_r[None, :] * stride_alr + offs_k[:, None] * stride_alk,
                         mask=r_mask[None, :] & k_mask[:, None], other=0.0)
            acc_s = tl.dot(a, al, acc_s, input_precision=PREC)

    if SHARED:
        ready = tl.atomic_add(flag_ptr + pid_m, 0, sem="acquire")
        while ready != 1:
            ready = tl.atomic_add(flag_ptr + pid_m, 0, sem="acquire")
        tl.debug_barrier()  # S' read only after the flag (thread 0's acquire) is seen by all
        acc = _lowrank_tail(acc, save_sp_ptr, c_ptr, offs_m, offs_n, m_mask, n_mask, R,
                            stride_spm, 1, stride_cr, stride_cn, PREC, BLOCK_K, ".cg", TAIL_PIPE)
    elif FUSE_SHRINK:
        u, v, sp = map_and_scale(acc_s, offs_r, scale_ptr, a_map_ptr, b_map_ptr, R, MR,
                                 stride_amm, stride_amr, stride_bmr, stride_bmm,
                                 HAS_MAP, BLOCK_MR, MAP_PREC)
        sp = sp.to(a_ptr.dtype.element_ty)
        c = tl.load(c_ptr + offs_r[:, None] * stride_cr + offs_n[None, :] * stride_cn,
                    mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(sp, c, acc, input_precision=PREC)
        if SAVE:
            if pid_n == 0:
                mr_mask = m_mask[:, None] & r_mask[None, :]
                tl.store(save_s_ptr + offs_m[:, None] * stride_ssm + offs_r[None, :], acc_s, mask=mr_mask)
                tl.store(save_sp_ptr + offs_m[:, None] * stride_spm + offs_r[None, :], sp, mask=mr_mask)
                if HAS_MAP:
                    offs_mr = tl.arange(0, BLOCK_MR)
                    tl.store(save_u_ptr + offs_m[:, None] * stride_sum + offs_mr[None, :], u,
                             mask=m_mask[:, None] & (offs_mr[None, :] < MR))
    else:
        acc = _lowrank_tail(acc, s_ptr, c_ptr, offs_m, offs_n, m_mask, n_mask, R,
                            stride_sm, stride_sr, stride_cr, stride_cn, PREC, BLOCK_K, "", TAIL_PIPE)

    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc += bias[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


# ----------------------------------------------------------------------------------------------
# Hopper: persistent grid, tensor-memory-accelerator loads of a and b.


def tma_candidates() -> List[triton.Config]:
    """Candidate configs of the Hopper kernel."""
    return [
        _cfg(*c, FLATTEN=f, WARP_SPECIALIZE=False)
        for c in [(128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),
                  (128, 128, 128, 8, 3), (256, 128, 64, 8, 3), (64, 256, 64, 4, 4), (128, 64, 64, 4, 4)]
        for f in (False, True)
    ]


def tma_config(T: int, N: int, K: int, b_nk: bool = True, sms: int = 132) -> triton.Config:
    """Launch config of the Hopper GEMM for T rows into N columns over K. The large tile, 128 x 256 x 64
    with 8 warps and 3 stages and the tile loop flattened, comes from the H100 tuning
    (bench/results/tune-nvidia-h100-*.json: flattening up to 11 % faster for the backward's row-major
    weight; warp specialisation asked for the forward's W^T layout where the tile is stored whole,
    which Triton 3.6 on the GPU machine does not apply to this kernel, gemm-layout-sweep-fwd-39b924f-*.json:
    0 of 21 compiled forms, the flag set or not, all within the rounds' spread on the H200; it stays
    for a Triton that applies it).
    Below 512 rows: 128 x 128 x 128 tiles.
    With few tiles per SM the tile size matters more than the loop's config: from 512 rows the tile is
    picked by a wave model, waves x tile area / efficiency, over 128 x 256 (efficiency 1), 128 x 128
    (0.8) and 128 x 64 (0.5), where waves = ceil(tiles / sms) and the efficiencies are fitted to the
    H200's sweeps (forward's layout over cuBLAS): T = 2048, 4096 -> 1024 (a k or v projection of
    one 2048-token sequence, 64 large tiles for 132 SMs) 1.73x -> 1.25x with 128 x 128 x 64 tiles,
    4 warps, 4 stages (1.71x -> 1.18x in the backward's layout, gemm-layout-sweep-kv-*.json); 2048 -> 512
    1.56x -> 1.45x with 128 x 64 x 64 (gemm-layout-sweep-narrow-*.json); T = 768
    (gemm-layout-sweep-t768-f8136a6-*.json) 4096 -> 4096 1.64x -> 1.35x with 128 x 256 (one wave of 96
    tiles, where 128 x 128 makes 192: two waves), 4096 -> 2048 1.30x -> 1.26x with 128 x 128 x 64 (the
    128 x 64 grid takes two waves: 1.96x), 4096 -> 1024 1.53x -> 1.36x with 128 x 64
    (gemm-layout-sweep-t512-t1024-fe577d9-*.json; T = 512 there 2.28x -> 1.98x).
    Where the large tiles make at most two waves, the forward's layout stores the tile in two halves
    with a fourth stage (no warp-specialise flag there). Over cuBLAS, three stages / this: one wave
    (gemm-layout-sweep-t640-t2048-f7b29c6-*.json) T = 640 on 4096 x 4096 1.57x / 1.47x, T = 1024
    1.10x / 1.05x, 1792 x 1792 1.09x / 1.03x, and T = 768 1.35x / 1.26x (gemm-layout-sweep-t768-f8136a6-*.json);
    two waves, T = 2048 (gemm-layout-sweep-subtile-*.json, entry 28 of bench/NOTES.md) 1.074x / 1.057x
    on 4096 x 4096, 1.035x / 1.036x for 14336 -> 4096. With more waves the two were within 2 points
    either way (T = 2048, 4096 -> 14336: 1.037x / 1.046x; T = 768, 4096 -> 14336: 1.06x / 1.05x),
    and the three-stage tile stays. Ties between tile widths go to the larger tile."""
    if T >= 512:
        cost = {bn: cdiv(cdiv(T, 128) * cdiv(N, bn), sms) * (bn / 256) / eff
                for bn, eff in ((256, 1.0), (128, 0.8), (64, 0.5))}
        bn = min(cost, key=lambda k: (cost[k], -k))  # ties: the larger tile
        if bn == 64:
            return _cfg(128, 64, 64, 4, 4, FLATTEN=True, WARP_SPECIALIZE=False)
        if bn == 128:
            return _cfg(128, 128, 64, 4, 4, FLATTEN=True, WARP_SPECIALIZE=False)
        if b_nk and cdiv(T, 128) * cdiv(N, 256) <= 2 * sms:
            return _cfg(128, 256, 64, 8, 4, FLATTEN=True, WARP_SPECIALIZE=False, EPI_SUBTILE=2)
        return _cfg(128, 256, 64, 8, 3, FLATTEN=True, WARP_SPECIALIZE=b_nk)
    return _cfg(128, 128, 128, 8, 3, FLATTEN=False, WARP_SPECIALIZE=False)


def _set_block_shapes(nargs):
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["a_desc"].block_shape = [bm, bk]
    nargs["b_desc"].block_shape = [bn, bk] if nargs["B_NK"] else [bk, bn]
    nargs["out_desc"].block_shape = [bm, bn // nargs.get("EPI_SUBTILE", 1)]


@triton.jit
def _lora_gemm_tma_kernel(
    a_desc, b_desc, out_desc, s_ptr, c_ptr, bias_ptr,
    T, N, K, R, T_BUCKET,
    stride_sm, stride_sr, stride_cr, stride_cn,
    B_NK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PREC: tl.constexpr,
    NUM_SMS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    FLATTEN: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
    TAIL_PIPE: tl.constexpr = True,
    EPI_SUBTILE: tl.constexpr = 1,
):
    """Persistent Hopper GEMM: out = a @ b + s @ c + bias, a and b (W or W^T) and out by tensor
    descriptors. EPI_SUBTILE = 2 stores each output tile as two column halves (out_desc's block
    BLOCK_M x BLOCK_N / 2): half the epilogue's shared-memory buffer, room for one more stage."""
    start_pid = tl.program_id(0)
    num_pid_m = tl.cdiv(T, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile_id in tl.range(start_pid, num_tiles, NUM_SMS, flatten=FLATTEN, warp_specialize=WARP_SPECIALIZE):
        pid_m, pid_n = _tile_ids(tile_id, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            # Out-of-bounds parts of a tile are filled with zeros by the copy engine.
            a = a_desc.load([off_m, ki * BLOCK_K])
            if B_NK:
                b = b_desc.load([off_n, ki * BLOCK_K])
                acc = tl.dot(a, b.T, acc, input_precision=PREC)
            else:
                b = b_desc.load([ki * BLOCK_K, off_n])
                acc = tl.dot(a, b, acc, input_precision=PREC)
        offs_m = off_m + tl.arange(0, BLOCK_M)
        offs_n = off_n + tl.arange(0, BLOCK_N)
        m_mask = offs_m < T
        n_mask = offs_n < N
        acc = _lowrank_tail(acc, s_ptr, c_ptr, offs_m, offs_n, m_mask, n_mask, R,
                            stride_sm, stride_sr, stride_cr, stride_cn, PREC, BLOCK_K, "", TAIL_PIPE)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            acc += bias[None, :]
        if EPI_SUBTILE == 2:
            halves = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
            lo, hi = tl.split(halves)
            out_desc.store([off_m, off_n], lo.to(out_desc.dtype))
            out_desc.store([off_m, off_n + BLOCK_N // 2], hi.to(out_desc.dtype))
        else:
            out_desc.store([off_m, off_n], acc.to(out_desc.dtype))


@triton.jit
def _lora_layer_tma_kernel(
    x_desc, w_desc, al_desc, out_desc, c_ptr, bias_ptr, scale_ptr, a_map_ptr, b_map_ptr,
    sp_ptr, s_ptr, u_ptr, flag_ptr, part_ptr,
    T, N, K, R, MR, SPLITS, SHRINK_PROGS,
    stride_cr, stride_cn,
    stride_amm, stride_amr, stride_bmr, stride_bmm,
    stride_spm, stride_sm, stride_um,
    HAS_BIAS: tl.constexpr,
    HAS_MAP: tl.constexpr,
    SAVE: tl.constexpr,
    PREC: tl.constexpr,
    MAP_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_MR: tl.constexpr,
    GROUP_M: tl.constexpr,
    FLATTEN: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
    SHRINK_STAGES: tl.constexpr = None,
    TAIL_PIPE: tl.constexpr = True,
    SPLIT_GROUP: tl.constexpr = 8,
):
    """The whole layer in one persistent launch (Hopper, many tokens), in two phases.

    Programs number themselves in order of arrival (a ticket from a counter), not by program id;
    P is the launch's program count.

    1. The shrink: the first SHRINK_PROGS programs to arrive take work items (row band, range of
       d_in) from a counter until it runs past the last (kernels.shrink._shrink_block, the band's
       count at flag_ptr[num_bands + band]); the program that finishes a band sets its flag to 1
       (release). Splitting d_in spreads one band's reading of x over several SMs.
    2. The base GEMM's tiles in grouped order, with the same loop as lora_gemm's Hopper kernel; after
       its main loop a tile waits for its band's flag (acquire) and adds S' b_cat^T as extra K-steps.
       Tiles are dealt in slots: slot v of the program with ticket v % P is tile v - SHRINK_PROGS,
       and the shrinking programs skip their first slot. So with SHRINK_PROGS < P the shrink takes
       the place of one tile in each shrinking program, and where the tile count leaves the last
       wave short by at least SHRINK_PROGS tiles, and each shrinking program's share of the shrink
       takes at most a tile's time, the layer ends with the base GEMM's waves.

    No program waits for a program that is not running: a program waits on a flag only in phase 2;
    the shrinking programs leave phase 1 when the counter has passed every item, that is when every
    item is held by a running program that waits for nothing; and a program with ticket q >= SHRINK_PROGS
    arrived after all SHRINK_PROGS shrinking programs, which are therefore running and take every
    item between them. This holds even when not all programs of the launch are resident."""
    num_pid_m = tl.cdiv(T, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    k_per = tl.cdiv(k_tiles, SPLITS)
    programs = tl.num_programs(0)  # a runtime value: no recompile per program count
    ticket = tl.atomic_add(flag_ptr + 2 * num_pid_m + 1, 1)
    if ticket < SHRINK_PROGS:
        item = tl.atomic_add(flag_ptr + 2 * num_pid_m, 1)
        while item < num_pid_m * SPLITS:
            band = item // SPLITS
            split = item % SPLITS
            k_lo = split * k_per * BLOCK_K
            if _shrink_block(x_desc, al_desc, band * BLOCK_M, k_lo, tl.minimum(k_lo + k_per * BLOCK_K, K), split,
                             SPLITS, part_ptr, num_pid_m * BLOCK_M, flag_ptr + num_pid_m + band, scale_ptr,
                             a_map_ptr, b_map_ptr, sp_ptr, s_ptr, u_ptr, T, R, MR, stride_amm, stride_amr,
                             stride_bmr, stride_bmm, stride_spm, stride_sm, stride_um, HAS_MAP, SAVE, PREC, MAP_PREC,
                             BLOCK_M, BLOCK_K, BLOCK_R, BLOCK_MR, SHRINK_STAGES, SPLIT_GROUP):
                tl.debug_barrier()  # every thread's stores issued before the flag is released
                tl.atomic_xchg(flag_ptr + band, 1, sem="release")
            item = tl.atomic_add(flag_ptr + 2 * num_pid_m, 1)

    num_tiles = num_pid_m * num_pid_n
    first = tl.where(ticket < SHRINK_PROGS, ticket + programs, ticket)
    for slot in tl.range(first, num_tiles + SHRINK_PROGS, programs, flatten=FLATTEN, warp_specialize=WARP_SPECIALIZE):
        tile_id = slot - SHRINK_PROGS
        pid_m, pid_n = _tile_ids(tile_id, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            a = x_desc.load([off_m, ki * BLOCK_K])
            b = w_desc.load([off_n, ki * BLOCK_K])
            acc = tl.dot(a, b.T, acc, input_precision=PREC)
        ready = tl.atomic_add(flag_ptr + pid_m, 0, sem="acquire")
        while ready != 1:
            ready = tl.atomic_add(flag_ptr + pid_m, 0, sem="acquire")
        tl.debug_barrier()  # S' read only after the flag (thread 0's acquire) is seen by all
        offs_m = off_m + tl.arange(0, BLOCK_M)
        offs_n = off_n + tl.arange(0, BLOCK_N)
        m_mask = offs_m < T
        n_mask = offs_n < N
        # S' was written by another program of this launch: read it from L2 (".cg"), never from this
        # SM's L1, which may hold a stale line shared with the band above.
        acc = _lowrank_tail(acc, sp_ptr, c_ptr, offs_m, offs_n, m_mask, n_mask, R,
                            stride_spm, 1, stride_cr, stride_cn, PREC, BLOCK_K, ".cg", TAIL_PIPE)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            acc += bias[None, :]
        out_desc.store([off_m, off_n], acc.to(out_desc.dtype))


_lora_gemm_tuned = triton.autotune(
    configs=gemm_candidates(), key=["T_BUCKET", "N", "K", "R", "HAS_BIAS", "FUSE_SHRINK", "HAS_MAP", "SAVE"],
    prune_configs_by={"early_config_prune": _prune})(_lora_gemm_kernel)
_lora_gemm_tma_tuned = triton.autotune(
    configs=[triton.Config(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages, pre_hook=_set_block_shapes)
             for c in tma_candidates()],
    key=["T_BUCKET", "N", "K", "R", "HAS_BIAS", "B_NK"])(_lora_gemm_tma_kernel)


# ----------------------------------------------------------------------------------------------
# Launch functions

_TMA_OK: Optional[bool] = None


def _tma_available(device: torch.device) -> bool:
    global _TMA_OK
    if _TMA_OK is None:
        try:
            from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
            _TMA_OK = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9
        except ImportError:
            _TMA_OK = False
    return _TMA_OK


def _tma_compatible(*ts: torch.Tensor) -> bool:
    """Tensor-memory-accelerator rules: 16-byte aligned base and strides, unit last stride (a
    transposed operand is passed as its .t() view where the kernel can read it so)."""
    for t in ts:
        es = t.element_size()
        if t.data_ptr() % 16 or t.stride(-1) != 1:
            return False
        if any((st * es) % 16 for st in t.stride() if st != 1):
            return False
    return True


# "auto": the Hopper kernel on sm_90 when the operands allow tensor-memory-accelerator loads and T
# is large enough to fill its tiles; "portable": always the pointer kernel; "tma": Hopper whenever
# the operands allow it.
GEMM_IMPL = "auto"


def _check_gemm_args(a, b, s, c, bias):
    check_runnable("a", a)
    for name, t in (("b", b), ("s", s), ("c", c), ("bias", bias)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor{'' if name == 'b' else ' or None'}, got {type(t).__name__}")
    if b is None:
        raise TypeError("b must be a torch.Tensor of shape (K, N), got None")
    if a.dim() != 2:
        raise ValueError(f"a must have shape (T, K), got {tuple(a.shape)}")
    if c is not None and s is None:
        raise ValueError("c is given without s: the low-rank term s @ c needs both")
    T, K = a.shape
    if b.dim() != 2 or b.shape[0] != K:
        raise ValueError(f"b must have shape ({K}, N) to match a {tuple(a.shape)}, got {tuple(b.shape)}")
    N = b.shape[1]
    if s is not None:
        if s.dim() != 2 or s.shape[0] != T:
            raise ValueError(f"s must have shape ({T}, R), got {tuple(s.shape)}")
        R = s.shape[1]
        if c is None or c.dim() != 2 or tuple(c.shape) != (R, N):
            raise ValueError(f"c must have shape ({R}, {N}), got {None if c is None else tuple(c.shape)}")
    for name, t in (("b", b), ("s", s), ("c", c), ("bias", bias)):
        if t is not None and (t.device != a.device or t.dtype != a.dtype):
            raise ValueError(f"{name} must be {a.dtype} on {a.device} like a, got {t.dtype} on {t.device}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"bias must have shape ({N},), got {tuple(bias.shape)}")
    return T, K, N


def lora_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    s: Optional[torch.Tensor] = None,
    c: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    impl: Optional[str] = None,
    config: Optional[triton.Config] = None,
    check: bool = True,
) -> torch.Tensor:
    """out = a @ b + s @ c + bias.  a: (T, K), b: (K, N), s: (T, R), c: (R, N), bias: (N,).

    Any strides (b is typically a transposed weight view). Accumulates in float32; returns (T, N)
    in a's dtype. impl: "auto" / "tma" / "portable" (default: module-level GEMM_IMPL); config: an
    explicit launch config (for tuning), else the heuristic table. check=False skips the operand
    checks (callers that guarantee them: a contiguous bias among them).
    """
    if check:
        T, K, N = _check_gemm_args(a, b, s, c, bias)
        bias = unit_vector(bias)
    else:
        (T, K), N = a.shape, b.shape[1]
    out = new_empty((T, N), a.dtype, a.device)
    if T == 0 or N == 0:
        return out
    R = s.shape[1] if s is not None else 0
    if R and T >= ALIGN_MIN_T:
        s, c = _rank_aligned(s, c)
    s_ = s if s is not None else a
    c_ = c if c is not None else b
    bias_ = bias if bias is not None else a
    tuned = AUTOTUNE and config is None

    impl = impl or GEMM_IMPL
    if impl not in ("auto", "tma", "portable"):
        raise ValueError(f"impl must be 'auto', 'tma' or 'portable', got {impl!r}")
    # Below 128 rows a 128-row tile is mostly empty; the pointer kernel's small tiles do better.
    use_tma = impl == "tma" or (impl == "auto" and T >= 128 and a.dtype != torch.float32)
    b_nk = b.stride(0) == 1 and b.stride(1) != 1  # b is W^T: load W's (N, K) rows directly
    bt = b.t() if b_nk else b
    if use_tma and a.is_cuda and _tma_available(a.device) and _tma_compatible(a, bt, out):
        from triton.tools.tensor_descriptor import TensorDescriptor
        sms = num_sms(a.device)
        cfg = config or tma_config(T, N, K, b_nk, sms)
        if cfg.kwargs.get("EPI_SUBTILE", 1) not in (1, 2):
            raise ValueError(f"config: EPI_SUBTILE must be 1 or 2 (the output tile stored whole or in two column "
                             f"halves), got {cfg.kwargs['EPI_SUBTILE']!r}")
        bm, bn, bk = (cfg.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
        a_desc = TensorDescriptor(a, list(a.shape), list(a.stride()), [bm, bk])
        b_desc = TensorDescriptor(bt, list(bt.shape), list(bt.stride()), [bn, bk] if b_nk else [bk, bn])
        out_block = [bm, bn // cfg.kwargs.get("EPI_SUBTILE", 1)]
        out_desc = TensorDescriptor(out, list(out.shape), list(out.stride()), out_block)
        if tuned:
            kernel = _lora_gemm_tma_tuned
            grid = lambda meta: (min(sms, cdiv(T, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"])),)
        else:
            kernel = _lora_gemm_tma_kernel
            grid = (min(sms, cdiv(T, bm) * cdiv(N, bn)),)
        launch(
            kernel, grid,
            a_desc, b_desc, out_desc, s_, c_, bias_,
            T, N, K, R, t_bucket(T),
            s_.stride(0), s_.stride(1), c_.stride(0), c_.stride(1),
            B_NK=b_nk, HAS_BIAS=bias is not None, PREC=dot_precision(a.dtype), NUM_SMS=sms,
            **({} if tuned else {**_tail_pipe(R, cfg.kwargs), **launch_kwargs(cfg)}),
        )
        return out

    if tuned:
        kernel, cfg = _lora_gemm_tuned, {}
        grid = lambda meta: (cdiv(T, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)
    else:
        kernel = _lora_gemm_kernel
        cfg = launch_kwargs(config) if config else _table_kwargs(T, N, K, False, 0, a.dtype)
        grid = (cdiv(T, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"]),)
    launch(
        kernel, grid,
        a, b, s_, c_, bias_, out,
        a, a, a, a, a, a, a, a, a,
        T, N, K, R, 1, t_bucket(T), 1, 0,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        s_.stride(0), s_.stride(1), c_.stride(0), c_.stride(1),
        out.stride(0), out.stride(1),
        0, 0, 0, 0, 0, 0, 0, 0, 0,
        HAS_BIAS=bias is not None, FUSE_SHRINK=False, HAS_MAP=False, SAVE=False,
        PREC=dot_precision(a.dtype), MAP_PREC="ieee", BLOCK_R=16, BLOCK_MR=16,
        EVEN_K=_even_k(K, cfg), **_tail_pipe(R, cfg), **cfg,
    )
    return out


# The GEMMs' low-rank tail is software-pipelined from this many BLOCK_K steps: a one-step
# tail's pipeline prologue cost more than it hid (tail-loop-ab-e0afd5c-*.json, bench/NOTES.md
# entries 22-23); from two steps pipelining wins. (The autotuned launch, LORAFUSE_AUTOTUNE=1,
# keeps the pipelined loop: its BLOCK_K is chosen after the launch arguments.)
TAIL_PIPE_MIN_STEPS = 2

# From this many rows on, s and c are re-laid out when their rank strides are not multiples of 16.
ALIGN_MIN_T = 256


def _rank_aligned(s: torch.Tensor, c: torch.Tensor):
    """s (T, R) and c (R, N) with every non-unit stride a multiple of 16 elements, copying where not.

    Triton specialises integer arguments on divisibility by 16 and vectorises loads only where it
    can prove alignment: with R = 24, a contiguous s and c = B^T (strides (1, 24)) made the low-rank
    tail's loads scalar, and lora_gemm took 1.82 ms instead of 1.43 ms (T = 8192, 4096 x 14336, H100).
    The copies are T x R and R x N elements: small beside the GEMM at the sizes where this applies."""
    def aligned(t):
        return all(st % 16 == 0 for st in t.stride() if st != 1)

    if not aligned(s):
        buf = alloc_rows(s.shape[0], s.shape[1], s.dtype, s.device)
        buf.copy_(s)
        s = buf
    if not aligned(c):
        R, N = c.shape
        if c.stride(0) == 1:  # c = B^T: keep B's (N, R) row layout, rows padded to 16
            buf = alloc_rows(N, R, c.dtype, c.device)
            buf.copy_(c.t())
            c = buf.t()
        else:
            buf = alloc_rows(R, N, c.dtype, c.device)
            buf.copy_(c)
            c = buf
    return s, c


def _tail_pipe(R: int, cfg: dict) -> dict:
    """TAIL_PIPE for R rank columns and a config's BLOCK_K (TAIL_PIPE_MIN_STEPS), as launch keywords;
    none where the config sets it or, under autotuning, has no BLOCK_K yet (the kernels' default,
    pipelined)."""
    if "BLOCK_K" not in cfg or "TAIL_PIPE" in cfg:  # tuned, or given in an explicit config
        return {}
    return {"TAIL_PIPE": cdiv(R, cfg["BLOCK_K"]) >= TAIL_PIPE_MIN_STEPS}


def _mask_rows(T: int, cfg: dict) -> bool:
    """MASK_ROWS for the decode layer: where T leaves its row block partly empty (DECODE_MASK_ROWS);
    under autotuning the block height is unknown here, so always (a full block's mask is all true)."""
    return DECODE_MASK_ROWS and ("BLOCK_M" not in cfg or T % cfg["BLOCK_M"] != 0)


def _even_k(K: int, cfg: dict) -> bool:
    # Under autotuning BLOCK_K is unknown here: keep the masks.
    return "BLOCK_K" in cfg and K % cfg["BLOCK_K"] == 0


def _check_layer_operands(x, weight, bias, a_cat, b_cat, scale, a_map, b_map):
    """The whole-layer launchers' operand checks (named by argument); returns scale and bias as
    unit-stride vectors."""
    scale = check_shrink_operands(x, a_cat, scale, a_map, b_map)
    expect("weight", weight, (None, x.shape[1]), x.device, x.dtype)
    expect("b_cat", b_cat, (weight.shape[0], a_cat.shape[0]), x.device, x.dtype)
    if bias is not None:
        expect("bias", bias, (weight.shape[0],), x.device, x.dtype)
    return scale, unit_vector(bias)


def lora_gemm_fused(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    a_cat: torch.Tensor,
    b_cat: torch.Tensor,
    scale: torch.Tensor,
    a_map: Optional[torch.Tensor] = None,
    b_map: Optional[torch.Tensor] = None,
    save: bool = False,
    config: Optional[triton.Config] = None,
    check: bool = True,
    shared: Optional[bool] = None,
    splits: Optional[int] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The whole layer in one launch (for few tokens).

    x: (T, d_in); weight: (d_out, d_in); a_cat: (R, d_in); b_cat: (d_out, R); scale (R,) float32.
    Returns (y, sp, s, u) like shrink + lora_gemm: y (T, d_out); when save, sp = S' (T, R) in x's
    dtype, s = S (T, R) and u = U (T, m) in float32 (u None without a mapping), else all None.
    check=False skips the operand checks (see shrink).

    shared: compute the shrink once per launch, split over d_in into `splits` work items per row
    block that the column blocks wait for (True), or again in every column block (False); default
    decode_shares_shrink. splits: for tuning (default decode_splits).
    """
    if check:  # check=False: the caller has checked (lorafuse.lora_linear), as shrink's `check`
        scale, bias = _check_layer_operands(x, weight, bias, a_cat, b_cat, scale, a_map, b_map)
    T, D = x.shape
    N = weight.shape[0]
    R = a_cat.shape[0]
    if R > onchip_rank_limit(x.dtype):
        raise ValueError(f"a_cat has R = {R} rank columns; lora_gemm_fused holds them all on chip and takes at "
                         f"most {onchip_rank_limit(x.dtype)} in {x.dtype} (use shrink + lora_gemm)")
    has_map = a_map is not None
    MR = a_map.shape[0] if has_map else 1
    y = new_empty((T, N), x.dtype, x.device)
    sp = alloc_rows(T, R, x.dtype, x.device) if save else None
    s = new_empty((T, R), torch.float32, x.device) if save else None
    u = new_empty((T, MR), torch.float32, x.device) if (save and has_map) else None
    if T == 0:
        return y, sp, s, u
    if N == 0:  # no output columns: the rows' S', S, U still come from the shrink
        return (y,) + (shrink(x, a_cat, scale, a_map, b_map, save=True) if save else (None, None, None))
    dummy = x
    am = a_map if has_map else scale
    bm = b_map if has_map else scale
    if AUTOTUNE and config is None:  # the shared shrink's buffers depend on the config: not tuned
        if shared:
            raise ValueError("lora_gemm_fused: shared=True needs a launch config (its buffers depend on it); "
                             "with LORAFUSE_AUTOTUNE=1 pass config= as well, or shared=None/False")
        kernel, cfg, shared = _lora_gemm_tuned, {}, False
        grid = lambda meta: (cdiv(T, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)
    else:
        kernel = _lora_gemm_kernel
        cfg = launch_kwargs(config) if config else _table_kwargs(T, N, D, True, R, x.dtype, num_sms(x.device),
                                                                 shared)
        grid = (cdiv(T, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"]),)
    br = block_for(R)
    if shared is None:
        shared = decode_shares_shrink(T, cdiv(N, cfg["BLOCK_N"]), D, N)
    k_per, n_splits, flags, part = 0, 1, dummy, dummy
    if shared:
        rows = cdiv(T, cfg["BLOCK_M"])
        if sp is None:  # the column blocks read S' from memory
            sp = alloc_rows(T, R, x.dtype, x.device)
        k_per, n_splits = split_range(D, splits or decode_splits(rows, cdiv(D, cfg["BLOCK_K"]), grid[0]),
                                      cfg["BLOCK_K"])
        # Per row block a flag (1: S' ready) and a count of its finished items, then the item
        # counter; zeroed on every call (a memset: also inside a CUDA graph).
        flags = torch.zeros(2 * rows + 1, dtype=torch.int32, device=x.device)
        part = torch.empty((n_splits, rows * cfg["BLOCK_M"], br) if n_splits > 1 else (1,), dtype=torch.float32,
                           device=x.device)
    s_, u_, sp_ = (s if save else dummy), (u if u is not None else dummy), (sp if sp is not None else dummy)
    # weight and b_cat are passed as they are, with the strides of their transposes (W^T, b_cat^T):
    # the same pointers and strides as .t() views, without building them on every call.
    (xs0, xs1), (ws0, ws1), (cs0, cs1), (ys0, ys1), (as0, as1) = (
        x.stride(), weight.stride(), b_cat.stride(), y.stride(), a_cat.stride())
    ams = am.stride() if has_map else (0, 0)
    bms = bm.stride() if has_map else (0, 0)
    launch(
        kernel, grid,
        x, weight, dummy, b_cat, bias if bias is not None else dummy, y,
        a_cat, scale, am, bm, s_, u_, sp_, flags, part,
        T, N, D, R, MR, t_bucket(T), n_splits, k_per,
        xs0, xs1, ws1, ws0,
        0, 0, cs1, cs0,
        ys0, ys1,
        as0, as1,
        ams[0], ams[1], bms[0], bms[1],
        s_.stride(0), u_.stride(0), sp_.stride(0),
        HAS_BIAS=bias is not None, FUSE_SHRINK=True, HAS_MAP=has_map, SAVE=save,
        PREC=dot_precision(x.dtype), MAP_PREC=MAP_PRECISION,
        BLOCK_R=br, BLOCK_MR=block_for(MR), EVEN_K=_even_k(D, cfg), SHARED=bool(shared), **_tail_pipe(R, cfg),
        MASK_ROWS=_mask_rows(T, cfg), SPLIT_GROUP=split_group(), **cfg,
    )
    return y, (sp if save else None), s, u


# The decode layer's x rows past T (a row block taller than the batch): masked instead of clamped
# to row 0, which had every program reload one row sixteen times (bench/NOTES.md entry 24, H200:
# T = 1 LoraMap on 4096 x 4096 25.8 -> 22.8 us, against 22.4 us at T = 16 on the same config).
DECODE_MASK_ROWS = True


def decode_shares_shrink(T: int, col_blocks: int, d_in: int, d_out: int) -> bool:
    """Whether lora_gemm_fused computes the shrink once per launch (shared by its col_blocks column
    blocks) rather than in each of them. Measured (decode-shared-*.json, decode-stages-*.json, H200,
    R = 48, CUDA graphs): the flags, the counter's memset and the wait cost 3-5 us, more than the
    recomputed shrink at 4096 x 4096 (T = 16: 1.11x the base GEMM recomputing, 1.31x shared) and
    4096 x 14336 (1.06x, 1.23x); only a wide d_in over a narrow d_out (14336 x 4096, the MLP's down
    projection) gains, where the shrink's a_cat tiles also take pipeline stages from the main loop:
    T = 1 / 16 / 32 1.51x / 1.31x / 1.38x recomputing, 1.37x / 1.20x / 1.29x shared; at T = 64 (one
    64-row block) recomputing is ahead again (1.26x against 1.30x)."""
    return col_blocks > 1 and d_in >= 3 * d_out and T <= 32


def decode_splits(rows: int, k_tiles: int, programs: int) -> int:
    """Shrink work items per row block of the decode layer: about one per program, at most 16
    (8, 16 and 32 measured within 0.04x of each other; the band's last item sums that many
    partials while the column blocks wait)."""
    return max(1, min(k_tiles, programs // max(rows, 1), 16))


# The whole layer in one persistent launch (Hopper): from this many rows, 16-bit operands, R up to
# PERSISTENT_MAX_R (one shrink tile holds every rank column, for the mapping).
PERSISTENT_MIN_T = 1024
PERSISTENT_MAX_R = 128


def persistent_ok(x: torch.Tensor, weight: torch.Tensor, a_cat: torch.Tensor) -> bool:
    """Whether lora_gemm_persistent can run these operands: Hopper, float16/bfloat16, at least
    PERSISTENT_MIN_T rows, R <= PERSISTENT_MAX_R, copy-engine-compatible x, weight and a_cat."""
    return (x.is_cuda and x.dtype != torch.float32 and x.shape[0] >= PERSISTENT_MIN_T
            and x.stride(-1) == 1 and weight.stride(-1) == 1 and a_cat.stride(-1) == 1
            and 0 < a_cat.shape[0] <= PERSISTENT_MAX_R and _tma_available(x.device)
            and (weight.shape[0] * x.element_size()) % 16 == 0 and _tma_compatible(x, weight, a_cat))


# The shrink's time per row band in units of one GEMM tile's (both scale with d_in), for
# persistent_plan; and the shrink loop's pipeline depth in the persistent layer up to 64 rank
# columns (persistent-plan-ab-*.json: 6 stages 0.01-0.26x faster than the launch's 3; at 128 columns
# six stages do not fit in shared memory beside the GEMM's).
PERSISTENT_BAND_COST = 0.5
PERSISTENT_SHRINK_STAGES = 6


@functools.lru_cache(maxsize=256)
def persistent_plan(bands: int, k_tiles: int, tiles: int, programs: int) -> Tuple[int, int]:
    """(splits, shrink_programs) of the persistent layer for `bands` row bands,
    `k_tiles` steps of d_in, `tiles` GEMM tiles and `programs` programs.

    Each shrinking program gives up one tile slot, so the layer's time in tile units is about
    max(waves, shrink + slots) where waves = ceil(tiles / programs), shrink = the program's share of
    the shrink (bands * splits items over shrink_programs programs, each PERSISTENT_BAND_COST / splits
    of a tile) and slots = the tiles left to a shrinking program. Where the last wave is short
    (slack = waves * programs - tiles), up to `slack` programs can shrink at no cost in waves; the plan
    takes the split and program count with the least modelled time (fewer items on a tie)."""
    waves = cdiv(tiles, programs)
    best = None
    for splits in (1, 2, 4, 8):
        if splits > 1 and splits * 4 > k_tiles:
            break
        items = bands * splits
        for p1 in range(1, min(programs, items) + 1):
            shrink = cdiv(items, p1) * PERSISTENT_BAND_COST / splits
            slots = cdiv(max(tiles + p1 - programs, 0), programs)
            cost = (max(waves, shrink + slots), items)
            if best is None or cost < best[0]:
                best = (cost, splits, p1)
    return best[1], best[2]


def persistent_config(T: int, N: int, K: int) -> triton.Config:
    """The base GEMM's tuned loop for W^T (tma_config): 128 x 256 x 64 tiles, 8 warps, 3 stages,
    the tile loop flattened and warp specialisation asked for (Triton 3.6 does not apply it to this
    kernel's loop: bench/NOTES.md, entry 23)."""
    return _cfg(128, 256, 64, 8, 3, FLATTEN=True, WARP_SPECIALIZE=True)


def lora_gemm_persistent(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    a_cat: torch.Tensor,
    b_cat: torch.Tensor,
    scale: torch.Tensor,
    a_map: Optional[torch.Tensor] = None,
    b_map: Optional[torch.Tensor] = None,
    save: bool = False,
    config: Optional[triton.Config] = None,
    check: bool = True,
    splits: Optional[int] = None,
    shrink_programs: Optional[int] = None,
    shrink_stages: Optional[int] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The whole layer in one persistent launch, the shrink as its first phase (Hopper, many tokens).

    Same arguments and returns as lora_gemm_fused: x (T, d_in); weight (d_out, d_in); a_cat (R, d_in);
    b_cat (d_out, R); scale (R,) float32. Returns (y, sp, s, u); sp = S' (T, R) always (the expand
    reads it), s and u only when save. Needs persistent_ok(x, weight, a_cat). config: a triton.Config
    with BLOCK_M/N/K, GROUP_M, FLATTEN, WARP_SPECIALIZE (persistent_config's keys); splits: the
    number of d_in ranges each row band's shrink is split into; shrink_programs: how many programs
    run the shrink (each then one GEMM tile fewer when fewer than all) (defaults: persistent_plan);
    shrink_stages: the shrink loop's pipeline depth (default PERSISTENT_SHRINK_STAGES up to R = 64);
    for tuning.
    """
    if check:
        scale, bias = _check_layer_operands(x, weight, bias, a_cat, b_cat, scale, a_map, b_map)
        if not persistent_ok(x, weight, a_cat):
            raise ValueError(
                "lora_gemm_persistent needs a Hopper GPU, float16/bfloat16 operands, at least "
                f"{PERSISTENT_MIN_T} rows, 1 <= R <= {PERSISTENT_MAX_R}, and x, weight, a_cat with unit "
                f"last stride and 16-byte aligned rows; got x {tuple(x.shape)} {x.dtype} on {x.device}, "
                f"R = {a_cat.shape[0]}")
    from triton.tools.tensor_descriptor import TensorDescriptor

    T, D = x.shape
    N = weight.shape[0]
    R = a_cat.shape[0]
    has_map = a_map is not None
    MR = a_map.shape[0] if has_map else 1
    cfg = config or persistent_config(T, N, D)
    bm, bn, bk = (cfg.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    br = block_for(R)
    y = new_empty((T, N), x.dtype, x.device)
    sp = alloc_rows(T, R, x.dtype, x.device)
    s = new_empty((T, R), torch.float32, x.device) if save else None
    u = new_empty((T, MR), torch.float32, x.device) if (save and has_map) else None
    rows = cdiv(T, bm)
    # Per row band a flag (1: S' ready) and a count of its finished items, then the item counter and
    # the arrival counter. Zeroed on every call (a memset: also inside a CUDA graph).
    flags = torch.zeros(2 * rows + 2, dtype=torch.int32, device=x.device)
    programs = min(num_sms(x.device), rows * cdiv(N, bn))
    k_tiles = cdiv(D, bk)
    plan = persistent_plan(rows, k_tiles, rows * cdiv(N, bn), programs)
    if splits is None:
        splits = plan[0]
    elif not 1 <= splits <= k_tiles:
        raise ValueError(f"splits must be in 1..{k_tiles} (steps of d_in), got {splits}")
    if shrink_programs is None:  # the plan's count, or at most one program per item
        shrink_programs = plan[1] if splits == plan[0] else min(plan[1], rows * splits)
    elif not 1 <= shrink_programs <= programs:
        raise ValueError(f"shrink_programs must be in 1..{programs}, got {shrink_programs}")
    if shrink_stages is None and br <= 64:
        shrink_stages = PERSISTENT_SHRINK_STAGES
    # The shrink items' partial sums (unused with one split).
    part = torch.empty((splits, rows * bm, br) if splits > 1 else (1,), dtype=torch.float32, device=x.device)
    # The expand reads b_cat^T (R, N) in (R-wide) rows of b_cat; keep them 16-element aligned (see
    # _rank_aligned).
    c = b_cat
    if c.stride(1) != 1 or c.stride(0) % 16:
        c = alloc_rows(N, R, x.dtype, x.device)
        c.copy_(b_cat)
    dummy = sp
    am = a_map if has_map else scale
    bmp = b_map if has_map else scale
    s_, u_ = (s if save else dummy), (u if u is not None else dummy)
    launch(
        _lora_layer_tma_kernel, (programs,),
        TensorDescriptor(x, [T, D], [x.stride(0), 1], [bm, bk]),
        TensorDescriptor(weight, [N, D], [weight.stride(0), 1], [bn, bk]),
        TensorDescriptor(a_cat, [R, D], [a_cat.stride(0), 1], [br, bk]),
        TensorDescriptor(y, [T, N], [y.stride(0), 1], [bm, bn]),
        c, bias if bias is not None else dummy, scale, am, bmp, sp, s_, u_, flags, part,
        T, N, D, R, MR, splits, shrink_programs,
        c.stride(1), c.stride(0),
        am.stride(0) if has_map else 0, am.stride(1) if has_map else 0,
        bmp.stride(0) if has_map else 0, bmp.stride(1) if has_map else 0,
        sp.stride(0), s_.stride(0), u_.stride(0),
        HAS_BIAS=bias is not None, HAS_MAP=has_map, SAVE=save, PREC=dot_precision(x.dtype), MAP_PREC="ieee",
        BLOCK_R=br, BLOCK_MR=block_for(MR), SHRINK_STAGES=shrink_stages, **_tail_pipe(R, cfg.kwargs),
        SPLIT_GROUP=split_group(), **launch_kwargs(cfg),
    )
    return y, sp, s, u

"""Per-request adapters: every row t of a batch uses its own adapter idx[t] from a library of slots
(-1: none), added onto the base product y = x W^T + b computed by cuBLAS.

Library layout (slots, zero-padded to the largest rank): fac (N, r_max, D) with fac[i, :r_i] the
rank-r_i factor of slot i (A_i for the shrink, B_i^T for the expand), ranks (N,), scales (N,).
Loads beyond a slot's rank are masked, so padding costs no memory traffic.

    shrink:  S[t] = fac_in[idx[t], :r] x[t]              (float32, written as split partial sums)
    expand:  y[t] += round(S[t] * scale[idx[t]]) fac_out[idx[t], :r]   (in place)

The backward of x is the same pair with the factors swapped (shrink of dY with B^T, expand into
dY W with A), so it reuses these kernels.

Two schedules, neither of which reads anything back to the host (fixed shapes: CUDA-graph capturable):
- gathered (BGMV-like; few rows, decoding): one program per row (and per slice of D in the shrink,
  so that a handful of rows still fills the GPU); each program loads its row's adapter by index.
  No sorting, two launches. The adapter is re-read for every row (from L2 when rows share it).
- grouped (SGMV-like; many rows): rows are grouped by adapter on the GPU by a counting sort (one
  launch counts rows per slot with atomics, one launch over row chunks places the rows in the
  permutation, its first program also writing the prefix sums and the block table), cut into
  blocks of BLOCK_T rows that share one adapter, and each block runs tensor-core dots. The number
  of blocks is bounded by cdiv(T, BLOCK_T) + min(N, T), so the grid is sized by that bound and
  surplus programs exit after a few loads. Rows of one slot are ordered by the atomics, which
  changes which rows share a block but not any row's result (each row's dot products are its own).

For a few rows of a wide layer (decoding), segmented_linear_decode replaces the base GEMM and the
gathered expand with one GEMM of its own whose epilogue adds the rows' adapter terms (after the
gathered shrink), so the output is written once.

Ids outside [0, N) (-1, and invalid ids when the caller skips the range check) get no adapter.
"""
from __future__ import annotations

import functools
import itertools
import numbers
from dataclasses import dataclass
from typing import Callable, Optional, Tuple, Union

import torch
import triton
import triton.language as tl

from .utils import (block_for, can_run, cdiv, check_runnable, check_tensors, dot_precision, is_interpreting, launch,
                    new_empty, next_pow2, num_sms, onchip_rank_limit, split_range, unit_vector)


# ----------------------------------------------------------------------------------------------
# Gathered schedule (one row per program)


@triton.jit
def _shrink_row(x_ptr, fac_ptr, ranks_ptr, idx_ptr, part_ptr, t, split,
                D, R_MAX, D_PER_SPLIT, NUM_SLOTS,
                stride_xt, stride_xd,
                stride_fn, stride_fr, stride_fd,
                stride_ps, stride_pt,
                BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """part[split, t] = fac_in[idx[t], :r] x[t, slice]: one row's shrink over one slice of D."""
    slot = tl.load(idx_ptr + t).to(tl.int64)
    valid = (slot >= 0) & (slot < NUM_SLOTS)
    slot = tl.where(valid, slot, 0)
    rank = tl.load(ranks_ptr + slot)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    d_lo = split * D_PER_SPLIT
    # Rows without an adapter skip the loop (their partials are written as zeros, never read).
    d_hi = tl.where(valid, tl.minimum(d_lo + D_PER_SPLIT, D), d_lo)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for d0 in range(d_lo, d_hi, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < d_hi
        xv = tl.load(x_ptr + t * stride_xt + offs_d * stride_xd, mask=d_mask, other=0.0).to(tl.float32)
        f = tl.load(fac_ptr + slot * stride_fn + offs_r[:, None] * stride_fr + offs_d[None, :] * stride_fd,
                    mask=r_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(f * xv[None, :], axis=1)
    tl.store(part_ptr + split * stride_ps + t * stride_pt + offs_r, acc, mask=offs_r < R_MAX)


@triton.jit
def _gathered_shrink_kernel(
    x_ptr, fac_ptr, ranks_ptr, idx_ptr, part_ptr,
    D, R_MAX, D_PER_SPLIT, NUM_SLOTS,
    stride_xt, stride_xd,
    stride_fn, stride_fr, stride_fd,
    stride_ps, stride_pt,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PDL: tl.constexpr = False,
):
    if PDL:  # the decode kernel may start now: it waits for this kernel before reading its output
        tl.extra.cuda.gdc_launch_dependents()
    _shrink_row(x_ptr, fac_ptr, ranks_ptr, idx_ptr, part_ptr,
                tl.program_id(0).to(tl.int64), tl.program_id(1),
                D, R_MAX, D_PER_SPLIT, NUM_SLOTS,
                stride_xt, stride_xd, stride_fn, stride_fr, stride_fd, stride_ps, stride_pt,
                BLOCK_R, BLOCK_D)


@triton.jit(debug=True)  # debug keeps the device_assert (in this variant only)
def _gathered_shrink_checked_kernel(
    x_ptr, fac_ptr, ranks_ptr, idx_ptr, part_ptr,
    D, R_MAX, D_PER_SPLIT, NUM_SLOTS,
    stride_xt, stride_xd,
    stride_fn, stride_fr, stride_fd,
    stride_ps, stride_pt,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """_gathered_shrink_kernel that also asserts idx[t] in [-1, NUM_SLOTS): the id range check of
    lora_linear_segmented without a launch of its own."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(idx_ptr + t)
    tl.device_assert((slot >= -1) & (slot < NUM_SLOTS), "idx holds an adapter id outside [-1, num_slots)")
    _shrink_row(x_ptr, fac_ptr, ranks_ptr, idx_ptr, part_ptr, t, tl.program_id(1),
                D, R_MAX, D_PER_SPLIT, NUM_SLOTS,
                stride_xt, stride_xd, stride_fn, stride_fr, stride_fd, stride_ps, stride_pt,
                BLOCK_R, BLOCK_D)


@triton.jit
def _row_delta(part_ptr, fac_ptr, ranks_ptr, scales_ptr, idx_ptr, row_scale_ptr, t, offs_n,
               N, SPLITS, NUM_SLOTS,
               stride_ps, stride_pt,
               stride_fn, stride_fr, stride_fd,
               stride_sn, stride_sr,
               OUT_DTYPE: tl.constexpr,
               HAS_ROW_SCALE: tl.constexpr,
               BLOCK_R: tl.constexpr,
               BLOCK_SPLITS: tl.constexpr):
    """round(S[t] * scale) fac_out[idx[t], :r, offs_n] in float32 (zeros for a row without an
    adapter), S[t] the sum of the shrink's split partials of row t."""
    slot = tl.load(idx_ptr + t).to(tl.int64)
    valid = (slot >= 0) & (slot < NUM_SLOTS)
    slot = tl.where(valid, slot, 0)
    rank = tl.load(ranks_ptr + slot)
    offs_r = tl.arange(0, BLOCK_R)
    # (Scalar conditions folded into the bounds: the interpreter rejects scalar & vector masks.)
    r_mask = offs_r < tl.where(valid, rank, 0)
    # The slot's scale per rank column (stride_sr = 0: one scale for the whole slot).
    scale = tl.load(scales_ptr + slot * stride_sn + offs_r * stride_sr, mask=r_mask, other=0.0).to(tl.float32)
    if HAS_ROW_SCALE:
        scale *= tl.load(row_scale_ptr + t)
    # The shrink's partials of this row, all splits in one load (a loop over the splits would wait
    # on one load after the other: at T = 16 that chain was most of the kernel's time).
    offs_k = tl.arange(0, BLOCK_SPLITS)
    parts = tl.load(part_ptr + offs_k[:, None] * stride_ps + t * stride_pt + offs_r[None, :],
                    mask=(offs_k < SPLITS)[:, None] & r_mask[None, :], other=0.0)
    s = tl.sum(parts, axis=0)
    # S' is rounded to the compute dtype before the expand, as in lorafuse.lora_linear.
    s = (s * scale).to(OUT_DTYPE).to(tl.float32)
    n_mask = offs_n < tl.where(valid, N, 0)
    f = tl.load(fac_ptr + slot * stride_fn + offs_r[:, None] * stride_fr + offs_n[None, :] * stride_fd,
                mask=r_mask[:, None] & n_mask[None, :], other=0.0).to(tl.float32)
    return tl.sum(f * s[:, None], axis=0)


@triton.jit
def _gathered_expand_kernel(
    out_ptr, part_ptr, fac_ptr, ranks_ptr, scales_ptr, idx_ptr, row_scale_ptr,
    N, SPLITS, NUM_SLOTS,
    stride_ot, stride_on,
    stride_ps, stride_pt,
    stride_fn, stride_fr, stride_fd,
    stride_sn, stride_sr,
    HAS_ROW_SCALE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SPLITS: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    delta = _row_delta(part_ptr, fac_ptr, ranks_ptr, scales_ptr, idx_ptr, row_scale_ptr, t, offs_n,
                       N, SPLITS, NUM_SLOTS, stride_ps, stride_pt, stride_fn, stride_fr, stride_fd,
                       stride_sn, stride_sr, out_ptr.dtype.element_ty, HAS_ROW_SCALE, BLOCK_R, BLOCK_SPLITS)
    n_mask = offs_n < N
    o_ptrs = out_ptr + t * stride_ot + offs_n * stride_on
    y = tl.load(o_ptrs, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(o_ptrs, (y + delta).to(out_ptr.dtype.element_ty), mask=n_mask)


# ----------------------------------------------------------------------------------------------
# Decode: the rows' adapters in the base GEMM's epilogue (few rows)


@triton.jit
def _decode_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, part_ptr, fac_ptr, ranks_ptr, scales_ptr, idx_ptr,
    T, N, D, R_MAX, SPLITS, NUM_SLOTS,
    stride_xt, stride_xd, stride_wn, stride_wd, stride_ot, stride_on,
    stride_ps, stride_pt,
    stride_fn, stride_fr, stride_fd,
    stride_sn, stride_sr,
    HAS_BIAS: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_SPLITS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    CHUNK_T: tl.constexpr,
    EPI_LOOP: tl.constexpr,
    EVEN_K: tl.constexpr,
    EVEN_N: tl.constexpr,
    PDL: tl.constexpr,
):
    """out[:, n-block] = x W[n-block]^T + b + each row's round(S[t] * scale) fac_out[idx[t], :, n-block].

    One program per column block holds every row (T <= 64) over all of D, so the adapter term goes
    into the epilogue and the output is written once. S[t] comes from the row shrink launched just
    before as split partials; with programmatic dependent launch (PDL) this kernel starts while the
    shrink runs and waits for it only after its K loop."""
    pid_n = tl.program_id(0)
    offs_t = tl.arange(0, BLOCK_T)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    t_mask = offs_t < T
    n_mask = offs_n < N
    x_ptrs = x_ptr + offs_t[:, None] * stride_xt + offs_k[None, :] * stride_xd
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wd
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        if EVEN_K:
            xv = tl.load(x_ptrs, mask=t_mask[:, None], other=0.0)
            if EVEN_N:
                wv = tl.load(w_ptrs)
            else:
                wv = tl.load(w_ptrs, mask=n_mask[:, None], other=0.0)
        else:
            k_mask = (k0 + offs_k) < D
            xv = tl.load(x_ptrs, mask=t_mask[:, None] & k_mask[None, :], other=0.0)
            wv = tl.load(w_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        acc = tl.dot(xv, tl.trans(wv), acc, input_precision=PREC)
        x_ptrs += BLOCK_K * stride_xd
        w_ptrs += BLOCK_K * stride_wd
    _decode_epilogue(acc, bias_ptr, out_ptr, part_ptr, fac_ptr, ranks_ptr, scales_ptr, idx_ptr, offs_n,
                     T, N, SPLITS, NUM_SLOTS, stride_ot, stride_on, stride_ps, stride_pt,
                     stride_fn, stride_fr, stride_fd, stride_sn, stride_sr,
                     HAS_BIAS, PREC, BLOCK_T, BLOCK_SPLITS, BLOCK_R, CHUNK_T, PDL, EPI_LOOP)


@triton.jit
def _decode_tma_kernel(
    x_desc, w_desc, bias_ptr, out_ptr, part_ptr, fac_ptr, ranks_ptr, scales_ptr, idx_ptr,
    T, N, D, SPLITS, NUM_SLOTS,
    stride_ot, stride_on,
    stride_ps, stride_pt,
    stride_fn, stride_fr, stride_fd,
    stride_sn, stride_sr,
    HAS_BIAS: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_SPLITS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    CHUNK_T: tl.constexpr,
    EPI_LOOP: tl.constexpr,
    SWAP: tl.constexpr,
    PDL: tl.constexpr,
):
    """_decode_kernel with x and W read by the tensor memory accelerator (Hopper): the copies are
    asynchronous, so the pipeline keeps num_stages tiles of W in flight per program without
    registers to hold them (the layer is bound by reading W). Rows past T and columns past D or N
    are filled with zeros by the copy. SWAP computes W x^T (BLOCK_N rows on the tensor cores' M
    side, where Hopper's warp-group MMA needs 64; the few rows go on the N side)."""
    pid_n = tl.program_id(0)
    off_n = pid_n * BLOCK_N
    offs_n = off_n.to(tl.int64) + tl.arange(0, BLOCK_N)
    if SWAP:
        acc_t = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            acc_t = tl.dot(w_desc.load([off_n, k0]), tl.trans(x_desc.load([0, k0])), acc_t, input_precision=PREC)
        acc = tl.trans(acc_t)
    else:
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            acc = tl.dot(x_desc.load([0, k0]), tl.trans(w_desc.load([off_n, k0])), acc, input_precision=PREC)
    _decode_epilogue(acc, bias_ptr, out_ptr, part_ptr, fac_ptr, ranks_ptr, scales_ptr, idx_ptr, offs_n,
                     T, N, SPLITS, NUM_SLOTS, stride_ot, stride_on, stride_ps, stride_pt,
                     stride_fn, stride_fr, stride_fd, stride_sn, stride_sr,
                     HAS_BIAS, PREC, BLOCK_T, BLOCK_SPLITS, BLOCK_R, CHUNK_T, PDL, EPI_LOOP)


@triton.jit
def _epilogue_chunk(acc, c, out_ptr, part_ptr, fac_ptr, ranks_ptr, scales_ptr, idx_ptr, offs_t, offs_n, n_mask,
                    T, SPLITS, NUM_SLOTS, stride_ps, stride_pt, stride_fn, stride_fr, stride_fd, stride_sn, stride_sr,
                    PREC: tl.constexpr, BLOCK_SPLITS: tl.constexpr, BLOCK_R: tl.constexpr, CHUNK_T: tl.constexpr):
    """acc += rows c .. c + CHUNK_T's adapter terms, as one tensor-core dot: its K axis runs over
    (row, rank column) pairs, the left operand is block-diagonal (row t's S' in its own columns), the
    right one row t's factor rows gathered from its slot. All loads of a chunk are independent, so
    the epilogue waits on memory once per chunk, not once per rank column."""
    kk = tl.arange(0, CHUNK_T * BLOCK_R)
    offs_s = tl.arange(0, BLOCK_SPLITS)
    s_mask = offs_s < SPLITS
    row = c + kk // BLOCK_R
    col = kk % BLOCK_R
    slot = tl.load(idx_ptr + row, mask=row < T, other=-1).to(tl.int64)
    ok = (row < T) & (slot >= 0) & (slot < NUM_SLOTS)
    slot = tl.where(ok, slot, 0)
    ok = ok & (col < tl.load(ranks_ptr + slot))
    parts = tl.load(part_ptr + offs_s[:, None] * stride_ps + row[None, :] * stride_pt + col[None, :],
                    mask=s_mask[:, None] & ok[None, :], other=0.0)
    sc = tl.load(scales_ptr + slot * stride_sn + col * stride_sr, mask=ok, other=0.0).to(tl.float32)
    # S' is rounded to the compute dtype before the expand, as in lorafuse.lora_linear.
    sp = (tl.sum(parts, axis=0) * sc).to(out_ptr.dtype.element_ty)
    sp_rows = tl.where(offs_t[:, None] == row[None, :], sp[None, :], 0.0).to(out_ptr.dtype.element_ty)
    f = tl.load(fac_ptr + slot[:, None] * stride_fn + col[:, None] * stride_fr + offs_n[None, :] * stride_fd,
                mask=ok[:, None] & n_mask[None, :], other=0.0)
    return tl.dot(sp_rows, f, acc, input_precision=PREC)


@triton.jit
def _decode_epilogue(acc, bias_ptr, out_ptr, part_ptr, fac_ptr, ranks_ptr, scales_ptr, idx_ptr, offs_n,
                     T, N, SPLITS, NUM_SLOTS, stride_ot, stride_on, stride_ps, stride_pt,
                     stride_fn, stride_fr, stride_fd, stride_sn, stride_sr,
                     HAS_BIAS: tl.constexpr, PREC: tl.constexpr, BLOCK_T: tl.constexpr,
                     BLOCK_SPLITS: tl.constexpr, BLOCK_R: tl.constexpr, CHUNK_T: tl.constexpr,
                     PDL: tl.constexpr, EPI_LOOP: tl.constexpr):
    """acc (BLOCK_T, BLOCK_N) = x W[offs_n]^T in float32; adds the bias and each row's adapter term
    and stores the rows' outputs."""
    offs_t = tl.arange(0, BLOCK_T)
    t_mask = offs_t < T
    n_mask = offs_n < N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if PDL:
        tl.extra.cuda.gdc_wait()  # the shrink's partials are complete and visible after this
    if EPI_LOOP == 2:  # unrolled over BLOCK_T's chunks, rows past T masked
        for c in tl.static_range(0, BLOCK_T, CHUNK_T):
            acc = _epilogue_chunk(acc, c, out_ptr, part_ptr, fac_ptr, ranks_ptr, scales_ptr, idx_ptr, offs_t, offs_n,
                                  n_mask, T, SPLITS, NUM_SLOTS, stride_ps, stride_pt, stride_fn, stride_fr, stride_fd,
                                  stride_sn, stride_sr, PREC, BLOCK_SPLITS, BLOCK_R, CHUNK_T)
    elif EPI_LOOP == 1:  # a loop over T's chunks that the compiler does not software-pipeline
        for c in tl.range(0, T, CHUNK_T, num_stages=1):
            acc = _epilogue_chunk(acc, c, out_ptr, part_ptr, fac_ptr, ranks_ptr, scales_ptr, idx_ptr, offs_t, offs_n,
                                  n_mask, T, SPLITS, NUM_SLOTS, stride_ps, stride_pt, stride_fn, stride_fr, stride_fd,
                                  stride_sn, stride_sr, PREC, BLOCK_SPLITS, BLOCK_R, CHUNK_T)
    else:
        for c in range(0, T, CHUNK_T):
            acc = _epilogue_chunk(acc, c, out_ptr, part_ptr, fac_ptr, ranks_ptr, scales_ptr, idx_ptr, offs_t, offs_n,
                                  n_mask, T, SPLITS, NUM_SLOTS, stride_ps, stride_pt, stride_fn, stride_fr, stride_fd,
                                  stride_sn, stride_sr, PREC, BLOCK_SPLITS, BLOCK_R, CHUNK_T)
    tl.store(out_ptr + offs_t[:, None] * stride_ot + offs_n[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=t_mask[:, None] & n_mask[None, :])


# ----------------------------------------------------------------------------------------------
# Grouped schedule (blocks of rows sharing one adapter)


@dataclass
class GroupPlan:
    """Rows grouped by adapter, all on the device (no host read-back). int32 throughout.

    perm (T,): row numbers grouped by slot (slot 0's rows first; within a slot in no fixed order;
    rows without an adapter are left out); seg_start, seg_end (N,): slot i's rows are
    perm[seg_start[i]:seg_end[i]]; blk_end (N,): cumulative count of BLOCK_T-row blocks up to and
    including slot i; blk_slot (num_programs,): the slot of program p's block (N: none, it exits).
    """

    perm: torch.Tensor
    seg_start: torch.Tensor
    seg_end: torch.Tensor
    blk_end: torch.Tensor
    blk_slot: torch.Tensor
    block_t: int
    num_slots: int

    @property
    def num_programs(self) -> int:
        return self.blk_slot.shape[0]


@triton.jit
def _count_rows_kernel(idx_ptr, counts_ptr, pos_ptr, T, NUM_SLOTS, BLOCK: tl.constexpr):
    """counts[i] = rows of slot i; pos[t] = row t's place among its slot's rows (atomic order)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < T
    slot = tl.load(idx_ptr + offs, mask=in_range, other=-1)
    has = in_range & (slot >= 0) & (slot < NUM_SLOTS)
    old = tl.atomic_add(counts_ptr + tl.where(has, slot, 0), tl.full((BLOCK,), 1, tl.int32), mask=has)
    tl.store(pos_ptr + offs, old, mask=has)


@triton.jit
def _plan_kernel(idx_ptr, counts_ptr, pos_ptr, perm_ptr, seg_start_ptr, seg_end_ptr, blk_end_ptr, blk_slot_ptr,
                 T, NUM_SLOTS, NUM_PROGRAMS,
                 BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, CHUNK_P: tl.constexpr, CHUNK_T: tl.constexpr):
    """Grid (row chunks of CHUNK_T): every program places its rows in the permutation; program 0 also
    writes the prefix sums over the slots and each block's slot. Each program computes its rows'
    slot starts from the counts itself (a masked sum over the slots), so that no program reads what
    another writes and the rows spread over the GPU (one program looping over 8192 rows took 15 us)."""
    offs_s = tl.arange(0, BLOCK_S)
    s_mask = offs_s < NUM_SLOTS
    count = tl.load(counts_ptr + offs_s, mask=s_mask, other=0)
    if tl.program_id(0) == 0:
        seg_end = tl.cumsum(count, 0)
        blk_end = tl.cumsum((count + BLOCK_T - 1) // BLOCK_T, 0)
        tl.store(seg_start_ptr + offs_s, seg_end - count, mask=s_mask)
        tl.store(seg_end_ptr + offs_s, seg_end, mask=s_mask)
        tl.store(blk_end_ptr + offs_s, blk_end, mask=s_mask)
        # Program p's slot: how many slots' blocks end at or before p (N past the last block).
        for p0 in range(0, NUM_PROGRAMS, CHUNK_P):
            offs_p = p0 + tl.arange(0, CHUNK_P)
            before = (blk_end[None, :] <= offs_p[:, None]) & s_mask[None, :]
            tl.store(blk_slot_ptr + offs_p, tl.sum(before.to(tl.int32), axis=1), mask=offs_p < NUM_PROGRAMS)
    offs_t = tl.program_id(0) * CHUNK_T + tl.arange(0, CHUNK_T)
    in_range = offs_t < T
    slot = tl.load(idx_ptr + offs_t, mask=in_range, other=-1)
    has = in_range & (slot >= 0) & (slot < NUM_SLOTS)
    start = tl.sum(tl.where(offs_s[None, :] < slot[:, None], count[None, :], 0), axis=1)
    pos = tl.load(pos_ptr + offs_t, mask=has, other=0)
    tl.store(perm_ptr + start + pos, offs_t, mask=has)


def _check_ids_arg(idx: torch.Tensor) -> torch.Tensor:
    """idx (T,) int32/int64 where the kernels can read it; returned contiguous (they read it unstrided)."""
    if not isinstance(idx, torch.Tensor) or idx.dim() != 1 or idx.dtype not in (torch.int32, torch.int64):
        got = f"{idx.dtype} {tuple(idx.shape)}" if isinstance(idx, torch.Tensor) else type(idx).__name__
        raise ValueError(f"idx must be an int32/int64 tensor of shape (T,), got {got}")
    if not can_run(idx):
        raise ValueError(f"idx is on {idx.device}: the Triton kernels need CUDA tensors "
                         f"(or CPU tensors with TRITON_INTERPRET=1 set before triton is imported)")
    return idx.contiguous()


# Rows per program of the counting launch: more, smaller programs spread the atomics' latency
# (grouped-plan-sweep-1453a14-*.json, H200, group_rows from a CUDA graph, 64 slots: T = 8192 16.0 us
# at 128 rows against 18.8 at 1024; T = 2048 14.2 against 18.1).
COUNT_BLOCK = 128


def group_rows(idx: torch.Tensor, num_slots: int, block_t: int) -> GroupPlan:
    """Group rows by slot (a counting sort: a fill and two launches) and lay out the row blocks.

    idx (T,) int32/int64; ids outside [0, num_slots) (-1 among them) belong to no block.
    block_t: rows per block, a power of two (the kernels that read the plan tile rows by it)."""
    idx = _check_ids_arg(idx)
    for name, v, low in (("num_slots", num_slots, 0), ("block_t", block_t, 1)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
    if block_t & (block_t - 1):
        raise ValueError(f"block_t must be a power of two (the row blocks are tiled by it), got {block_t}")
    T = idx.shape[0]
    dev = idx.device
    i32 = torch.int32
    # Every slot's rows fill whole blocks but its last: at most cdiv(T, block_t) + min(N, T) blocks.
    num_programs = cdiv(T, block_t) + min(num_slots, T)
    # One zeroed buffer cut into the seven arrays (one allocation and one fill instead of seven
    # calls: host time), each starting on a 16-byte boundary.
    sizes = (num_slots, T, T, num_slots, num_slots, num_slots, num_programs)
    ends = list(itertools.accumulate(cdiv(n, 4) * 4 for n in sizes))
    buf = torch.zeros((ends[-1],), dtype=i32, device=dev)
    counts, pos, perm, seg_start, seg_end, blk_end, blk_slot = (
        buf[e - cdiv(n, 4) * 4:e - cdiv(n, 4) * 4 + n] for n, e in zip(sizes, ends))
    count_block = COUNT_BLOCK if not is_interpreting() else 64
    launch(_count_rows_kernel, (cdiv(T, count_block),), idx, counts, pos, T, num_slots, BLOCK=count_block,
           num_warps=4)
    block_s = block_for(num_slots)
    chunk = max(16, min(1024, 16384 // block_s))
    chunk_t = chunk if not is_interpreting() else 16
    launch(_plan_kernel, (max(1, cdiv(T, chunk_t)),), idx, counts, pos, perm, seg_start, seg_end, blk_end, blk_slot,
           T, num_slots, num_programs,
           BLOCK_T=block_t, BLOCK_S=block_s, CHUNK_P=chunk, CHUNK_T=chunk_t, num_warps=8)
    return GroupPlan(perm, seg_start, seg_end, blk_end, blk_slot, block_t, num_slots)


@triton.jit
def _block_rows(pid, blk_slot_ptr, seg_start_ptr, seg_end_ptr, blk_end_ptr, perm_ptr, NUM_SLOTS,
                BLOCK_T: tl.constexpr):
    """(slot, rows (BLOCK_T,), row mask, valid) of program pid's block."""
    slot = tl.load(blk_slot_ptr + pid)
    valid = slot < NUM_SLOTS
    slot = tl.minimum(slot, NUM_SLOTS - 1)
    start = tl.load(seg_start_ptr + slot)
    end = tl.load(seg_end_ptr + slot)
    first_block = tl.load(blk_end_ptr + slot) - (end - start + BLOCK_T - 1) // BLOCK_T
    offs = start + (pid - first_block) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = offs < tl.where(valid, end, 0)
    rows = tl.load(perm_ptr + offs, mask=t_mask, other=0).to(tl.int64)
    return slot, rows, t_mask, valid


@triton.jit
def _grouped_shrink_kernel(
    x_ptr, fac_ptr, ranks_ptr, part_ptr,
    blk_slot_ptr, seg_start_ptr, seg_end_ptr, blk_end_ptr, perm_ptr,
    D, R_MAX, NUM_SLOTS,
    stride_xt, stride_xd,
    stride_fn, stride_fr, stride_fd,
    stride_pt,
    PREC: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    slot, rows, t_mask, valid = _block_rows(pid, blk_slot_ptr, seg_start_ptr, seg_end_ptr, blk_end_ptr,
                                            perm_ptr, NUM_SLOTS, BLOCK_T)
    rank = tl.load(ranks_ptr + slot)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    d_end = tl.where(valid, D, 0)  # surplus programs skip the loop
    for d0 in range(0, d_end, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        x = tl.load(x_ptr + rows[:, None] * stride_xt + offs_d[None, :] * stride_xd,
                    mask=t_mask[:, None] & d_mask[None, :], other=0.0)
        # The slot's factor read transposed: (BLOCK_D, BLOCK_R).
        f = tl.load(fac_ptr + slot * stride_fn + offs_r[None, :] * stride_fr + offs_d[:, None] * stride_fd,
                    mask=r_mask[None, :] & d_mask[:, None], other=0.0)
        acc = tl.dot(x, f, acc, input_precision=PREC)
    tl.store(part_ptr + rows[:, None] * stride_pt + offs_r[None, :], acc,
             mask=t_mask[:, None] & (offs_r[None, :] < R_MAX))


@triton.jit
def _grouped_expand_kernel(
    out_ptr, part_ptr, fac_ptr, ranks_ptr, scales_ptr, row_scale_ptr,
    blk_slot_ptr, seg_start_ptr, seg_end_ptr, blk_end_ptr, perm_ptr,
    N, NUM_SLOTS,
    stride_ot, stride_on,
    stride_pt,
    stride_fn, stride_fr, stride_fd,
    stride_sn, stride_sr,
    HAS_ROW_SCALE: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    COL_BLOCKS: tl.constexpr = 1,
    STAGES: tl.constexpr = 1,
):
    """out[rows] += round(S[rows] * scale * row_scale) fac_out[slot] for one block of rows sharing a
    slot, over COL_BLOCKS column blocks of BLOCK_N: the block's plan and S are read once, and with
    STAGES > 1 the next column block's output tile is loaded while this one is added (the pass is
    bound by reading and writing the output)."""
    pid = tl.program_id(0)
    pid_n = tl.program_id(1)
    slot, rows, t_mask, valid = _block_rows(pid, blk_slot_ptr, seg_start_ptr, seg_end_ptr, blk_end_ptr,
                                            perm_ptr, NUM_SLOTS, BLOCK_T)
    rank = tl.load(ranks_ptr + slot)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    scale = tl.load(scales_ptr + slot * stride_sn + offs_r * stride_sr, mask=r_mask, other=0.0).to(tl.float32)
    s = tl.load(part_ptr + rows[:, None] * stride_pt + offs_r[None, :],
                mask=t_mask[:, None] & r_mask[None, :], other=0.0)
    s = s * scale[None, :]
    if HAS_ROW_SCALE:
        s *= tl.load(row_scale_ptr + rows, mask=t_mask, other=0.0)[:, None]
    s = s.to(out_ptr.dtype.element_ty)
    n_end = tl.where(valid, N, 0)
    for j in tl.range(0, COL_BLOCKS, num_stages=STAGES):
        offs_n = (pid_n * COL_BLOCKS + j) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < n_end
        f = tl.load(fac_ptr + slot * stride_fn + offs_r[:, None] * stride_fr + offs_n[None, :] * stride_fd,
                    mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        delta = tl.dot(s, f, input_precision=PREC)
        o_ptrs = out_ptr + rows[:, None] * stride_ot + offs_n[None, :] * stride_on
        o_mask = t_mask[:, None] & n_mask[None, :]
        y = tl.load(o_ptrs, mask=o_mask, other=0.0).to(tl.float32)
        tl.store(o_ptrs, (y + delta).to(out_ptr.dtype.element_ty), mask=o_mask)


# ----------------------------------------------------------------------------------------------
# Id range check on the device


@triton.jit(debug=True)  # debug keeps device_assert in this kernel only
def _check_ids_kernel(idx_ptr, T, NUM_SLOTS, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ids = tl.load(idx_ptr + offs, mask=offs < T, other=0)
    tl.device_assert((ids >= -1) & (ids < NUM_SLOTS), "idx holds an adapter id outside [-1, num_slots)")


def check_ids_on_device(idx: torch.Tensor, num_slots: int) -> None:
    """Device-side assertion that idx (T,) lies in [-1, num_slots): one launch, no host read-back
    (a failure surfaces at the next synchronisation and ends the CUDA context). CUDA only: the
    interpreter does not raise device assertions."""
    idx = _check_ids_arg(idx)
    T = idx.shape[0]
    if T:
        launch(_check_ids_kernel, (cdiv(T, 1024),), idx, T, num_slots, BLOCK=1024, num_warps=4)


# ----------------------------------------------------------------------------------------------
# Launch functions


@functools.lru_cache(maxsize=None)
def _side_stream(device: torch.device) -> "torch.cuda.Stream":
    """One extra CUDA stream per device, for work that may overlap the current stream's."""
    return torch.cuda.Stream(device=device)


# Up to this many rows the gathered schedule runs; above it, the grouped one. Gathered re-reads each
# row's adapter (its cost grows with T); grouped reads each adapter once with tensor cores but adds
# three small launches (a flat ~25 us). Per-kernel GPU times on an H100 (64 adapters of rank 16, bf16,
# from a CUDA graph) put the crossing near T = 100 at 4096 x 4096 and T = 40 at 4096 x 14336: at
# T = 128 grouped was 58 vs 63 us and 105 vs 141 us.
GATHERED_MAX_T = 64


def _gathered_blocks(block_r: int):
    """BLOCK_D of the shrink, BLOCK_N of the expand, warps: the (BLOCK_R x BLOCK_D) float32 tile
    held per iteration stays at 4096 elements (32 registers a thread) whatever the rank."""
    if is_interpreting():
        return 32, 32, 4
    width = max(32, min(256, 4096 // block_r))
    return width, width, 4


# The grouped expand's output columns per program and warps (a read-modify-write of the output
# rows). grouped-plan-sweep-1453a14-*.json: 128 columns and 4 warps best or within 1 us of the best
# of 64/128/256 x 4/8 at T = 2048 and 8192 (a grouped pass at T = 8192, K = 64: 100 us; 8 warps on 64
# columns 117). That sweep ran a variant that issued the output tile's load first; per kernel it
# was slower than this order (routed-profile-fc2d9c8-*.json: 69.7 against 67.2 us at T = 8192, top-1;
# 137 against 128 us for top-2's two passes), so the loads stay in this order.
GROUPED_EXPAND_BLOCK_N = 128
GROUPED_EXPAND_WARPS = 4
# Column blocks per expand program, and its pipeline depth over them: four blocks, three stages took
# the grouped pass (plan, row shrink, row expand; 4096 columns, rank 16) from 93.1 to 86.4 us at
# T = 8192, K = 64 and from 85.5 to 81.7 us at K = 16; 51.0 -> 49.2 and 45.0 -> 43.1 us at T = 2048
# (H200, graph replays, two rounds in alternating order;
# bench/results/grouped-plan-sweep-colblocks-5f9b29f-*.json).
GROUPED_EXPAND_COL_BLOCKS = 4
GROUPED_EXPAND_STAGES = 3


def _grouped_blocks(T: int, dtype: torch.dtype):
    """(BLOCK_T, the shrink's BLOCK_D, the expand's BLOCK_N, the shrink's warps, the expand's warps)."""
    if is_interpreting():
        return 16, 32, 32, 4, 4
    bt = 32 if T <= 2048 else 64
    return bt, (64 if dtype == torch.float32 else 128), GROUPED_EXPAND_BLOCK_N, 4, GROUPED_EXPAND_WARPS


def _check_library(name: str, fac: torch.Tensor, x: torch.Tensor, ranks: torch.Tensor, scales: torch.Tensor):
    check_tensors(**{name: fac}, ranks=ranks, scales=scales)
    if fac.dim() != 3:
        raise ValueError(f"{name} must have shape (num_slots, r_max, D), got {tuple(fac.shape)}")
    if fac.device != x.device or fac.dtype != x.dtype:
        raise ValueError(f"{name} must be {x.dtype} on {x.device} like the rows, got {fac.dtype} on {fac.device}")
    N = fac.shape[0]
    if tuple(ranks.shape) != (N,) or ranks.dtype not in (torch.int32, torch.int64) or ranks.device != x.device:
        raise ValueError(f"ranks must be an int32/int64 tensor of shape ({N},) on {x.device}, "
                         f"got {ranks.dtype} {tuple(ranks.shape)} on {ranks.device}")
    if tuple(scales.shape) not in ((N,), (N, fac.shape[1])) or scales.device != x.device:
        raise ValueError(f"scales must have shape ({N},) (one per slot) or ({N}, {fac.shape[1]}) (one per rank "
                         f"column) on {x.device}, got {tuple(scales.shape)} on {scales.device}")


def _check_rows(x: torch.Tensor, N: int, fac_in: torch.Tensor, fac_out: torch.Tensor, ranks: torch.Tensor,
                scales: torch.Tensor, idx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The library and the row ids against rows x (T, D) and an output width N; returns (ranks, idx)
    contiguous (the kernels read them without strides)."""
    T, D = x.shape
    _check_library("fac_in", fac_in, x, ranks, scales)
    num_slots, r_max = fac_in.shape[:2]
    if fac_in.shape[2] != D:
        raise ValueError(f"fac_in must have shape (num_slots, r_max, {D}) (D of the rows), got {tuple(fac_in.shape)}")
    check_tensors(fac_out=fac_out, idx=idx)
    if tuple(fac_out.shape) != (num_slots, r_max, N):
        raise ValueError(f"fac_out must have shape ({num_slots}, {r_max}, {N}) (fac_in's slots and r_max, the "
                         f"output width), got {tuple(fac_out.shape)}")
    _check_library("fac_out", fac_out, x, ranks, scales)
    if tuple(idx.shape) != (T,) or idx.dtype not in (torch.int32, torch.int64) or idx.device != x.device:
        raise ValueError(f"idx must be an int32/int64 tensor of shape ({T},) on {x.device}, "
                         f"got {idx.dtype} {tuple(idx.shape)} on {idx.device}")
    return ranks.contiguous(), idx.contiguous()


def _check_x(x: torch.Tensor) -> Tuple[int, int]:
    check_runnable("x", x)
    if x.dim() != 2:
        raise ValueError(f"x must have shape (T, D), got {tuple(x.shape)}")
    return x.shape


def _gathered_shrink(x: torch.Tensor, fac_in: torch.Tensor, ranks: torch.Tensor, idx: torch.Tensor,
                     pdl: bool = False, check_ids: bool = False) -> torch.Tensor:
    """The row shrink's float32 partials (splits, T, r_max), one launch of (row, slice of D)
    programs: enough of them to fill the GPU even for a few rows; the consumer sums the slices,
    so the result does not depend on timing (no atomics). pdl: let a programmatic dependent start.
    check_ids: assert on the device that idx lies in [-1, num_slots) (CUDA; the interpreter does
    not raise device assertions)."""
    T, D = x.shape
    num_slots, r_max = fac_in.shape[:2]
    block_r = block_for(r_max)
    block_d, _, warps = _gathered_blocks(block_r)
    splits = max(1, min(cdiv(D, block_d), cdiv(2 * num_sms(x.device), T)))
    per_split, splits = split_range(D, splits, block_d)
    part = new_empty((splits, T, r_max), torch.float32, x.device)
    launch(_gathered_shrink_checked_kernel if check_ids and x.is_cuda else _gathered_shrink_kernel, (T, splits),
        x, fac_in, ranks, idx, part,
        D, r_max, per_split, num_slots,
        x.stride(0), x.stride(1),
        fac_in.stride(0), fac_in.stride(1), fac_in.stride(2),
        part.stride(0), part.stride(1),
        BLOCK_R=block_r, BLOCK_D=block_d, PDL=pdl, num_warps=warps,
    )
    return part


def segmented_lora_(
    out: torch.Tensor,
    x: torch.Tensor,
    fac_in: torch.Tensor,
    fac_out: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    idx: torch.Tensor,
    schedule: str = "auto",
    save_s: bool = False,
    row_scale: Optional[torch.Tensor] = None,
    base: Optional[Callable[[], object]] = None,
    check_ids: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """out[t] += round(scales[i] * (fac_in[i, :r_i] @ x[t])) @ fac_out[i, :r_i] with i = idx[t], in place.

    out: (T, N_out); x: (T, D); fac_in: (num_slots, r_max, D) and fac_out: (num_slots, r_max, N_out)
    in x's dtype (zero-padded slots; any strides); ranks (num_slots,) int, each at most r_max (not
    checked on the device: LoraLibrary guarantees it); scales (num_slots,) float32,
    or (num_slots, r_max) for a scale per rank column; idx (T,)
    int with values in [-1, num_slots) (-1: row left as it is; values are not checked here).
    schedule: "gathered", "grouped" or "auto" (by T; gathered whatever T above onchip_rank_limit).
    Returns out, or (out, S) with save_s:
    S (T, r_max) float32 = fac_in[i, :r_i] @ x[t] unscaled (zero for rows without an adapter).
    row_scale (T,) float32, optional: a factor per row on top of its slot's scale (a routed
    layer's gate), applied before the rounding.
    base, optional: a callable that writes the base product into out (e.g. cuBLAS's x W^T + b),
    called before the expand. While a CUDA graph is being captured and the schedule is gathered,
    it runs on a side stream beside the row shrink (which does not need it), so that a replay
    overlaps the two: decoding pays the base GEMM and the expand, not the shrink's latency too.
    check_ids: assert on the device (CUDA) that idx lies in [-1, num_slots); in the gathered
    schedule the row shrink does it, without a launch of its own.
    """
    T, D = _check_x(x)
    check_tensors(out=out)
    if out.dim() != 2 or out.shape[0] != T or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(f"out must be a ({T}, N_out) {x.dtype} tensor on {x.device}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    N = out.shape[1]
    ranks, idx = _check_rows(x, N, fac_in, fac_out, ranks, scales, idx)
    num_slots, r_max = fac_in.shape[:2]
    if schedule not in ("auto", "gathered", "grouped"):
        raise ValueError(f"schedule must be 'auto', 'gathered' or 'grouped', got {schedule!r}")
    if row_scale is not None and (tuple(row_scale.shape) != (T,) or row_scale.dtype != torch.float32
                                  or row_scale.device != x.device or (T > 1 and row_scale.stride(0) != 1)):
        raise ValueError(f"row_scale must be a contiguous float32 tensor of shape ({T},) on {x.device}, "
                         f"got {row_scale.dtype} {tuple(row_scale.shape)} on {row_scale.device}")
    has_rs = row_scale is not None
    row_scale_ = row_scale if has_rs else scales
    scale_strides = (scales.stride(0), 0) if scales.dim() == 1 else scales.stride()
    if schedule == "auto":
        schedule = "gathered" if T <= GATHERED_MAX_T or r_max > onchip_rank_limit(x.dtype) else "grouped"
    elif schedule == "grouped" and r_max > onchip_rank_limit(x.dtype):
        raise ValueError(f"fac_in has r_max = {r_max}; the grouped schedule holds a (BLOCK_T x r_max) tile on "
                         f"chip and takes at most {onchip_rank_limit(x.dtype)} in {x.dtype} (use 'gathered')")
    empty = T == 0 or N == 0 or D == 0 or num_slots == 0 or r_max == 0
    fork = (base is not None and schedule == "gathered" and not empty and x.is_cuda
            and torch.cuda.is_current_stream_capturing())
    if fork:
        stream, side = torch.cuda.current_stream(x.device), _side_stream(x.device)
        side.wait_stream(stream)
        with torch.cuda.stream(side):
            base()
    elif base is not None:
        base()
    if empty:
        if save_s and N == 0 and T and D and num_slots and r_max:
            # no output columns, but S is asked for (a zero-width layer's backward): the shrink alone
            return out, _gathered_shrink(x, fac_in, ranks, idx, check_ids=check_ids).sum(0)
        if check_ids and x.is_cuda:
            check_ids_on_device(idx, num_slots)
        return (out, torch.zeros((T, r_max), dtype=torch.float32, device=x.device)) if save_s else out
    block_r = block_for(r_max)
    if schedule == "gathered":
        _, block_n, warps = _gathered_blocks(block_r)
        part = _gathered_shrink(x, fac_in, ranks, idx, check_ids=check_ids)
        splits = part.shape[0]
        if fork:
            stream.wait_stream(side)  # the expand adds onto the base product
        launch(_gathered_expand_kernel, (T, cdiv(N, block_n)),
            out, part, fac_out, ranks, scales, idx, row_scale_,
            N, splits, num_slots,
            out.stride(0), out.stride(1),
            part.stride(0), part.stride(1),
            fac_out.stride(0), fac_out.stride(1), fac_out.stride(2),
            *scale_strides,
            HAS_ROW_SCALE=has_rs, BLOCK_R=block_r, BLOCK_N=block_n, BLOCK_SPLITS=block_for(splits),
            num_warps=warps,
        )
        return (out, part.sum(0)) if save_s else out

    if check_ids and x.is_cuda:
        check_ids_on_device(idx, num_slots)
    block_t, block_d, block_n, warps, expand_warps = _grouped_blocks(T, x.dtype)
    plan = group_rows(idx, num_slots, block_t)
    part = new_empty((T, r_max), torch.float32, x.device)
    prec = dot_precision(x.dtype)
    plan_args = (plan.blk_slot, plan.seg_start, plan.seg_end, plan.blk_end, plan.perm)
    launch(_grouped_shrink_kernel, (plan.num_programs,),
        x, fac_in, ranks, part, *plan_args,
        D, r_max, num_slots,
        x.stride(0), x.stride(1),
        fac_in.stride(0), fac_in.stride(1), fac_in.stride(2),
        part.stride(0),
        PREC=prec, BLOCK_T=block_t, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps,
    )
    col_blocks = GROUPED_EXPAND_COL_BLOCKS if not is_interpreting() else 2
    launch(_grouped_expand_kernel, (plan.num_programs, cdiv(N, block_n * col_blocks)),
        out, part, fac_out, ranks, scales, row_scale_, *plan_args,
        N, num_slots,
        out.stride(0), out.stride(1),
        part.stride(0),
        fac_out.stride(0), fac_out.stride(1), fac_out.stride(2),
        *scale_strides,
        HAS_ROW_SCALE=has_rs, PREC=prec, BLOCK_T=block_t, BLOCK_R=block_r, BLOCK_N=block_n, COL_BLOCKS=col_blocks,
        STAGES=GROUPED_EXPAND_STAGES, num_warps=expand_warps,
    )
    if save_s:
        valid = (idx >= 0) & (idx < num_slots)
        return out, torch.where(valid[:, None], part, 0.0)  # rows without an adapter were not written
    return out


# Up to this many rows lora_linear_segmented runs segmented_linear_decode in place of cuBLAS plus the
# gathered shrink and expand, for layers at least DECODE_MIN_WIDTH times wider than deep (d_out >=
# 2 d_in: the MLP's up and gate projections) and, where the TMA kernel runs (Hopper, 16-bit), for
# every layer. From CUDA graphs on an H100, 64 adapters of rank 16, bf16
# (bench/results/segmented-decode-*.json): at 4096 x 14336 the pointer kernel beats the unfused path
# (T = 16 71 -> 64 us, T = 64 106 -> 81 us); at 4096 x 4096 and 14336 x 4096 it is slower than
# cuBLAS's split-K GEMM by about what the fused epilogue saves, and only the TMA kernel's deeper
# pipeline (then 6 stages of 64 x 128 tiles of W in flight; decode_config has the current tiles) brings
# it ahead (4096 x 4096, T = 16: 33.2 -> 30.0 us).
DECODE_MAX_T = 64
DECODE_MIN_WIDTH = 2


def decode_chunk_rows(T: int, block_r: int) -> int:
    """Rows per dot of the decode epilogue (CHUNK_T): 256 (row, rank column) pairs, or as many rows
    as there are up to T = 4. H200, bf16, r = 16 (bench/results/decode-ablation-*.json at 1daeacc,
    2d13bef, 2df7794): at T = 1 a 16-row chunk gathered 15 masked rows' factors (4096 x 4096 21.7 ->
    20.6 us with one row per chunk, 14336 x 4096 47.1 -> 45.2); at T = 8 an 8-row chunk slowed the
    pointer kernel (4096 x 14336: 55.7 against 48.3 us with 16 rows) and left the TMA kernel as it was
    (23.3 against 23.6 us at 4096 x 4096); 4-row chunks at T = 16 cost 6-15 us."""
    full = max(1, 256 // block_r)
    return max(1, min(next_pow2(max(T, 1)), full)) if T <= 4 else full


def decode_epilogue_loop(T: int, chunk_t: int) -> int:
    """EPI_LOOP of the decode kernels: how the epilogue loops over its chunks of rows (0: a loop the
    compiler software-pipelines, 1: the same loop not pipelined, 2: unrolled over BLOCK_T). With one
    chunk the pipelined loop's prologue and waits cost 2-6 us for nothing (T = 4 / 16 at 4096 x 4096:
    24.4 -> 22.1, 26.1 -> 24.8 us; 14336 x 4096: 55.8 -> 49.9, 56.4 -> 54.9 us); with four chunks
    (T = 64) pipelining gains 2 us (39.9 against 42.5 at 4096 x 4096; decode-ablation-1daeacc-*.json)."""
    return 1 if T <= chunk_t else 0


def decode_wins(T: int, N: int, D: int, tma: bool = False) -> bool:
    """Whether segmented_linear_decode is the faster path for T rows of a (D -> N) layer; tma: whether
    its TMA kernel runs for these tensors (decode_uses_tma)."""
    return 0 < T <= DECODE_MAX_T and (tma or N >= DECODE_MIN_WIDTH * D)


@functools.lru_cache(maxsize=None)
def _pdl_supported(device_index: int) -> bool:
    """Programmatic dependent launch: Hopper or newer, and a Triton that exposes it."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return (torch.cuda.get_device_capability(device_index)[0] >= 9
            and "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})
            and hasattr(tl.extra.cuda, "gdc_wait"))


def decode_uses_tma(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The tensor-memory-accelerator path: Hopper, 16-bit inputs, rows of x and W 16-byte aligned."""
    if not x.is_cuda or is_interpreting() or x.dtype == torch.float32 or x.stride(1) != 1 or weight.stride(1) != 1:
        return False
    from .lora_gemm import _tma_available, _tma_compatible

    return _tma_available(x.device) and _tma_compatible(x, weight)


def decode_config(T: int, N: int, D: int, dtype: torch.dtype, sms: int, tma: bool = False,
                  r_max: int = 16) -> triton.Config:
    """Launch config of the decode GEMM (BLOCK_N x BLOCK_K tiles of W, one program per column block);
    tma: whether the TMA kernel can run (decode_uses_tma); r_max: the library's largest rank.

    The layer is bound by reading W once. The sweeps on the H100 (bench/segmented_decode.py): with
    at least one column block of 64 per SM (4096 x 14336) the pointer kernel's 64 x 128 tiles with 3
    stages are best or within 1 % of the best at T = 16 and 64, and the TMA kernel is no faster;
    with fewer blocks (4096 x 4096, 14336 x 4096) each program must keep more of W in flight, and
    the TMA kernel with 6 stages of 64 x 128 tiles, W's rows on the MMA's M side, is best or within
    5 % of the best at T = 16 and 64. On the H200, up to 16 rows (one row block) at ranks up to 256,
    5 stages of 64 x 256 tiles are faster still (below)."""
    if is_interpreting():
        return triton.Config({"BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)
    if tma and cdiv(N, 64) < sms:
        if T <= 16 and block_for(r_max) <= 256:
            # One 16-row block: 256-deep tiles of W, five stages (160 KB of W in flight per program
            # against 96 KB) fit in shared memory beside the epilogue's 256 (row, rank) pairs. H200,
            # bf16, 64 adapters of rank 16, from graphs, 4 rounds within 0.26 us
            # (decode-ablation-a850ed2-*.json), us against 128 x 6: 4096 x 4096 T = 1 19.9 / 20.6,
            # T = 16 24.2 / 24.9 (cuBLAS 19.2-19.7); 14336 x 4096 T = 1 43.0 / 45.2, T = 16 52.9 / 54.7
            # (cuBLAS 42.3-42.4); T = 4 and 8 on 4096 x 4096 21.2 / 21.6, 23.0 / 23.9
            # (decode-ablation-t4-t8-1c24b92-*.json). 64 rows ran out of shared memory, and 32 rows'
            # x tiles would too by arithmetic (5 x (32 + 16) KB).
            return triton.Config({"BLOCK_N": 64, "BLOCK_K": 256, "TMA": True, "SWAP": True}, num_warps=4,
                                 num_stages=5)
        return triton.Config({"BLOCK_N": 64, "BLOCK_K": 128, "TMA": True, "SWAP": True}, num_warps=4,
                             num_stages=6)
    bn = 64 if cdiv(N, 64) >= sms // 2 else 32
    return triton.Config({"BLOCK_N": bn, "BLOCK_K": 128 if dtype != torch.float32 else 64}, num_warps=4,
                         num_stages=3)


def segmented_linear_decode(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    fac_in: torch.Tensor,
    fac_out: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    idx: torch.Tensor,
    config: Optional[triton.Config] = None,
    check_ids: bool = False,
) -> torch.Tensor:
    """y[t] = x[t] W^T + b + round(scales[i] * (fac_in[i, :r_i] @ x[t])) @ fac_out[i, :r_i], i = idx[t].

    For few rows (decoding, T <= DECODE_MAX_T; faster than cuBLAS plus segmented_lora_ where
    decode_wins says so): the gathered row shrink, then one GEMM over all rows whose epilogue adds
    each row's adapter term, so the output is written once and never read back. On Hopper the GEMM
    is launched as a programmatic dependent of the shrink: it streams W while the shrink runs; with
    16-bit inputs it reads x and W by TMA copies (_decode_tma_kernel).

    x: (T, D); weight: (N, D); bias: (N,) or None; the library as in segmented_lora_ (zero-padded
    slots; scales (num_slots,) or (num_slots, r_max)); idx (T,) int in [-1, num_slots) (not
    range-checked here). config: a triton.Config with BLOCK_N and BLOCK_K, and optionally TMA and
    SWAP (the TMA kernel, where decode_uses_tma), CHUNK_T and EPI_LOOP (the epilogue's chunks and
    loop: decode_chunk_rows, decode_epilogue_loop; for tuning), else decode_config's. Returns y (T, N)
    in x's dtype. Fixed shapes, no host read-back: CUDA-graph capturable. check_ids: the row shrink
    asserts on the device (CUDA) that idx lies in [-1, num_slots).
    """
    T, D = _check_x(x)
    if weight.dim() != 2 or weight.shape[1] != D or weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"weight must be a (N, {D}) {x.dtype} tensor on {x.device}, "
                         f"got {weight.dtype} {tuple(weight.shape)} on {weight.device}")
    N = weight.shape[0]
    if bias is not None and (tuple(bias.shape) != (N,) or bias.dtype != x.dtype or bias.device != x.device):
        raise ValueError(f"bias must be a ({N},) {x.dtype} tensor on {x.device}, "
                         f"got {bias.dtype} {tuple(bias.shape)} on {bias.device}")
    if T > DECODE_MAX_T:
        raise ValueError(f"segmented_linear_decode takes at most {DECODE_MAX_T} rows, got T = {T} "
                         "(use segmented_lora_ onto a base product)")
    bias = unit_vector(bias)  # the kernel reads it without a stride: a sliced or expanded bias is copied
    ranks, idx = _check_rows(x, N, fac_in, fac_out, ranks, scales, idx)
    num_slots, r_max = fac_in.shape[:2]
    if T == 0 or N == 0 or D == 0 or num_slots == 0 or r_max == 0:  # nothing for the kernels to do
        if check_ids and x.is_cuda:
            check_ids_on_device(idx, num_slots)
        return torch.nn.functional.linear(x, weight, bias)
    tma = decode_uses_tma(x, weight)
    cfg = config or decode_config(T, N, D, x.dtype, num_sms(x.device), tma, r_max)
    block_n, block_k = cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]
    pdl = x.is_cuda and not is_interpreting() and _pdl_supported(x.device.index if x.device.index is not None
                                                                  else torch.cuda.current_device())
    block_r = block_for(r_max)
    part = _gathered_shrink(x, fac_in, ranks, idx, pdl=pdl, check_ids=check_ids)
    splits = part.shape[0]
    y = new_empty((T, N), x.dtype, x.device)
    pdl_opt = {"launch_pdl": True} if pdl else {}
    scale_strides = (scales.stride(0), 0) if scales.dim() == 1 else scales.stride()
    chunk_t = cfg.kwargs.get("CHUNK_T", decode_chunk_rows(T, block_r))
    if not (isinstance(chunk_t, int) and chunk_t >= 1 and chunk_t & (chunk_t - 1) == 0):
        raise ValueError(f"config CHUNK_T must be a power of two >= 1, got {chunk_t!r}")
    if cfg.kwargs.get("EPI_LOOP", 0) not in (0, 1, 2):
        raise ValueError(f"config EPI_LOOP must be 0, 1 or 2, got {cfg.kwargs['EPI_LOOP']!r}")
    common = dict(HAS_BIAS=bias is not None, PREC=dot_precision(x.dtype), BLOCK_T=block_for(T), BLOCK_N=block_n,
                  BLOCK_K=block_k, BLOCK_SPLITS=max(2, next_pow2(splits)), BLOCK_R=block_r,
                  CHUNK_T=chunk_t, EPI_LOOP=cfg.kwargs.get("EPI_LOOP", decode_epilogue_loop(T, chunk_t)), PDL=pdl,
                  num_warps=cfg.num_warps,
                  num_stages=cfg.num_stages, **pdl_opt)
    if cfg.kwargs.get("TMA", False) and tma:
        from triton.tools.tensor_descriptor import TensorDescriptor
        x_desc = TensorDescriptor(x, [T, D], [x.stride(0), 1], [common["BLOCK_T"], block_k])
        w_desc = TensorDescriptor(weight, [N, D], [weight.stride(0), 1], [block_n, block_k])
        launch(_decode_tma_kernel, (cdiv(N, block_n),),
            x_desc, w_desc, bias if bias is not None else y, y, part, fac_out, ranks, scales, idx,
            T, N, D, splits, num_slots,
            y.stride(0), y.stride(1),
            part.stride(0), part.stride(1),
            fac_out.stride(0), fac_out.stride(1), fac_out.stride(2),
            *scale_strides,
            SWAP=cfg.kwargs.get("SWAP", False), **common,
        )
        return y
    launch(_decode_kernel, (cdiv(N, block_n),),
        x, weight, bias if bias is not None else y, y, part, fac_out, ranks, scales, idx,
        T, N, D, r_max, splits, num_slots,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), y.stride(0), y.stride(1),
        part.stride(0), part.stride(1),
        fac_out.stride(0), fac_out.stride(1), fac_out.stride(2),
        *scale_strides,
        EVEN_K=D % block_k == 0, EVEN_N=N % block_n == 0, **common,
    )
    return y


# ----------------------------------------------------------------------------------------------
# Gradients of the library's factors: per-slot sums over that slot's rows


@triton.jit
def _grouped_outer_kernel(
    u_ptr, v_ptr, scales_ptr, out_ptr, seg_start_ptr, seg_end_ptr, perm_ptr,
    D, R_MAX,
    stride_ut, stride_vt, stride_vd, stride_on, stride_or,
    PREC: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[i] = scales[i] * sum over slot i's rows t of u[t]^T v[t]: (R_MAX, D) per slot. One program
    per (slot, column block) walks the slot's rows in order: deterministic, no atomics."""
    slot = tl.program_id(0)
    pid_d = tl.program_id(1)
    start = tl.load(seg_start_ptr + slot)
    end = tl.load(seg_end_ptr + slot)
    offs_r = tl.arange(0, BLOCK_R)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    r_mask = offs_r < R_MAX
    d_mask = offs_d < D
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for t0 in range(start, end, BLOCK_T):
        offs = t0 + tl.arange(0, BLOCK_T)
        t_mask = offs < end
        rows = tl.load(perm_ptr + offs, mask=t_mask, other=0).to(tl.int64)
        # u read transposed, (BLOCK_R, BLOCK_T), and rounded to v's dtype for the tensor cores.
        u = tl.load(u_ptr + rows[None, :] * stride_ut + offs_r[:, None], mask=r_mask[:, None] & t_mask[None, :],
                    other=0.0).to(v_ptr.dtype.element_ty)
        v = tl.load(v_ptr + rows[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                    mask=t_mask[:, None] & d_mask[None, :], other=0.0)
        acc = tl.dot(u, v, acc, input_precision=PREC)
    scale = tl.load(scales_ptr + slot).to(tl.float32)
    tl.store(out_ptr + slot * stride_on + offs_r[:, None] * stride_or + offs_d[None, :], acc * scale,
             mask=r_mask[:, None] & d_mask[None, :])


def segmented_outer(u: torch.Tensor, v: torch.Tensor, scales: torch.Tensor, plan: GroupPlan) -> torch.Tensor:
    """(num_slots, r_max, D) float32: scales[i] * sum over slot i's rows t of u[t]^T v[t].

    u: (T, r_max) float32 (e.g. S or dS'); v: (T, D) (x or dY); plan: group_rows of the ids.
    Slots without rows get zeros."""
    check_runnable("v", v)
    if v.dim() != 2:
        raise ValueError(f"v must have shape (T, D), got {tuple(v.shape)}")
    T, D = v.shape
    if (not isinstance(u, torch.Tensor) or u.dim() != 2 or u.shape[0] != T or u.dtype != torch.float32
            or u.stride(-1) != 1 or u.device != v.device):
        got = f"{u.dtype} {tuple(u.shape)} on {u.device}" if isinstance(u, torch.Tensor) else type(u).__name__
        raise ValueError(f"u must be a contiguous-row ({T}, r_max) float32 tensor on {v.device}, got {got}")
    r_max = u.shape[1]
    if plan.perm.shape[0] != T or plan.perm.device != v.device:
        raise ValueError(f"plan must come from group_rows of {T} ids on {v.device}, got one of "
                         f"{plan.perm.shape[0]} on {plan.perm.device}")
    if (not isinstance(scales, torch.Tensor) or tuple(scales.shape) != (plan.num_slots,)
            or scales.dtype != torch.float32 or scales.device != v.device):
        got = (f"{scales.dtype} {tuple(scales.shape)} on {scales.device}" if isinstance(scales, torch.Tensor)
               else type(scales).__name__)
        raise ValueError(f"scales must be a float32 tensor of shape ({plan.num_slots},) on {v.device}, got {got}")
    scales = scales.contiguous()
    out = new_empty((plan.num_slots, r_max, D), torch.float32, v.device)
    if plan.num_slots == 0 or r_max == 0 or D == 0:
        return out
    block_d = 32 if is_interpreting() else (64 if v.dtype == torch.float32 else 128)
    launch(_grouped_outer_kernel, (plan.num_slots, cdiv(D, block_d)),
        u, v, scales, out, plan.seg_start, plan.seg_end, plan.perm,
        D, r_max,
        u.stride(0), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        PREC=dot_precision(v.dtype), BLOCK_T=plan.block_t, BLOCK_R=block_for(r_max), BLOCK_D=block_d, num_warps=4,
    )
    return out

"""Per-request adapters (mixed batches for serving): one base layer, a library of LoRA adapters, and
every row (or every sequence) of a batch using its own adapter, or none.

    library = LoraLibrary.from_adapters([(A_1, B_1, s_1), ..., (A_n, B_n, s_n)])
    y = lora_linear_segmented(x, weight, bias, library, idx)

y[t] = x[t] W^T + b + s_i (x[t] A_i^T) B_i^T with i = idx[t]; idx[t] = -1 leaves the row to the base
layer. On CUDA (and on the CPU under TRITON_INTERPRET=1) the low-rank part runs in two Triton
kernels added onto the cuBLAS base product (lorafuse/kernels/segmented.py), with no read-back to the
host: the call can be captured in a CUDA graph and replayed with new ids written into the same idx
tensor. Elsewhere it runs in plain torch.
"""
from __future__ import annotations

import copy
import functools
import numbers
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from lorafuse.kernels.segmented import (check_ids_on_device, decode_uses_tma, decode_wins, group_rows,
                                        segmented_linear_decode, segmented_lora_, segmented_outer)
from lorafuse.kernels.utils import is_interpreting

from .modules import WrapsBaseLayer, _check_adapters
from .ops import _use_kernels, autocast_inputs, first_order_only, rows_of

__all__ = ["LoraLibrary", "lora_linear_segmented", "lora_linear_segmented_reference", "SegmentedLoraLinear",
           "AdapterIds", "LibraryHandle", "attach_library"]


class LoraLibrary:
    """LoRA adapters packed into fixed slots, zero-padded to the largest rank.

    a: (num_slots, r_max, d_in), slot i's A_i in a[i, :r_i];
    b: (num_slots, r_max, d_out), slot i's B_i^T in b[i, :r_i] (rows of B^T, so that the expand reads
       contiguous rows of d_out);
    ranks: (num_slots,) int32 (0 for an empty slot); scales: (num_slots,) float32.

    The kernels mask everything beyond a slot's rank, so mixed ranks cost no extra memory traffic;
    the padding costs memory only (num_slots * r_max * (d_in + d_out) elements). Slots can be
    rewritten in place (`set_adapter`, `clear`) without changing any tensor's storage, so a captured
    CUDA graph keeps working with the new adapters.
    """

    def __init__(self, a: Tensor, b: Tensor, ranks: Tensor, scales: Tensor) -> None:
        if not isinstance(a, Tensor) or a.dim() != 3:
            raise ValueError(f"a must have shape (num_slots, r_max, d_in), got "
                             f"{tuple(a.shape) if isinstance(a, Tensor) else type(a).__name__}")
        n, r_max, _ = a.shape
        if not isinstance(b, Tensor) or b.dim() != 3 or tuple(b.shape[:2]) != (n, r_max):
            raise ValueError(f"b must have shape ({n}, {r_max}, d_out), got "
                             f"{tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__}")
        if b.dtype != a.dtype or b.device != a.device:
            raise ValueError(f"b must be {a.dtype} on {a.device} like a, got {b.dtype} on {b.device}")
        if not a.is_floating_point():
            raise ValueError(f"a and b must be floating point, got {a.dtype}")
        if (not isinstance(ranks, Tensor) or tuple(ranks.shape) != (n,) or ranks.is_floating_point()
                or ranks.dtype == torch.bool or ranks.is_complex()):
            raise ValueError(f"ranks must be an integer tensor of shape ({n},), got {ranks!r}")
        if (not isinstance(scales, Tensor) or tuple(scales.shape) != (n,) or scales.dtype == torch.bool
                or scales.is_complex()):
            raise ValueError(f"scales must be a real tensor of shape ({n},), got {scales!r}")
        # Checked once here (a host read): the kernels trust every slot's rank to fit in r_max.
        if n and (int(ranks.min()) < 0 or int(ranks.max()) > r_max):
            raise ValueError(f"ranks must lie in [0, {r_max}] (r_max, the second dimension of a), "
                             f"got {ranks.tolist()}")
        if n and not bool(torch.isfinite(scales).all()):
            raise ValueError(f"scales must be finite, got {scales.tolist()}")
        self.a = a
        self.b = b
        # Contiguous: the kernels index both vectors by slot without a stride.
        self.ranks = ranks.to(a.device, torch.int32).contiguous()
        self.scales = scales.to(a.device, torch.float32).contiguous()

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def empty(cls, num_slots: int, r_max: int, d_in: int, d_out: int, dtype: torch.dtype = torch.float32,
              device: Optional[torch.device] = None) -> "LoraLibrary":
        """A library of num_slots empty slots (rank 0) of up to rank r_max."""
        for name, v in (("num_slots", num_slots), ("r_max", r_max), ("d_in", d_in), ("d_out", d_out)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        num_slots, r_max, d_in, d_out = int(num_slots), int(r_max), int(d_in), int(d_out)
        return cls(torch.zeros((num_slots, r_max, d_in), dtype=dtype, device=device),
                   torch.zeros((num_slots, r_max, d_out), dtype=dtype, device=device),
                   torch.zeros((num_slots,), dtype=torch.int32, device=device),
                   torch.zeros((num_slots,), dtype=torch.float32, device=device))

    @classmethod
    def from_adapters(
        cls,
        adapters: Sequence[Tuple[Tensor, Tensor, float]],
        num_slots: Optional[int] = None,
        r_max: Optional[int] = None,
        dtype: Optional[torch.dtype] = None,
        device: Optional[torch.device] = None,
    ) -> "LoraLibrary":
        """Pack [(A_i (r_i, d_in), B_i (d_out, r_i), s_i), ...] into slots 0..n-1.

        num_slots (default n) and r_max (default max r_i) leave room for adapters set later;
        dtype and device default to the first adapter's.
        """
        adapters = list(adapters)
        if not adapters or not isinstance(adapters[0], (tuple, list)) or len(adapters[0]) != 3:
            raise ValueError("adapters must be a non-empty list of (A, B, scale) triples")
        a0, b0, _ = adapters[0]
        if not isinstance(a0, Tensor) or a0.dim() != 2 or not isinstance(b0, Tensor) or b0.dim() != 2:
            raise ValueError("adapters[0] must hold A (r, d_in) and B (d_out, r) tensors")
        d_in, d_out = a0.shape[1], b0.shape[0]
        adapters = _check_adapters(adapters, d_in, d_out)
        n = len(adapters)
        for name, v in (("num_slots", num_slots), ("r_max", r_max)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1):
                raise ValueError(f"{name} must be None or a positive integer, got {v!r}")
        num_slots = n if num_slots is None else int(num_slots)
        if num_slots < n:
            raise ValueError(f"num_slots must be at least the number of adapters ({n}), got {num_slots}")
        top = max(a.shape[0] for a, _, _ in adapters)
        r_max = top if r_max is None else int(r_max)
        if r_max < top:
            raise ValueError(f"r_max must be at least the largest rank ({top}), got {r_max}")
        lib = cls.empty(num_slots, r_max, d_in, d_out, dtype or a0.dtype, device or a0.device)
        for i, (a, b, s) in enumerate(adapters):
            lib.set_adapter(i, a, b, s)
        return lib

    @torch.no_grad()
    def set_adapter(self, slot: int, a: Tensor, b: Tensor, scale: float) -> None:
        """Write A (r, d_in), B (d_out, r), scale into `slot` in place (r <= r_max)."""
        slot = self._check_slot(slot)
        (a, b, scale), = _check_adapters([(a, b, scale)], self.d_in, self.d_out)
        r = a.shape[0]
        if r > self.r_max:
            raise ValueError(f"the adapter's rank {r} exceeds the library's r_max {self.r_max}")
        self.a[slot].zero_()
        self.b[slot].zero_()
        self.a[slot, :r].copy_(a)
        self.b[slot, :r].copy_(b.t())
        self.ranks[slot] = r
        self.scales[slot] = scale

    @torch.no_grad()
    def clear(self, slot: int) -> None:
        """Empty `slot` (rank 0): rows routed to it get the base layer only."""
        slot = self._check_slot(slot)
        self.a[slot].zero_()
        self.b[slot].zero_()
        self.ranks[slot] = 0
        self.scales[slot] = 0.0

    def _check_slot(self, slot: int) -> int:
        if isinstance(slot, bool) or not isinstance(slot, numbers.Integral) or not 0 <= slot < self.num_slots:
            raise ValueError(f"slot must be an integer in [0, {self.num_slots}), got {slot!r}")
        return int(slot)

    def adapter(self, slot: int) -> Tuple[Tensor, Tensor, float]:
        """Slot `slot` as (A (r, d_in), B (d_out, r), scale) (reads the rank back to the host)."""
        slot = self._check_slot(slot)
        r = int(self.ranks[slot])
        return self.a[slot, :r], self.b[slot, :r].t(), float(self.scales[slot])

    def to(self, device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> "LoraLibrary":
        """A copy on `device` with the factors in `dtype` (ranks and scales keep theirs); never shares
        memory with this library (set_adapter or clear on one leaves the other as it was)."""
        return LoraLibrary(self.a.to(device=device, dtype=dtype, copy=True),
                           self.b.to(device=device, dtype=dtype, copy=True),
                           self.ranks.to(device, copy=True), self.scales.to(device, copy=True))

    # -- properties -----------------------------------------------------------------------------

    @property
    def num_slots(self) -> int:
        return self.a.shape[0]

    @property
    def r_max(self) -> int:
        return self.a.shape[1]

    @property
    def d_in(self) -> int:
        return self.a.shape[2]

    @property
    def d_out(self) -> int:
        return self.b.shape[2]

    @property
    def dtype(self) -> torch.dtype:
        return self.a.dtype

    @property
    def device(self) -> torch.device:
        return self.a.device

    def __len__(self) -> int:
        return self.num_slots

    def __repr__(self) -> str:
        return (f"LoraLibrary(num_slots={self.num_slots}, r_max={self.r_max}, d_in={self.d_in}, "
                f"d_out={self.d_out}, dtype={self.dtype}, device={self.device})")


# ----------------------------------------------------------------------------------------------
# Argument checks


def _row_ids(x: Tensor, idx: Tensor) -> Tensor:
    """idx as one id per row of x.reshape(-1, d_in): idx of shape x.shape[:-1] (per token), or (B,)
    for x (B, L, d_in) (per sequence)."""
    if not isinstance(idx, Tensor):
        raise TypeError(f"idx must be a torch.Tensor of adapter ids, got {type(idx).__name__}")
    if idx.dtype not in (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8):
        raise ValueError(f"idx must be an integer tensor (int32/int64), got {idx.dtype}")
    if idx.device != x.device:
        raise ValueError(f"idx must be on {x.device} like x, got {idx.device}")
    if idx.dtype not in (torch.int32, torch.int64):
        idx = idx.to(torch.int32)
    lead = tuple(x.shape[:-1])
    if tuple(idx.shape) == lead:
        return idx.reshape(-1)
    if x.dim() == 3 and tuple(idx.shape) == (x.shape[0],):
        return idx[:, None].expand(lead).reshape(-1)
    want = f"{lead} (one id per row)" + (f" or ({x.shape[0]},) (one id per sequence)" if x.dim() == 3 else "")
    raise ValueError(f"idx must have shape {want}, got {tuple(idx.shape)}")


def _check_ids_in_range(ids: Tensor, num_slots: int) -> None:
    """Ids outside [-1, num_slots) are an error. On CUDA this is a device-side assertion (a failure
    surfaces at a later synchronisation and ends the CUDA context): checking on the host would
    stall every call and break graph capture."""
    if ids.numel() == 0:
        return
    if torch.compiler.is_compiling():
        # With a message: compilers keep the assertion (one without is dropped as dead code).
        torch._assert_async((ids >= -1).all() & (ids < num_slots).all(),
                            f"idx must hold adapter ids in [-1, {num_slots}) (-1: no adapter)")
        return
    if ids.is_cuda:
        check_ids_on_device(ids, num_slots)  # one small launch
        return
    ok = (ids >= -1).all() & (ids < num_slots).all()
    if not bool(ok):
        bad = ids[(ids < -1) | (ids >= num_slots)][0].item()
        raise ValueError(f"idx must hold adapter ids in [-1, {num_slots}) (-1: no adapter), got {bad}")


def _check_args(x, weight, bias, library) -> None:
    if not isinstance(x, Tensor) or x.dim() < 1 or not x.is_floating_point():
        raise ValueError("x must be a floating-point tensor of shape (..., d_in)")
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must have shape (d_out, d_in), got "
                         f"{tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__}")
    d_out, d_in = weight.shape
    if x.shape[-1] != d_in:
        raise ValueError(f"x must have shape (..., {d_in}) to match weight {tuple(weight.shape)}, got {tuple(x.shape)}")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"weight must be {x.dtype} on {x.device} like x, got {weight.dtype} on {weight.device}")
    if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != (d_out,)
                             or bias.dtype != x.dtype or bias.device != x.device):
        raise ValueError(f"bias must be None or a ({d_out},) {x.dtype} tensor on {x.device}")
    if not isinstance(library, LoraLibrary):
        hint = (": pack (A, B, scale) triples with LoraLibrary.from_adapters(adapters) first"
                if isinstance(library, (list, tuple)) else "")
        raise TypeError(f"library must be a LoraLibrary, got {type(library).__name__}{hint}")
    if (library.d_in, library.d_out) != (d_in, d_out):
        raise ValueError(f"library must hold adapters of d_in={d_in}, d_out={d_out} (the weight's), "
                         f"got d_in={library.d_in}, d_out={library.d_out}")
    if library.device != x.device or library.dtype != x.dtype:
        raise ValueError(f"library must be {x.dtype} on {x.device} like x, got {library.dtype} on "
                         f"{library.device}: use library.to({x.device!r}, {x.dtype})")


# ----------------------------------------------------------------------------------------------
# Plain torch


def _lowrank_torch(x2: Tensor, library: LoraLibrary, ids: Tensor, acc: torch.dtype) -> Tensor:
    """(T, d_out): row t's s_i (x A_i^T) B_i^T (zero where the id is outside [0, num_slots)), with S'
    rounded to x's dtype as the kernels do. On CUDA the rows' adapters are gathered (no read-back to
    the host; memory T * r_max * (d_in + d_out)); elsewhere a loop over the slots present."""
    has = (ids >= 0) & (ids < library.num_slots)
    # Only each slot's first ranks[i] rows of a and b are its adapter (the padding is not read).
    if not ids.is_cuda:
        out = x2.new_zeros((x2.shape[0], library.d_out), dtype=acc)
        for i in torch.unique(ids[has]).tolist():
            rows = (ids == i).nonzero().squeeze(1)
            r = int(library.ranks[i])
            s = (x2[rows].to(acc) @ library.a[i, :r].to(acc).t()) * library.scales[i].to(acc)
            out = out.index_add(0, rows, s.to(x2.dtype).to(acc) @ library.b[i, :r].to(acc))
        return out
    slot = torch.where(has, ids, 0).long()
    s = torch.einsum("td,trd->tr", x2.to(acc), library.a[slot].to(acc))
    in_rank = torch.arange(library.r_max, device=ids.device)[None, :] < library.ranks[slot][:, None]
    s = torch.where(in_rank, s, 0.0)
    s = s * (library.scales[slot].to(acc) * has.to(acc))[:, None]
    s = s.to(x2.dtype).to(acc)
    return torch.einsum("tr,trn->tn", s, library.b[slot].to(acc))


def lora_linear_segmented_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor], library: LoraLibrary,
                                    idx: Tensor) -> Tensor:
    """Plain torch, in the inputs' dtype (float64 for tests): y[t] = x[t] W^T + b + s_i (x[t] A_i^T) B_i^T.

    Loops over the slots that occur (reads ids back to the host): a definition, not a fast path.
    """
    ids = _row_ids(x, idx)
    x2 = rows_of(x)
    y = F.linear(x2, weight, bias)
    for i in torch.unique(ids).tolist():
        if i < 0:
            continue
        rows = (ids == i).nonzero().squeeze(1)
        a, b, s = library.adapter(int(i))
        y = y.index_add(0, rows, s * (x2[rows] @ a.to(x.dtype).t()) @ b.to(x.dtype).t())
    return y.reshape(*x.shape[:-1], weight.shape[0])


# ----------------------------------------------------------------------------------------------
# Kernels with autograd for x, weight and bias


@torch.library.custom_op("lorafuse::segmented_lora_add", mutates_args=("out",))
def _segmented_op(out: Tensor, x: Tensor, fac_in: Tensor, fac_out: Tensor, ranks: Tensor, scales: Tensor,
                  ids: Tensor, schedule: str) -> None:
    """segmented_lora_ as a custom op, so that torch.compile sees one opaque in-place step."""
    segmented_lora_(out, x, fac_in, fac_out, ranks, scales, ids, schedule)


@_segmented_op.register_fake
def _(out, x, fac_in, fac_out, ranks, scales, ids, schedule):
    return None


def _add_lowrank_(out, x, fac_in, fac_out, ranks, scales, ids, schedule, check_ids: bool = False) -> Tensor:
    if torch.compiler.is_compiling():  # (check_ids is only asked for outside torch.compile)
        torch.ops.lorafuse.segmented_lora_add(out, x, fac_in, fac_out, ranks, scales, ids, schedule)
    else:  # eager: the launch function directly (a custom op's dispatch costs host time per call)
        segmented_lora_(out, x, fac_in, fac_out, ranks, scales, ids, schedule, check_ids=check_ids)
    return out


def _linear_lowrank(x2, weight, bias, fac_in, fac_out, ranks, scales, ids, schedule, check_ids=False) -> Tensor:
    """x2 W^T + b plus the rows' low-rank terms, no autograd. Few rows (decode_wins)
    run segmented_linear_decode (the row expand in our GEMM's epilogue); otherwise cuBLAS, then
    segmented_lora_. While a CUDA graph is being captured, the base GEMM goes to segmented_lora_ as
    `base`, which overlaps it with the row shrink. check_ids: the kernels assert the ids' range."""
    compiling = torch.compiler.is_compiling()
    if (not compiling and schedule != "grouped" and weight.stride(-1) == 1
            and decode_wins(x2.shape[0], weight.shape[0], x2.shape[1], decode_uses_tma(x2, weight))):
        return segmented_linear_decode(x2, weight, bias, fac_in, fac_out, ranks, scales, ids, check_ids=check_ids)
    if compiling or not (x2.is_cuda and torch.cuda.is_current_stream_capturing()):
        return _add_lowrank_(F.linear(x2, weight, bias), x2, fac_in, fac_out, ranks, scales, ids, schedule,
                             check_ids)
    y = x2.new_empty((x2.shape[0], weight.shape[0]))
    wt = weight.t()
    if bias is None:
        def base():
            torch.mm(x2, wt, out=y)
    else:
        def base():
            torch.addmm(bias, x2, wt, out=y)
    return segmented_lora_(y, x2, fac_in, fac_out, ranks, scales, ids, schedule, base=base, check_ids=check_ids)


class _SegmentedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, weight, bias, ids, a, b, ranks, scales, schedule):
        lib_grads = any(ctx.needs_input_grad[i] for i in (4, 5, 7))
        y = F.linear(x2, weight, bias)
        if lib_grads:
            # The library's gradients need S = x A_i^T of every row (float32, unscaled).
            y, s = segmented_lora_(y, x2, a, b, ranks, scales, ids, schedule, save_s=True)
        else:
            y, s = _add_lowrank_(y, x2, a, b, ranks, scales, ids, schedule), None
        ctx.save_for_backward(x2, weight, ids, a, b, ranks, scales, s)
        ctx.schedule = schedule
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        first_order_only("lorafuse.lora_linear_segmented")
        x2, weight, ids, a, b, ranks, scales, s = ctx.saved_tensors
        n_x, n_w, n_b, _, n_a, n_bb, _, n_s, _ = ctx.needs_input_grad
        dy = dy.contiguous()
        dx = dw = db = da = dbb = dscales = None
        ds = None  # dS = dY B_i (T, r_max) float32, unscaled
        if n_x:
            # dx = dY W + s_i (dY B_i) A_i: the same two kernels with the factors swapped.
            if n_a or n_s:
                dx, ds = segmented_lora_(dy @ weight, dy, b, a, ranks, scales, ids, ctx.schedule, save_s=True)
            else:
                dx = _add_lowrank_(dy @ weight, dy, b, a, ranks, scales, ids, ctx.schedule)
        elif n_a or n_s:
            _, ds = segmented_lora_(torch.zeros_like(x2), dy, b, a, ranks, scales, ids, ctx.schedule, save_s=True)
        if n_w:
            dw = dy.t() @ x2
        if n_b and ctx.has_bias:
            db = dy.sum(0, dtype=torch.float32).to(dy.dtype)
        if n_a or n_bb or n_s:
            num_slots = a.shape[0]
            plan = group_rows(ids, num_slots, 16 if is_interpreting() else 64)
            if n_a:  # dA_i = s_i sum_t dS[t]^T x[t]
                da = segmented_outer(ds, x2, scales, plan).to(a.dtype)
            if n_bb:  # d(B_i^T) = s_i sum_t S[t]^T dY[t]
                dbb = segmented_outer(s, dy, scales, plan).to(b.dtype)
            if n_s:  # ds_i = sum_t S[t] . dS[t]
                valid = (ids >= 0) & (ids < num_slots)
                per_row = torch.where(valid, (s * ds).sum(1), 0.0)
                dscales = torch.zeros(num_slots, dtype=torch.float32, device=dy.device).index_add_(
                    0, torch.where(valid, ids, 0).long(), per_row).to(scales.dtype)
        return dx, dw, db, None, da, dbb, None, dscales, None


def _autocast_library(fn):
    """Under torch.autocast the library's factors are cast to the autocast dtype with x, W and b
    (differentiably: a trainable float32 library gets its gradients), as autocast casts weights."""

    @functools.wraps(fn)
    def wrapper(x, weight, bias, library, *args, **kwargs):
        lowp = (torch.float16, torch.bfloat16, torch.float32)  # the dtypes autocast casts (not float64)
        if (isinstance(x, Tensor) and isinstance(library, LoraLibrary) and torch.is_autocast_enabled(x.device.type)
                and x.dtype in lowp and library.device == x.device and library.dtype in lowp):
            dt = torch.get_autocast_dtype(x.device.type)
            if library.dtype != dt:
                cast = copy.copy(library)  # (not through __init__: its checks read the device)
                cast.a, cast.b = library.a.to(dt), library.b.to(dt)
                library = cast
        return fn(x, weight, bias, library, *args, **kwargs)

    return wrapper


@_autocast_library
@autocast_inputs
def lora_linear_segmented(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    library: LoraLibrary,
    idx: Tensor,
    schedule: str = "auto",
    check_ids: bool = True,
) -> Tensor:
    """y[t] = x[t] W^T + b + s_i (x[t] A_i^T) B_i^T with i = the row's adapter id (-1: none).

    x: (..., d_in); weight: (d_out, d_in); bias: (d_out,) or None; library: a LoraLibrary in x's
    dtype and device; idx: integer ids in [-1, library.num_slots), of shape x.shape[:-1] (one per
    row), or (B,) for x of shape (B, L, d_in) (one per sequence). Returns (..., d_out).

    Nothing is read back to the host (CUDA-graph capturable at fixed shapes); ids are range-checked
    with a device-side assertion (check_ids=False skips even that). schedule: "auto", "gathered"
    (one program per row, for decoding; without gradients, up to 64 rows take the decode kernels,
    which add the rows' adapters in the base GEMM's epilogue, where kernels.segmented.decode_wins
    says they are faster) or "grouped" (rows grouped by adapter, for large batches);
    the plain-torch path runs where the kernels cannot (CPU without TRITON_INTERPRET=1, float64).
    Differentiable in x, weight and bias, and in the library's a, b and scales where they require
    grad (eagerly: not under torch.compile).
    """
    _check_args(x, weight, bias, library)
    if schedule not in ("auto", "gathered", "grouped"):  # checked here too: empty batches skip the kernels
        raise ValueError(f"schedule must be 'auto', 'gathered' or 'grouped', got {schedule!r}")
    ids = _row_ids(x, idx)
    grad_on = torch.is_grad_enabled()
    lib_grads = grad_on and any(t.requires_grad for t in (library.a, library.b, library.scales))
    if lib_grads and torch.compiler.is_compiling():
        raise NotImplementedError(
            "gradients of the library's factors (a, b, scales) are computed eagerly only: call "
            "lora_linear_segmented outside torch.compile, or freeze the library (requires_grad_(False))")
    lead, d_out = x.shape[:-1], weight.shape[0]
    x2 = rows_of(x)
    kernels = x2.shape[0] != 0 and _use_kernels(x2)
    needs_grad = lib_grads or (grad_on and any(t is not None and t.requires_grad for t in (x2, weight, bias)))
    # On CUDA without gradients the kernels check the ids themselves (no launch of its own).
    check_in_kernels = (check_ids and kernels and not needs_grad and ids.is_cuda
                        and not torch.compiler.is_compiling())
    if check_ids and not check_in_kernels:
        _check_ids_in_range(ids, library.num_slots)
    if not kernels:
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        y = F.linear(x2, weight, bias) + _lowrank_torch(x2, library, ids, acc).to(x.dtype)
        return y.reshape(*lead, d_out)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    ids = ids.contiguous()
    if needs_grad:
        y = _SegmentedFunction.apply(x2, weight, bias, ids, library.a, library.b, library.ranks,
                                     library.scales, schedule)
    else:
        y = _linear_lowrank(x2, weight, bias, library.a, library.b, library.ranks, library.scales, ids, schedule,
                            check_in_kernels)
    return y.reshape(*lead, d_out)


# ----------------------------------------------------------------------------------------------
# A whole model: every targeted layer serves the library; the ids are set per batch


class AdapterIds:
    """The ids the next forward uses, shared by every SegmentedLoraLinear of a model.

    `value`: an integer tensor of shape (B,) (one adapter per sequence) or (B, L) (per token), on the
    model's device, -1 for the base model. For CUDA graphs, set it once to a buffer and copy new ids
    into that buffer before each replay.
    """

    def __init__(self) -> None:
        self.value: Optional[Tensor] = None

    def get(self) -> Tensor:
        if self.value is None:
            raise RuntimeError("no adapter ids are set: call set_ids(ids) on the handle from attach_library "
                               "before running the model")
        return self.value


def _applied_in_place(t: Tensor, fn) -> Tensor:
    """fn(t) as nn.Module._apply does it for a parameter: into t itself where the tensor types allow
    (a trainable factor stays the leaf its optimizer holds), its gradient along with it; else (to or
    from the meta device) the new tensor, with t's requires_grad."""
    applied = fn(t)
    if applied is t:
        return t
    if not torch._has_compatible_shallow_copy_type(t, applied):
        return applied.requires_grad_(t.requires_grad) if applied.is_floating_point() else applied
    t.data = applied
    if t.grad is not None:
        grad = fn(t.grad)
        if torch._has_compatible_shallow_copy_type(t.grad, grad):
            t.grad.data = grad
        else:
            t.grad = grad
    return t


class SegmentedLoraLinear(WrapsBaseLayer):
    """An nn.Linear serving a LoraLibrary: row t of the input uses adapter ids.get()[t] (or its sequence's)."""

    def __init__(self, base: nn.Linear, library: LoraLibrary, ids: AdapterIds) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be an nn.Linear, got {type(base).__name__}")
        self.base_layer = base
        self.library = library
        self.ids = ids

    def forward(self, x: Tensor) -> Tensor:
        w = self.base_layer.weight
        return lora_linear_segmented(x, w, self.base_layer.bias, self.library, self.ids.get())

    def _apply(self, fn, recurse=True):
        # The library is not a parameter or buffer (a serving library is not saved with the model's
        # weights) but follows the layer's moves and casts (.to, .half, .cuda), as the base layer's
        # weight does: the factors in place (a trainable library stays the leaf its optimizer holds);
        # ranks and scales are only moved (a cast would round the float32 scales for good).
        super()._apply(fn, recurse)
        lib = self.library
        with torch.no_grad():
            device = fn(lib.scales).device
            lib.a, lib.b = _applied_in_place(lib.a, fn), _applied_in_place(lib.b, fn)
            lib.ranks, lib.scales = lib.ranks.to(device), lib.scales.to(device)
            # Ids set before a move go with it (every layer of the model shares them: the first
            # layer's move takes them, the others find them already there).
            if self.ids.value is not None:
                self.ids.value = self.ids.value.to(device)
        return self

    def extra_repr(self) -> str:
        return f"{self.library!r}"


class LibraryHandle:
    """What attach_library returns: the adapter names in slot order, the layers, set_ids and detach."""

    def __init__(self, model, root, names, layers, originals, ids, conv1d=None) -> None:
        self.model = model
        self._conv1d = conv1d or {}  # GPT-2 Conv1D behind a layer, by module name
        self.names: List[str] = names
        self.layers: Dict[str, SegmentedLoraLinear] = layers
        self._root = root
        self._originals = originals
        self._ids = ids

    def set_ids(self, ids) -> Tensor:
        """Set the adapters of the next forwards: a tensor or a list of slot numbers or adapter names
        (None or -1: the base model), one per sequence (B,) or per token (B, L). Returns the ids tensor
        the layers read. Ids of the same shape as the previous ones are copied into the same tensor,
        so a CUDA graph captured with them replays with the new ids."""
        if isinstance(ids, (str, bytes)) or ids is None:
            raise TypeError(f"ids must be a tensor or a list of slot numbers or adapter names (one per sequence), "
                            f"got {ids!r}")
        if not isinstance(ids, Tensor):
            index = {n: i for i, n in enumerate(self.names)}

            def slot(v):
                if v is None:
                    return -1
                if isinstance(v, str):
                    if v not in index:
                        raise ValueError(f"unknown adapter name {v!r}; the library holds {self.names}")
                    return index[v]
                if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                    raise TypeError(f"ids must hold slot numbers (integers), adapter names or None, got {v!r}")
                return int(v)
            # One per sequence (B,), or a list of lists, one per token (B, L).
            rows = [[slot(v) for v in row] if isinstance(row, (list, tuple)) else slot(row) for row in ids]
            if any(isinstance(row, list) for row in rows):
                if not all(isinstance(row, list) for row in rows) or len({len(row) for row in rows}) > 1:
                    raise ValueError("per-token ids must be a (B, L) list of lists of one length L, got rows of "
                                     f"lengths {[len(r) if isinstance(r, list) else 'scalar' for r in rows]}")
            ids = torch.tensor(rows, dtype=torch.int64)
        elif ids.is_floating_point() or ids.dtype == torch.bool:
            raise TypeError(f"ids must be an integer tensor, got {ids.dtype}")
        if not self.layers:
            raise RuntimeError("the library was detached from the model")
        device = next(iter(self.layers.values())).library.device
        held = self._ids.value
        if held is not None and held.shape == ids.shape:
            held.copy_(ids)
        else:
            # A copy, always int64: later calls copy_ into the held tensor (so that a captured CUDA
            # graph sees them), which must not be the caller's and must hold any id (-1 and slots
            # past 127 too, whatever integer dtype the first ids came in).
            self._ids.value = ids.to(device, torch.int64, copy=True)
        return self._ids.value

    def detach(self) -> nn.Module:
        """Put the original modules back; returns the model."""
        from .compose import _copy_back_conv1d, _follow_device, _set_module

        for key, original in self._originals.items():
            if self._conv1d.get(key) is not None and key in self.layers:
                _copy_back_conv1d(self._conv1d[key], self.layers[key].base_layer.weight)
            _set_module(self._root, key, original)
            _follow_device(original)
        self.layers = {}
        return self.model


def attach_library(
    model: nn.Module,
    adapters: Sequence[Any],
    names: Optional[Sequence[str]] = None,
    num_slots: Optional[int] = None,
    r_max: Optional[int] = None,
) -> LibraryHandle:
    """Serve up to num_slots peft LoRA adapters on one model with per-request selection.

    adapters: peft adapter directories, (state_dict, LoraConfig) pairs or lorafuse LoraAdapters;
    slot i holds adapters[i] in every layer it targets (layers it does not target get an empty slot:
    the base layer). Every targeted nn.Linear (or GPT-2 Conv1D) becomes a SegmentedLoraLinear whose
    library is in the layer's dtype and device. Then `handle.set_ids(ids)` and `model(...)`: sequence
    b (or token (b, l)) uses adapter ids[b] (-1: none) -- peft's `adapter_names=` mixed batch, fused.
    """
    from .adapters import load_adapters
    from .compose import _linear_for, _plan, _root_of, _set_module

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    loaded = load_adapters(adapters)
    if not loaded:
        raise ValueError("adapters must name at least one adapter")
    names = [a.name for a in loaded] if names is None else list(names)
    if len(names) != len(loaded):
        raise ValueError(f"names must have one entry per adapter ({len(loaded)}), got {len(names)}")
    if len(set(names)) != len(names):
        raise ValueError(f"names must be distinct (set_ids selects adapters by name), got {names}")
    if num_slots is not None and (isinstance(num_slots, bool) or not isinstance(num_slots, int)
                                  or num_slots < len(loaded)):
        raise ValueError(f"num_slots must be an integer >= the number of adapters ({len(loaded)}), got {num_slots!r}")
    if any(isinstance(m, SegmentedLoraLinear) for m in model.modules()):
        raise ValueError("a library is already attached to this model: call detach() on its handle first")
    root = _root_of(model)
    plan = _plan(root, loaded)
    if not plan:
        raise ValueError("the adapters target no module of the model")
    ids = AdapterIds()
    layers, originals, conv1d = {}, {}, {}
    for key, which in plan.items():
        original = root.get_submodule(key)
        base, conv1d[key] = _linear_for(key, original)
        lib = LoraLibrary.empty(num_slots or len(loaded),
                                r_max or max(loaded[i].layers[key][0].shape[0] for i in which),
                                base.in_features, base.out_features, base.weight.dtype, base.weight.device)
        for i in which:
            lib.set_adapter(i, *loaded[i].layers[key])
        layers[key] = SegmentedLoraLinear(base, lib, ids)
        originals[key] = original
    for key, layer in layers.items():
        _set_module(root, key, layer)
    return LibraryHandle(model, root, names, layers, originals, ids, conv1d)

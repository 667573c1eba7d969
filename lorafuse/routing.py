"""Routing a library of LoRA adapters: per-token gates over K adapters on one linear layer.

    y = x W^T + b + ((x a_cat^T) * scale * g[:, block]) b_cat^T,   g = gates (T, K)

Routers (logits z, T x K):
- "arrow" (Ostapenko et al. 2024): data-agnostic; adapter i's prototype v_i is the top right-singular
  vector of its Delta W_i = B_i A_i (arrow_prototypes); logits |x . v_i|.
- "linear": a learned linear router, logits x W_r^T + b_r (trainable).
- "uniform": gates 1/K for every token (parameter averaging, for comparison).
Gates: softmax(z / temperature) over all K (top_k=None) or over each row's top_k logits (the others 0).

On CUDA (and CPU under TRITON_INTERPRET=1) the forward is the fused routed shrink
(lorafuse.kernels.routing.routed_shrink: x read once, router logits as extra columns of the same thin
GEMM, gates applied on chip) followed by lora_gemm for the expand. The backward's thin GEMMs run as
kernels too (dS' = dY b_cat by the shrink's partial kernel; dx = dY W + [dS | dZ] [a_cat; router] by
lora_gemm); the elementwise gate backward on the (T, R) and (T, K) rows is plain torch.
"""
from __future__ import annotations

import functools
import math
import numbers
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .kernels.routing import MIN_TEMPERATURE  # the launcher's own limit
from .kernels.utils import unit_vector
from .ops import autocast_inputs, check_lora_args, expand, first_order_only, lora_linear, rows_of
from . import ops as _ops

__all__ = ["ROUTER_KINDS", "arrow_prototypes", "routing_gates", "lora_linear_routed",
           "lora_linear_routed_reference", "init_route"]

ROUTER_KINDS = ("arrow", "linear", "uniform")


# ----------------------------------------------------------------------------------------------
# Arrow prototypes


def _check_ranks(ranks: Sequence[int], R: int) -> List[int]:
    # The common case without the abstract-class checks below (host time on every call).
    if ranks.__class__ in (list, tuple) and ranks and all(r.__class__ is int and r > 0 for r in ranks) \
            and sum(ranks) == R:
        return list(ranks)
    # Whole numbers only: a string ("48") or 4.9 must not turn silently into other ranks.
    try:
        values = ranks.tolist() if isinstance(ranks, Tensor) else list(ranks)
    except TypeError:
        values = None
    if (values is None or isinstance(ranks, (str, bytes))
            or not all(isinstance(r, numbers.Integral) and not isinstance(r, bool) for r in values)):
        raise TypeError(f"ranks must be a sequence of positive integers, got {ranks!r}")
    ranks = [int(r) for r in values]
    if not ranks or any(r < 1 for r in ranks) or sum(ranks) != R:
        raise ValueError(f"ranks must be positive integers summing to R = {R} (the rows of a_cat), got {ranks}")
    return ranks


@torch.no_grad()
def arrow_prototypes(a_cat: Tensor, b_cat: Tensor, ranks: Sequence[int], scale: Optional[Tensor] = None) -> Tensor:
    """Arrow's prototypes: for each adapter i, the top right-singular vector of Delta W_i = B_i diag(s_i) A_i.

    a_cat: (R, d_in); b_cat: (d_out, R); ranks: r_1..r_K summing to R; scale: (R,) or None (only its
    per-column variation within a block and its sign matter: a positive per-adapter scale does not
    change the singular vectors). Returns (K, d_in) float32, unit rows.

    Computed in float64 from QR factors, never forming the d_out x d_in delta: with B_i = Q_b R_b and
    A_i^T = Q_a R_a, Delta W_i = Q_b (R_b R_a^T) Q_a^T, so the top right-singular vector is Q_a v where
    v is that of the r_i x r_i core. The sign (a singular vector's is arbitrary) is fixed so that the
    entry of largest magnitude is positive; Arrow's logits |x . v| do not depend on it. An adapter
    whose delta is zero (B = 0, as freshly initialised) gets a zero prototype (logit 0 for every token).
    """
    if not isinstance(a_cat, Tensor) or a_cat.dim() != 2:
        raise ValueError(f"a_cat must be a tensor of shape (R, d_in), got "
                         f"{tuple(a_cat.shape) if isinstance(a_cat, Tensor) else type(a_cat).__name__}")
    R, d_in = a_cat.shape
    if not isinstance(b_cat, Tensor) or b_cat.dim() != 2 or b_cat.shape[1] != R:
        raise ValueError(f"b_cat must be a tensor of shape (d_out, {R}), got "
                         f"{tuple(b_cat.shape) if isinstance(b_cat, Tensor) else type(b_cat).__name__}")
    ranks = _check_ranks(ranks, R)
    if scale is not None and (not isinstance(scale, Tensor) or tuple(scale.shape) != (R,)):
        raise ValueError(f"scale must be a tensor of shape ({R},) or None, got "
                         f"{tuple(scale.shape) if isinstance(scale, Tensor) else type(scale).__name__}")
    for name, t in (("b_cat", b_cat), ("scale", scale)):
        if t is not None and t.device != a_cat.device:
            raise ValueError(f"{name} must be on {a_cat.device} like a_cat, got {t.device}")
    if a_cat.device.type == "meta" or not (a_cat.is_floating_point() and b_cat.is_floating_point()):
        raise ValueError(f"a_cat and b_cat must be floating-point tensors with data, got {a_cat.dtype} and "
                         f"{b_cat.dtype} on {a_cat.device}")
    f64 = torch.float64
    a64 = a_cat.detach().to(f64)
    b64 = b_cat.detach().to(f64)
    if scale is not None:
        b64 = b64 * scale.detach().to(device=b64.device, dtype=f64)
    if not (bool(torch.isfinite(a64).all()) and bool(torch.isfinite(b64).all())):  # once per composition
        raise ValueError("a_cat, b_cat and scale must be finite to compute Arrow prototypes (an adapter's "
                         "factors hold NaN or inf)")
    protos = []
    start = 0
    for r in ranks:
        a_i, b_i = a64[start:start + r], b64[:, start:start + r]
        start += r
        q_a, r_a = torch.linalg.qr(a_i.t())   # A_i^T = Q_a R_a: (d_in, r), (r, r) when r <= d_in
        _, r_b = torch.linalg.qr(b_i)         # B_i = Q_b R_b
        _, sv, vh = torch.linalg.svd(r_b @ r_a.t())
        v = q_a @ vh[0]
        if sv[0] <= torch.finfo(f64).eps * max(r, 1) * max(1.0, float(b64.abs().max()) * float(a64.abs().max())):
            v = torch.zeros_like(v)
        else:
            v = v * torch.sign(v[v.abs().argmax()])
        protos.append(v)
    return torch.stack(protos, 0).to(torch.float32)


# ----------------------------------------------------------------------------------------------
# Argument checks


def _check_routed_args(x, weight, bias, a_cat, b_cat, scale, ranks, router, router_kind, top_k, temperature,
                       router_bias) -> Tuple[List[int], Optional[int], float]:
    check_lora_args(x, weight, bias, a_cat, b_cat, scale)
    R = a_cat.shape[0]
    ranks = _check_ranks(ranks, R)
    top_k, temperature = _check_router(x, len(ranks), router, router_kind, top_k, temperature, router_bias)
    return ranks, top_k, temperature


def _check_router(x, K: int, router, router_kind, top_k, temperature, router_bias) -> Tuple[Optional[int], float]:
    """The router's arguments for K adapters and inputs x (..., d_in), as lora_linear_routed and
    routing_gates take them; returns top_k and temperature as _check_gating does."""
    if router_kind not in ROUTER_KINDS:
        raise ValueError(f"router_kind must be one of {ROUTER_KINDS}, got {router_kind!r}")
    if router_kind == "uniform":
        if router is not None or router_bias is not None:
            raise ValueError("router_kind='uniform' takes no router: pass router=None and router_bias=None")
        if top_k is not None:
            raise ValueError("top_k has no meaning with router_kind='uniform' (every adapter gets 1/K): leave it None")
    else:
        if not isinstance(router, Tensor):
            raise TypeError(f"router must be a torch.Tensor of shape ({K}, {x.shape[-1]}) for "
                            f"router_kind={router_kind!r}, got {type(router).__name__}")
        if tuple(router.shape) != (K, x.shape[-1]):
            raise ValueError(f"router must have shape ({K}, {x.shape[-1]}) (one row per adapter, d_in), "
                             f"got {tuple(router.shape)}")
        if not router.is_floating_point() or router.device != x.device:
            raise ValueError(f"router must be a floating-point tensor on {x.device}, got {router.dtype} on "
                             f"{router.device}")
    if router_bias is not None:
        if router_kind != "linear":
            raise ValueError(f"router_bias is only used with router_kind='linear', got {router_kind!r}")
        if not isinstance(router_bias, Tensor) or tuple(router_bias.shape) != (K,) \
                or not router_bias.is_floating_point() or router_bias.device != x.device:
            raise ValueError(f"router_bias must be a floating-point tensor of shape ({K},) on {x.device}, got "
                             f"{router_bias.dtype if isinstance(router_bias, Tensor) else type(router_bias).__name__}"
                             f" {tuple(router_bias.shape) if isinstance(router_bias, Tensor) else ''}")
    return _check_gating(top_k, temperature, K)




def _check_gating(top_k, temperature, K: int) -> Tuple[Optional[int], float]:
    """top_k (None or 1..K) and temperature (finite, >= MIN_TEMPERATURE), checked; returned as a
    Python int (or None) and float (numpy scalars are accepted)."""
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or not 1 <= top_k <= K:
            raise ValueError(f"top_k must be None (dense) or an integer in 1..{K} (the number of adapters), "
                             f"got {top_k!r}")
        top_k = int(top_k)
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) \
            or not (MIN_TEMPERATURE <= temperature < math.inf):
        raise ValueError(f"temperature must be a positive finite number >= {MIN_TEMPERATURE:g} (smaller ones "
                         f"overflow the float32 gates; top_k=1 routes each row to one adapter), got {temperature!r}")
    return top_k, float(temperature)


# ----------------------------------------------------------------------------------------------
# Plain torch (the reference, and the path where the kernels cannot run)


def _top_ids(logits: Tensor, k: int) -> Tensor:
    """(..., K) -> the indices (..., k) of each row's k largest logits. Ties go to the lowest adapter
    index, as in the kernels' iterative max (a zero-initialised router ties every logit; torch.topk's
    choice among ties differs by device)."""
    return torch.sort(logits, dim=-1, descending=True, stable=True).indices[..., :k]


def _gates_from_logits(z: Tensor, abs_logits: bool, top_k: Optional[int], temperature: float) -> Tensor:
    """z: (T, K) -> gates (T, K): softmax of (|z| or z) / temperature over each row's top_k (or all)."""
    logits = (z.abs() if abs_logits else z) / temperature
    if top_k is not None and top_k < z.shape[-1]:
        idx = _top_ids(logits, top_k)
        kept = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, idx, True)
        logits = logits.masked_fill(~kept, float("-inf"))
    return torch.softmax(logits, dim=-1)


def routing_gates(
    x: Tensor,
    router: Optional[Tensor],
    router_kind: str = "arrow",
    top_k: Optional[int] = None,
    temperature: float = 1.0,
    router_bias: Optional[Tensor] = None,
    num_adapters: Optional[int] = None,
) -> Tensor:
    """The gates g (..., K) that lora_linear_routed applies to x (..., d_in), in float32 (plain torch).

    For "uniform", router is None and num_adapters gives K. Differentiable in x, router, router_bias.
    """
    if router_kind not in ROUTER_KINDS:
        raise ValueError(f"router_kind must be one of {ROUTER_KINDS}, got {router_kind!r}")
    if router_kind == "uniform":
        if isinstance(num_adapters, bool) or not isinstance(num_adapters, numbers.Integral) or num_adapters < 1:
            raise ValueError(f"num_adapters must be a positive integer for router_kind='uniform', got {num_adapters!r}")
        _check_router(x, int(num_adapters), router, router_kind, top_k, temperature, router_bias)
        return x.new_full((*x.shape[:-1], num_adapters), 1.0 / num_adapters, dtype=torch.float32)
    if not isinstance(router, Tensor) or router.dim() != 2 or router.shape[1] != x.shape[-1]:
        raise ValueError(f"router must have shape (K, {x.shape[-1]}), got "
                         f"{tuple(router.shape) if isinstance(router, Tensor) else type(router).__name__}")
    top_k, temperature = _check_router(x, router.shape[0], router, router_kind, top_k, temperature, router_bias)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    z = F.linear(x.to(acc), router.to(x.dtype).to(acc),
                 router_bias.to(acc) if router_bias is not None else None)
    return _gates_from_logits(z, router_kind == "arrow", top_k, temperature).float()


def _routed_math(x, weight, bias, a_cat, b_cat, scale, ranks, router, router_kind, top_k, temperature,
                 router_bias, acc: torch.dtype, round_to: Optional[torch.dtype]):
    """x (T, d_in) -> y (T, d_out): S, logits, gates and S' in `acc`; S' rounded to `round_to` (the
    kernels' rounding) before the expand, which runs in that dtype too; None keeps `acc` throughout."""
    K = len(ranks)
    block = _block_ids(ranks, x.device).long()
    xa = x.to(acc)
    s = xa @ a_cat.to(x.dtype).to(acc).t()
    if router_kind == "uniform":
        g = torch.full((x.shape[0], K), 1.0 / K, dtype=acc, device=x.device)
    else:
        z = xa @ router.to(x.dtype).to(acc).t()
        if router_bias is not None:
            z = z + router_bias.to(acc)
        g = _gates_from_logits(z, router_kind == "arrow", top_k, temperature)
    sp = s * scale.to(acc) * g[:, block]
    if round_to is None:
        return F.linear(xa, weight.to(acc), bias.to(acc) if bias is not None else None) + sp @ b_cat.to(acc).t()
    return F.linear(x, weight, bias) + sp.to(round_to) @ b_cat.to(round_to).t()


def lora_linear_routed_reference(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    a_cat: Tensor,
    b_cat: Tensor,
    scale: Tensor,
    ranks: Sequence[int],
    router: Optional[Tensor],
    router_kind: str = "arrow",
    top_k: Optional[int] = None,
    temperature: float = 1.0,
    router_bias: Optional[Tensor] = None,
) -> Tensor:
    """Plain torch, every step in x's dtype (pass float64 tensors for a float64 reference); same
    arguments and result as lora_linear_routed. Differentiable by autograd."""
    ranks, top_k, temperature = _check_routed_args(x, weight, bias, a_cat, b_cat, scale, ranks, router,
                                                   router_kind, top_k, temperature, router_bias)
    lead = x.shape[:-1]
    y = _routed_math(rows_of(x), weight, bias, a_cat, b_cat, scale, ranks, router, router_kind, top_k,
                     temperature, router_bias, acc=x.dtype, round_to=None)
    return y.reshape(*lead, weight.shape[0])


# ----------------------------------------------------------------------------------------------
# Kernel path


def _block_ids(ranks: Sequence[int], device: torch.device) -> Tensor:
    """(R,) int32: the adapter of each rank column. Cached: building it costs a host-to-device copy."""
    return _block_ids_cached(tuple(int(r) for r in ranks), torch.device(device))


@functools.lru_cache(maxsize=256)
def _block_ids_cached(ranks: tuple, device: torch.device) -> Tensor:
    # Built outside inference mode, whatever the first caller's mode: an inference tensor in the cache
    # could not be saved for backward by every later training call with these ranks.
    with torch.inference_mode(False):
        ids = torch.repeat_interleave(torch.arange(len(ranks), dtype=torch.int32), torch.tensor(ranks))
        return ids.to(device)


def _routed_forward(x, weight, bias, a_c, b_c, sc, router_c, rbias, block, abs_logits, top_k, temperature, save):
    from .kernels.routing import routed_shrink

    # The op has checked every operand (lora_linear_routed): no second round of checks. The kernels
    # index the vectors without a stride: a sliced or expanded one is copied (here, under every entry).
    bias, sc, rbias = unit_vector(bias), unit_vector(sc), unit_vector(rbias)
    sp, s, z, g = routed_shrink(x, a_c, router_c, sc, block, top_k=top_k, temperature=temperature,
                                abs_logits=abs_logits, router_bias=rbias, save=save, check=False)
    y = expand(x, weight, bias, sp, b_c)
    return y, sp, s, z, g


def _routed_backward(dy, x, weight, a_c, router_c, b_c, sc, block, sp, s, z, g, abs_logits, temperature, needs):
    """Gradients for [x, weight, bias, a_cat, b_cat, scale, router, router_bias] (None where not needed),
    in x's dtype except bias, scale and router_bias (float32).

    dS' = dY b_cat runs as the shrink's partial kernel; the gate backward (elementwise on the (T, R)
    and (T, K) rows: dS = dS' * scale * g[:, block], dg_i = sum over block i of dS' S scale, the
    softmax backward, |.|'s sign) is plain torch; dx = dY W + [dS | dZ] [a_cat; router] is one
    product (lorafuse.ops.expand); the weight gradients are plain matmuls."""
    from .kernels.shrink import _rows_partial, split_config

    n_x, n_w, n_b, n_a, n_bc, n_sc, n_r, n_rb = needs
    T, R = x.shape[0], sc.shape[0]
    dy = dy.contiguous()
    grads = [None] * 8
    blk = block.long()
    if n_x or n_a or n_sc or n_r or n_rb:
        part, _ = _rows_partial(dy, b_c, T, dy.shape[1], R, split_config(T, dy.shape[1], R, dy.dtype, dy.device))
        dsp = part.sum(0)                                  # dS' (T, R) float32
        g_cols = g[:, blk]
        ds = dsp * sc * g_cols                             # dS
        dg = torch.zeros_like(g).index_add_(1, blk, dsp * s * sc)
        dlog = g * (dg - (g * dg).sum(1, keepdim=True)) / temperature
        dz = dlog * torch.sign(z) if abs_logits else dlog
        if n_x:
            grads[0] = expand(dy, weight.t(), None, torch.cat([ds, dz], 1).to(dy.dtype),
                              torch.cat([a_c, router_c], 0).t())
        if n_a:
            grads[3] = ds.t().to(x.dtype) @ x
        if n_sc:
            grads[5] = (dsp * s * g_cols).sum(0)
        if n_r:
            grads[6] = dz.t().to(x.dtype) @ x
        if n_rb:
            grads[7] = dz.sum(0)
    if n_w:
        grads[1] = dy.t() @ x
    if n_b:
        grads[2] = dy.sum(0, dtype=torch.float32)
    if n_bc:
        grads[4] = dy.t() @ sp
    return grads


# A top-k layer computes only its rows' chosen adapters when it runs "grouped": the dense path
# above computes every adapter's rank block (R = K r columns) and zeroes the unchosen ones, which
# costs as much as a quarter of the base GEMM at K = 64, r = 16. Grouped, the logits come first
# (a K-column thin GEMM), then each of the top_k choices is one pass of the mixed-batch kernels
# (lorafuse.kernels.segmented: rows grouped by adapter on the GPU, gate applied per row) added
# onto the cuBLAS base product. Forward only (no gradients). "auto" takes it for a top-k forward
# without gradients once R / top_k and T reach these. Grouped costs a pass per choice (each ~0.37x
# the base GEMM at 4096 x 4096, ~0.21x at 4096 x 14336) plus about twice dense's host time; dense
# grows with R (~0.07x per 100 rank columns at 4096 x 4096, half that on the wide layer). From CUDA
# graphs on an H200, T = 8192, r = 16, dense with its stacked product from cuBLAS: K = 64 top-1
# grouped 1.48x / 1.25x against dense 1.68x / 1.42x (routed-cublas-ab-*-eeeaae3-*.json); K = 64 top-2
# grouped 1.80x / 1.45x against dense 1.70x / 1.38x (routed-cublas-ab-*43e2395-*.json); K = 48 (R = 768)
# top-1 grouped 1.42x / 1.21x against dense 1.52x / 1.30x, top-2 1.74x / 1.39x against 1.54x / 1.30x;
# K = 32 (R = 512) top-1 even (1.32x / 1.15x grouped, 1.34x / 1.18x dense), top-2 dense by 0.16-0.31x
# (routed-cublas-ab-k32k48-*.json). With the selection kernel and the spread row plan (fc2d9c8,
# routed-profile-{c68b9f7,k32k48-1453a14,fc2d9c8}-*.json, graph replays, 4096 x 4096, T = 8192, top-2)
# grouped against dense: K = 32 1.53x / 1.34x, K = 48 1.59x / 1.54x, K = 64 1.52-1.57x / 1.69-1.74x
# (two runs); top-1 K = 64 1.31x / 1.73x. So grouped from 448 rank columns per choice (top-2 from
# K = 64 at r = 16, top-1 from K = 28, where grouped was already even at K = 32 before these changes).
GROUPED_MIN_RANK = 448
GROUPED_MIN_T = 4096
ROUTED_SCHEDULES = ("auto", "dense", "grouped")


@functools.lru_cache(maxsize=256)
def _slot_layout(ranks: tuple, device: torch.device) -> Tuple[Optional[Tensor], Tensor]:
    """(rows, ranks): rows (R,) int64 = each rank column's row in the zero-padded (K * r_max) slot
    layout (None when every rank is r_max: the layout is a plain view); ranks (K,) int32."""
    r_max = max(ranks)
    rows = None
    if any(r != r_max for r in ranks):
        rows = torch.tensor([i * r_max + j for i, r in enumerate(ranks) for j in range(r)], dtype=torch.long)
        rows = rows.to(device)
    return rows, torch.tensor(ranks, dtype=torch.int32).to(device)


def _library_factors(a_c: Tensor, b_c: Tensor, sc: Tensor,
                     ranks: Sequence[int]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The adapters as library slots: fac_in (K, r_max, d_in) = A_i, fac_out (K, r_max, d_out) = B_i^T,
    scales (K, r_max) per rank column, ranks (K,) int32. With equal ranks all are views (no copy:
    fac_out reads b_cat's rows r_max columns at a time); mixed ranks are zero-padded copies."""
    ranks = tuple(int(r) for r in ranks)
    K, r_max = len(ranks), max(ranks)
    rows, ranks_t = _slot_layout(ranks, a_c.device)
    bt = b_c.t()                                           # (R, d_out), a view
    if rows is None:
        return a_c.reshape(K, r_max, -1), bt.reshape(K, r_max, -1), sc.reshape(K, r_max), ranks_t
    fac_in = a_c.new_zeros((K * r_max, a_c.shape[1])).index_copy_(0, rows, a_c)
    fac_out = bt.new_zeros((K * r_max, bt.shape[1])).index_copy_(0, rows, bt)
    scales = sc.new_zeros((K * r_max,)).index_copy_(0, rows, sc)
    return fac_in.view(K, r_max, -1), fac_out.view(K, r_max, -1), scales.view(K, r_max), ranks_t


def _routed_grouped(x, weight, bias, a_c, b_c, sc, router_c, rbias, ranks, abs_logits, top_k, temperature):
    """The top-k routed forward with rows grouped by their chosen adapters (no gradients): y (T, d_out)."""
    from .kernels.routing import route_select
    from .kernels.segmented import segmented_lora_

    bias, sc, rbias = unit_vector(bias), unit_vector(sc), unit_vector(rbias)  # as in _routed_forward
    # ids, gates (top_k, T): a row per choice; the gates of top-1 are 1 (NaN where the logit is NaN).
    ids, gates = route_select(x, router_c, top_k, temperature, abs_logits, rbias, check=False)
    fac_in, fac_out, scales, ranks_t = _library_factors(a_c, b_c, sc, ranks)
    y = F.linear(x, weight, bias)
    for j in range(top_k):
        segmented_lora_(y, x, fac_in, fac_out, ranks_t, scales, ids[j], row_scale=gates[j])
    return y


def _use_grouped(schedule: str, top_k: Optional[int], ranks: Sequence[int], T: int, save: bool) -> bool:
    if schedule == "dense":
        return False
    if schedule == "grouped":
        if save:
            raise NotImplementedError("schedule='grouped' runs the forward only; with gradients use "
                                      "schedule='dense' or 'auto'")
        return True
    return top_k is not None and not save and T >= GROUPED_MIN_T and sum(ranks) >= GROUPED_MIN_RANK * top_k


class _RoutedFunction(torch.autograd.Function):
    """The eager kernel path: routed shrink + lora_gemm forward, _routed_backward backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, a_c, b_c, sc, router_c, rbias, block, abs_logits, top_k, temperature):
        y, sp, s, z, g = _routed_forward(x, weight, bias, a_c, b_c, sc, router_c, rbias, block, abs_logits,
                                         top_k, temperature, True)
        ctx.save_for_backward(x, weight, a_c, router_c, b_c, sc, block, sp, s, z, g)
        ctx.abs_logits, ctx.temperature = abs_logits, temperature
        ctx.dtypes = [t.dtype if t is not None else None for t in (x, weight, bias, a_c, b_c, sc, router_c, rbias)]
        return y

    @staticmethod
    def backward(ctx, dy):
        first_order_only("lorafuse.routing.lora_linear_routed")
        x, weight, a_c, router_c, b_c, sc, block, sp, s, z, g = ctx.saved_tensors
        grads = _routed_backward(dy, x, weight, a_c, router_c, b_c, sc, block, sp, s, z, g, ctx.abs_logits,
                                 ctx.temperature, list(ctx.needs_input_grad[:8]))
        return (*[gr.to(dt) if gr is not None else None for gr, dt in zip(grads, ctx.dtypes)], None, None, None, None)


# The same as torch.library custom ops, so that torch.compile traces through a routed layer.


def _empty(x: Tensor) -> Tensor:
    return x.new_empty((0,), dtype=torch.float32)


@torch.library.custom_op("lorafuse::lora_linear_routed_fwd", mutates_args=())
def _routed_fwd_op(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], a_c: Tensor, b_c: Tensor, sc: Tensor, router_c: Tensor,
    rbias: Optional[Tensor], ranks: List[int], abs_logits: bool, top_k: int, temperature: float, save: bool,
    grouped: bool = False,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, S', S, logits, gates); top_k 0 = dense; the last four empty unless save (grouped: never)."""
    if grouped:
        y = _routed_grouped(x, weight, bias, a_c, b_c, sc, router_c, rbias, ranks, abs_logits, top_k, temperature)
        return y, _empty(x), _empty(x), _empty(x), _empty(x)
    y, sp, s, z, g = _routed_forward(x, weight, bias, a_c, b_c, sc, router_c, rbias, _block_ids(ranks, x.device),
                                     abs_logits, top_k or None, temperature, save)
    if not save:
        return y, _empty(x), _empty(x), _empty(x), _empty(x)
    return y, sp, s.contiguous(), z, g


@_routed_fwd_op.register_fake
def _(x, weight, bias, a_c, b_c, sc, router_c, rbias, ranks, abs_logits, top_k, temperature, save, grouped=False):
    from .kernels.shrink import alloc_rows

    T, R, K = x.shape[0], a_c.shape[0], router_c.shape[0]
    y = x.new_empty((T, weight.shape[0]))
    if not save:
        return y, _empty(x), _empty(x), _empty(x), _empty(x)
    f32 = torch.float32
    return (y, alloc_rows(T, R, x.dtype, x.device), x.new_empty((T, R), dtype=f32), x.new_empty((T, K), dtype=f32),
            x.new_empty((T, K), dtype=f32))


@torch.library.custom_op("lorafuse::lora_linear_routed_bwd", mutates_args=())
def _routed_bwd_op(
    dy: Tensor, x: Tensor, weight: Tensor, a_c: Tensor, router_c: Tensor, b_c: Tensor, sc: Tensor, sp: Tensor,
    s: Tensor, z: Tensor, g: Tensor, ranks: List[int], abs_logits: bool, temperature: float, needs: List[bool],
) -> List[Tensor]:
    grads = _routed_backward(dy, x, weight, a_c, router_c, b_c, sc, _block_ids(ranks, x.device), sp, s, z, g,
                             abs_logits, temperature, needs)
    return [gr if gr is not None else _empty(x) for gr in grads]


@_routed_bwd_op.register_fake
def _(dy, x, weight, a_c, router_c, b_c, sc, sp, s, z, g, ranks, abs_logits, temperature, needs):
    f32 = torch.float32
    shapes = [(x.shape, x.dtype), (weight.shape, x.dtype), ((weight.shape[0],), f32), (a_c.shape, x.dtype),
              (b_c.shape, x.dtype), (sc.shape, f32), (router_c.shape, x.dtype), ((router_c.shape[0],), f32)]
    return [x.new_empty(shp, dtype=dt) if n else _empty(x) for n, (shp, dt) in zip(needs, shapes)]


def _routed_setup_context(ctx, inputs, output):
    x, weight, bias, a_c, b_c, sc, router_c, rbias, ranks, abs_logits, top_k, temperature, save, grouped = inputs
    y, sp, s, z, g = output
    ctx.mark_non_differentiable(sp, s, z, g)
    ctx.save_for_backward(x, weight, a_c, router_c, b_c, sc, sp, s, z, g)
    ctx.meta = (list(ranks), abs_logits, temperature)
    ctx.dtypes = [t.dtype if t is not None else None for t in (x, weight, bias, a_c, b_c, sc, router_c, rbias)]


def _routed_op_backward(ctx, dy, _dsp, _ds, _dz, _dg):
    first_order_only("lorafuse.routing.lora_linear_routed")
    x, weight, a_c, router_c, b_c, sc, sp, s, z, g = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:8])
    if not any(needs):
        return (None,) * 14
    ranks, abs_logits, temperature = ctx.meta
    grads = torch.ops.lorafuse.lora_linear_routed_bwd(dy, x, weight, a_c, router_c, b_c, sc, sp, s, z, g, ranks,
                                                       abs_logits, temperature, needs)
    return (*[gr.to(dt) if n else None for n, gr, dt in zip(needs, grads, ctx.dtypes)], *(None,) * 6)


torch.library.register_autograd("lorafuse::lora_linear_routed_fwd", _routed_op_backward,
                                setup_context=_routed_setup_context)


def _check_num_adapters(num_adapters: Optional[int], kind: str, K: int, param: str) -> None:
    """num_adapters: None, or the library size (an integer >= K) for uniform routing only."""
    if num_adapters is not None and (kind != "uniform" or isinstance(num_adapters, bool)
                                     or not isinstance(num_adapters, numbers.Integral) or num_adapters < K):
        raise ValueError(f"num_adapters is the library size for {param}='uniform': an integer >= K = {K}, got "
                         f"{num_adapters!r} with {param}={kind!r}")


@autocast_inputs
def lora_linear_routed(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    a_cat: Tensor,
    b_cat: Tensor,
    scale: Tensor,
    ranks: Sequence[int],
    router: Optional[Tensor],
    router_kind: str = "arrow",
    top_k: Optional[int] = None,
    temperature: float = 1.0,
    router_bias: Optional[Tensor] = None,
    schedule: str = "auto",
    num_adapters: Optional[int] = None,
) -> Tensor:
    """y = x W^T + b + ((x a_cat^T) * scale * g[:, block]) b_cat^T with per-token gates g (T, K).

    x: (..., d_in); weight: (d_out, d_in) and bias: (d_out,) or None, in x's dtype; a_cat: (R, d_in);
    b_cat: (d_out, R); scale: (R,); ranks: r_1..r_K summing to R (adapter i owns rank columns
    r_1 + .. + r_{i-1} onwards); router: (K, d_in), Arrow prototypes (router_kind="arrow", logits
    |x . v_i|) or a linear router's weight ("linear", logits x W_r^T + router_bias), None for
    "uniform" (gates 1/K); top_k: None (softmax over all K) or 1..K (softmax over each token's top_k
    logits, the others 0); temperature: logits are divided by it before the softmax.
    Returns (..., d_out) in x's dtype. Differentiable in x, weight, bias, a_cat, b_cat, scale,
    router and router_bias (only the gradients asked for are computed; the top-k choice itself has
    no gradient). The router and LoRA tensors are used in x's dtype, scale and router_bias in float32.
    schedule (kernel path): "dense" computes every adapter's rank block and gates it on chip;
    "grouped" (top_k only, forward without gradients) computes only each row's top_k adapters, rows
    grouped by adapter; "auto" takes grouped for a top-k forward without gradients when T >=
    GROUPED_MIN_T and R >= GROUPED_MIN_RANK * top_k, else dense.
    num_adapters ("uniform" only): the library's size, for gates 1/num_adapters (default K): a layer
    that carries some of a library's adapters then averages over the whole library, as parameter
    averaging does (the others' deltas are zero there).

    Example: a token whose top logit belongs to adapter 2 with top_k=1 gets exactly adapter 2's
    delta: y = x W^T + b + s_2 (x A_2^T) B_2^T.
    """
    ranks, top_k, temperature = _check_routed_args(x, weight, bias, a_cat, b_cat, scale, ranks, router,
                                                   router_kind, top_k, temperature, router_bias)
    if schedule not in ROUTED_SCHEDULES:
        raise ValueError(f"schedule must be one of {ROUTED_SCHEDULES}, got {schedule!r}")
    if schedule == "grouped" and top_k is None:
        raise ValueError("schedule='grouped' needs top_k (each row's chosen adapters); a dense softmax "
                         "uses every adapter: use schedule='dense' or 'auto'")
    operands = (x, weight, bias, a_cat, b_cat, scale, router, router_bias)
    if schedule == "grouped" and torch.is_grad_enabled() and any(
            isinstance(t, Tensor) and t.requires_grad for t in operands):
        _use_grouped(schedule, top_k, ranks, 0, True)  # the same error on every backend
    K = len(ranks)
    _check_num_adapters(num_adapters, router_kind, K, "router_kind")
    if router_kind == "uniform":
        # Averaging is a fixed weighting: the plain multi-LoRA op with every scale divided by K.
        return lora_linear(x, weight, bias, a_cat, b_cat, scale / (num_adapters or K))
    lead = x.shape[:-1]
    x2 = rows_of(x)
    from .kernels.routing import MAX_ROUTED_K

    if x2.shape[0] == 0 or K > MAX_ROUTED_K or not _ops._use_kernels(x2):
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        y = _routed_math(x2, weight, bias, a_cat, b_cat, scale, ranks, router, router_kind, top_k, temperature,
                         router_bias, acc=acc, round_to=x.dtype)
        return y.reshape(*lead, weight.shape[0])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if weight.stride(-1) != 1 and weight.stride(0) != 1:
        weight = weight.contiguous()
    dt, f32 = x.dtype, torch.float32
    # (No-op casts skipped: each costs host time on every small call.)
    sc = scale if scale.dtype == f32 else scale.to(f32)
    rbias = router_bias if router_bias is None or router_bias.dtype == f32 else router_bias.to(f32)
    tensors = (x2, weight, bias, a_cat if a_cat.dtype == dt else a_cat.to(dt),
               b_cat if b_cat.dtype == dt else b_cat.to(dt), sc, router if router.dtype == dt else router.to(dt),
               rbias)
    abs_logits = router_kind == "arrow"
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    grouped = _use_grouped(schedule, top_k, ranks, x2.shape[0], save)
    if torch.compiler.is_compiling():
        y = torch.ops.lorafuse.lora_linear_routed_fwd(*tensors, list(ranks), abs_logits, int(top_k or 0),
                                                      float(temperature), save, grouped)[0]
    elif grouped:
        y = _routed_grouped(*tensors, ranks, abs_logits, top_k, float(temperature))
    elif save:
        y = _RoutedFunction.apply(*tensors, _block_ids(ranks, x.device), abs_logits, top_k, float(temperature))
    else:
        y = _routed_forward(*tensors, _block_ids(ranks, x.device), abs_logits, top_k, float(temperature), False)[0]
    return y.reshape(*lead, weight.shape[0])


# ----------------------------------------------------------------------------------------------
# MultiLoraLinear(method="route")


def init_route(layer: nn.Module, router: Optional[str], top_k: Optional[int], temperature: float,
               num_adapters: Optional[int] = None) -> None:
    """Give a MultiLoraLinear built with method="route" its router (called from its __init__).

    Sets layer.router_kind, top_k, temperature, router_weight and router_bias: "arrow": router_weight
    is a buffer of the prototypes (K, d_in) float32, computed once here from a_cat, b_cat and the
    scales (call init_route again after editing the adapters); "linear": router_weight (K, d_in) is a
    trainable float32 Parameter initialised like nn.Linear's weight, router_bias (K,) starts at zero;
    "uniform": no router (gates 1/K, or 1/num_adapters: the library's size, where the layer carries
    some of its adapters; layer.num_adapters).
    """
    if layer.method != "route":
        raise ValueError(f"router, top_k and temperature are only used with method='route', got "
                         f"method={layer.method!r}")
    kind = "arrow" if router is None else router
    if kind not in ROUTER_KINDS:
        raise ValueError(f"router must be one of {ROUTER_KINDS}, got {router!r}")
    K = len(layer.ranks)
    top_k, temperature = _check_gating(top_k, temperature, K)
    if kind == "uniform" and top_k is not None:
        raise ValueError("top_k has no meaning with router='uniform' (every adapter gets 1/K): leave it None")
    _check_num_adapters(num_adapters, kind, K, "router")
    layer.router_kind, layer.top_k, layer.temperature = kind, top_k, temperature
    layer.num_adapters = int(num_adapters) if num_adapters is not None else None
    for name in ("router_weight", "router_bias"):
        if name in layer._parameters or name in layer._buffers or name in layer.__dict__:
            delattr(layer, name)  # (a plain None left by "uniform" too: register_buffer refuses a taken name)
    dev, d_in = layer.a_cat.device, layer.a_cat.shape[1]
    if kind == "arrow":
        protos = arrow_prototypes(layer.a_cat, layer.b_cat, layer.ranks, layer.scale)
        layer.register_buffer("router_weight", protos.to(dev))
        layer.router_bias = None
    elif kind == "linear":
        w = torch.empty((K, d_in), dtype=torch.float32, device=dev)
        nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        layer.router_weight = nn.Parameter(w)
        layer.router_bias = nn.Parameter(torch.zeros(K, dtype=torch.float32, device=dev))
    else:
        layer.router_weight = None
        layer.router_bias = None

"""Per-request adapters (lorafuse.lora_linear_segmented, LoraLibrary) against a float64 row-by-row
definition built from the original (A, B, s) triples: unsorted ids, -1 ids, unused and empty slots,
mixed ranks, per-sequence ids, both kernel schedules. On CUDA also bfloat16, larger shapes, capture
in a CUDA graph replayed with new ids, and a check that nothing synchronises with the host."""
import math

import pytest
import torch
import torch.nn.functional as F
import torch.nn as nn
from conftest import DEVICE, HAS_CUDA, KERNEL_DTYPES, TOL, compile_in_subprocess, rel_err

import lorafuse
from lorafuse.kernels import can_run
from lorafuse.kernels.segmented import (DECODE_MAX_T, decode_uses_tma, decode_wins, group_rows,
                                        segmented_linear_decode)
from lorafuse.segmented import LoraLibrary, lora_linear_segmented, lora_linear_segmented_reference

SCHEDULES = ["gathered", "grouped"]

# (T, d_in, d_out, ranks of the adapters, num_slots): odd sizes, rank 1, ranks above and below 16.
CPU_CASES = [
    (1, 40, 24, [3], 2),
    (37, 64, 48, [5, 16, 1, 8], 6),
    (100, 100, 33, [4, 20, 7], 3),
]
GPU_CASES = [
    (16, 4096, 1024, [16] * 64, 64),
    (3000, 1000, 700, [8, 64, 16, 5, 33] * 4, 24),
]
CASES = CPU_CASES + (GPU_CASES if HAS_CUDA else [])


def make_adapters(d_in, d_out, ranks, dtype):
    """Adapters whose low-rank part is of the same size as the base product (so errors in it show)."""
    out = []
    for i, r in enumerate(ranks):
        a = torch.randn(r, d_in, device=DEVICE) / math.sqrt(d_in)
        b = torch.randn(d_out, r, device=DEVICE) / math.sqrt(r)
        out.append((a.to(dtype), b.to(dtype), 0.5 + 0.25 * i))
    return out


def make_layer(d_in, d_out, dtype, bias=True):
    w = (torch.randn(d_out, d_in, device=DEVICE) / math.sqrt(d_in)).to(dtype)
    b = torch.randn(d_out, device=DEVICE).to(dtype) if bias else None
    return w, b


def expected(x, w, b, adapters, ids):
    """float64, row by row from the triples: y[t] = x[t] W^T + b + s_i (x[t] A_i^T) B_i^T."""
    x64 = x.reshape(-1, x.shape[-1]).double()
    y = F.linear(x64, w.double(), None if b is None else b.double())
    for t, i in enumerate(ids.reshape(-1).tolist()):
        if 0 <= i < len(adapters):
            a, bb, s = adapters[i]
            y[t] += s * (x64[t] @ a.double().t()) @ bb.double().t()
    return y.reshape(*x.shape[:-1], w.shape[0])


def random_ids(T, num_slots, num_adapters):
    """Unsorted ids with -1 and ids of slots left empty (>= num_adapters) mixed in."""
    ids = torch.randint(0, num_adapters, (T,), device=DEVICE)
    extra = torch.rand(T, device=DEVICE)
    ids = torch.where(extra < 0.15, torch.full_like(ids, -1), ids)
    if num_slots > num_adapters:
        ids = torch.where(extra > 0.9, torch.full_like(ids, num_slots - 1), ids)
    return ids


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("T,d_in,d_out,ranks,num_slots", CASES)
def test_matches_rowwise_definition(seeded, T, d_in, d_out, ranks, num_slots, dtype, schedule):
    adapters = make_adapters(d_in, d_out, ranks, dtype)
    lib = LoraLibrary.from_adapters(adapters, num_slots=num_slots)
    w, b = make_layer(d_in, d_out, dtype)
    x = torch.randn(T, d_in, device=DEVICE).to(dtype)
    ids = random_ids(T, num_slots, len(ranks))
    y = lora_linear_segmented(x, w, b, lib, ids, schedule=schedule)
    ref = expected(x, w, b, adapters, ids)
    assert y.dtype == dtype and y.shape == (T, d_out)
    assert rel_err(y, ref) < TOL[dtype], f"seed {seeded}"
    if dtype == torch.float32:
        # The low-rank part alone (a tighter check than the sum with the base product).
        delta = y.double() - F.linear(x.double(), w.double(), b.double())
        assert rel_err(delta, ref - F.linear(x.double(), w.double(), b.double())) < 1e-4, f"seed {seeded}"
    # Rows without an adapter (or with an empty slot) are the base layer's output: exactly when the
    # base product is F.linear's; the decode kernels (few rows) compute it themselves, so there the rows
    # must match the float64 base product as closely as the whole output does.
    plain = (ids < 0) | (ids >= len(ranks))
    if plain.any():
        if decode_wins(T, d_out, d_in, decode_uses_tma(x, w)) and schedule == "gathered":
            assert rel_err(y[plain], F.linear(x.double(), w.double(), b.double())[plain]) < TOL[dtype]
        else:
            assert torch.equal(y[plain], F.linear(x, w, b)[plain])


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_per_sequence_and_per_token_ids(seeded, schedule):
    B, L, d_in, d_out = 5, 7, 48, 40
    adapters = make_adapters(d_in, d_out, [4, 9, 2], torch.float32)
    lib = LoraLibrary.from_adapters(adapters)
    w, b = make_layer(d_in, d_out, torch.float32, bias=False)
    x = torch.randn(B, L, d_in, device=DEVICE)
    seq_ids = torch.tensor([2, -1, 0, 2, 1], device=DEVICE)
    y = lora_linear_segmented(x, w, b, lib, seq_ids, schedule=schedule)
    tok_ids = seq_ids[:, None].expand(B, L)
    assert y.shape == (B, L, d_out)
    assert rel_err(y, expected(x, w, b, adapters, tok_ids)) < TOL[torch.float32], f"seed {seeded}"
    y_tok = lora_linear_segmented(x, w, b, lib, tok_ids.contiguous(), schedule=schedule)
    assert torch.equal(y, y_tok)
    tok_ids = torch.randint(-1, 3, (B, L), device=DEVICE)  # per token, within sequences
    y = lora_linear_segmented(x, w, b, lib, tok_ids, schedule=schedule)
    assert rel_err(y, expected(x, w, b, adapters, tok_ids)) < TOL[torch.float32], f"seed {seeded}"


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_256_slots(seeded, schedule):
    d_in, d_out, T = 16, 24, 300
    ranks = [1 + (i * 7) % 16 for i in range(256)]
    adapters = make_adapters(d_in, d_out, ranks, torch.float32)
    lib = LoraLibrary.from_adapters(adapters)
    w, b = make_layer(d_in, d_out, torch.float32)
    x = torch.randn(T, d_in, device=DEVICE)
    ids = torch.randint(-1, 256, (T,), device=DEVICE)
    ids[:2] = torch.tensor([0, 255])
    y = lora_linear_segmented(x, w, b, lib, ids, schedule=schedule)
    assert rel_err(y, expected(x, w, b, adapters, ids)) < TOL[torch.float32], f"seed {seeded}"


def test_group_rows_plan(seeded):
    """Every row with an adapter lands in exactly one block of rows that all share its adapter."""
    T, N, bt = 97, 7, 4  # several blocks per slot, a last block part-filled
    ids = torch.randint(-1, N, (T,), device=DEVICE)
    ids[0] = 9  # out of range: belongs to no block (only reachable with check_ids=False)
    plan = group_rows(ids, N, bt)
    perm, blk_slot = plan.perm.cpu(), plan.blk_slot.cpu()
    seg_start, seg_end, blk_end = plan.seg_start.cpu(), plan.seg_end.cpu(), plan.blk_end.cpu()
    seen = []
    for p, slot in enumerate(blk_slot.tolist()):
        if slot == N:
            continue
        first = int(blk_end[slot]) - math.ceil(int(seg_end[slot] - seg_start[slot]) / bt)
        start = int(seg_start[slot]) + (p - first) * bt
        rows = perm[start:min(start + bt, int(seg_end[slot]))].tolist()
        assert rows and all(int(ids[r]) == slot for r in rows)
        seen += rows
    assert sorted(seen) == sorted(((ids >= 0) & (ids < N)).nonzero().squeeze(1).tolist())
    assert plan.num_programs >= int(blk_end[-1])


def test_reference_and_float64_path(seeded):
    """float64 runs the plain-torch path; it and the slot-loop reference agree with the definition."""
    d_in, d_out, T = 30, 20, 25
    adapters = make_adapters(d_in, d_out, [3, 6], torch.float64)
    lib = LoraLibrary.from_adapters(adapters, num_slots=3)
    w, b = make_layer(d_in, d_out, torch.float64)
    x = torch.randn(T, d_in, device=DEVICE, dtype=torch.float64)
    ids = random_ids(T, 3, 2)
    ref = expected(x, w, b, adapters, ids)
    assert rel_err(lora_linear_segmented(x, w, b, lib, ids), ref) < 1e-12
    assert rel_err(lora_linear_segmented_reference(x, w, b, lib, ids), ref) < 1e-12


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_set_adapter_and_clear_in_place(seeded, schedule):
    d_in, d_out, T = 32, 16, 20
    adapters = make_adapters(d_in, d_out, [4, 8], torch.float32)
    lib = LoraLibrary.from_adapters(adapters, num_slots=3, r_max=12)
    storage = lib.a.data_ptr()
    w, b = make_layer(d_in, d_out, torch.float32)
    x = torch.randn(T, d_in, device=DEVICE)
    ids = torch.randint(0, 3, (T,), device=DEVICE)
    new = make_adapters(d_in, d_out, [12], torch.float32)[0]
    lib.set_adapter(2, *new)
    lib.set_adapter(0, *adapters[1])  # a rank-8 adapter over slot 0's rank-4 one
    lib.clear(1)
    assert lib.a.data_ptr() == storage
    now = [adapters[1], None, new]
    y = lora_linear_segmented(x, w, b, lib, ids, schedule=schedule)
    empty = (torch.zeros(1, d_in, device=DEVICE), torch.zeros(d_out, 1, device=DEVICE), 0.0)
    ref = expected(x, w, b, [ad if ad is not None else empty for ad in now], ids)
    assert rel_err(y, ref) < TOL[torch.float32], f"seed {seeded}"
    a2, b2, s2 = lib.adapter(2)
    assert torch.equal(a2, new[0]) and torch.equal(b2, new[1]) and s2 == new[2]


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_gradients_of_x_weight_bias(seeded, schedule, dtype):
    d_in, d_out, T = 40, 24, 29
    adapters = make_adapters(d_in, d_out, [5, 3, 9], dtype)
    lib = LoraLibrary.from_adapters(adapters, num_slots=4)
    w, b = make_layer(d_in, d_out, dtype)
    x = torch.randn(T, d_in, device=DEVICE).to(dtype)
    ids = random_ids(T, 4, 3)
    dy = torch.randn(T, d_out, device=DEVICE).to(dtype)
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, b)]
    grads = torch.autograd.grad(lora_linear_segmented(*leaves, lib, ids, schedule=schedule), leaves, dy)
    leaves64 = [t.detach().double().requires_grad_(True) for t in (x, w, b)]
    ref = torch.autograd.grad(expected(*leaves64, adapters, ids), leaves64, dy.double())
    for name, g, r in zip(("x", "weight", "bias"), grads, ref):
        assert g.dtype == dtype
        assert rel_err(g, r) < TOL[dtype], f"grad of {name}, seed {seeded}"


def _expected_from_library(x, w, bias, a, b, scales, ids):
    """float64 definition on the packed tensors (differentiable in all of them)."""
    y = F.linear(x, w, bias)
    rows = []
    for t, i in enumerate(ids.tolist()):
        if 0 <= i < a.shape[0]:
            rows.append(y[t] + scales[i] * (x[t] @ a[i].t()) @ b[i])
        else:
            rows.append(y[t])
    return torch.stack(rows)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("x_grad", [True, False])
def test_gradients_of_the_library(seeded, schedule, dtype, x_grad):
    d_in, d_out, T = 40, 24, 45
    adapters = make_adapters(d_in, d_out, [5, 3, 9, 16], dtype)
    lib = LoraLibrary.from_adapters(adapters, num_slots=5)
    w, b = make_layer(d_in, d_out, dtype)
    x = torch.randn(T, d_in, device=DEVICE).to(dtype).requires_grad_(x_grad)
    ids = random_ids(T, 5, 4)
    dy = torch.randn(T, d_out, device=DEVICE).to(dtype)
    for t in (lib.a, lib.b, lib.scales):
        t.requires_grad_(True)
    leaves = [lib.a, lib.b, lib.scales] + ([x] if x_grad else [])
    grads = torch.autograd.grad(lora_linear_segmented(x, w, b, lib, ids, schedule=schedule), leaves, dy)
    ref_leaves = [t.detach().double().requires_grad_(True) for t in leaves]
    x64 = ref_leaves[3] if x_grad else x.detach().double()
    ref = torch.autograd.grad(_expected_from_library(x64, w.double(), b.double(), *ref_leaves[:3], ids),
                              ref_leaves, dy.double())
    for name, g, r in zip(("a", "b", "scales", "x"), grads, ref):
        assert g.dtype == (torch.float32 if name == "scales" else dtype)
        assert rel_err(g, r) < TOL[dtype], f"grad of {name}, seed {seeded}"
    # Padding rows and the empty slot get exactly zero.
    pad = torch.arange(lib.r_max, device=DEVICE)[None, :] >= lib.ranks[:, None]
    assert not grads[0][pad].any() and not grads[1][pad].any() and grads[2][4] == 0


def test_library_gradients_under_compile_raise(seeded):
    adapters = make_adapters(16, 8, [2], torch.float32)
    lib = LoraLibrary.from_adapters(adapters)
    lib.a.requires_grad_(True)
    w, b = make_layer(16, 8, torch.float32)
    x = torch.randn(3, 16, device=DEVICE)
    ids = torch.zeros(3, dtype=torch.long, device=DEVICE)
    compiled = torch.compile(lambda x: lora_linear_segmented(x, w, b, lib, ids), backend="eager", fullgraph=True)
    with pytest.raises(Exception, match="eagerly only"):
        compiled(x)


def test_bad_input_is_named(seeded):
    adapters = make_adapters(16, 8, [2, 3], torch.float32)
    lib = LoraLibrary.from_adapters(adapters)
    w, b = make_layer(16, 8, torch.float32)
    x = torch.randn(4, 16, device=DEVICE)
    ids = torch.zeros(4, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="idx must have shape"):
        lora_linear_segmented(x, w, b, lib, ids[:3])
    with pytest.raises(ValueError, match="schedule must be"):
        lora_linear_segmented(x[:0], w, b, lib, ids[:0], schedule="zzz")  # an empty batch too
    with pytest.raises(ValueError, match="idx must be an integer"):
        lora_linear_segmented(x, w, b, lib, ids.float())
    with pytest.raises(ValueError, match="library must be"):
        lora_linear_segmented(x.half(), w.half(), b.half(), lib, ids)
    with pytest.raises(ValueError, match="library must hold adapters of d_in=12"):
        lora_linear_segmented(x[:, :12], w[:, :12], b, lib, ids)
    with pytest.raises(ValueError, match="r_max must be at least"):
        LoraLibrary.from_adapters(adapters, r_max=2)
    with pytest.raises(ValueError, match="num_slots must be at least"):
        LoraLibrary.from_adapters(adapters, num_slots=1)
    for bad in ({"num_slots": "4"}, {"r_max": 2.5}, {"r_max": True}, {"num_slots": 0}):
        with pytest.raises(ValueError, match=f"{next(iter(bad))} must be None or a positive integer"):
            LoraLibrary.from_adapters(adapters, **bad)
    with pytest.raises(TypeError, match="LoraLibrary.from_adapters"):
        lora_linear_segmented(x, w, b, adapters, ids)  # the (A, B, scale) triples themselves
    with pytest.raises(ValueError, match="rank 4 exceeds"):
        lib.set_adapter(0, torch.zeros(4, 16), torch.zeros(8, 4), 1.0)
    with pytest.raises(ValueError, match="slot must be"):
        lib.clear(2)
    if not HAS_CUDA:  # on CUDA an out-of-range id is a device-side assertion (ends the context)
        with pytest.raises(ValueError, match=r"ids in \[-1, 2\).*got 2"):
            lora_linear_segmented(x, w, b, lib, torch.tensor([0, 2, 1, -1], device=DEVICE))
        with pytest.raises(ValueError, match="got -2"):
            lora_linear_segmented(x, w, b, lib, torch.tensor([0, -2, 1, -1], device=DEVICE))


def _library_tensors(adapters, num_slots, per_column):
    """(library, scales, the adapters as the reference reads them). per_column: a scale per rank
    column (the routed layer's form), each column's its own, folded into B's columns (float64) for
    the reference."""
    lib = LoraLibrary.from_adapters(adapters, num_slots=num_slots)
    scales = lib.scales
    if not per_column:
        return lib, scales, adapters
    factor = torch.rand(lib.num_slots, lib.r_max, device=DEVICE) + 0.5
    scales = (scales[:, None] * factor).contiguous()
    ref = [(a, b.double() * factor[i, :a.shape[0]].double(), s) for i, (a, b, s) in enumerate(adapters)]
    return lib, scales, ref


# (T, d_in, d_out, ranks): T from 1 to DECODE_MAX_T; d_in not a multiple of any K block (masked K
# loop) or a multiple (unmasked); d_out not a multiple of the column block.
DECODE_CASES = [(1, 40, 24, [3]), (5, 64, 48, [5, 16, 1]), (37, 100, 33, [4, 20, 7]), (64, 96, 128, [8, 2])]
if HAS_CUDA:
    DECODE_CASES += [(16, 4096, 1000, [16] * 64), (64, 1000, 4096, [8, 64, 16, 5, 33] * 4)]


@pytest.mark.parametrize("per_column", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("T,d_in,d_out,ranks", DECODE_CASES)
def test_decode_matches_rowwise_definition(seeded, T, d_in, d_out, ranks, dtype, bias, per_column):
    """segmented_linear_decode (the row shrink, then the GEMM with the rows' adapters in its
    epilogue): the whole output against float64, and the adapter term alone in float32."""
    adapters = make_adapters(d_in, d_out, ranks, dtype)
    lib, scales, ref_adapters = _library_tensors(adapters, len(ranks) + 1, per_column)
    w, b = make_layer(d_in, d_out, dtype, bias=bias)
    x = torch.randn(T, d_in, device=DEVICE).to(dtype)
    ids = random_ids(T, lib.num_slots, len(ranks))
    y = segmented_linear_decode(x, w, b, lib.a, lib.b, lib.ranks, scales, ids)
    ref = expected(x, w, b, ref_adapters, ids)
    assert y.dtype == dtype and y.shape == (T, d_out)
    assert rel_err(y, ref) < TOL[dtype], f"seed {seeded}"
    if dtype == torch.float32:
        base = F.linear(x.double(), w.double(), None if b is None else b.double())
        assert rel_err(y.double() - base, ref - base) < 1e-4, f"seed {seeded}"


@pytest.mark.parametrize("kind", ["sliced", "expanded"])
def test_decode_reads_a_strided_bias_as_given(seeded, kind):
    """A sliced or expanded bias (stride 2 or 0) into the decode kernels: the same result as a contiguous one."""
    d_in, d_out, ranks = 40, 24, [3, 5]
    adapters = make_adapters(d_in, d_out, ranks, torch.float32)
    lib, scales, _ = _library_tensors(adapters, len(ranks) + 1, False)
    w, _ = make_layer(d_in, d_out, torch.float32, bias=False)
    b = (torch.randn(2 * d_out, device=DEVICE)[::2] if kind == "sliced"
         else torch.randn(1, device=DEVICE).expand(d_out))
    x = torch.randn(5, d_in, device=DEVICE)
    ids = random_ids(5, lib.num_slots, len(ranks))
    y = segmented_linear_decode(x, w, b, lib.a, lib.b, lib.ranks, scales, ids)
    assert rel_err(y, expected(x, w, b.contiguous(), adapters, ids)) < TOL[torch.float32]


@pytest.mark.parametrize("block_n,block_k", [(16, 16), (32, 64), (64, 32)])
def test_decode_any_tile(seeded, block_n, block_k):
    """Explicit configs: column and K blocks that divide neither d_out nor d_in, or exceed d_in."""
    import triton
    adapters = make_adapters(50, 72, [4, 9], torch.float32)
    lib, scales, _ = _library_tensors(adapters, 2, False)
    w, b = make_layer(50, 72, torch.float32)
    x = torch.randn(7, 50, device=DEVICE)
    ids = torch.tensor([1, 0, -1, 1, 1, 0, -1], device=DEVICE)
    cfg = triton.Config({"BLOCK_N": block_n, "BLOCK_K": block_k}, num_warps=4, num_stages=1)
    y = segmented_linear_decode(x, w, b, lib.a, lib.b, lib.ranks, scales, ids, config=cfg)
    assert rel_err(y, expected(x, w, b, adapters, ids)) < TOL[torch.float32], f"seed {seeded}"


HOPPER = HAS_CUDA and torch.cuda.get_device_capability()[0] == 9


def test_decode_config_overrides_are_checked():
    import triton
    adapters = make_adapters(64, 72, [4], torch.float32)
    lib, scales, _ = _library_tensors(adapters, 1, False)
    w, b = make_layer(64, 72, torch.float32)
    x, ids = torch.randn(3, 64, device=DEVICE), torch.zeros(3, dtype=torch.long, device=DEVICE)
    for kw, match in (({"CHUNK_T": 3}, "CHUNK_T must be a power of two"), ({"CHUNK_T": 0}, "CHUNK_T must be"),
                      ({"EPI_LOOP": 5}, "EPI_LOOP must be 0, 1 or 2")):
        cfg = triton.Config({"BLOCK_N": 32, "BLOCK_K": 32, **kw}, num_warps=4, num_stages=1)
        with pytest.raises(ValueError, match=match):
            segmented_linear_decode(x, w, b, lib.a, lib.b, lib.ranks, scales, ids, config=cfg)


@pytest.mark.parametrize("tma", [False, True])
@pytest.mark.parametrize("chunk", [None, 2])
@pytest.mark.parametrize("epi_loop", [0, 1, 2])
@pytest.mark.parametrize("T", [7, 37])
def test_decode_epilogue_loops(seeded, T, epi_loop, chunk, tma):
    """The decode epilogue's three loops over its chunks of rows (plain, not pipelined, unrolled over
    BLOCK_T with rows past T masked), one chunk or several, in both decode kernels."""
    import triton
    if tma and not HOPPER:
        pytest.skip("the tensor-memory-accelerator decode kernel needs a Hopper GPU")
    dtype = torch.bfloat16 if tma else torch.float32
    adapters = make_adapters(64, 72, [4, 9, 16], dtype)
    lib, scales, _ = _library_tensors(adapters, 4, False)
    w, b = make_layer(64, 72, dtype)
    x = torch.randn(T, 64, device=DEVICE).to(dtype)
    ids = random_ids(T, lib.num_slots, 3)
    ids[1] = -1
    kw = {"BLOCK_N": 64 if tma else 32, "BLOCK_K": 32, "EPI_LOOP": epi_loop}
    if tma:
        kw.update(TMA=True, SWAP=True)
    if chunk is not None:
        kw["CHUNK_T"] = chunk
    cfg = triton.Config(kw, num_warps=4, num_stages=2)
    y = segmented_linear_decode(x, w, b, lib.a, lib.b, lib.ranks, scales, ids, config=cfg)
    assert rel_err(y, expected(x, w, b, adapters, ids)) < TOL[dtype], f"seed {seeded}"


@pytest.mark.skipif(not HOPPER, reason="the tensor-memory-accelerator decode kernel needs a Hopper GPU")
@pytest.mark.parametrize("swap,block_n,block_k,stages", [(False, 32, 64, 4), (False, 64, 128, 6),
                                                          (True, 64, 128, 4), (True, 128, 64, 6)])
@pytest.mark.parametrize("T,d_in,d_out", [(1, 1000, 200), (16, 4096, 1000), (37, 520, 4104), (64, 64, 96)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_decode_tma_kernel(seeded, monkeypatch, swap, block_n, block_k, stages, T, d_in, d_out, dtype):
    """_decode_tma_kernel (x and W by TMA copies, zero-filled past T, d_in and d_out; SWAP puts W's
    rows on the MMA's M side) against float64, with bias and a row without an adapter; the launch is
    checked to be the TMA kernel's."""
    import triton

    import lorafuse.kernels.segmented as S
    adapters = make_adapters(d_in, d_out, [16, 5, 8], dtype)
    lib, scales, _ = _library_tensors(adapters, 4, False)
    w, b = make_layer(d_in, d_out, dtype)
    x = torch.randn(T, d_in, device=DEVICE).to(dtype)
    ids = random_ids(T, lib.num_slots, 3)
    ids[0] = -1
    launched = []
    real = S.launch
    monkeypatch.setattr(S, "launch", lambda fn, *a, **k: launched.append(fn) or real(fn, *a, **k))
    cfg = triton.Config({"BLOCK_N": block_n, "BLOCK_K": block_k, "TMA": True, "SWAP": swap}, num_warps=4,
                        num_stages=stages)
    y = segmented_linear_decode(x, w, b, lib.a, lib.b, lib.ranks, scales, ids, config=cfg)
    assert S._decode_tma_kernel in launched and S._decode_kernel not in launched
    assert rel_err(y, expected(x, w, b, adapters, ids)) < TOL[dtype], f"seed {seeded}"
    # Unaligned rows (d_in = 1001 elements: 2002 bytes) cannot be TMA copies: the pointer kernel runs.
    launched.clear()
    x2, w2 = torch.randn(T, d_in + 1, device=DEVICE).to(dtype), torch.randn(d_out, d_in + 1, device=DEVICE).to(dtype)
    a2 = make_adapters(d_in + 1, d_out, [4], dtype)
    lib2, sc2, _ = _library_tensors(a2, 1, False)
    ids2 = torch.zeros(T, dtype=torch.long, device=DEVICE)
    y2 = segmented_linear_decode(x2, w2, None, lib2.a, lib2.b, lib2.ranks, sc2, ids2, config=cfg)
    assert S._decode_kernel in launched and S._decode_tma_kernel not in launched
    assert rel_err(y2, expected(x2, w2, None, a2, ids2)) < TOL[dtype], f"seed {seeded}"


def test_decode_config_deep_tiles_for_one_row_block(monkeypatch):
    """The TMA decode kernel takes 256-deep tiles of W in five stages up to 16 rows (one row block)
    at ranks up to 256, and 128 x 6 otherwise; the pointer kernel's table is unchanged."""
    import lorafuse.kernels.segmented as S
    monkeypatch.setattr(S, "is_interpreting", lambda: False)
    deep = lambda c: (c.kwargs["BLOCK_K"], c.num_stages) == (256, 5)  # noqa: E731
    for T in (1, 4, 16):
        for r in (1, 16, 256):
            assert deep(S.decode_config(T, 4096, 4096, torch.bfloat16, 132, tma=True, r_max=r)), (T, r)
        assert not deep(S.decode_config(T, 4096, 4096, torch.bfloat16, 132, tma=True, r_max=257))
    for T in (17, 32, 64):
        c = S.decode_config(T, 4096, 4096, torch.bfloat16, 132, tma=True, r_max=16)
        assert (c.kwargs["BLOCK_K"], c.num_stages) == (128, 6)
    assert not deep(S.decode_config(16, 4096, 4096, torch.bfloat16, 132, tma=False, r_max=16))


@pytest.mark.skipif(not HOPPER, reason="the tensor-memory-accelerator decode kernel needs a Hopper GPU")
@pytest.mark.parametrize("T", [1, 4, 16])
@pytest.mark.parametrize("ranks", [[16, 5, 8], [256, 3]])
def test_decode_default_config_fits(seeded, monkeypatch, T, ranks):
    """The default decode config (deep tiles up to 16 rows) runs within shared memory and matches
    float64 on Hopper, at the largest rank it takes (256: one row per epilogue chunk) and a small one;
    the launch is checked to be the TMA kernel with 256-deep tiles in five stages."""
    import lorafuse.kernels.segmented as S
    d_in, d_out = 1000, 520
    adapters = make_adapters(d_in, d_out, ranks, torch.bfloat16)
    lib, scales, _ = _library_tensors(adapters, len(ranks) + 1, False)
    w, b = make_layer(d_in, d_out, torch.bfloat16)
    x = torch.randn(T, d_in, device=DEVICE).to(torch.bfloat16)
    ids = random_ids(T, lib.num_slots, len(ranks))
    launched = []
    real = S.launch
    monkeypatch.setattr(S, "launch", lambda fn, *a, **k: launched.append((fn, k)) or real(fn, *a, **k))
    y = segmented_linear_decode(x, w, b, lib.a, lib.b, lib.ranks, scales, ids)
    tma = [k for fn, k in launched if fn is S._decode_tma_kernel]
    assert len(tma) == 1 and (tma[0]["BLOCK_K"], tma[0]["num_stages"]) == (256, 5), launched
    assert rel_err(y, expected(x, w, b, adapters, ids)) < TOL[torch.bfloat16], f"seed {seeded}"


@pytest.mark.skipif(not HOPPER, reason="the tensor-memory-accelerator decode kernel needs a Hopper GPU")
def test_narrow_layers_take_the_tma_decode_kernel_on_hopper(seeded, monkeypatch):
    """With 16-bit inputs on Hopper, few rows of any layer (here d_out = d_in) run the TMA decode
    kernel through lora_linear_segmented; float32 and gradients keep cuBLAS + segmented_lora_."""
    import lorafuse.kernels.segmented as S
    launched = []
    real = S.launch
    monkeypatch.setattr(S, "launch", lambda fn, *a, **k: launched.append(fn) or real(fn, *a, **k))
    for dtype in (torch.bfloat16, torch.float32):
        adapters = make_adapters(512, 512, [8, 16], dtype)
        lib = LoraLibrary.from_adapters(adapters)
        w, b = make_layer(512, 512, dtype)
        for T in (1, 16, DECODE_MAX_T):
            launched.clear()
            x = torch.randn(T, 512, device=DEVICE).to(dtype)
            ids = random_ids(T, 2, 2)
            y = lora_linear_segmented(x, w, b, lib, ids)
            assert (S._decode_tma_kernel in launched) == (dtype == torch.bfloat16), (dtype, T)
            assert rel_err(y, expected(x, w, b, adapters, ids)) < TOL[dtype], (dtype, T)


def test_few_rows_without_grad_take_the_decode_kernels(seeded, monkeypatch):
    """lora_linear_segmented runs segmented_linear_decode where decode_wins (T <= DECODE_MAX_T rows of a
    layer at least twice as wide as deep, no gradients, auto or gathered; float32 here, so not the
    TMA kernel), and cuBLAS + segmented_lora_ otherwise; both give the definition's result."""
    if not can_run(torch.zeros(1, device=DEVICE)):
        pytest.skip("the kernels do not run here (CPU without TRITON_INTERPRET=1)")
    import lorafuse.segmented as seg
    calls = []
    real = seg.segmented_linear_decode
    monkeypatch.setattr(seg, "segmented_linear_decode", lambda *a, **k: calls.append(a[0].shape[0]) or real(*a, **k))
    for d_in, d_out in [(24, 48), (48, 40)]:
        adapters = make_adapters(d_in, d_out, [3, 6], torch.float32)
        lib = LoraLibrary.from_adapters(adapters)
        w, b = make_layer(d_in, d_out, torch.float32)
        wide = d_out >= 2 * d_in
        for T, schedule, grad, decoded in [(DECODE_MAX_T, "auto", False, wide),
                                           (DECODE_MAX_T + 1, "auto", False, False),
                                           (3, "gathered", False, wide), (3, "grouped", False, False),
                                           (3, "auto", True, False)]:
            calls.clear()
            x = torch.randn(T, d_in, device=DEVICE, requires_grad=grad)
            ids = random_ids(T, 2, 2)
            y = lora_linear_segmented(x, w, b, lib, ids, schedule=schedule)
            assert calls == ([T] if decoded else []), (d_in, d_out, T, schedule, grad)
            ref = expected(x.detach(), w, b, adapters, ids)
            assert rel_err(y, ref) < TOL[torch.float32], (d_in, d_out, T, schedule, grad)


def test_decode_bad_input_is_named():
    adapters = make_adapters(16, 8, [2, 3], torch.float32)
    lib = LoraLibrary.from_adapters(adapters)
    w, b = make_layer(16, 8, torch.float32)
    x = torch.randn(4, 16, device=DEVICE)
    ids = torch.zeros(4, dtype=torch.long, device=DEVICE)
    args = (lib.a, lib.b, lib.ranks, lib.scales)
    with pytest.raises(ValueError, match=r"weight must be a \(N, 16\)"):
        segmented_linear_decode(x, w[:, :12], b, *args, ids)
    with pytest.raises(ValueError, match=r"bias must be a \(8,\)"):
        segmented_linear_decode(x, w, b[:5], *args, ids)
    with pytest.raises(ValueError, match="at most 64 rows"):
        segmented_linear_decode(torch.randn(65, 16, device=DEVICE), w, b, *args,
                                torch.zeros(65, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match=r"idx must be an int32/int64 tensor of shape \(4,\)"):
        segmented_linear_decode(x, w, b, *args, ids[:3])
    with pytest.raises(ValueError, match=r"fac_out must have shape \(2, 3, 6\)"):
        segmented_linear_decode(x, w[:6], b[:6], *args, ids)


def test_exported_from_package():
    assert lorafuse.lora_linear_segmented is lora_linear_segmented
    assert lorafuse.LoraLibrary is LoraLibrary


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_base_callable_writes_before_the_expand(seeded, schedule):
    """segmented_lora_(out=empty, base=fn): fn writes the base product, the low-rank terms are added
    onto it (on a GPU while a graph is captured it runs beside the shrink: the capture test below)."""
    if not can_run(torch.empty(0, device=DEVICE)):
        pytest.skip("kernels cannot run here")
    from lorafuse.kernels.segmented import segmented_lora_

    adapters = make_adapters(40, 24, [4, 7, 2], torch.float32)
    lib = LoraLibrary.from_adapters(adapters)
    w, b = make_layer(40, 24, torch.float32)
    x = torch.randn(9, 40, device=DEVICE)
    ids = random_ids(9, 3, 3)
    out = torch.full((9, 24), float("nan"), device=DEVICE)
    calls = []

    def base():
        calls.append(1)
        torch.addmm(b, x, w.t(), out=out)

    y = segmented_lora_(out, x, lib.a, lib.b, lib.ranks, lib.scales, ids, schedule, base=base)
    assert y is out and calls == [1]
    assert rel_err(y, expected(x, w, b, adapters, ids)) < TOL[torch.float32]


# ----------------------------------------------------------------------------------------------
# CUDA only


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs and sync checks need a GPU")
@pytest.mark.parametrize("T,schedule,bias", [(16, "auto", True), (16, "gathered", False), (16, "grouped", True),
                                             (2000, "auto", True), (2000, "gathered", True)])
def test_cuda_graph_capture_and_replay_with_new_ids(seeded, T, schedule, bias):
    """Captured and replayed (the gathered schedule overlaps the base GEMM with the row shrink on a
    side stream while capturing) with new ids, new inputs and a slot rewritten in place."""
    d_in, d_out, dtype = 512, 384, torch.bfloat16
    ranks = [16, 8, 32, 4] * 16
    adapters = make_adapters(d_in, d_out, ranks, dtype)
    lib = LoraLibrary.from_adapters(adapters)
    w, b = make_layer(d_in, d_out, dtype, bias=bias)
    x = torch.randn(T, d_in, device=DEVICE).to(dtype)
    ids = random_ids(T, 64, 64)
    run = lambda: lora_linear_segmented(x, w, b, lib, ids, schedule=schedule)  # noqa: E731
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(stream):
        for _ in range(2):  # compile the kernels outside the capture
            run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        out = run()
    for _ in range(3):
        ids.copy_(random_ids(T, 64, 64))
        x.copy_(torch.randn(T, d_in, device=DEVICE).to(dtype))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(out, expected(x, w, b, adapters, ids)) < TOL[dtype], f"seed {seeded}"
    # A slot rewritten in place is seen by the captured graph.
    new = make_adapters(d_in, d_out, [24], dtype)[0]
    lib.set_adapter(3, *new)
    adapters[3] = new
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(out, expected(x, w, b, adapters, ids)) < TOL[dtype], f"seed {seeded}"


@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
@pytest.mark.parametrize("T", [16, 2048])
def test_no_host_synchronisation(seeded, T):
    d_in, d_out, dtype = 256, 128, torch.float16
    lib = LoraLibrary.from_adapters(make_adapters(d_in, d_out, [8, 16, 4], dtype), num_slots=8)
    w, b = make_layer(d_in, d_out, dtype)
    x = torch.randn(T, d_in, device=DEVICE).to(dtype)
    ids = random_ids(T, 8, 3)
    lora_linear_segmented(x, w, b, lib, ids)  # compile first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        lora_linear_segmented(x, w, b, lib, ids)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ----------------------------------------------------------------------------------------------
# A whole model against peft's mixed-batch forward (adapter_names=)


def _tiny_llama_with_adapters():
    import copy

    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=50)
    base = LlamaForCausalLM(config).eval()
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
                                adapter_name="a0")
    peft_model.add_adapter("a1", LoraConfig(r=8, lora_alpha=4, target_modules=["q_proj", "v_proj", "o_proj"]))
    peft_model.add_adapter("a2", LoraConfig(r=2, lora_alpha=16, use_rslora=True, target_modules=["v_proj"]))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    return base, peft_model.eval()


def test_attach_library_matches_peft_mixed_batch(seeded):
    from lorafuse.adapters import adapters_from_peft
    from lorafuse.segmented import SegmentedLoraLinear, attach_library

    base, peft_model = _tiny_llama_with_adapters()
    adapters = adapters_from_peft(peft_model, ["a0", "a1", "a2"])
    handle = attach_library(base, adapters, num_slots=4)
    assert handle.names == ["a0", "a1", "a2"]
    assert isinstance(base.model.layers[0].self_attn.o_proj, SegmentedLoraLinear)
    tokens = torch.randint(0, 50, (5, 6))
    per_seq = ["a1", None, "a0", "a2", "a1"]
    handle.set_ids(per_seq)
    with torch.no_grad():
        out = base(tokens).logits
        ref = peft_model(tokens, adapter_names=[n or "__base__" for n in per_seq]).logits
    assert rel_err(out, ref) < 1e-5, f"seed {seeded}"
    # Every adapter makes a difference (the comparison is not between base outputs).
    with torch.no_grad():
        handle.set_ids([None] * 5)
        plain = base(tokens).logits
    assert all(rel_err(plain[b], out[b]) > 1e-3 for b in (0, 2, 3, 4))
    # Per-token ids as a (B, L) list of lists give what the same ids as a tensor give.
    per_tok = [[["a0", "a1", None, "a2", "a0", "a1"][(b + t) % 6] for t in range(6)] for b in range(5)]
    with torch.no_grad():
        handle.set_ids(per_tok)
        out_list = base(tokens).logits
        index = {"a0": 0, "a1": 1, "a2": 2, None: -1}
        handle.set_ids(torch.tensor([[index[v] for v in row] for row in per_tok]))
        assert torch.equal(base(tokens).logits, out_list)
    with pytest.raises(ValueError, match="per-token ids must be a"):
        handle.set_ids([["a0", "a1"], ["a0"]])
    first = torch.tensor([1, 0, 2, -1, 1], device=DEVICE)
    held = handle.set_ids(first)
    assert handle.set_ids(torch.tensor([0, 1, -1, 2, 0])) is held  # same shape: copied in place (CUDA graphs)
    assert held.tolist() == [0, 1, -1, 2, 0]
    assert first.tolist() == [1, 0, 2, -1, 1], "the caller's ids tensor was overwritten"
    # Ids first given in a narrow integer dtype are held as int64: a later -1 (None) is not 255.
    assert handle.set_ids(torch.tensor([1, 0], dtype=torch.uint8)).dtype == torch.int64
    assert handle.set_ids([None, 1]).tolist() == [-1, 1]
    assert torch.equal(plain[1], out[1])
    handle.detach()
    assert type(base.model.layers[0].self_attn.o_proj).__name__ == "Linear"
    with torch.no_grad():  # (few rows: the decode kernels computed `plain`'s base products, in its own order)
        assert rel_err(base(tokens).logits, plain) < 1e-6


def test_attached_library_follows_the_model_casts_and_moves(seeded):
    """model.double() (or .to / .half / .cuda) after attach_library also casts each layer's library,
    which is not a parameter or buffer; ranks stay int32 and scales float32."""
    from lorafuse.adapters import adapters_from_peft
    from lorafuse.segmented import attach_library

    base, peft_model = _tiny_llama_with_adapters()
    handle = attach_library(base, adapters_from_peft(peft_model, ["a0", "a1", "a2"]))
    tokens = torch.randint(0, 50, (3, 6))
    handle.set_ids(["a1", "a2", None])
    with torch.no_grad():
        out = base(tokens).logits
        base.double()
        out64 = base(tokens).logits
    assert out64.dtype == torch.float64 and rel_err(out64, out) < 1e-5
    lib = base.model.layers[0].self_attn.q_proj.library
    assert (lib.a.dtype, lib.b.dtype, lib.ranks.dtype, lib.scales.dtype) == (
        torch.float64, torch.float64, torch.int32, torch.float32)
    assert base.model.layers[0].self_attn.q_proj.ids.value.dtype == torch.int64  # ids are not cast


@pytest.mark.skipif(not HAS_CUDA, reason="moves the model to a GPU")
def test_attached_library_follows_cuda_and_half(seeded):
    """model.cuda().half() after attach_library and set_ids: the library and the ids move with the
    layers; the output matches the CPU float32 one to fp16 rounding."""
    from lorafuse.adapters import adapters_from_peft
    from lorafuse.segmented import attach_library

    base, peft_model = _tiny_llama_with_adapters()
    handle = attach_library(base, adapters_from_peft(peft_model, ["a0", "a1", "a2"]))
    tokens = torch.randint(0, 50, (3, 6))
    handle.set_ids(["a1", "a2", None])
    with torch.no_grad():
        out = base(tokens).logits
        base.cuda().half()
        out16 = base(tokens.cuda()).logits
    layer = base.model.layers[0].self_attn.q_proj
    assert layer.library.a.is_cuda and layer.library.a.dtype == torch.float16
    assert layer.library.ranks.dtype == torch.int32
    assert layer.ids.value.is_cuda and layer.ids.value.dtype == torch.int64  # ids set before the move went too
    assert out16.dtype == torch.float16 and rel_err(out16.float().cpu(), out) < 2e-2
    held = handle.set_ids(["a2", None, "a0"])
    assert held.is_cuda and held.tolist() == [2, -1, 0]


def test_library_to_is_a_copy():
    """LoraLibrary.to() never shares memory with the original, even where dtype and device are unchanged."""
    lib = LoraLibrary.from_adapters([(torch.randn(4, 16) / 6, torch.randn(12, 4) / 6, 2.0),
                                     (torch.randn(2, 16) / 6, torch.randn(12, 2) / 6, 0.5)])
    for other in (lib.to(dtype=torch.float16), lib.to()):
        other.clear(0)
        other.a.zero_()
        assert lib.ranks.tolist() == [4, 2] and lib.scales.tolist() == [2.0, 0.5] and lib.a.abs().sum() > 0


def test_layer_casts_keep_the_library_exact_and_trainable():
    """A cast of a SegmentedLoraLinear leaves the float32 scales unrounded, and a trainable library's
    factors stay the leaves an optimizer holds, with gradients after the cast."""
    from lorafuse.segmented import AdapterIds, SegmentedLoraLinear

    lib = LoraLibrary.from_adapters([(torch.randn(4, 16), torch.randn(12, 4), 16 / 12)])
    a = lib.a.requires_grad_()
    ids = AdapterIds()
    ids.value = torch.tensor([0, 0])
    layer = SegmentedLoraLinear(nn.Linear(16, 12), lib, ids)
    layer.to(torch.bfloat16)
    layer.float()
    assert layer.library.scales.item() == torch.tensor(16 / 12, dtype=torch.float32).item()
    layer.double()
    assert layer.library.a is a and a.is_leaf and a.dtype == torch.float64
    opt = torch.optim.SGD([a], lr=0.1)
    layer(torch.randn(2, 16, dtype=torch.float64)).sum().backward()
    assert a.grad is not None and a.grad.dtype == torch.float64 and a.grad.abs().sum() > 0
    opt.step()
    layer.float()  # the gradient is cast with its factor, as a parameter's is
    assert a.dtype == a.grad.dtype == torch.float32
    opt.step()  # (SGD: Adam's state would stay float64, as for any parameter cast after a step)
    layer.to("meta")  # to and from the meta device: new tensors (no in-place move exists)
    assert layer.library.a.is_meta and layer.library.a.requires_grad and layer.base_layer.weight.is_meta


def test_detach_after_a_cast_restores_a_working_gpt2(tmp_path, seeded):
    """detach() after model.double(): the Conv1D put back carries the cast weight (its bias, shared
    with the Linear view, was cast with the model), so the model runs as before attach_library."""
    import copy

    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    from lorafuse.segmented import attach_library

    base = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50, n_positions=16)).eval()
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True),
                        adapter_name="a")
    pm.save_pretrained(str(tmp_path))
    tokens = torch.randint(0, 50, (1, 5))
    with torch.no_grad():
        before = base(tokens).logits
        handle = attach_library(base, [str(tmp_path / "a")])
        base.double()
        handle.detach()
        attn = base.transformer.h[0].attn.c_attn
        assert type(attn).__name__ == "Conv1D" and attn.weight.dtype == attn.bias.dtype == torch.float64
        assert rel_err(base(tokens).logits, before) < 1e-6


def test_attached_library_under_autocast(seeded):
    """Under torch.autocast the attached layers compute in the autocast dtype, as nn.Linear does
    (the float32 library is cast with the weights), and a trainable library gets float32 gradients."""
    from lorafuse.adapters import adapters_from_peft
    from lorafuse.segmented import attach_library

    base, peft_model = _tiny_llama_with_adapters()
    handle = attach_library(base, adapters_from_peft(peft_model, ["a0", "a1", "a2"]))
    tokens = torch.randint(0, 50, (3, 6))
    handle.set_ids(["a1", "a2", None])
    with torch.no_grad():
        out = base(tokens).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out_bf16 = base(tokens).logits
    assert out_bf16.dtype == torch.bfloat16 and rel_err(out_bf16.float(), out) < 5e-2
    lib = base.model.layers[0].self_attn.q_proj.library
    lib.b.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        base(tokens).logits.float().square().mean().backward()
    assert lib.b.grad is not None and lib.b.grad.dtype == torch.float32 and lib.b.grad.abs().sum() > 0


def test_attach_library_errors():
    from lorafuse.adapters import adapters_from_peft
    from lorafuse.segmented import attach_library

    base, peft_model = _tiny_llama_with_adapters()
    handle = attach_library(base, adapters_from_peft(peft_model, ["a0", "a1"]))
    with pytest.raises(RuntimeError, match="set_ids"):
        base(torch.randint(0, 50, (1, 3)))
    with pytest.raises(ValueError, match="unknown adapter name 'a2'"):
        handle.set_ids(["a2"])
    for bad in ("a0", [0.7, 0], torch.tensor([0.0, 1.0]), None):  # no silent truncation or per-character names
        with pytest.raises(TypeError, match="ids must"):
            handle.set_ids(bad)
    with pytest.raises(ValueError, match="already attached"):
        attach_library(base, adapters_from_peft(peft_model, ["a0", "a1"]))
    handle.detach()
    with pytest.raises(ValueError, match="names must be distinct"):
        attach_library(base, adapters_from_peft(peft_model, ["a0", "a1"]), names=["x", "x"])
    with pytest.raises(ValueError, match=r"num_slots must be an integer >= the number of adapters \(2\)"):
        attach_library(base, adapters_from_peft(peft_model, ["a0", "a1"]), num_slots=1)


def test_torch_compile_fullgraph(seeded):
    d_in, d_out, B, L = 40, 24, 3, 5
    adapters = make_adapters(d_in, d_out, [4, 6], torch.float32)
    lib = LoraLibrary.from_adapters(adapters, num_slots=3)
    w, b = make_layer(d_in, d_out, torch.float32)
    x = torch.randn(B, L, d_in, device=DEVICE, requires_grad=True)
    ids = torch.tensor([1, -1, 0], device=DEVICE)

    def f(x, w, b):
        return lora_linear_segmented(x, w, b, lib, ids).square().sum()

    backend = "inductor" if HAS_CUDA else "aot_eager"
    compiled = torch.compile(f, backend=backend, fullgraph=True)
    loss = compiled(x, w, b)
    (gx,) = torch.autograd.grad(loss, [x])
    loss_ref = f(x, w, b)
    (gx_ref,) = torch.autograd.grad(loss_ref, [x])
    assert rel_err(loss, loss_ref) < 1e-5 and rel_err(gx, gx_ref) < 1e-5


@pytest.mark.skipif(HAS_CUDA, reason="on CUDA a failed device-side assertion ends the process's CUDA context")
def test_compiled_call_checks_ids(seeded):
    # The range check survives compilation (an assertion without a message is dropped as dead code).
    d_in, d_out = 40, 24
    lib = LoraLibrary.from_adapters(make_adapters(d_in, d_out, [4, 6], torch.float32), num_slots=3)
    w, b = make_layer(d_in, d_out, torch.float32)
    compiled = torch.compile(lambda x, ids: lora_linear_segmented(x, w, b, lib, ids), backend="aot_eager",
                             fullgraph=True)
    x = torch.randn(3, d_in, device=DEVICE)
    compiled(x, torch.tensor([1, -1, 0], device=DEVICE))
    with pytest.raises(RuntimeError, match=r"idx must hold adapter ids in \[-1, 3\)"):
        compiled(x, torch.tensor([5, -1, 0], device=DEVICE))


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need a GPU")
def test_reduce_overhead_compile_with_new_ids(seeded):
    d_in, d_out, T, dtype = 256, 192, 16, torch.bfloat16
    adapters = make_adapters(d_in, d_out, [8, 16, 4] * 4, dtype)
    lib = LoraLibrary.from_adapters(adapters)
    w, b = make_layer(d_in, d_out, dtype)
    compiled = torch.compile(lambda x, ids: lora_linear_segmented(x, w, b, lib, ids), mode="reduce-overhead",
                             fullgraph=True)
    with torch.no_grad():
        for _ in range(4):
            x = torch.randn(T, d_in, device=DEVICE).to(dtype)
            ids = random_ids(T, 12, 12)
            y = compiled(x, ids)
            assert rel_err(y, expected(x, w, b, adapters, ids)) < TOL[dtype], f"seed {seeded}"


_COMPILE_FOR_HOPPER = r"""
import warnings
warnings.filterwarnings("ignore")
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import lorafuse.kernels.segmented as S

def compile_for_sm90(fn, types, consts, warps=4, stages=3):
    sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in fn.arg_names}
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": warps, "num_stages": stages})
    assert "cubin" in kernel.asm, fn.__name__
    return kernel

plan = {"blk_slot_ptr": "*i32", "seg_start_ptr": "*i32", "seg_end_ptr": "*i32", "blk_end_ptr": "*i32",
        "perm_ptr": "*i32"}
compile_for_sm90(S._gathered_shrink_kernel, {"x_ptr": "*bf16", "fac_ptr": "*bf16", "ranks_ptr": "*i32",
                 "idx_ptr": "*i64", "part_ptr": "*fp32"}, {"BLOCK_R": 16, "BLOCK_D": 256})
compile_for_sm90(S._gathered_expand_kernel, {"out_ptr": "*bf16", "part_ptr": "*fp32", "fac_ptr": "*bf16",
                 "ranks_ptr": "*i32", "scales_ptr": "*fp32", "idx_ptr": "*i64", "row_scale_ptr": "*fp32"},
                 {"HAS_ROW_SCALE": True, "BLOCK_R": 16, "BLOCK_N": 256, "BLOCK_SPLITS": 16})
compile_for_sm90(S._grouped_shrink_kernel, {"x_ptr": "*bf16", "fac_ptr": "*bf16", "ranks_ptr": "*i32",
                 "part_ptr": "*fp32", **plan}, {"PREC": "tf32", "BLOCK_T": 64, "BLOCK_R": 16, "BLOCK_D": 128})
for col_blocks, stages in ((1, 1), (4, 3)):
    compile_for_sm90(S._grouped_expand_kernel, {"out_ptr": "*bf16", "part_ptr": "*fp32", "fac_ptr": "*bf16",
                     "ranks_ptr": "*i32", "scales_ptr": "*fp32", "row_scale_ptr": "*fp32", **plan},
                     {"HAS_ROW_SCALE": True, "PREC": "tf32", "BLOCK_T": 64, "BLOCK_R": 16, "BLOCK_N": 128,
                      "COL_BLOCKS": col_blocks, "STAGES": stages})
compile_for_sm90(S._count_rows_kernel, {"idx_ptr": "*i64", "counts_ptr": "*i32", "pos_ptr": "*i32"}, {"BLOCK": 1024})
compile_for_sm90(S._plan_kernel, {"idx_ptr": "*i64", "counts_ptr": "*i32", "pos_ptr": "*i32", "perm_ptr": "*i32",
                 "seg_start_ptr": "*i32", "seg_end_ptr": "*i32", "blk_end_ptr": "*i32", "blk_slot_ptr": "*i32"},
                 {"BLOCK_T": 64, "BLOCK_S": 256, "CHUNK_P": 64, "CHUNK_T": 1024}, warps=8)
compile_for_sm90(S._grouped_outer_kernel, {"u_ptr": "*fp32", "v_ptr": "*bf16", "scales_ptr": "*fp32",
                 "out_ptr": "*fp32", "seg_start_ptr": "*i32", "seg_end_ptr": "*i32", "perm_ptr": "*i32"},
                 {"PREC": "tf32", "BLOCK_T": 64, "BLOCK_R": 16, "BLOCK_D": 128})
compile_for_sm90(S._check_ids_kernel, {"idx_ptr": "*i64"}, {"BLOCK": 1024})
compile_for_sm90(S._gathered_shrink_checked_kernel, {"x_ptr": "*bf16", "fac_ptr": "*bf16", "ranks_ptr": "*i32",
                 "idx_ptr": "*i64", "part_ptr": "*fp32"}, {"BLOCK_R": 16, "BLOCK_D": 256, "PDL": True})
compile_for_sm90(S._gathered_shrink_kernel, {"x_ptr": "*bf16", "fac_ptr": "*bf16", "ranks_ptr": "*i32",
                 "idx_ptr": "*i64", "part_ptr": "*fp32"}, {"BLOCK_R": 16, "BLOCK_D": 256, "PDL": True})
for even, pdl in ((True, True), (False, False)):
    compile_for_sm90(S._decode_kernel, {"x_ptr": "*bf16", "w_ptr": "*bf16", "bias_ptr": "*bf16", "out_ptr": "*bf16",
                     "part_ptr": "*fp32", "fac_ptr": "*bf16", "ranks_ptr": "*i32", "scales_ptr": "*fp32",
                     "idx_ptr": "*i64"},
                     {"HAS_BIAS": True, "PREC": "tf32", "BLOCK_T": 16, "BLOCK_N": 32, "BLOCK_K": 256,
                      "BLOCK_SPLITS": 16, "BLOCK_R": 16, "CHUNK_T": 16, "EVEN_K": even, "EVEN_N": even,
                      "PDL": pdl})
for swap, bn in ((True, 64), (False, 32)):
    compile_for_sm90(S._decode_tma_kernel, {"x_desc": "tensordesc<bf16[16,128]>",
                     "w_desc": f"tensordesc<bf16[{bn},128]>", "bias_ptr": "*bf16", "out_ptr": "*bf16",
                     "part_ptr": "*fp32", "fac_ptr": "*bf16", "ranks_ptr": "*i32", "scales_ptr": "*fp32",
                     "idx_ptr": "*i64"},
                     {"HAS_BIAS": True, "PREC": "tf32", "BLOCK_T": 16, "BLOCK_N": bn, "BLOCK_K": 128,
                      "BLOCK_SPLITS": 16, "BLOCK_R": 16, "CHUNK_T": 16, "SWAP": swap, "PDL": True})
# decode_config's tiles up to 16 rows (64 x 256 of W, 5 stages) at the epilogue's two extreme chunks
# (16 rows of rank 16; one row of rank 256) fit in the H100/H200's 227 KB of shared memory.
for block_r, chunk in ((16, 16), (256, 1)):
    k = compile_for_sm90(S._decode_tma_kernel, {"x_desc": "tensordesc<bf16[16,256]>",
                         "w_desc": "tensordesc<bf16[64,256]>", "bias_ptr": "*bf16", "out_ptr": "*bf16",
                         "part_ptr": "*fp32", "fac_ptr": "*bf16", "ranks_ptr": "*i32", "scales_ptr": "*fp32",
                         "idx_ptr": "*i64"},
                         {"HAS_BIAS": True, "PREC": "tf32", "BLOCK_T": 16, "BLOCK_N": 64, "BLOCK_K": 256,
                          "BLOCK_SPLITS": 16, "BLOCK_R": block_r, "CHUNK_T": chunk, "EPI_LOOP": 1, "SWAP": True,
                          "PDL": True}, stages=5)
    assert k.metadata.shared <= 232448, (block_r, k.metadata.shared)
    print("shared", block_r, k.metadata.shared)
print("compiled")
"""


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU the other tests compile and run the kernels")
def test_kernels_compile_for_hopper_without_a_gpu():
    """The interpreter does not compile: build every kernel for sm_90 (PTX and cubin, bf16) so that
    a compile error shows up in CI without a GPU."""
    compile_in_subprocess(_COMPILE_FOR_HOPPER)


_BAD_ID_ON_CUDA = r"""
import sys
import torch
from lorafuse.segmented import LoraLibrary, lora_linear_segmented
bad, dtype, schedule, grad = int(sys.argv[1]), getattr(torch, sys.argv[2]), sys.argv[3], sys.argv[4] == "grad"
lib = LoraLibrary.from_adapters([(torch.randn(4, 32), torch.randn(16, 4), 1.0)] * 3).to("cuda", dtype)
w = torch.randn(16, 32, device="cuda", dtype=dtype)
ids = torch.tensor([0, 1, bad, -1], device="cuda")
x = torch.randn(4, 32, device="cuda", dtype=dtype, requires_grad=grad)
y = lora_linear_segmented(x, w, None, lib, ids, schedule=schedule)
torch.cuda.synchronize()
print("finished")
"""


@pytest.mark.skipif(not HAS_CUDA, reason="device-side assertions need a GPU")
@pytest.mark.parametrize("bad", [3, -2])
@pytest.mark.parametrize("dtype,schedule,grad", [("float32", "auto", ""), ("bfloat16", "auto", ""),
                                                 ("float32", "grouped", ""), ("float32", "auto", "grad")])
def test_out_of_range_id_is_a_device_assertion(bad, dtype, schedule, grad):
    """An out-of-range id ends the CUDA context (so it runs in a child process); a valid one does not.
    Every path checks: the gathered row shrink (float32), the decode kernels' shrink (bfloat16 on
    Hopper), the grouped schedule and the autograd path (a check launch of their own)."""
    import subprocess
    import sys

    def run(i):
        return subprocess.run([sys.executable, "-c", _BAD_ID_ON_CUDA, str(i), dtype, schedule, grad or "-"],
                              capture_output=True, text=True, timeout=300)

    ok = run(2)
    assert ok.returncode == 0 and "finished" in ok.stdout, ok.stderr[-2000:]
    done = run(bad)
    assert done.returncode != 0 and "finished" not in done.stdout
    assert "assert" in done.stderr.lower(), done.stderr[-2000:]


def test_library_refuses_ranks_it_cannot_hold_and_copies_strided_vectors():
    from lorafuse.segmented import LoraLibrary

    a, b = torch.randn(2, 8, 32, device=DEVICE), torch.randn(2, 8, 40, device=DEVICE)
    scales = torch.ones(2, device=DEVICE)
    for ranks in ([4, 16], [-1, 4]):
        with pytest.raises(ValueError, match=r"ranks must lie in \[0, 8\]"):
            LoraLibrary(a, b, torch.tensor(ranks, dtype=torch.int32, device=DEVICE), scales)
    with pytest.raises(ValueError, match="ranks must be an integer tensor"):
        LoraLibrary(a, b, torch.tensor([True, False], device=DEVICE), scales)
    with pytest.raises(ValueError, match="scales must be finite"):
        LoraLibrary(a, b, torch.tensor([4, 8], dtype=torch.int32, device=DEVICE),
                    torch.tensor([1.0, float("nan")], device=DEVICE))
    with pytest.raises(ValueError, match="scales must be a real tensor"):
        LoraLibrary(a, b, torch.tensor([4, 8], dtype=torch.int32, device=DEVICE),
                    torch.tensor([1.0, 2.0], dtype=torch.complex64, device=DEVICE))
    strided = LoraLibrary(a, b, torch.tensor([4, 0, 8, 0], dtype=torch.int32, device=DEVICE)[::2],
                          torch.tensor([2.0, 0.0, 0.5, 0.0], device=DEVICE)[::2])
    assert strided.ranks.is_contiguous() and strided.scales.is_contiguous()
    assert strided.ranks.tolist() == [4, 8] and strided.scales.tolist() == [2.0, 0.5]


def test_padding_beyond_a_slots_rank_is_not_read(seeded):
    """A library built from tensors whose rows past a slot's rank are not zero: every path (kernels,
    plain torch on the CPU, the float64 path) uses only the first ranks[i] rows."""
    d_in, d_out, T = 24, 20, 9
    a = torch.randn(3, 6, d_in, device=DEVICE)
    b = torch.randn(3, 6, d_out, device=DEVICE)
    ranks = torch.tensor([2, 6, 0])
    lib = LoraLibrary(a, b, ranks, torch.tensor([1.0, 0.5, 2.0]))
    x = torch.randn(T, d_in, device=DEVICE)
    w = torch.randn(d_out, d_in, device=DEVICE) / math.sqrt(d_in)
    ids = torch.tensor([0, 1, 2, -1, 0, 1, 1, 0, 2], device=DEVICE)
    adapters = [(a[i, :r], b[i, :r].t(), s) for i, (r, s) in enumerate(zip(ranks.tolist(), [1.0, 0.5, 2.0]))]
    ref = expected(x.double(), w.double(), None, [(p.double(), q.double(), s) for p, q, s in adapters], ids)
    assert rel_err(lora_linear_segmented(x, w, None, lib, ids), ref) < TOL[torch.float32]
    with lorafuse.use_backend("torch"):
        assert rel_err(lora_linear_segmented(x, w, None, lib, ids), ref) < TOL[torch.float32]
    lib64 = LoraLibrary(a.double(), b.double(), ranks, torch.tensor([1.0, 0.5, 2.0]))
    assert rel_err(lora_linear_segmented(x.double(), w.double(), None, lib64, ids), ref) < 1e-12


def test_slot_must_be_an_integer_not_a_bool(seeded):
    for bad in (2.5, True, 0):
        with pytest.raises(ValueError, match="num_slots must be a positive integer"):
            LoraLibrary.empty(bad, 4, 8, 6)
    lib = LoraLibrary.empty(2, 4, 8, 6)
    with pytest.raises(ValueError, match="slot must be an integer"):
        lib.set_adapter(True, torch.randn(2, 8), torch.randn(6, 2), 1.0)
    lib.set_adapter(torch.tensor(1).numpy()[()], torch.randn(2, 8), torch.randn(6, 2), 1.0)  # a numpy integer
    assert lib.ranks.tolist() == [0, 2]

"""The launch functions called directly, at the edges of what they take: empty dimensions, strided
index vectors, rank limits, and arguments of the wrong kind, which must give named errors (never a
Triton crash or a silent wrong answer). float64 references computed here from the docstrings."""
import pytest
import torch

from conftest import DEVICE, HAS_CUDA, rel_err
from lorafuse.kernels import lora_gemm, lora_gemm_fused, shrink
from lorafuse.kernels.routing import route_select, routed_shrink
from lorafuse.kernels.segmented import group_rows, segmented_lora_, segmented_outer
from lorafuse.kernels.utils import can_run, onchip_rank_limit


def _randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE).to(dtype)


def test_fused_layer_without_output_columns_still_saves_the_shrink(seeded):
    # d_out = 0: y is empty, but S', S and U are the rows' shrink (they were left unwritten before).
    x, a, am, bm = _randn(5, 24), _randn(3, 24), _randn(2, 3), _randn(3, 2)
    scale = torch.rand(3, device=DEVICE) + 0.5
    y, sp, s, u = lora_gemm_fused(x, _randn(0, 24), None, a, _randn(0, 3), scale, am, bm, save=True)
    ref_sp, ref_s, ref_u = shrink(x, a, scale, am, bm, save=True)
    assert y.shape == (5, 0)
    for got, ref in ((sp, ref_sp), (s, ref_s), (u, ref_u)):
        assert rel_err(got, ref) < 1e-6


def test_fused_layer_refuses_more_ranks_than_fit_on_chip():
    R = onchip_rank_limit(torch.float32) + 1
    with pytest.raises(ValueError, match=f"a_cat has R = {R} rank columns.*at most"):
        lora_gemm_fused(_randn(2, 8), _randn(4, 8), None, _randn(R, 8), _randn(4, R), torch.ones(R, device=DEVICE))


def test_gemm_names_a_missing_b():
    with pytest.raises(TypeError, match="b must be a torch.Tensor"):
        lora_gemm(_randn(4, 8), None)


@pytest.mark.parametrize("T", [37, 256])  # the pointer kernel; on Hopper (16-bit) the copy-engine kernel
def test_gemm_takes_a_column_major_a(T, seeded):
    dtype = torch.float16
    a = _randn(T, 64, dtype=dtype).t().contiguous().t()  # strides (1, T)
    w = _randn(96, 64, dtype=dtype)
    y = lora_gemm(a, w.t())
    assert rel_err(y, a.double() @ w.double().t()) < 3e-3


def test_routed_shrink_with_empty_features(seeded):
    x, a, router = _randn(4, 0), _randn(3, 0), _randn(2, 0)
    sp = routed_shrink(x, a, router, torch.ones(3, device=DEVICE),
                       torch.tensor([0, 0, 1], dtype=torch.int32, device=DEVICE))[0]
    assert sp.shape == (4, 3) and torch.all(sp == 0)


def _library(num_slots, r_max, D, N, dtype=torch.float32):
    fac_in, fac_out = _randn(num_slots, r_max, D, dtype=dtype), _randn(num_slots, r_max, N, dtype=dtype)
    ranks = torch.randint(1, r_max + 1, (num_slots,), device=DEVICE)
    for i, r in enumerate(ranks.tolist()):  # zero-padded beyond each slot's rank, as LoraLibrary keeps them
        fac_in[i, r:] = 0
        fac_out[i, r:] = 0
    return fac_in, fac_out, ranks, torch.rand(num_slots, device=DEVICE) + 0.5


def _segmented_reference(x, fac_in, fac_out, ranks, scales, idx):
    out = torch.zeros(x.shape[0], fac_out.shape[2], dtype=torch.float64, device=x.device)
    for t, i in enumerate(idx.tolist()):
        if i >= 0:
            r = int(ranks[i])
            out[t] = scales[i].double() * (fac_in[i, :r].double() @ x[t].double()) @ fac_out[i, :r].double()
    return out


@pytest.mark.parametrize("schedule", ["gathered", "grouped"])
def test_segmented_reads_strided_ids_and_ranks_right(schedule, seeded):
    T, D, N = 37, 40, 24
    fac_in, fac_out, ranks, scales = _library(4, 6, D, N)
    x = _randn(T, D)
    idx = torch.randint(-1, 4, (T,), device=DEVICE)
    idx_strided = torch.stack([idx, torch.full_like(idx, 2)], 1)[:, 0]  # same values, stride 2
    ranks_strided = torch.stack([ranks, torch.full_like(ranks, 1)], 1)[:, 0]
    out = segmented_lora_(torch.zeros(T, N, device=DEVICE), x, fac_in, fac_out, ranks_strided, scales, idx_strided,
                          schedule=schedule)
    assert rel_err(out, _segmented_reference(x, fac_in, fac_out, ranks, scales, idx)) < 1e-5


def test_segmented_with_empty_features_leaves_out_as_it_is(seeded):
    fac_in, fac_out, ranks, scales = _library(3, 4, 0, 8)
    out = _randn(5, 8)
    before = out.clone()
    segmented_lora_(out, _randn(5, 0), fac_in, fac_out, ranks, scales,
                    torch.tensor([0, 1, -1, 2, 0], device=DEVICE), schedule="gathered")
    assert torch.equal(out, before)


def test_grouped_schedule_rank_limit(seeded):
    # Above the grouped schedule's on-chip limit: "auto" takes the gathered one, "grouped" is refused.
    r_max = onchip_rank_limit(torch.float32) + 2
    T, D, N = 70, 16, 8
    fac_in, fac_out, ranks, scales = _library(2, r_max, D, N)
    x = _randn(T, D)
    idx = torch.randint(-1, 2, (T,), device=DEVICE)
    with pytest.raises(ValueError, match=f"r_max = {r_max}.*at most"):
        segmented_lora_(torch.zeros(T, N, device=DEVICE), x, fac_in, fac_out, ranks, scales, idx, schedule="grouped")
    out = segmented_lora_(torch.zeros(T, N, device=DEVICE), x, fac_in, fac_out, ranks, scales, idx)
    assert rel_err(out, _segmented_reference(x, fac_in, fac_out, ranks, scales, idx)) < 1e-5


def test_grouping_and_outer_product_name_bad_arguments():
    for bad in (torch.tensor([0.0, 1.0], device=DEVICE), torch.zeros(2, 4, dtype=torch.long, device=DEVICE), [0, 1]):
        with pytest.raises(ValueError, match=r"idx must be an int32/int64 tensor of shape \(T,\)"):
            group_rows(bad, 3, 16)
    plan = group_rows(torch.tensor([0, 1, 1, -1], device=DEVICE), 2, 16)
    v, u, scales = _randn(4, 8), _randn(4, 3), torch.ones(2, device=DEVICE)
    with pytest.raises(ValueError, match="plan must come from group_rows of 2 ids"):
        segmented_outer(u[:2], v[:2], scales, plan)
    with pytest.raises(ValueError, match=r"scales must be a float32 tensor of shape \(2,\)"):
        segmented_outer(u, v, torch.ones(3, device=DEVICE), plan)
    with pytest.raises(ValueError, match="u must be a contiguous-row"):
        segmented_outer(u.to("meta"), v, scales, plan)
    got = segmented_outer(u, v, scales, plan)
    want = torch.stack([u[0:1].t() @ v[0:1], u[1:3].t() @ v[1:3]])
    assert rel_err(got, want) < 1e-6


@pytest.mark.skipif(not HAS_CUDA, reason="a CPU tensor among CUDA ones")
def test_routed_shrink_names_a_router_bias_on_another_device():
    x = _randn(4, 16)
    with pytest.raises(ValueError, match="router_bias must be float32 of shape"):
        routed_shrink(x, _randn(3, 16), _randn(2, 16), torch.ones(3, device=DEVICE),
                      torch.tensor([0, 0, 1], dtype=torch.int32, device=DEVICE), abs_logits=False,
                      router_bias=torch.zeros(2))


def test_routed_shrink_names_a_router_bias_that_is_not_a_tensor():
    if not can_run(torch.zeros(1, device=DEVICE)):
        pytest.skip("kernels need CUDA or TRITON_INTERPRET=1")
    with pytest.raises(TypeError, match="router_bias must be a torch.Tensor, got list"):
        routed_shrink(_randn(4, 16), _randn(3, 16), _randn(2, 16), torch.ones(3, device=DEVICE),
                      torch.tensor([0, 0, 1], dtype=torch.int32, device=DEVICE), abs_logits=False,
                      router_bias=[0.0, 0.0])


@pytest.mark.parametrize("schedule", ["gathered", "grouped"])
def test_segmented_without_output_columns_still_saves_the_shrink(schedule, seeded):
    # N_out = 0: nothing to add to out, but S (the rows' shrink, unscaled) is asked for.
    T, D = 37, 24
    fac_in, fac_out, ranks, scales = _library(3, 4, D, 0)
    x, idx = _randn(T, D), torch.randint(-1, 3, (T,), device=DEVICE)
    _, s = segmented_lora_(torch.empty(T, 0, device=DEVICE), x, fac_in, fac_out, ranks, scales, idx,
                           schedule=schedule, save_s=True)
    want = torch.zeros(T, 4, dtype=torch.float64)
    for t, i in enumerate(idx.tolist()):
        if i >= 0:
            want[t] = fac_in[i].double().cpu() @ x[t].double().cpu()  # zero-padded beyond the slot's rank
    assert rel_err(s, want) < 1e-5


def test_launchers_name_arguments_of_the_wrong_kind():
    x, a, router = _randn(8, 32), _randn(4, 32), _randn(4, 32)
    block, scale = torch.arange(4, dtype=torch.int32, device=DEVICE), torch.ones(4, device=DEVICE)
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        shrink(x.tolist(), a, scale)
    with pytest.raises(TypeError, match="scale must be a torch.Tensor, got float"):
        routed_shrink(x, a, router, 1.0, block)
    with pytest.raises(TypeError, match="router must be a torch.Tensor, got list"):
        routed_shrink(x, a, router.tolist(), scale, block)
    for top_k in (1.5, True):
        with pytest.raises(ValueError, match=rf"top_k must be None or an integer in 1..4, got {top_k}"):
            routed_shrink(x, a, router, scale, block, top_k=top_k)
        with pytest.raises(ValueError, match=rf"top_k must be an integer in 1..4, got {top_k}"):
            route_select(x, router, top_k)
    # a column's adapter outside 0..K-1 would leave that column zero
    for bad in (-1, 4):
        with pytest.raises(ValueError, match=r"block_ids must lie in 0..3"):
            routed_shrink(x, a, router, scale, torch.tensor([0, 1, bad, 3], dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="impl must be 'auto', 'tma' or 'portable', got 'bogus'"):
        lora_gemm(x, _randn(32, 8), impl="bogus")
    fac_in, _, ranks, scales = _library(3, 4, 32, 16)
    idx = torch.zeros(8, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match=r"fac_out must have shape \(3, 4, 16\).*got \(2, 4, 16\)"):
        segmented_lora_(torch.zeros(8, 16, device=DEVICE), x, fac_in, _randn(2, 4, 16), ranks, scales, idx)
    with pytest.raises(TypeError, match="out must be a torch.Tensor, got NoneType"):
        segmented_lora_(None, x, fac_in, _randn(3, 4, 16), ranks, scales, idx)
    with pytest.raises(ValueError, match="block_t must be an integer >= 1, got 0"):
        group_rows(idx, 3, 0)
    with pytest.raises(ValueError, match="block_t must be a power of two .* got 24"):
        group_rows(idx, 3, 24)
    with pytest.raises(ValueError, match="num_slots must be an integer >= 0, got -1"):
        group_rows(idx, -1, 16)

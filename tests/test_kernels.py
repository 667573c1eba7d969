"""Each Triton kernel against a float64 plain-torch reference, on fresh random inputs and odd shapes.

Runs under the Triton interpreter on CPU (float32, float16) and on CUDA when present (adds
bfloat16 and larger shapes). Tolerances: conftest.TOL.
"""
import os
import sys

import pytest
import torch
import triton
import triton.language as tl

from conftest import ACC_TOL, DEVICE, HAS_CUDA, KERNEL_DTYPES, TOL, compile_in_subprocess, rel_err
import importlib

from lorafuse.kernels import lora_gemm, lora_gemm_fused, lora_gemm_persistent, shrink, shrink_backward
from lorafuse.kernels.lora_gemm import _cfg, _load_rows, persistent_ok

shrink_module = importlib.import_module("lorafuse.kernels.shrink")


@pytest.fixture(params=["split", "single"] + (["split-pointer"] if HAS_CUDA else []))
def shrink_impl(request, monkeypatch):
    """Both shrink implementations: the split grid (default; on Hopper the one-launch copy-engine
    kernel where the operands allow, here at every T) and the one-kernel path; on a GPU also the
    split grid with the pointer kernels everywhere. All with the Triton kernels at every rank."""
    impl = request.param
    monkeypatch.setattr(shrink_module, "SHRINK_IMPL", "split" if impl == "split-pointer" else impl)
    monkeypatch.setattr(shrink_module, "SHRINK_TMA", impl != "split-pointer")
    monkeypatch.setattr(shrink_module, "TMA_MIN_T", 1)  # the copy-engine shrink at every test size
    monkeypatch.setattr(shrink_module, "SHRINK_CUBLAS_MIN_R", 0)  # Triton at every rank (cuBLAS: its own test)
    return impl

# (T, d_in, d_out, R, m); m None = no mapping. Odd sizes on purpose: T = 1, 37, 300; d = 24, 40,
# 1000; R = 1, 5, 48; m = 1, 4, 16.
CASES = [
    (1, 24, 40, 1, None),
    (37, 40, 24, 5, 4),
    (300, 24, 40, 48, 16),
    (37, 1000, 40, 5, 1),
    (1, 1000, 24, 48, 16),
    (300, 40, 1000, 1, None),
    (37, 24, 24, 48, None),
    (5, 128, 96, 5, 4),  # d a multiple of the interpreter's blocks: the unmasked (even) K loops
]
if HAS_CUDA:
    CASES += [
        (2048, 4096, 4096, 48, 16),
        (4099, 1000, 3000, 64, 8),
        (64, 4096, 14336, 128, 16),
        (17, 14336, 4096, 24, None),
        (8192, 4096, 4096, 512, 16),
    ]
IDS = [f"T{c[0]}-din{c[1]}-dout{c[2]}-R{c[3]}-m{c[4]}" for c in CASES]


def _inputs(T, d_in, d_out, R, m, dtype):
    dev = DEVICE
    x = torch.randn(T, d_in, device=dev).to(dtype)
    a_cat = (torch.randn(R, d_in, device=dev) / d_in ** 0.5).to(dtype)
    b_cat = (torch.randn(d_out, R, device=dev) / R ** 0.5).to(dtype)
    scale = torch.rand(R, device=dev) + 0.5
    a_map = torch.randn(m, R, device=dev) / R ** 0.5 if m else None
    b_map = torch.randn(R, m, device=dev) / m ** 0.5 if m else None
    return x, a_cat, b_cat, scale, a_map, b_map


def _ref_shrink(x, a_cat, scale, a_map, b_map):
    d = lambda t: None if t is None else t.double()  # noqa: E731
    s = d(x) @ d(a_cat).t()
    u = s @ d(a_map).t() if a_map is not None else None
    v = u @ d(b_map).t() if a_map is not None else s
    return s, u, v, v * d(scale)


def _ref_shrink_backward(dy, b_cat, scale, a_map, b_map, s_ref, u_ref, v_ref):
    """float64 (dS, dscale, da_map, db_map) of shrink_backward from _ref_shrink's S, U, V (the map's
    two None without a mapping)."""
    d = lambda t: None if t is None else t.double()  # noqa: E731
    dsp = d(dy) @ d(b_cat)
    dv = dsp * d(scale)
    dscale = (dsp * v_ref).sum(0)
    if a_map is None:
        return dv, dscale, None, None
    du = dv @ d(b_map)
    return du @ d(a_map), dscale, du.t() @ s_ref, dv.t() @ u_ref


def s_err(s, s_ref, x, a_cat) -> float:
    """Error of S = x a_cat^T against the size of its summed terms, ||S - S_ref|| / || |x| |a_cat|^T ||:
    a summation-order difference scales with the terms, not with S, which cancellation can make
    small (T = R = 1: one dot product of 24 terms summing to 1/700 of their sizes read 1.1e-5
    relative to S in float32)."""
    return (s.double() - s_ref).norm().item() / (x.double().abs() @ a_cat.double().abs().t()).norm().item()


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("T,d_in,d_out,R,m", CASES, ids=IDS)
def test_shrink_forward(T, d_in, d_out, R, m, dtype, shrink_impl, seeded):
    x, a_cat, _, scale, a_map, b_map = _inputs(T, d_in, d_out, R, m, dtype)
    s_ref, u_ref, _, sp_ref = _ref_shrink(x, a_cat, scale, a_map, b_map)
    for save in (False, True):
        sp, s, u = shrink(x, a_cat, scale, a_map, b_map, save=save)
        assert sp.dtype == dtype and sp.shape == (T, R)
        assert rel_err(sp, sp_ref) < TOL[dtype]
        if save:
            assert s.dtype == torch.float32 and s_err(s, s_ref, x, a_cat) < ACC_TOL[dtype]
            if m:
                assert rel_err(u, u_ref) < ACC_TOL[dtype]
            else:
                assert u is None
        else:
            assert s is None and u is None


@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if HAS_CUDA else []), ids=str)
@pytest.mark.parametrize("T,d_in,d_out,R,m", CASES, ids=IDS)
def test_shrink_forward_cublas(T, d_in, d_out, R, m, dtype, monkeypatch, seeded):
    """The shrink with x a_cat^T taken from cuBLAS (float32 out; on the CPU, torch in float32) and the
    finishing kernel applying the mapping and the scale: the path large ranks take."""
    monkeypatch.setattr(shrink_module, "SHRINK_CUBLAS_MIN_R", 1)
    x, a_cat, _, scale, a_map, b_map = _inputs(T, d_in, d_out, R, m, dtype)
    assert shrink_module.shrink_uses_cublas(x, a_cat)
    s_ref, u_ref, _, sp_ref = _ref_shrink(x, a_cat, scale, a_map, b_map)
    for save in (False, True):
        sp, s, u = shrink(x, a_cat, scale, a_map, b_map, save=save)
        # On a GPU the path must have run, not fallen back: this torch has mm(..., out_dtype=float32).
        assert shrink_module._MM_OUT_DTYPE is not False
        assert sp.dtype == dtype and sp.shape == (T, R)
        assert rel_err(sp, sp_ref) < TOL[dtype]
        if save:
            assert s.dtype == torch.float32 and s.shape == (T, R) and s_err(s, s_ref, x, a_cat) < ACC_TOL[dtype]
            assert (u is None) if not m else rel_err(u, u_ref) < ACC_TOL[dtype]
        else:
            assert s is None and u is None
    # float32 inputs keep the Triton kernels (cuBLAS would follow the TF32 setting).
    assert not shrink_module.shrink_uses_cublas(x.float(), a_cat.float())


@pytest.mark.skipif(not HAS_CUDA, reason="the copy-engine shrink's launch table is for a GPU")
@pytest.mark.parametrize("table_T", [2048, 4096, 16384])
@pytest.mark.parametrize("R", [5, 48, 128])
def test_shrink_tma_launch_shapes(table_T, R, seeded):
    """The launch shapes tma_shrink_config gives over its row counts (K splits from one up, the
    rank block up to 128 columns) run and are right, on rows that end mid-block, with and without
    the saved intermediates."""
    from lorafuse.kernels.lora_gemm import _tma_available
    from lorafuse.kernels.utils import num_sms

    if not _tma_available(torch.device(DEVICE)):
        pytest.skip("no tensor-memory-accelerator descriptors on this GPU")
    T, d_in = 300, 2048
    cfg = shrink_module.tma_shrink_config(table_T, d_in, R, num_sms(torch.device(DEVICE)))
    for dtype in (torch.bfloat16, torch.float16):
        x, a_cat, _, scale, a_map, b_map = _inputs(T, d_in, 8, R, 16, dtype)
        s_ref, u_ref, _, sp_ref = _ref_shrink(x, a_cat, scale, a_map, b_map)
        for save in (False, True):
            sp, s, u = shrink(x, a_cat, scale, a_map, b_map, save=save, config=cfg)
            assert rel_err(sp, sp_ref) < TOL[dtype], cfg
            if save:
                assert s_err(s, s_ref, x, a_cat) < ACC_TOL[dtype] and rel_err(u, u_ref) < ACC_TOL[dtype], cfg


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("T,d_in,d_out,R,m", CASES, ids=IDS)
def test_shrink_backward(T, d_in, d_out, R, m, dtype, shrink_impl, seeded):
    x, a_cat, b_cat, scale, a_map, b_map = _inputs(T, d_in, d_out, R, m, dtype)
    s_ref, u_ref, v_ref, _ = _ref_shrink(x, a_cat, scale, a_map, b_map)
    dy = torch.randn(T, d_out, device=DEVICE).to(dtype)
    ds_ref, dscale_ref, da_map_ref, db_map_ref = _ref_shrink_backward(dy, b_cat, scale, a_map, b_map, s_ref, u_ref,
                                                                      v_ref)
    s32 = s_ref.float()
    u32 = u_ref.float() if m else None
    ds, dscale, da_map, db_map = shrink_backward(dy, b_cat, scale, s32, u32, a_map, b_map,
                                                 need_ds=True, need_dmap=True, need_dscale=True)
    assert ds.dtype == dtype and rel_err(ds, ds_ref) < TOL[dtype]
    # Reductions over T of float32 values: twice the accumulation tolerance (two chained sums).
    red_tol = 2 * ACC_TOL[dtype] if dtype != torch.float32 else 1e-4
    assert rel_err(dscale, dscale_ref) < red_tol
    if m:
        assert rel_err(da_map, da_map_ref) < red_tol
        assert rel_err(db_map, db_map_ref) < red_tol
    else:
        assert da_map is None and db_map is None
    # Only what is asked for.
    ds2, dscale2, da2, db2 = shrink_backward(dy, b_cat, scale, s32, u32, a_map, b_map,
                                             need_ds=True, need_dmap=False, need_dscale=False)
    assert dscale2 is None and da2 is None and db2 is None
    assert rel_err(ds2, ds_ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("T,d_in,d_out,R,m", CASES, ids=IDS)
def test_lora_gemm(T, d_in, d_out, R, m, dtype, seeded):
    dev = DEVICE
    a = torch.randn(T, d_in, device=dev).to(dtype)
    w = (torch.randn(d_out, d_in, device=dev) / d_in ** 0.5).to(dtype)
    s = torch.randn(T, R, device=dev).to(dtype)
    c_store = (torch.randn(d_out, R, device=dev) / R ** 0.5).to(dtype)
    bias = torch.randn(d_out, device=dev).to(dtype)
    # Forward layout (b = W^T, c = b_cat^T: transposed views) and backward layout (row-major).
    for b, c in ((w.t(), c_store.t()), (w.t().contiguous(), c_store.t().contiguous())):
        for bias_ in (bias, None):
            out = lora_gemm(a, b, s, c, bias_)
            ref = a.double() @ b.double() + s.double() @ c.double()
            if bias_ is not None:
                ref = ref + bias_.double()
            assert out.dtype == dtype and rel_err(out, ref) < TOL[dtype]
    # Without a low-rank part it is a plain GEMM.
    assert rel_err(lora_gemm(a, w.t()), a.double() @ w.double().t()) < TOL[dtype]


@pytest.mark.skipif(not HAS_CUDA, reason="the Hopper GEMM's tail forms are compiled for a GPU")
@pytest.mark.parametrize("pipe", [True, False], ids=["pipelined", "flat"])
@pytest.mark.parametrize("R", [1, 128, 129, 300])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_lora_gemm_tail_loops(R, pipe, dtype, seeded):
    """Both forms of the TMA GEMM's low-rank tail loop (TAIL_PIPE, chosen by the rank's step count):
    with 128-wide steps, one partial step, one full step, a partial second step, three steps; forward
    and backward layouts."""
    lg = importlib.import_module("lorafuse.kernels.lora_gemm")
    if not lg._tma_available(torch.device(DEVICE)):
        pytest.skip("no TMA on this GPU")
    T, d_in, d_out = 300, 136, 264
    a = torch.randn(T, d_in, device=DEVICE).to(dtype)
    w = (torch.randn(d_out, d_in, device=DEVICE) / d_in ** 0.5).to(dtype)
    s = torch.randn(T, R, device=DEVICE).to(dtype)
    c = (torch.randn(d_out, R, device=DEVICE) / R ** 0.5).to(dtype)
    base = lg.tma_config(T, d_out, d_in)
    assert base.kwargs["BLOCK_K"] == 128
    cfg = triton.Config(dict(base.kwargs, TAIL_PIPE=pipe), num_warps=base.num_warps, num_stages=base.num_stages)
    for b in (w.t(), w.t().contiguous()):
        out = lora_gemm(a, b, s, c.t(), impl="tma", config=cfg)
        ref = a.double() @ b.double() + s.double() @ c.double().t()
        assert out.dtype == dtype and rel_err(out, ref) < TOL[dtype]
        # The tail alone, about as large as the base product here: a dropped step would show.
        assert rel_err(out - lora_gemm(a, b, impl="tma", config=cfg), ref - a.double() @ b.double()) < 4 * TOL[dtype]


@pytest.mark.skipif(not HAS_CUDA, reason="the Hopper GEMM is compiled for a GPU")
@pytest.mark.parametrize("tile", [(128, 256, 3), (128, 256, 4), (256, 128, 4)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_lora_gemm_epilogue_subtile(tile, dtype, seeded):
    """The TMA GEMM's output stored in two column halves (EPI_SUBTILE = 2): d_out = 264 leaves the
    last tile's second half wholly and its first half partly past the edge; T = 300 a partial row
    block; both layouts, with a bias."""
    lg = importlib.import_module("lorafuse.kernels.lora_gemm")
    if not lg._tma_available(torch.device(DEVICE)):
        pytest.skip("no TMA on this GPU")
    bm, bn, stages = tile
    T, d_in, d_out, R = 300, 136, 264, 48
    a = torch.randn(T, d_in, device=DEVICE).to(dtype)
    w = (torch.randn(d_out, d_in, device=DEVICE) / d_in ** 0.5).to(dtype)
    s = torch.randn(T, R, device=DEVICE).to(dtype)
    c = (torch.randn(d_out, R, device=DEVICE) / R ** 0.5).to(dtype)
    bias = torch.randn(d_out, device=DEVICE).to(dtype)
    cfg = lg._cfg(bm, bn, 64, 8, stages, FLATTEN=True, WARP_SPECIALIZE=False, EPI_SUBTILE=2)
    for b in (w.t(), w.t().contiguous()):
        out = lora_gemm(a, b, s, c.t(), bias, impl="tma", config=cfg)
        ref = a.double() @ b.double() + s.double() @ c.double().t() + bias.double()
        assert out.dtype == dtype and rel_err(out, ref) < TOL[dtype]


def test_tma_config_fills_the_machine():
    """From 512 rows the tile width with the lowest waves x tile area / efficiency (128 x 256: 1,
    128 x 128: 0.8, 128 x 64: 0.5): 128 x 64 where its grid fits in one wave, 128 x 128 where its
    waves x 0.625 are fewer than the large tile's (a 1024-wide output of 2048 rows: 64 large tiles
    on 132 SMs, 128 of 128 x 128 in one wave), else the large tile, stored in two halves with four
    stages in the forward's layout where it makes at most two waves; below 512 rows the
    128 x 128 x 128 tile."""
    lg = importlib.import_module("lorafuse.kernels.lora_gemm")

    def tile(T, N, sms=132, b_nk=True):
        c = lg.tma_config(T, N, 4096, b_nk, sms)
        return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages

    big, mid, small = (128, 256, 64, 8, 3), (128, 128, 64, 4, 4), (128, 64, 64, 4, 4)
    big_halves = (128, 256, 64, 8, 4)  # the forward's layout, at most two waves: stored in halves, four stages
    for T, N, waves in [(8192, 4096, 8), (8192, 1024, 2), (1024, 4096, 1), (2048, 14336, 7), (1152, 2816, 1),
                        (768, 4096, 1), (1792, 1792, 1), (2048, 4096, 2), (768, 14336, 3)]:
        assert tile(T, N, b_nk=False) == big, (T, N)  # 1152 x 2816: 99 tiles, one wave
        assert tile(T, N) == (big if waves > 2 else big_halves), (T, N)
        assert lg.tma_config(T, N, 4096, True, 132).kwargs.get("EPI_SUBTILE", 1) == (1 if waves > 2 else 2)
    assert tile(2048, 1024) == tile(1024, 2048) == tile(4096, 512) == tile(768, 2048) == mid
    assert tile(2048, 512) == tile(1024, 1024) == tile(1024, 256) == tile(768, 1024) == tile(512, 1024) == small
    assert tile(511, 1024) == tile(511, 4096) == (128, 128, 128, 8, 3)
    # By the GPU's own SM count: 128 tiles of 128 x 128 take two waves on 78 SMs, 512 one on 600.
    assert tile(2048, 1024, sms=78, b_nk=False) == big and tile(8192, 1024, sms=600) == mid
    for T, N in [(2048, 1024), (2048, 512)]:  # the small tiles: flattened loop, no warp specialisation
        kw = lg.tma_config(T, N, 4096, True, 132).kwargs
        assert kw["FLATTEN"] and not kw["WARP_SPECIALIZE"]


@pytest.mark.skipif(not HAS_CUDA, reason="the Hopper GEMM is compiled for a GPU")
@pytest.mark.parametrize("T,d_in,d_out", [(2048, 4096, 1024), (2048, 2048, 512), (1100, 520, 328), (700, 1000, 1000)],
                         ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_lora_gemm_narrow_default_config(T, d_in, d_out, dtype, seeded):
    """The small-tile configs of tma_config (as chosen for a 132-SM GPU, whatever this one has) on
    shapes whose large-tile grid leaves SMs idle (1100 x 328: partial row and column blocks), both
    layouts, against float64; and lora_gemm's own choice on this GPU."""
    lg = importlib.import_module("lorafuse.kernels.lora_gemm")
    if not lg._tma_available(torch.device(DEVICE)):
        pytest.skip("no TMA on this GPU")
    R = 48
    a = torch.randn(T, d_in, device=DEVICE).to(dtype)
    w = (torch.randn(d_out, d_in, device=DEVICE) / d_in ** 0.5).to(dtype)
    s = torch.randn(T, R, device=DEVICE).to(dtype)
    c = (torch.randn(d_out, R, device=DEVICE) / R ** 0.5).to(dtype)
    for b, b_nk in ((w.t(), True), (w.t().contiguous(), False)):
        cfg = lg.tma_config(T, d_out, d_in, b_nk, 132)
        assert cfg.kwargs["BLOCK_N"] < 256
        ref = a.double() @ b.double() + s.double() @ c.double().t()
        for out in (lora_gemm(a, b, s, c.t(), impl="tma", config=cfg), lora_gemm(a, b, s, c.t(), impl="tma")):
            assert out.dtype == dtype and rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("T,d_in,d_out,R,m", [c for c in CASES if c[0] <= 64 and c[3] <= 128],
                         ids=[i for c, i in zip(CASES, IDS) if c[0] <= 64 and c[3] <= 128])
@pytest.mark.parametrize("shrink_mode", ["default", "recompute", "shared-1", "shared-3"])
def test_lora_gemm_fused(T, d_in, d_out, R, m, dtype, shrink_mode, seeded):
    """shrink_mode: the launcher's choice; the shrink in every column block; or once per launch in
    1 or 3 work items per row block (small tiles: several row and column blocks wait on the items)."""
    x, a_cat, b_cat, scale, a_map, b_map = _inputs(T, d_in, d_out, R, m, dtype)
    w = (torch.randn(d_out, d_in, device=DEVICE) / d_in ** 0.5).to(dtype)
    bias = torch.randn(d_out, device=DEVICE).to(dtype)
    s_ref, u_ref, _, sp_ref = _ref_shrink(x, a_cat, scale, a_map, b_map)
    y_ref = x.double() @ w.double().t() + bias.double() + sp_ref @ b_cat.double().t()
    kw = {}
    if shrink_mode != "default":
        kw = dict(shared=shrink_mode != "recompute", config=_cfg(16, 16, 32, 4, 1))
        if shrink_mode.startswith("shared"):
            kw["splits"] = int(shrink_mode[-1])
    y, sp, s, u = lora_gemm_fused(x, w, bias, a_cat, b_cat, scale, a_map, b_map, save=True, **kw)
    assert rel_err(y, y_ref) < TOL[dtype]
    assert rel_err(sp, sp_ref) < TOL[dtype]
    assert s_err(s, s_ref, x, a_cat) < ACC_TOL[dtype]
    if m:
        assert rel_err(u, u_ref) < ACC_TOL[dtype]
    y2, sp2, s2, u2 = lora_gemm_fused(x, w, None, a_cat, b_cat, scale, a_map, b_map, save=False, **kw)
    assert sp2 is None and s2 is None and u2 is None
    assert rel_err(y2, y_ref - bias.double()) < TOL[dtype]


@pytest.mark.parametrize("block_t", [16, 32])
@pytest.mark.parametrize("prec", ["ieee", "tf32x3"])
@pytest.mark.parametrize("R,m", [(48, 16), (100, 7), (5, None)])
def test_shrink_finish_forms(R, m, prec, block_t, monkeypatch, seeded):
    """The forward finishing kernel with its mapping's products in "ieee" and "tf32x3", 16 or 32 rows
    per program: each against the float64 reference, float32 inputs (T = 37: a short last row block
    either way; R = 100: two chunks of columns). The interpreter ignores the products' precision: on
    the CPU prec changes nothing, on a GPU the float32 tolerance (2e-5) separates tf32x3 from plain
    tf32."""
    monkeypatch.setattr(shrink_module, "FINISH_MAP_PREC", prec)
    monkeypatch.setattr(shrink_module, "FINISH_BLOCK_T", block_t)
    x, a_cat, _, scale, a_map, b_map = _inputs(37, 200, 8, R, m, torch.float32)
    s_ref, u_ref, _, sp_ref = _ref_shrink(x, a_cat, scale, a_map, b_map)
    sp, s, u = shrink(x, a_cat, scale, a_map, b_map, save=True)
    assert rel_err(sp, sp_ref) < TOL[torch.float32] and s_err(s, s_ref, x, a_cat) < ACC_TOL[torch.float32]
    assert (u is None) if m is None else rel_err(u, u_ref) < ACC_TOL[torch.float32]


@pytest.mark.parametrize("block_t", [16, 32, 64])
@pytest.mark.parametrize("prec", ["ieee", "tf32x3"])
@pytest.mark.parametrize("R,m", [(48, 16), (100, 7), (5, None)])
def test_shrink_bwd_finish_forms(R, m, prec, block_t, monkeypatch, seeded):
    """The backward's finishing kernel with its products in "ieee" and "tf32x3", 16, 32 or 64 rows per
    program: dS, dscale, da_map and db_map against float64, float32 inputs (T = 37: a short last row
    block; R = 100: two chunks of columns; per-program reductions summed over 1-3 programs). The
    interpreter ignores the products' precision; on a GPU the float32 tolerances (2e-5 for dS, 1e-4
    for the reductions) separate tf32x3 from plain tf32."""
    monkeypatch.setattr(shrink_module, "BWD_FINISH_MAP_PREC", prec)
    monkeypatch.setattr(shrink_module, "BWD_FINISH_BLOCK_T", block_t)
    T, d_out = 37, 200
    x, a_cat, b_cat, scale, a_map, b_map = _inputs(T, 120, d_out, R, m, torch.float32)
    s_ref, u_ref, v_ref, _ = _ref_shrink(x, a_cat, scale, a_map, b_map)
    dy = torch.randn(T, d_out, device=DEVICE)
    ds_ref, dscale_ref, da_map_ref, db_map_ref = _ref_shrink_backward(dy, b_cat, scale, a_map, b_map, s_ref, u_ref,
                                                                      v_ref)
    ds, dscale, da_map, db_map = shrink_backward(dy, b_cat, scale, s_ref.float(), u_ref.float() if m else None,
                                                 a_map, b_map, need_ds=True, need_dmap=True, need_dscale=True)
    assert rel_err(ds, ds_ref) < TOL[torch.float32]
    assert rel_err(dscale, dscale_ref) < 1e-4
    if m:
        assert rel_err(db_map, db_map_ref) < 1e-4
        assert rel_err(da_map, da_map_ref) < 1e-4
    else:
        assert da_map is None and db_map is None


@pytest.mark.parametrize("m", [16, None])
def test_shrink_backward_cublas_partial(m, monkeypatch, seeded):
    """dY b_cat from cuBLAS (BWD_CUBLAS_MIN_T; 16-bit inputs, one float32 partial) and then the
    finishing kernel: every gradient against float64 and the path taken checked."""
    dtype = torch.float16
    T, d_out, R = 37, 200, 48
    x, a_cat, b_cat, scale, a_map, b_map = _inputs(T, 120, d_out, R, m, dtype)
    s_ref, u_ref, v_ref, _ = _ref_shrink(x, a_cat, scale, a_map, b_map)
    dy = torch.randn(T, d_out, device=DEVICE).to(dtype)
    ds_ref, dscale_ref, da_map_ref, db_map_ref = _ref_shrink_backward(dy, b_cat, scale, a_map, b_map, s_ref, u_ref,
                                                                      v_ref)
    calls = []
    mm = shrink_module._mm_f32

    def spy(a, b):
        out = mm(a, b)
        calls.append(out)
        return out
    monkeypatch.setattr(shrink_module, "_MM_OUT_DTYPE", None)  # not left off by another test
    monkeypatch.setattr(shrink_module, "_mm_f32", spy)
    monkeypatch.setattr(shrink_module, "BWD_CUBLAS_MIN_T", T)
    ds, dscale, da_map, db_map = shrink_backward(dy, b_cat, scale, s_ref.float(), u_ref.float() if m else None,
                                                 a_map, b_map, need_ds=True, need_dmap=True, need_dscale=True)
    assert len(calls) == 1
    if calls[0] is None:
        pytest.skip("this torch has no mm(..., out_dtype=float32) here: the Triton partial ran")
    assert calls[0].shape == (T, R) and calls[0].dtype == torch.float32
    assert rel_err(ds, ds_ref) < TOL[dtype] and rel_err(dscale, dscale_ref) < 2 * ACC_TOL[dtype]
    if m:
        assert rel_err(db_map, db_map_ref) < 2 * ACC_TOL[dtype]
        assert rel_err(da_map, da_map_ref) < 2 * ACC_TOL[dtype]
    monkeypatch.setattr(shrink_module, "BWD_CUBLAS_MIN_T", T + 1)  # one row short: the Triton partial
    shrink_backward(dy, b_cat, scale, None, None, need_ds=True)
    assert len(calls) == 1


def test_bwd_partial_cublas_rule(monkeypatch):
    """Where the backward's dY b_cat goes to cuBLAS: 16-bit rows from 4096 (2048 at 8192 columns and
    wider); never float32, never with BWD_CUBLAS_MIN_T = 0."""
    monkeypatch.setattr(shrink_module, "_MM_OUT_DTYPE", None)
    b = torch.empty(4096, 48, dtype=torch.bfloat16, device="meta")
    rows = lambda T, n, dt=torch.bfloat16: torch.empty(T, n, dtype=dt, device="meta")  # noqa: E731
    use = shrink_module.bwd_partial_uses_cublas
    assert use(rows(4096, 4096), b) and not use(rows(4095, 4096), b) and not use(rows(2048, 4096), b)
    assert use(rows(2048, 14336), b) and not use(rows(2047, 14336), b)
    assert not use(rows(8192, 4096, torch.float32), b)
    monkeypatch.setattr(shrink_module, "BWD_CUBLAS_MIN_T", 0)
    assert not use(rows(8192, 14336), b)


def test_bwd_finish_rows(monkeypatch):
    """The backward finishing kernel's rows per program: the measured rule, or BWD_FINISH_BLOCK_T."""
    assert [shrink_module.bwd_finish_rows(T) for T in (1, 1024, 1025, 8191, 8192, 16384)] == [16, 16, 32, 32, 64, 64]
    monkeypatch.setattr(shrink_module, "BWD_FINISH_BLOCK_T", 32)
    assert shrink_module.bwd_finish_rows(16384) == 32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_split_sums_grouped(dtype, monkeypatch, seeded):
    """The finishing steps sum 5 split partials SPLIT_GROUP at a time (1: one per step, 3: two groups,
    with a short last one, 8: all in one): the same bits whatever the group, since the additions keep
    their order, and the reference's values: forward shrink, backward shrink, the decode layer's
    shared shrink."""
    T, d_in, d_out, R, m = 37, 1000, 300, 48, 4
    x, a_cat, b_cat, scale, a_map, b_map = _inputs(T, d_in, d_out, R, m, dtype)
    w = (torch.randn(d_out, d_in, device=DEVICE) / d_in ** 0.5).to(dtype)
    dy = torch.randn(T, d_out, device=DEVICE).to(dtype)
    s_ref, u_ref, _, sp_ref = _ref_shrink(x, a_cat, scale, a_map, b_map)
    y_ref = x.double() @ w.double().t() + sp_ref @ b_cat.double().t()
    ds_ref = ((dy.double() @ b_cat.double()) * scale.double()) @ b_map.double() @ a_map.double()
    cfg = {"BLOCK_T": 16, "BLOCK_K": 32, "BLOCK_R": 64, "SPLITS": 5, "num_warps": 4, "num_stages": 1}
    assert shrink_module.split_range(d_in, 5, 32)[1] == 5
    outs = []
    for group in (1, 3, 8):
        monkeypatch.setattr(shrink_module, "SPLIT_GROUP", group)
        sp, s, u = shrink(x, a_cat, scale, a_map, b_map, save=True, config=cfg)
        ds = shrink_backward(dy, b_cat, scale, s, u, a_map, b_map, config=cfg)[0]
        y = lora_gemm_fused(x, w, None, a_cat, b_cat, scale, a_map, b_map, shared=True, splits=5,
                            config=_cfg(16, 16, 32, 4, 1))[0]
        assert rel_err(sp, sp_ref) < TOL[dtype] and s_err(s, s_ref, x, a_cat) < ACC_TOL[dtype]
        assert rel_err(u, u_ref) < ACC_TOL[dtype]
        assert rel_err(ds, ds_ref) < TOL[dtype] and rel_err(y, y_ref) < TOL[dtype], f"group {group}"
        outs.append((sp, s, u, ds, y))
    for group_out in outs[1:]:
        for a, b in zip(outs[0], group_out):
            assert torch.equal(a, b)


@triton.jit
def _load_rows_probe(x_ptr, out_ptr, T, K, EVEN_K: tl.constexpr, MASK_ROWS: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows past T not clamped here: they point at rows of NaN, which a masked load must not read.
    tile = _load_rows(x_ptr + offs_m[:, None] * K + offs_k[None, :], offs_m < T, offs_k < K, EVEN_K, MASK_ROWS)
    tl.store(out_ptr + offs_m[:, None] * BLOCK_K + offs_k[None, :], tile)


@pytest.mark.parametrize("K", [32, 20])
def test_load_rows_masks_rows_past_T(K):
    """_load_rows with MASK_ROWS reads zeros, not memory, for rows past T (both K forms): a kernel that
    dropped the mask would give the same layer (those rows are never stored) and go unseen otherwise."""
    T = 3
    x = torch.full((16, K), float("nan"), device=DEVICE)
    x[:T] = torch.randn(T, K, device=DEVICE)
    out = torch.full((16, 32), 7.0, device=DEVICE)
    _load_rows_probe[(1,)](x, out, T, K, EVEN_K=K == 32, MASK_ROWS=True, BLOCK_M=16, BLOCK_K=32)
    assert torch.equal(out[:T, :K], x[:T])
    assert torch.equal(out[T:], torch.zeros_like(out[T:])) and torch.equal(out[:T, K:], torch.zeros_like(out[:T, K:]))


@pytest.mark.parametrize("mask_rows", [True, False])
@pytest.mark.parametrize("shrink_mode", ["recompute", "shared"])
@pytest.mark.parametrize("d_in", [40, 64])
def test_lora_gemm_fused_rows_past_T(mask_rows, shrink_mode, d_in, monkeypatch, seeded):
    """The decode layer's x rows past T (a 16-row block over 3 rows) are masked by default
    (DECODE_MASK_ROWS; clamped to row 0 they made T = 1 slower than T = 16): both forms give the
    layer, and the launcher masks only a partial row block."""
    lg = sys.modules["lorafuse.kernels.lora_gemm"]
    monkeypatch.setattr(lg, "DECODE_MASK_ROWS", mask_rows)
    seen = []
    real_launch = lg.launch

    def spy(kernel, grid, *args, **const):
        seen.append(const["MASK_ROWS"])
        return real_launch(kernel, grid, *args, **const)

    monkeypatch.setattr(lg, "launch", spy)
    kw = dict(shared=shrink_mode == "shared", config=_cfg(16, 16, 32, 4, 1))
    for T, partial in ((3, True), (16, False)):
        x, a_cat, b_cat, scale, a_map, b_map = _inputs(T, d_in, 24, 5, 4, torch.float32)
        w = torch.randn(24, d_in, device=DEVICE) / d_in ** 0.5
        y_ref = _layer_ref(x, w, None, a_cat, b_cat, scale, a_map, b_map)[0]
        y = lora_gemm_fused(x, w, None, a_cat, b_cat, scale, a_map, b_map, **kw)[0]
        assert rel_err(y, y_ref) < TOL[torch.float32]
        assert seen.pop() == (mask_rows and partial)


@pytest.mark.skipif(not HAS_CUDA, reason="programs wait on each other only on a GPU")
@pytest.mark.parametrize("T,d_in,d_out", [(16, 4096, 4096), (64, 14336, 4096), (5, 1000, 3000)])
def test_lora_gemm_fused_shared_shrink_reads_this_calls_rows(T, d_in, d_out, seeded):
    """The decode layer with its shrink shared across column blocks: each column block must read this
    call's S', never the last call's (the buffers of consecutive calls share addresses); 40
    alternating calls, two launches on two streams at once, and a CUDA graph (the flags' memset
    inside it) replayed on new inputs."""
    R, m, dtype = 48, 16, torch.bfloat16
    xs = [torch.randn(T, d_in, device=DEVICE).to(dtype) for _ in range(2)]
    _, a_cat, b_cat, scale, a_map, b_map = _inputs(T, d_in, d_out, R, m, dtype)
    w = (torch.randn(d_out, d_in, device=DEVICE) / d_in ** 0.5).to(dtype)
    refs = [_layer_ref(x, w, None, a_cat, b_cat, scale, a_map, b_map)[0] for x in xs]
    run = lambda x: lora_gemm_fused(x, w, None, a_cat, b_cat, scale, a_map, b_map, shared=True)[0]  # noqa: E731
    for i in range(40):
        assert rel_err(run(xs[i % 2]), refs[i % 2]) < TOL[dtype], f"call {i}"
    streams = [torch.cuda.Stream() for _ in range(2)]
    torch.cuda.synchronize()
    outs = []
    for x, st in zip(xs, streams):
        with torch.cuda.stream(st):
            outs.append(run(x))
    torch.cuda.synchronize()
    for y, ref in zip(outs, refs):
        assert rel_err(y, ref) < TOL[dtype]
    static_x = xs[0].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run(static_x)  # warm-up: compile and launch once outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = run(static_x)
    for i in (1, 0, 1):
        static_x.copy_(xs[i])
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(static_y, refs[i]) < TOL[dtype], f"replay with input {i}"


# The persistent layer (Hopper): (T, d_in, d_out, R, m). A partial last row band (T = 1030, 4099),
# d not a multiple of the tiles, R = 1 and R = 128 (its limit), with and without a mapping.
PERSISTENT_CASES = [
    (1030, 24, 40, 1, None),
    (1500, 1000, 3000, 5, 4),
    (2048, 4096, 4096, 48, 16),
    (4099, 1000, 3000, 64, None),
    (2048, 4096, 14336, 128, 16),
    (8192, 4096, 4096, 24, 16),
]
HOPPER = HAS_CUDA and torch.cuda.get_device_capability()[0] == 9
needs_hopper = pytest.mark.skipif(not HOPPER, reason="the persistent layer runs on Hopper GPUs only")


def _layer_ref(x, w, bias, a_cat, b_cat, scale, a_map, b_map):
    s_ref, u_ref, _, sp_ref = _ref_shrink(x, a_cat, scale, a_map, b_map)
    y_ref = x.double() @ w.double().t() + sp_ref @ b_cat.double().t()
    return (y_ref + bias.double() if bias is not None else y_ref), sp_ref, s_ref, u_ref


@needs_hopper
@pytest.mark.parametrize("loop", ["tuned", "plain"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("T,d_in,d_out,R,m", PERSISTENT_CASES, ids=[f"T{c[0]}-din{c[1]}-dout{c[2]}-R{c[3]}-m{c[4]}"
                                                                    for c in PERSISTENT_CASES])
def test_lora_gemm_persistent(T, d_in, d_out, R, m, dtype, loop, seeded):
    """loop: the GEMM phase flattened and warp-specialised (the default), or a plain loop."""
    cfg = None if loop == "tuned" else _cfg(128, 256, 64, 8, 3, FLATTEN=False, WARP_SPECIALIZE=False)
    x, a_cat, b_cat, scale, a_map, b_map = _inputs(T, d_in, d_out, R, m, dtype)
    w = (torch.randn(d_out, d_in, device=DEVICE) / d_in ** 0.5).to(dtype)
    bias = torch.randn(d_out, device=DEVICE).to(dtype)
    assert persistent_ok(x, w, a_cat)
    y_ref, sp_ref, s_ref, u_ref = _layer_ref(x, w, bias, a_cat, b_cat, scale, a_map, b_map)
    y, sp, s, u = lora_gemm_persistent(x, w, bias, a_cat, b_cat, scale, a_map, b_map, save=True, config=cfg)
    assert y.dtype == dtype and rel_err(y, y_ref) < TOL[dtype]
    assert rel_err(sp, sp_ref) < TOL[dtype]
    assert s_err(s, s_ref, x, a_cat) < ACC_TOL[dtype]
    assert (u is None) == (m is None)
    if m:
        assert rel_err(u, u_ref) < ACC_TOL[dtype]
    y2, sp2, s2, u2 = lora_gemm_persistent(x, w, None, a_cat, b_cat, scale, a_map, b_map, save=False, config=cfg)
    assert s2 is None and u2 is None and rel_err(sp2, sp_ref) < TOL[dtype]
    assert rel_err(y2, y_ref - bias.double()) < TOL[dtype]


@needs_hopper
@pytest.mark.parametrize("plan", [(1, 1, None, 4100), (3, 2, 6, 4100), (None, 4, 3, 4100), ("all", 1, 8, 4100),
                                  (5, 1, None, 1030), (None, None, None, 1030)],
                         ids=["one-program", "three-split2", "split4", "all-programs", "few-tiles-5", "few-tiles"])
def test_lora_gemm_persistent_plans(plan, seeded):
    """Shrink plans beside the default: one program shrinking every band while the others wait, a few
    programs on split bands, every program shrinking (the tiles then dealt as without a plan); at
    T = 1030 fewer tiles (72) than SMs, so fewer programs; partial last bands."""
    p1, splits, stages, T = plan
    d_in, d_out, R, m, dtype = 1024, 2048, 48, 16, torch.bfloat16
    x, a_cat, b_cat, scale, a_map, b_map = _inputs(T, d_in, d_out, R, m, dtype)
    w = (torch.randn(d_out, d_in, device=DEVICE) / d_in ** 0.5).to(dtype)
    y_ref, sp_ref, _, _ = _layer_ref(x, w, None, a_cat, b_cat, scale, a_map, b_map)
    if p1 == "all":
        p1 = min(torch.cuda.get_device_properties(DEVICE).multi_processor_count, -(-T // 128) * (d_out // 256))
    y, sp, _, _ = lora_gemm_persistent(x, w, None, a_cat, b_cat, scale, a_map, b_map, shrink_programs=p1,
                                       splits=splits, shrink_stages=stages)
    assert rel_err(y, y_ref) < TOL[dtype] and rel_err(sp, sp_ref) < TOL[dtype]
    for bad in (0, 10 ** 6):
        with pytest.raises(ValueError, match="shrink_programs must be"):
            lora_gemm_persistent(x, w, None, a_cat, b_cat, scale, a_map, b_map, shrink_programs=bad)
    for bad in (0, 17):  # d_in = 1024: 16 steps of 64
        with pytest.raises(ValueError, match="splits must be"):
            lora_gemm_persistent(x, w, None, a_cat, b_cat, scale, a_map, b_map, splits=bad)


def test_persistent_plan():
    """The shrink plan's model: where the last wave leaves enough free slots the shrink takes them
    (no extra wave); every plan within its bounds."""
    from lorafuse.kernels.lora_gemm import PERSISTENT_BAND_COST, persistent_plan
    # T = 8192, 4096 x 4096 on 132 SMs: 1024 tiles, 8 waves, 32 free slots in the last.
    splits, p1 = persistent_plan(64, 64, 1024, 132)
    assert p1 <= 32 and -(-64 * splits // p1) * PERSISTENT_BAND_COST / splits + 7 <= 8
    for bands, k_tiles, tiles, programs in [(8, 16, 128, 128), (16, 64, 256, 132), (128, 224, 2048, 132),
                                           (9, 2, 9, 9), (33, 64, 33 * 56, 132)]:
        splits, p1 = persistent_plan(bands, k_tiles, tiles, programs)
        assert 1 <= p1 <= min(programs, bands * splits)
        assert splits == 1 or 4 * splits <= k_tiles


@needs_hopper
def test_lora_gemm_persistent_reads_this_calls_bands(seeded):
    """Each GEMM tile must read its band's S' of this call, never a previous call's (the buffers of
    consecutive calls share addresses through torch's caching allocator, and a tile that did not wait
    for its band's flag would read the last call's values). Alternating inputs, 40 calls; also two
    launches on two streams at once, which must neither hang nor mix their bands."""
    T, d_in, d_out, R, m, dtype = 4096, 2048, 2048, 48, 16, torch.bfloat16
    xs = [torch.randn(T, d_in, device=DEVICE).to(dtype) for _ in range(2)]
    _, a_cat, b_cat, scale, a_map, b_map = _inputs(T, d_in, d_out, R, m, dtype)
    w = (torch.randn(d_out, d_in, device=DEVICE) / d_in ** 0.5).to(dtype)
    refs = [_layer_ref(x, w, None, a_cat, b_cat, scale, a_map, b_map)[0] for x in xs]
    for i in range(40):
        y = lora_gemm_persistent(xs[i % 2], w, None, a_cat, b_cat, scale, a_map, b_map)[0]
        assert rel_err(y, refs[i % 2]) < TOL[dtype], f"call {i}"
    streams = [torch.cuda.Stream() for _ in range(2)]
    torch.cuda.synchronize()
    outs = []
    for x, st in zip(xs, streams):
        with torch.cuda.stream(st):
            outs.append(lora_gemm_persistent(x, w, None, a_cat, b_cat, scale, a_map, b_map)[0])
    torch.cuda.synchronize()
    for y, ref in zip(outs, refs):
        assert rel_err(y, ref) < TOL[dtype]


@needs_hopper
def test_lora_gemm_persistent_refuses_what_it_cannot_run():
    x = torch.randn(2048, 64, device=DEVICE, dtype=torch.bfloat16)
    w = torch.randn(64, 64, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(64, 8, device=DEVICE, dtype=torch.bfloat16)
    scale = torch.ones(8, device=DEVICE)
    a = torch.randn(8, 64, device=DEVICE, dtype=torch.bfloat16)
    assert persistent_ok(x, w, a)
    # Too few rows; float32; rows of 60 elements (120 bytes: not 16-byte aligned).
    for bad_x, bad_a in ((x[:1000], a), (x.float(), a.float()), (x[:, :60].contiguous(), a[:, :60].contiguous())):
        bad_w = w[:, :bad_x.shape[1]].to(bad_x.dtype).contiguous()
        assert not persistent_ok(bad_x, bad_w, bad_a)
        with pytest.raises(ValueError, match="lora_gemm_persistent needs"):
            lora_gemm_persistent(bad_x, bad_w, None, bad_a, b.to(bad_x.dtype), scale)
    big = torch.randn(200, 64, device=DEVICE, dtype=torch.bfloat16)
    assert not persistent_ok(x, w, big)


_COMPILE_PERSISTENT_FOR_HOPPER = r"""
import importlib, warnings
warnings.filterwarnings("ignore")
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
G = importlib.import_module("lorafuse.kernels.lora_gemm")
fn = G._lora_layer_tma_kernel
types = {"x_desc": "tensordesc<bf16[128,64]>", "w_desc": "tensordesc<bf16[256,64]>",
         "al_desc": "tensordesc<bf16[64,64]>", "out_desc": "tensordesc<bf16[128,256]>", "c_ptr": "*bf16",
         "bias_ptr": "*bf16", "scale_ptr": "*fp32", "a_map_ptr": "*fp32", "b_map_ptr": "*fp32", "sp_ptr": "*bf16",
         "s_ptr": "*fp32", "u_ptr": "*fp32", "flag_ptr": "*i32", "part_ptr": "*fp32"}
for tail_pipe in (False, True):
    consts = {"HAS_BIAS": True, "HAS_MAP": True, "SAVE": True, "PREC": "tf32", "MAP_PREC": "ieee",
              "BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "BLOCK_R": 64, "BLOCK_MR": 16, "GROUP_M": 8,
              "FLATTEN": True, "WARP_SPECIALIZE": True, "SHRINK_STAGES": 6, "TAIL_PIPE": tail_pipe,
              "SPLIT_GROUP": 8}
    sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in fn.arg_names}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": 8, "num_stages": 3})
    ptx = k.asm["ptx"]
    # One thread releases each band's flag, and waits for it with acquire loads; the expand reads S'
    # from L2, not L1.
    assert "atom.global.gpu.release.exch.b32" in ptx and "ld.global.gpu.acquire.b32" in ptx
    assert "ld.global.cg" in ptx
S = importlib.import_module("lorafuse.kernels.shrink")
fn = S._shrink_tma_kernel
types = {"a_desc": "tensordesc<bf16[64,128]>", "b_desc": "tensordesc<bf16[64,128]>", "part_ptr": "*fp32",
         "count_ptr": "*i32", "scale_ptr": "*fp32", "a_map_ptr": "*fp32", "b_map_ptr": "*fp32", "sp_ptr": "*bf16",
         "s_ptr": "*fp32", "u_ptr": "*fp32"}
for splits in (1, 3):
    consts = {"HAS_MAP": True, "SAVE": True, "PREC": "tf32", "BLOCK_T": 64, "BLOCK_K": 128, "BLOCK_R": 64,
              "BLOCK_M": 16, "SPLIT_GROUP": 8, "MAP_PREC": "tf32x3"}
    sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in fn.arg_names}
    if splits == 1:
        consts["SPLITS"] = 1
        sig["SPLITS"] = "constexpr"
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": 4, "num_stages": 3})
    assert "cp.async.bulk.tensor" in k.asm["ptx"]
    # Several splits: the last program of a row block sums the others' partials from L2.
    assert ("ld.global.cg" in k.asm["ptx"]) == (splits > 1)


def compile_for_sm90(fn, types, consts, warps=4):
    sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in fn.arg_names}
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": warps, "num_stages": 3})


# The finishing kernels (their split sums in groups), forward and backward, and the decode layer
# with its shared shrink: each group size the module may take.
f32 = {n: "*fp32" for n in ("part_ptr", "scale_ptr", "a_map_ptr", "b_map_ptr", "s_ptr", "u_ptr", "ds_ptr",
                            "dscale_ptr", "da_map_ptr", "db_map_ptr")}
for group in (1, 8):
    for prec in ("ieee", "tf32x3"):
        for has_map in (False, True):
            compile_for_sm90(S._shrink_finish_kernel, dict(f32, sp_ptr="*bf16"),
                             {"HAS_MAP": has_map, "SAVE_S": True, "SAVE_U": has_map, "BLOCK_T": 16,
                              "BLOCK_R": 64, "BLOCK_M": 16, "SPLIT_GROUP": group, "MAP_PREC": prec})
        compile_for_sm90(S._shrink_bwd_finish_kernel, dict(f32, ds_ptr="*bf16"),
                         {"HAS_MAP": True, "NEED_DS": True, "NEED_DMAP": True, "NEED_DSCALE": True, "BLOCK_T": 32,
                          "BLOCK_R": 64, "BLOCK_M": 16, "SPLIT_GROUP": group, "MAP_PREC": prec})
    bf16 = {n: "*bf16" for n in ("a_ptr", "b_ptr", "s_ptr", "c_ptr", "bias_ptr", "out_ptr", "al_ptr", "save_sp_ptr")}
    compile_for_sm90(G._lora_gemm_kernel, dict(bf16, scale_ptr="*fp32", a_map_ptr="*fp32", b_map_ptr="*fp32",
                     save_s_ptr="*fp32", save_u_ptr="*fp32", flag_ptr="*i32", part_ptr="*fp32"),
                     {"HAS_BIAS": False, "FUSE_SHRINK": True, "HAS_MAP": True, "SAVE": True, "PREC": "tf32",
                      "MAP_PREC": "tf32x3", "BLOCK_R": 64, "BLOCK_MR": 16, "BLOCK_M": 16, "BLOCK_N": 64,
                      "BLOCK_K": 128, "GROUP_M": 8, "EVEN_K": True, "SHARED": True, "SPLIT_GROUP": group})
print("compiled")
"""


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU the persistent-layer tests compile and run the kernel")
def test_hopper_only_kernels_compile_without_a_gpu():
    """The interpreter cannot run the persistent layer (its programs wait on each other) nor the
    copy-engine partial shrink, and compiles nothing: build them, the finishing kernels and the decode
    layer for sm_90 so that a compile error, or the loss of the flag protocol's instructions, shows in CI."""
    compile_in_subprocess(_COMPILE_PERSISTENT_FOR_HOPPER)


def test_empty_batch(shrink_impl):
    x, a_cat, b_cat, scale, a_map, b_map = _inputs(0, 24, 40, 5, 4, torch.float32)
    sp, s, u = shrink(x, a_cat, scale, a_map, b_map, save=True)
    assert sp.shape == (0, 5) and s.shape == (0, 5) and u.shape == (0, 4)
    w = torch.randn(40, 24, device=DEVICE)
    assert lora_gemm(x, w.t(), sp, b_cat.t()).shape == (0, 40)
    ds, dscale, da, db = shrink_backward(torch.randn(0, 40, device=DEVICE), b_cat, scale, s, u, a_map, b_map,
                                         need_ds=True, need_dmap=True, need_dscale=True)
    assert ds.shape == (0, 5)
    assert torch.equal(dscale, torch.zeros_like(dscale)) and torch.equal(da, torch.zeros(4, 5, device=DEVICE))


def test_launchers_refuse_cpu_without_interpreter(monkeypatch):
    monkeypatch.setattr(sys.modules["lorafuse.kernels.utils"], "INTERPRET", False)
    x = torch.randn(4, 24)
    with pytest.raises(ValueError, match="x is on cpu.*CUDA"):
        shrink(x, torch.randn(3, 24), torch.ones(3))
    with pytest.raises(ValueError, match="a is on cpu.*CUDA"):
        lora_gemm(x, torch.randn(24, 8))


def test_interpreter_set_after_import_keeps_the_torch_path():
    """TRITON_INTERPRET set after lorafuse was imported: Triton compiled the kernels for a GPU, so CPU
    tensors take the plain-torch path (they had been sent to the compiled kernels: a driver error)."""
    import subprocess

    code = ("import os, torch, lorafuse\n"
            "os.environ['TRITON_INTERPRET'] = '1'\n"
            "x, w, a, b = torch.randn(4, 8), torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2)\n"
            "y = lorafuse.lora_linear(x, w, None, a, b, torch.ones(2))\n"
            "ref = x @ w.t() + (x @ a.t()) @ b.t()\n"
            "assert torch.allclose(y, ref, atol=1e-5), (y - ref).abs().max()\n"
            "print('ok')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_lora_gemm_shape_errors():
    a = torch.randn(4, 24, device=DEVICE)
    with pytest.raises(ValueError, match=r"b must have shape \(24, N\)"):
        lora_gemm(a, torch.randn(23, 8, device=DEVICE))
    with pytest.raises(ValueError, match=r"c must have shape \(3, 8\)"):
        lora_gemm(a, torch.randn(24, 8, device=DEVICE), torch.randn(4, 3, device=DEVICE),
                  torch.randn(3, 9, device=DEVICE))
    with pytest.raises(ValueError, match="b must be torch.float32"):
        lora_gemm(a, torch.randn(24, 8, device=DEVICE).half())


def test_shared_shrink_needs_a_config_under_autotuning(monkeypatch):
    """The shared shrink's buffers depend on the launch config, which autotuning picks later: an
    explicit shared=True without config= is refused, not silently ignored."""
    lg = importlib.import_module("lorafuse.kernels.lora_gemm")
    monkeypatch.setattr(lg, "AUTOTUNE", True)
    x, a_cat, b_cat, scale, _, _ = _inputs(5, 24, 40, 5, None, torch.float32)
    w = torch.randn(40, 24, device=DEVICE)
    with pytest.raises(ValueError, match="shared=True needs a launch config"):
        lora_gemm_fused(x, w, None, a_cat, b_cat, scale, shared=True)


@pytest.mark.parametrize("T", [5, 16])
def test_lora_gemm_fused_under_autotuning(T, monkeypatch, seeded):
    """LORAFUSE_AUTOTUNE=1: the decode layer's launch arguments that depend on the config (the row
    mask, the tail's loop, EVEN_K) are chosen without it, and the layer is still right."""
    lg = importlib.import_module("lorafuse.kernels.lora_gemm")
    monkeypatch.setattr(lg, "AUTOTUNE", True)
    x, a_cat, b_cat, scale, a_map, b_map = _inputs(T, 24, 40, 5, 4, torch.float32)
    w = torch.randn(40, 24, device=DEVICE) / 24 ** 0.5
    y = lora_gemm_fused(x, w, None, a_cat, b_cat, scale, a_map, b_map)[0]
    assert rel_err(y, _layer_ref(x, w, None, a_cat, b_cat, scale, a_map, b_map)[0]) < TOL[torch.float32]


def test_launchers_check_their_operands():
    # The launchers are public: they name a wrong operand instead of reading out of bounds.
    x = torch.randn(5, 32, device=DEVICE)
    a, scale = torch.randn(12, 32, device=DEVICE), torch.rand(12, device=DEVICE)
    w, b = torch.randn(40, 32, device=DEVICE), torch.randn(40, 12, device=DEVICE)
    with pytest.raises(ValueError, match=r"a_cat must have shape \(\*, 32\)"):
        shrink(x, torch.randn(12, 40, device=DEVICE), scale)
    with pytest.raises(ValueError, match=r"scale must have shape \(12,\)"):
        shrink(x, a, scale[:11])
    with pytest.raises(ValueError, match="a_cat must be torch.float32"):
        shrink(x, a.half(), scale)
    with pytest.raises(ValueError, match="a_map and b_map must be given together"):
        shrink(x, a, scale, torch.randn(4, 12, device=DEVICE), None)
    with pytest.raises(ValueError, match=r"weight must have shape \(\*, 32\)"):
        lora_gemm_fused(x, torch.randn(40, 31, device=DEVICE), None, a, b, scale)
    with pytest.raises(ValueError, match=r"b_cat must have shape \(40, 12\)"):
        lora_gemm_fused(x, w, None, a, b[:, :11], scale)
    with pytest.raises(ValueError, match=r"bias must have shape \(40,\)"):
        lora_gemm_fused(x, w, torch.randn(3, device=DEVICE), a, b, scale)
    with pytest.raises(ValueError, match=r"bias must have shape \(40,\)"):
        lora_gemm(x, w.t(), bias=torch.randn(3, device=DEVICE))
    with pytest.raises(ValueError, match="c is given without s"):
        lora_gemm(x, w.t(), None, b.t())
    dy = torch.randn(5, 40, device=DEVICE)
    with pytest.raises(ValueError, match=r"s must be a torch.Tensor of shape \(5, 12\)"):
        shrink_backward(dy, b, scale, None, None, need_dscale=True)
    with pytest.raises(ValueError, match=r"b_cat must have shape \(40, \*\)"):
        shrink_backward(dy, b[:39], scale, None, None)

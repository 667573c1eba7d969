"""The direct launch path (kernels.utils.launch): its key must separate every argument property
Triton specialises on, and a repeated launch must compute what Triton's own path computes.

The key and entry logic run on CPU; the launches themselves need a GPU (the interpreter always
takes Triton's own path). Tolerances: conftest.TOL.
"""
import importlib

import pytest
import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from conftest import DEVICE, HAS_CUDA, TOL, rel_err

import lorafuse
from lorafuse.kernels import lora_gemm_fused

utils = importlib.import_module("lorafuse.kernels.utils")
lg = importlib.import_module("lorafuse.kernels.lora_gemm")


def test_spec_key_separates_dtype_and_alignment():
    buf = torch.zeros(64, dtype=torch.float16)
    aligned, shifted = buf[:32], buf[1:33]  # 2-byte offset: not 16-byte aligned
    assert aligned.data_ptr() % 16 == 0
    k = utils._spec_key
    assert k((aligned, 4)) == k((buf[8:40], 4))              # both aligned (16 bytes = 8 halves)
    assert k((aligned, 4)) != k((shifted, 4))
    assert k((aligned, 4)) != k((aligned.float(), 4))
    assert k((aligned, 1)) != k((aligned, 2)) != k((aligned, 16)) != k((aligned, 2**31))
    assert k((None, True, 1.5)) == k((None, True, 2.5))      # floats are not specialised
    assert k((None, True)) != k((None, False))
    assert k((object(),)) is None                            # unknown kinds take Triton's own path
    assert k((aligned, [1])) is None


def test_spec_key_separates_tensor_descriptors():
    TensorDescriptor = pytest.importorskip("triton.tools.tensor_descriptor").TensorDescriptor
    k = utils._spec_key
    t = torch.zeros(64, 64, dtype=torch.bfloat16)
    desc = lambda base, block: TensorDescriptor(base, list(base.shape), list(base.stride()), block)  # noqa: E731
    assert k((desc(t, [16, 16]),)) == k((desc(torch.zeros_like(t), [16, 16]),))
    assert k((desc(t, [16, 16]),)) != k((desc(t, [32, 16]),))           # block shape
    assert k((desc(t, [16, 16]),)) != k((desc(t[:32], [16, 16]),))      # shape
    assert k((desc(t, [16, 16]),)) != k((desc(t.float(), [16, 16]),))   # dtype


def _axpy(x_ptr, y_ptr, n, alpha, BLOCK: tl.constexpr, TWICE: tl.constexpr = False):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    v = tl.load(x_ptr + offs, mask=m) * alpha
    if TWICE:
        v = v * 2
    tl.store(y_ptr + offs, v, mask=m)


def _positional_constexpr(x_ptr, BLOCK: tl.constexpr, n):
    tl.store(x_ptr + tl.arange(0, BLOCK), tl.zeros((BLOCK,), tl.float32), mask=tl.arange(0, BLOCK) < n)


# JITFunction itself (triton.jit gives an interpreted function under TRITON_INTERPRET=1): the entry
# logic reads its parameter list, which is the same either way.
_axpy_kernel = JITFunction(_axpy)
_positional_constexpr_kernel = JITFunction(_positional_constexpr)


class _FakeCompiled:
    run, function, packed_metadata = "launcher", "function", "metadata"


def test_launcher_entry_orders_constexprs_and_fills_defaults():
    run, fn, meta, tail = utils._launcher_entry(_axpy_kernel, _FakeCompiled(), 4, {"BLOCK": 128, "num_warps": 4})
    assert (run, fn, meta) == ("launcher", "function", "metadata")
    assert tail == (128, False)  # BLOCK given, TWICE from its default, options left out
    # A constexpr among the positional arguments: no direct path for this kernel.
    assert utils._launcher_entry(_positional_constexpr_kernel, _FakeCompiled(), 3, {}) is None


needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="direct launches run on CUDA only")


@needs_cuda
def test_direct_launch_matches_and_is_used(monkeypatch):
    monkeypatch.setattr(utils, "_LAUNCHERS", {})
    n = 1000
    x = torch.randn(n, device=DEVICE)
    for i, twice in enumerate((False, False, True, True)):
        y = torch.full_like(x, float("nan"))
        utils.launch(_axpy_kernel, (triton.cdiv(n, 256),), x, y, n, 0.5 + i, BLOCK=256, TWICE=twice)
        assert torch.allclose(y, x * (0.5 + i) * (2 if twice else 1))
    entries = [e for k, e in utils._LAUNCHERS.items() if k[0] is _axpy_kernel]
    assert len(entries) == 2 and all(e is not None for e in entries)  # one per TWICE, both direct
    # A misaligned input is a new specialisation, compiled and then launched directly.
    x_off = torch.randn(n + 1, device=DEVICE)[1:]
    for _ in range(2):
        y = torch.full_like(x_off, float("nan"))
        utils.launch(_axpy_kernel, (triton.cdiv(n, 256),), x_off, y, n, 3.0, BLOCK=256)
        assert torch.allclose(y, x_off * 3.0)
    assert len([k for k in utils._LAUNCHERS if k[0] is _axpy_kernel]) == 3


def _layer_inputs(T, d_in, d_out, R, m, dtype):
    g = torch.Generator(device=DEVICE).manual_seed(T * 7 + R)
    rn = lambda *s: torch.randn(*s, device=DEVICE, generator=g)  # noqa: E731
    return (rn(T, d_in).to(dtype), (rn(d_out, d_in) / d_in ** 0.5).to(dtype), rn(d_out).to(dtype),
            (rn(R, d_in) / d_in ** 0.5).to(dtype), (rn(d_out, R) / R ** 0.5).to(dtype), rn(R).abs() + 0.5,
            rn(m, R) / R ** 0.5, rn(R, m) / m ** 0.5)


@needs_cuda
@pytest.mark.parametrize("T", [16, 300, 2048])
def test_layer_direct_equals_triton_path(T, monkeypatch):
    """The op's forward and backward, launched repeatedly, equal the same launches through
    Triton's own path bit for bit (same compiled kernels, same arguments)."""
    torch.manual_seed(T)
    x, w, b, a_cat, b_cat, scale, a_map, b_map = _layer_inputs(T, 1000, 3000, 48, 16, torch.bfloat16)

    def run():
        xs = x.clone().requires_grad_(True)
        am, bm = a_map.clone().requires_grad_(True), b_map.clone().requires_grad_(True)
        y = lorafuse.lora_linear(xs, w, b, a_cat, b_cat, scale, am, bm)
        y.backward(torch.ones_like(y))
        return y.detach(), xs.grad, am.grad, bm.grad

    monkeypatch.setattr(utils, "FAST_LAUNCH", False)
    ref = run()
    monkeypatch.setattr(utils, "FAST_LAUNCH", True)
    for _ in range(3):  # the first launch compiles (or finds the kernel), the later ones go direct
        got = run()
        for r, g in zip(ref, got):
            assert torch.equal(r, g)
    assert any(e is not None for k, e in utils._LAUNCHERS.items())


@needs_cuda
def test_direct_launch_in_cuda_graph():
    """Decoding captures layers in CUDA graphs: direct launches are captured like Triton's own."""
    T, dtype = 16, torch.bfloat16
    x, w, b, a_cat, b_cat, scale, a_map, b_map = _layer_inputs(T, 1024, 2048, 48, 16, dtype)
    for _ in range(2):
        lora_gemm_fused(x, w, b, a_cat, b_cat, scale, a_map, b_map)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        lora_gemm_fused(x, w, b, a_cat, b_cat, scale, a_map, b_map)
        with torch.cuda.graph(graph, stream=stream):
            y = lora_gemm_fused(x, w, b, a_cat, b_cat, scale, a_map, b_map)[0]
    torch.cuda.current_stream().wait_stream(stream)
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        d = lambda t: t.double()  # noqa: E731
        ref = d(x) @ d(w).t() + d(b) + ((((d(x) @ d(a_cat).t()) @ d(a_map).t()) @ d(b_map).t()) * d(scale)) \
            @ d(b_cat).t()
        assert rel_err(y, ref) < TOL[dtype]

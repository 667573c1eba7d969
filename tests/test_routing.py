"""Routing: Arrow prototypes and gates against peft's own Arrow layer, the routed op (fused kernel path)
against a float64 plain-torch reference (forward and every gradient), odd shapes, mixed ranks, top_k in
{None, 1, 2}, K up to 64; MultiLoraLinear(method="route") and compose(..., method="route") on a tiny model.

On a CPU the kernels run under the Triton interpreter (float32 and float16, tiny shapes); with CUDA the
same tests run on the GPU with bfloat16 and larger shapes added.
"""
import sys

import pytest
import torch
import torch.nn as nn

from conftest import ACC_TOL, DEVICE, HAS_CUDA, KERNEL_DTYPES, TOL, compile_in_subprocess, rel_err
import lorafuse.kernels.routing as routing_kernels
from lorafuse import MultiLoraLinear, use_backend
from lorafuse.kernels import can_run
from lorafuse.routing import (arrow_prototypes, lora_linear_routed, lora_linear_routed_reference,
                              routing_gates)

F64 = torch.float64


def make_layer(T, d_in, d_out, ranks, dtype, device=DEVICE, bias=True, lead=()):
    """Random inputs of a routed layer; sizes give deltas of the same order as the base output."""
    R = sum(ranks)
    x = torch.randn(*lead, T, d_in, device=device).to(dtype)
    w = (torch.randn(d_out, d_in, device=device) / d_in ** 0.5).to(dtype)
    b = torch.randn(d_out, device=device).to(dtype) if bias else None
    a_cat = (torch.randn(R, d_in, device=device) / d_in ** 0.5).to(dtype)
    b_cat = torch.randn(d_out, R, device=device).to(dtype)
    scale = torch.rand(R, device=device) + 0.5
    return x, w, b, a_cat, b_cat, scale


def router_for(kind, a_cat, b_cat, ranks, scale, dtype):
    """(router in x's dtype, router_bias or None) for a router kind."""
    K, d_in = len(ranks), a_cat.shape[1]
    if kind == "arrow":
        return arrow_prototypes(a_cat, b_cat, ranks, scale).to(dtype), None
    if kind == "linear":
        return ((torch.randn(K, d_in, device=a_cat.device) / d_in ** 0.5).to(dtype),
                torch.randn(K, device=a_cat.device) * 0.3)
    return None, None


def near_tie_rows(x, router, router_bias, kind, top_k, temperature):
    """Rows whose k-th and (k+1)-th largest logits are so close that rounding could swap them (float64
    logits of the rounded inputs); the top-k choice, hence the output, is then legitimately unstable."""
    T = x.reshape(-1, x.shape[-1]).shape[0]
    if top_k is None or kind == "uniform" or top_k == router.shape[0]:
        return torch.zeros(T, dtype=torch.bool)
    z = x.reshape(-1, x.shape[-1]).double().cpu() @ router.double().cpu().t()
    if router_bias is not None:
        z = z + router_bias.double().cpu()
    logits = (z.abs() if kind == "arrow" else z) / temperature
    top = logits.topk(top_k + 1, dim=1).values
    # float32 accumulation of 16-bit products on tensor cores is less exact than on the CPU.
    rel = 1e-4 if x.dtype == torch.float32 else 1e-3
    return (top[:, top_k - 1] - top[:, top_k]) < rel * logits.abs().mean()


def redraw_near_ties(x, router, router_bias, kind, top_k, temperature, tries=50):
    """x with its near-tie rows (see near_tie_rows) drawn afresh until none is left: a one-row case
    would otherwise have nothing to compare now and then. Returns x (a new tensor)."""
    x = x.clone()
    flat = x.reshape(-1, x.shape[-1])
    for _ in range(tries):
        bad = near_tie_rows(flat, router, router_bias, kind, top_k, temperature).to(flat.device)
        if not bad.any():
            break
        flat[bad] = torch.randn(int(bad.sum()), flat.shape[1], device=flat.device).to(flat.dtype)
    return x


def reference64(x, w, b, a_cat, b_cat, scale, ranks, router, kind, top_k, temperature, router_bias):
    d = lambda t: None if t is None else t.detach().to(F64)  # noqa: E731
    return lora_linear_routed_reference(d(x), d(w), d(b), d(a_cat), d(b_cat), d(scale), ranks, d(router), kind,
                                        top_k, temperature, d(router_bias))


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts launches of the fused routed shrink (to show the kernel path ran)."""
    calls = []
    orig = routing_kernels.routed_shrink

    def counting(*args, **kw):
        calls.append(args[0].shape)
        return orig(*args, **kw)

    monkeypatch.setattr(routing_kernels, "routed_shrink", counting)
    return calls


# ----------------------------------------------------------------------------------------------
# Arrow prototypes


@pytest.mark.parametrize("ranks,d_in,d_out", [([4, 1, 7], 40, 24), ([3, 5], 6, 50), ([16], 96, 8)])
def test_arrow_prototypes_are_top_right_singular_vectors(ranks, d_in, d_out, seeded):
    R = sum(ranks)
    a_cat = torch.randn(R, d_in, dtype=F64)
    b_cat = torch.randn(d_out, R, dtype=F64)
    scale = torch.rand(R, dtype=F64) + 0.5
    protos = arrow_prototypes(a_cat, b_cat, ranks, scale)
    assert protos.shape == (len(ranks), d_in) and protos.dtype == torch.float32
    start = 0
    for i, r in enumerate(ranks):
        delta = (b_cat[:, start:start + r] * scale[start:start + r]) @ a_cat[start:start + r]   # dense, float64
        start += r
        _, sv, vh = torch.linalg.svd(delta)
        v = protos[i].double()
        assert abs(v.norm().item() - 1) < 1e-6
        # The top singular direction, up to sign: |cos| = 1 and it attains the top singular value.
        assert abs(abs(v @ vh[0]) - 1) < 1e-6
        assert abs((delta @ v).norm().item() / sv[0].item() - 1) < 1e-5
        # Sign convention: the entry of largest magnitude is positive.
        assert v[v.abs().argmax()] > 0


def test_arrow_prototype_of_zero_adapter_is_zero(seeded):
    a_cat = torch.randn(5, 12)
    b_cat = torch.randn(9, 5)
    b_cat[:, 2:] = 0  # adapter 1 (ranks 2, 3) has B = 0, as freshly initialised
    protos = arrow_prototypes(a_cat, b_cat, [2, 3])
    assert protos[0].norm() > 0.99 and protos[1].abs().max() == 0
    b_cat[0, 0] = float("nan")
    with pytest.raises(ValueError, match="must be finite to compute Arrow prototypes"):
        arrow_prototypes(a_cat, b_cat, [2, 3])


def _peft_arrow_layer(d_in, adapters, top_k, temperature):
    """peft's own Arrow layer with task adapters task_0.. (A, B, s) and no dropout."""
    from peft.tuners.lora.arrow import ArrowLoraLinearLayer
    from peft.tuners.lora.config import ArrowConfig

    names = [f"task_{i}" for i in range(len(adapters))]
    cfg = ArrowConfig(top_k=top_k, router_temperature=temperature, rng_seed=0)
    cfg.task_adapter_names = names
    layer = ArrowLoraLinearLayer(d_in, cfg)
    lora_a, lora_b = nn.ModuleDict(), nn.ModuleDict()
    for n, (a, b, _) in zip(names, adapters):
        lora_a[n] = nn.Linear(a.shape[1], a.shape[0], bias=False)
        lora_b[n] = nn.Linear(b.shape[1], b.shape[0], bias=False)
        lora_a[n].weight.data.copy_(a)
        lora_b[n].weight.data.copy_(b)
    scaling = {n: s for n, (_, _, s) in zip(names, adapters)}
    return layer, lora_a, lora_b, scaling


@pytest.mark.parametrize("top_k,temperature", [(1, 1.0), (2, 0.5), (3, 2.0)])
def test_prototypes_gates_and_output_match_peft_arrow(top_k, temperature, seeded):
    """peft's Arrow (power iteration for the prototypes, |x . v| top-k softmax, per-adapter scales)
    against arrow_prototypes + lora_linear_routed (kernel path where it can run), float32."""
    d_in, d_out, r, K, T = 48, 40, 4, 5, 37
    adapters = []
    for _ in range(K):
        # A clear gap between the top two singular values, so 15 power iterations converge.
        q_b, _ = torch.linalg.qr(torch.randn(d_out, r))
        q_a, _ = torch.linalg.qr(torch.randn(d_in, r))
        sv = torch.tensor([4.0] + [0.5] * (r - 1)) * (torch.rand(r) * 0.2 + 0.9)
        core = torch.linalg.qr(torch.randn(r, r))[0]
        adapters.append((core.t() @ q_a.t(), (q_b * sv) @ core, float(torch.rand(()) + 0.5)))
    layer, lora_a, lora_b, scaling = _peft_arrow_layer(d_in, adapters, top_k, temperature)
    layer.build_prototypes(lora_a, lora_b)
    a_cat = torch.cat([a for a, _, _ in adapters], 0)
    b_cat = torch.cat([b for _, b, _ in adapters], 1)
    ranks = [r] * K
    scale = torch.repeat_interleave(torch.tensor([s for _, _, s in adapters]), r)
    protos = arrow_prototypes(a_cat, b_cat, ranks, scale)
    cos = (protos * layer.prototypes).sum(1).abs()
    assert (cos > 1 - 1e-5).all(), cos

    x = torch.randn(3, T, d_in)
    delta_peft = layer(x, lora_a, lora_b, nn.Identity(), scaling)
    # Same prototypes for both from here on, so the comparison is of the gates and the layer itself.
    protos = layer.prototypes.clone()
    sim = (x.reshape(-1, d_in) @ protos.t()).abs()
    top_v, idx = sim.topk(top_k, dim=1)
    gates_peft = torch.softmax(torch.full_like(sim, float("-inf")).scatter(1, idx, top_v) / temperature, 1)
    gates = routing_gates(x.reshape(-1, d_in), protos, "arrow", top_k, temperature)
    assert rel_err(gates, gates_peft) < 1e-6
    weight = torch.randn(d_out, d_in) / d_in ** 0.5
    xd, w, a_c, b_c = (t.to(DEVICE) for t in (x, weight, a_cat, b_cat))
    y = lora_linear_routed(xd, w, None, a_c, b_c, scale.to(DEVICE), ranks, protos.to(DEVICE), "arrow", top_k,
                           temperature)
    stable = ~near_tie_rows(x, protos, None, "arrow", top_k, temperature)
    got = (y.cpu() - x @ weight.t()).reshape(-1, d_out)[stable]
    assert rel_err(got, delta_peft.reshape(-1, d_out)[stable]) < 1e-5


# ----------------------------------------------------------------------------------------------
# The routed op against float64


CASES = [
    # (T, d_in, d_out, ranks)
    (1, 16, 24, [4, 4]),
    (37, 48, 40, [3, 8, 5]),
    (130, 100, 72, [1, 7, 16, 2, 5]),
]
if HAS_CUDA:
    CASES += [(2048, 1024, 512, [16] * 16), (300, 4096, 4096, [8, 16, 32, 4])]


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kind,top_k", [("arrow", None), ("arrow", 1), ("arrow", 2), ("linear", None),
                                        ("linear", 1), ("linear", 2), ("uniform", None)])
def test_routed_forward_matches_float64(dtype, case, kind, top_k, kernel_calls, seeded):
    T, d_in, d_out, ranks = case
    x, w, b, a_cat, b_cat, scale = make_layer(T, d_in, d_out, ranks, dtype)
    router, rbias = router_for(kind, a_cat, b_cat, ranks, scale, dtype)
    temperature = 0.7
    x = redraw_near_ties(x, router, rbias, kind, top_k, temperature)
    y = lora_linear_routed(x, w, b, a_cat, b_cat, scale, ranks, router, kind, top_k, temperature, rbias,
                           schedule="dense")
    ref = reference64(x, w, b, a_cat, b_cat, scale, ranks, router, kind, top_k, temperature, rbias)
    assert y.dtype == dtype and y.shape == (T, d_out)
    stable = ~near_tie_rows(x, router, rbias, kind, top_k, temperature)
    assert stable.float().mean() > 0.9
    assert rel_err(y[stable.to(y.device)], ref[stable.to(ref.device)]) < TOL[dtype]
    if kind != "uniform":
        assert len(kernel_calls) == 1  # the fused routed shrink ran (on the GPU or the interpreter)


@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if HAS_CUDA else []), ids=str)
@pytest.mark.parametrize("top_k", [None, 1])
def test_routed_cublas_expand(dtype, top_k, monkeypatch, seeded):
    """The routed layer's expand on the matmul path (lorafuse.ops.expand up to EXPAND_CUBLAS_MAX_T rows),
    forward and gradients against float64."""
    import lorafuse.ops as ops

    if not can_run(torch.empty(0, device=DEVICE)):
        pytest.skip("kernels cannot run here")
    monkeypatch.setattr(ops, "expand_uses_cublas", lambda x: x.dtype != torch.float32)
    T, d_in, d_out, ranks = 37, 48, 40, [3, 8, 5]
    x, w, b, a_cat, b_cat, scale = make_layer(T, d_in, d_out, ranks, dtype)
    router, rbias = router_for("arrow", a_cat, b_cat, ranks, scale, dtype)
    x = redraw_near_ties(x, router, rbias, "arrow", top_k, 0.7)
    leaves = [t.detach().requires_grad_() for t in (x, w, b, a_cat, b_cat)]
    y = lora_linear_routed(*leaves, scale, ranks, router, "arrow", top_k, 0.7, rbias, schedule="dense")
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, w, b, a_cat, b_cat)]
    ref = lora_linear_routed_reference(*ref_leaves, scale.double(), ranks, router.double(), "arrow", top_k, 0.7,
                                       rbias)
    stable = ~near_tie_rows(x, router, rbias, "arrow", top_k, 0.7)
    assert stable.float().mean() > 0.9
    keep = stable.to(y.device)
    assert y.dtype == dtype and rel_err(y[keep], ref[keep]) < TOL[dtype]
    dy = torch.randn_like(y) * keep[:, None]
    grads = torch.autograd.grad(y, leaves, dy)
    grads_ref = torch.autograd.grad(ref, ref_leaves, dy.double())
    for name, g, g_ref in zip(["x", "weight", "bias", "a_cat", "b_cat"], grads, grads_ref):
        assert rel_err(g, g_ref) < 2 * TOL[dtype], name


@pytest.fixture
def segmented_calls(monkeypatch):
    """Counts passes of the mixed-batch kernels (one per top-k choice on the grouped schedule)."""
    import lorafuse.kernels.segmented as seg

    calls = []
    orig = seg.segmented_lora_

    def counting(*args, **kw):
        calls.append(kw.get("row_scale") is not None)
        return orig(*args, **kw)

    monkeypatch.setattr(seg, "segmented_lora_", counting)
    return calls


GROUPED_CASES = [(1, 16, 24, [4, 4]), (37, 48, 40, [3, 8, 5]), (300, 40, 72, [1, 7, 16, 2, 5])]
if HAS_CUDA:
    GROUPED_CASES += [(2048, 1024, 512, [16] * 16), (4096, 4096, 4096, [16] * 64), (300, 4096, 4096, [8, 16, 32, 4])]


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("case", GROUPED_CASES)
@pytest.mark.parametrize("kind,top_k", [("arrow", 1), ("arrow", 2), ("linear", 1), ("linear", 3)])
def test_grouped_forward_matches_float64(dtype, case, kind, top_k, segmented_calls, kernel_calls, seeded):
    """schedule="grouped": only each row's top_k adapters are computed (the mixed-batch kernels, one
    pass per choice, both of their schedules: T <= 64 gathered, above grouped); same result."""
    T, d_in, d_out, ranks = case
    top_k = min(top_k, len(ranks))
    x, w, b, a_cat, b_cat, scale = make_layer(T, d_in, d_out, ranks, dtype)
    router, rbias = router_for(kind, a_cat, b_cat, ranks, scale, dtype)
    x = redraw_near_ties(x, router, rbias, kind, top_k, 0.7)
    y = lora_linear_routed(x, w, b, a_cat, b_cat, scale, ranks, router, kind, top_k, 0.7, rbias,
                           schedule="grouped")
    ref = reference64(x, w, b, a_cat, b_cat, scale, ranks, router, kind, top_k, 0.7, rbias)
    assert y.dtype == dtype and y.shape == (T, d_out)
    stable = ~near_tie_rows(x, router, rbias, kind, top_k, 0.7)
    assert stable.float().mean() > 0.9
    assert rel_err(y[stable.to(y.device)], ref[stable.to(ref.device)]) < TOL[dtype]
    # top-1 passes a row gate too: 1, or NaN where the chosen logit is NaN (a diverged router)
    assert segmented_calls == [True] * top_k and not kernel_calls


def test_grouped_schedule_choice_and_errors(segmented_calls, kernel_calls, monkeypatch, seeded):
    """"auto" takes grouped only for a top-k forward without gradients above the thresholds; an
    explicit "grouped" refuses what it cannot do."""
    import lorafuse.routing as routing

    ranks = [3, 5, 4]
    x, w, b, a_cat, b_cat, scale = make_layer(20, 16, 8, ranks, torch.float32)
    router = arrow_prototypes(a_cat, b_cat, ranks, scale)
    args = (x, w, b, a_cat, b_cat, scale, ranks, router, "arrow")
    lora_linear_routed(*args, 1)
    assert not segmented_calls and len(kernel_calls) == 1  # below the thresholds: dense
    monkeypatch.setattr(routing, "GROUPED_MIN_T", 16)
    monkeypatch.setattr(routing, "GROUPED_MIN_RANK", 6)
    lora_linear_routed(*args, 2)  # R = 12 >= 6 * 2
    assert segmented_calls == [True] * 2 and len(kernel_calls) == 1
    lora_linear_routed(*args, 3)  # R = 12 < 6 * 3
    lora_linear_routed(*args, None)  # dense softmax
    x.requires_grad_()
    lora_linear_routed(*args, 1).sum().backward()  # gradients: dense
    assert len(segmented_calls) == 2 and len(kernel_calls) == 4
    with pytest.raises(NotImplementedError, match="schedule='grouped' runs the forward only"):
        lora_linear_routed(*args, 1, schedule="grouped")
    with use_backend("torch"), pytest.raises(NotImplementedError, match="schedule='grouped' runs the forward only"):
        lora_linear_routed(*args, 1, schedule="grouped")  # the same on the plain-torch path
    with pytest.raises(ValueError, match="schedule='grouped' needs top_k"):
        lora_linear_routed(*args, None, schedule="grouped")
    with pytest.raises(ValueError, match="schedule must be one of"):
        lora_linear_routed(*args, 1, schedule="sparse")


@pytest.mark.parametrize("K", [16, 64])
@pytest.mark.parametrize("top_k", [None, 1, 2])
def test_many_adapters_mixed_ranks(K, top_k, seeded):
    gen_ranks = torch.randint(1, 4, (K,)).tolist()
    T, d_in, d_out = 45, 32, 24
    x, w, b, a_cat, b_cat, scale = make_layer(T, d_in, d_out, gen_ranks, torch.float32)
    for kind in ("arrow", "linear"):
        router, rbias = router_for(kind, a_cat, b_cat, gen_ranks, scale, torch.float32)
        y = lora_linear_routed(x, w, b, a_cat, b_cat, scale, gen_ranks, router, kind, top_k, 1.3, rbias)
        ref = reference64(x, w, b, a_cat, b_cat, scale, gen_ranks, router, kind, top_k, 1.3, rbias)
        stable = ~near_tie_rows(x, router, rbias, kind, top_k, 1.3).to(y.device)
        assert rel_err(y[stable], ref[stable.to(ref.device)]) < TOL[torch.float32]


@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("top_k", [None, 1, 3])
def test_routed_shrink_outputs(top_k, stacked, monkeypatch, seeded):
    """The kernel's S, raw logits, gates and S' directly (each checked against float64), with the
    two-operand partial kernel and with [a_cat; router] copied into one operand (large T)."""
    if not can_run(torch.empty(0, device=DEVICE)):
        pytest.skip("kernels cannot run here")
    monkeypatch.setattr(routing_kernels, "STACK_MIN_T", 0 if stacked else 1 << 30)
    one_operand = []
    rows_partial = routing_kernels._rows_partial
    monkeypatch.setattr(routing_kernels, "_rows_partial",
                        lambda *a, **k: one_operand.append(1) or rows_partial(*a, **k))
    # R = 40: more than one chunk of rank columns in the finish kernel's grid (32 under the interpreter).
    ranks = [2, 5, 1, 9, 17, 6]
    T, d_in, R, K = 70, 40, sum(ranks), len(ranks)
    x = torch.randn(T, d_in, device=DEVICE)
    a_cat = torch.randn(R, d_in, device=DEVICE)
    router = torch.randn(K, d_in, device=DEVICE)
    rbias = torch.randn(K, device=DEVICE)
    scale = torch.rand(R, device=DEVICE) + 0.5
    block = torch.repeat_interleave(torch.arange(K, dtype=torch.int32, device=DEVICE), torch.tensor(ranks,
                                                                                                    device=DEVICE))
    # Several K splits of the partial kernel: a (reduction-order) change must not matter; and the
    # tile shape stacked_config picks for wide R on a GPU (more columns than R + K here; one stage,
    # so that the float32 tiles of this test fit a GPU's shared memory too).
    wide = {"BLOCK_T": 128, "BLOCK_K": 64, "BLOCK_R": 256, "SPLITS": 1, "num_warps": 8, "num_stages": 1}
    for cfg in (None, {"BLOCK_T": 16, "BLOCK_K": 16, "BLOCK_R": 16, "SPLITS": 3, "num_warps": 4, "num_stages": 1},
                wide):
        one_operand.clear()
        sp, s, z, g = routing_kernels.routed_shrink(x, a_cat, router, scale, block, top_k=top_k,
                                                    temperature=0.5, abs_logits=False, router_bias=rbias,
                                                    save=True, config=cfg)
        s64 = x.double() @ a_cat.double().t()
        z64 = x.double() @ router.double().t() + rbias.double()
        g64 = routing_gates(x.double(), router.double(), "linear", top_k, 0.5, rbias.double())
        stable = ~near_tie_rows(x, router, rbias, "linear", top_k, 0.5).to(DEVICE)
        assert rel_err(s, s64) < 1e-5 and rel_err(z, z64) < 1e-5
        assert rel_err(g[stable], g64[stable]) < 1e-5
        assert torch.allclose(g.sum(1), torch.ones(T, device=DEVICE), atol=1e-5)
        if top_k is not None:
            assert ((g > 0).sum(1) == top_k).all()
        assert rel_err(sp[stable], (s64 * scale.double() * g64[:, block.long()])[stable]) < 1e-5
        assert len(one_operand) == (1 if stacked else 0), "the partial products took the other kernel"


@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if HAS_CUDA else []), ids=str)
@pytest.mark.parametrize("top_k", [None, 2])
def test_routed_shrink_cublas(top_k, dtype, monkeypatch, seeded):
    """The stacked product x [a_cat; router]^T from cuBLAS (float32 out; on the CPU, torch in float32),
    the path wide 16-bit layers take from STACK_MIN_T rows: S, logits, gates and S' against float64."""
    if not can_run(torch.empty(0, device=DEVICE)):
        pytest.skip("kernels cannot run here")
    shrink_module = sys.modules["lorafuse.kernels.shrink"]  # the attribute of that name is the function
    monkeypatch.setattr(routing_kernels, "STACK_MIN_T", 0)
    monkeypatch.setattr(shrink_module, "SHRINK_CUBLAS_MIN_R", 1)
    products = []
    mm_f32 = routing_kernels._mm_f32
    monkeypatch.setattr(routing_kernels, "_mm_f32", lambda *a: products.append(1) or mm_f32(*a))
    ranks = [3, 8, 1, 6, 11]
    T, d_in, R, K = 45, 72, sum(ranks), len(ranks)
    x = torch.randn(T, d_in, device=DEVICE).to(dtype)
    a_cat = (torch.randn(R, d_in, device=DEVICE) / d_in ** 0.5).to(dtype)
    router = torch.randn(K, d_in, device=DEVICE).to(dtype)
    scale = torch.rand(R, device=DEVICE) + 0.5
    block = torch.repeat_interleave(torch.arange(K, dtype=torch.int32, device=DEVICE),
                                    torch.tensor(ranks, device=DEVICE))
    for save in (False, True):
        products.clear()
        sp, s, z, g = routing_kernels.routed_shrink(x, a_cat, router, scale, block, top_k=top_k, temperature=0.7,
                                                    abs_logits=True, save=save)
        assert products == [1], "the partial products did not come from the float32 matmul"
        # On a GPU the path must have run, not fallen back: this torch has mm(..., out_dtype=float32).
        assert shrink_module._MM_OUT_DTYPE is not False
        s64 = x.double() @ a_cat.double().t()
        z64 = x.double() @ router.double().t()
        g64 = routing_gates(x.double(), router.double(), "arrow", top_k, 0.7)
        stable = ~near_tie_rows(x, router, None, "arrow", top_k, 0.7).to(DEVICE)
        assert sp.dtype == dtype and sp.shape == (T, R)
        assert rel_err(sp[stable].double(), (s64 * scale.double() * g64[:, block.long()])[stable]) < TOL[dtype]
        if save:
            assert s.dtype == z.dtype == g.dtype == torch.float32
            assert rel_err(s, s64) < ACC_TOL[dtype] and rel_err(z, z64) < ACC_TOL[dtype]
            assert rel_err(g[stable], g64[stable]) < ACC_TOL[dtype]
        else:
            assert s is None and z is None and g is None
    # float32 inputs keep the Triton kernels (cuBLAS would follow the TF32 setting).
    products.clear()
    routing_kernels.routed_shrink(x.float(), a_cat.float(), router.float(), scale, block, top_k=top_k)
    assert products == []


# ----------------------------------------------------------------------------------------------
# Gradients


GRAD_CASES = [(29, 40, 36, [3, 6, 2], torch.float32), (29, 40, 36, [3, 6, 2], torch.float16)]
if HAS_CUDA:
    GRAD_CASES += [(1024, 512, 384, [16, 8, 16, 4], torch.bfloat16), (1024, 512, 384, [16, 8, 16, 4], torch.float16),
                   # 2048 rows (lead 2) and R + K = 204: the forward's stacked product from cuBLAS
                   (1024, 512, 384, [16] * 12, torch.bfloat16)]


@pytest.mark.parametrize("case", GRAD_CASES)
@pytest.mark.parametrize("kind,top_k", [("arrow", None), ("arrow", 2), ("linear", None), ("linear", 1),
                                        ("linear", 2), ("uniform", None)])
def test_routed_gradients_match_float64(case, kind, top_k, seeded):
    T, d_in, d_out, ranks, dtype = case
    tensors = list(make_layer(T, d_in, d_out, ranks, dtype, lead=(2,)))
    router, rbias = router_for(kind, tensors[3], tensors[4], ranks, tensors[5], dtype)
    names = ["x", "weight", "bias", "a_cat", "b_cat", "scale", "router", "router_bias"]
    tensors += [router, rbias]
    leaves = [t.clone().requires_grad_() if t is not None else None for t in tensors]
    y = lora_linear_routed(*leaves[:6], ranks, leaves[6], kind, top_k, 0.8, leaves[7])
    dy = torch.randn_like(y)
    # Rows at a near tie of the top-k choice may pick other adapters than the reference: give them no
    # output gradient, so that they contribute to no gradient at all.
    unstable = near_tie_rows(tensors[0], router, rbias, kind, top_k, 0.8).reshape(dy.shape[:-1])
    assert unstable.float().mean() < 0.1
    dy[unstable.to(dy.device)] = 0
    y.backward(dy)
    leaves64 = [t.detach().to(F64).requires_grad_() if t is not None else None for t in tensors]
    ref = lora_linear_routed_reference(*leaves64[:6], ranks, leaves64[6], kind, top_k, 0.8, leaves64[7])
    ref.backward(dy.to(F64))
    tol = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
    for name, t, t64 in zip(names, leaves, leaves64):
        if t is None:
            continue
        assert t.grad is not None and t.grad.dtype == t.dtype, name
        assert rel_err(t.grad, t64.grad) < tol, name


def test_only_requested_gradients(seeded):
    x, w, b, a_cat, b_cat, scale = make_layer(9, 32, 20, [4, 2], torch.float32)
    router = torch.randn(2, 32, device=DEVICE, requires_grad=True)
    x.requires_grad_()
    y = lora_linear_routed(x, w, b, a_cat, b_cat, scale, [4, 2], router, "linear", 1)
    y.sum().backward()
    assert x.grad is not None and router.grad is not None
    assert w.grad is None and a_cat.grad is None and b_cat.grad is None


# ----------------------------------------------------------------------------------------------
# Paths, semantics and bad input


def test_torch_path_matches_kernel_path(seeded):
    ranks = [5, 3, 4]
    x, w, b, a_cat, b_cat, scale = make_layer(33, 48, 40, ranks, torch.float32)
    router, _ = router_for("arrow", a_cat, b_cat, ranks, scale, torch.float32)
    y_kernel = lora_linear_routed(x, w, b, a_cat, b_cat, scale, ranks, router, "arrow", 2)
    with use_backend("torch"):
        y_torch = lora_linear_routed(x, w, b, a_cat, b_cat, scale, ranks, router, "arrow", 2)
    assert rel_err(y_kernel, y_torch) < 1e-5


def test_top1_is_exactly_one_adapter_and_uniform_is_averaging(seeded):
    ranks = [3, 2, 4]
    x, w, b, a_cat, b_cat, scale = make_layer(20, 32, 16, ranks, torch.float32)
    router, rbias = router_for("linear", a_cat, b_cat, ranks, scale, torch.float32)
    y = lora_linear_routed(x, w, b, a_cat, b_cat, scale, ranks, router, "linear", 1, 1.0, rbias)
    choice = (x @ router.t() + rbias).argmax(1)
    starts = [0, 3, 5, 9]
    for t in range(20):
        i = int(choice[t])
        sl = slice(starts[i], starts[i + 1])
        expect = x[t] @ w.t() + b + ((x[t] @ a_cat[sl].t()) * scale[sl]) @ b_cat[:, sl].t()
        assert rel_err(y[t], expect) < 1e-5
    y_avg = lora_linear_routed(x, w, b, a_cat, b_cat, scale, ranks, None, "uniform")
    weighted = MultiLoraLinear(nn.Linear(32, 16).to(DEVICE), [
        (a_cat[s:e], b_cat[:, s:e], 1.0) for s, e in zip(starts[:-1], starts[1:])], method="weighted")
    with torch.no_grad():
        weighted.base_layer.weight.copy_(w)
        weighted.base_layer.bias.copy_(b)
        weighted.adapter_scales.copy_(scale[torch.tensor(starts[:-1], device=DEVICE)])
    scale_blocks = torch.repeat_interleave(scale[torch.tensor(starts[:-1], device=DEVICE)],
                                           torch.tensor(ranks, device=DEVICE))
    y_avg_same = lora_linear_routed(x, w, b, a_cat, b_cat, scale_blocks, ranks, None, "uniform")
    assert rel_err(y_avg, reference64(x, w, b, a_cat, b_cat, scale, ranks, None, "uniform", None, 1.0, None)) < 1e-5
    assert rel_err(y_avg_same, weighted(x)) < 1e-5
    # three adapters of a library of five: gates 1/5, the two absent ones add nothing
    y_lib = lora_linear_routed(x, w, b, a_cat, b_cat, scale, ranks, None, "uniform", num_adapters=5)
    assert rel_err(y_lib, reference64(x, w, b, a_cat, b_cat, scale * 3 / 5, ranks, None, "uniform", None, 1.0,
                                      None)) < 1e-5
    for bad, kind in ((2, "uniform"), (2.5, "uniform"), (5, "linear")):
        with pytest.raises(ValueError, match=r"num_adapters is the library size for router_kind='uniform'"):
            lora_linear_routed(x, w, b, a_cat, b_cat, scale, ranks, router if kind == "linear" else None, kind,
                               router_bias=rbias if kind == "linear" else None, num_adapters=bad)


def test_leading_dims_and_empty(seeded):
    ranks = [2, 2]
    x, w, b, a_cat, b_cat, scale = make_layer(5, 16, 16, ranks, torch.float32, lead=(3,))
    router, _ = router_for("arrow", a_cat, b_cat, ranks, scale, torch.float32)
    y = lora_linear_routed(x, w, b, a_cat, b_cat, scale, ranks, router)
    assert y.shape == (3, 5, 16)
    assert rel_err(y, reference64(x, w, b, a_cat, b_cat, scale, ranks, router, "arrow", None, 1.0, None)) < 1e-5
    y0 = lora_linear_routed(x[:, :0], w, b, a_cat, b_cat, scale, ranks, router)
    assert y0.shape == (3, 0, 16)
    y0 = lora_linear_routed(x[..., :0], w[:, :0], b, a_cat[:, :0], b_cat, scale, ranks, router[:, :0], "linear",
                            top_k=1)  # d_in = 0: the product is the bias
    assert torch.equal(y0, b.expand(3, 5, 16))


def test_routing_gates_checks_its_arguments(seeded):
    # The public gate function refuses what lora_linear_routed refuses (no NaN or flipped gates).
    x, router = torch.randn(4, 16, device=DEVICE), torch.randn(3, 16, device=DEVICE)
    for top_k in (0, 4, 1.5):
        with pytest.raises(ValueError, match=r"top_k must be None \(dense\) or an integer in 1..3"):
            routing_gates(x, router, "arrow", top_k)
    for temperature in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="temperature must be a positive finite number"):
            routing_gates(x, router, "arrow", None, temperature)
    with pytest.raises(ValueError, match=r"router_bias must be a floating-point tensor of shape \(3,\)"):
        routing_gates(x, router, "linear", None, 1.0, torch.zeros(2, device=DEVICE))
    with pytest.raises(ValueError, match="router_bias is only used with router_kind='linear'"):
        routing_gates(x, router, "arrow", None, 1.0, torch.zeros(3, device=DEVICE))
    with pytest.raises(ValueError, match="router must be a floating-point tensor"):
        routing_gates(x, router.long(), "linear")
    with pytest.raises(ValueError, match="router_kind='uniform' takes no router"):
        routing_gates(x, router, "uniform", num_adapters=3)
    with pytest.raises(ValueError, match="router_kind must be one of"):
        routing_gates(x, None, "learned")
    with pytest.raises(ValueError, match="num_adapters must be a positive integer"):
        routing_gates(x, None, "uniform", num_adapters=2.5)
    with pytest.raises(ValueError, match="top_k has no meaning"):
        routing_gates(x, None, "uniform", top_k=1, num_adapters=3)
    assert torch.equal(routing_gates(x, None, "uniform", num_adapters=4), torch.full((4, 4), 0.25, device=DEVICE))


def test_bad_input_is_named(seeded):
    ranks = [2, 3]
    x, w, b, a_cat, b_cat, scale = make_layer(4, 16, 8, ranks, torch.float32)
    router = torch.randn(2, 16, device=DEVICE)
    args = (x, w, b, a_cat, b_cat, scale)
    with pytest.raises(ValueError, match=r"ranks must be positive integers summing to R = 5"):
        lora_linear_routed(*args, [2, 2], router)
    with pytest.raises(ValueError, match=r"router must have shape \(2, 16\)"):
        lora_linear_routed(*args, ranks, router[:, :8])
    with pytest.raises(TypeError, match="router must be a torch.Tensor"):
        lora_linear_routed(*args, ranks, None, "arrow")
    with pytest.raises(ValueError, match="router_kind must be one of"):
        lora_linear_routed(*args, ranks, router, "softmax")
    with pytest.raises(ValueError, match=r"top_k must be None \(dense\) or an integer in 1..2"):
        lora_linear_routed(*args, ranks, router, "arrow", 3)
    for bad_t in (0.0, 1e-40, float("nan")):
        with pytest.raises(ValueError, match="temperature must be a positive finite number"):
            lora_linear_routed(*args, ranks, router, "arrow", None, bad_t)
    with pytest.raises(ValueError, match="router_bias is only used with router_kind='linear'"):
        lora_linear_routed(*args, ranks, router, "arrow", None, 1.0, torch.zeros(2, device=DEVICE))
    with pytest.raises(ValueError, match="top_k has no meaning"):
        lora_linear_routed(*args, ranks, None, "uniform", 1)
    with pytest.raises(ValueError, match=r"router_bias must be a floating-point tensor of shape \(2,\)"):
        lora_linear_routed(*args, ranks, router, "linear", None, 1.0, torch.zeros(3, device=DEVICE))
    with pytest.raises(ValueError, match="takes no router"):
        lora_linear_routed(*args, ranks, router, "uniform")
    with pytest.raises(ValueError, match=r"scale must have shape \(5,\)"):
        lora_linear_routed(x, w, b, a_cat, b_cat, scale[:4], ranks, router)


# ----------------------------------------------------------------------------------------------
# MultiLoraLinear(method="route") and compose


def _module_adapters(d_in, d_out, ranks):
    return [(torch.randn(r, d_in) / d_in ** 0.5, torch.randn(d_out, r), float(torch.rand(()) + 0.5)) for r in ranks]


@pytest.mark.parametrize("router,top_k", [("arrow", 2), ("linear", None), ("linear", 1), ("uniform", None)])
def test_module_route(router, top_k, seeded):
    ranks = [3, 5, 2]
    base = nn.Linear(32, 24).to(DEVICE)
    adapters = _module_adapters(32, 24, ranks)
    layer = MultiLoraLinear(base, adapters, method="route", router=router, top_k=top_k, temperature=0.9)
    x = torch.randn(2, 11, 32, device=DEVICE)
    scale = torch.repeat_interleave(torch.tensor([s for _, _, s in adapters]), torch.tensor(ranks)).to(DEVICE)
    a_cat = torch.cat([a for a, _, _ in adapters]).to(DEVICE)
    b_cat = torch.cat([b for _, b, _ in adapters], 1).to(DEVICE)
    ref = reference64(x, base.weight, base.bias, a_cat, b_cat, scale, ranks, layer.router_weight, router, top_k, 0.9,
                      layer.router_bias)
    y = layer(x)
    stable = ~near_tie_rows(x, layer.router_weight, layer.router_bias, router, top_k, 0.9).to(DEVICE)
    assert rel_err(y.reshape(-1, 24)[stable], ref.reshape(-1, 24)[stable.to(ref.device)]) < 1e-5
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    if router == "arrow":
        assert "router_weight" in dict(layer.named_buffers())
        assert rel_err(layer.router_weight, arrow_prototypes(a_cat, b_cat, ranks, scale)) < 1e-6
        assert trainable == set()
    elif router == "linear":
        assert trainable == {"router_weight", "router_bias"}
        y.square().mean().backward()
        if top_k == 1:
            # The softmax over one kept logit is 1 whatever the logit: top-1 gates carry no gradient.
            assert layer.router_weight.grad.abs().max() == 0
        else:
            assert layer.router_weight.grad.abs().sum() > 0 and layer.router_bias.grad.abs().sum() > 0
    else:
        assert trainable == set() and layer.router_weight is None
    assert f"router={router}" in repr(layer)
    # The router state travels with the state dict.
    torch.manual_seed(12345)  # another random linear router to overwrite
    again = MultiLoraLinear(nn.Linear(32, 24).to(DEVICE), adapters, method="route", router=router, top_k=top_k,
                            temperature=0.9)
    again.load_state_dict(layer.state_dict())
    with torch.no_grad():
        assert torch.equal(again(x), layer(x))
    with pytest.raises(ValueError, match="no fixed low-rank factors"):
        layer.delta_weight()


def test_init_route_switches_between_every_router(seeded):
    """init_route from each router kind to each other (uniform leaves None attributes behind, which
    the next kind's buffer or parameters replace)."""
    from lorafuse.routing import init_route

    base = nn.Linear(16, 12).to(DEVICE)
    adapters = _module_adapters(16, 12, [2, 3])
    layer = MultiLoraLinear(base, adapters, method="route", router="uniform")
    x = torch.randn(5, 16, device=DEVICE)
    for kind, top_k in [("arrow", 1), ("uniform", None), ("linear", 1), ("uniform", None), ("linear", None),
                        ("arrow", 2), ("linear", 2)]:
        init_route(layer, kind, top_k, 1.0)
        assert layer.router_kind == kind
        if kind == "arrow":
            assert "router_weight" in dict(layer.named_buffers()) and layer.router_bias is None
        elif kind == "linear":
            assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"router_weight", "router_bias"}
        else:
            assert layer.router_weight is None and layer.router_bias is None
        with torch.no_grad():
            assert torch.isfinite(layer(x)).all()


def test_module_route_bad_arguments():
    base = nn.Linear(16, 8)
    adapters = _module_adapters(16, 8, [2, 2])
    with pytest.raises(ValueError, match="router must be one of"):
        MultiLoraLinear(base, adapters, method="route", router="mlp")
    with pytest.raises(ValueError, match=r"top_k must be None \(dense\) or an integer in 1..2"):
        MultiLoraLinear(base, adapters, method="route", top_k=5)
    with pytest.raises(ValueError, match="only used with method='route'"):
        MultiLoraLinear(base, adapters, method="sum", top_k=1)
    with pytest.raises(ValueError, match="temperature must be a positive"):
        MultiLoraLinear(base, adapters, method="route", temperature=-1.0)
    # logits / temperature would overflow float32 (NaN gates): refused, with the way to hard routing
    with pytest.raises(ValueError, match="temperature must be a positive finite number >= 1e-06.*top_k=1"):
        MultiLoraLinear(base, adapters, method="route", temperature=1e-40)
    # numpy scalars are numbers too
    import numpy as np
    layer = MultiLoraLinear(base, adapters, method="route", top_k=np.int64(1), temperature=np.float32(0.5))
    assert type(layer.top_k) is int and type(layer.temperature) is float


@pytest.mark.parametrize("router", ["linear", "arrow"])
def test_training_after_an_inference_mode_pass(router, seeded):
    # The first call with given ranks under inference_mode must not leave an inference tensor in a
    # cache that later training calls save for backward.
    from lorafuse.routing import _block_ids_cached

    _block_ids_cached.cache_clear()
    d_in, d_out = 32, 24
    base = nn.Linear(d_in, d_out).to(DEVICE)
    layer = MultiLoraLinear(base, _module_adapters(d_in, d_out, [4, 2]), method="route", router=router)
    x = torch.randn(3, d_in, device=DEVICE)
    with torch.inference_mode():
        y_eval = layer(x)
    xg = x.clone().requires_grad_(True)
    y = layer(xg)
    y.sum().backward()
    assert torch.allclose(y.detach(), y_eval) and xg.grad is not None
    if router == "linear":
        assert layer.router_weight.grad is not None


def test_uniform_gates_take_numpy_counts():
    import numpy as np

    from lorafuse.routing import routing_gates

    g = routing_gates(torch.randn(4, 8), None, "uniform", num_adapters=np.int64(3))
    assert torch.allclose(g, torch.full((4, 3), 1 / 3))


def test_compose_route_on_tiny_llama(tmp_path, seeded):
    """compose(..., method="route") on a 2-layer Llama: every targeted layer is a routed MultiLoraLinear,
    the model output equals the per-layer reference, and export / merge refuse it with a clear error."""
    from test_compose import model_inputs, model_output, peft_with_adapters, save_adapters

    from lorafuse import compose, export_peft, get_composition, merge

    specs = [dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
             dict(r=2, lora_alpha=3, target_modules=["q_proj", "o_proj"]),
             dict(r=3, lora_alpha=6, target_modules=["q_proj", "v_proj", "o_proj"])]
    fresh, peft_model, names = peft_with_adapters("llama", specs)
    dirs = save_adapters(peft_model, names, tmp_path / "adapters")
    model = compose(fresh, dirs, method="route", router="arrow", top_k=2, temperature=0.5)
    comp = get_composition(model)
    layers = comp.layers()
    assert len(layers) == 6 and all(m.method == "route" and m.router_kind == "arrow" for m in layers.values())
    q = layers["model.layers.0.self_attn.q_proj"]
    assert q.ranks == [4, 2, 3] and q.top_k == 2 and q.temperature == 0.5
    inputs = model_inputs("llama")
    out = model_output(model, inputs)
    # The same model with each layer's forward replaced by the float64 reference of its routing.
    originals = {}
    for key, layer in layers.items():
        originals[key] = layer.forward

        def ref_forward(x, layer=layer):
            base = layer.base_layer
            return reference64(x, base.weight, base.bias, layer.a_cat, layer.b_cat, layer.scale, layer.ranks,
                               layer.router_weight, "arrow", layer.top_k, 0.5, None).to(x.dtype)
        layer.forward = ref_forward
    out_ref = model_output(model, inputs)
    for key, layer in layers.items():
        del layer.forward
    assert rel_err(out, out_ref) < 1e-4
    with pytest.raises(ValueError, match="cannot export a 'route' composition"):
        export_peft(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="no fixed low-rank factors"):
        merge(model)


@pytest.mark.parametrize("kind,top_k", [("arrow", 2), ("linear", None)])
def test_torch_compile_fullgraph(kind, top_k, seeded):
    """The kernel path as torch.library custom ops: torch.compile traces it without a graph break,
    forward and backward equal to eager."""
    ranks = [3, 5, 2]
    tensors = list(make_layer(21, 32, 24, ranks, torch.float32))
    router, rbias = router_for(kind, tensors[3], tensors[4], ranks, tensors[5], torch.float32)
    leaves = [t.requires_grad_() for t in tensors + [router] + ([rbias] if rbias is not None else [])]

    def f(*t):
        rb = t[7] if len(t) > 7 else None
        return lora_linear_routed(*t[:6], ranks, t[6], kind, top_k, 0.9, rb).square().sum()

    compiled = torch.compile(f, backend="inductor" if HAS_CUDA else "aot_eager", fullgraph=True)
    loss = compiled(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    loss_ref = f(*leaves)
    grads_ref = torch.autograd.grad(loss_ref, leaves)
    assert rel_err(loss, loss_ref) < 1e-5
    for g, gr in zip(grads, grads_ref):
        assert rel_err(g, gr) < 1e-5


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("T", [16, 300])
def test_cuda_graph_and_reduce_overhead_compile(T, seeded):
    """A routed layer (Arrow, top-2, bf16) captured in a CUDA graph and under
    torch.compile(mode="reduce-overhead") gives the eager output on new inputs."""
    ranks = [16, 8, 16, 4]
    base = nn.Linear(512, 384).to(DEVICE, torch.bfloat16)
    adapters = [(a.to(torch.bfloat16), b.to(torch.bfloat16), s) for a, b, s in _module_adapters(512, 384, ranks)]
    layer = MultiLoraLinear(base, adapters, method="route", router="arrow", top_k=2)
    x = torch.randn(T, 512, device=DEVICE, dtype=torch.bfloat16)
    with torch.no_grad():
        eager = layer(x)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            layer(x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = layer(x)
        x2 = torch.randn_like(x)
        x.copy_(x2)
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(out, layer(x2)) < TOL[torch.bfloat16]
        compiled = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
        for _ in range(3):
            y = compiled(x2)
        assert rel_err(y, layer(x2)) < TOL[torch.bfloat16]
        assert rel_err(eager, layer(x2)) > 0.1  # the inputs did change


def test_routed_strided_vectors_match_contiguous(seeded):
    # scale, router_bias and bias are read without strides by the kernels: views must be copied.
    ranks = [3, 2]
    x = torch.randn(6, 24, device=DEVICE)
    w = torch.randn(16, 24, device=DEVICE)
    a_cat, b_cat = torch.randn(5, 24, device=DEVICE) / 5, torch.randn(16, 5, device=DEVICE) / 2
    router = torch.randn(2, 24, device=DEVICE)
    bias = torch.randn(32, device=DEVICE)[::2]
    scale = (torch.rand(10, device=DEVICE) + 0.5)[::2]
    rbias = torch.randn(4, device=DEVICE)[::2]
    y = lora_linear_routed(x, w, bias, a_cat, b_cat, scale, ranks, router, "linear", None, 1.0, rbias)
    ref = lora_linear_routed(x, w, bias.contiguous(), a_cat, b_cat, scale.contiguous(), ranks, router, "linear",
                             None, 1.0, rbias.contiguous())
    assert rel_err(y, ref) < 1e-6
    if can_run(x):  # the custom op (what torch.compile calls) reached directly, with the views
        out = torch.ops.lorafuse.lora_linear_routed_fwd(x, w, bias, a_cat, b_cat, scale, router, rbias, ranks, False,
                                                         0, 1.0, False)[0]
        assert rel_err(out, ref) < 1e-6


@pytest.mark.parametrize("bad", ["23", [2.9, 2.1], [True, 4], torch.tensor([2.0, 3.0])])
def test_routed_ranks_must_be_whole_numbers(bad, seeded):
    x, w = torch.randn(4, 24, device=DEVICE), torch.randn(16, 24, device=DEVICE)
    a_cat, b_cat = torch.randn(5, 24, device=DEVICE), torch.randn(16, 5, device=DEVICE)
    with pytest.raises(TypeError, match="ranks must be a sequence of positive integers"):
        lora_linear_routed(x, w, None, a_cat, b_cat, torch.ones(5, device=DEVICE), bad,
                           torch.randn(2, 24, device=DEVICE), "arrow", 1)


def test_arrow_prototypes_bad_input_is_named():
    a_cat, b_cat = torch.randn(5, 24), torch.randn(16, 5)
    with pytest.raises(ValueError, match=r"scale must be a tensor of shape \(5,\) or None, got list"):
        arrow_prototypes(a_cat, b_cat, [2, 3], [1.0] * 5)
    with pytest.raises(ValueError, match="floating-point tensors with data"):
        arrow_prototypes(a_cat.to("meta"), b_cat.to("meta"), [2, 3])
    with pytest.raises(ValueError, match="floating-point tensors with data"):
        arrow_prototypes(a_cat.long(), b_cat, [2, 3])


_COMPILE_FOR_HOPPER = r"""
import warnings
warnings.filterwarnings("ignore")
import importlib
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
rk = importlib.import_module("lorafuse.kernels.routing")

def compile_for_sm90(fn, types, consts, warps=4):
    sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in fn.arg_names}
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": warps, "num_stages": 3})
    assert "cubin" in kernel.asm, fn.__name__

for even in (True, False):
    compile_for_sm90(rk._stacked_partial_kernel, {"x_ptr": "*bf16", "a_ptr": "*bf16", "rt_ptr": "*bf16",
                     "part_ptr": "*fp32"}, {"PREC": "tf32", "BLOCK_T": 64, "BLOCK_D": 128, "BLOCK_R": 128,
                     "EVEN_D": even})
compile_for_sm90(rk._routed_finish_kernel, {"part_ptr": "*fp32", "scale_ptr": "*fp32", "block_ptr": "*i32",
                 "rbias_ptr": "*fp32", "sp_ptr": "*bf16", "s_ptr": "*fp32", "z_ptr": "*fp32", "g_ptr": "*fp32",
                 "inv_temp": "fp32"},
                 {"ABS_LOGITS": True, "TOP_K": 2, "HAS_RBIAS": False, "SAVE_S": True, "SAVE_GATES": True,
                  "BLOCK_T": 32, "BLOCK_R": 64, "BLOCK_K": 16, "SPLIT_GROUP": 8})
compile_for_sm90(rk._route_select_kernel, {"part_ptr": "*fp32", "rbias_ptr": "*fp32", "ids_ptr": "*i32",
                 "gates_ptr": "*fp32", "inv_temp": "fp32"},
                 {"ABS_LOGITS": True, "TOP_K": 2, "HAS_RBIAS": False, "BLOCK_T": 16, "BLOCK_K": 64, "SPLIT_GROUP": 8})
print("compiled")
"""


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU the other tests compile and run the kernels")
def test_routing_kernels_compile_for_hopper_without_a_gpu():
    """The interpreter does not compile: build the routed shrink's kernels for sm_90 (bf16) so that a
    compile error shows up in CI without a GPU."""
    compile_in_subprocess(_COMPILE_FOR_HOPPER)


def test_compose_uniform_route_averages_over_the_library(tmp_path, seeded):
    """router="uniform" is parameter averaging: on a layer that carries some of the K adapters, the
    others add a zero delta and the gates stay 1/K (not 1/(the layer's count)); the model equals
    method="weighted" with its default weights 1/K."""
    from test_compose import model_inputs, model_output, peft_with_adapters, save_adapters

    from lorafuse import compose, decompose, get_composition

    specs = [dict(r=4, lora_alpha=8, target_modules=["q_proj"]),
             dict(r=2, lora_alpha=3, target_modules=["q_proj", "o_proj"]),
             dict(r=3, lora_alpha=6, target_modules=["q_proj", "v_proj", "o_proj"])]
    fresh, peft_model, names = peft_with_adapters("llama", specs)
    dirs = save_adapters(peft_model, names, tmp_path / "adapters")
    inputs = model_inputs("llama")
    model = compose(fresh, dirs, method="route", router="uniform")
    layers = get_composition(model).layers()
    assert layers["model.layers.0.self_attn.o_proj"].num_adapters == 3  # carries 2 of the 3
    assert layers["model.layers.0.self_attn.q_proj"].num_adapters is None  # carries all 3
    out = model_output(model, inputs)
    decompose(model)
    averaged = model_output(compose(model, dirs, method="weighted"), inputs)
    assert rel_err(out, averaged.double()) < 1e-5
    with pytest.raises(ValueError, match=r"num_adapters is the library size for router='uniform': an integer >= K = 3"):
        MultiLoraLinear(nn.Linear(8, 4), [(torch.randn(2, 8), torch.randn(4, 2), 1.0)] * 3, method="route",
                        router="uniform", num_adapters=2)
    with pytest.raises(ValueError, match=r"num_adapters is the library size .* with router='arrow'"):
        MultiLoraLinear(nn.Linear(8, 4), [(torch.randn(2, 8), torch.randn(4, 2), 1.0)] * 3, method="route",
                        num_adapters=4)


def test_compose_route_rejects_top_k_above_a_layers_adapters(tmp_path, seeded):
    """Routing chooses among each layer's own adapters: a top_k above a layer's count is refused
    with the layer named, and the model is left as it was."""
    from test_compose import model_inputs, model_output, peft_with_adapters, save_adapters

    from lorafuse import compose

    specs = [dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
             dict(r=2, lora_alpha=4, target_modules=["q_proj"])]
    fresh, peft_model, names = peft_with_adapters("llama", specs)
    dirs = save_adapters(peft_model, names, tmp_path / "adapters")
    inputs = model_inputs("llama")
    before = model_output(fresh, inputs)
    with pytest.raises(ValueError, match=r"top_k=2 but only 1 of the 2 adapters target '.*v_proj'"):
        compose(fresh, dirs, method="route", top_k=2)
    assert torch.equal(model_output(fresh, inputs), before)
    assert not any(isinstance(m, MultiLoraLinear) for m in fresh.modules())


@pytest.mark.parametrize("top_k", [1, 2])
def test_tied_logits_pick_the_lowest_adapters(top_k, seeded):
    """Every logit tied (a zero-initialised linear router): each row keeps the top_k lowest adapter indices,
    in plain torch as in the kernels (the interpreter on the CPU)."""
    T, d_in, d_out, ranks = 6, 16, 24, [2, 3, 1, 4]
    x, w, b, a_cat, b_cat, scale = make_layer(T, d_in, d_out, ranks, torch.float32)
    router = torch.zeros(len(ranks), d_in, device=DEVICE)
    rbias = torch.zeros(len(ranks), device=DEVICE)
    g = routing_gates(x, router, "linear", top_k, router_bias=rbias)
    want = torch.zeros_like(g)
    want[:, :top_k] = 1.0 / top_k
    assert torch.equal(g, want)
    args = (x, w, b, a_cat, b_cat, scale, ranks, router, "linear", top_k, 1.0, rbias)
    with use_backend("torch"):
        y_torch = lora_linear_routed(*args)
    y = lora_linear_routed(*args)
    assert rel_err(y, y_torch) < 1e-5
    with torch.no_grad():
        y_grouped = lora_linear_routed(*args, schedule="grouped")
    assert rel_err(y_grouped, y_torch) < 1e-5


@pytest.mark.parametrize("top_k", [1, 2, None])
def test_nan_logit_reads_nan_on_every_path(top_k, seeded):
    """A learned router with a NaN weight (diverged): every row's logit of that adapter is NaN, and the
    output is NaN on every path (plain torch, the fused kernels, the grouped schedule), never a finite
    output routed around the fault."""
    T, d_in, d_out, ranks = 5, 16, 24, [2, 3, 1, 4]
    x, w, b, a_cat, b_cat, scale = make_layer(T, d_in, d_out, ranks, torch.float32)
    router, rbias = router_for("linear", a_cat, b_cat, ranks, scale, torch.float32)
    router[2, 3] = float("nan")
    assert routing_gates(x, router, "linear", top_k, router_bias=rbias).isnan().all()
    args = (x, w, b, a_cat, b_cat, scale, ranks, router, "linear", top_k, 1.0, rbias)
    with use_backend("torch"):
        outs = {"torch": lora_linear_routed(*args)}
    outs["kernels"] = lora_linear_routed(*args)
    if top_k is not None:
        with torch.no_grad():
            outs["grouped"] = lora_linear_routed(*args, schedule="grouped")
    for path, y in outs.items():
        assert y.shape == (T, d_out) and y.isnan().all(), path


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("K,top_k", [(1, 1), (5, 2), (64, 3), (200, 1)])
@pytest.mark.parametrize("T,d_in", [(1, 24), (37, 100), (300, 40)])
@pytest.mark.parametrize("kind", ["arrow", "linear"])
def test_route_select_matches_float64(dtype, K, top_k, T, d_in, kind, seeded):
    """The grouped schedule's selection kernel: each row's top_k adapters (ids, the largest logit
    first, lowest index among equals) and their softmax gates, against float64 (d_in = 100 splits
    the logits' product over programs under the interpreter)."""
    from lorafuse.routing import _top_ids

    if not can_run(torch.empty(0, device=DEVICE)):
        pytest.skip("kernels cannot run here")
    x = torch.randn(T, d_in, device=DEVICE).to(dtype)
    router = (torch.randn(K, d_in, device=DEVICE) / d_in ** 0.5).to(dtype)
    rbias = torch.randn(K, device=DEVICE) * 0.3 if kind == "linear" else None
    x = redraw_near_ties(x, router, rbias, kind, top_k, 0.7)
    ids, gates = routing_kernels.route_select(x, router, top_k, 0.7, kind == "arrow", rbias)
    assert ids.shape == gates.shape == (top_k, T) and ids.dtype == torch.int32 and gates.dtype == torch.float32
    z = x.double().cpu() @ router.double().cpu().t()
    if rbias is not None:
        z = z + rbias.double().cpu()
    logits = z.abs() if kind == "arrow" else z
    want_ids = _top_ids(logits, top_k)
    want_gates = torch.softmax(logits.gather(1, want_ids) / 0.7, dim=1)
    stable = ~near_tie_rows(x, router, rbias, kind, top_k, 0.7)
    assert stable.float().mean() > 0.9
    assert torch.equal(ids.t().cpu().long()[stable], want_ids[stable])
    assert rel_err(gates.t()[stable.to(gates.device)], want_gates[stable]) < 10 * ACC_TOL[dtype]
    assert torch.allclose(gates.sum(0).cpu(), torch.ones(T, dtype=torch.float32), atol=1e-5)


def test_route_select_nan_logit_and_errors(seeded):
    """A NaN logit is the row's first choice and makes its gates NaN; bad arguments are named."""
    if not can_run(torch.empty(0, device=DEVICE)):
        pytest.skip("kernels cannot run here")
    x = torch.randn(9, 16, device=DEVICE)
    router = torch.randn(4, 16, device=DEVICE)
    rbias = torch.zeros(4, device=DEVICE)
    rbias[2] = float("nan")
    ids, gates = routing_kernels.route_select(x, router, 2, 1.0, False, rbias)
    assert (ids[0] == 2).all() and gates.isnan().all()
    with pytest.raises(ValueError, match=r"top_k must be an integer in 1\.\.4, got None"):
        routing_kernels.route_select(x, router, None)
    with pytest.raises(ValueError, match=r"router must have shape \(K, 16\)"):
        routing_kernels.route_select(x, router[:, :8], 1)
    with pytest.raises(ValueError, match="router_bias must be float32 of shape"):
        routing_kernels.route_select(x, router, 1, router_bias=rbias.double())


@pytest.mark.parametrize("kind", ["arrow", "linear"])
def test_autocast_casts_like_linear(kind, seeded):
    """Under autocast the routed op behaves as F.linear and lora_linear: x, weight and bias in the
    autocast dtype whatever x's own dtype (float32 x, or activations already in the autocast dtype
    with float32 parameters), the output in that dtype; the same through MultiLoraLinear(method="route")."""
    ranks = [3, 5]
    x, w, b, a_cat, b_cat, scale = make_layer(9, 24, 16, ranks, torch.float32)
    router, rbias = router_for(kind, a_cat, b_cat, ranks, scale, torch.float32)
    dev, dt = DEVICE.type, (torch.float16 if HAS_CUDA else torch.bfloat16)
    with use_backend("auto" if HAS_CUDA else "torch"):
        with torch.autocast(dev, dtype=dt):
            y = lora_linear_routed(x, w, b, a_cat, b_cat, scale, ranks, router, kind, 1, router_bias=rbias)
            y16 = lora_linear_routed(x.to(dt), w, b, a_cat, b_cat, scale, ranks, router, kind, 1,
                                     router_bias=rbias)
        ref = lora_linear_routed(x.to(dt), w.to(dt), b.to(dt), a_cat.to(dt), b_cat.to(dt), scale, ranks,
                                 router.to(dt), kind, 1, router_bias=rbias)
    assert y.dtype == y16.dtype == dt
    assert rel_err(y, ref) < 1e-6 and rel_err(y16, ref) < 1e-6
    base = nn.Linear(24, 16, device=DEVICE)
    adapters = [(a_cat[:3], b_cat[:, :3], 1.0), (a_cat[3:], b_cat[:, 3:], 1.0)]
    layer = MultiLoraLinear(base, adapters, method="route", router=kind, top_k=1)
    with use_backend("auto" if HAS_CUDA else "torch"), torch.autocast(dev, dtype=dt):
        assert layer(x.to(dt)).dtype == dt and layer(x).dtype == dt

"""MultiLoraLinear: each method's output and trainable set, LoraMap inits, errors."""
import pytest
import torch
import torch.nn as nn

from conftest import DEVICE, HAS_CUDA, TOL, rel_err
from lorafuse import MultiLoraLinear, lora_linear_reference, use_backend

D_IN, D_OUT = 40, 24
RANKS = [3, 5, 2]


def _adapters(ranks=RANKS, dtype=torch.float32):
    return [
        (torch.randn(r, D_IN, device=DEVICE, dtype=dtype) / D_IN ** 0.5,
         torch.randn(D_OUT, r, device=DEVICE, dtype=dtype) / r ** 0.5,
         float(torch.rand(()) * 2 + 0.1))
        for r in ranks
    ]


def _base(dtype=torch.float32):
    return nn.Linear(D_IN, D_OUT).to(DEVICE, dtype)


def _dense_sum(adapters, weights=None):
    weights = weights or [1.0] * len(adapters)
    return sum(w * s * b.double() @ a.double() for (a, b, s), w in zip(adapters, weights))


def _out_ref(base, x, delta):
    return x.double() @ (base.weight.double() + delta).t() + base.bias.double()


TRAINABLE = {"sum": set(), "weighted": {"weights"}, "concat": {"a_cat", "b_cat"}, "loramap": {"a_map", "b_map"}}


@pytest.mark.parametrize("method", list(TRAINABLE))
def test_trainable_set_and_grads(method, seeded):
    adapters = _adapters()
    # The "sum" init, so that both mapping factors get a non-zero gradient at the first step.
    kw = {"map_rank": 4, "map_init": "sum"} if method == "loramap" else {}
    layer = MultiLoraLinear(_base(), adapters, method=method, **kw)
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == TRAINABLE[method]
    x = torch.randn(37, D_IN, device=DEVICE, requires_grad=True)
    layer(x).square().sum().backward()
    for n, p in layer.named_parameters():
        if n in TRAINABLE[method]:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n
    assert x.grad is not None


@pytest.mark.parametrize("method", ["sum", "weighted", "concat"])
def test_output_matches_summed_delta(method, seeded):
    adapters = _adapters()
    weights = [0.3, -1.2, 0.7] if method == "weighted" else None
    base = _base()
    layer = MultiLoraLinear(base, adapters, method=method, weights=weights)
    x = torch.randn(2, 37, D_IN, device=DEVICE)
    ref = _out_ref(base, x, _dense_sum(adapters, weights))
    assert rel_err(layer(x), ref) < TOL[torch.float32]
    assert rel_err(layer.delta_weight(), _dense_sum(adapters, weights)) < 1e-5


def test_weighted_defaults_to_averaging_and_keeps_order(seeded):
    adapters = _adapters()
    layer = MultiLoraLinear(_base(), adapters, method="weighted")
    assert torch.allclose(layer.weights, torch.full((3,), 1 / 3, device=DEVICE))
    assert layer.ranks == RANKS
    assert torch.equal(layer.a_cat, torch.cat([a for a, _, _ in adapters]))
    assert torch.equal(layer.b_cat, torch.cat([b for _, b, _ in adapters], 1))
    want_scale = torch.cat([torch.full((r,), s / 3) for (_, _, s), r in zip(adapters, RANKS)]).to(DEVICE)
    assert torch.allclose(layer.scale, want_scale)


def test_scale_follows_weight_edits_when_frozen(seeded):
    # The (R,) scale is cached for frozen weights: an in-place edit (as LoraHub's search does) and a
    # replaced tensor must both show in the next output.
    adapters = _adapters()
    layer = MultiLoraLinear(_base(), adapters, method="weighted", weights=[0.2, 0.3, 0.5])
    layer.weights.requires_grad_(False)
    x = torch.randn(7, D_IN, device=DEVICE)
    for w in ([0.2, 0.3, 0.5], [1.0, -2.0, 0.5]):
        with torch.no_grad():
            layer.weights.copy_(torch.tensor(w))
            y = layer(x)
        assert rel_err(y, _out_ref(layer.base_layer, x, _dense_sum(adapters, w))) < TOL[torch.float32]
    layer.weights = torch.nn.Parameter(torch.tensor([0.0, 1.0, 0.0], device=DEVICE), requires_grad=False)
    with torch.no_grad():
        y = layer(x)
    assert rel_err(y, _out_ref(layer.base_layer, x, _dense_sum(adapters, [0.0, 1.0, 0.0]))) < TOL[torch.float32]
    assert torch.equal(layer.scale, torch.tensor([s for a, _, s in adapters for _ in range(a.shape[0])],
                                                 device=DEVICE) * torch.tensor([0.0] * 3 + [1.0] * 5 + [0.0] * 2,
                                                                                device=DEVICE))


def test_weighted_follows_edits_through_data(seeded):
    # "weighted" recomputes its scale on every call: an edit through .data, invisible to
    # autograd's version counter, still shows.
    adapters = _adapters()
    layer = MultiLoraLinear(_base(), adapters, method="weighted", weights=[0.2, 0.3, 0.5])
    x = torch.randn(7, D_IN, device=DEVICE)
    with torch.no_grad():
        layer(x)
    layer.weights.data[0] = 3.0
    with torch.no_grad():
        y = layer(x)
    assert rel_err(y, _out_ref(layer.base_layer, x, _dense_sum(adapters, [3.0, 0.3, 0.5]))) < TOL[torch.float32]


@pytest.mark.parametrize("method", ["sum", "loramap"])
def test_trains_after_inference_mode(method, seeded):
    # A scale computed under inference_mode must not be reused where autograd saves it.
    layer = MultiLoraLinear(_base(), _adapters(), method=method, map_rank=4 if method == "loramap" else None)
    x = torch.randn(7, D_IN, device=DEVICE)
    with torch.inference_mode():
        y_inf = layer(x)
    y = layer(x.requires_grad_())
    y.square().sum().backward()
    assert torch.equal(y.detach(), y_inf) and x.grad is not None


def test_loramap_lora_init_starts_at_base(seeded):
    base = _base()
    layer = MultiLoraLinear(base, _adapters(), method="loramap", map_rank=4)
    x = torch.randn(37, D_IN, device=DEVICE)
    assert torch.equal(layer.b_map, torch.zeros_like(layer.b_map))
    assert rel_err(layer(x), base(x).double()) < 1e-6
    # As with LoRA's A and B: b_map learns first, a_map's gradient is zero until b_map moves.
    layer(x).square().sum().backward()
    assert layer.b_map.grad.abs().sum() > 0 and torch.all(layer.a_map.grad == 0)


@pytest.mark.parametrize("m", [10, 16])
def test_loramap_sum_init_full_rank_is_the_sum(m, seeded):
    adapters = _adapters()
    base = _base()
    layer = MultiLoraLinear(base, adapters, method="loramap", map_rank=m, map_init="sum")
    x = torch.randn(37, D_IN, device=DEVICE)
    assert rel_err(layer(x), _out_ref(base, x, _dense_sum(adapters))) < TOL[torch.float32]


@pytest.mark.parametrize("m", [1, 4])
def test_loramap_sum_init_is_best_rank_m_approximation(m, seeded):
    adapters = _adapters()
    layer = MultiLoraLinear(_base(), adapters, method="loramap", map_rank=m, map_init="sum")
    full = _dense_sum(adapters)
    sv = torch.linalg.svdvals(full)
    best_err = sv[m:].square().sum().sqrt()
    err = (layer.delta_weight().double() - full).norm()
    assert torch.isclose(err, best_err, rtol=1e-4), (err, best_err)
    a, b = layer.lowrank_factors()
    assert a.shape == (m, D_IN) and b.shape == (D_OUT, m)


@pytest.mark.parametrize("m", [16, 20])
def test_loramap_sum_init_past_the_delta_rank_is_the_sum(m, seeded):
    # d_out = 16 < R = 24: the summed delta has rank <= 16, so every m >= 16 holds it exactly (the
    # map's extra rows zero), as for m >= R.
    d_in, d_out = 64, 16
    base = nn.Linear(d_in, d_out).to(DEVICE)
    adapters = [(torch.randn(8, d_in, device=DEVICE), torch.randn(d_out, 8, device=DEVICE), 0.5) for _ in range(3)]
    layer = MultiLoraLinear(base, adapters, method="loramap", map_rank=m, map_init="sum")
    full = sum(s * b.double() @ a.double() for a, b, s in adapters)
    assert rel_err(layer.delta_weight(), full) < 1e-5
    assert layer.a_map.shape == (m, 24) and layer.b_map.shape == (24, m)


def test_numpy_scales_are_numbers(seeded):
    import numpy as np

    base = _base()
    adapters = [(a, b, np.float32(s)) for a, b, s in _adapters()]
    layer = MultiLoraLinear(base, adapters, method="sum")
    ref = MultiLoraLinear(base, _adapters_like(adapters), method="sum")
    assert torch.equal(layer.scale, ref.scale)
    with pytest.raises(ValueError, match="scale must be a finite number"):
        MultiLoraLinear(base, [(a, b, True) for a, b, _ in adapters], method="sum")


def _adapters_like(adapters):
    return [(a, b, float(s)) for a, b, s in adapters]


def test_lowrank_factors_reproduce_loramap_delta(seeded):
    layer = MultiLoraLinear(_base(), _adapters(), method="loramap", map_rank=4)
    with torch.no_grad():
        layer.b_map.normal_()
    a, b = layer.lowrank_factors()
    dense = (layer.b_cat.double() * layer.scale.double()) @ layer.b_map.double() @ layer.a_map.double() \
        @ layer.a_cat.double()
    assert rel_err(b @ a, dense) < 1e-5
    x = torch.randn(7, D_IN, device=DEVICE)
    base = layer.base_layer
    assert rel_err(layer(x), _out_ref(base, x, dense)) < TOL[torch.float32]


def test_base_is_frozen_and_state_dict_round_trips(seeded):
    layer = MultiLoraLinear(_base(), _adapters(), method="loramap", map_rank=4)
    assert not any(p.requires_grad for p in layer.base_layer.parameters())
    sd = layer.state_dict()
    other = MultiLoraLinear(_base(), _adapters(), method="loramap", map_rank=4)
    other.load_state_dict(sd)
    x = torch.randn(5, D_IN, device=DEVICE)
    assert torch.equal(layer(x), other(x))


@pytest.mark.skipif(not HAS_CUDA, reason="bfloat16 kernels run on the GPU only")
@pytest.mark.parametrize("method", list(TRAINABLE))
def test_bf16_module(method, seeded):
    adapters = _adapters(dtype=torch.bfloat16)
    base = _base(torch.bfloat16)
    kw = {"map_rank": 16, "map_init": "sum"} if method == "loramap" else {}
    layer = MultiLoraLinear(base, adapters, method=method, **kw)
    x = torch.randn(300, D_IN, device=DEVICE, dtype=torch.bfloat16)
    ref = _out_ref(base, x, _dense_sum(adapters, [1 / 3] * 3 if method == "weighted" else None))
    assert rel_err(layer(x), ref) < TOL[torch.bfloat16]


BAD = [
    (dict(method="mean"), ValueError, "method must be one of"),
    (dict(method="weighted", weights=[1.0, 2.0]), ValueError, r"weights must have one entry per adapter \(3\)"),
    (dict(method="sum", weights=[1.0, 2.0, 3.0]), ValueError, "weights are only used with method='weighted'"),
    (dict(method="loramap"), ValueError, "map_rank must be a positive integer"),
    (dict(method="loramap", map_rank=4, map_init="svd"), ValueError, "map_init must be one of"),
    (dict(method="sum", map_rank=4), ValueError, "map_rank is only used with method='loramap'"),
    (dict(method="sum", map_init="sum"), ValueError, "map_init is only used with method='loramap'"),
    (dict(method="weighted", weights=0.5), TypeError, r"weights must be a sequence .* of 3 numbers"),
    (dict(method="weighted", weights="abc"), TypeError, r"weights must be a sequence .* of 3 numbers"),
    (dict(method="weighted", weights=[[1.0], [2.0], [3.0]]), TypeError, r"weights must be a sequence"),
]


@pytest.mark.parametrize("kw,exc,msg", BAD, ids=[m for _, _, m in BAD])
def test_bad_arguments(kw, exc, msg):
    with pytest.raises(exc, match=msg):
        MultiLoraLinear(_base(), _adapters(), **kw)


def test_bad_adapters():
    a, b, s = _adapters()[0]
    with pytest.raises(ValueError, match="at least one"):
        MultiLoraLinear(_base(), [])
    with pytest.raises(TypeError, match="list of"):
        MultiLoraLinear(_base(), (a, b, s))
    with pytest.raises(TypeError, match="adapters must be a list of .* got NoneType"):
        MultiLoraLinear(_base(), None)
    with pytest.raises(ValueError, match=r"adapters\[1\] A must have shape \(r, 40\)"):
        MultiLoraLinear(_base(), [(a, b, s), (a[:, :30], b, s)])
    with pytest.raises(ValueError, match=r"adapters\[0\] B must have shape \(24, 3\)"):
        MultiLoraLinear(_base(), [(a, b[:, :2], s)])
    with pytest.raises(ValueError, match=r"adapters\[0\] scale must be a finite number"):
        MultiLoraLinear(_base(), [(a, b, float("nan"))])
    # a complex factor would otherwise be cast to its real part with only torch's warning
    with pytest.raises(ValueError, match=r"adapters\[1\] B must be a real floating-point tensor, got torch.complex64"):
        MultiLoraLinear(_base(), [(a, b, s), (a, b.to(torch.complex64), s)])
    with pytest.raises(ValueError, match=r"adapters\[0\] A must be a real floating-point tensor, got torch.int64"):
        MultiLoraLinear(_base(), [(a.long(), b, s)])
    with pytest.raises(TypeError, match="base must be an nn.Linear"):
        MultiLoraLinear(nn.Conv1d(3, 3, 1), [(a, b, s)])


@pytest.mark.parametrize("method", ["sum", "route"])
def test_input_of_another_dtype_is_named_as_x(method):
    """The caller chose x, not the layer's weight: the error says so (the op alone names weight)."""
    kw = {"router": "arrow"} if method == "route" else {}
    layer = MultiLoraLinear(_base(), _adapters(), method=method, **kw)
    x = torch.randn(3, 40, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match=r"x must be torch.float32 on \S+ like this layer, got torch.float64"):
        layer(x)
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):  # autocast casts x itself: allowed
        assert layer(x.float()).shape == (3, 24)


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("T", [16, 300])
def test_cuda_graph_and_reduce_overhead_compile(T, seeded):
    # Decoding runs lorafuse layers inside CUDA graphs: capture, replay on new inputs, and
    # torch.compile(mode="reduce-overhead") must all give the eager output.
    layer = MultiLoraLinear(_base(torch.bfloat16), _adapters(dtype=torch.bfloat16), method="loramap", map_rank=4,
                            map_init="sum")
    x = torch.randn(T, D_IN, device=DEVICE, dtype=torch.bfloat16)
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


def test_weights_must_be_finite():
    a, b = torch.randn(4, D_IN, device=DEVICE), torch.randn(D_OUT, 4, device=DEVICE)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="weights must be finite"):
            MultiLoraLinear(_base(), [(a, b, 1.0), (a, b, 1.0)], method="weighted", weights=[bad, 1.0])


@pytest.mark.parametrize("bad", [2.7, True, "4"])
def test_map_rank_must_be_a_whole_number(bad):
    a, b = torch.randn(4, D_IN, device=DEVICE), torch.randn(D_OUT, 4, device=DEVICE)
    with pytest.raises(ValueError, match="map_rank must be a positive integer"):
        MultiLoraLinear(_base(), [(a, b, 1.0)], method="loramap", map_rank=bad)


def test_a_refused_layer_leaves_the_base_trainable():
    """The base is frozen only once every argument has been accepted."""
    base = _base()
    with pytest.raises(ValueError, match="top_k"):
        MultiLoraLinear(base, _adapters(), method="route", top_k=7)
    with pytest.raises(ValueError, match="map_rank"):
        MultiLoraLinear(base, _adapters(), method="loramap")
    assert all(p.requires_grad for p in base.parameters())
    MultiLoraLinear(base, _adapters(), method="sum")
    assert not any(p.requires_grad for p in base.parameters())


@pytest.mark.parametrize("method", ["sum", "concat", "loramap"])
def test_weights_set_to_train_get_gradients_under_every_method(method, seeded):
    """The K weights are fixed at 1 outside "weighted", but a user may still set them to train (e.g.
    requires_grad_(True) on the whole layer): their gradient is then the same as in a compiled step,
    not silently None (the cached scale is used only when no gradient can flow into it)."""
    ad = [(torch.randn(2, 8), torch.randn(6, 2), 1.0), (torch.randn(3, 8), torch.randn(6, 3), 0.5)]
    layer = MultiLoraLinear(nn.Linear(8, 6), ad, method=method, **({"map_rank": 2} if method == "loramap" else {}))
    if layer.b_map is not None:
        nn.init.normal_(layer.b_map)
    x = torch.randn(4, 8)
    layer(x)  # fills the cache
    layer.weights.requires_grad_(True)
    with use_backend("torch"):
        layer(x).pow(2).sum().backward()
    w = layer.weights.detach().clone().requires_grad_(True)
    ref = lora_linear_reference(x, layer.weight, layer.bias, layer.a_cat, layer.b_cat,
                                (layer.adapter_scales * w)[layer.rank_index], layer.a_map, layer.b_map)
    ref.pow(2).sum().backward()
    assert layer.weights.grad is not None and rel_err(layer.weights.grad, w.grad) < 1e-5

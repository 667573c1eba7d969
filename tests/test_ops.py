"""lorafuse.lora_linear: forward and every gradient against float64 autograd of the reference,
dispatch (fused / split / plain torch), torch.compile, edge cases and input errors."""
import pytest
import torch

import lorafuse
import lorafuse.ops as ops
from conftest import DEVICE, HAS_CUDA, KERNEL_DTYPES, TOL, rel_err
from lorafuse.reference import lora_linear_reference

CASES = [
    (1, 24, 40, 1, None),
    (37, 40, 24, 5, 4),
    (300, 24, 40, 48, 16),
    (37, 1000, 40, 5, 1),
    (300, 40, 1000, 48, None),
]
if HAS_CUDA:
    CASES += [(2048, 4096, 4096, 48, 16), (4099, 1000, 3000, 64, 8), (16, 4096, 14336, 48, 16)]
IDS = [f"T{c[0]}-din{c[1]}-dout{c[2]}-R{c[3]}-m{c[4]}" for c in CASES]
NAMES = ["x", "weight", "bias", "a_cat", "b_cat", "scale", "a_map", "b_map"]

# Gradients go through one more rounding to the dtype (dS, S') than the forward.
GRAD_TOL = {dt: 2 * t for dt, t in TOL.items()}


def _args(T, d_in, d_out, R, m, dtype, bias=True):
    dev = DEVICE
    return [
        torch.randn(T, d_in, device=dev).to(dtype),
        (torch.randn(d_out, d_in, device=dev) / d_in ** 0.5).to(dtype),
        torch.randn(d_out, device=dev).to(dtype) if bias else None,
        (torch.randn(R, d_in, device=dev) / d_in ** 0.5).to(dtype),
        (torch.randn(d_out, R, device=dev) / R ** 0.5).to(dtype),
        torch.rand(R, device=dev) + 0.5,
        torch.randn(m, R, device=dev) / R ** 0.5 if m else None,
        torch.randn(R, m, device=dev) / m ** 0.5 if m else None,
    ]


def _check_against_reference(args, dtype, grad_mask=None):
    grad_mask = grad_mask or [True] * 8
    leaves = [a.detach().requires_grad_(g) if a is not None else None for a, g in zip(args, grad_mask)]
    y = lorafuse.lora_linear(*leaves)
    ref_leaves = [a.detach().double().requires_grad_(g) if a is not None else None for a, g in zip(args, grad_mask)]
    y_ref = lora_linear_reference(*ref_leaves)
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert rel_err(y, y_ref) < TOL[dtype], "forward"
    dy = torch.randn_like(y)
    want = [i for i, a in enumerate(leaves) if a is not None and a.requires_grad]
    grads = torch.autograd.grad(y, [leaves[i] for i in want], dy)
    grads_ref = torch.autograd.grad(y_ref, [ref_leaves[i] for i in want], dy.double())
    for i, g, g_ref in zip(want, grads, grads_ref):
        assert g.dtype == leaves[i].dtype, NAMES[i]
        assert rel_err(g, g_ref) < GRAD_TOL[dtype], f"grad of {NAMES[i]}"


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("T,d_in,d_out,R,m", CASES, ids=IDS)
def test_forward_and_all_grads(T, d_in, d_out, R, m, dtype, seeded):
    _check_against_reference(_args(T, d_in, d_out, R, m, dtype), dtype)


@pytest.mark.parametrize("path", ["fused", "split"])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_fused_and_split_paths(path, dtype, monkeypatch, seeded):
    # The same small batch through the one-launch path and through shrink + GEMM.
    monkeypatch.setattr(ops, "FUSED_MAX_T", 10 ** 9 if path == "fused" else 0)
    _check_against_reference(_args(37, 40, 24, 5, 4, dtype), dtype)


@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if HAS_CUDA else []), ids=str)
@pytest.mark.parametrize("T,d_in,d_out,R,m", CASES, ids=IDS)
def test_cublas_shrink_path(T, d_in, d_out, R, m, dtype, monkeypatch, seeded):
    # The forward shrink's x a_cat^T from cuBLAS, as ranks from SHRINK_CUBLAS_MIN_R take it.
    import importlib

    shrink_module = importlib.import_module("lorafuse.kernels.shrink")
    monkeypatch.setattr(shrink_module, "SHRINK_CUBLAS_MIN_R", 1)
    monkeypatch.setattr(ops, "FUSED_MAX_T", 0)  # every T through shrink + GEMM
    calls = []
    orig = shrink_module._mm_f32
    monkeypatch.setattr(shrink_module, "_mm_f32", lambda *a: calls.append(1) or orig(*a))
    _check_against_reference(_args(T, d_in, d_out, R, m, dtype), dtype)
    assert calls and shrink_module._MM_OUT_DTYPE is not False


@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if HAS_CUDA else []), ids=str)
@pytest.mark.parametrize("T,d_in,d_out,R,m", CASES, ids=IDS)
def test_cublas_expand_path(T, d_in, d_out, R, m, dtype, monkeypatch, seeded):
    # The expand as Z = S' b_cat^T (+ bias), then Z.addmm_(x, W^T), as rows up to EXPAND_CUBLAS_MAX_T
    # take it; the Triton GEMM must not run in the forward.
    monkeypatch.setattr(ops, "expand_uses_cublas", lambda x: x.dtype != torch.float32)
    monkeypatch.setattr(ops, "FUSED_MAX_T", 0)
    gemm_calls = []
    orig = ops.lora_gemm
    monkeypatch.setattr(ops, "lora_gemm", lambda *a, **k: gemm_calls.append(1) or orig(*a, **k))
    args = _args(T, d_in, d_out, R, m, dtype)
    with torch.no_grad():
        y = lorafuse.lora_linear(*args)
    assert not gemm_calls and y.dtype == dtype
    _check_against_reference(args, dtype)


@pytest.mark.skipif(not (HAS_CUDA and torch.cuda.get_device_capability()[0] == 9),
                    reason="the persistent layer runs on Hopper GPUs only")
@pytest.mark.parametrize("persistent", [True, False], ids=["persistent", "two-launch"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_persistent_and_two_launch_paths(persistent, dtype, monkeypatch, seeded):
    # Many tokens on Hopper: one persistent launch (shrink as leading tiles), or shrink + GEMM.
    import importlib

    lg = importlib.import_module("lorafuse.kernels.lora_gemm")  # (the package's lora_gemm is the function)
    monkeypatch.setattr(ops, "PERSISTENT", persistent)
    calls = []
    orig = ops.lora_gemm_persistent
    monkeypatch.setattr(ops, "lora_gemm_persistent", lambda *a, **k: calls.append(k) or orig(*a, **k))
    args = _args(2050, 1000, 3000, 48, 16, dtype)
    assert lg.persistent_ok(args[0], args[1], args[3])
    _check_against_reference(args, dtype)
    assert bool(calls) == persistent and all(k["save"] for k in calls)


@pytest.mark.parametrize(
    "mask",
    [
        [True, False, False, False, False, False, False, False],  # frozen layer, x needs grad
        [False, False, False, False, False, False, True, True],  # LoraMap training, inputs frozen
        [True, False, False, False, False, True, False, False],  # weighted: scale trains
        [False, False, False, True, True, False, False, False],  # LoraConcat
        [False, True, True, False, False, False, False, False],  # base layer trains
        [False, False, False, False, False, False, True, False],  # a_map alone
        [False, False, False, False, False, False, False, True],  # b_map alone
    ],
    ids=["x", "maps", "scale", "concat", "base", "a_map", "b_map"],
)
def test_only_requested_grads(mask, monkeypatch, seeded):
    calls = []
    orig = ops.shrink_backward

    def spy(*a, **k):
        calls.append(k)
        return orig(*a, **k)

    monkeypatch.setattr(ops, "shrink_backward", spy)
    args = _args(37, 40, 24, 5, 4, torch.float32)
    _check_against_reference(args, torch.float32, grad_mask=mask)
    if not (mask[0] or mask[3] or mask[5] or mask[6] or mask[7]):
        assert not calls, "dy b_cat computed though no gradient needs it"
        return
    assert calls, "the kernel backward was not used"
    assert calls[0]["need_dmap"] == (mask[6] or mask[7])
    assert calls[0]["need_dscale"] == mask[5]
    assert calls[0]["need_ds"] == (mask[0] or mask[3])


def test_no_bias_and_3d_input(seeded):
    args = _args(37, 40, 24, 5, 4, torch.float32, bias=False)
    args[0] = torch.randn(2, 3, 40, device=DEVICE)
    _check_against_reference(args, torch.float32)


def test_noncontiguous_inputs(seeded):
    args = _args(37, 40, 24, 5, 4, torch.float32)
    args[0] = torch.randn(40, 37, device=DEVICE).t()  # transposed view
    args[1] = torch.randn(24 * 2, 40, device=DEVICE)[::2]  # row-strided weight
    args[3] = torch.randn(40, 5, device=DEVICE).t()
    _check_against_reference(args, torch.float32)


def test_empty_batch(seeded):
    args = _args(0, 40, 24, 5, 4, torch.float32)
    leaves = [a.requires_grad_() if a is not None else None for a in args]
    y = lorafuse.lora_linear(*leaves)
    assert y.shape == (0, 24)
    y.sum().backward()
    assert leaves[0].grad.shape == (0, 40) and torch.all(leaves[6].grad == 0)


def test_torch_backend_matches_kernels(seeded):
    args = _args(37, 40, 24, 5, 4, torch.float32)
    y_k = lorafuse.lora_linear(*args)
    with lorafuse.use_backend("torch"):
        y_t = lorafuse.lora_linear(*args)
    assert rel_err(y_k, y_t.double()) < 1e-5
    with pytest.raises(ValueError, match="backend must be"):
        with lorafuse.use_backend("cuda"):
            pass


def test_float64_takes_torch_path_and_triton_backend_refuses(seeded):
    args = [a.double() if a is not None else None for a in _args(5, 24, 40, 5, None, torch.float32)]
    y = lorafuse.lora_linear(*args)
    assert rel_err(y, lora_linear_reference(*args)) < 1e-12
    with lorafuse.use_backend("triton"):
        with pytest.raises(ValueError, match="backend 'triton' needs"):
            lorafuse.lora_linear(*args)


@pytest.mark.parametrize("T", [5, 37])  # one program in the backward's reductions, and several
def test_torch_compile_fullgraph(T, seeded):
    args = _args(T, 40, 24, 5, 4, torch.float32)
    leaves = [a.requires_grad_() for a in args]

    def f(*t):
        return lorafuse.lora_linear(*t).square().sum()

    backend = "inductor" if HAS_CUDA else "aot_eager"
    compiled = torch.compile(f, backend=backend, fullgraph=True)
    loss = compiled(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    loss_ref = f(*leaves)
    grads_ref = torch.autograd.grad(loss_ref, leaves)
    assert rel_err(loss, loss_ref) < 1e-5
    for g, gr in zip(grads, grads_ref):
        assert rel_err(g, gr) < 1e-5


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("mask", [[False] * 6 + [True, True], [False] * 5 + [True, False, False]],
                         ids=["maps", "scale"])
def test_x_is_saved_only_for_the_grads_that_read_it(mask, compiled, seeded):
    """LoraMap and weighted layers train the maps or the scale, whose gradients never read x: the op
    keeps no (T, d_in) activation for them, so an x made under inference_mode trains them too."""
    args = _args(37, 40, 24, 5, 4, torch.float32)
    with torch.inference_mode():
        args[0] = args[0].clone()
    leaves = [a.detach().requires_grad_(g) if a is not None and g else a for a, g in zip(args, mask)]
    with lorafuse.use_backend("triton"):
        f = torch.compile(lorafuse.lora_linear, backend="aot_eager", fullgraph=True) if compiled else \
            lorafuse.lora_linear
        y = f(*leaves)
    if not compiled:
        assert all(t.shape != args[0].shape for t in y.grad_fn.saved_tensors), "x was saved"
    want = [i for i, g in enumerate(mask) if g]
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [leaves[i] for i in want], dy)
    ref = [a.detach().double().requires_grad_(g) if a is not None else None for a, g in zip(args, mask)]
    grads_ref = torch.autograd.grad(lora_linear_reference(*ref), [ref[i] for i in want], dy.double())
    for i, g, g_ref in zip(want, grads, grads_ref):
        assert rel_err(g, g_ref) < GRAD_TOL[torch.float32], f"grad of {NAMES[i]}"


BAD = [
    (0, lambda a: a.__setitem__(0, torch.randn(3, 41, device=DEVICE)), "x must have shape"),
    (1, lambda a: a.__setitem__(1, torch.randn(24, device=DEVICE)), "weight must have shape"),
    (2, lambda a: a.__setitem__(2, torch.randn(23, device=DEVICE)), r"bias must have shape \(24,\)"),
    (3, lambda a: a.__setitem__(3, torch.randn(5, 39, device=DEVICE)), r"a_cat must have shape \(R, 40\)"),
    (4, lambda a: a.__setitem__(4, torch.randn(24, 6, device=DEVICE)), r"b_cat must have shape \(24, 5\)"),
    (5, lambda a: a.__setitem__(5, torch.ones(4, device=DEVICE)), r"scale must have shape \(5,\)"),
    (6, lambda a: a.__setitem__(6, torch.randn(4, 6, device=DEVICE)), r"a_map must have shape \(m, 5\)"),
    (7, lambda a: a.__setitem__(7, torch.randn(5, 3, device=DEVICE)), r"b_map must have shape \(5, 4\)"),
    (7, lambda a: a.__setitem__(7, None), "a_map and b_map must be given together"),
    (1, lambda a: a.__setitem__(1, a[1].half()), "weight must have x's dtype"),
    (3, lambda a: a.__setitem__(3, a[3].long()), "a_cat must be a floating-point tensor"),
    (1, lambda a: a.__setitem__(1, a[1].to("meta")), "weight must be on"),
    (0, lambda a: a.__setitem__(0, [1.0, 2.0]), "x must be a torch.Tensor"),
    (0, lambda a: (a.__setitem__(0, a[0].to(torch.float8_e4m3fn)), a.__setitem__(1, a[1].to(torch.float8_e4m3fn)),
                   a.__setitem__(2, None)),
     "x must be float16, bfloat16, float32 or float64, got torch.float8_e4m3fn"),
    (3, lambda a: a.__setitem__(3, a[3][..., None]), r"a_cat must have shape \(R, 40\)"),
    (3, lambda a: a.__setitem__(3, a[3].to_sparse()), r"a_cat must be a dense \(strided\) tensor"),
    (0, lambda a: a.__setitem__(0, a[0].to_sparse()), r"x must be a dense \(strided\) tensor"),
    (1, lambda a: a.__setitem__(1, a[1].to_sparse_csr()), r"weight must be a dense \(strided\) tensor"),
]


@pytest.mark.parametrize("i,mutate,msg", BAD, ids=[m for _, _, m in BAD])
def test_bad_input_names_the_argument(i, mutate, msg):
    args = _args(3, 40, 24, 5, 4, torch.float32)
    mutate(args)
    with pytest.raises((ValueError, TypeError), match=msg):
        lorafuse.lora_linear(*args)


def test_torch_func_transforms(seeded):
    """torch.func.grad and vmap see the plain-torch path (the kernels' autograd Functions do not
    compose with them) and agree with the float64 reference; the 'triton' backend refuses them."""
    args = _args(7, 40, 24, 5, 4, torch.float32)
    consts = [a.detach() if a is not None else None for a in args[1:]]
    ref_consts = [a.double() if a is not None else None for a in consts]
    x = args[0].detach()
    g = torch.func.grad(lambda x: lorafuse.lora_linear(x, *consts).square().sum())(x)
    g_ref = torch.func.grad(lambda x: lora_linear_reference(x, *ref_consts).square().sum())(x.double())
    assert rel_err(g, g_ref) < GRAD_TOL[torch.float32]
    xs = torch.randn(3, 7, 40, device=DEVICE)
    y = torch.vmap(lambda x: lorafuse.lora_linear(x, *consts))(xs)
    assert rel_err(y, lora_linear_reference(xs.double(), *ref_consts)) < TOL[torch.float32]
    with lorafuse.use_backend("triton"), pytest.raises(ValueError, match="torch.func"):
        torch.vmap(lambda x: lorafuse.lora_linear(x, *consts))(xs)


@pytest.mark.parametrize("T", [5, 70])  # the one-launch path and the split path
def test_strided_vectors_match_contiguous(T, seeded):
    # bias and scale are read without strides by the kernels: views must be copied, not misread.
    x, w, _, a, bc, _, am, bm = _args(T, 40, 24, 5, 4, torch.float32)
    bias_view = torch.randn(48, device=DEVICE)[::2]
    scale_view = (torch.rand(10, device=DEVICE) + 0.5)[::2]
    expanded = torch.tensor(1.5, device=DEVICE).expand(5)
    for bias, scale in ((bias_view, scale_view), (None, expanded)):
        y = lorafuse.lora_linear(x, w, bias, a, bc, scale, am, bm)
        ref = lorafuse.lora_linear(x, w, None if bias is None else bias.contiguous(), a, bc, scale.contiguous(), am, bm)
        assert rel_err(y, ref) < 1e-6
        # The custom ops (what torch.compile calls) reached directly, with the views.
        ops = torch.ops.lorafuse
        out = ops.lora_linear_fwd(x, w, bias, a, bc, scale, am, bm, True)
        assert rel_err(out[0], ref) < 1e-6
        dy = torch.randn_like(ref)
        bias_c = None if bias is None else bias.contiguous()
        ref_out = ops.lora_linear_fwd(x, w, bias_c, a, bc, scale.contiguous(), am, bm, True)
        grads = ops.lora_linear_bwd(dy, x, w, a, bc, scale, am, bm, *out[1:], [True] * 8)
        ref_grads = ops.lora_linear_bwd(dy, x, w, a, bc, scale.contiguous(), am, bm, *ref_out[1:], [True] * 8)
        for g, g_ref in zip(grads, ref_grads):
            assert rel_err(g, g_ref) < 1e-6


@pytest.mark.parametrize("T", [5, 70])
def test_zero_width_layers(T, seeded):
    # d_in = 0 (the product is the bias) and d_out = 0 (an empty output) on both kernel paths.
    x, w, b, a, bc, sc, am, bm = _args(T, 40, 24, 5, 4, torch.float32)
    y = lorafuse.lora_linear(x[:, :0], w[:, :0], b, a[:, :0], bc, sc, am, bm)
    assert torch.equal(y, b.expand(T, 24))
    y = lorafuse.lora_linear(x[:, :0].reshape(T, 1, 0), w[:, :0], b, a[:, :0], bc, sc, am, bm)  # leading dims
    assert torch.equal(y, b.expand(T, 1, 24))
    leaves = [t.detach().requires_grad_() for t in (x, w[:0], b[:0], a, bc[:0], sc, am, bm)]
    y = lorafuse.lora_linear(*leaves)
    assert y.shape == (T, 0)
    y.sum().backward()
    assert all(t.grad is not None and torch.all(t.grad == 0) for t in leaves)


def test_higher_order_gradients(seeded):
    # The kernels' backward is first-order only: create_graph=True is refused, not silently
    # truncated; the torch backend gives the true second-order terms.
    args = _args(5, 40, 24, 5, 4, torch.float32)
    x = args[0].detach().requires_grad_()
    a = args[3].detach().requires_grad_()
    with pytest.raises(RuntimeError, match="first-order gradients only"):
        y = lorafuse.lora_linear(x, *args[1:3], a, *args[4:])
        torch.autograd.grad(y.square().sum(), x, create_graph=True)
    xd, ad = x.detach().double().requires_grad_(), a.detach().double().requires_grad_()
    rest = [t.double() for t in args[1:3]], [t.double() for t in args[4:]]
    with lorafuse.use_backend("torch"):
        y = lorafuse.lora_linear(xd, *rest[0], ad, *rest[1])
    gx, = torch.autograd.grad(y.square().sum(), xd, create_graph=True)
    g2, = torch.autograd.grad(gx.square().sum(), ad)
    y = lora_linear_reference(xd, *rest[0], ad, *rest[1])
    gx, = torch.autograd.grad(y.square().sum(), xd, create_graph=True)
    assert rel_err(g2, torch.autograd.grad(gx.square().sum(), ad)[0]) < 1e-12


def test_registered_op_without_saved_state_refuses_backward(seeded):
    args = [t.requires_grad_() for t in _args(5, 40, 24, 5, 4, torch.float32)]
    y = torch.ops.lorafuse.lora_linear_fwd(*args, False)[0]
    with pytest.raises(RuntimeError, match="save=False"):
        y.sum().backward()


def test_autocast_casts_like_linear(seeded):
    # Under autocast the layer behaves as F.linear: x, weight and bias in the autocast dtype
    # (whatever x's own dtype), the gradients back in the parameters' float32.
    x, w, b, a, bc, sc, am, bm = _args(37, 40, 24, 5, 4, torch.float32)
    w, a = w.requires_grad_(), a.requires_grad_()
    dev, dt = DEVICE.type, (torch.float16 if HAS_CUDA else torch.bfloat16)
    with lorafuse.use_backend("auto" if HAS_CUDA else "torch"):
        with torch.autocast(dev, dtype=dt):
            y = lorafuse.lora_linear(x, w, b, a, bc, sc, am, bm)
            y16 = lorafuse.lora_linear(x.to(dt), w, b, a, bc, sc, am, bm)
        ref = lorafuse.lora_linear(x.to(dt), w.to(dt), b.to(dt), a, bc, sc, am, bm)
    assert y.dtype == y16.dtype == dt
    assert rel_err(y, ref) < 1e-6 and rel_err(y16, ref) < 1e-6
    y.float().sum().backward()
    assert w.grad.dtype == torch.float32 and a.grad.dtype == torch.float32


def test_reference_takes_mixed_dtypes(seeded):
    # The public reference computes the low-rank path in float32 whatever the mix of input dtypes.
    args = _args(5, 40, 24, 5, 4, torch.float16)
    y = lora_linear_reference(*args)
    ref = lora_linear_reference(*[t.double() for t in args])
    assert y.dtype == torch.float16 and rel_err(y, ref) < TOL[torch.float16]


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter's bfloat16 limit: a CPU-only check")
def test_bfloat16_on_the_interpreter_takes_the_torch_path(seeded):
    """Under TRITON_INTERPRET=1 the kernels' bfloat16 products are wrong (triton issue 11584):
    bfloat16 CPU tensors run the plain-torch path ('auto'), are refused by backend 'triton' and by
    the launchers, never sent to the kernels."""
    from lorafuse.kernels import shrink

    args = _args(7, 40, 24, 5, 4, torch.bfloat16)
    ref = lora_linear_reference(*[a.double() if a is not None else None for a in args])
    assert rel_err(lorafuse.lora_linear(*args), ref) < TOL[torch.bfloat16]
    with lorafuse.use_backend("triton"):
        with pytest.raises(ValueError, match="interpreter's bfloat16 products are wrong"):
            lorafuse.lora_linear(*args)
    with pytest.raises(ValueError, match="x is bfloat16 on the CPU"):
        shrink(args[0], args[3], args[5])


@pytest.mark.skipif(not HAS_CUDA, reason="the cuBLAS expand is a CUDA path")
def test_expand_dispatch():
    # 16-bit CUDA rows from EXPAND_CUBLAS_MIN_T to EXPAND_CUBLAS_MAX_T take cuBLAS's expand; float32, fewer
    # and more rows the Triton GEMM.
    lo, hi = ops.EXPAND_CUBLAS_MIN_T, ops.EXPAND_CUBLAS_MAX_T
    assert ops.FUSED_MAX_T < lo < hi
    for T, dt, want in [(hi, torch.bfloat16, True), (hi + 1, torch.bfloat16, False), (hi, torch.float32, False),
                        (lo, torch.float16, True), (lo - 1, torch.float16, False), (16, torch.bfloat16, False)]:
        assert ops.expand_uses_cublas(torch.empty(T, 8, device="cuda", dtype=dt)) is want, (T, dt)


@pytest.mark.parametrize("var", ["LORAFUSE_EXPAND_CUBLAS_MAX_T", "LORAFUSE_SHRINK_CUBLAS_MIN_R"])
def test_switch_environment_variables(var):
    # A row or rank count read at import: a bad value is refused by name; a number is taken as given.
    import os
    import subprocess
    import sys

    read = ("import lorafuse.ops as o, importlib; s = importlib.import_module('lorafuse.kernels.shrink'); "
            "print(o.EXPAND_CUBLAS_MAX_T, s.SHRINK_CUBLAS_MIN_R)")
    run = lambda value: subprocess.run([sys.executable, "-c", read], capture_output=True, text=True,  # noqa: E731
                                       env={**os.environ, var: value})
    bad = run("many")
    assert bad.returncode != 0 and var in bad.stderr and "'many'" in bad.stderr
    good = run("7")
    assert good.returncode == 0, good.stderr
    expand_max, shrink_min = good.stdout.split()
    assert (expand_max if var == "LORAFUSE_EXPAND_CUBLAS_MAX_T" else shrink_min) == "7"

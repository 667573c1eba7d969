"""Kernel microbenchmarks: one multi-LoRA linear layer, lorafuse against the base GEMM and peers.

    python bench/bench_kernels.py                 # the full grid, on a GPU
    python bench/bench_kernels.py --smoke         # a tiny grid (also runs on CPU under the interpreter)

For every shape (T tokens, d_in, d_out, K adapters of rank r, LoraMap rank m) and implementation,
the median time of the forward and of forward+backward (x requires grad; each method's own
parameters too), as a ratio to the base layer alone (F.linear: cuBLAS) measured in the same run,
and the peak memory of forward+backward beyond the inputs. Timing: triton.testing.do_bench,
warm-up first, the L2 cache flushed before every timed call, median of at least MIN_SAMPLES calls;
the base is timed again at the end of each row (its spread is recorded; ratios use the mean). For
T <= 64 two more numbers per eager forward: host time per call, and the per-call time of a
back-to-back loop without flushes (fwd_loop_ms, fwd_loop_ratio): a decoding loop's cost, host included.

Implementations:
  base              F.linear(x, W)                                    (x)
  lorafuse_sum      MultiLoraLinear(method="sum")                     (x)
  lorafuse_concat   MultiLoraLinear(method="concat")                  (x, a_cat, b_cat)
  lorafuse_loramap  MultiLoraLinear(method="loramap", map_rank=m)     (x, a_map, b_map)
  peft              peft LoRA, K adapters active at once (bf16 weights) (x, every A_i, B_i)
  peft_frozen       the same with the adapters frozen                 (x)   [like-for-like with lorafuse_sum]
  eager_loop        base + sum_i s_i (x A_i^T) B_i^T, one adapter at a time  (x)
  eager_cat         base + ((x A_cat^T) * s) B_cat^T                  (x, A_cat, B_cat)
  eager_map         base + ((((x A_cat^T) A_map^T) B_map^T) * s) B_cat^T  (x, A_map, B_map)
  compile_map       torch.compile(eager_map, dynamic=True)            (x, A_map, B_map)
  graph_base, graph_loramap   forward only, replayed from a CUDA graph (T <= 2048): the cost without
                    host launches, as decoding loops (or torch.compile(mode="reduce-overhead")) run it
In parentheses: what requires grad in forward+backward.
"""
from __future__ import annotations

import argparse
import gc
import itertools
import math
import os
import sys
import time
import traceback

import torch

if "--smoke" in sys.argv and not torch.cuda.is_available():
    # Without a GPU the kernels run under the Triton interpreter, which must be chosen before triton loads
    # (else the lorafuse rows would time the plain-torch path).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from common import env_info, save_json, warm_up  # noqa: E402

import lorafuse  # noqa: E402

FULL = dict(T=[16, 512, 2048, 8192, 16384], dims=[(4096, 4096), (4096, 14336), (14336, 4096)],
            K=[1, 3, 8], r=[8, 16, 64], m=16)
SMOKE = dict(T=[1, 37], dims=[(40, 24)], K=[1, 3], r=[5], m=4)
IMPLS = ["base", "lorafuse_sum", "lorafuse_concat", "lorafuse_loramap", "peft", "peft_frozen", "eager_loop",
         "eager_cat", "eager_map", "compile_map", "graph_base", "graph_loramap"]
GRAPH_MAX_T = 2048


def _peft_layer(base: nn.Linear, adapters, r, dtype):
    from peft import LoraConfig, get_peft_model

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = base

        def forward(self, x):
            return self.lin(x)

    names = [f"a{i}" for i in range(len(adapters))]
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["lin"], lora_dropout=0.0)
    model = get_peft_model(Wrap(), cfg, adapter_name=names[0], autocast_adapter_dtype=False)
    for n in names[1:]:
        model.add_adapter(n, cfg)
    lin = model.base_model.model.lin
    with torch.no_grad():
        for n, (a, b, _) in zip(names, adapters):
            lin.lora_A[n].weight.copy_(a)
            lin.lora_B[n].weight.copy_(b)
    model.base_model.set_adapter(names)
    model.to(dtype)
    return model, [p for n, p in model.named_parameters() if "lora_" in n]


class Case:
    """Inputs and callables of one shape for every implementation."""

    def __init__(self, T, d_in, d_out, K, r, m, dtype, device):
        g = torch.Generator(device="cpu").manual_seed(T * 7 + d_in + d_out + K * 31 + r)
        rnd = lambda *s: torch.randn(*s, generator=g).to(device, dtype)  # noqa: E731
        self.base = nn.Linear(d_in, d_out, bias=False, device=device, dtype=dtype)
        with torch.no_grad():
            self.base.weight.copy_(rnd(d_out, d_in) / math.sqrt(d_in))
        self.base.requires_grad_(False)
        s = 2.0  # lora_alpha = 2 r
        self.adapters = [(rnd(r, d_in) / math.sqrt(d_in), rnd(d_out, r) / math.sqrt(r), s) for _ in range(K)]
        self.x = rnd(T, d_in)
        self.dy = rnd(T, d_out)
        self.r, self.m, self.K = r, m, K
        self.dtype, self.device = dtype, device

    def build(self, impl):
        """Returns (forward callable, tensors that require grad in forward+backward)."""
        base, ads = self.base, self.adapters
        W = base.weight
        if impl == "base":
            return (lambda xx: F.linear(xx, W)), []
        if impl.startswith("lorafuse_"):
            method = impl.split("_", 1)[1]
            kw = {"map_rank": self.m, "map_init": "sum"} if method == "loramap" else {}
            layer = lorafuse.MultiLoraLinear(base, ads, method=method, **kw)
            return layer, [p for p in layer.parameters() if p.requires_grad]
        if impl in ("peft", "peft_frozen"):
            model, params = _peft_layer(base, ads, self.r, self.dtype)
            return model, (params if impl == "peft" else [])
        a_cat = torch.cat([a for a, _, _ in ads]).requires_grad_(False)
        b_cat = torch.cat([b for _, b, _ in ads], 1).requires_grad_(False)
        scale = torch.cat([torch.full((a.shape[0],), s) for a, _, s in ads]).to(self.device, self.dtype)
        if impl == "eager_loop":
            def f(xx):
                y = F.linear(xx, W)
                for a, b, s in ads:
                    y = y + F.linear(F.linear(xx, a), b) * s
                return y
            return f, []
        if impl == "eager_cat":
            return (lambda xx: F.linear(xx, W) + F.linear(F.linear(xx, a_cat) * scale, b_cat)), [a_cat, b_cat]
        layer = lorafuse.MultiLoraLinear(base, ads, method="loramap", map_rank=self.m, map_init="sum")
        a_map = layer.a_map.detach().to(self.dtype).requires_grad_(False)
        b_map = layer.b_map.detach().to(self.dtype).requires_grad_(False)

        def chain(xx, a_map, b_map):
            return F.linear(xx, W) + F.linear(F.linear(F.linear(F.linear(xx, a_cat), a_map), b_map) * scale, b_cat)
        if impl == "eager_map":
            return (lambda xx: chain(xx, a_map, b_map)), [a_map, b_map]
        if impl == "compile_map":
            compiled = torch.compile(chain, dynamic=True)
            return (lambda xx: compiled(xx, a_map, b_map)), [a_map, b_map]
        if impl.startswith("graph_"):
            inner, _ = self.build("base" if impl == "graph_base" else "lorafuse_loramap")
            return _graphed(inner, self.x), None
        raise ValueError(impl)


def _graphed(f, x):
    """f(x) captured once in a CUDA graph (no grad); calling the result replays it on the same x."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(stream):
        for _ in range(3):  # compile and warm up outside the capture
            f(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        out = f(x)

    def replay(_x=None):
        graph.replay()
        return out
    replay.module = f
    return replay


MIN_SAMPLES = 25  # timed calls per median at least, however long one call takes


def time_ms(fn, quick=False):
    """Median of do_bench's event-timed calls (L2 flushed before each), with windows stretched so that
    slow calls still get MIN_SAMPLES samples (a fixed 20 ms window gave 2-7 samples at T = 16384)."""
    if not torch.cuda.is_available():
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    from triton.testing import do_bench

    warmup, rep = (5, 20) if quick else (10, 40)
    est = do_bench(fn, warmup=1, rep=1, return_mode="median")  # a few calls: the per-call time
    return do_bench(fn, warmup=max(warmup, 3 * est), rep=max(rep, MIN_SAMPLES * est), return_mode="median")


def loop_ms(fn, n=200):
    """Per-call time of n back-to-back eager calls between two events, no cache flush: what a decoding
    loop sees. Where the host launches slower than the GPU runs, this is the host's time (do_bench's
    flush before each call gives the host that long to catch up, which hides it)."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def host_us_per_call(fn, n=200):
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


def run_case(case: Case, impls, quick):
    row = {}
    cuda = torch.cuda.is_available()
    for impl in impls:
        entry = {}
        if impl.startswith("graph_") and (not cuda or case.x.shape[0] > GRAPH_MAX_T):
            continue
        try:
            f, params = case.build(impl)
            x = case.x
            with torch.no_grad():
                y = f(x)
                entry["fwd_ms"] = time_ms(lambda f=f: f(x), quick)
                if cuda and x.shape[0] <= 64:
                    entry["fwd_host_us"] = host_us_per_call(lambda f=f: f(x))
                    entry["fwd_loop_ms"] = loop_ms(lambda f=f: f(x))
            layer = getattr(f, "module", f)
            if isinstance(layer, lorafuse.MultiLoraLinear):
                # Every timed lorafuse row is checked against float32 torch on the same weights.
                with torch.no_grad():
                    ref = lorafuse.lora_linear_reference(
                        x.float(), layer.base_layer.weight.float(), None, layer.a_cat.float(), layer.b_cat.float(),
                        layer.scale, layer.a_map, layer.b_map)
                    entry["rel_err"] = ((y.float() - ref).norm() / ref.norm()).item()
                    del ref
            if params is None:  # forward-only variant
                row[impl] = entry
                del f, y, layer
                continue
            xg = x.detach().requires_grad_(True)
            for p in params:
                p.requires_grad_(True)
            inputs = [xg] + list(params)

            def fb(f=f, xg=xg, inputs=inputs):
                return torch.autograd.grad(f(xg), inputs, case.dy)
            fb()
            entry["fb_ms"] = time_ms(fb, quick)
            if cuda:
                torch.cuda.synchronize()
                before = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                g = fb()
                torch.cuda.synchronize()
                entry["fb_peak_mb"] = (torch.cuda.max_memory_allocated() - before) / 2 ** 20
                del g
            for p in params:
                p.requires_grad_(False)
            del f, params, y
        except Exception as e:  # a peer that fails at a shape is reported, not fatal
            entry["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            traceback.print_exc()
        row[impl] = entry
        gc.collect()
    base = row.get("base", {})
    if cuda and "fwd_ms" in base and len(impls) > 1:
        # The base again after every other implementation: a clock or neighbour change during the row
        # shows as a spread between the two, and the ratios use their mean.
        W = case.base.weight
        again = time_ms(lambda: F.linear(case.x, W), quick)
        base["fwd_ms_runs"] = [base["fwd_ms"], again]
        base["fwd_spread"] = max(base["fwd_ms_runs"]) / min(base["fwd_ms_runs"]) - 1
        base["fwd_ms"] = (base["fwd_ms"] + again) / 2
    for impl, e in row.items():
        if "fwd_ms" in e and base.get("fwd_ms"):
            e["fwd_ratio"] = e["fwd_ms"] / base["fwd_ms"]
        if "fb_ms" in e and base.get("fb_ms"):
            e["fb_ratio"] = e["fb_ms"] / base["fb_ms"]
        if "fwd_loop_ms" in e and base.get("fwd_loop_ms"):
            e["fwd_loop_ratio"] = e["fwd_loop_ms"] / base["fwd_loop_ms"]
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny grid; runs on CPU too (TRITON_INTERPRET=1)")
    p.add_argument("--T", type=int, nargs="*", help="override the token counts")
    p.add_argument("--dims", type=str, nargs="*", help="override (d_in,d_out) pairs, e.g. 4096x14336")
    p.add_argument("--K", type=int, nargs="*")
    p.add_argument("--r", type=int, nargs="*")
    p.add_argument("--impls", type=str, nargs="*", default=IMPLS, choices=IMPLS)
    p.add_argument("--quick", action="store_true", help="shorter timing windows")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--prefix", default="kernels")
    args = p.parse_args(argv)
    grid = dict(SMOKE if args.smoke else FULL)
    if args.T:
        grid["T"] = args.T
    if args.dims:
        grid["dims"] = [tuple(int(v) for v in d.split("x")) for d in args.dims]
    if args.K:
        grid["K"] = args.K
    if args.r:
        grid["r"] = args.r
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    doc = {"env": env_info([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])),
           "dtype": str(dtype), "grid": {k: v for k, v in grid.items()}, "rows": []}
    # compile_map compiles per shape class and grad mode: the full grid passes dynamo's default limit
    # of 8 versions, after which it would silently run eagerly.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)
    warm_up()
    t_start = time.time()
    shapes = list(itertools.product(grid["dims"], grid["K"], grid["r"], grid["T"]))
    doc["shapes_planned"] = len(shapes)
    # The reference configuration (K = 3, r = 16) first: a run cut short keeps the rows that matter.
    shapes.sort(key=lambda sh: (not (sh[1] == 3 and sh[2] == 16), sh[1], sh[2]))
    for (d_in, d_out), K, r, T in shapes:
        case = Case(T, d_in, d_out, K, r, grid["m"], dtype, device)
        row = run_case(case, args.impls, args.quick)
        doc["rows"].append({"T": T, "d_in": d_in, "d_out": d_out, "K": K, "r": r, "m": grid["m"], "impls": row})
        short = " ".join(f"{k.replace('lorafuse_', 'lf_')}={v['fwd_ratio']:.2f}/{v.get('fb_ratio', float('nan')):.2f}"
                         for k, v in row.items() if "fwd_ratio" in v and k != "base")
        bad = [k for k, v in row.items() if v.get("rel_err", 0) > 2e-2 or "error" in v]
        if bad:
            short += f"  CHECK: {bad}"
        print(f"T={T} {d_in}x{d_out} K={K} r={r} base={row['base'].get('fwd_ms', float('nan')):.4f}ms "
              f"[fwd/fb ratios] {short}  ({time.time() - t_start:.0f}s)", flush=True)
        doc["seconds"] = time.time() - t_start
        save_json(doc, args.out, args.prefix)  # after every shape, so a cut-off run keeps its rows
        del case
        if cuda:
            torch.cuda.empty_cache()
    doc["complete"] = True  # (absent in a run cut off before its last shape)
    path = save_json(doc, args.out, args.prefix)
    print("wrote", path)
    return doc


if __name__ == "__main__":
    main()

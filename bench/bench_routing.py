"""Routing and per-request adapter benchmarks: one linear layer, lorafuse against the base GEMM and peers.

    python bench/bench_routing.py            # the issue's grid, on a GPU (about 3 minutes on an H100)
    python bench/bench_routing.py --quick    # shorter timing windows
    python bench/bench_routing.py --smoke    # tiny shapes; runs on CPU too (TRITON_INTERPRET=1)

Forward only (serving), no grad. Timing: triton.testing.do_bench, warm-up first, the L2 cache flushed
before every timed call (so weights are read from memory every time, as for inputs larger than L2),
median; every time is also given as a ratio to the base layer alone (F.linear: cuBLAS) measured in
the same run. Each lorafuse row is checked against plain torch in float32 on the same bf16 inputs
(rel_err); peers that compute the same function are checked too.

Routed (per-token gates over K adapters of rank r, Arrow router, top_k of 1 or 2):
  base              F.linear(x, W)
  lorafuse_routed   lorafuse.routing.lora_linear_routed, schedule="auto" (what a layer runs)
  lorafuse_dense    schedule="dense": fused routed shrink over all K adapters + lora_gemm
  lorafuse_grouped  schedule="grouped": logits, top-k, then one mixed-batch pass per choice (rows
                    grouped by their adapter) added onto the cuBLAS base product
  torch_ref         lorafuse.routing.lora_linear_routed_reference in bf16: every adapter's shrink
                    (x A_cat^T), the Arrow logits, top-k, softmax, gates, the expand: plain torch
  peft_arrow        peft's Arrow (LoraConfig(arrow_config=...)), K adapters on one nn.Linear;
                    skipped where its (T, K, d_out) intermediate would not fit the memory budget
  graph_base, graph_routed   base and lorafuse_routed replayed from a CUDA graph: the GPU's cost
                    without host launches (an eager call whose host time exceeds its GPU time
                    leaves the GPU idle between calls, which the eager rows include)
Per-request (a library of 64 adapters of rank r; B = min(T, 64) sequences of T / B tokens, each
sequence with its own adapter, all distinct):
  base                 F.linear(x, W)
  lorafuse_segmented   lorafuse.lora_linear_segmented (schedule chosen by T; ids range-checked on
                       the device, one small launch)
  lorafuse_unchecked   the same with check_ids=False (ids validated once by the caller)
  lorafuse_gathered    unchecked, schedule="gathered" (one program per row)
  lorafuse_grouped     unchecked, schedule="grouped" (rows grouped by adapter on the GPU)
  graph_base, graph_segmented, graph_checked   replayed from a CUDA graph (T <= 2048): the decoding
                       cost without host launches (graph_segmented unchecked, graph_checked checked)
  torch_loop           base + a loop over the adapters present (index_select / index_add_)
  peft_mixed           peft with 64 adapters and forward(x, adapter_names=[...]) (mixed batch)

Writes bench/results/routing-<gpu>-<date>.json (after every row, so a cut-off run keeps its rows).
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time
import traceback

import torch

if "--smoke" in sys.argv and not torch.cuda.is_available():
    # Without a GPU the kernels run under the Triton interpreter, which must be chosen before triton loads.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from common import env_info, save_json, warm_up  # noqa: E402
from bench_kernels import _graphed, host_us_per_call, loop_ms, time_ms  # noqa: E402

from lorafuse.segmented import LoraLibrary, lora_linear_segmented, lora_linear_segmented_reference  # noqa: E402

FULL = dict(T=[16, 512, 2048, 8192], seg_T=[16, 128, 512, 2048, 8192], dims=[(4096, 4096)], extra_dims=[(4096, 14336)],
            K=[4, 16, 64], top_k=[1, 2], r=16, library=64)
SMOKE = dict(T=[5, 37], seg_T=[5, 37], dims=[(40, 24)], extra_dims=[], K=[2, 4], top_k=[1, 2], r=4,
             library=6)
ROUTED_IMPLS = ["base", "lorafuse_routed", "lorafuse_dense", "lorafuse_grouped", "graph_base", "graph_routed",
                "torch_ref", "peft_arrow"]
SEGMENTED_IMPLS = ["base", "lorafuse_segmented", "lorafuse_unchecked", "lorafuse_gathered", "lorafuse_grouped",
                   "graph_base", "graph_segmented", "graph_checked", "torch_loop", "peft_mixed"]
GRAPH_MAX_T = 2048
# Largest intermediate a peer may allocate (bytes); peft's Arrow builds a (T, K, d_out) tensor.
PEER_MEMORY_BUDGET = 16 * 2 ** 30
CHECK_TOL = 2e-2


def _rel_err(out, ref):
    out, ref = out.float(), ref.float()
    return ((out - ref).norm() / ref.norm()).item()


class _Wrap(nn.Module):
    def __init__(self, lin):
        super().__init__()
        self.lin = lin

    def forward(self, x, **kw):
        return self.lin(x)


def _peft_model(base: nn.Linear, adapters, r: int, dtype, names):
    """peft around one Linear with the given adapters loaded under `names`, in eval mode."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["lin"], lora_dropout=0.0)
    model = get_peft_model(_Wrap(base), cfg, adapter_name=names[0], autocast_adapter_dtype=False)
    for n in names[1:]:
        model.add_adapter(n, cfg)
    lin = model.base_model.model.lin
    with torch.no_grad():
        for n, (a, b, _) in zip(names, adapters):
            lin.lora_A[n].weight.copy_(a)
            lin.lora_B[n].weight.copy_(b)
    return model.to(dtype).eval()


def _peft_arrow(base, adapters, r, dtype, top_k):
    from peft import LoraConfig
    from peft.tuners.lora.config import ArrowConfig

    names = [f"task_{i}" for i in range(len(adapters))]
    model = _peft_model(base, adapters, r, dtype, names)
    arrow = ArrowConfig(top_k=top_k, router_temperature=1.0, rng_seed=0)
    arrow.task_adapter_names = names
    arrow.gks_adapter_names = []
    model.add_adapter("arrow_router", LoraConfig(arrow_config=arrow, target_modules=["lin"], r=r, lora_alpha=2 * r))
    model.set_adapter("arrow_router")
    return model.to(dtype).eval()


class Layer:
    """A base layer and n adapters of rank r (scale 2 = lora_alpha / r with alpha = 2r)."""

    def __init__(self, d_in, d_out, n, r, dtype, device, seed):
        g = torch.Generator(device="cpu").manual_seed(seed)
        rnd = lambda *s: torch.randn(*s, generator=g).to(device, dtype)  # noqa: E731
        self.base = nn.Linear(d_in, d_out, bias=False, device=device, dtype=dtype).requires_grad_(False)
        with torch.no_grad():
            self.base.weight.copy_(rnd(d_out, d_in) / math.sqrt(d_in))
        self.adapters = [(rnd(r, d_in) / math.sqrt(d_in), rnd(d_out, r) / math.sqrt(r), 2.0) for _ in range(n)]
        self.gen = g
        self.r, self.dtype, self.device = r, dtype, device

    def x(self, *shape):
        return torch.randn(*shape, generator=self.gen).to(self.device, self.dtype)


def _time(entry, f, quick, host):
    entry["fwd_ms"] = time_ms(f, quick)
    if host and torch.cuda.is_available():
        entry["fwd_host_us"] = host_us_per_call(f)
        entry["fwd_loop_ms"] = loop_ms(f)


def _finish(row, base_fn=None, quick=False):
    """Ratios to the base; with base_fn, the base is timed again first (after every other variant):
    its spread is recorded and the ratios use the mean of the two."""
    b = row.get("base", {})
    if base_fn is not None and "fwd_ms" in b and torch.cuda.is_available() and len(row) > 1:
        b["fwd_ms_runs"] = [b["fwd_ms"], time_ms(base_fn, quick)]
        b["fwd_spread"] = max(b["fwd_ms_runs"]) / min(b["fwd_ms_runs"]) - 1
        b["fwd_ms"] = sum(b["fwd_ms_runs"]) / 2
    base, base_loop = b.get("fwd_ms"), b.get("fwd_loop_ms")
    for e in row.values():
        if "fwd_ms" in e and base:
            e["fwd_ratio"] = e["fwd_ms"] / base
        if "fwd_loop_ms" in e and base_loop:
            e["fwd_loop_ratio"] = e["fwd_loop_ms"] / base_loop
    return row


def _run(row, name, body):
    """Run one variant; an exception is recorded and printed, not fatal."""
    entry = {}
    try:
        body(entry)
    except Exception as e:  # noqa: BLE001 - a failing variant is reported and skipped
        entry["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        traceback.print_exc()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    row[name] = entry
    gc.collect()


# ----------------------------------------------------------------------------------------------
# Routed


def routed_rows(layer: Layer, T: int, K: int, top_ks, impls, quick, peft_cache):
    """One row per top_k for this (layer, T): the K adapters routed by Arrow."""
    from lorafuse.routing import arrow_prototypes

    W = layer.base.weight
    ads = layer.adapters[:K]
    a_cat = torch.cat([a for a, _, _ in ads])
    b_cat = torch.cat([b for _, b, _ in ads], 1)
    scale = torch.full((K * layer.r,), 2.0, device=layer.device)
    ranks = [layer.r] * K
    protos = arrow_prototypes(a_cat, b_cat, ranks, scale).to(layer.dtype)
    x = layer.x(T, W.shape[1])
    return [(top_k, _routed_row(layer, x, (a_cat, b_cat, scale, ranks, protos, "arrow", top_k), impls, quick,
                                peft_cache)) for top_k in top_ks]


def _routed_row(layer, x, args, impls, quick, peft_cache):
    from lorafuse.routing import lora_linear_routed, lora_linear_routed_reference

    W = layer.base.weight
    a_cat, b_cat, scale, ranks, protos, _, top_k = args
    T, K = x.shape[0], len(ranks)
    host = T <= 64
    row = {}
    with torch.no_grad():
        ref32 = lora_linear_routed_reference(x.float(), W.float(), None, a_cat.float(), b_cat.float(), scale, ranks,
                                             protos.float(), "arrow", top_k)
        for impl in impls:
            if impl == "base":
                _run(row, impl, lambda e: _time(e, lambda: F.linear(x, W), quick, host))
            elif impl in ("lorafuse_routed", "lorafuse_dense", "lorafuse_grouped"):
                def body(e, kw={"schedule": {"lorafuse_routed": "auto", "lorafuse_dense": "dense",
                                              "lorafuse_grouped": "grouped"}[impl]}):
                    e["rel_err"] = _rel_err(lora_linear_routed(x, W, None, *args, **kw), ref32)
                    _time(e, lambda: lora_linear_routed(x, W, None, *args, **kw), quick, host)
                _run(row, impl, body)
            elif impl in ("graph_base", "graph_routed"):
                if not torch.cuda.is_available():
                    continue

                def body(e, impl=impl):
                    if impl == "graph_base":
                        g = _graphed(lambda xx: F.linear(xx, W), x)
                    else:
                        g = _graphed(lambda xx: lora_linear_routed(xx, W, None, *args), x)
                        e["rel_err"] = _rel_err(g(), ref32)
                    _time(e, g, quick, host)
                _run(row, impl, body)
            elif impl == "torch_ref":
                def body(e):
                    e["rel_err"] = _rel_err(lora_linear_routed_reference(x, W, None, *args), ref32)
                    _time(e, lambda: lora_linear_routed_reference(x, W, None, *args), quick, host)
                _run(row, impl, body)
            elif impl == "peft_arrow":
                def body(e):
                    need = 3 * T * K * W.shape[0] * x.element_size()
                    if need > PEER_MEMORY_BUDGET:
                        e["skipped"] = f"its (T, K, d_out) intermediates need ~{need / 2 ** 30:.0f} GiB"
                        return
                    key = (tuple(W.shape), K)
                    if key not in peft_cache:
                        peft_cache.clear()
                        gc.collect()
                        peft_cache[key] = _peft_arrow(layer.base, layer.adapters[:K], layer.r, layer.dtype, top_k)
                    model = peft_cache[key]
                    arrow = model.base_model.model.lin.lora_arrow["arrow_router"]
                    arrow.top_k = top_k
                    y = model(x)
                    # peft's prototypes come from 15 power iterations, not always converged on random
                    # adapters: its output is checked against the same math on its own prototypes.
                    ref_p = lora_linear_routed_reference(x.float(), W.float(), None, a_cat.float(), b_cat.float(),
                                                         scale, ranks, arrow.prototypes.float(), "arrow", top_k)
                    e["rel_err"] = _rel_err(y, ref_p)
                    e["prototype_cosine_min"] = (arrow.prototypes.float() * protos.float()).sum(1).abs().min().item()
                    _time(e, lambda: model(x), quick, host)
                _run(row, impl, body)
    return _finish(row, lambda: F.linear(x, W), quick)


# ----------------------------------------------------------------------------------------------
# Per-request


def _torch_loop(x2, W, ads, ids):
    """Base + a loop over the adapters present (reads ids back: the usual eager implementation)."""
    y = F.linear(x2, W)
    for i in torch.unique(ids).tolist():
        if i < 0:
            continue
        rows = (ids == i).nonzero().squeeze(1)
        a, b, s = ads[i]
        y.index_add_(0, rows, (x2.index_select(0, rows) @ a.t()) @ (b.t() * s))
    return y


def segmented_row(layer: Layer, T: int, impls, quick):
    W = layer.base.weight
    d_out, d_in = W.shape
    n = len(layer.adapters)
    lib = LoraLibrary.from_adapters(layer.adapters)
    B = min(T, n)
    L = T // B
    x = layer.x(B, L, d_in)
    seq_ids = torch.randperm(n, generator=layer.gen)[:B].to(layer.device)
    tok_ids = seq_ids[:, None].expand(B, L).reshape(-1)
    row = {"_shape": {"sequences": B, "tokens_per_sequence": L, "distinct_adapters": int(B)}}
    lib32 = lib.to(dtype=torch.float32)
    ref32 = None

    def ref():
        nonlocal ref32
        if ref32 is None:
            ref32 = lora_linear_segmented_reference(x.float(), W.float(), None, lib32, seq_ids)
        return ref32

    host = T <= 64
    cuda = torch.cuda.is_available()
    with torch.no_grad():
        for impl in impls:
            if impl == "base":
                _run(row, impl, lambda e: _time(e, lambda: F.linear(x, W), quick, host))
            elif impl.startswith("lorafuse_"):
                schedule = {"lorafuse_segmented": "auto", "lorafuse_unchecked": "auto",
                            "lorafuse_gathered": "gathered", "lorafuse_grouped": "grouped"}[impl]
                check = impl == "lorafuse_segmented"

                def body(e, schedule=schedule, check=check):
                    f = lambda: lora_linear_segmented(x, W, None, lib, seq_ids, schedule=schedule,  # noqa: E731
                                                      check_ids=check)
                    e["rel_err"] = _rel_err(f(), ref())
                    _time(e, f, quick, host)
                _run(row, impl, body)
            elif impl.startswith("graph_"):
                if not cuda or T > GRAPH_MAX_T:
                    continue

                def body(e, impl=impl):
                    if impl == "graph_base":
                        g = _graphed(lambda xx: F.linear(xx, W), x)
                    else:
                        check = impl == "graph_checked"
                        g = _graphed(lambda xx: lora_linear_segmented(xx, W, None, lib, seq_ids, check_ids=check), x)
                        e["rel_err"] = _rel_err(g(), ref())
                    _time(e, g, quick, host)
                _run(row, impl, body)
            elif impl == "torch_loop":
                def body(e):
                    x2 = x.reshape(-1, d_in)
                    e["rel_err"] = _rel_err(_torch_loop(x2, W, layer.adapters, tok_ids), ref().reshape(-1, d_out))
                    _time(e, lambda: _torch_loop(x2, W, layer.adapters, tok_ids), quick, host)
                _run(row, impl, body)
            elif impl == "peft_mixed":
                def body(e):
                    names = [f"a{i}" for i in range(n)]
                    model = _peft_model(layer.base, layer.adapters, layer.r, layer.dtype, names)
                    adapter_names = [names[i] for i in seq_ids.tolist()]
                    e["rel_err"] = _rel_err(model(x, adapter_names=adapter_names), ref())
                    _time(e, lambda: model(x, adapter_names=adapter_names), quick, host)
                    del model
                _run(row, impl, body)
    return _finish(row, lambda: F.linear(x, W), quick)


# ----------------------------------------------------------------------------------------------


def _summary(row, prefix_base="base"):
    parts = []
    for k, v in row.items():
        if k.startswith("_") or k == "base":
            continue
        if "fwd_ratio" in v:
            flag = "!" if v.get("rel_err", 0) > CHECK_TOL else ""
            parts.append(f"{k}={v['fwd_ratio']:.2f}x{flag}")
        elif "error" in v:
            parts.append(f"{k}=ERROR")
        elif "skipped" in v:
            parts.append(f"{k}=skip")
    return " ".join(parts)


def _table(doc):
    """The results as one text table: times in ms and ratios to the base layer."""
    lines = []
    for part, impls in (("routed", ROUTED_IMPLS), ("segmented", SEGMENTED_IMPLS)):
        rows = [r for r in doc["rows"] if r["part"] == part]
        if not rows:
            continue
        head = "d_in x d_out      T  K top" if part == "routed" else "d_in x d_out      T  lib   "
        lines.append(f"\n{part}: forward ms (ratio to base)")
        lines.append(head + "".join(f"{i:>22}" for i in impls))
        for r in rows:
            key = (f"{r['d_in']:>5}x{r['d_out']:<6}{r['T']:>6} {r['K']:>3} {r['top_k']:>2} " if part == "routed"
                   else f"{r['d_in']:>5}x{r['d_out']:<6}{r['T']:>6} {r['library']:>3}    ")
            cells = []
            for i in impls:
                e = r["impls"].get(i, {})
                if "fwd_ms" in e:
                    c = f"{e['fwd_ms']:.4f}" + (f" ({e['fwd_ratio']:.2f})" if i != "base" and "fwd_ratio" in e else "")
                    if e.get("rel_err", 0) > CHECK_TOL:
                        c += "!"
                else:
                    c = "error" if "error" in e else "skip" if "skipped" in e else "-"
                cells.append(f"{c:>22}")
            lines.append(key + "".join(cells))
    lines.append("(! = rel_err above %.0e against float32 torch: see the JSON)" % CHECK_TOL)
    return "\n".join(lines)


def _targets(doc):
    """The issue's targets (H100, bf16) read off the rows: [(target, measured, met)]."""
    out = []

    def ratio(row, impl):
        return row["impls"].get(impl, {}).get("fwd_ratio")

    for r in doc["rows"]:
        shape = f"T={r['T']} {r['d_in']}x{r['d_out']}"
        if r["part"] == "routed" and r["top_k"] == 1 and r["T"] >= 2048:
            for impl in ("lorafuse_routed", "graph_routed"):
                v = ratio(r, impl)
                if v is not None:
                    out.append((f"routed top-1 <= 1.15x base ({shape} K={r['K']}, {impl})", f"{v:.2f}x", v <= 1.15))
        if r["part"] == "segmented" and r["T"] == 16:
            for impl in ("lorafuse_segmented", "lorafuse_unchecked", "graph_segmented", "graph_checked"):
                v = ratio(r, impl)
                if v is not None:
                    out.append((f"per-request <= 1.3x base ({shape}, {impl})", f"{v:.2f}x", v <= 1.3))
        if r["part"] == "segmented":
            peft = r["impls"].get("peft_mixed", {}).get("fwd_ms")
            ours = r["impls"].get("lorafuse_segmented", {}).get("fwd_ms")
            if peft and ours:
                out.append((f"per-request >= 10x faster than peft adapter_names ({shape})", f"{peft / ours:.1f}x",
                            peft / ours >= 10))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes; runs on CPU too (TRITON_INTERPRET=1)")
    p.add_argument("--quick", action="store_true", help="shorter timing windows")
    p.add_argument("--parts", nargs="*", default=["routed", "segmented"], choices=["routed", "segmented"])
    p.add_argument("--budget", type=float, default=190.0,
                   help="seconds after which no further rows of the optional wide layer (4096x14336) start")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--prefix", default="routing")
    args = p.parse_args(argv)
    grid = SMOKE if args.smoke else FULL
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    argv_list = argv if argv is not None else sys.argv[1:]
    doc = {"env": env_info([os.path.relpath(__file__)] + list(argv_list)), "dtype": str(dtype),
           "grid": {k: v for k, v in grid.items()}, "rows": [], "skipped": []}
    warm_up()
    t_start = time.time()

    try:
        import lorafuse.routing  # noqa: F401
        routed_ok = True
    except Exception as e:  # noqa: BLE001
        routed_ok = False
        doc["skipped"].append(f"routed: lorafuse.routing is not importable ({type(e).__name__}: {e})")
        print("routed part skipped:", doc["skipped"][-1], flush=True)

    def save():
        return save_json(doc, args.out, args.prefix)

    dims_list = [(d, False) for d in grid["dims"]] + [(d, True) for d in grid["extra_dims"]]

    def out_of_time(optional, what):
        """Optional shapes stop (one group of rows at a time) once the budget is spent."""
        if optional and time.time() - t_start > args.budget:
            doc["skipped"].append(f"{what}: time budget of {args.budget:.0f} s spent")
            print("skipped", doc["skipped"][-1], flush=True)
            return True
        return False

    for (d_in, d_out), optional in dims_list:
        if out_of_time(optional, f"{d_in}x{d_out}"):
            continue
        n = max(max(grid["K"]), grid["library"])
        layer = Layer(d_in, d_out, n, grid["r"], dtype, device, seed=d_in + 7 * d_out)
        if "segmented" in args.parts:
            lib_layer = Layer.__new__(Layer)
            lib_layer.__dict__.update(layer.__dict__, adapters=layer.adapters[:grid["library"]])
            for T in grid["seg_T"]:  # 128 and 2048 added to place the gathered/grouped switch
                if out_of_time(optional, f"segmented T={T} {d_in}x{d_out}"):
                    break
                row = segmented_row(lib_layer, T, SEGMENTED_IMPLS, args.quick)
                shape = row["_shape"]
                T = shape["sequences"] * shape["tokens_per_sequence"]
                doc["rows"].append({"part": "segmented", "T": T, "d_in": d_in, "d_out": d_out,
                                    "library": grid["library"], "r": grid["r"], "impls": row})
                print(f"segmented T={T} {d_in}x{d_out} library={grid['library']} "
                      f"base={row.get('base', {}).get('fwd_ms', float('nan')):.4f}ms {_summary(row)} "
                      f"({time.time() - t_start:.0f}s)", flush=True)
                save()
        if "routed" in args.parts and routed_ok:
            peft_cache = {}
            for K in grid["K"]:
                for T in grid["T"]:
                    if out_of_time(optional, f"routed K={K} T={T} {d_in}x{d_out}"):
                        break
                    for top_k, row in routed_rows(layer, T, K, grid["top_k"], ROUTED_IMPLS, args.quick, peft_cache):
                        doc["rows"].append({"part": "routed", "T": T, "d_in": d_in, "d_out": d_out, "K": K,
                                            "top_k": top_k, "r": grid["r"], "impls": row})
                        print(f"routed T={T} {d_in}x{d_out} K={K} top_k={top_k} "
                              f"base={row.get('base', {}).get('fwd_ms', float('nan')):.4f}ms {_summary(row)} "
                              f"({time.time() - t_start:.0f}s)", flush=True)
                        save()
            peft_cache.clear()
        del layer
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    doc["seconds"] = time.time() - t_start
    doc["targets"] = [{"target": t, "measured": m, "met": ok} for t, m, ok in _targets(doc)]
    path = save()
    print(_table(doc))
    if doc["targets"]:
        print("\ntargets (the issue's, meant for an H100 in bf16):")
        for t in doc["targets"]:
            print(f"  {'met ' if t['met'] else 'MISS'}  {t['target']}: {t['measured']}")
    print("wrote", path, f"in {doc['seconds']:.0f} s")
    return doc


if __name__ == "__main__":
    main()

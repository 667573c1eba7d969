"""A whole decoder stack with K LoRA adapters on every linear layer: lorafuse's composed layers
against peft with all K adapters active and against the base model alone, in one run.

    python bench/bench_model.py                              # Llama-8B-like layers, 4 of them
    python bench/bench_model.py --hidden 2048 --intermediate 8192 --kv-heads 8
    python bench/bench_model.py --tiny                       # a CPU-sized check of the script
    python bench/bench_model.py --plot a.json b.json --png bench/results/model.png

The model is a randomly initialised transformers Llama (the layers' shapes are what matters for
speed); timed is its decoder stack (`model.model`: attention, MLP, norms; not the LM head, which no
adapter touches) on `--batch` x `--seq` tokens given as embeddings. K peft LoRA adapters of rank
`--rank` on q, k, v, o, gate, up and down projections (their B drawn at random with `--b-std`, so
that the composition is not zero).

Rows (each timed by do_bench, L2 flushed, the order reversed every other round, medians over rounds;
the base timed in every round):
  forward: "base", "peft" (all K adapters active: peft's loop over adapters, its weights in the
      model's dtype), "peft_f32" (the same with the adapters' weights in float32, peft's default for a
      16-bit model: autocast_adapter_dtype=True), "lorafuse_<method>" (lorafuse.compose on the same
      PeftModel, every targeted layer one fused MultiLoraLinear). With --graph each forward is also
      replayed from a CUDA graph: the GPU's time without the host's.
  train step (forward + backward of a mean-square loss, the embeddings requiring grad): "base" (the
      input gradient only), "peft_frozen" (adapters frozen), "peft" and "peft_f32" (all K adapters
      trainable, the same parameters as lorafuse concat), "lorafuse_sum" (nothing trains),
      "lorafuse_concat", "lorafuse_loramap" (the maps train).
Ratios are to the base of the same run; tokens/s and peak memory (above the model's own) per row;
peft's and the composed sum's and concat's outputs compared with the same model run in float32.
Writes bench/results/model-<gpu>-<date>.json.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import env_info, graphed, round_order, save_json, warm_up  # noqa: E402

import lorafuse  # noqa: E402
from lorafuse.cli import POSITIVE, POSITIVE_INT  # noqa: E402  (argparse types that name the bad value)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(args, dtype, device):
    """(PeftModel with K adapters, the decoder stack inside it, adapter names)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, max_position_embeddings=max(args.seq, 128))
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    names = [f"a{i}" for i in range(args.adapters)]
    lcfg = dict(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS, lora_dropout=0.0)
    pm = get_peft_model(model, LoraConfig(**lcfg), adapter_name=names[0])
    for n in names[1:]:
        pm.add_adapter(n, LoraConfig(**lcfg))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if ".lora_B." in n:  # peft starts B at zero; a random B makes every adapter count
                p.normal_(0.0, args.b_std)
    pm.base_model.set_adapter(names)  # all K active (and trainable): peft's multi-adapter forward
    return pm, pm.base_model.model.model, names


@contextlib.contextmanager
def unwrapped(pm):
    """Every peft LoRA layer of pm replaced by its base layer while inside (no wrapper's host time in
    the base's rows), put back on leaving."""
    from peft.tuners.lora import LoraLayer

    swaps = [(parent, attr, child) for parent in pm.modules() for attr, child in parent.named_children()
             if isinstance(child, LoraLayer)]
    for parent, attr, child in swaps:
        setattr(parent, attr, child.get_base_layer())
    try:
        yield
    finally:
        for parent, attr, child in swaps:
            setattr(parent, attr, child)


def cast_adapters(pm, dtype) -> None:
    """peft's LoRA weights to dtype in place (float32 is peft's default for a 16-bit base,
    autocast_adapter_dtype=True; bf16 -> float32 -> bf16 is exact)."""
    for n, p in pm.named_parameters():
        if ".lora_" in n:
            p.data = p.data.to(dtype)


def set_peft_trainable(pm, trainable: bool) -> None:
    for n, p in pm.named_parameters():
        p.requires_grad_(trainable and ".lora_" in n)


def trainable_params(module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def timer(fn, device, reps: int):
    """Median milliseconds of fn(): do_bench on a GPU, wall time on the CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=3, rep=reps * 25, return_mode="median")
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def peak_mb(fn, device) -> "float | None":
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2 ** 20


VARIANT_ORDER = ["peft_f32", "peft", "peft_frozen", "lorafuse_sum", "lorafuse_concat", "lorafuse_loramap"]


def plot(paths, out: str) -> str:
    """One panel per result file: each variant's forward and train-step time over the base's."""
    import json
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lorafuse.export import atomic_write

    docs = [json.loads(Path(p).read_text()) for p in paths]
    fig, axes = plt.subplots(1, len(docs), figsize=(5.2 * len(docs), 3.8), squeeze=False)
    for ax, doc in zip(axes[0], docs):
        rows = {(r["kind"], r["variant"]): r["ratio_to_base"] for r in doc["rows"]}
        names = [v for v in VARIANT_ORDER if ("train_step", v) in rows]
        for j, kind in enumerate(("forward", "train_step")):
            ys = [rows.get((kind, v), float("nan")) for v in names]
            ax.bar([i + 0.4 * j - 0.2 for i in range(len(names))], ys, width=0.4, label=kind.replace("_", " "))
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(names)), [n.replace("lorafuse_", "lorafuse\n") for n in names], fontsize=7)
        c = doc["config"]
        ax.set_title(f"{c['layers']} layers, hidden {c['hidden']}/{c['intermediate']}, K = {c['adapters']}, "
                     f"r = {c['rank']}, {doc['tokens']} tokens", fontsize=8)
        ax.set_ylabel("time / base model's")
        ax.legend(fontsize=7)
    fig.suptitle(f"{docs[0]['env']['gpu']}, {docs[0]['dtype']}, eager, commit {docs[0]['env']['commit']}", fontsize=9)
    fig.tight_layout()
    atomic_write(Path(out), lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return out


PROJ = "proj:"  # the prefix of the profiler ranges around each projection


def is_kernel(ev) -> bool:
    """A GPU event of the profile that is a kernel (or copy, memset), not a range annotation: the host
    ranges, ours and any library's, are mirrored on the GPU's timeline."""
    return (ev.device_type == torch.autograd.DeviceType.CUDA and not ev.name.startswith(PROJ)
            and not getattr(ev, "is_user_annotation", False))


@contextlib.contextmanager
def projection_ranges(model: torch.nn.Module):
    """Each targeted projection's forward inside a profiler range named PROJ + its name ("proj:q_proj")
    while inside, so that its kernels can be found per projection (eager calls only). The hooks are
    removed on leaving, and a range left open by a forward that raised is closed."""
    handles, names, open_ranges = [], {}, {}

    def pre(mod, _inputs):
        rf = torch.profiler.record_function(PROJ + names[id(mod)])
        rf.__enter__()
        open_ranges[id(mod)] = rf

    def post(mod, _inputs, _output):
        rf = open_ranges.pop(id(mod), None)
        if rf is not None:
            rf.__exit__(None, None, None)

    for name, mod in model.named_modules():
        attr = name.rsplit(".", 1)[-1]
        if attr in TARGETS:
            names[id(mod)] = attr
            handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post, always_call=True)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for rf in reversed(list(open_ranges.values())):
            rf.__exit__(None, None, None)


def projection_kernels(prof, calls: int) -> dict:
    """Per projection, per forward: "span_ms" (the GPU-side range of its calls, first kernel's start to
    last kernel's end, idle time included), "kernel_ms" (the kernels that started inside it) and
    "kernels" ({name: [launches, ms]}). Kernels are matched to the ranges by time on the GPU's
    timeline, a kernel to the range it starts in (a range ends where its last kernel ends, so a
    kernel starting there belongs to the next): in prof.events() Triton's kernels are not attached
    to the host ranges they were launched from."""
    cuda = [ev for ev in prof.events() if ev.device_type == torch.autograd.DeviceType.CUDA]
    ranges = sorted((ev.time_range.start, ev.time_range.end, ev.name[len(PROJ):]) for ev in cuda
                    if ev.name.startswith(PROJ))
    kernels = sorted((ev.time_range.start, ev.time_range.end, ev.name) for ev in cuda if is_kernel(ev))
    out: dict = {}
    i = 0
    for start, end, proj in ranges:
        per = out.setdefault(proj, {"span_ms": 0.0, "kernel_ms": 0.0, "kernels": {}})
        per["span_ms"] += (end - start) / 1e3 / calls
        while i < len(kernels) and kernels[i][0] < start:
            i += 1
        j = i
        while j < len(kernels) and kernels[j][0] < end:
            ks, ke, name = kernels[j]
            k = per["kernels"].setdefault(name[:160], [0.0, 0.0])
            k[0] += 1 / calls
            k[1] += (ke - ks) / 1e3 / calls
            per["kernel_ms"] += (ke - ks) / 1e3 / calls
            j += 1
    return out


def profile(args, variants: dict, fwd, device, body=None) -> dict:
    """GPU time by kernel of `--calls` eager forwards and as many CUDA-graph replays, per variant
    (torch.profiler; kernels inside a graph are traced one by one), and for the eager forwards the
    GPU time of each projection (q, k, v, o, gate, up, down; summed over layers; the host is traced
    too there, which adds host time to those calls). Writes model-profile-*.json."""
    if device.type != "cuda":
        raise SystemExit("--profile needs a GPU (it replays the forward from a CUDA graph)")
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    out = {}
    for name, (enter, leave) in variants.items():
        enter()
        try:
            replay = graphed(fwd)
            for mode, fn in (("eager", fwd), ("graph", replay)):
                fn()
                torch.cuda.synchronize()
                per_projection = mode == "eager" and body is not None
                acts = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if per_projection else [ProfilerActivity.CUDA]
                with contextlib.ExitStack() as hooks:
                    if per_projection:
                        hooks.enter_context(projection_ranges(body))
                    with torch_profile(activities=acts) as prof:
                        for _ in range(args.calls):
                            fn()
                        torch.cuda.synchronize()
                kernels: dict = {}
                for ev in prof.events():
                    if is_kernel(ev):
                        k = kernels.setdefault(ev.name, [0, 0.0])
                        k[0] += 1
                        k[1] += ev.device_time_total / 1e3 / args.calls  # ms per forward
                top = sorted(kernels.items(), key=lambda kv: -kv[1][1])
                out[f"{name}/{mode}"] = {
                    "kernel_ms_per_forward": sum(v[1] for v in kernels.values()),
                    "kernels": [{"name": n[:160], "calls_per_forward": c / args.calls, "ms_per_forward": t}
                                for n, (c, t) in top[:25]]}
                if per_projection:  # each projection's kernels and GPU-side span, ms per forward
                    per = out[f"{name}/{mode}"]["projections"] = projection_kernels(prof, args.calls)
                    print(f"{name:>14} projections, kernels / span ms: " + ", ".join(
                        f"{k} {v['kernel_ms']:.2f} / {v['span_ms']:.2f}" for k, v in per.items()), flush=True)
                print(f"{name:>14} {mode}: {out[f'{name}/{mode}']['kernel_ms_per_forward']:.2f} ms of kernels per "
                      f"forward; top: " + "; ".join(f"{n[:60]} {t:.2f}" for n, (c, t) in top[:6]), flush=True)
            del replay
        finally:
            leave()
    doc = {"env": env_info(sys.argv), "config": vars(args), "profile": out}
    print("wrote", save_json(doc, args.out, "model-profile"))
    return doc


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=POSITIVE_INT, default=4096)
    p.add_argument("--intermediate", type=POSITIVE_INT, default=14336)
    p.add_argument("--layers", type=POSITIVE_INT, default=4)
    p.add_argument("--heads", type=POSITIVE_INT, default=32)
    p.add_argument("--kv-heads", type=POSITIVE_INT, default=8)
    p.add_argument("--vocab", type=POSITIVE_INT, default=1024, help="embedding rows (unused by the timed stack)")
    p.add_argument("--batch", type=POSITIVE_INT, default=4)
    p.add_argument("--seq", type=POSITIVE_INT, default=2048)
    p.add_argument("--adapters", type=POSITIVE_INT, default=3, help="K")
    p.add_argument("--rank", type=POSITIVE_INT, default=16, help="r of every adapter")
    p.add_argument("--map-rank", type=POSITIVE_INT, default=16, help="m of the LoraMap rows")
    p.add_argument("--b-std", type=POSITIVE, default=0.02,
                   help="std of the adapters' random B (default 0.02, the base weights' own init: each adapter "
                        "then changes a projection's output by a few percent)")
    p.add_argument("--rounds", type=POSITIVE_INT, default=2)
    p.add_argument("--reps", type=POSITIVE_INT, default=12, help="about this many timed calls per cell")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--graph", action="store_true",
                   help="also time each forward replayed from a CUDA graph (GPU time without the host's)")
    p.add_argument("--tiny", action="store_true", help="a tiny float32 model on the CPU: checks the script")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--profile", action="store_true",
                   help="instead of timing: the forward's GPU time by kernel, eager and from a CUDA graph, for the "
                        "base and lorafuse sum (torch.profiler, --calls forwards each)")
    p.add_argument("--calls", type=POSITIVE_INT, default=3, help="forwards per profile (--profile)")
    p.add_argument("--plot", nargs="+", metavar="JSON", help="plot these result files (no run) into --png")
    p.add_argument("--png", default="bench/results/model.png")
    args = p.parse_args(argv)
    if args.plot:
        print("wrote", plot(args.plot, args.png))
        return {}
    if args.tiny:
        args.hidden, args.intermediate, args.layers, args.heads, args.kv_heads = 64, 128, 2, 4, 2
        args.batch, args.seq, args.rank, args.map_rank, args.rounds, args.reps = 2, 16, 4, 4, 1, 2
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        warm_up()
    pm, body, names = build(args, dtype, device)
    T = args.batch * args.seq
    torch.manual_seed(args.seed + 1)
    emb = torch.randn(args.batch, args.seq, args.hidden, device=device, dtype=dtype)
    emb_grad = emb.clone().requires_grad_(True)

    def fwd():
        with torch.no_grad():
            return body(inputs_embeds=emb, use_cache=False).last_hidden_state

    def step():
        emb_grad.grad = None
        for q in body.parameters():
            q.grad = None
        h = body(inputs_embeds=emb_grad, use_cache=False).last_hidden_state
        h.float().square().mean().backward()

    # Each variant: (enter, leave) around its timing; the model leaves every variant as a PeftModel.
    stack = contextlib.ExitStack()

    def base_setup():  # the frozen base model's own layers, peft's wrappers taken out for the timing
        return (lambda: (set_peft_trainable(pm, False), stack.enter_context(unwrapped(pm))), stack.close)

    def peft_setup(trainable, f32=False):
        def enter():
            set_peft_trainable(pm, trainable)
            if f32:
                cast_adapters(pm, torch.float32)

        return enter, (lambda: cast_adapters(pm, dtype)) if f32 else (lambda: None)

    def composed(method):
        kw = {"map_rank": args.map_rank} if method == "loramap" else {}
        return (lambda: lorafuse.compose(pm, method=method, adapter_names=names, **kw),
                lambda: lorafuse.decompose(pm))

    methods = ["sum", "concat", "loramap"]
    f32 = {"peft_f32": peft_setup(False, f32=True)} if dtype != torch.float32 else {}
    fwd_variants = {"base": base_setup(), "peft": peft_setup(False), **f32,
                    **{f"lorafuse_{m}": composed(m) for m in methods}}
    f32 = {"peft_f32": peft_setup(True, f32=True)} if dtype != torch.float32 else {}
    train_variants = {"base": base_setup(), "peft_frozen": peft_setup(False), "peft": peft_setup(True), **f32,
                      **{f"lorafuse_{m}": composed(m) for m in methods}}

    def run(kind, variants, fn):
        times = {k: [] for k in variants}
        graph_times = {k: [] for k in variants}
        info = {k: {} for k in times}
        for rnd in range(args.rounds):
            for name in round_order(list(times), rnd):
                enter, leave = variants[name]
                enter()
                try:
                    times[name].append(timer(fn, device, args.reps))
                    if args.graph and kind == "forward":
                        try:
                            replay = graphed(fn)
                            graph_times[name].append(timer(replay, device, args.reps))
                            del replay
                        except Exception as e:  # recorded, not fatal: the eager rows stand
                            info[name]["graph_error"] = f"{type(e).__name__}: {str(e)[:200]}"
                    if rnd == 0:
                        info[name]["peak_mb"] = peak_mb(fn, device)
                        info[name]["trainable_params"] = trainable_params(body)
                        if kind == "forward" and name in ("lorafuse_sum", "lorafuse_concat"):
                            info[name]["_out"] = fwd().float()
                finally:
                    leave()
        base = statistics.mean(times["base"])
        rows = []
        for name, ts in times.items():
            ms = statistics.median(ts)
            row = {"kind": kind, "variant": name, "ms": ms, "ms_rounds": ts, "ratio_to_base": ms / base,
                   "tokens_per_s": T / (ms / 1e3), **{k: v for k, v in info[name].items() if not k.startswith("_")}}
            if graph_times[name] and graph_times["base"]:
                row["graph_ms"] = statistics.median(graph_times[name])
                row["graph_ms_rounds"] = graph_times[name]
                row["graph_ratio_to_base"] = row["graph_ms"] / statistics.mean(graph_times["base"])
            rows.append(row)
        return rows, info

    if args.profile:
        return profile(args, {k: fwd_variants[k] for k in ("base", "lorafuse_sum")}, fwd, device, body=body)
    set_peft_trainable(pm, False)
    peft_out = fwd().float()
    # The reference: the same model and adapters in float32 (peft's path; casts there and back are exact).
    pm.float()
    with torch.no_grad():
        ref = body(inputs_embeds=emb.float(), use_cache=False).last_hidden_state.float()
    pm.to(dtype)

    def rel(a):
        return ((a - ref).norm() / ref.norm()).item()

    fwd_rows, fwd_info = run("forward", fwd_variants, fwd)
    for row in fwd_rows:
        out = fwd_info[row["variant"]].get("_out")
        if row["variant"] == "peft":
            row["rel_err_vs_fp32"] = rel(peft_out)
        if out is not None:  # sum and concat compute what peft does with all K adapters active
            row["rel_err_vs_fp32"] = rel(out)
            row["rel_err_vs_peft"] = ((out - peft_out).norm() / peft_out.norm()).item()
    train_rows, _ = run("train_step", train_variants, step)
    rows = fwd_rows + train_rows
    for row in rows:
        print(f"{row['kind']:>10} {row['variant']:>17}: {row['ms']:9.3f} ms  {row['ratio_to_base']:6.3f}x base  "
              f"{row['tokens_per_s'] / 1e3:9.1f} k tok/s  peak {row.get('peak_mb') or float('nan'):8.1f} MB"
              + (f"  graph {row['graph_ratio_to_base']:.3f}x" if "graph_ratio_to_base" in row else "")
              + (f"  err vs fp32 {row['rel_err_vs_fp32']:.1e}" if "rel_err_vs_fp32" in row else ""), flush=True)
    doc = {"env": env_info(sys.argv if argv is None else ["bench/bench_model.py", *argv]),
           "config": {k: getattr(args, k) for k in ("hidden", "intermediate", "layers", "heads", "kv_heads", "batch",
                                                    "seq", "adapters", "rank", "map_rank", "rounds", "reps")},
           "tokens": T, "dtype": str(dtype), "device": str(device), "rows": rows}
    path = save_json(doc, args.out, "model")
    print("wrote", path)
    return doc


if __name__ == "__main__":
    main()

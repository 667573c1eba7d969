"""Where the time of one routed layer call goes, per schedule, on a GPU.

    python bench/routed_profile.py [--d 4096 4096] [--T 8192] [--K 16 64] [--top-k 1] [--out DIR]

For each (T, K, top_k) and variant ("dense", "dense_big_tile", "grouped"; see VARIANTS): the eager
forward (do_bench median, L2 flushed), the same call replayed from a CUDA graph (no host launches:
the GPU's own time), the host time per call (a long loop of calls over a small input, so the GPU
never holds the host back), and the GPU time of every kernel of one call (torch.profiler, averaged
over several calls). Arrow router, adapters of rank 16, bf16. Writes routed-profile-<gpu>-<date>.json.
"""
import argparse
import contextlib
import functools
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from common import env_info, save_json  # noqa: E402
from bench_kernels import _graphed, host_us_per_call  # noqa: E402

from lorafuse.routing import arrow_prototypes, lora_linear_routed  # noqa: E402


# "dense_big_tile": the dense schedule with the routed shrink's partial kernel on 128 x 128 tiles
# (8 warps) instead of split_config's (tuned for the few columns of a plain shrink).
VARIANTS = ("dense", "dense_big_tile", "grouped")
BIG_TILE = {"BLOCK_T": 128, "BLOCK_K": 64, "BLOCK_R": 128, "SPLITS": 1, "num_warps": 8, "num_stages": 3}


@contextlib.contextmanager
def shrink_config(cfg):
    """Within the block, the routed shrink launches with cfg (None: its own choice)."""
    import importlib

    rk = importlib.import_module("lorafuse.kernels.routing")
    orig = rk.routed_shrink
    if cfg is not None:
        rk.routed_shrink = functools.partial(orig, config=cfg)
    try:
        yield
    finally:
        rk.routed_shrink = orig


def kernel_table(fn, calls=10):
    """{kernel name: GPU microseconds per call}, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    out = {}
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if t > 0:
            out[ev.key[:90]] = round(t / calls, 2)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=int, nargs=2, default=[4096, 4096], metavar=("D_IN", "D_OUT"))
    p.add_argument("--T", type=int, nargs="*", default=[8192])
    p.add_argument("--K", type=int, nargs="*", default=[16, 64])
    p.add_argument("--top-k", type=int, nargs="*", default=[1])
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args()
    from triton.testing import do_bench

    dev, dt = "cuda", torch.bfloat16
    d_in, d_out = args.d
    torch.manual_seed(0)
    W = torch.randn(d_out, d_in, device=dev, dtype=dt) / d_in ** 0.5
    rows = []
    for K in args.K:
        R = K * args.r
        a_cat = (torch.randn(R, d_in, device=dev) / d_in ** 0.5).to(dt)
        b_cat = (torch.randn(d_out, R, device=dev) * 0.1).to(dt)
        scale = torch.full((R,), 2.0, device=dev)
        ranks = [args.r] * K
        protos = arrow_prototypes(a_cat, b_cat, ranks, scale).to(dt)
        for T in args.T:
            x = torch.randn(T, d_in, device=dev, dtype=dt)
            small = x[:16].clone()
            for top_k in args.top_k:
                row = {"T": T, "K": K, "top_k": top_k, "d_in": d_in, "d_out": d_out, "r": args.r}
                with torch.no_grad():
                    base = lambda: F.linear(x, W)  # noqa: E731
                    row["base_ms"] = do_bench(base, warmup=50, rep=300, return_mode="median")
                    for variant in VARIANTS:
                        schedule = "grouped" if variant == "grouped" else "dense"

                        def f(inp, schedule=schedule, variant=variant):
                            with shrink_config(BIG_TILE if variant == "dense_big_tile" else None):
                                return lora_linear_routed(inp, W, None, a_cat, b_cat, scale, ranks, protos, "arrow",
                                                          top_k, schedule=schedule)
                        e = {"eager_ms": do_bench(lambda: f(x), warmup=50, rep=300, return_mode="median")}
                        g = _graphed(f, x)
                        e["graph_ms"] = do_bench(g, warmup=50, rep=300, return_mode="median")
                        e["host_us_T16"] = host_us_per_call(lambda: f(small))
                        e["kernels_us"] = kernel_table(lambda: f(x))
                        for k in ("eager_ms", "graph_ms"):
                            e[k.replace("_ms", "_ratio")] = e[k] / row["base_ms"]
                        row[variant] = e
                        del g
                rows.append(row)
                print(f"T={T} K={K} top_k={top_k} base={row['base_ms']:.4f} ms  " + "  ".join(
                    f"{s}: eager {row[s]['eager_ms']:.4f} ({row[s]['eager_ratio']:.2f}x) graph "
                    f"{row[s]['graph_ms']:.4f} ({row[s]['graph_ratio']:.2f}x) host {row[s]['host_us_T16']:.0f} us"
                    for s in VARIANTS), flush=True)
                for s in VARIANTS:
                    print(f"  {s} kernels (us/call):", "; ".join(f"{k} {v}" for k, v in row[s]["kernels_us"].items()))
    doc = {"env": env_info([os.path.relpath(__file__)] + sys.argv[1:]), "dtype": str(dt), "rows": rows}
    print("wrote", save_json(doc, args.out, "routed-profile"))


if __name__ == "__main__":
    main()

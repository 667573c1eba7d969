"""The routed shrink's launch shapes, and where an eager routed call spends its host time, on a GPU.

    python bench/routed_shrink_sweep.py [--T 2048 8192] [--K 4 16 64] [--out DIR]

Part 1 (GPU time, each call replayed from a CUDA graph so that host time does not show; do_bench
median with the L2 flushed, beside the base GEMM x W^T (4096 x 4096) of the same run for scale):
lorafuse.kernels.routing.routed_shrink alone (partial + finish kernels, top-1, Arrow logits) at
d_in = 4096, r = 16, bf16, with split_config's launch shape ("default") and the candidates in
CONFIGS; then the partial products alone on [a_cat; router] stacked into one tensor: the shrink's
one-operand partial kernel with the same shapes ("stacked_*") and cuBLAS (x @ stacked^T in bf16).
Part 2 (host time, T = 16): microseconds per eager call of
the dense routed layer, its two launchers alone, lorafuse.lora_linear and F.linear (a long loop over
a small input: the GPU never holds the host back), and the routed call's top Python functions by own
time (cProfile). Writes routed-shrink-sweep-<gpu>-<date>.json.
"""
import argparse
import cProfile
import io
import os
import pstats
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from common import env_info, graphed, save_json, warm_up  # noqa: E402
from bench_kernels import host_us_per_call  # noqa: E402

import lorafuse  # noqa: E402
from lorafuse.kernels import lora_gemm  # noqa: E402
from lorafuse.kernels.routing import routed_shrink  # noqa: E402
from lorafuse.kernels.shrink import _rows_partial, split_config  # noqa: E402
from lorafuse.routing import _block_ids, arrow_prototypes, lora_linear_routed  # noqa: E402

CONFIGS = {
    "t64_r128_k64_w4_s4": {"BLOCK_T": 64, "BLOCK_R": 128, "BLOCK_K": 64, "SPLITS": 1, "num_warps": 4, "num_stages": 4},
    "t128_r128_k64_w8_s3": {"BLOCK_T": 128, "BLOCK_R": 128, "BLOCK_K": 64, "SPLITS": 1, "num_warps": 8,
                            "num_stages": 3},
    "t64_r256_k64_w8_s3": {"BLOCK_T": 64, "BLOCK_R": 256, "BLOCK_K": 64, "SPLITS": 1, "num_warps": 8, "num_stages": 3},
    "t128_r256_k64_w8_s3": {"BLOCK_T": 128, "BLOCK_R": 256, "BLOCK_K": 64, "SPLITS": 1, "num_warps": 8,
                            "num_stages": 3},
    "t64_r64_k128_w4_s4": {"BLOCK_T": 64, "BLOCK_R": 64, "BLOCK_K": 128, "SPLITS": 1, "num_warps": 4, "num_stages": 4},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, nargs="*", default=[2048, 8192])
    p.add_argument("--K", type=int, nargs="*", default=[4, 16, 64])
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--d", type=int, default=4096)
    p.add_argument("--parts", nargs="*", default=["configs", "host"], choices=["configs", "host"])
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args()
    from triton.testing import do_bench

    def bench(f):
        f()
        return do_bench(graphed(f), warmup=25, rep=200, return_mode="median")

    def adapters(K):
        """K adapters of rank r: (ranks, a_cat, b_cat, scale, Arrow prototypes, block ids)."""
        R = K * args.r
        ranks = [args.r] * K
        a_cat = (torch.randn(R, d, device=dev) / d ** 0.5).to(dt)
        b_cat = (torch.randn(d, R, device=dev) * 0.1).to(dt)
        scale = torch.full((R,), 2.0, device=dev)
        protos = arrow_prototypes(a_cat, b_cat, ranks, scale).to(dt)
        return ranks, a_cat, b_cat, scale, protos, _block_ids(ranks, dev)

    dev, dt, d = "cuda", torch.bfloat16, args.d
    torch.manual_seed(0)
    W = torch.randn(d, d, device=dev, dtype=dt) / d ** 0.5
    warm_up()
    sweep = []
    for K in args.K if "configs" in args.parts else []:
        ranks, a_cat, b_cat, scale, protos, block = adapters(K)
        R = a_cat.shape[0]
        for T in args.T:
            x = torch.randn(T, d, device=dev, dtype=dt)
            row = {"T": T, "K": K, "R": R, "base_ms": bench(lambda: F.linear(x, W)),
                   "default_config": split_config(T, d, R + K, dt, x.device)}
            ref = routed_shrink(x, a_cat, protos, scale, block, top_k=1)[0].float()
            for name, cfg in [("default", None)] + list(CONFIGS.items()):
                try:
                    out = routed_shrink(x, a_cat, protos, scale, block, top_k=1, config=cfg)[0].float()
                    err = ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()
                    ms = bench(lambda: routed_shrink(x, a_cat, protos, scale, block, top_k=1, config=cfg, check=False))
                    row[name] = {"ms": ms, "ratio_to_base": ms / row["base_ms"], "rel_err_vs_default": err}
                except Exception as e:  # noqa: BLE001 - a config that does not fit is reported
                    row[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
            stacked = torch.cat([a_cat, protos], 0)
            cols = R + K
            for name, cfg in [("default", split_config(T, d, cols, dt, x.device))] + list(CONFIGS.items()):
                try:
                    row["stacked_" + name] = {"ms": bench(lambda: _rows_partial(x, stacked.t(), T, d, cols, cfg))}
                except Exception as e:  # noqa: BLE001
                    row["stacked_" + name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
            row["cublas"] = {"ms": bench(lambda: torch.mm(x, stacked.t()))}
            sweep.append(row)
            print(f"T={T} K={K} base {row['base_ms'] * 1e3:.1f} us | " + " | ".join(
                f"{n} {row[n]['ms'] * 1e3:.1f}" if "ms" in row[n] else f"{n} ERR"
                for n in ["default"] + list(CONFIGS)), flush=True)
            print("   stacked partial only: " + " | ".join(
                f"{n} {row[n]['ms'] * 1e3:.1f}" if "ms" in row[n] else f"{n} ERR"
                for n in ["stacked_default"] + ["stacked_" + c for c in CONFIGS] + ["cublas"]), flush=True)

    # Part 2: host time at T = 16, K = 4.
    T = 16
    ranks, a_cat, b_cat, scale, protos, block = adapters(4)
    x = torch.randn(T, d, device=dev, dtype=dt)
    sp = routed_shrink(x, a_cat, protos, scale, block, top_k=1)[0]
    calls = {
        "routed_dense": lambda: lora_linear_routed(x, W, None, a_cat, b_cat, scale, ranks, protos, "arrow", 1,
                                                   schedule="dense"),
        "routed_shrink": lambda: routed_shrink(x, a_cat, protos, scale, block, top_k=1, check=False),
        "lora_gemm": lambda: lora_gemm(x, W.t(), sp, b_cat.t()),
        "lora_linear": lambda: lorafuse.lora_linear(x, W, None, a_cat, b_cat, scale),
        "F.linear": lambda: F.linear(x, W),
    }
    host = {}
    if "host" not in args.parts:
        calls = {}
    with torch.no_grad():
        for name, f in calls.items():
            host[name] = host_us_per_call(f, n=500)
        prof = cProfile.Profile()
        if calls:
            prof.enable()
            for _ in range(500):
                calls["routed_dense"]()
            prof.disable()
            torch.cuda.synchronize()
    buf = io.StringIO()
    if calls:
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
    print("host us per call (T = 16):", {k: round(v, 1) for k, v in host.items()})
    print(buf.getvalue())
    doc = {"env": env_info([os.path.relpath(__file__)] + sys.argv[1:]), "dtype": str(dt), "d": d, "r": args.r,
           "configs": CONFIGS, "sweep": sweep, "host_us_T16": host, "host_profile": buf.getvalue()}
    print("wrote", save_json(doc, args.out, "routed-shrink-sweep"))


if __name__ == "__main__":
    main()

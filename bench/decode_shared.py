"""The decode layer's shrink: computed in every column block, or once per launch and shared.

    python bench/decode_shared.py [--T 1 16 32 64] [--dims 4096x4096 4096x14336 14336x4096] [--R 48]
                                  [--m 16] [--splits 8 16 32] [--rounds 3]

lora_gemm_fused recomputes x a_cat^T (and the mapping) in each of its column blocks: R / BLOCK_N of
a_cat per column of W read again, 1.5x the W traffic at R = 48 with 32-wide column blocks. With
`shared=True` the shrink runs once per launch as work items the column blocks wait for. For each
shape, summation and LoraMap (R = 48, m = 16, bf16): the base layer (F.linear), the recomputing and
the sharing layer (each with its table config; the default split count and each of --splits), and
which of the two lora_gemm_fused picks by default, all replayed from CUDA graphs (kernel
time without host time) with the L2 flushed before every call; the variants interleaved in
--rounds rounds, each ratio against the base timed in the same round. Writes
decode-shared-<gpu>-<date>.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(__file__))
from common import env_info, layer_inputs, graphed, save_json, warm_up  # noqa: E402

from lorafuse.kernels import lora_gemm_fused  # noqa: E402
from lorafuse.kernels.lora_gemm import decode_shares_shrink, gemm_config  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, nargs="+", default=[1, 16, 32, 64])
    p.add_argument("--dims", nargs="+", default=["4096x4096", "4096x14336", "14336x4096"])
    p.add_argument("--R", type=int, default=48)
    p.add_argument("--m", type=int, default=16)
    p.add_argument("--splits", type=int, nargs="*", default=[])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    assert torch.cuda.is_available(), "decode_shared.py needs a GPU"
    dt, dev = torch.bfloat16, "cuda"
    bench = lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median")  # noqa: E731
    warm_up()
    rows = []
    for T in args.T:
        for dims in args.dims:
            d_in, d_out = map(int, dims.split("x"))
            R, m = args.R, args.m
            x, w, a, b, scale, am, bm = layer_inputs(T, d_in, d_out, R, m, dt, dev)
            for method, maps in (("sum", (None, None)), ("loramap", (am, bm))):
                variants = {"base": graphed(lambda: F.linear(x, w))}
                ref = lora_gemm_fused(x, w, None, a, b, scale, *maps, shared=False)[0]
                variants["recompute"] = graphed(lambda: lora_gemm_fused(x, w, None, a, b, scale, *maps, shared=False))
                for sp in [None] + args.splits:
                    name = "shared" if sp is None else f"shared_{sp}"
                    fn = lambda sp=sp: lora_gemm_fused(x, w, None, a, b, scale, *maps, shared=True, splits=sp)  # noqa: E731
                    err = ((fn()[0].float() - ref.float()).norm() / ref.float().norm()).item()
                    assert err < 1e-2, f"{name}: relative error {err} against the recomputing layer"
                    variants[name] = graphed(fn)
                runs = {k: [] for k in variants}
                for _ in range(args.rounds):
                    for k, f in variants.items():
                        runs[k].append(bench(f))
                ratios = {k: statistics.fmean(v / b for v, b in zip(runs[k], runs["base"])) for k in runs}
                cfg = gemm_config(T, d_out, d_in, fused=True, R=R, dtype=dt)
                default = decode_shares_shrink(T, -(-d_out // cfg.kwargs["BLOCK_N"]), d_in, d_out)
                row = {"T": T, "d_in": d_in, "d_out": d_out, "R": R, "m": m if method == "loramap" else None,
                       "method": method, "ms_runs": runs, "ratio": ratios,
                       "default": "shared" if default else "recompute"}
                rows.append(row)
                print(f"T={T:>3} {dims:>10} {method:>7}: base {statistics.fmean(runs['base']) * 1e3:6.1f} us | "
                      + " | ".join(f"{k} {ratios[k]:.2f}x" for k in runs if k != "base")
                      + f" | default: {row['default']}", flush=True)
    doc = {"env": env_info(sys.argv), "rounds": args.rounds, "rows": rows,
           "note": "CUDA-graph replays, L2 flushed before each; ratio: mean over rounds of variant / base "
                   "of the same round"}
    print("wrote", save_json(doc, args.out, "decode-shared"))


if __name__ == "__main__":
    main()

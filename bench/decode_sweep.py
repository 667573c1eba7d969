"""Launch configurations of the one-kernel decode layer (lora_gemm_fused), with and without LoraMap.

    python bench/decode_sweep.py [--T 16] [--dims 4096x4096 4096x14336 14336x4096] [--R 48] [--m 16]

For each shape: cuBLAS (the base layer alone), the layer through lorafuse.lora_linear as it runs
today (its table config), and lora_gemm_fused under every candidate config, summation and LoraMap.
Medians of do_bench with the L2 flushed. Writes decode-sweep-<gpu>-<date>.json.
"""
from __future__ import annotations

import argparse
import importlib
import itertools
import os
import sys

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(__file__))
from common import env_info, layer_inputs, save_json  # noqa: E402

import lorafuse  # noqa: E402
from lorafuse.kernels import lora_gemm_fused  # noqa: E402

lg = importlib.import_module("lorafuse.kernels.lora_gemm")


def candidates(R: int, T: int):
    """Row blocks up to T (16 at most for T <= 16), every column block, the K steps and stage
    counts that fit in shared memory."""
    br = triton.next_power_of_2(R)
    bms = [16] if T <= 16 else [bm for bm in (16, 32, 64) if bm < 2 * T]
    out = []
    for bm, bn, bk, st in itertools.product(bms, (32, 64, 128), (64, 128, 256), (2, 3, 4)):
        smem = st * (bm * bk + bk * bn + bk * br) * 2
        if smem > 200 * 1024 or (bk == 64 and st == 2) or (bm > 16 and (bk != 128 or st == 2)):
            continue
        out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                                 num_warps=4, num_stages=st))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, nargs="+", default=[16])
    p.add_argument("--dims", nargs="+", default=["4096x4096", "4096x14336", "14336x4096"])
    p.add_argument("--R", type=int, default=48)
    p.add_argument("--m", type=int, default=16)
    p.add_argument("--ops-only", action="store_true", help="only the layer with its table config")
    p.add_argument("--prefix", default="decode-sweep")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    assert torch.cuda.is_available(), "decode_sweep.py needs a GPU"
    dt, dev = torch.bfloat16, "cuda"
    bench = lambda fn: do_bench(fn, warmup=10, rep=40, return_mode="median")  # noqa: E731
    rows = []
    print("map precision:", lg.MAP_PRECISION)
    for T in args.T:
        for dims in args.dims:
            d_in, d_out = map(int, dims.split("x"))
            R, m = args.R, args.m
            x, w, a, b, scale, am, bm = layer_inputs(T, d_in, d_out, R, m, dt, dev)
            base = bench(lambda: F.linear(x, w))
            op_sum = bench(lambda: lorafuse.lora_linear(x, w, None, a, b, scale))
            op_map = bench(lambda: lorafuse.lora_linear(x, w, None, a, b, scale, am, bm))
            row = {"T": T, "d_in": d_in, "d_out": d_out, "R": R, "m": m, "base_ms": base,
                   "op_sum_ms": op_sum, "op_map_ms": op_map, "configs": []}
            print(f"T={T} {dims}: base {base:.4f} | op sum {op_sum:.4f} ({op_sum / base:.2f}x) | "
                  f"op map {op_map:.4f} ({op_map / base:.2f}x)", flush=True)
            for cfg in ([] if args.ops_only else candidates(R, T)):
                times = {}
                for name, maps in (("sum", (None, None)), ("map", (am, bm))):
                    try:
                        # shared=False: the recomputing layer, as in the sweeps before the shared shrink
                        times[name] = bench(lambda: lora_gemm_fused(x, w, None, a, b, scale, *maps, config=cfg,
                                                                    shared=False))
                    except Exception as e:  # out of resources for this config
                        times[name] = None
                        times[name + "_error"] = type(e).__name__
                desc = dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
                row["configs"].append({**desc, **{k + ("_ms" if not k.endswith("error") else ""): v
                                                  for k, v in times.items()}})
                fmt = lambda t: "  fail " if t is None else f"{t:.4f} ({t / base:.2f}x)"  # noqa: E731
                kw = cfg.kwargs
                print(f"  {kw['BLOCK_M']:>3} {kw['BLOCK_N']:>3} {kw['BLOCK_K']:>3} w{cfg.num_warps} s{cfg.num_stages}:"
                      f" sum {fmt(times['sum'])} map {fmt(times['map'])}", flush=True)
            ok = [c for c in row["configs"] if c.get("map_ms")]
            if ok:
                best_s = min(ok, key=lambda c: c["sum_ms"])
                best_m = min(ok, key=lambda c: c["map_ms"])
                print(f"  best sum {best_s['sum_ms'] / base:.2f}x {best_s} | best map "
                      f"{best_m['map_ms'] / base:.2f}x {best_m}", flush=True)
            rows.append(row)
    doc = {"env": env_info(sys.argv), "map_precision": lg.MAP_PRECISION, "rows": rows}
    print("wrote", save_json(doc, args.out, args.prefix))


if __name__ == "__main__":
    main()

"""The forward shrink (x -> S') under launch configs, against x's byte floor.

    python bench/shrink_sweep.py [--T 2048 8192 16384] [--d 4096 14336] [--R 48 128] [--out bench/results]

Each config runs shrink(x, a_cat, scale, a_map, b_map, config=...) replayed from a CUDA graph, with
the L2 flushed before every replay (median of do_bench): GPU time only. (Result files before
2026-12-02 timed the calls directly; where shrink()'s own host time exceeded the flush, they
measured the host.) Configs: the pointer kernel and its finishing kernel (split_config); on Hopper
the one-launch copy-engine kernel with its table's config (tma_shrink_config, the default from
kernels.shrink.TMA_MIN_T rows) and over row-block heights, column steps, warps, pipeline depths
and K splits (programs per SM), within 220 KB of shared memory; cuBLAS's x @ a_cat^T alone as a
peer. GB/s counts x's bytes only (a_cat, the partials and S' are small beside it); the floor is
x's bytes at --hbm TB/s. Writes shrink-sweep-<gpu>-<date>.json.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(__file__))
from common import env_info, graphed, save_json, warm_up  # noqa: E402

from lorafuse.kernels import shrink  # noqa: E402
from lorafuse.kernels.shrink import split_config, tma_shrink_config  # noqa: E402
from lorafuse.kernels.lora_gemm import _tma_available  # noqa: E402
from lorafuse.kernels.utils import num_sms  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, nargs="+", default=[2048, 8192, 16384])
    p.add_argument("--d", type=int, nargs="+", default=[4096, 14336])
    p.add_argument("--R", type=int, nargs="+", default=[48, 128])
    p.add_argument("--m", type=int, default=16)
    p.add_argument("--hbm", type=float, default=None, help="HBM TB/s for the floor (default: 4.8 on an H200, "
                   "else 3.35)")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    assert torch.cuda.is_available(), "shrink_sweep.py needs a GPU"
    dt, dev = torch.bfloat16, "cuda"
    sms = num_sms(torch.device(dev))
    hbm = args.hbm or (4.8 if "H200" in torch.cuda.get_device_name() else 3.35)
    warm_up()

    def bench(f):
        f()
        return do_bench(graphed(f), warmup=25, rep=100, return_mode="median")

    rows = []
    for d in args.d:
        for T in args.T:
            x = torch.randn(T, d, device=dev, dtype=dt)
            for R in args.R:
                a = torch.randn(R, d, device=dev, dtype=dt) / d ** 0.5
                scale = torch.ones(R, device=dev)
                am = torch.randn(args.m, R, device=dev) / R ** 0.5
                bm = torch.randn(R, args.m, device=dev) / args.m ** 0.5
                ref = shrink(x, a, scale, am, bm, config=split_config(T, d, R, dt, x.device))[0].float()
                configs = {"pointer": split_config(T, d, R, dt, x.device)}
                if _tma_available(x.device) and R <= 128:
                    base = tma_shrink_config(T, d, R, sms)
                    configs["tma_default"] = base
                    br = base["BLOCK_R"]
                    for bt, w in ((64, 4), (128, 4), (128, 8)):
                        for bk in (64, 128, 256):
                            for st in (3, 4, 6):
                                if (bt + br) * bk * 2 * st > 220 * 1024:
                                    continue
                                blocks = -(-T // bt)
                                for per_sm in (0.5, 1, 2):
                                    splits = max(1, min(round(per_sm * sms / blocks), d // (2 * bk)))
                                    name = f"tma_t{bt}_k{bk}_w{w}_s{st}_x{splits}"
                                    configs[name] = dict(base, BLOCK_T=bt, BLOCK_K=bk, num_warps=w, num_stages=st,
                                                         SPLITS=splits)
                res = {}
                for name, cfg in configs.items():
                    try:
                        out = shrink(x, a, scale, am, bm, config=cfg)[0].float()
                        err = ((out - ref).norm() / ref.norm()).item()
                        ms = bench(lambda cfg=cfg: shrink(x, a, scale, am, bm, config=cfg))
                        res[name] = {"ms": ms, "gbps": T * d * 2 / ms / 1e6, "rel_err_vs_pointer": err,
                                     "splits": cfg["SPLITS"]}
                    except Exception as e:  # a config the GPU cannot run (shared memory): record it
                        res[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
                ok = {k: v for k, v in res.items() if "ms" in v}
                cublas_ms = bench(lambda: torch.mm(x, a.t()))
                best = min(ok, key=lambda k: ok[k]["ms"])
                default_tma = "tma_default"
                rows.append({"T": T, "d_in": d, "R": R, "floor_ms": T * d * 2 / (hbm * 1e12) * 1e3, "configs": res,
                             "best": best, "cublas_xa_ms": cublas_ms, "timing": "cuda graph replay, L2 flushed"})
                print(f"T={T} d={d} R={R}: pointer {ok['pointer']['ms']:.4f} ms | tma default "
                      f"{ok.get(default_tma, {}).get('ms', float('nan')):.4f} | best {best} {ok[best]['ms']:.4f} ms "
                      f"({ok[best]['gbps']:.0f} GB/s, err {ok[best]['rel_err_vs_pointer']:.1e}) | cuBLAS x a^T "
                      f"{cublas_ms:.4f} | floor {T * d * 2 / (hbm * 1e12) * 1e3:.4f} ms", flush=True)
                top = sorted(ok, key=lambda k: ok[k]["ms"])[:6]
                print("   top: " + ", ".join(f"{k} {ok[k]['ms']:.4f}" for k in top), flush=True)
    print("wrote", save_json({"env": env_info(sys.argv), "rows": rows}, args.out, "shrink-sweep"))


if __name__ == "__main__":
    main()

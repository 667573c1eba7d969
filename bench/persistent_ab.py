"""The persistent layer against the two-launch path and the GEMMs they build on, in interleaved rounds.

    python bench/persistent_ab.py [--rounds 6] [--R 48] [--out bench/results]

Clock and power drift on the H100 moves a single do_bench median by several percent between
measurements of one run; here every variant of a shape is timed once per round, the order reversed
every other round, and the table gives each variant's median over rounds. Variants: cuBLAS (F.linear, with and
without a bias); the op (lorafuse.lora_linear, with and without a bias) through the persistent layer
and through the two-launch path (also with the pointer shrink kernel); the Triton Hopper GEMM
without low-rank work, with its tuned loop (flattened, warp-specialised where the weight is W^T)
and with a plain loop; lora_gemm with the expand (on a ready S'); the shrink alone;
lora_gemm_persistent with the tuned loop and with a plain loop, with a bias, and with one shrink
item per row band or about one per SM instead of its default split. L2 flushed before each call.
Writes persistent-ab-<gpu>-<date>.json.
"""
from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(__file__))
from common import env_info, round_order, save_json  # noqa: E402

import lorafuse  # noqa: E402
import lorafuse.ops as ops  # noqa: E402
from lorafuse.kernels import lora_gemm, lora_gemm_persistent, shrink  # noqa: E402
from lorafuse.kernels.lora_gemm import _cfg, tma_config  # noqa: E402
from lorafuse.kernels.utils import num_sms  # noqa: E402

shrink_module = importlib.import_module("lorafuse.kernels.shrink")

SHAPES = [(8192, 4096, 4096), (8192, 4096, 14336), (8192, 14336, 4096), (2048, 4096, 4096), (2048, 4096, 14336),
          (2048, 14336, 4096)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=6, help="an even count (the order reverses every other round)")
    p.add_argument("--R", type=int, default=48)
    p.add_argument("--m", type=int, default=16, help="LoraMap rank (0: no mapping)")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    assert torch.cuda.is_available(), "persistent_ab.py needs a GPU"
    dt, dev, R = torch.bfloat16, "cuda", args.R
    rows = []
    for T, d_in, d_out in SHAPES:
        x = torch.randn(T, d_in, device=dev, dtype=dt)
        w = torch.randn(d_out, d_in, device=dev, dtype=dt) / d_in ** 0.5
        a = torch.randn(R, d_in, device=dev, dtype=dt) / d_in ** 0.5
        b = torch.randn(d_out, R, device=dev, dtype=dt) / R ** 0.5
        scale = torch.ones(R, device=dev, dtype=torch.float32)
        am = torch.randn(args.m, R, device=dev) / R ** 0.5 if args.m else None
        bm = torch.randn(R, args.m, device=dev) / args.m ** 0.5 if args.m else None
        sp = shrink(x, a, scale, am, bm)[0]
        plain = _cfg(128, 256, 64, 8, 3, FLATTEN=False, WARP_SPECIALIZE=False)
        bands = -(-T // 128)
        item_per_sm = max(1, min(-(-num_sms(x.device) // bands), d_in // 256))  # ~one shrink item per SM
        bias = torch.randn(d_out, device=dev, dtype=dt)

        def op(persistent, with_bias=True):
            old = ops.PERSISTENT
            ops.PERSISTENT = persistent
            try:
                return lorafuse.lora_linear(x, w, bias if with_bias else None, a, b, scale, am, bm)
            finally:
                ops.PERSISTENT = old

        def pointer_shrink(fn):
            old = shrink_module.SHRINK_TMA
            shrink_module.SHRINK_TMA = False
            try:
                return fn()
            finally:
                shrink_module.SHRINK_TMA = old

        variants = {
            "cublas": lambda: F.linear(x, w),
            "cublas_bias": lambda: F.linear(x, w, bias),
            "op_persistent": lambda: op(True),
            "op_two_launch": lambda: op(False),
            "op_two_launch_pointer_shrink": lambda: pointer_shrink(lambda: op(False)),
            "op_persistent_no_bias": lambda: op(True, False),
            "op_two_launch_no_bias": lambda: op(False, False),
            "persistent_bias": lambda: lora_gemm_persistent(x, w, bias, a, b, scale, am, bm),
            "gemm_tuned": lambda: lora_gemm(x, w.t(), impl="tma", config=tma_config(T, d_out, d_in)),
            "gemm_plain_loop": lambda: lora_gemm(x, w.t(), impl="tma", config=plain),
            "lora_gemm": lambda: lora_gemm(x, w.t(), sp, b.t()),
            "shrink": lambda: shrink(x, a, scale, am, bm),
            "persistent": lambda: lora_gemm_persistent(x, w, None, a, b, scale, am, bm),
            "persistent_plain_loop": lambda: lora_gemm_persistent(x, w, None, a, b, scale, am, bm, config=plain),
            "persistent_one_item_per_band": lambda: lora_gemm_persistent(x, w, None, a, b, scale, am, bm, splits=1),
            "persistent_item_per_sm": lambda: lora_gemm_persistent(x, w, None, a, b, scale, am, bm,
                                                                   splits=item_per_sm),
        }
        times = {k: [] for k in variants}
        for fn in variants.values():
            fn()
        torch.cuda.synchronize()
        for i in range(args.rounds):
            for k in round_order(list(variants), i):
                times[k].append(do_bench(variants[k], warmup=10, rep=50, return_mode="median"))
        med = {k: statistics.median(v) for k, v in times.items()}
        base = med["cublas"]
        row = {"T": T, "d_in": d_in, "d_out": d_out, "R": R, "m": args.m, "rounds": times,
               "median_ms": med, "ratio": {k: v / base for k, v in med.items()},
               "two_launch_ratio": (med["shrink"] + med["lora_gemm"]) / base}
        rows.append(row)
        print(f"T={T} {d_in}x{d_out} R={R}: " + " | ".join(f"{k} {v:.4f} ({v / base:.3f}x)" for k, v in med.items())
              + f" | shrink+lora_gemm {row['two_launch_ratio']:.3f}x", flush=True)
    print("wrote", save_json({"env": env_info(sys.argv), "rows": rows}, args.out, "persistent-ab"))


if __name__ == "__main__":
    main()

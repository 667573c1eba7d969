"""Where a layer's forward time goes, kernel by kernel, across total ranks R.

    python bench/kernel_split.py [--T 8192] [--dims 4096x14336] [--R 24 48 192] [--out bench/results]

For each R: the base GEMM (cuBLAS), the shrink alone (x -> S', scale applied), lora_gemm alone (the
GEMM with the expand as extra K-steps, on a ready S'), lora_gemm with R = 0 (the Triton GEMM without
the tail), the persistent layer (one launch, the shrink as its first phase; Hopper, where it runs),
and the whole op through each of the two paths (ops.PERSISTENT); medians of do_bench with the L2 flushed. Writes
kernel-split-<gpu>-<date>.json.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(__file__))
from common import env_info, save_json  # noqa: E402

import lorafuse  # noqa: E402
import lorafuse.ops as ops  # noqa: E402
from lorafuse.kernels import lora_gemm, lora_gemm_persistent, shrink  # noqa: E402
from lorafuse.kernels.lora_gemm import persistent_ok  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, nargs="+", default=[8192])
    p.add_argument("--dims", nargs="+", default=["4096x14336"])
    p.add_argument("--R", type=int, nargs="+", default=[24, 48, 192])
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    assert torch.cuda.is_available(), "kernel_split.py needs a GPU"
    dt, dev = torch.bfloat16, "cuda"
    rows = []
    for T in args.T:
        for dims in args.dims:
            d_in, d_out = map(int, dims.split("x"))
            x = torch.randn(T, d_in, device=dev, dtype=dt)
            w = torch.randn(d_out, d_in, device=dev, dtype=dt) / d_in ** 0.5
            base = do_bench(lambda: F.linear(x, w), warmup=25, rep=100, return_mode="median")
            plain = do_bench(lambda: lora_gemm(x, w.t()), warmup=25, rep=100, return_mode="median")
            for R in args.R:
                a = torch.randn(R, d_in, device=dev, dtype=dt) / d_in ** 0.5
                b = torch.randn(d_out, R, device=dev, dtype=dt) / R ** 0.5
                scale = torch.ones(R, device=dev, dtype=torch.float32)
                s = shrink(x, a, scale)[0]
                t_shrink = do_bench(lambda: shrink(x, a, scale), warmup=25, rep=100, return_mode="median")
                t_gemm = do_bench(lambda: lora_gemm(x, w.t(), s, b.t()), warmup=25, rep=100, return_mode="median")
                op = lambda: lorafuse.lora_linear(x, w, None, a, b, scale)  # noqa: E731
                default = ops.PERSISTENT
                ops.PERSISTENT = False
                t_op2 = do_bench(op, warmup=25, rep=100, return_mode="median")
                ops.PERSISTENT = True
                t_op = do_bench(op, warmup=25, rep=100, return_mode="median")
                ops.PERSISTENT = default
                t_pers = None
                if persistent_ok(x, w, a):
                    t_pers = do_bench(lambda: lora_gemm_persistent(x, w, None, a, b, scale), warmup=25, rep=100,
                                      return_mode="median")
                row = {"T": T, "d_in": d_in, "d_out": d_out, "R": R, "base_ms": base, "gemm_r0_ms": plain,
                       "shrink_ms": t_shrink, "lora_gemm_ms": t_gemm, "persistent_ms": t_pers,
                       "op_persistent_ms": t_op, "op_two_launch_ms": t_op2,
                       "op_persistent_ratio": t_op / base, "op_two_launch_ratio": t_op2 / base,
                       "kernels_ratio": (t_shrink + t_gemm) / base,
                       "persistent_ratio": t_pers / base if t_pers else None}
                rows.append(row)
                pers = f"{t_pers:.4f} = {t_pers / base:.3f}x" if t_pers else "n/a"
                print(f"T={T} {dims} R={R}: base {base:.4f} | triton GEMM R=0 {plain:.4f} | shrink {t_shrink:.4f}"
                      f" + lora_gemm {t_gemm:.4f} = {(t_shrink + t_gemm) / base:.3f}x | persistent {pers} | op "
                      f"through it {t_op / base:.3f}x, through two launches {t_op2 / base:.3f}x", flush=True)
    print("wrote", save_json({"env": env_info(sys.argv), "rows": rows}, args.out, "kernel-split"))


if __name__ == "__main__":
    main()

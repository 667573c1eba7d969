"""The TMA GEMM's low-rank tail loop software-pipelined (the default) or not: lora_gemm alone
against cuBLAS at a few ranks.

    python bench/tail_loop_ab.py [--T 2048 8192] [--R 16 48 128] [--rounds 4] [--out bench/results]

For each shape (T, d_in, d_out), bf16, every variant replayed from a CUDA graph (L2 flushed before
each replay by do_bench), once per round, the order reversed every other round: "cublas" (F.linear),
and for each R "pipe" (the tail's loop as the compiler pipelines it) and "flat" (TAIL_PIPE=False:
`tl.range(..., num_stages=1)`). Medians over rounds, ratios to cublas; both outputs checked against
float32. Writes tail-loop-ab-<gpu>-<date>.json.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.dirname(__file__))
from common import env_info, graph_rounds, save_json, warm_up  # noqa: E402

from lorafuse.kernels.shrink import alloc_rows  # noqa: E402

lg = importlib.import_module("lorafuse.kernels.lora_gemm")  # the package exports a function of that name


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--R", type=int, nargs="+", default=[16, 48, 128])
    p.add_argument("--shapes", nargs="+", default=["4096x4096", "4096x14336"], help="d_in x d_out")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    assert torch.cuda.is_available(), "tail_loop_ab.py needs a GPU"
    warm_up()
    rows = []
    for T in args.T:
        for shape in args.shapes:
            d_in, d_out = (int(v) for v in shape.split("x"))
            torch.manual_seed(0)
            x = torch.randn(T, d_in, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(d_out, d_in, device="cuda", dtype=torch.bfloat16) / d_in ** 0.5
            base_cfg = lg.tma_config(T, d_out, d_in)
            fns = {"cublas": lambda: F.linear(x, w)}
            errs = {}
            for R in args.R:
                s = alloc_rows(T, R, x.dtype, x.device)
                s.copy_(torch.randn(T, R, device="cuda"))
                b = alloc_rows(d_out, R, x.dtype, x.device)
                b.copy_(torch.randn(d_out, R, device="cuda") / R ** 0.5)
                ref = x.float() @ w.float().t() + s.float() @ b.float().t()
                for name, pipe in (("pipe", True), ("flat", False)):
                    cfg = triton.Config(dict(base_cfg.kwargs, TAIL_PIPE=pipe), num_warps=base_cfg.num_warps,
                                        num_stages=base_cfg.num_stages)
                    fn = (lambda s=s, b=b, cfg=cfg: lg.lora_gemm(x, w.t(), s, b.t(), config=cfg, check=False))
                    try:
                        out = fn().float()
                    except Exception as ex:  # a variant that does not compile is recorded
                        errs[f"{name}_r{R}"] = f"{type(ex).__name__}: {str(ex)[:200]}"
                        continue
                    errs[f"{name}_r{R}"] = ((out - ref).abs().max() / ref.abs().max()).item()
                    fns[f"{name}_r{R}"] = fn
            med, times = graph_rounds(fns, args.rounds)
            line = f"T={T} {d_in}x{d_out}: cublas {med['cublas'] * 1e3:.1f} us"
            for R in args.R:
                line += " | R=%d" % R + "".join(
                    f" {n} {med[f'{n}_r{R}'] / med['cublas']:.3f}x" for n in ("pipe", "flat") if f"{n}_r{R}" in med)
            print(line, "errors:", {k: (round(v, 5) if isinstance(v, float) else v) for k, v in errs.items()},
                  flush=True)
            rows.append({"T": T, "d_in": d_in, "d_out": d_out, "ms": med, "ms_rounds": times, "err": errs,
                         "ratio_to_cublas": {k: v / med["cublas"] for k, v in med.items()}})
            save_json({"env": env_info(sys.argv), "rows": rows}, args.out, "tail-loop-ab")
    print("wrote", save_json({"env": env_info(sys.argv), "rows": rows}, args.out, "tail-loop-ab"))


if __name__ == "__main__":
    main()

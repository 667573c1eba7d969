"""The low-rank tail's loop form through lorafuse.lora_linear: software-pipelined at every rank
(TAIL_PIPE_MIN_STEPS = 1, as before) or only from two steps (the default, 2), from CUDA graphs.

    python bench/tail_steps_ab.py [--T 1 4 16 32 64] [--shapes 14336x4096 4096x4096] [--R 48] [--m 16]
                                  [--rounds 4] [--out bench/results]

Few rows run the one-launch decode layer (its tail loops only where the shrink is shared by the
column blocks: a wide d_in over a narrow d_out, T <= 32), many rows shrink + lora_gemm. Every variant
replayed from a CUDA graph (L2 flushed before each replay by do_bench), once per round, the order
reversed every other round, beside cuBLAS's F.linear; medians over rounds, outputs checked against
float32. Writes tail-steps-ab-<gpu>-<date>.json.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from common import env_info, graph_rounds, layer_inputs, patched, save_json, warm_up  # noqa: E402

import lorafuse  # noqa: E402

lg = importlib.import_module("lorafuse.kernels.lora_gemm")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, nargs="+", default=[1, 4, 16, 32, 64])
    p.add_argument("--shapes", nargs="+", default=["14336x4096", "4096x4096"], help="d_in x d_out")
    p.add_argument("--R", type=int, default=48)
    p.add_argument("--m", type=int, default=16)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    assert torch.cuda.is_available(), "tail_steps_ab.py needs a GPU"
    warm_up()
    rows = []
    for shape in args.shapes:
        d_in, d_out = (int(v) for v in shape.split("x"))
        for T in args.T:
            torch.manual_seed(0)
            x, w, a, b, scale, am, bm = layer_inputs(T, d_in, d_out, args.R, args.m)
            ref = lorafuse.lora_linear_reference(x.float(), w.float(), None, a.float(), b.float(), scale, am, bm)

            def op(steps):
                with patched(lg, "TAIL_PIPE_MIN_STEPS", steps):
                    return lorafuse.lora_linear(x, w, None, a, b, scale, am, bm)

            fns = {"cublas": lambda: F.linear(x, w), "pipelined": lambda: op(1), "flat_one_step": lambda: op(2)}
            err = {k: ((fns[k]().float() - ref).abs().max() / ref.abs().max()).item()
                   for k in ("pipelined", "flat_one_step")}
            med, times = graph_rounds(fns, args.rounds)
            print(f"T={T} {d_in}x{d_out}: cublas {med['cublas'] * 1e3:.1f} us | pipelined "
                  f"{med['pipelined'] * 1e3:.1f} us ({med['pipelined'] / med['cublas']:.3f}x) | flat_one_step "
                  f"{med['flat_one_step'] * 1e3:.1f} us ({med['flat_one_step'] / med['cublas']:.3f}x) | err {err}",
                  flush=True)
            rows.append({"T": T, "d_in": d_in, "d_out": d_out, "R": args.R, "m": args.m, "ms": med,
                         "ms_rounds": times, "err": err,
                         "ratio_to_cublas": {k: v / med["cublas"] for k, v in med.items()}})
            save_json({"env": env_info(sys.argv), "rows": rows}, args.out, "tail-steps-ab")
    print("wrote", save_json({"env": env_info(sys.argv), "rows": rows}, args.out, "tail-steps-ab"))


if __name__ == "__main__":
    main()

"""The many-token forward with the composition merged into the weight per call (W + dW, dW = b_cat
diag(scale) b_map a_map a_cat formed by one cuBLAS addmm, then one cuBLAS GEMM) against the op's
fused path and cuBLAS, from CUDA graphs; and the error of each against float64.

    python bench/merge_ab.py [--T 2048 4096 8192 16384] [--shapes 4096x4096 4096x14336 14336x4096]
                             [--R 48] [--m 16] [--delta 0.02] [--rounds 4] [--out bench/results]

Variants: "op" (lorafuse.lora_linear, inference: nothing saved), "merged" (addmm into a fresh weight,
then F.linear), "shrink_merged" (the shrink with its intermediates saved, as a training forward
needs them, then the merged GEMM instead of lora_gemm). Every variant replayed from a CUDA graph (L2
flushed before each replay), once per round, the order reversed every other round; medians over
rounds. Errors: the output's max error over its max against float64, and the low-rank part's
(y - x W^T in float64) relative Frobenius error, with b_cat scaled so that dW's entries are --delta
times W's (a LoRA's usual size beside its base weight). Writes merge-ab-<gpu>-<date>.json.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from common import env_info, graph_rounds, layer_inputs, save_json, warm_up  # noqa: E402

import lorafuse  # noqa: E402

sk = importlib.import_module("lorafuse.kernels.shrink")


def merged_weight(w, a, b, scale, am, bm):
    """W + b diag(scale) b_map a_map a in w's dtype: one addmm, float32 accumulation, one rounding.
    (The op-level operands' form of MultiLoraLinear.lowrank_factors; lorafuse.merge adds the
    module's float32 delta_weight instead, once, not per call.)"""
    p = b.float() * scale
    if am is not None:
        p = p @ bm @ am
    return torch.addmm(w, p.to(w.dtype), a)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    p.add_argument("--shapes", nargs="+", default=["4096x4096", "4096x14336", "14336x4096"], help="d_in x d_out")
    p.add_argument("--R", type=int, default=48)
    p.add_argument("--m", type=int, default=16)
    p.add_argument("--delta", type=float, default=0.02)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    assert torch.cuda.is_available(), "merge_ab.py needs a GPU"
    out = {"env": env_info(sys.argv), "rows": []}
    warm_up()
    for shape in args.shapes:
        d_in, d_out = (int(v) for v in shape.split("x"))
        for T in args.T:
            torch.manual_seed(0)
            x, w, a, b, scale, am, bm = layer_inputs(T, d_in, d_out, args.R, args.m)
            b = (b.float() * args.delta).to(b.dtype)  # dW's entries about delta x W's
            with torch.no_grad():
                d = lambda t: t.double()  # noqa: E731
                base64 = d(x) @ d(w).t()
                ref = lorafuse.lora_linear_reference(d(x), d(w), None, d(a), d(b), d(scale), d(am), d(bm))
                low = ref - base64

                def shrink_merged():
                    sk.shrink(x, a, scale, am, bm, save=True, check=False)
                    return F.linear(x, merged_weight(w, a, b, scale, am, bm))

                fns = {"cublas": lambda: F.linear(x, w),
                       "op": lambda: lorafuse.lora_linear(x, w, None, a, b, scale, am, bm),
                       "merged": lambda: F.linear(x, merged_weight(w, a, b, scale, am, bm)),
                       "shrink_merged": shrink_merged}
                err, low_err = {}, {}
                for k, f in fns.items():
                    if k != "cublas":
                        y = d(f())
                        err[k] = ((y - ref).abs().max() / ref.abs().max()).item()
                        low_err[k] = ((y - base64 - low).norm() / low.norm()).item()
                del base64, ref, low
                med, times = graph_rounds(fns, args.rounds)
            print(f"T={T} {d_in}x{d_out}: cublas {med['cublas'] * 1e3:.1f} us | "
                  + " | ".join(f"{k} {med[k] * 1e3:.1f} ({med[k] / med['cublas']:.3f}x, err {err[k]:.1e}, "
                               f"low-rank err {low_err[k]:.1e})" for k in fns if k != "cublas"), flush=True)
            out["rows"].append({"T": T, "d_in": d_in, "d_out": d_out, "R": args.R, "m": args.m, "delta": args.delta,
                                "ms": med, "ms_rounds": times, "err": err, "low_rank_err": low_err,
                                "ratio_to_cublas": {k: v / med["cublas"] for k, v in med.items()}})
            save_json(out, args.out, "merge-ab")
    print("wrote", save_json(out, args.out, "merge-ab"))


if __name__ == "__main__":
    main()

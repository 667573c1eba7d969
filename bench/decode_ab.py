"""lorafuse.lora_linear under module switches, against cuBLAS, from CUDA graphs: at T <= 64 the
one-launch decode layer, at any other --T the op's own path for those rows.

    python bench/decode_ab.py [--variants rows_clamped rows_masked] [--T 1 2 4 16 32 64]
                              [--shapes 4096x4096 4096x14336 14336x4096] [--methods loramap sum]
                              [--R 48] [--m 16] [--rounds 4] [--out bench/results]

Variants (VARIANTS): rows_clamped / rows_masked set kernels.lora_gemm.DECODE_MASK_ROWS (x's rows
past T clamped to row 0 or masked); T_specialised / T_runtime swap in the pointer kernel decorated
as Triton does by default (T == 1 compiled as a constant) or with T as a run-time argument;
split_group_1 / split_group_8 set kernels.shrink.SPLIT_GROUP (the split partials summed one load per
step, or eight loads in flight: the shrink's finishing steps and the decode layer's shared shrink). Every
variant replayed from a CUDA graph (L2 flushed before each replay by do_bench), once per round, the
order reversed every other round, beside cuBLAS's F.linear; medians over rounds, outputs checked
against float32. Writes decode-ab-<gpu>-<date>.json.
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
from common import env_info, graph_rounds, layer_inputs, patched, save_json, warm_up  # noqa: E402

import lorafuse  # noqa: E402

lg = importlib.import_module("lorafuse.kernels.lora_gemm")
sh = importlib.import_module("lorafuse.kernels.shrink")
_KERNEL = lg._lora_gemm_kernel

# name -> (module, attribute, value factory)
VARIANTS = {
    "rows_clamped": (lg, "DECODE_MASK_ROWS", lambda: False),
    "rows_masked": (lg, "DECODE_MASK_ROWS", lambda: True),
    "T_specialised": (lg, "_lora_gemm_kernel", lambda: triton.jit(_KERNEL.fn)),
    "T_runtime": (lg, "_lora_gemm_kernel", lambda: triton.jit(_KERNEL.fn, do_not_specialize=["T"])),
    "split_group_1": (sh, "SPLIT_GROUP", lambda: 1),
    "split_group_8": (sh, "SPLIT_GROUP", lambda: 8),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["rows_clamped", "rows_masked"], choices=sorted(VARIANTS))
    p.add_argument("--T", type=int, nargs="+", default=[1, 2, 4, 16, 32, 64])
    p.add_argument("--shapes", nargs="+", default=["4096x4096", "4096x14336", "14336x4096"], help="d_in x d_out")
    p.add_argument("--methods", nargs="+", default=["loramap", "sum"], choices=["loramap", "sum"])
    p.add_argument("--R", type=int, default=48)
    p.add_argument("--m", type=int, default=16)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    assert torch.cuda.is_available(), "decode_ab.py needs a GPU"
    values = {v: VARIANTS[v][2]() for v in args.variants}
    out = {"env": env_info(sys.argv), "variants": args.variants, "rows": []}
    warm_up()
    for shape in args.shapes:
        d_in, d_out = (int(v) for v in shape.split("x"))
        for T in args.T:
            for method in args.methods:
                torch.manual_seed(0)
                x, w, a, b, scale, am, bm = layer_inputs(T, d_in, d_out, args.R, args.m)
                if method == "sum":
                    am = bm = None
                ref = lorafuse.lora_linear_reference(x.float(), w.float(), None, a.float(), b.float(), scale, am, bm)

                def op(variant):
                    mod, attr, _ = VARIANTS[variant]
                    with patched(mod, attr, values[variant]):
                        return lorafuse.lora_linear(x, w, None, a, b, scale, am, bm)

                fns = {"cublas": lambda: F.linear(x, w)}
                fns.update({v: (lambda v=v: op(v)) for v in args.variants})
                err = {v: ((fns[v]().float() - ref).abs().max() / ref.abs().max()).item() for v in args.variants}
                med, times = graph_rounds(fns, args.rounds)
                print(f"{method} T={T} {d_in}x{d_out}: cublas {med['cublas'] * 1e3:.1f} us | " + " | ".join(
                    f"{v} {med[v] * 1e3:.1f} us ({med[v] / med['cublas']:.3f}x)" for v in args.variants)
                    + f" | err {err}", flush=True)
                out["rows"].append({"method": method, "T": T, "d_in": d_in, "d_out": d_out, "R": args.R,
                                    "m": args.m if method == "loramap" else None, "ms": med, "ms_rounds": times,
                                    "err": err, "ratio_to_cublas": {k: v / med["cublas"] for k, v in med.items()}})
                save_json(out, args.out, "decode-ab")
    print("wrote", save_json(out, args.out, "decode-ab"))


if __name__ == "__main__":
    main()

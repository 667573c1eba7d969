"""The forward's two launches (shrink, then lora_gemm) with the GEMM as a programmatic dependent of
the shrink, against the op's default and cuBLAS, from CUDA graphs.

    python bench/pdl_ab.py [--T 2048 8192 16384] [--shapes 4096x4096 4096x14336 14336x4096]
                           [--programs all plan 8 16 32 64] [--R 48] [--m 16] [--rounds 4] [--out bench/results]

Variants: "op" is lorafuse.lora_linear (LoraMap) with ops.FORWARD_PDL as set, "op_pdl" with it on
(at T = 2048 on d_in = 4096 the op's shrink is the pointer kernel, without the dependent launch);
"pdl_<p>" runs the copy-engine shrink with the PDL trigger on p programs (row blocks dealt in
strides; "all": one per row block, the default's grid; "plan": kernels.shrink.pdl_shrink_programs)
and lora_gemm launched as its dependent, whose tiles wait for the shrink only before their low-rank
tail. With fewer shrink programs than SMs the GEMM's first programs start on the free SMs at once,
and the last ones (one tile fewer where the tiles do not fill the last round) on the shrink's SMs
when it ends. Every variant replayed from a CUDA graph (L2 flushed before each replay), once per
round, the order reversed every other round; medians over rounds; outputs checked against float32.
Also reports whether the compiled GEMM kept its warp specialisation with the wait (TTGIR) and holds
griddepcontrol (PTX).
Writes pdl-ab-<gpu>-<date>.json.
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
from lorafuse import ops  # noqa: E402

lg = importlib.import_module("lorafuse.kernels.lora_gemm")
sk = importlib.import_module("lorafuse.kernels.shrink")
ut = importlib.import_module("lorafuse.kernels.utils")


def compiled_variants(kernel) -> list:
    """(warp_specialize in TTGIR, griddepcontrol.wait in PTX) for every compiled specialisation."""
    found = []
    try:
        for caches in getattr(kernel, "device_caches", {}).values():
            for compiled in caches[0].values():
                asm = getattr(compiled, "asm", {})
                found.append({"warp_specialize": "ttg.warp_specialize" in asm.get("ttgir", ""),
                              "gdc_wait": "griddepcontrol.wait" in asm.get("ptx", "")})
    except (AttributeError, IndexError, TypeError) as e:  # another Triton's cache layout
        found.append({"error": repr(e)})
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, nargs="+", default=[2048, 8192, 16384])
    p.add_argument("--shapes", nargs="+", default=["4096x4096", "4096x14336", "14336x4096"], help="d_in x d_out")
    p.add_argument("--programs", nargs="+", default=["all", "plan", "8", "16", "32", "64"])
    p.add_argument("--R", type=int, default=48)
    p.add_argument("--m", type=int, default=16)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    assert torch.cuda.is_available(), "pdl_ab.py needs a GPU"
    sms = ut.num_sms(torch.device("cuda"))
    out = {"env": env_info(sys.argv), "sms": sms, "rows": []}
    warm_up()
    for shape in args.shapes:
        d_in, d_out = (int(v) for v in shape.split("x"))
        for T in args.T:
            torch.manual_seed(0)
            x, w, a, b, scale, am, bm = layer_inputs(T, d_in, d_out, args.R, args.m)
            ref = lorafuse.lora_linear_reference(x.float(), w.float(), None, a.float(), b.float(), scale, am, bm)
            gcfg = lg.tma_config(T, d_out, d_in)
            tiles = ut.cdiv(T, gcfg.kwargs["BLOCK_M"]) * ut.cdiv(d_out, gcfg.kwargs["BLOCK_N"])
            base_cfg = sk.tma_shrink_config(T, d_in, args.R, sms)
            blocks = ut.cdiv(T, base_cfg["BLOCK_T"])

            def pdl_layer(programs):
                cfg = dict(base_cfg, PDL=True, PROGRAMS=programs)
                sp, _, _ = sk.shrink(x, a, scale, am, bm, config=cfg, check=False)
                return lg.lora_gemm(x, w.t(), sp, b.t(), None, check=False, pdl=True)

            def op_pdl():
                with patched(ops, "FORWARD_PDL", True):
                    return lorafuse.lora_linear(x, w, None, a, b, scale, am, bm)

            fns = {"cublas": lambda: F.linear(x, w),
                   "op": lambda: lorafuse.lora_linear(x, w, None, a, b, scale, am, bm), "op_pdl": op_pdl}
            plan = {}
            for prog in args.programs:
                n = (blocks if prog == "all" else sk.pdl_shrink_programs(tiles, sms, blocks) if prog == "plan"
                     else int(prog))
                plan[f"pdl_{prog}"] = n
                fns[f"pdl_{prog}"] = lambda n=n: pdl_layer(n)
            err = {}
            for k, f in fns.items():
                if k != "cublas":
                    err[k] = ((f().float() - ref).abs().max() / ref.abs().max()).item()
            med, times = graph_rounds(fns, args.rounds)
            print(f"T={T} {d_in}x{d_out} tiles={tiles} blocks={blocks}: cublas {med['cublas'] * 1e3:.1f} us | "
                  + " | ".join(f"{k}({plan.get(k, '')}) {med[k] * 1e3:.1f} ({med[k] / med['cublas']:.3f}x)"
                               for k in fns if k != "cublas") + f" | max err {max(err.values()):.2e}", flush=True)
            out["rows"].append({"T": T, "d_in": d_in, "d_out": d_out, "R": args.R, "m": args.m, "tiles": tiles,
                                "shrink_blocks": blocks, "programs": plan, "ms": med, "ms_rounds": times, "err": err,
                                "ratio_to_cublas": {k: v / med["cublas"] for k, v in med.items()}})
            save_json(out, args.out, "pdl-ab")
    out["gemm_compiled"] = compiled_variants(lg._lora_gemm_tma_kernel)
    print("compiled GEMM variants:", out["gemm_compiled"])
    print("wrote", save_json(out, args.out, "pdl-ab"))


if __name__ == "__main__":
    main()

"""The persistent layer's shrink plan (how many programs shrink, in how many d_in splits, with how
deep a pipeline) against the two-launch path, from CUDA graphs.

    python bench/persistent_plan_ab.py [--shapes 8192x4096x4096 ...] [--R 48] [--m 16] [--rounds 4]
                                       [--variants p1=32,splits=1,stages=6 ...] [--out bench/results]

For each shape T x d_in x d_out, bf16, LoraMap (R, m), every variant replayed from a CUDA graph (L2
flushed before each replay by do_bench), once per round, the order reversed every other round:
"cublas" (F.linear), "two_launch" (lorafuse.lora_linear through shrink + lora_gemm; also with its
low-rank tail software-pipelined at every rank, "two_launch_pipelined_tail"), "op_persistent"
(lorafuse.lora_linear through the persistent layer with its default plan), "plan" (the kernel alone,
kernels.lora_gemm.persistent_plan), "all_programs" (every program may shrink, as before the plan:
its tiles not reduced), and the --variants given (p1 = shrinking programs, "plan" by default and
"slack" for the last wave's free slots; splits; stages of the shrink loop). (At da9cb8d a variant
key wait_all=1 chose one wait for every band before the tuned loop; measured and removed.) Medians
over rounds, ratios to cublas, every output checked against float32. Also whether the compiled GEMM
loop is warp-specialised.
Writes persistent-plan-ab-<gpu>-<date>.json.
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
import lorafuse.ops as ops  # noqa: E402
from lorafuse.kernels.utils import cdiv, num_sms  # noqa: E402

lg = importlib.import_module("lorafuse.kernels.lora_gemm")

DEFAULT_VARIANTS = ["p1=slack,splits=1,stages=6", "p1=slack,splits=1,stages=3", "p1=64,splits=1,stages=6"]


def splits_before_plan(bands: int, k_tiles: int, sms: int) -> int:
    """The persistent layer's shrink items per row band before persistent_plan (every program could
    shrink): items for about half the SMs, each at least 4 steps of d_in (bench/NOTES.md, entry 8)."""
    return max(1, min((sms // 2) // bands, k_tiles // 4))


def parse_variant(spec: str, slack: int, programs: int, plan) -> dict:
    kv = dict(part.split("=") for part in spec.split(","))
    p1 = kv.get("p1", "plan")
    p1 = max(1, slack) if p1 == "slack" else plan[1] if p1 == "plan" else int(p1)
    if "splits" not in kv and kv.get("p1", "plan") == "plan":
        kv["splits"] = plan[0]
    return {"shrink_programs": min(p1, programs), "splits": int(kv.get("splits", 1)),
            "shrink_stages": int(kv["stages"]) if "stages" in kv else None}


def warp_specialised() -> dict:
    """Per compiled persistent-layer kernel: whether its TTGIR holds a warp_specialize op."""
    out = {}
    try:
        for cache in lg._lora_layer_tma_kernel.device_caches.values():
            for key, k in cache[0].items():
                out[str(key)[-120:]] = "ttg.warp_specialize" in k.asm.get("ttgir", "")
    except Exception as ex:  # another Triton's internals
        out["error"] = f"{type(ex).__name__}: {ex}"
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["8192x4096x4096", "8192x4096x14336", "8192x14336x4096",
                                                   "2048x4096x4096", "2048x4096x14336", "16384x4096x4096"])
    p.add_argument("--R", type=int, default=48)
    p.add_argument("--m", type=int, default=16)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--variants", nargs="*", default=DEFAULT_VARIANTS)
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    assert torch.cuda.is_available(), "persistent_plan_ab.py needs a GPU"
    warm_up()
    rows = []
    for shape in args.shapes:
        T, d_in, d_out = (int(v) for v in shape.split("x"))
        torch.manual_seed(0)
        x, w, a, b, scale, am, bm = layer_inputs(T, d_in, d_out, args.R, args.m)
        ref = lorafuse.lora_linear_reference(x.float(), w.float(), None, a.float(), b.float(), scale, am, bm)
        bands, tiles = cdiv(T, 128), cdiv(T, 128) * cdiv(d_out, 256)
        programs = min(num_sms(x.device), tiles)
        slack = cdiv(tiles, programs) * programs - tiles
        plan = lg.persistent_plan(bands, cdiv(d_in, 64), tiles, programs)

        def op(persistent):
            with patched(ops, "PERSISTENT", persistent):
                return lorafuse.lora_linear(x, w, None, a, b, scale, am, bm)

        def pipelined_tail():
            with patched(lg, "TAIL_PIPE_MIN_STEPS", 1):
                return op(False)

        fns = {"cublas": lambda: F.linear(x, w), "two_launch": lambda: op(False), "op_persistent": lambda: op(True),
               "two_launch_pipelined_tail": pipelined_tail,
               "plan": lambda: lg.lora_gemm_persistent(x, w, None, a, b, scale, am, bm)[0],
               "all_programs": lambda: lg.lora_gemm_persistent(
                   x, w, None, a, b, scale, am, bm, shrink_programs=programs,
                   splits=splits_before_plan(bands, cdiv(d_in, 64), programs))[0]}
        specs = {}
        for spec in args.variants:
            kw = parse_variant(spec, slack, programs, plan)
            specs[spec] = kw
            fns[spec] = (lambda kw=kw: lg.lora_gemm_persistent(x, w, None, a, b, scale, am, bm, **kw)[0])
        errs = {}
        for k, fn in list(fns.items()):
            try:
                out = fn()
                if k != "cublas":
                    errs[k] = ((out.float() - ref).abs().max() / ref.abs().max()).item()
            except Exception as ex:  # a variant that does not compile or fit is recorded
                errs[k] = f"{type(ex).__name__}: {str(ex)[:200]}"
                del fns[k]
        med, times = graph_rounds(fns, args.rounds)
        base = med["cublas"]
        print(f"T={T} {d_in}x{d_out} tiles={tiles} programs={programs} slack={slack} plan={plan}: cublas "
              f"{base * 1e3:.1f} us | " + " | ".join(f"{k} {v / base:.3f}x" for k, v in med.items() if k != "cublas"),
              flush=True)
        bad = {k: v for k, v in errs.items() if not isinstance(v, float) or v > 2e-2}
        if bad:
            print("  errors:", bad, flush=True)
        rows.append({"T": T, "d_in": d_in, "d_out": d_out, "R": args.R, "m": args.m, "tiles": tiles,
                     "programs": programs, "slack": slack, "plan": plan, "variants": specs, "ms": med,
                     "ms_rounds": times, "err": errs, "ratio_to_cublas": {k: v / base for k, v in med.items()}})
        save_json({"env": env_info(sys.argv), "rows": rows}, args.out, "persistent-plan-ab")
    ws = warp_specialised()
    print("warp-specialised:", ws)
    print("wrote", save_json({"env": env_info(sys.argv), "rows": rows, "warp_specialised": ws}, args.out,
                             "persistent-plan-ab"))


if __name__ == "__main__":
    main()

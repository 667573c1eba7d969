"""The op with parts of its work on cuBLAS against the Triton kernels, interleaved A/B: the forward shrink's
x a_cat^T (by default) or the expand (--variants), over total ranks R.

    python bench/shrink_cublas_ab.py [--T 2048 8192] [--R 48 192 512] [--rounds 4] [--out bench/results]
    python bench/shrink_cublas_ab.py --routed 16 64 [--top-k 0 1 2] [--schedule dense] [--T 2048 8192]
    python bench/shrink_cublas_ab.py --variants triton expand both [--T 512 2048 8192] [--R 48]

--variants picks what is timed beside the base layer (default: triton cublas), at every T: "triton" (the
Triton shrink; the expand as extra K-steps of the Triton GEMM), "cublas" (x a_cat^T from cuBLAS, Triton
GEMM), "gemm" (the package's own shrink switch, Triton GEMM), "expand" (the package's own shrink switch, the
expand on cuBLAS: Z = S' b_cat^T, then Z.addmm_(x, W^T); lorafuse.ops.expand), "both" (cuBLAS for the
shrink's product and the expand), "default" (the package's own switches). With
expand variants the file is expand-cublas-ab-<gpu>-<date>.json (routed-expand-cublas-ab with --routed).
--backward times forward+backward instead (the stem gains -backward): the expand switch also takes the
backward's dx = dy W + dS a_cat.

For each shape (T, d_in, d_out) and R, LoraMap rank 16, bf16: cuBLAS's base layer (F.linear),
lorafuse.lora_linear with the Triton shrink ("triton": kernels.shrink's pointer or copy-engine kernels)
and with x a_cat^T from cuBLAS in float32 plus the finishing kernel ("cublas":
kernels.shrink.SHRINK_CUBLAS_MIN_R at 1), each replayed from a CUDA graph (GPU time) and called directly
(host time included). L2 flushed before each call; every variant timed once per round, the order
reversed every other round (common.round_order); medians over rounds and the ratio to the base timed the
same way. The result file is rewritten after every shape, so a run cut short keeps its rows.
Writes shrink-cublas-ab-<gpu>-<date>.json.

--routed K ...: the routed layer instead (lorafuse.routing.lora_linear_routed, K adapters of rank 16,
Arrow prototypes, top_k per --top-k with 0 = dense softmax, the given --schedule), whose stacked
product x [a_cat; router]^T takes the same switch; rows carry K and top_k in place of R and m.
Writes routed-cublas-ab-<gpu>-<date>.json.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import statistics
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(__file__))
from common import env_info, graphed, layer_inputs, round_order, save_json, warm_up  # noqa: E402

import lorafuse  # noqa: E402

shrink_module = importlib.import_module("lorafuse.kernels.shrink")
ops_module = importlib.import_module("lorafuse.ops")
DEFAULTS = (shrink_module.SHRINK_CUBLAS_MIN_R, ops_module.EXPAND_CUBLAS_MAX_T)
ALL = 10 ** 9
# variant -> (kernels.shrink.SHRINK_CUBLAS_MIN_R, lorafuse.ops.EXPAND_CUBLAS_MAX_T)
VARIANTS = {"triton": (0, 0), "cublas": (1, 0), "gemm": (DEFAULTS[0], 0), "expand": (DEFAULTS[0], ALL),
            "both": (1, ALL), "default": DEFAULTS}


def use(variant: str) -> None:
    shrink_module.SHRINK_CUBLAS_MIN_R, ops_module.EXPAND_CUBLAS_MAX_T = VARIANTS[variant]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--R", type=int, nargs="+", default=[48, 192, 512])
    p.add_argument("--dims", nargs="+", default=["4096x4096", "4096x14336", "14336x4096"])
    p.add_argument("--rounds", type=int, default=4, help="an even count (the order reverses every other round)")
    p.add_argument("--routed", type=int, nargs="*", default=None, metavar="K",
                   help="time the routed layer with these adapter counts (rank 16 each) instead")
    p.add_argument("--top-k", type=int, nargs="+", default=[0, 1, 2], help="routed: 0 = dense softmax")
    p.add_argument("--schedule", default="dense", choices=["auto", "dense", "grouped"])
    p.add_argument("--variants", nargs="+", default=["triton", "cublas"], choices=list(VARIANTS))
    p.add_argument("--backward", action="store_true",
                   help="time forward+backward: the gradients of x (and of the LoraMap mapping; the routed layer: "
                        "x only), against the base layer's forward+backward for x")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    names = list(dict.fromkeys(args.variants))
    stem = "shrink-cublas-ab" if set(names) <= {"triton", "cublas"} else "expand-cublas-ab"
    stem = f"routed-{stem.replace('shrink-', '')}" if args.routed is not None else stem
    stem = f"{stem}-backward" if args.backward else stem
    assert torch.cuda.is_available(), "shrink_cublas_ab.py needs a GPU"
    warm_up()
    doc = {"env": env_info(sys.argv), "rows": []}
    routed = args.routed is not None
    # (R, m) for the plain layer; (K, top_k) for the routed one.
    cases = ([(K, k) for K in args.routed for k in args.top_k if k <= K] if routed else [(R, 16) for R in args.R])
    for R, m in cases:
        for dims in args.dims:
            d_in, d_out = (int(v) for v in dims.split("x"))
            for T in args.T:
                if routed:
                    from lorafuse.routing import arrow_prototypes, lora_linear_routed, lora_linear_routed_reference

                    ranks = [16] * R
                    x, w, a_cat, b_cat, scale, _, _ = layer_inputs(T, d_in, d_out, 16 * R, 1)
                    router = arrow_prototypes(a_cat, b_cat, ranks, scale).to(x.dtype)
                    top_k = m or None
                else:
                    x, w, a_cat, b_cat, scale, a_map, b_map = layer_inputs(T, d_in, d_out, R, m)

                def base():
                    return F.linear(x, w)

                def op(variant):
                    def f():
                        use(variant)
                        if routed:
                            return lora_linear_routed(x, w, None, a_cat, b_cat, scale, ranks, router, "arrow", top_k,
                                                      schedule=args.schedule)
                        return lorafuse.lora_linear(x, w, None, a_cat, b_cat, scale, a_map, b_map)
                    return f

                with torch.no_grad():
                    if routed:
                        ref = lora_linear_routed_reference(x.float(), w.float(), None, a_cat.float(), b_cat.float(),
                                                           scale, ranks, router.float(), "arrow", top_k)
                    else:
                        ref = lorafuse.lora_linear_reference(x.float(), w.float(), None, a_cat.float(),
                                                             b_cat.float(), scale, a_map, b_map)
                    errs = {v: ((op(v)().float() - ref).norm() / ref.norm()).item() for v in names}
                    used = shrink_module._MM_OUT_DTYPE
                variants = {"base_eager": base, **{f"{v}_eager": op(v) for v in names}}
                if args.backward:  # forward+backward: the gradients of x (and of the mapping) from dy
                    leaves = [x] if routed else [x, a_map, b_map]
                    for t in leaves:
                        t.requires_grad_(True)
                    dy = torch.randn(T, d_out, device=x.device, dtype=x.dtype)

                    def with_grad(fwd, wrt):
                        return lambda: torch.autograd.grad(fwd(), wrt, dy)
                    variants = {k: with_grad(f, [x] if k == "base_eager" else leaves) for k, f in variants.items()}
                with contextlib.nullcontext() if args.backward else torch.no_grad():
                    for k in ["base", *names]:
                        variants[f"{k}_graph"] = graphed(variants[f"{k}_eager"])
                    times = {k: [] for k in variants}
                    for i in range(args.rounds):
                        for k in round_order(list(variants), i):
                            times[k].append(do_bench(variants[k], warmup=10, rep=60, return_mode="median"))
                    use("default")
                med = {k: statistics.median(v) for k, v in times.items()}
                shape = {"K": R, "top_k": m, "schedule": args.schedule} if routed else {"R": R, "m": m}
                row = {"T": T, "d_in": d_in, "d_out": d_out, **shape, "backward": args.backward, "ms": med,
                       "ms_rounds": times,
                       "rel_err": errs, "mm_out_dtype": used}
                for mode in ("eager", "graph"):
                    for k in names:
                        row[f"{k}_{mode}_ratio"] = med[f"{k}_{mode}"] / med[f"base_{mode}"]
                doc["rows"].append(row)
                label = f"K={R} top_k={m}" if routed else f"R={R}"
                cells = {mode: ", ".join(f"{k} {row[f'{k}_{mode}_ratio']:.3f}x" for k in names)
                         for mode in ("graph", "eager")}
                print(f"{label} T={T} {dims}: graph base {med['base_graph']:.4f} ms, {cells['graph']} | eager "
                      f"{cells['eager']} | err {errs}", flush=True)
                save_json(doc, args.out, stem)
    use("default")


if __name__ == "__main__":
    main()

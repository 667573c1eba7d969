"""The TMA GEMM's launch configs for the backward's layout (dx = dy W + dS a_cat: W read row-major)
against cuBLAS, beside the forward's layout (y = x W^T + S' b_cat^T) with its default config.

    python bench/gemm_layout_sweep.py [--shapes 8192x4096x4096 ...] [--rounds 2] [--out bench/results]

--layout fwd runs the candidates on the forward's layout instead. A shape T x K x N is a GEMM of T
rows over K into N columns: for the backward of a (d_in -> d_out) layer, K = d_out and N = d_in. R =
48 low-rank columns. Every variant replayed from a CUDA graph, L2 flushed before each replay
(do_bench), once per round, the order reversed every other round; medians over rounds. Variants:
"cublas" (torch.mm of the same operands, no low-rank term), "default" (lora_gemm's own tma_config
for the layout) and every candidate config (tma_candidates(), warp-specialised variants and the
large tiles with a two-part epilogue store, EPI_SUBTILE = 2), each checked against float32.
--subtile-only times only the latter beside cuBLAS and the default. --sustained N replays N calls
back to back per graph (the GPU kept busy as in a model's forward, where clocks and L2 differ from
isolated calls; the same operands every call, where a model's layers read different weights).
Writes gemm-layout-sweep-<gpu>-<date>.json.
"""
from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(__file__))
from common import env_info, graphed, round_order, save_json, warm_up  # noqa: E402

lg = importlib.import_module("lorafuse.kernels.lora_gemm")  # the module, not the function of that name


def cfg_name(cfg) -> str:
    k = cfg.kwargs
    return (f"{k['BLOCK_M']}x{k['BLOCK_N']}x{k['BLOCK_K']} w{cfg.num_warps} s{cfg.num_stages} "
            f"{'F' if k.get('FLATTEN') else '-'}{'W' if k.get('WARP_SPECIALIZE') else '-'}"
            + (f" E{k['EPI_SUBTILE']}" if k.get("EPI_SUBTILE", 1) != 1 else ""))


def subtile_candidates() -> list:
    """The large tiles with the epilogue stored in two column halves (EPI_SUBTILE = 2), whose smaller
    store buffer leaves shared memory for a fourth stage."""
    return [lg._cfg(bm, bn, 64, 8, st, FLATTEN=f, WARP_SPECIALIZE=False, EPI_SUBTILE=2)
            for bm, bn in ((128, 256), (256, 128)) for st in (3, 4) for f in (True, False)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["8192x4096x4096", "8192x14336x4096", "8192x4096x14336",
                                                   "2048x4096x4096"], help="T x K x N")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--layout", choices=["bwd", "fwd"], default="bwd",
                   help="the layout the candidate configs run on: the backward's row-major W (default) or "
                        "the forward's W^T view")
    p.add_argument("--subtile-only", action="store_true",
                   help="time only the default config and the EPI_SUBTILE = 2 candidates (with cuBLAS)")
    p.add_argument("--sustained", type=int, default=1, metavar="N",
                   help="replay N back-to-back calls per graph (L2 flushed only before the first) and report the "
                        "time per call: the GPU kept busy as in a model's forward, but on the same operands every "
                        "call where a model's layers read different weights")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    if args.sustained < 1:
        p.error(f"--sustained must be a positive number of calls, got {args.sustained}")
    assert torch.cuda.is_available(), "gemm_layout_sweep.py needs a GPU"
    warm_up()
    cands = lg.tma_candidates() + [lg._cfg(128, 256, 64, 8, 3, FLATTEN=True, WARP_SPECIALIZE=True),
                                   lg._cfg(128, 256, 64, 8, 3, FLATTEN=False, WARP_SPECIALIZE=True),
                                   lg._cfg(128, 128, 64, 8, 4, FLATTEN=True, WARP_SPECIALIZE=True),
                                   lg._cfg(256, 128, 64, 8, 3, FLATTEN=True, WARP_SPECIALIZE=True)]
    cands = subtile_candidates() if args.subtile_only else cands + subtile_candidates()
    rows = []
    for shape in args.shapes:
        T, K, N = (int(v) for v in shape.split("x"))
        torch.manual_seed(0)
        a = torch.randn(T, K, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(K, N, device="cuda", dtype=torch.bfloat16) / K ** 0.5  # row-major: the backward's W
        s = torch.randn(T, 48, device="cuda", dtype=torch.bfloat16)
        c = torch.randn(48, N, device="cuda", dtype=torch.bfloat16) / 48 ** 0.5
        wt = w.t().contiguous().t()  # the same values, column-major: the forward's W^T view
        ct = c.t().contiguous().t()
        ref = a.float() @ w.float() + s.float() @ c.float()
        fns = {"cublas": lambda: torch.mm(a, w), "cublas_fwd_layout": lambda: torch.mm(a, wt),
               "default": lambda: lg.lora_gemm(a, w, s, c, check=False),
               "default_fwd_layout": lambda: lg.lora_gemm(a, wt, s, ct, check=False)}
        wl, cl = (wt, ct) if args.layout == "fwd" else (w, c)
        for cfg in cands:
            fns[cfg_name(cfg)] = (lambda cfg=cfg: lg.lora_gemm(a, wl, s, cl, impl="tma", config=cfg, check=False))
        replays, row = {}, {"T": T, "K": K, "N": N, "R": 48, "sustained": args.sustained, "errors": {}, "rel_err": {}}
        for name, fn in fns.items():
            try:
                out = fn()
                if not name.startswith("cublas"):
                    row["rel_err"][name] = ((out.float() - ref).norm() / ref.norm()).item()
                replays[name] = graphed(fn if args.sustained == 1 else
                                        (lambda fn=fn: [fn() for _ in range(args.sustained)]))
            except Exception as e:  # a config that does not fit is recorded, not fatal
                row["errors"][name] = f"{type(e).__name__}: {str(e)[:160]}"
        times = {k: [] for k in replays}
        for rnd in range(args.rounds):
            for k in round_order(list(replays), rnd):
                times[k].append(do_bench(replays[k], warmup=10, rep=60, return_mode="median") * 1e3 / args.sustained)
        med = {k: statistics.median(v) for k, v in times.items()}
        row["us"], row["us_rounds"] = med, times
        base = med["cublas"]
        row["ratio_to_cublas"] = {k: v / base for k, v in med.items()}
        rows.append(row)
        best = sorted((v, k) for k, v in med.items() if not k.startswith(("cublas", "default"))
                      and row["rel_err"].get(k, 1) < 2e-2)[:4]
        print(f"{shape}: cublas {base:.1f} us (fwd layout {med['cublas_fwd_layout']:.1f}), default "
              f"{med['default'] / base:.3f}x (fwd layout {med['default_fwd_layout'] / base:.3f}x); best "
              + ", ".join(f"{k} {v / base:.3f}x" for v, k in best), flush=True)
        save_json({"env": env_info(sys.argv), "rows": rows}, args.out, "gemm-layout-sweep")
    compiled = []  # which compiled forms hold a warp-specialised loop (TTGIR), by their cache key
    for caches in getattr(lg._lora_gemm_tma_kernel, "device_caches", {}).values():
        try:
            for key, kern in caches[0].items():
                asm = getattr(kern, "asm", {})
                compiled.append({"key": str(key)[-400:],
                                 "warp_specialize": "ttg.warp_specialize" in asm.get("ttgir", ""),
                                 "num_warps": getattr(kern.metadata, "num_warps", None)})
        except (AttributeError, IndexError, TypeError) as e:
            compiled.append({"error": repr(e)})
    print("warp-specialised compiled forms:", sum(c.get("warp_specialize", False) for c in compiled), "of",
          len(compiled))
    print("wrote", save_json({"env": env_info(sys.argv), "rows": rows, "compiled": compiled}, args.out,
                             "gemm-layout-sweep"))


if __name__ == "__main__":
    main()

"""The op under the copy-engine shrink's launch table against the previous table, in interleaved rounds.

    python bench/shrink_table_ab.py [--T 2048 4096 8192 16384] [--rounds 5] [--out bench/results]

For each shape (T, d_in, d_out), K = 3 adapters of rank 16 (R = 48) with LoraMap rank 16, bf16:
cuBLAS's base layer (F.linear), lorafuse.lora_linear with the current table (kernels.shrink:
TMA_MIN_T and tma_shrink_config) and with the previous one (copy engine from 8192 rows, 64-row
blocks, 4 stages, about one program per two SMs), each replayed from a CUDA graph (GPU time) and
called directly (what an eager caller sees, host time included). L2 flushed before each call; every
variant timed once per round, rounds alternating; the table gives medians over rounds and the ratio
to the base timed the same way. Writes shrink-table-ab-<gpu>-<date>.json.
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
from common import env_info, graphed, layer_inputs, save_json, warm_up  # noqa: E402

import lorafuse  # noqa: E402
from lorafuse.kernels.utils import block_for, cdiv  # noqa: E402

shrink_module = importlib.import_module("lorafuse.kernels.shrink")
CURRENT = (shrink_module.TMA_MIN_T, shrink_module.tma_shrink_config)


def previous_config(T: int, K: int, R: int, sms: int) -> dict:
    """The table before 2026-12-02 (shrink-sweep-e6783b1 on an H100)."""
    bt, bk = 64, 128
    splits = max(1, min(cdiv(sms, 2 * cdiv(T, bt)), K // (4 * bk)))
    return {"BLOCK_T": bt, "BLOCK_K": bk, "BLOCK_R": block_for(R), "SPLITS": splits, "num_warps": 4,
            "num_stages": 4, "TMA": True}


def use_table(name: str) -> None:
    if name == "current":
        shrink_module.TMA_MIN_T, shrink_module.tma_shrink_config = CURRENT
    else:
        shrink_module.TMA_MIN_T, shrink_module.tma_shrink_config = 8192, previous_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    p.add_argument("--dims", nargs="+", default=["4096x4096", "4096x14336", "14336x4096"])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    assert torch.cuda.is_available(), "shrink_table_ab.py needs a GPU"
    warm_up()
    rows = []
    for dims in args.dims:
        d_in, d_out = (int(v) for v in dims.split("x"))
        for T in args.T:
            x, w, a_cat, b_cat, scale, a_map, b_map = layer_inputs(T, d_in, d_out, 48, 16)

            def base():
                return F.linear(x, w)

            def op(table):
                def f():
                    use_table(table)
                    return lorafuse.lora_linear(x, w, None, a_cat, b_cat, scale, a_map, b_map)
                return f

            with torch.no_grad():
                ref = op("previous")().float()
                err = ((op("current")().float() - ref).norm() / ref.norm()).item()
                variants = {"base_eager": base, "current_eager": op("current"), "previous_eager": op("previous")}
                for k in ("base", "current", "previous"):
                    variants[f"{k}_graph"] = graphed(variants[f"{k}_eager"])
                use_table("current")
                times = {k: [] for k in variants}
                for _ in range(args.rounds):
                    for k, fn in variants.items():
                        times[k].append(do_bench(fn, warmup=10, rep=60, return_mode="median"))
            med = {k: statistics.median(v) for k, v in times.items()}
            row = {"T": T, "d_in": d_in, "d_out": d_out, "ms": med, "ms_rounds": times,
                   "current_vs_previous_rel_diff": err}
            for mode in ("eager", "graph"):
                for k in ("current", "previous"):
                    row[f"{k}_{mode}_ratio"] = med[f"{k}_{mode}"] / med[f"base_{mode}"]
            rows.append(row)
            print(f"T={T} {dims}: graph base {med['base_graph']:.4f} ms, current {row['current_graph_ratio']:.3f}x, "
                  f"previous {row['previous_graph_ratio']:.3f}x | eager base {med['base_eager']:.4f} ms, current "
                  f"{row['current_eager_ratio']:.3f}x, previous {row['previous_eager_ratio']:.3f}x", flush=True)
    use_table("current")
    print("wrote", save_json({"env": env_info(sys.argv), "rows": rows}, args.out, "shrink-table-ab"))


if __name__ == "__main__":
    main()

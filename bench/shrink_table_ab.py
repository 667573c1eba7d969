"""The op with the copy-engine shrink's row thresholds as they are against earlier ones.

    python bench/shrink_table_ab.py [--T 2048 4096 8192 16384] [--rounds 6] [--previous-min-t 8192]
        [--previous-min-t-wide 2048] [--out bench/results]

For each shape (T, d_in, d_out), K = 3 adapters of rank 16 (R = 48) with LoraMap rank 16, bf16:
cuBLAS's base layer (F.linear), lorafuse.lora_linear as it is (kernels.shrink: the copy-engine
shrink from TMA_MIN_T rows, and from TMA_MIN_T_WIDE where d_in >= TMA_WIDE_D_IN) and with the
thresholds --previous-min-t and --previous-min-t-wide ("previous"; the defaults are the thresholds before
the copy engine ran from 4096 rows at d_in = 4096), each replayed from a CUDA graph (GPU time) and
called directly (what an eager caller sees, host time included). L2 flushed before each call; every
variant timed once per round, the order reversed every other round; the table gives medians over rounds and the ratio
to the base timed the same way. (shrink-table-ab-b480b50-*.json compared the H200 sweep's fastest
launch shapes, copy engine from 2048 rows, against the H100 table; shrink-table-ab-a5b1094-*.json
the wide layers from 2048 rows against from 8192, as --previous-min-t-wide 8192 does.) Writes
shrink-table-ab-<gpu>-<date>.json.
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
from common import env_info, graphed, layer_inputs, round_order, save_json, warm_up  # noqa: E402

import lorafuse  # noqa: E402

shrink_module = importlib.import_module("lorafuse.kernels.shrink")
CURRENT = (shrink_module.TMA_MIN_T, shrink_module.TMA_MIN_T_WIDE)
PREVIOUS = [8192, 2048]


def use_table(name: str) -> None:
    shrink_module.TMA_MIN_T, shrink_module.TMA_MIN_T_WIDE = CURRENT if name == "current" else PREVIOUS


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    p.add_argument("--dims", nargs="+", default=["4096x4096", "4096x14336", "14336x4096"])
    p.add_argument("--rounds", type=int, default=6, help="an even count (the order reverses every other round)")
    p.add_argument("--previous-min-t", type=int, default=PREVIOUS[0])
    p.add_argument("--previous-min-t-wide", type=int, default=PREVIOUS[1])
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    PREVIOUS[:] = [args.previous_min_t, args.previous_min_t_wide]
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
                for i in range(args.rounds):
                    for k in round_order(list(variants), i):
                        times[k].append(do_bench(variants[k], warmup=10, rep=60, return_mode="median"))
            med = {k: statistics.median(v) for k, v in times.items()}
            row = {"T": T, "d_in": d_in, "d_out": d_out, "ms": med, "ms_rounds": times,
                   "current_min_t": list(CURRENT), "previous_min_t": list(PREVIOUS),
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

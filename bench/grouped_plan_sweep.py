"""The grouped routing schedule's small kernels under their launch sizes, replayed from CUDA graphs.

    python bench/grouped_plan_sweep.py [--T 2048 8192] [--K 64] [--out bench/results]

Times group_rows (the zero fill, the counting launch and the plan launch) over COUNT_BLOCK rows
per counting program, route_select (the logits' thin GEMM and the selection kernel) over
SELECT_ELEMS logits per selection program, and one grouped pass of segmented_lora_ (plan, row
shrink, row expand onto a d_in-wide output; adapters of rank 16) over the expand's
GROUPED_EXPAND_BLOCK_N, GROUPED_EXPAND_WARPS, GROUPED_EXPAND_COL_BLOCKS and GROUPED_EXPAND_STAGES (in
alternating-order rounds), each the median of do_bench over graph replays (L2
flushed). Ids are drawn uniformly over K adapters, as an Arrow router over a random library gives.
Writes grouped-plan-sweep-<gpu>-<date>.json.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(__file__))
from common import env_info, graphed, save_json, warm_up  # noqa: E402

import lorafuse.kernels.routing as rk  # noqa: E402
import lorafuse.kernels.segmented as sk  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--K", type=int, nargs="+", default=[64])
    p.add_argument("--d", type=int, default=4096)
    p.add_argument("--out", default="bench/results")
    p.add_argument("--rounds", type=int, default=2, help="rounds of the grouped-pass variants")
    p.add_argument("--skip-small", action="store_true", help="time the grouped pass only")
    args = p.parse_args()
    assert torch.cuda.is_available(), "grouped_plan_sweep.py needs a GPU"
    warm_up()

    def bench(f):
        f()
        return do_bench(graphed(f), warmup=25, rep=100, return_mode="median") * 1e3

    defaults = (sk.COUNT_BLOCK, rk.SELECT_ELEMS, sk.GROUPED_EXPAND_BLOCK_N, sk.GROUPED_EXPAND_WARPS,
                sk.GROUPED_EXPAND_COL_BLOCKS, sk.GROUPED_EXPAND_STAGES)
    rows = []
    for T in args.T:
        for K in args.K:
            ids = torch.randint(0, K, (T,), device="cuda", dtype=torch.int32)
            x = torch.randn(T, args.d, device="cuda", dtype=torch.bfloat16)
            router = torch.randn(K, args.d, device="cuda", dtype=torch.bfloat16) / args.d ** 0.5
            row = {"T": T, "K": K, "d_in": args.d, "group_rows_us": {}, "route_select_us": {}}
            for cb in (() if args.skip_small else (128, 256, 512, 1024)):
                sk.COUNT_BLOCK = cb
                row["group_rows_us"][cb] = bench(lambda: sk.group_rows(ids, K, 64))
            for el in (() if args.skip_small else (1024, 2048, 4096, 8192)):
                rk.SELECT_ELEMS = el
                for top_k in (1, 2):
                    row["route_select_us"][f"{el}_top{top_k}"] = bench(
                        lambda top_k=top_k: rk.route_select(x, router, top_k, 1.0, True, None, check=False))
            row["logits_mm_us"] = bench(lambda: torch.mm(x, router.t()))
            fac_in = torch.randn(K, 16, args.d, device="cuda", dtype=torch.bfloat16) / args.d ** 0.5
            fac_out = torch.randn(K, 16, args.d, device="cuda", dtype=torch.bfloat16)
            ranks = torch.full((K,), 16, device="cuda", dtype=torch.int32)
            scales = torch.ones(K, device="cuda")
            gates = torch.rand(T, device="cuda")
            y = torch.zeros(T, args.d, device="cuda", dtype=torch.bfloat16)
            row["grouped_pass_us"] = {}
            # (BLOCK_N, warps, column blocks per program, pipeline stages over them); rounds in
            # alternating order so that no variant always runs first.
            variants = [(128, 4, 1, 1), (64, 4, 1, 1), (256, 8, 1, 1), (128, 4, 2, 2), (128, 4, 4, 2),
                        (128, 4, 4, 3), (128, 4, 8, 3), (64, 4, 8, 3), (128, 8, 4, 3), (256, 8, 4, 3)]
            graphs = []
            for bn, w, cb, st in variants:
                (sk.GROUPED_EXPAND_BLOCK_N, sk.GROUPED_EXPAND_WARPS, sk.GROUPED_EXPAND_COL_BLOCKS,
                 sk.GROUPED_EXPAND_STAGES) = bn, w, cb, st
                f = (lambda: sk.segmented_lora_(y, x, fac_in, fac_out, ranks, scales, ids, schedule="grouped",
                                                row_scale=gates))
                f()
                graphs.append((f"n{bn}_w{w}_c{cb}_s{st}", graphed(f)))
            times = {name: [] for name, _ in graphs}
            for rnd in range(args.rounds):
                for name, g in (graphs if rnd % 2 == 0 else graphs[::-1]):
                    times[name].append(do_bench(g, warmup=25, rep=100, return_mode="median") * 1e3)
            row["grouped_pass_us"] = {k: sum(v) / len(v) for k, v in times.items()}
            row["grouped_pass_rounds_us"] = times
            (sk.COUNT_BLOCK, rk.SELECT_ELEMS, sk.GROUPED_EXPAND_BLOCK_N, sk.GROUPED_EXPAND_WARPS,
             sk.GROUPED_EXPAND_COL_BLOCKS, sk.GROUPED_EXPAND_STAGES) = defaults
            print(row, flush=True)
            rows.append(row)
    print("defaults (count block, select elems, expand block_n, warps, col blocks, stages):", defaults)
    print("wrote", save_json({"env": env_info(sys.argv), "rows": rows}, args.out, "grouped-plan-sweep"))


if __name__ == "__main__":
    main()

"""The decode layer's pipeline depth: LoraMap (R = 48, m = 16, bf16) at T = 16 and 64 on three shapes,
the recomputing layer with its table config and with 5, 6 or 8 stages, the shared shrink (8 items)
with 4-12 stages; CUDA-graph replays, L2 flushed before each, 2 interleaved rounds, each ratio
against F.linear in the same round. Configs that do not fit in shared memory are reported and
skipped. Writes decode-stages-<gpu>-<date>.json.

    python bench/decode_stages.py [--out bench/results]
"""
import argparse
import importlib
import os
import statistics
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(__file__))
from common import env_info, graphed, layer_inputs, save_json  # noqa: E402

from lorafuse.kernels import lora_gemm_fused  # noqa: E402

lg = importlib.import_module("lorafuse.kernels.lora_gemm")
p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--out", default="bench/results")
args = p.parse_args()

dt, dev, R, m = torch.bfloat16, "cuda", 48, 16
rows = []
for T in (16, 64):
    for d_in, d_out in ((4096, 4096), (4096, 14336), (14336, 4096)):
        x, w, a, b, scale, am, bm = layer_inputs(T, d_in, d_out, R, m, dt, dev)
        tab = lg.gemm_config(T, d_out, d_in, fused=True, R=R, dtype=dt)
        bm_, bn = tab.kwargs["BLOCK_M"], tab.kwargs["BLOCK_N"]
        variants = {"base": graphed(lambda: F.linear(x, w))}
        ref = lora_gemm_fused(x, w, None, a, b, scale, am, bm, shared=False)[0].float()
        specs = [("recompute_table", False, tab, None)]
        for bk, st in ((128, 5), (128, 6), (64, 8)):
            specs.append((f"recompute_k{bk}_s{st}", False, lg._cfg(bm_, bn, bk, 4, st), None))
        for bk, st in ((128, 4), (128, 6), (128, 8), (128, 12), (256, 6), (64, 12)):
            specs.append((f"shared8_k{bk}_s{st}", True, lg._cfg(bm_, bn, bk, 4, st), 8))
        for name, shared, cfg, sp in specs:
            fn = lambda shared=shared, cfg=cfg, sp=sp: lora_gemm_fused(x, w, None, a, b, scale, am, bm, shared=shared,
                                                                      config=cfg, splits=sp)
            try:
                err = ((fn()[0].float() - ref).norm() / ref.norm()).item()
                assert err < 1e-2, err
                variants[name] = graphed(fn)
            except Exception as e:  # out of shared memory
                print(T, d_in, d_out, name, "failed:", type(e).__name__, str(e)[:100], flush=True)
        runs = {k: [] for k in variants}
        for _ in range(2):
            for k, f in variants.items():
                runs[k].append(do_bench(f, warmup=25, rep=100, return_mode="median"))
        ratio = {k: statistics.fmean(v / bb for v, bb in zip(runs[k], runs["base"])) for k in runs}
        rows.append({"T": T, "d_in": d_in, "d_out": d_out, "table": dict(tab.kwargs, stages=tab.num_stages),
                     "ms_runs": runs, "ratio": ratio})
        print(f"T={T} {d_in}x{d_out} loramap (table BN {bn}, stages {tab.num_stages}): base "
              f"{statistics.fmean(runs['base']) * 1e3:.1f} us | "
              + " | ".join(f"{k} {v:.2f}" for k, v in ratio.items() if k != "base"), flush=True)
print("wrote", save_json({"env": env_info(sys.argv), "rows": rows}, args.out, "decode-stages"))

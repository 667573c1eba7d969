"""Sweep launch configs of every kernel on the GPU at hand; the winners feed the heuristic tables
in kernels/ (gemm_config, tma_config, split_config, row_config; FUSED_MAX_T in lorafuse/ops.py).

    python bench/tune.py [--quick] [--out bench/results]

Writes tune-<gpu>-<date>.json: for each kernel and shape, every config's median time (do_bench,
L2 flushed before each timed call), the base GEMM (cuBLAS via F.linear) of the same shape measured
in the same run, and each config's max error against torch (a config that computes garbage is
reported, never picked).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(__file__))
from common import env_info, save_json  # noqa: E402

import importlib  # noqa: E402

# The modules, not the functions lorafuse.kernels exports under the same names.
lg = importlib.import_module("lorafuse.kernels.lora_gemm")
sh = importlib.import_module("lorafuse.kernels.shrink")


def bench(fn, rep=40):
    return do_bench(fn, warmup=10, rep=rep, return_mode="median")


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


SAVE = None  # set by main: writes what has been measured so far (a cut-off run keeps it)


def sweep(name, shapes, make, configs, run, check, results, budget_s):
    t0 = time.time()
    for shape in shapes:
        inputs = make(*shape)
        ref = check(inputs)
        base = inputs.get("base")
        row = {"kernel": name, "shape": shape, "base_ms": bench(base) if base else None, "configs": []}
        for cfg in configs:
            if time.time() - t0 > budget_s:
                row["truncated"] = True
                break
            entry = {"config": dict(cfg) if isinstance(cfg, dict) else
                     {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}}
            try:
                out = run(inputs, cfg)
                entry["err"] = rel(out, ref)
                entry["ms"] = bench(lambda inputs=inputs, cfg=cfg: run(inputs, cfg))
            except Exception as e:  # a config that does not compile or fit is recorded, not fatal
                entry["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            row["configs"].append(entry)
        ok = [c for c in row["configs"] if "ms" in c and c["err"] < 2e-2]
        best = min(ok, key=lambda c: c["ms"]) if ok else None
        row["best"] = best
        results.append(row)
        b = f"{best['ms']:.4f} ms {best['config']}" if best else "none"
        base_s = f"base {row['base_ms']:.4f} ms, " if row["base_ms"] else ""
        print(f"[{name}] {shape}: {base_s}best {b}", flush=True)
        del inputs
        torch.cuda.empty_cache()
        if SAVE is not None:
            SAVE()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/results")
    p.add_argument("--quick", action="store_true", help="fewer shapes")
    p.add_argument("--only", default="",
                   help="comma list of sweeps: tma,portable,fused,shrink,shrink_single,shrink_bwd")
    args = p.parse_args()
    assert torch.cuda.is_available(), "tune.py needs a GPU"
    dt = torch.bfloat16
    dev = "cuda"
    results = []
    doc = {"env": env_info(sys.argv), "results": results}
    global SAVE
    SAVE = lambda: save_json(doc, args.out, "tune")  # noqa: E731
    only = set(filter(None, args.only.split(",")))
    want = lambda k: not only or k in only  # noqa: E731

    def make_gemm(T, N, K, R, layout="fwd"):
        x = torch.randn(T, K, device=dev, dtype=dt)
        w = torch.randn(N, K, device=dev, dtype=dt) / K ** 0.5
        s = torch.randn(T, R, device=dev, dtype=dt) if R else None
        c = torch.randn(N, R, device=dev, dtype=dt) / max(R, 1) ** 0.5 if R else None
        b = w.t() if layout == "fwd" else w.t().contiguous()
        cc = c.t() if (R and layout == "fwd") else (c.t().contiguous() if R else None)
        return {"a": x, "b": b, "s": s, "c": cc, "base": lambda: F.linear(x, w)}

    def check_gemm(i):
        ref = i["a"] @ i["b"]
        if i["s"] is not None:
            ref = ref + i["s"] @ i["c"]
        return ref

    big = [(8192, 4096, 4096, 48), (2048, 4096, 4096, 48), (8192, 14336, 4096, 48), (8192, 4096, 14336, 48),
           (512, 4096, 4096, 48), (8192, 4096, 4096, 512), (8192, 4096, 4096, 0)]
    if args.quick:
        big = big[:2]
    if want("tma"):
        cands = lg.tma_candidates()
        cands += [lg._cfg(128, 256, 64, 8, 3, FLATTEN=True, WARP_SPECIALIZE=True),
                  lg._cfg(128, 128, 64, 8, 4, FLATTEN=True, WARP_SPECIALIZE=True),
                  lg._cfg(128, 256, 64, 8, 3, FLATTEN=False, WARP_SPECIALIZE=True)]
        sweep("tma", big, make_gemm, cands,
              lambda i, cfg: lg.lora_gemm(i["a"], i["b"], i["s"], i["c"], impl="tma", config=cfg),
              check_gemm, results, budget_s=110)
        sweep("tma_bwd_layout", [(8192, 4096, 4096, 48)], lambda *s: make_gemm(*s, layout="bwd"),
              [lg.tma_config(8192, 4096, 4096)] + cands[:4],
              lambda i, cfg: lg.lora_gemm(i["a"], i["b"], i["s"], i["c"], impl="tma", config=cfg),
              check_gemm, results, budget_s=20)
    if want("portable"):
        sweep("portable", [(8192, 4096, 4096, 48), (512, 4096, 4096, 48), (64, 4096, 4096, 48),
                           (16, 4096, 4096, 48), (16, 4096, 14336, 48)],
              make_gemm, lg.gemm_candidates(),
              lambda i, cfg: lg.lora_gemm(i["a"], i["b"], i["s"], i["c"], impl="portable", config=cfg),
              check_gemm, results, budget_s=60)

    def make_fused(T, D, N, R, M):
        x = torch.randn(T, D, device=dev, dtype=dt)
        w = torch.randn(N, D, device=dev, dtype=dt) / D ** 0.5
        a = torch.randn(R, D, device=dev, dtype=dt) / D ** 0.5
        b = torch.randn(N, R, device=dev, dtype=dt) / R ** 0.5
        scale = torch.rand(R, device=dev) + 0.5
        am = torch.randn(M, R, device=dev) / R ** 0.5
        bm = torch.randn(R, M, device=dev) / M ** 0.5
        return {"x": x, "w": w, "a": a, "b": b, "scale": scale, "am": am, "bm": bm,
                "base": lambda: F.linear(x, w)}

    def check_fused(i):
        s = (i["x"].float() @ i["a"].float().t() @ i["am"].t() @ i["bm"].t()) * i["scale"]
        return i["x"].float() @ i["w"].float().t() + s.to(dt).float() @ i["b"].float().t()

    small = [(1, 4096, 4096, 48, 16), (16, 4096, 4096, 48, 16), (64, 4096, 4096, 48, 16),
             (16, 4096, 14336, 48, 16), (16, 14336, 4096, 48, 16), (256, 4096, 4096, 48, 16)]
    if want("fused"):
        fused_cands = [lg._cfg(bm, bn, bk, w, s) for bm in (16, 32, 64) for bn in (32, 64, 128)
                       for bk in (64, 128, 256) for w in (4,) for s in (3, 4) if not (bk == 256 and bn == 128)]
        sweep("fused", small, make_fused, fused_cands,
              lambda i, cfg: lg.lora_gemm_fused(i["x"], i["w"], None, i["a"], i["b"], i["scale"], i["am"], i["bm"],
                                                config=cfg)[0],
              check_fused, results, budget_s=90)

        # The split path at the same small shapes, for the FUSED_MAX_T crossover.
        def run_split(i, cfg):
            sp, _, _ = sh.shrink(i["x"], i["a"], i["scale"], i["am"], i["bm"])
            return lg.lora_gemm(i["x"], i["w"].t(), sp, i["b"].t(), config=cfg)
        sweep("split_small", small, make_fused,
              [lg._cfg(bm, bn, bk, 4, s) for bm in (16, 64) for bn in (64, 128) for bk in (128,) for s in (3, 4)]
              + [lg.tma_config(256, 4096, 4096)],
              lambda i, cfg: run_split(i, cfg) if "FLATTEN" not in cfg.kwargs else lg.lora_gemm(
                  i["x"], i["w"].t(), sh.shrink(i["x"], i["a"], i["scale"], i["am"], i["bm"])[0], i["b"].t(),
                  impl="tma", config=cfg),
              check_fused, results, budget_s=30)

    def make_shrink(T, D, R, M):
        i = make_fused(T, D, 8, R, M)
        i["base"] = None
        i["floor_ms"] = T * D * 2 / 3.0e9  # one read of x at 3.0 TB/s
        return i

    def check_shrink(i):
        return (i["x"].float() @ i["a"].float().t() @ i["am"].t() @ i["bm"].t()) * i["scale"]

    row_cands = [triton.Config({"BLOCK_T": bt, "BLOCK_D": bd}, num_warps=w, num_stages=s)
                 for bt in (16, 32, 64, 128) for bd in (64, 128, 256) for w in (4, 8) for s in (3, 4)
                 if not (bt == 128 and bd == 256)]
    shrink_shapes = [(8192, 4096, 48, 16), (2048, 4096, 48, 16), (8192, 14336, 48, 16), (8192, 4096, 512, 16),
                     (512, 4096, 48, 16), (16384, 4096, 128, 16)]
    split_cands = [{"BLOCK_T": bt, "BLOCK_K": bk, "BLOCK_R": br, "SPLITS": sp, "num_warps": w, "num_stages": 3}
                   for bt in (16, 32, 64) for bk in (128, 256) for br in (64, 128) for sp in (1, 2, 4) for w in (4,)]
    if want("shrink"):
        sweep("shrink_split", shrink_shapes, make_shrink, split_cands,
              lambda i, cfg: sh.shrink(i["x"], i["a"], i["scale"], i["am"], i["bm"], save=True, config=cfg)[0],
              check_shrink, results, budget_s=90)
    if want("shrink_single"):
        sweep("shrink_single", shrink_shapes, make_shrink, row_cands,
              lambda i, cfg: sh._shrink_single(i["x"], i["a"], i["scale"], i["am"], i["bm"], save=True,
                                               config=cfg)[0],
              check_shrink, results, budget_s=90)

    def make_bwd(T, N, R, M):
        i = make_fused(T, 8, N, R, M)
        i["dy"] = torch.randn(T, N, device=dev, dtype=dt)
        i["s"] = torch.randn(T, R, device=dev)
        i["u"] = torch.randn(T, M, device=dev)
        i["base"] = None
        return i

    def check_bwd(i):
        return ((i["dy"].float() @ i["b"].float()) * i["scale"]) @ i["bm"] @ i["am"]

    bwd_cands = [triton.Config({"BLOCK_T": c.kwargs["BLOCK_T"], "BLOCK_N": c.kwargs["BLOCK_D"]},
                               num_warps=c.num_warps, num_stages=c.num_stages) for c in row_cands]
    if want("shrink_bwd"):
        sweep("shrink_bwd", shrink_shapes[:4], make_bwd, bwd_cands,
              lambda i, cfg: sh._shrink_backward_single(i["dy"], i["b"], i["scale"], i["s"], i["u"], i["am"], i["bm"],
                                                        need_ds=True, need_dmap=True, need_dscale=False,
                                                        config=cfg)[0],
              check_bwd, results, budget_s=60)

    path = save_json(doc, args.out, "tune")
    print("wrote", path)


if __name__ == "__main__":
    try:
        main()
    except Exception:
        traceback.print_exc()
        sys.exit(1)

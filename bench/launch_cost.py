"""Host time of one small lorafuse layer call, level by level, on a GPU.

    python bench/launch_cost.py [--T 16] [--d 1024] [--out bench/results]

At a small shape the GPU finishes each kernel before the host has issued the next, so the wall time
of a long run of calls is the host's cost per call. Levels, from the outside in:

  module        MultiLoraLinear(x), no grad
  op            lorafuse.lora_linear(...) with the module's tensors
  launch_fn     kernels.lora_gemm_fused(...) (input checks, buffers, one Triton launch)
  triton_run    the JIT kernel launched with prebuilt arguments (Triton's own launch path)
  direct        the same through kernels.utils.launch (the compiled launcher, found by key)
  compiled_run  the compiled kernel's launcher called directly (the floor of a Triton launch)
  torch_linear  F.linear on the same shapes (for scale)
"""
import argparse
import json
import os
import sys
import time

import importlib

import torch
import torch.nn as nn
import torch.nn.functional as F

import lorafuse

sys.path.insert(0, os.path.dirname(__file__))
from common import env_info, save_json  # noqa: E402

lg = importlib.import_module("lorafuse.kernels.lora_gemm")
utils = importlib.import_module("lorafuse.kernels.utils")


def per_call_us(fn, n=2000):
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t) / n * 1e6)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, default=16)
    p.add_argument("--d", type=int, default=1024)
    p.add_argument("--out", default="bench/results", help="folder of the JSON result")
    args = p.parse_args()
    dev, dt = "cuda", torch.bfloat16
    torch.manual_seed(0)
    base = nn.Linear(args.d, args.d, bias=False, device=dev, dtype=dt)
    ads = [(torch.randn(16, args.d, device=dev, dtype=dt) * 0.01, torch.randn(args.d, 16, device=dev, dtype=dt) * 0.01,
            2.0) for _ in range(3)]
    x = torch.randn(args.T, args.d, device=dev, dtype=dt)
    rows = {}
    for method in ("sum", "loramap"):
        kw = {"map_rank": 16} if method == "loramap" else {}
        layer = lorafuse.MultiLoraLinear(base, ads, method=method, **kw)
        am = layer.a_map
        bm = layer.b_map
        sc = layer.scale
        w = base.weight

        def module():
            with torch.no_grad():
                return layer(x)

        def op():
            with torch.no_grad():
                return lorafuse.lora_linear(x, w, None, layer.a_cat, layer.b_cat, sc, am, bm)

        def launch_fn():
            return lg.lora_gemm_fused(x, w, None, layer.a_cat, layer.b_cat, sc, am, bm)

        for fast in (False, True):
            utils.FAST_LAUNCH = fast
            rows[f"{method}{'' if fast else ' (triton launch)'}"] = {
                "module": per_call_us(module), "op": per_call_us(op), "launch_fn": per_call_us(launch_fn)}
    # The JIT kernel with prebuilt arguments, as lora_gemm_fused would launch it (sum, no map).
    T, D, N, R = args.T, args.d, args.d, 48
    a_cat = torch.randn(R, D, device=dev, dtype=dt)
    b_cat = torch.randn(N, R, device=dev, dtype=dt)
    scale = torch.ones(R, device=dev)
    y = torch.empty(T, N, device=dev, dtype=dt)
    wt, ct = base.weight.t(), b_cat.t()
    cfg = lg.launch_kwargs(lg.gemm_config(T, N, D, fused=True, R=R, dtype=dt))
    jargs = (x, wt, x, ct, x, y, a_cat, scale, scale, scale, x, x, x, x, x,
             T, N, D, R, 1, lg.t_bucket(T), 1, 0,
             x.stride(0), x.stride(1), wt.stride(0), wt.stride(1), 0, 0, ct.stride(0), ct.stride(1),
             y.stride(0), y.stride(1), a_cat.stride(0), a_cat.stride(1), 0, 0, 0, 0, x.stride(0), x.stride(0),
             x.stride(0))
    const = dict(HAS_BIAS=False, FUSE_SHRINK=True, HAS_MAP=False, SAVE=False, PREC="tf32", MAP_PREC="ieee",
                 BLOCK_R=64, BLOCK_MR=16, EVEN_K=D % cfg["BLOCK_K"] == 0, MASK_ROWS=lg._mask_rows(T, cfg), **cfg)
    grid = (utils.cdiv(T, cfg["BLOCK_M"]) * utils.cdiv(N, cfg["BLOCK_N"]), 1, 1)
    compiled = lg._lora_gemm_kernel[grid](*jargs, **const)

    def triton_run():
        lg._lora_gemm_kernel[grid](*jargs, **const)

    names = list(lg._lora_gemm_kernel.arg_names)
    full = dict(zip(names[:len(jargs)], jargs))
    full.update({k: v for k, v in const.items() if k in names})
    ordered = [full[n] for n in names]
    stream = torch.cuda.current_stream().cuda_stream
    fn, meta, launcher = compiled.function, compiled.packed_metadata, compiled.run

    def compiled_run():
        launcher(grid[0], 1, 1, stream, fn, meta, None, None, None, *ordered)

    def direct():
        utils.launch(lg._lora_gemm_kernel, grid, *jargs, **const)

    rows["kernel"] = {"triton_run": per_call_us(triton_run), "direct": per_call_us(direct),
                      "compiled_run": per_call_us(compiled_run),
                      "torch_linear": per_call_us(lambda: F.linear(x, base.weight))}
    doc = {"env": env_info(sys.argv), "T": T, "d": D,
           "note": "microseconds per call; '(triton launch)' rows: LORAFUSE_FAST_LAUNCH off in the same process",
           "us_per_call": rows}
    print(json.dumps(rows, indent=1))
    print("wrote", save_json(doc, args.out, "launch-cost"))


if __name__ == "__main__":
    main()

"""Where the forward shrink's time goes at few rows: the shrink against a bare read of x timed the
same way, the measurement's own floor, and the op's parts.

    python bench/shrink_floor.py [--T 2048 4096 8192] [--d 4096] [--rounds 4] [--split-group-ab]
                                 [--out bench/results]

Every variant is replayed from its own CUDA graph with the L2 flushed before each replay (do_bench,
median), once per round, the order reversed every other round; medians over rounds. Variants, per
(T, d_in), bf16, R = 48, m = 16, d_out = d_in:
  noop        one kernel on a one-element tensor: what a replay costs with no work
  noop2       two such kernels, the second after the first: what a second launch adds
  read_best   the fastest of a few configs of a kernel that only reads x (one load of every element,
              one float per program stored): the byte floor as this method measures it
  shrink      shrink() as the op calls it (its default path for the shape), and its partial kernel
              alone where it has one ("shrink_partial"), and its finishing kernel alone on those
              partials ("shrink_finish")
  shrink_tma  the one-launch copy-engine shrink at a few split counts (Hopper)
  cublas_xa   torch.mm(x, a_cat^T, out_dtype=float32)
  gemm        lora_gemm(x, W^T, sp, b_cat^T) alone (the GEMM with its low-rank tail)
  base        cuBLAS x W^T
  op          lorafuse.lora_linear forward (no grad), LoraMap
  shrink_bt<n>, shrink_finish_bt<n>, op_bt<n>   with --finish-rows n: the finishing kernel's row block
              (kernels.shrink.FINISH_BLOCK_T) at n
  shrink_<prec>, op_<prec>   with --finish-ab: the forward finishing step's mapping products in the
              precision kernels.shrink.FINISH_MAP_PREC is not ("ieee" or "tf32x3")
  shrink_g1, op_g1   with --split-group-ab: shrink and op with kernels.shrink.SPLIT_GROUP = 1 (the
              split partials summed one load per step, as before SPLIT_GROUP)
  bwd, fb, base_fb   with --bwd-ab: shrink_backward as the LoraMap op's backward calls it (dS and
              the mapping's gradients), the op's forward+backward (x, a_map, b_map requiring grad)
              and the base's (x requiring grad); bwd_bt<n> with --bwd-rows n: the backward's
              finishing kernel at n rows per program (kernels.shrink.BWD_FINISH_BLOCK_T); with
              --bwd-prec-ab also bwd_<prec>, bwd_bt<n>_<prec> in the other precision
              (BWD_FINISH_MAP_PREC); with --bwd-cublas-ab bwd_cublas and fb_cublas: the backward's
              partial product dY b_cat from cuBLAS at any row count (kernels.shrink.BWD_CUBLAS_MIN_T
              and BWD_CUBLAS_MIN_T_WIDE = 1); with
              --bwd-before bwd_before and fb_before: the Triton partial and 32-row finishing programs
              everywhere (BWD_CUBLAS_MIN_T = 0, BWD_FINISH_BLOCK_T = 32).
              --bwd-only: only these, the no-op and the base
Writes shrink-floor-<gpu>-<date>.json.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(__file__))
from common import env_info, graph_rounds, layer_inputs, patched, save_json, warm_up  # noqa: E402

import lorafuse  # noqa: E402
from lorafuse.kernels import lora_gemm, shrink, shrink_backward  # noqa: E402
import importlib  # noqa: E402

shrink_module = importlib.import_module("lorafuse.kernels.shrink")
from lorafuse.kernels.shrink import _rows_partial, finish, split_config, tma_shrink_config  # noqa: E402
from lorafuse.kernels.lora_gemm import _tma_available  # noqa: E402
from lorafuse.kernels.utils import num_sms  # noqa: E402


@triton.jit
def _read_kernel(x_ptr, out_ptr, T, D, D_PER, stride_t, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Reads rows pid_t * BLOCK_T .. of x over columns pid_s * D_PER .. and stores one float: every
    element loaded once, nothing else done with it."""
    pid_s = tl.program_id(0)
    pid_t = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for d0 in range(pid_s * D_PER, tl.minimum(pid_s * D_PER + D_PER, D), BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        acc += tl.load(x_ptr + offs_t[:, None] * stride_t + offs_d[None, :]).to(tl.float32)
    tl.store(out_ptr + pid_t * tl.num_programs(0) + pid_s, tl.sum(acc))


def read_x(x, out, bt, bd, splits, warps, stages):
    T, D = x.shape
    per = triton.cdiv(triton.cdiv(D, splits), bd) * bd
    _read_kernel[(triton.cdiv(D, per), triton.cdiv(T, bt))](x, out, T, D, per, x.stride(0), BLOCK_T=bt,
                                                            BLOCK_D=bd, num_warps=warps, num_stages=stages)


def with_setting(fn, attr: str, value):
    """fn run with kernels.shrink.<attr> set to value (read when its graph is captured)."""
    def run():
        with patched(shrink_module, attr, value):
            return fn()
    return run


def no_grad(fn):
    def run():
        with torch.no_grad():
            return fn()
    return run


def backward_names(fns: dict) -> set:
    return {k for k in fns if k == "base_fb" or k.startswith(("fb", "bwd"))}


def add_backward(fns: dict, x, w, a, b, scale, am, bm, rows=(), prec_ab: bool = False,
                 cublas_ab: bool = False, before: bool = False) -> None:
    """The backward variants of --bwd-ab (see the module's docstring) added to fns."""
    dy = torch.randn(x.shape[0], w.shape[0], device=x.device, dtype=x.dtype)
    with torch.no_grad():
        _, s, u = shrink(x, a, scale, am, bm, save=True)
    xg = x.detach().requires_grad_(True)
    amg, bmg = am.detach().requires_grad_(True), bm.detach().requires_grad_(True)
    prec = "tf32x3" if shrink_module.BWD_FINISH_MAP_PREC == "ieee" else "ieee"
    bwd = no_grad(lambda: shrink_backward(dy, b, scale, s, u, am, bm, need_ds=True, need_dmap=True, check=False))
    fns["base_fb"] = lambda: torch.autograd.grad(torch.mm(xg, w.t()), [xg], dy)
    fns["fb"] = lambda: torch.autograd.grad(lorafuse.lora_linear(xg, w, None, a, b, scale, amg, bmg),
                                            [xg, amg, bmg], dy)
    fns["bwd"] = bwd
    if prec_ab:
        fns[f"bwd_{prec}"] = with_setting(bwd, "BWD_FINISH_MAP_PREC", prec)
    if before:  # the backward as it was before bwd_finish_rows and the cuBLAS partial
        for name, fn in (("bwd_before", bwd), ("fb_before", fns["fb"])):
            fns[name] = with_setting(with_setting(fn, "BWD_CUBLAS_MIN_T", 0), "BWD_FINISH_BLOCK_T", 32)
    if cublas_ab:
        for name, fn in (("bwd_cublas", bwd), ("fb_cublas", fns["fb"])):
            fns[name] = with_setting(with_setting(fn, "BWD_CUBLAS_MIN_T", 1), "BWD_CUBLAS_MIN_T_WIDE", 1)
    for bt in rows:
        fns[f"bwd_bt{bt}"] = with_setting(bwd, "BWD_FINISH_BLOCK_T", bt)
        if prec_ab:
            fns[f"bwd_bt{bt}_{prec}"] = with_setting(fns[f"bwd_bt{bt}"], "BWD_FINISH_MAP_PREC", prec)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, nargs="+", default=[2048, 4096, 8192])
    p.add_argument("--d", type=int, nargs="+", default=[4096])
    p.add_argument("--R", type=int, default=48)
    p.add_argument("--m", type=int, default=16)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--split-group-ab", action="store_true", help="also time shrink and op with SPLIT_GROUP = 1")
    p.add_argument("--finish-rows", type=int, nargs="*", default=[], help="also time FINISH_BLOCK_T at these")
    p.add_argument("--finish-ab", action="store_true", help="also time the finishing step in the other precision")
    p.add_argument("--bwd-ab", action="store_true", help="also time the backward's finishing kernel's forms")
    p.add_argument("--bwd-only", action="store_true", help="with --bwd-ab: only the backward variants")
    p.add_argument("--bwd-rows", type=int, nargs="*", default=[], help="with --bwd-ab: BWD_FINISH_BLOCK_T at these")
    p.add_argument("--bwd-prec-ab", action="store_true", help="with --bwd-ab: also the other precision")
    p.add_argument("--bwd-cublas-ab", action="store_true", help="with --bwd-ab: also dY b_cat from cuBLAS")
    p.add_argument("--bwd-before", action="store_true",
                   help="with --bwd-ab: also the backward with a Triton partial and 32-row finishing programs")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    assert torch.cuda.is_available(), "shrink_floor.py needs a GPU"
    other_prec = "ieee" if shrink_module.FINISH_MAP_PREC == "tf32x3" else "tf32x3"
    dev = torch.device("cuda")
    sms = num_sms(dev)
    warm_up()
    tiny = torch.zeros(1, device=dev)
    rows = []
    for d in args.d:
        for T in args.T:
            x, w, a, b, scale, am, bm = layer_inputs(T, d, d, args.R, args.m)
            assert x.shape[0] % 64 == 0 and d % 512 == 0, "the read kernel takes whole blocks only"
            out = torch.empty(4 * sms * 64, device=dev)
            fns = {"noop": lambda: tiny.add_(1), "noop2": lambda: (tiny.add_(1), tiny.add_(1))}
            if args.bwd_only:
                fns = {"noop": fns["noop"], "base": no_grad(lambda: torch.mm(x, w.t()))}
                add_backward(fns, x, w, a, b, scale, am, bm, args.bwd_rows, args.bwd_prec_ab,
                             args.bwd_cublas_ab, args.bwd_before)
                med, per_round = graph_rounds(fns, args.rounds)
                us = {k: v * 1e3 for k, v in med.items()}
                rows.append({"T": T, "d_in": d, "d_out": d, "R": args.R, "m": args.m, "us": us,
                             "rounds_us": {k: [t * 1e3 for t in v] for k, v in per_round.items()},
                             "timing": "cuda graph replay, L2 flushed, median over rounds"})
                print(f"T={T} d={d}: " + ", ".join(f"{k} {v:.1f}" for k, v in us.items())
                      + " | over base_fb: " + ", ".join(f"{k} {us[k] / us['base_fb']:.3f}x" for k in us
                                                        if k.startswith("fb")), flush=True)
                continue
            reads = {}
            for bt, bd, w_, st in ((64, 128, 4, 4), (32, 256, 4, 3), (64, 256, 8, 3), (128, 128, 8, 3)):
                for per_sm in (1, 2, 4):
                    splits = max(1, min(round(per_sm * sms / (T // bt)), d // bd))
                    if (T // bt) * splits > out.numel():
                        continue
                    name = f"read_t{bt}_d{bd}_w{w_}_s{st}_x{splits}"
                    reads[name] = (bt, bd, splits, w_, st)
                    fns[name] = (lambda c=(bt, bd, splits, w_, st): read_x(x, out, *c))
            fns["shrink"] = lambda: shrink(x, a, scale, am, bm, check=False)
            cfg = split_config(T, d, args.R, x.dtype, dev)
            fns["shrink_partial"] = lambda: _rows_partial(x, a.t(), T, d, args.R, cfg)
            part, n_splits = _rows_partial(x, a.t(), T, d, args.R, cfg)
            sp_out = torch.empty(T, args.R, device=dev, dtype=x.dtype)
            fns["shrink_finish"] = lambda: finish(part, n_splits, scale, am, bm, sp_out, None, None)
            if _tma_available(dev):
                base_cfg = tma_shrink_config(T, d, args.R, sms)
                for splits in sorted({base_cfg["SPLITS"], 2, 4, 8}):
                    c = dict(base_cfg, SPLITS=splits)
                    fns[f"shrink_tma_x{splits}"] = (lambda c=c: shrink(x, a, scale, am, bm, config=c, check=False))
            fns["cublas_xa"] = lambda: torch.mm(x, a.t(), out_dtype=torch.float32)
            sp = shrink(x, a, scale, am, bm)[0]
            fns["gemm"] = lambda: lora_gemm(x, w.t(), sp, b.t())
            fns["base"] = lambda: torch.mm(x, w.t())
            fns["op"] = lambda: lorafuse.lora_linear(x, w, None, a, b, scale, am, bm)
            if args.split_group_ab:
                fns["shrink_g1"] = with_setting(fns["shrink"], "SPLIT_GROUP", 1)
                fns["op_g1"] = with_setting(fns["op"], "SPLIT_GROUP", 1)
            if args.bwd_ab:
                add_backward(fns, x, w, a, b, scale, am, bm, args.bwd_rows, args.bwd_prec_ab,
                             args.bwd_cublas_ab, args.bwd_before)
            fns = {k: (f if k in backward_names(fns) else no_grad(f)) for k, f in fns.items()}
            for name in ("shrink", "shrink_finish", "op"):
                if args.finish_ab:
                    fns[f"{name}_{other_prec}"] = with_setting(fns[name], "FINISH_MAP_PREC", other_prec)
                for bt in args.finish_rows:
                    fns[f"{name}_bt{bt}"] = with_setting(fns[name], "FINISH_BLOCK_T", bt)
            med, per_round = graph_rounds(fns, args.rounds)  # each variant sets its own grad mode
            us = {k: v * 1e3 for k, v in med.items()}
            best_read = min(reads, key=lambda k: us[k])
            row = {"T": T, "d_in": d, "d_out": d, "R": args.R, "m": args.m, "us": us,
                   "rounds_us": {k: [t * 1e3 for t in v] for k, v in per_round.items()},
                   "read_best": best_read, "x_mb": T * d * 2 / 1e6,
                   "shrink_config": {k: v for k, v in cfg.items()},
                   "timing": "cuda graph replay, L2 flushed, median over rounds"}
            rows.append(row)
            tmas = {k: round(v, 1) for k, v in us.items() if k.startswith("shrink_tma")}
            print(f"T={T} d={d}: noop {us['noop']:.1f} us, two {us['noop2']:.1f} | read {us[best_read]:.1f} "
                  f"({best_read}) | shrink {us['shrink']:.1f} (partial {us['shrink_partial']:.1f}, finish "
                  f"{us['shrink_finish']:.1f}) | tma {tmas} | cuBLAS x a^T "
                  f"{us['cublas_xa']:.1f} | gemm {us['gemm']:.1f} | base {us['base']:.1f} | op {us['op']:.1f} "
                  f"({us['op'] / us['base']:.3f}x)" + (f" | one load per step: shrink {us['shrink_g1']:.1f}, op "
                  f"{us['op_g1']:.1f} ({us['op_g1'] / us['base']:.3f}x)" if args.split_group_ab else "")
                  + "".join(f" | finish rows {bt}: shrink {us[f'shrink_bt{bt}']:.1f}, finish "
                            f"{us[f'shrink_finish_bt{bt}']:.1f}, op {us[f'op_bt{bt}'] / us['base']:.3f}x"
                            for bt in args.finish_rows)
                  + "".join(f" | {v}: shrink {us[f'shrink_{v}']:.1f}, finish {us[f'shrink_finish_{v}']:.1f}, op "
                            f"{us[f'op_{v}'] / us['base']:.3f}x"
                            for v in ((other_prec,) if args.finish_ab else ())), flush=True)
    print("wrote", save_json({"env": env_info(sys.argv), "rows": rows}, args.out, "shrink-floor"))


if __name__ == "__main__":
    main()

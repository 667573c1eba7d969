"""Mixed-batch decoding (one adapter per row, few rows): segmented_linear_decode against cuBLAS
plus the gathered row kernels, and a sweep of its launch configs.

    python bench/segmented_decode.py [--dims 4096x4096 4096x14336 14336x4096] [--T 1 16 32 64]
                                     [--library 64] [--r 16] [--sweep-T 16 64] [--sweep-kind all]

Every layer is timed replayed from a CUDA graph (the way decoding runs; eager calls at these sizes
measure the host), L2 flushed before each replay, median of do_bench: the base layer alone (cuBLAS),
"unfused" (cuBLAS beside the gathered row shrink on a side stream, then the gathered expand: the
path before the decode kernels), "decode" (segmented_linear_decode with its heuristic config),
"decode_nopdl" (the same without programmatic dependent launch), and at --sweep-T every candidate
config of the decode GEMM, each checked against a float32 reference.
Also the per-kernel GPU times (torch.profiler) of both paths. Writes segmented-decode-<gpu>-<date>.json.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(__file__))
from bench_kernels import _graphed  # noqa: E402
from common import env_info, save_json, warm_up  # noqa: E402
from routed_profile import kernel_table  # noqa: E402

import lorafuse.kernels.segmented as S  # noqa: E402
from lorafuse.kernels.segmented import decode_config, segmented_linear_decode, segmented_lora_  # noqa: E402
from lorafuse.kernels.utils import num_sms  # noqa: E402
from lorafuse.segmented import LoraLibrary  # noqa: E402


def candidates(kind: str):
    """Launch configs of the decode GEMM: "pointer" (_decode_kernel) or "tma" (_decode_tma_kernel;
    SWAP puts W's rows on the MMA's M side, which needs BLOCK_N >= 64)."""
    if kind in ("pointer", "all"):
        for bn, bk, stages in itertools.product((16, 32, 64), (64, 128, 256), (3, 4, 5)):
            yield triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=4, num_stages=stages)
    if kind == "tma-deep":  # deeper pipelines of the narrow layers' best tiles (after the "tma" sweep)
        for swap, bn, bk, stages in ((True, 64, 128, 6), (True, 64, 128, 8), (False, 64, 128, 8),
                                     (False, 32, 128, 6), (False, 32, 128, 8), (False, 32, 128, 10),
                                     (False, 32, 256, 4), (False, 32, 256, 6), (True, 64, 256, 4)):
            yield triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "TMA": True, "SWAP": swap}, num_warps=4,
                                num_stages=stages)
    if kind in ("tma", "all"):
        for swap, bn, bk, stages in itertools.product((False, True), (32, 64, 128), (64, 128), (4, 6)):
            if swap and bn < 64 or bn * bk * stages > 128 * 128 * 4:  # (shared memory)
                continue
            yield triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "TMA": True, "SWAP": swap}, num_warps=4,
                                num_stages=stages)


def layer_and_library(d_in: int, d_out: int, n: int, r: int, dev: str, dt: torch.dtype):
    """(generator, W (d_out, d_in), the n adapters (A, B, 2.0) of rank r, their LoraLibrary), seeded
    by the shape, so that every decode benchmark times the same layer."""
    gen = torch.Generator(device=dev).manual_seed(d_in + d_out)
    W = (torch.randn(d_out, d_in, device=dev, generator=gen) / d_in ** 0.5).to(dt)
    ads = [((torch.randn(r, d_in, device=dev, generator=gen) / d_in ** 0.5).to(dt),
            (torch.randn(d_out, r, device=dev, generator=gen) / r ** 0.5).to(dt), 2.0) for _ in range(n)]
    return gen, W, ads, LoraLibrary.from_adapters(ads)


def cfg_dict(c: triton.Config) -> dict:
    return dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dims", nargs="*", default=["4096x4096", "4096x14336", "14336x4096"])
    p.add_argument("--T", type=int, nargs="*", default=[1, 16, 32, 64])
    p.add_argument("--sweep-T", type=int, nargs="*", default=[16, 64])
    p.add_argument("--sweep-kind", choices=["pointer", "tma", "tma-deep", "all"], default="all",
                   help="which decode GEMM's configs the sweep tries")
    p.add_argument("--rounds", type=int, default=2,
                   help="sweep rounds, the configs' order reversed every other one (the mean is reported)")
    p.add_argument("--library", type=int, default=64)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    dev, dt = "cuda", torch.bfloat16
    doc = {"env": env_info([os.path.relpath(__file__)] + list(argv if argv is not None else sys.argv[1:])),
           "dtype": str(dt), "library": args.library, "r": args.r, "rows": []}
    bench = lambda f: do_bench(f, warmup=25, rep=200, return_mode="median") * 1e3  # noqa: E731 (us)
    warm_up()
    for dims in args.dims:
        d_in, d_out = map(int, dims.split("x"))
        gen, W, ads, lib = layer_and_library(d_in, d_out, args.library, args.r, dev, dt)
        lib_args = (lib.a, lib.b, lib.ranks, lib.scales)
        for T in args.T:
            x = torch.randn(T, d_in, device=dev, generator=gen).to(dt)
            # Distinct adapters per row, as many as there are rows (up to the library's size).
            ids = (torch.randperm(args.library, device=dev, generator=gen)[:T] if T <= args.library
                   else torch.randint(0, args.library, (T,), device=dev, generator=gen))
            ref = F.linear(x.float(), W.float())
            for t, i in enumerate(ids.tolist()):
                a, b, s = ads[i]
                ref[t] += s * (x[t].float() @ a.float().t()) @ b.float().t()

            def err(y):
                return ((y.float() - ref).norm() / ref.norm()).item()

            def unfused(xx):
                y = xx.new_empty((T, d_out))
                return segmented_lora_(y, xx, *lib_args, ids, "gathered", base=lambda: torch.mm(xx, W.t(), out=y))

            heur = decode_config(T, d_out, d_in, dt, num_sms(x.device), S.decode_uses_tma(x, W), lib.a.shape[1])
            row = {"T": T, "d_in": d_in, "d_out": d_out, "heuristic": cfg_dict(heur)}
            with torch.no_grad():
                g_base = _graphed(lambda xx: F.linear(xx, W), x)
                g_unf = _graphed(unfused, x)
                g_dec = _graphed(lambda xx: segmented_linear_decode(xx, W, None, *lib_args, ids), x)
                row["base_us"] = bench(g_base)
                row["unfused_us"], row["unfused_err"] = bench(g_unf), err(g_unf())
                row["decode_us"], row["decode_err"] = bench(g_dec), err(g_dec())
                pdl = S._pdl_supported
                S._pdl_supported = lambda _i: False
                try:
                    g_nopdl = _graphed(lambda xx: segmented_linear_decode(xx, W, None, *lib_args, ids), x)
                    row["decode_nopdl_us"], row["decode_nopdl_err"] = bench(g_nopdl), err(g_nopdl())
                finally:
                    S._pdl_supported = pdl
                row["kernels_unfused"] = kernel_table(g_unf)
                row["kernels_decode"] = kernel_table(g_dec)
                if T in args.sweep_T:
                    row["sweep"], graphs = [], []
                    for cfg in candidates(args.sweep_kind):
                        e = {"config": cfg_dict(cfg), "us_rounds": []}
                        try:
                            g = _graphed(lambda xx, c=cfg: segmented_linear_decode(xx, W, None, *lib_args, ids,
                                                                                   config=c), x)
                            e["err"] = err(g())
                            graphs.append((e, g))
                        except Exception as ex:  # a config that does not fit is recorded, not fatal
                            e["error"] = f"{type(ex).__name__}: {str(ex)[:200]}"
                        row["sweep"].append(e)
                    # Rounds in alternating order, so that no config always runs first or last.
                    for rnd in range(args.rounds):
                        for e, g in (graphs if rnd % 2 == 0 else graphs[::-1]):
                            e["us_rounds"].append(bench(g))
                    for e, g in graphs:
                        e["us"] = sum(e["us_rounds"]) / len(e["us_rounds"])
                    del graphs
                    ok = sorted((e for e in row["sweep"] if "us" in e and e["err"] < 2e-2), key=lambda e: e["us"])
                    row["sweep_best"] = ok[:5]
            doc["rows"].append(row)
            best = f" best {row['sweep_best'][0]['us']:.1f} us {row['sweep_best'][0]['config']}" if row.get(
                "sweep_best") else ""
            print(f"{d_in}x{d_out} T={T}: base {row['base_us']:.1f} us, unfused {row['unfused_us']:.1f} "
                  f"({row['unfused_us'] / row['base_us']:.2f}x), decode {row['decode_us']:.1f} "
                  f"({row['decode_us'] / row['base_us']:.2f}x; no PDL {row['decode_nopdl_us']:.1f}) "
                  f"err {row['decode_err']:.1e}{best}", flush=True)
            print("   decode kernels:", {k[:30]: v for k, v in row["kernels_decode"].items()}, flush=True)
            save_json(doc, args.out, "segmented-decode")
    print("wrote", save_json(doc, args.out, "segmented-decode"))


if __name__ == "__main__":
    main()

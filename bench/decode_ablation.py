"""Where the mixed-batch decode layer's time goes as rows are added: segmented_linear_decode from
CUDA graphs (L2 flushed before each replay) with the rows' adapters varied, the epilogue's chunk and
warps varied, and the row shrink timed alone.

    python bench/decode_ablation.py [--dims 4096x4096 14336x4096] [--T 1 4 16 32 64] [--rounds 3]

Variants per (shape, T), each checked against a float32 reference:
  base        F.linear (cuBLAS)
  distinct    one distinct adapter per row (the benchmark's mixed batch)
  same        every row on adapter 0 (one factor gather shared by all rows)
  none        every row id -1 (no adapter: the shrink skips its loop, the epilogue's loads are masked)
  nopdl       distinct, without programmatic dependent launch
  epi<L>      distinct, the epilogue's chunk loop EPI_LOOP = L (1: not pipelined, 2: unrolled)
  none_epi<L> none, EPI_LOOP = L
  epi<L>_chunk<C>, chunk<C>: CHUNK_T = C rows per epilogue dot
  previous    distinct, the epilogue's loop and chunk as before decode_epilogue_loop (1daeacc)
  shrink      the gathered row shrink alone (distinct)
  k<K>_s<S>   distinct, W's tiles BLOCK_K = K deep with S pipeline stages (TILES)
Rounds run the variants in alternating order; the mean of the rounds' medians is reported.
Writes decode-ablation-<commit>-<gpu>-<date>.json.
"""
from __future__ import annotations

import argparse
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
from segmented_decode import layer_and_library  # noqa: E402

import lorafuse.kernels.segmented as S  # noqa: E402
from lorafuse.kernels.utils import block_for, num_sms  # noqa: E402


# (BLOCK_K, stages) of W's tiles tried beside decode_config's (the same BLOCK_N, warps and kernel).
TILES = ((64, 10), (128, 4), (128, 6), (128, 8), (256, 3), (256, 4), (256, 5))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dims", nargs="*", default=["4096x4096", "14336x4096"])
    p.add_argument("--T", type=int, nargs="*", default=[1, 4, 16, 32, 64])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--variants", nargs="*", help="time only these variants (and the base)")
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
            ids = {"distinct": torch.randperm(args.library, device=dev, generator=gen)[:T].contiguous(),
                   "same": torch.zeros(T, dtype=torch.long, device=dev),
                   "none": torch.full((T,), -1, dtype=torch.long, device=dev)}

            def ref(which):
                out = F.linear(x.float(), W.float())
                for t, i in enumerate(ids[which].tolist()):
                    if i >= 0:
                        a, b, s = ads[i]
                        out[t] += s * (x[t].float() @ a.float().t()) @ b.float().t()
                return out

            refs = {k: ref(k) for k in ids}
            tma = S.decode_uses_tma(x, W)
            heur = S.decode_config(T, d_out, d_in, dt, num_sms(x.device), tma, args.r)

            def with_cfg(**kw):
                c = dict(heur.kwargs)
                warps = kw.pop("num_warps", heur.num_warps)
                stages = kw.pop("num_stages", heur.num_stages)
                c.update(kw)
                return triton.Config(c, num_warps=warps, num_stages=stages)

            def dec(which, **kw):
                cfg = with_cfg(**kw) if kw else None
                return (lambda xx: S.segmented_linear_decode(xx, W, None, *lib_args, ids[which], config=cfg)), which

            variants = {"base": (lambda xx: F.linear(xx, W), None)}
            for k in ids:
                variants[k] = dec(k)
            for loop in (1, 2):
                variants[f"epi{loop}"] = dec("distinct", EPI_LOOP=loop)
                variants[f"none_epi{loop}"] = dec("none", EPI_LOOP=loop)
                for c in (4, 8, 16):
                    variants[f"epi{loop}_chunk{c}"] = dec("distinct", EPI_LOOP=loop, CHUNK_T=c)
            variants["chunk8"] = dec("distinct", CHUNK_T=8)
            # The epilogue as before decode_chunk_rows / decode_epilogue_loop (1daeacc).
            variants["previous"] = dec("distinct", EPI_LOOP=0, CHUNK_T=min(block_for(T), 256 // block_for(args.r)))
            variants["shrink"] = (lambda xx: S._gathered_shrink(xx, lib.a, lib.ranks, ids["distinct"]), None)
            for bk, st in TILES:
                variants[f"k{bk}_s{st}"] = dec("distinct", BLOCK_K=bk, num_stages=st)
            if args.variants:
                variants = {k: v for k, v in variants.items() if k in args.variants or k == "base"}
            row = {"T": T, "d_in": d_in, "d_out": d_out, "heuristic": dict(heur.kwargs, num_warps=heur.num_warps,
                                                                           num_stages=heur.num_stages),
                   "variants": {}}
            graphs, by_name = [], {}
            with torch.no_grad():
                for name, (fn, which) in variants.items():
                    e = {"us_rounds": []}
                    try:
                        g = _graphed(fn, x)
                        if which is not None:
                            e["err"] = ((g().float() - refs[which]).norm() / refs[which].norm()).item()
                        graphs.append((e, g))
                        by_name[name] = g
                    except Exception as ex:  # a variant that does not compile or fit is recorded
                        e["error"] = f"{type(ex).__name__}: {str(ex)[:200]}"
                    row["variants"][name] = e
                if not args.variants or "nopdl" in args.variants:
                    pdl = S._pdl_supported
                    S._pdl_supported = lambda _i: False
                    try:
                        e = {"us_rounds": []}
                        g = _graphed(lambda xx: S.segmented_linear_decode(xx, W, None, *lib_args, ids["distinct"]), x)
                        e["err"] = ((g().float() - refs["distinct"]).norm() / refs["distinct"].norm()).item()
                        graphs.append((e, g))
                        row["variants"]["nopdl"] = e
                    finally:
                        S._pdl_supported = pdl
                for rnd in range(args.rounds):
                    for e, g in (graphs if rnd % 2 == 0 else graphs[::-1]):
                        e["us_rounds"].append(bench(g))
                for e, g in graphs:
                    e["us"] = sum(e["us_rounds"]) / len(e["us_rounds"])
                for k in ("distinct", "none"):
                    if k in by_name:
                        row[f"kernels_{k}"] = kernel_table(by_name[k])
                del graphs, by_name
            doc["rows"].append(row)
            base = row["variants"]["base"]["us"]
            print(f"{d_in}x{d_out} T={T}: " + ", ".join(
                f"{k} {v['us']:.1f}" + (f" ({v['us'] / base:.2f}x)" if k != "base" else "")
                for k, v in row["variants"].items() if "us" in v), flush=True)
            bad = {k: v.get("err", v.get("error")) for k, v in row["variants"].items()
                   if "error" in v or v.get("err", 0) > 2e-2}
            if bad:
                print("   failed or off:", bad, flush=True)
            print("   kernels (distinct):", {k[:40]: v for k, v in row.get("kernels_distinct", {}).items()}, flush=True)
            save_json(doc, args.out, "decode-ablation")
    print("wrote", save_json(doc, args.out, "decode-ablation"))


if __name__ == "__main__":
    main()

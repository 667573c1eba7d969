"""What would it cost the GEMM to compute the shrink inside its own K loop?

    python bench/inloop_shrink_probe.py [--shapes 2048x4096x4096 8192x4096x4096] [--rounds 4] [--out bench/results]

Every output tile (m, n) of x W^T reads the whole row block m of x over d_in. If tile n of a row block
also multiplied its 1/num_pid_n share of those K-steps by a_cat (an extra R-wide product on a tile of
x already in shared memory), the row block's shrink would be done by the GEMM's own reads of x, with
no pass of its own: x read once for the whole layer. The partials would still have to be summed and
waited for before each tile's low-rank tail; this probe leaves that out and times only the loop's
cost. Persistent bare GEMMs (host descriptors, the forward's W layout, grouped tile order, no tail):
  plain    one K loop per tile
  split    the K loop as two loops, the tile's own K-steps first, then the rest (rotated), no extra product
  inloop   the same two loops, the first also accumulating x a_cat^T over the tile's own K-steps and
           storing it as a float32 partial per (tile, row)
beside cuBLAS and the current two launches (shrink + lora_gemm with R = 48). Variants with the first
loop's pipeline at 2 stages and with the output tile stored in two halves (for shared memory).
CUDA graphs, L2 flushed, rounds in alternating order; partials checked against x a_cat^T.
Writes inloop-shrink-probe-<gpu>-<date>.json.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(__file__))
from common import env_info, graph_rounds, layer_inputs, save_json, warm_up  # noqa: E402

import lorafuse  # noqa: E402

lg = importlib.import_module("lorafuse.kernels.lora_gemm")
sk = importlib.import_module("lorafuse.kernels.shrink")


@triton.jit
def _store_tile(out_desc, off_m, off_n, acc, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HALVES: tl.constexpr):
    if HALVES:
        lo, hi = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
        out_desc.store([off_m, off_n], lo.to(out_desc.dtype))
        out_desc.store([off_m, off_n + BLOCK_N // 2], hi.to(out_desc.dtype))
    else:
        out_desc.store([off_m, off_n], acc.to(out_desc.dtype))


@triton.jit
def _inloop_probe(x_desc, w_desc, a_desc, out_desc, part_ptr, T, N, K,
                  MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr, S1: tl.constexpr,
                  HALVES: tl.constexpr):
    """MODE 0: plain; 1: split loops; 2: split loops with the in-loop shrink (part_ptr: (num_pid_n,
    rows, BLOCK_R) float32)."""
    num_pid_m = tl.cdiv(T, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile_id in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_SMS):
        pid_m, pid_n = lg._tile_ids(tile_id, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if MODE == 0:
            for ki in range(k_tiles):
                acc = tl.dot(x_desc.load([off_m, ki * BLOCK_K]), w_desc.load([off_n, ki * BLOCK_K]).T, acc)
        else:
            lo = pid_n * k_tiles // num_pid_n
            hi = (pid_n + 1) * k_tiles // num_pid_n
            if MODE == 2:
                s = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
                for ki in tl.range(lo, hi, num_stages=S1):
                    xt = x_desc.load([off_m, ki * BLOCK_K])
                    acc = tl.dot(xt, w_desc.load([off_n, ki * BLOCK_K]).T, acc)
                    s = tl.dot(xt, a_desc.load([0, ki * BLOCK_K]).T, s)
                offs_m = off_m + tl.arange(0, BLOCK_M)
                offs_r = tl.arange(0, BLOCK_R)
                tl.store(part_ptr + (pid_n * num_pid_m * BLOCK_M + offs_m[:, None]) * BLOCK_R + offs_r[None, :], s)
            else:
                for ki in tl.range(lo, hi, num_stages=S1):
                    acc = tl.dot(x_desc.load([off_m, ki * BLOCK_K]), w_desc.load([off_n, ki * BLOCK_K]).T, acc)
            for i in range(hi, lo + k_tiles):
                ki = i % k_tiles
                acc = tl.dot(x_desc.load([off_m, ki * BLOCK_K]), w_desc.load([off_n, ki * BLOCK_K]).T, acc)
        _store_tile(out_desc, off_m, off_n, acc, BLOCK_M, BLOCK_N, HALVES)


def run_probe(x, w, a, mode, cfg, sms, part):
    from triton.tools.tensor_descriptor import TensorDescriptor

    bm, bn, bk, warps, stages, s1, halves = cfg
    T, K = x.shape
    N = w.shape[0]
    out = torch.empty(T, N, device=x.device, dtype=x.dtype)
    br = 64
    xd = TensorDescriptor(x, [T, K], [K, 1], [bm, bk])
    wd = TensorDescriptor(w, [N, K], [K, 1], [bn, bk])
    ad = TensorDescriptor(a, list(a.shape), [K, 1], [br, bk])
    od = TensorDescriptor(out, [T, N], [N, 1], [bm, bn // 2 if halves else bn])
    tiles = triton.cdiv(T, bm) * triton.cdiv(N, bn)
    _inloop_probe[(min(sms, tiles),)](xd, wd, ad, od, part, T, N, K, MODE=mode, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                                      BLOCK_R=br, GROUP_M=8, NUM_SMS=sms, S1=s1, HALVES=halves,
                                      num_warps=warps, num_stages=stages)
    return out


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, first loop's stages, halves)
CONFIGS = {"s3": (128, 256, 64, 8, 3, 3, False), "s3_s1=2": (128, 256, 64, 8, 3, 2, False),
           "s3_halves": (128, 256, 64, 8, 3, 3, True), "s4_halves": (128, 256, 64, 8, 4, 4, True)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["2048x4096x4096", "8192x4096x4096", "2048x4096x14336"],
                   help="T x d_in x d_out")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    assert torch.cuda.is_available(), "inloop_shrink_probe.py needs a GPU"
    warm_up()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for shape in args.shapes:
        T, d_in, d_out = (int(v) for v in shape.split("x"))
        x, w, a, b, scale, am, bm = layer_inputs(T, d_in, d_out, 48, 16)
        ref = x.float() @ w.float().t()
        s_ref = x.float() @ a.float().t()
        part = torch.zeros(triton.cdiv(d_out, 256), triton.cdiv(T, 128) * 128, 64, device="cuda")
        sp = sk.shrink(x, a, scale, am, bm)[0]
        fns = {"cublas": lambda: torch.mm(x, w.t()),
               "lora_gemm_r0": lambda: lg.lora_gemm(x, w.t(), check=False),
               "lora_gemm_r48": lambda: lg.lora_gemm(x, w.t(), sp, b.t(), check=False),
               "shrink": lambda: sk.shrink(x, a, scale, am, bm, check=False),
               "op": lambda: lorafuse.lora_linear(x, w, None, a, b, scale, am, bm)}
        row = {"T": T, "d_in": d_in, "d_out": d_out, "errors": {}, "rel_err": {}}
        for cname, cfg in CONFIGS.items():
            for mode, mname in ((0, "plain"), (1, "split"), (2, "inloop")):
                if mode == 0 and cfg[5] != cfg[4]:
                    continue  # the first loop's depth is not used by the plain loop
                name = f"{mname} {cname}"
                try:
                    part.zero_()
                    out = run_probe(x, w, a, mode, cfg, sms, part)
                    row["rel_err"][name] = ((out.float() - ref).norm() / ref.norm()).item()
                    if mode == 2:
                        s = part.sum(0)[:T, :48]
                        row["rel_err"][name + " partials"] = ((s - s_ref).norm() / s_ref.norm()).item()
                    fns[name] = (lambda mode=mode, cfg=cfg: run_probe(x, w, a, mode, cfg, sms, part))
                except Exception as e:  # a config the GPU cannot run: recorded
                    row["errors"][name] = f"{type(e).__name__}: {str(e)[:300]}"
        med, times = graph_rounds(fns, args.rounds, warmup=10, rep=60)
        med = {k: v * 1e3 for k, v in med.items()}
        row["us"], row["us_rounds"] = med, {k: [t * 1e3 for t in v] for k, v in times.items()}
        rows.append(row)
        print(f"{shape}: " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(med.items(), key=lambda kv: kv[1])),
              flush=True)
        bad = {k: v for k, v in row["rel_err"].items() if v > 2e-2}
        if bad:
            print("   large errors:", bad, flush=True)
        for k, e in row["errors"].items():
            print("   error", k, e[:200], flush=True)
    print("wrote", save_json({"env": env_info(sys.argv), "configs": CONFIGS, "rows": rows}, args.out,
                             "inloop-shrink-probe"))


if __name__ == "__main__":
    main()

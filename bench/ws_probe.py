"""Does Triton on this GPU warp-specialise a plain TMA GEMM, and does it pay?

    python bench/ws_probe.py [--shapes 8192x4096x4096 8192x4096x14336] [--out bench/results]

A bare GEMM (host tensor descriptors, out = a @ w^T, no low-rank tail, no bias) in the two forms
Triton's warp specialisation takes: persistent ("P", the tile loop `tl.range(..., warp_specialize=WS)`,
not flattened), the same with the descriptors made on the device ("D"), and one program per tile
("tile", the K loop carries the flag). For each config and
WS in (False, True): whether the compiled TTGIR holds `ttg.warp_specialize`, the error if it does
not compile, and the time over cuBLAS (CUDA graphs, L2 flushed, rounds in alternating order).
lora_gemm's default (R = 0) is timed beside it. Writes ws-probe-<gpu>-<date>.json.
"""
from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(__file__))
from common import env_info, graphed, round_order, save_json, warm_up  # noqa: E402

lg = importlib.import_module("lorafuse.kernels.lora_gemm")


@triton.jit
def _gemm_ws_probe(a_desc, w_desc, out_desc, M, N, K,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                   NUM_SMS: tl.constexpr, WS: tl.constexpr):
    """Persistent: the tile loop carries the warp-specialise flag."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile_id in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_SMS, warp_specialize=WS):
        pid_m, pid_n = lg._tile_ids(tile_id, num_pid_m, num_pid_n, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            a = a_desc.load([pid_m * BLOCK_M, ki * BLOCK_K])
            w = w_desc.load([pid_n * BLOCK_N, ki * BLOCK_K])
            acc = tl.dot(a, w.T, acc)
        out_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], acc.to(out_desc.dtype))


@triton.jit
def _gemm_ws_inner_probe(a_desc, w_desc, out_desc, M, N, K,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr, WS: tl.constexpr):
    """One program per tile: the K loop carries the flag."""
    pid_m, pid_n = lg._tile_ids(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for ki in tl.range(tl.cdiv(K, BLOCK_K), warp_specialize=WS):
        a = a_desc.load([pid_m * BLOCK_M, ki * BLOCK_K])
        w = w_desc.load([pid_n * BLOCK_N, ki * BLOCK_K])
        acc = tl.dot(a, w.T, acc)
    out_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], acc.to(out_desc.dtype))


@triton.jit
def _gemm_ws_devdesc_probe(a_ptr, w_ptr, out_ptr, M, N, K,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr, WS: tl.constexpr):
    """Persistent, with the descriptors made on the device (the form Triton's own persistent matmul
    tutorial warp-specialises). The tile loop is _gemm_ws_probe's, written out in each form as it
    was compiled and timed (ws-probe-*.json)."""
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
    out_desc = tl.make_tensor_descriptor(out_ptr, shape=[M, N], strides=[N, 1], block_shape=[BLOCK_M, BLOCK_N])
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile_id in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_SMS, warp_specialize=WS):
        pid_m, pid_n = lg._tile_ids(tile_id, num_pid_m, num_pid_n, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            a = a_desc.load([pid_m * BLOCK_M, ki * BLOCK_K])
            w = w_desc.load([pid_n * BLOCK_N, ki * BLOCK_K])
            acc = tl.dot(a, w.T, acc)
        out_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], acc.to(out_desc.dtype))


def probe_devdesc(a: torch.Tensor, w: torch.Tensor, cfg: tuple, ws: bool, sms: int):
    """(a @ w^T, the compiled kernel) by the device-descriptor form; a (M, K), w (N, K), cfg
    (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)."""
    bm, bn, bk, warps, stages = cfg
    M, K = a.shape
    N = w.shape[0]
    out = torch.empty(M, N, device=a.device, dtype=a.dtype)
    grid = (min(sms, triton.cdiv(M, bm) * triton.cdiv(N, bn)),)
    kern = _gemm_ws_devdesc_probe[grid](a, w, out, M, N, K, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
                                        NUM_SMS=sms, WS=ws, num_warps=warps, num_stages=stages)
    return out, kern


def ws_markers(kern) -> dict:
    """Which marks of warp specialisation the compiled TTGIR holds: "ttg.warp_specialize" (the op of
    a loop split into warp groups: applied), "async_task_id" (tasks assigned by the Hopper pass) and
    "warp_specialize" (any mention, the requested loop attribute included: asked for, not applied)."""
    ttgir = kern.asm.get("ttgir", "")
    return {m: m in ttgir for m in ("ttg.warp_specialize", "async_task_id", "warp_specialize")}


def probe_gemm(a: torch.Tensor, w: torch.Tensor, cfg: tuple, ws: bool, sms: int, persistent: bool = True):
    """(a @ w^T, the compiled kernel) with host descriptors, persistent or one program per tile; a
    (M, K), w (N, K), cfg (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    bm, bn, bk, warps, stages = cfg
    M, K = a.shape
    N = w.shape[0]
    out = torch.empty(M, N, device=a.device, dtype=a.dtype)
    a_d = TensorDescriptor(a, list(a.shape), list(a.stride()), [bm, bk])
    w_d = TensorDescriptor(w, list(w.shape), list(w.stride()), [bn, bk])
    o_d = TensorDescriptor(out, list(out.shape), list(out.stride()), [bm, bn])
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    grid = (min(sms, tiles) if persistent else tiles,)
    kernel = _gemm_ws_probe if persistent else _gemm_ws_inner_probe
    kern = kernel[grid](a_d, w_d, o_d, M, N, K, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
                        NUM_SMS=sms, WS=ws, num_warps=warps, num_stages=stages)
    return out, kern


CONFIGS = [(128, 256, 64, 8, 3), (128, 128, 64, 4, 4), (128, 128, 64, 8, 4)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["8192x4096x4096", "8192x4096x14336"], help="T x K x N")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    assert torch.cuda.is_available(), "ws_probe.py needs a GPU"
    warm_up()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    # Device-made descriptors live in a scratch buffer the runtime asks for.
    triton.set_allocator(lambda size, align, stream: torch.empty(size, device="cuda", dtype=torch.int8))
    rows = []
    for shape in args.shapes:
        T, K, N = (int(v) for v in shape.split("x"))
        torch.manual_seed(0)
        a = torch.randn(T, K, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5
        ref = a.float() @ w.float().t()
        fns = {"cublas": lambda: torch.mm(a, w.t()), "lora_gemm_default": lambda: lg.lora_gemm(a, w.t(), check=False)}
        row = {"T": T, "K": K, "N": N, "ttgir_warp_specialize": {}, "ttgir_markers": {}, "errors": {}, "rel_err": {}}
        for cfg in CONFIGS:
            for ws, form in ((False, "P"), (True, "P"), (False, "tile"), (True, "tile"), (False, "D"), (True, "D")):
                name = f"{form} {cfg[0]}x{cfg[1]}x{cfg[2]} w{cfg[3]} s{cfg[4]} {'WS' if ws else '--'}"
                call = ((lambda cfg=cfg, ws=ws: probe_devdesc(a, w, cfg, ws, sms)) if form == "D" else
                        (lambda cfg=cfg, ws=ws, pers=form == "P": probe_gemm(a, w, cfg, ws, sms, pers)))
                try:
                    out, kern = call()
                    row["ttgir_markers"][name] = ws_markers(kern)
                    row["ttgir_warp_specialize"][name] = row["ttgir_markers"][name]["ttg.warp_specialize"]
                    row["rel_err"][name] = ((out.float() - ref).norm() / ref.norm()).item()
                    fns[name] = (lambda call=call: call()[0])
                except Exception as e:  # recorded, not fatal
                    row["errors"][name] = f"{type(e).__name__}: {str(e)[:300]}"
        replays = {}
        for k, fn in fns.items():
            try:
                replays[k] = graphed(fn)
            except Exception as e:
                row["errors"][k] = f"graph: {type(e).__name__}: {str(e)[:200]}"
        times = {k: [] for k in replays}
        for rnd in range(args.rounds):
            for k in round_order(list(replays), rnd):
                times[k].append(do_bench(replays[k], warmup=10, rep=60, return_mode="median") * 1e3)
        med = {k: statistics.median(v) for k, v in times.items()}
        row["us"], row["us_rounds"] = med, times
        row["ratio_to_cublas"] = {k: v / med["cublas"] for k, v in med.items()}
        rows.append(row)
        print(f"{shape}: cublas {med['cublas']:.1f} us; " + ", ".join(
            f"{k} {v:.3f}x" + ("[ws]" if row["ttgir_warp_specialize"].get(k) else "")
            for k, v in sorted(row["ratio_to_cublas"].items(), key=lambda kv: kv[1])), flush=True)
        print("   ttgir markers:", {k: [m for m, v in ms.items() if v] for k, ms in row["ttgir_markers"].items()
                                    if any(ms.values())}, flush=True)
        for k, e in row["errors"].items():
            print("   error", k, e[:200], flush=True)
    print("wrote", save_json({"env": env_info(sys.argv), "configs": CONFIGS, "rows": rows}, args.out, "ws-probe"))


if __name__ == "__main__":
    main()

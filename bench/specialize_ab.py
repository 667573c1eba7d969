"""The one-launch decode layer with the row count T as a run-time argument (the kernel's
do_not_specialize) against Triton's default, which compiles T == 1 as a constant, from CUDA graphs.

    python bench/specialize_ab.py [--T 1 2 4 16 32 64] [--shapes 4096x4096 4096x14336 14336x4096]
                                  [--R 48] [--m 16] [--rounds 4] [--out bench/results]

Both variants run lorafuse.lora_linear (LoraMap with an m-column mapping, and the plain sum without
one); the specialised variant is the same kernel function re-decorated without do_not_specialize,
swapped in for the library's. Every variant replayed from a CUDA graph (L2 flushed before each replay
by do_bench), once per round, the order reversed every other round, beside cuBLAS's F.linear;
medians over rounds, outputs checked against float32. Also compiles the kernel for sm_90 both ways
and counts the asynchronous copies in its main loop (the software pipeline). Writes
specialize-ab-<gpu>-<date>.json.
"""
from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(__file__))
from common import env_info, graphed, layer_inputs, patched, round_order, save_json, warm_up  # noqa: E402

import lorafuse  # noqa: E402

lg = importlib.import_module("lorafuse.kernels.lora_gemm")


def compiled_stats(kernel, t_constant: bool) -> dict:
    """The decode kernel (LoraMap, 16 x 32 x 128 tiles, 6 stages) compiled for sm_90 with T as the
    constant 1 or as an i32: counts of asynchronous copies and loads in its TTGIR."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ptrs = {n: "*bf16" for n in ["a_ptr", "b_ptr", "s_ptr", "c_ptr", "bias_ptr", "out_ptr", "al_ptr", "save_sp_ptr"]}
    ptrs.update({n: "*fp32" for n in ["scale_ptr", "a_map_ptr", "b_map_ptr", "save_s_ptr", "save_u_ptr", "part_ptr"]})
    ptrs["flag_ptr"] = "*i32"
    consts = {"HAS_BIAS": False, "FUSE_SHRINK": True, "HAS_MAP": True, "SAVE": False, "PREC": "tf32",
              "MAP_PREC": "tf32x3", "BLOCK_R": 64, "BLOCK_MR": 16, "BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128,
              "GROUP_M": 8, "EVEN_K": True, "SHARED": False, "TAIL_PIPE": False}
    names = kernel.arg_names
    sig = {n: ("constexpr" if n in consts else ptrs.get(n, "i32")) for n in names}
    if t_constant:
        consts["T"] = 1
        sig["T"] = "constexpr"
    k = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": 4, "num_stages": 6})
    ttgir, ptx = k.asm["ttgir"], k.asm["ptx"]
    return {"async_copies": ttgir.count("async_copy_global_to_local"), "tt_loads": ttgir.count("tt.load"),
            "ptx_lines": len(ptx.splitlines()), "shared_bytes": k.metadata.shared}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, nargs="+", default=[1, 2, 4, 16, 32, 64])
    p.add_argument("--shapes", nargs="+", default=["4096x4096", "4096x14336", "14336x4096"], help="d_in x d_out")
    p.add_argument("--R", type=int, default=48)
    p.add_argument("--m", type=int, default=16)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    assert torch.cuda.is_available(), "specialize_ab.py needs a GPU"
    runtime_t = lg._lora_gemm_kernel
    specialised = triton.jit(runtime_t.fn)  # the same function, T == 1 compiled as a constant
    out = {"env": env_info(sys.argv), "rows": [], "compiled": {}}
    try:
        out["compiled"] = {"T_constant_1": compiled_stats(runtime_t, True),
                           "T_runtime": compiled_stats(runtime_t, False)}
    except Exception as e:  # another Triton's compile API: the timings still stand
        out["compiled"] = {"error": repr(e)}
    print("compiled:", out["compiled"], flush=True)
    warm_up()
    for shape in args.shapes:
        d_in, d_out = (int(v) for v in shape.split("x"))
        for T in args.T:
            for method in ("loramap", "sum"):
                torch.manual_seed(0)
                x, w, a, b, scale, am, bm = layer_inputs(T, d_in, d_out, args.R, args.m)
                if method == "sum":
                    am = bm = None
                ref = lorafuse.lora_linear_reference(x.float(), w.float(), None, a.float(), b.float(), scale, am, bm)

                def op(kernel):
                    with patched(lg, "_lora_gemm_kernel", kernel):
                        return lorafuse.lora_linear(x, w, None, a, b, scale, am, bm)

                fns = {"cublas": lambda: F.linear(x, w), "specialised": lambda: op(specialised),
                       "runtime_T": lambda: op(runtime_t)}
                err = {k: ((fns[k]().float() - ref).abs().max() / ref.abs().max()).item()
                       for k in ("specialised", "runtime_T")}
                replays = {k: graphed(f) for k, f in fns.items()}
                times = {k: [] for k in replays}
                for rnd in range(args.rounds):
                    for k in round_order(list(replays), rnd):
                        times[k].append(do_bench(replays[k], warmup=25, rep=100, return_mode="median"))
                med = {k: statistics.median(v) for k, v in times.items()}
                print(f"{method} T={T} {d_in}x{d_out}: cublas {med['cublas'] * 1e3:.1f} us | specialised "
                      f"{med['specialised'] * 1e3:.1f} us ({med['specialised'] / med['cublas']:.3f}x) | runtime_T "
                      f"{med['runtime_T'] * 1e3:.1f} us ({med['runtime_T'] / med['cublas']:.3f}x) | err {err}",
                      flush=True)
                out["rows"].append({"method": method, "T": T, "d_in": d_in, "d_out": d_out, "R": args.R,
                                    "m": args.m if method == "loramap" else None, "ms": med, "ms_rounds": times,
                                    "err": err, "ratio_to_cublas": {k: v / med["cublas"] for k, v in med.items()}})
                save_json(out, args.out, "specialize-ab")
    print("wrote", save_json(out, args.out, "specialize-ab"))


if __name__ == "__main__":
    main()

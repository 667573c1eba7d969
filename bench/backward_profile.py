"""Where forward+backward time goes: per-kernel GPU time and the GPU's idle share, by method.

    python bench/backward_profile.py [--T 8192] [--dims 4096x4096 4096x14336] [--out bench/results]

For each shape, K = 3 adapters of rank 16, LoraMap rank 16, bf16, the forward+backward of
bench_kernels.py (the same Case and the same tensors requiring grad: x for sum, x with a_cat and b_cat
for concat, x with a_map and b_map for LoraMap; the base layer with x): do_bench of one call (L2
flushed, eager), the same replayed from a CUDA graph where the call can be captured, and
torch.profiler over 10 calls: every kernel's GPU time per call, their sum (`gpu_us`), and the span
from the first kernel's start to the last one's end per call (`span_us`); span minus gpu is time
the GPU waited for the host (or for a host synchronisation). Writes backward-profile-<gpu>-<date>.json.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(__file__))
from bench_kernels import Case  # noqa: E402
from common import env_info, graphed, save_json, warm_up  # noqa: E402


def profile(fn, calls: int = 10) -> dict:
    from torch.profiler import ProfilerActivity, profile as prof_ctx

    fn()
    torch.cuda.synchronize()
    with prof_ctx(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    kernels, starts, ends = {}, [], []
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA and ev.device_time_total > 0:
            name = ev.name[:90]
            kernels[name] = kernels.get(name, 0.0) + ev.device_time_total / calls
            starts.append(ev.time_range.start)
            ends.append(ev.time_range.end)
    gpu = sum(kernels.values())
    span = (max(ends) - min(starts)) / calls if starts else 0.0
    return {"gpu_us": round(gpu, 1), "span_us": round(span, 1),
            "kernels_us": {k: round(v, 1) for k, v in sorted(kernels.items(), key=lambda kv: -kv[1])}}


def graphed_fb(fn):
    """fn() (a forward+backward) replayed from a CUDA graph (common.graphed), or None where it cannot be
    captured."""
    try:
        return graphed(fn)
    except Exception as e:  # e.g. a host synchronisation inside the backward
        print(f"   not capturable: {type(e).__name__}: {str(e)[:200]}", flush=True)
        return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, nargs="+", default=[8192])
    p.add_argument("--dims", nargs="+", default=["4096x4096", "4096x14336"])
    p.add_argument("--impls", nargs="+", default=["base", "lorafuse_sum", "lorafuse_loramap", "lorafuse_concat"])
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    assert torch.cuda.is_available(), "backward_profile.py needs a GPU"
    warm_up()
    rows = []
    for T in args.T:
        for dims in args.dims:
            d_in, d_out = (int(v) for v in dims.split("x"))
            case = Case(T, d_in, d_out, 3, 16, 16, torch.bfloat16, "cuda")
            for impl in args.impls:
                f, params = case.build(impl)
                xg = case.x.detach().requires_grad_(True)
                for q in params:
                    q.requires_grad_(True)
                inputs = [xg] + list(params)

                def fb(f=f, xg=xg, inputs=inputs):
                    return torch.autograd.grad(f(xg), inputs, case.dy)
                row = {"T": T, "d_in": d_in, "d_out": d_out, "impl": impl}
                row["eager_ms"] = do_bench(fb, warmup=25, rep=200, return_mode="median")
                replay = graphed_fb(fb)
                if replay is not None:
                    row["graph_ms"] = do_bench(replay, warmup=25, rep=200, return_mode="median")
                row.update(profile(fb))
                rows.append(row)
                print(f"T={T} {dims} {impl}: eager {row['eager_ms'] * 1e3:.0f} us, graph "
                      f"{row.get('graph_ms', float('nan')) * 1e3:.0f} us, kernels {row['gpu_us']:.0f} us, "
                      f"span {row['span_us']:.0f} us", flush=True)
                for k, v in list(row["kernels_us"].items())[:12]:
                    print(f"      {v:8.1f}  {k}", flush=True)
                for q in params:
                    q.requires_grad_(False)
                save_json({"env": env_info(sys.argv), "rows": rows}, args.out, "backward-profile")
    print("wrote", save_json({"env": env_info(sys.argv), "rows": rows}, args.out, "backward-profile"))


if __name__ == "__main__":
    main()

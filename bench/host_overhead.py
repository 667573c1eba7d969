"""Host-side cost of one lorafuse layer call, kernel launches excluded.

    TRITON_INTERPRET=1 python bench/host_overhead.py

The Triton launches are replaced by stubs that return buffers of the right shape, so what is timed
is lorafuse's own Python (argument checks, dispatch, autograd bookkeeping, buffer allocation) on
CPU tensors. Small GPU batches are bound by this cost plus the launches themselves.
"""
import importlib
import os
import sys
import time

import torch
import torch.nn as nn

os.environ.setdefault("TRITON_INTERPRET", "1")
import lorafuse  # noqa: E402

ops = importlib.import_module("lorafuse.ops")


def stub_kernels():
    def shrink(x, a_cat, scale, a_map=None, b_map=None, save=False, **kw):
        T, R = x.shape[0], a_cat.shape[0]
        sp = x.new_empty((T, R))
        return sp, (x.new_empty((T, R), dtype=torch.float32) if save else None), (
            x.new_empty((T, a_map.shape[0]), dtype=torch.float32) if save and a_map is not None else None)

    def lora_gemm(a, b, s=None, c=None, bias=None, **kw):
        return a.new_empty((a.shape[0], b.shape[1]))

    def fused(x, weight, bias, a_cat, b_cat, scale, a_map=None, b_map=None, save=False, **kw):
        y = x.new_empty((x.shape[0], weight.shape[0]))
        return (y, *shrink(x, a_cat, scale, a_map, b_map, save)) if save else (y, None, None, None)

    def shrink_backward(dy, b_cat, scale, s, u, a_map=None, b_map=None, need_ds=True, need_dmap=False,
                        need_dscale=False, **kw):
        T, R = dy.shape[0], b_cat.shape[1]
        M = a_map.shape[0] if a_map is not None else 1
        return (dy.new_empty((T, R)) if need_ds else None, torch.zeros(R) if need_dscale else None,
                torch.zeros(M, R) if need_dmap and a_map is not None else None,
                torch.zeros(R, M) if need_dmap and a_map is not None else None)

    ops.shrink, ops.lora_gemm, ops.lora_gemm_fused, ops.shrink_backward = shrink, lora_gemm, fused, shrink_backward


def per_call_us(fn, n=300, repeats=7):
    """Best of several runs (the machine may be shared: the minimum is the cost itself)."""
    for _ in range(50):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t) / n * 1e6)
    return best


def main():
    stub_kernels()
    torch.manual_seed(0)
    d, T = 64, 512
    adapters = [(torch.randn(16, d), torch.randn(d, 16), 2.0) for _ in range(3)]
    for method, kw in (("sum", {}), ("loramap", {"map_rank": 16, "map_init": "sum"})):
        layer = lorafuse.MultiLoraLinear(nn.Linear(d, d), adapters, method=method, **kw)
        x = torch.randn(T, d)
        with torch.no_grad():
            fwd = per_call_us(lambda: layer(x))
        xg = x.clone().requires_grad_()
        params = [xg] + [p for p in layer.parameters() if p.requires_grad]
        dy = torch.randn(T, d)
        fb = per_call_us(lambda: torch.autograd.grad(layer(xg), params, dy))
        print(f"{method:8s} forward {fwd:6.1f} us/call   forward+backward {fb:6.1f} us/call")


if __name__ == "__main__":
    sys.exit(main())

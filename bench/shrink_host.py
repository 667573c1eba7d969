"""shrink() at T = 8192, d_in = 4096, R = 48, m = 16 (bf16) timed several ways: do_bench with its
default path, with the config given, without a mapping, without checks; a CUDA-graph replay (the
kernel and its counter's memset without host time); and back-to-back calls timed on the host.
do_bench flushes the L2 before each call, which gives the host that long to launch the next: a
call whose host time exceeds the flush is timed as host time.

    python bench/shrink_host.py [--out bench/results]
"""
import argparse
import importlib
import os
import sys
import time

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(__file__))
from common import env_info, save_json  # noqa: E402

from lorafuse.kernels import shrink  # noqa: E402

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--out", default="bench/results")
args = p.parse_args()
S = importlib.import_module("lorafuse.kernels.shrink")
out = {}
T, d, R, m = 8192, 4096, 48, 16
x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
a = torch.randn(R, d, device="cuda", dtype=torch.bfloat16) / 64
scale = torch.ones(R, device="cuda")
am = torch.randn(m, R, device="cuda")
bm = torch.randn(R, m, device="cuda")
cfg = S.tma_shrink_config(T, d, R, torch.cuda.get_device_properties(0).multi_processor_count)


def t(name, fn):
    fn()
    torch.cuda.synchronize()
    out[name] = do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e3
    print(f"{name:<32} {out[name]:8.1f} us", flush=True)


t("default, map", lambda: shrink(x, a, scale, am, bm))
t("config given, map", lambda: shrink(x, a, scale, am, bm, config=cfg))
t("default, no map", lambda: shrink(x, a, scale))
t("default, map, check=False", lambda: shrink(x, a, scale, am, bm, check=False))
g = torch.cuda.CUDAGraph()
with torch.cuda.graph(g):
    shrink(x, a, scale, am, bm)
t("graph replay, map", g.replay)
for name, fn in (("host loop, map", lambda: shrink(x, a, scale, am, bm)),
                 ("host loop, config given", lambda: shrink(x, a, scale, am, bm, config=cfg))):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(200):
        fn()
    torch.cuda.synchronize()
    out[name] = (time.perf_counter() - t0) / 200 * 1e6
    print(f"{name:<32} {out[name]:8.1f} us per call (back to back)", flush=True)
print("wrote", save_json({"env": env_info(sys.argv), "us": out}, args.out, "shrink-host"))

"""Where the host time of one eager lorafuse call goes, on a GPU (cProfile over many calls).

    python bench/profile_host.py [--T 16 512] [--method loramap | segmented | routed]
                                 [--K 64] [--top-k 1] [--schedule auto]

Prints the wall time per call (host-bound when the GPU is faster than the launches), then the
functions with the most own time. Used to find launch and dispatch overhead. --method segmented
profiles lorafuse.lora_linear_segmented (64 adapters of rank 16, a random adapter per row; forward
only) instead of a MultiLoraLinear; --method routed profiles lorafuse.routing.lora_linear_routed (K Arrow
adapters of rank 16, --top-k, --schedule; forward only).
"""
import argparse
import cProfile
import pstats
import time

import torch
import torch.nn as nn

import lorafuse


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, nargs="*", default=[16, 512])
    p.add_argument("--d", type=int, default=4096)
    p.add_argument("--method", default="loramap")
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--K", type=int, default=64, help="adapters of --method routed")
    p.add_argument("--top-k", type=int, default=1, help="top_k of --method routed (0: dense softmax)")
    p.add_argument("--schedule", default="auto", help="schedule of --method routed")
    args = p.parse_args()
    dev, dt = "cuda", torch.bfloat16
    base = nn.Linear(args.d, args.d, bias=False, device=dev, dtype=dt)
    ads = [(torch.randn(16, args.d, device=dev, dtype=dt) * 0.01, torch.randn(args.d, 16, device=dev, dtype=dt) * 0.01,
            2.0) for _ in range(3)]
    kw = {"map_rank": 16} if args.method == "loramap" else {}
    ids: dict = {}
    if args.method == "segmented":
        from lorafuse.segmented import LoraLibrary, lora_linear_segmented

        lib = LoraLibrary.from_adapters([(torch.randn(16, args.d, device=dev, dtype=dt) * 0.01,
                                          torch.randn(args.d, 16, device=dev, dtype=dt) * 0.01, 2.0)
                                         for _ in range(64)])
        layer = lambda x: lora_linear_segmented(x, base.weight, None, lib, ids[x.shape[0]])  # noqa: E731
    elif args.method == "routed":
        from lorafuse.routing import lora_linear_routed

        R = 16 * args.K
        a_cat = torch.randn(R, args.d, device=dev, dtype=dt) * 0.01
        b_cat = torch.randn(args.d, R, device=dev, dtype=dt) * 0.01
        scale = torch.full((R,), 2.0, device=dev)
        router = torch.randn(args.K, args.d, device=dev, dtype=dt)
        layer = lambda x: lora_linear_routed(x, base.weight, None, a_cat, b_cat, scale, [16] * args.K,  # noqa: E731
                                             router, "arrow", args.top_k or None, schedule=args.schedule)
    else:
        layer = lorafuse.MultiLoraLinear(base, ads, method=args.method, **kw)
    for T in args.T:
        x = torch.randn(T, args.d, device=dev, dtype=dt)
        ids = {T: torch.randint(-1, 64, (T,), device=dev)} if args.method == "segmented" else {}
        for mode in ("forward",) if args.method in ("segmented", "routed") else ("forward", "forward+backward"):
            if mode == "forward":
                def call():
                    with torch.no_grad():
                        return layer(x)
            else:
                xg = x.detach().requires_grad_(True)
                dy = torch.randn(T, args.d, device=dev, dtype=dt)

                def call():
                    return torch.autograd.grad(layer(xg), [xg] + [q for q in layer.parameters() if q.requires_grad], dy)
            for _ in range(20):
                call()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.calls):
                call()
            torch.cuda.synchronize()
            us = (time.perf_counter() - t0) / args.calls * 1e6
            base_t0 = time.perf_counter()
            for _ in range(args.calls):
                with torch.no_grad():
                    base(x)
            torch.cuda.synchronize()
            base_us = (time.perf_counter() - base_t0) / args.calls * 1e6
            print(f"\n=== T={T} {mode}: {us:.1f} us per call (base layer forward {base_us:.1f} us)")
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(args.calls):
                call()
            torch.cuda.synchronize()
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()

"""What every benchmark result file records, and how it is written."""
from __future__ import annotations

import contextlib

import datetime as _dt
import json
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import List, Optional

from lorafuse.export import atomic_write


def git_commit() -> str:
    """The commit the benchmark ran from (the device copy of the tree has no .git: pass it in
    LORAFUSE_COMMIT), with '+dirty' when the tree differs from it."""
    env = os.environ.get("LORAFUSE_COMMIT")
    if env:
        return env
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        sha = subprocess.check_output(["git", "-C", here, "rev-parse", "HEAD"], text=True,
                                      stderr=subprocess.DEVNULL).strip()
        dirty = subprocess.call(["git", "-C", here, "diff", "--quiet", "HEAD"], stderr=subprocess.DEVNULL)
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def gpu_slug() -> str:
    return re.sub(r"[^a-z0-9]+", "-", gpu_name().lower()).strip("-")


def env_info(argv: Optional[List[str]] = None) -> dict:
    import torch
    import triton

    info = {
        "gpu": gpu_name(),
        "commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python"] + list(argv or [])),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        # the switches that choose code paths (ops.PERSISTENT, the shrink variant, direct launches, ...)
        "lorafuse_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("LORAFUSE_")},
    }
    try:
        import peft
        import transformers

        info["peft"] = peft.__version__
        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["sms"] = p.multi_processor_count
        info["cuda"] = torch.version.cuda
    return info


_SAVED_PATHS: dict = {}  # (out_dir, prefix) -> the file this process writes


def save_json(doc: dict, out_dir: str, prefix: str) -> str:
    """Atomically write out_dir/<prefix>-<gpu>-<date>.json (temp file in the same folder, then rename).
    A run rewrites its own file after every row; a file left by an earlier run (another part of a
    grid run the same day, a committed result) is kept, and this run writes <...>-2.json, -3, ..."""
    os.makedirs(out_dir, exist_ok=True)
    key = (os.path.abspath(out_dir), prefix)
    path = _SAVED_PATHS.get(key)
    if path is None:
        stem = os.path.join(out_dir, f"{prefix}-{gpu_slug()}-{_dt.date.today().isoformat()}")
        path, n = stem + ".json", 1
        while os.path.exists(path):
            n += 1
            path = f"{stem}-{n}.json"
        _SAVED_PATHS[key] = path
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(doc, indent=1)))
    return path


def warm_up(seconds: float = 3.0) -> None:
    """Busy the GPU and the launching host for a few seconds before the first timed row: idle clocks
    (the SMs start near 350 MHz) and a cold host made the first rows of a run read 2-4x slow."""
    import time

    import torch

    if not torch.cuda.is_available():
        return
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    small = torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16)
    t0 = time.time()
    while time.time() - t0 < seconds:
        for _ in range(20):
            a @ a  # the GPU's clocks
            small @ a  # the host's launch path
        torch.cuda.synchronize()



def round_order(names: list, round_index: int) -> list:
    """The order in which to time the variants of one round: as given in even rounds, reversed in odd
    ones, so that over an even number of rounds every variant sits in every place equally often. In a
    fixed order, two identical variants timed one after the other read 3-13 % apart on an H200 (the
    second faster; bench/NOTES.md, entry 15)."""
    return list(names) if round_index % 2 == 0 else list(reversed(names))


@contextlib.contextmanager
def patched(obj, name: str, value):
    """Within the block, obj.name is value (a module switch such as ops.PERSISTENT); restored after."""
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def graph_rounds(fns: dict, rounds: int, warmup: int = 25, rep: int = 100):
    """Each fn replayed from its own CUDA graph, timed by do_bench (L2 flushed before each replay;
    warmup and rep in ms) once per round in round_order. Returns ({name: median over rounds} in ms,
    {name: [per-round medians]})."""
    import statistics

    from triton.testing import do_bench

    replays = {k: graphed(f) for k, f in fns.items()}
    times = {k: [] for k in replays}
    for rnd in range(rounds):
        for k in round_order(list(replays), rnd):
            times[k].append(do_bench(replays[k], warmup=warmup, rep=rep, return_mode="median"))
    return {k: statistics.median(v) for k, v in times.items()}, times


def graphed(fn):
    """fn() captured once in a CUDA graph (run once first on a side stream, to compile); the result
    replays it."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def layer_inputs(T: int, d_in: int, d_out: int, R: int, m: int, dtype=None, device: str = "cuda"):
    """Random operands of one layer: x (T, d_in), w (d_out, d_in), a_cat (R, d_in), b_cat (d_out, R)
    in dtype (default bfloat16), scale (R,) of ones, a_map (m, R) and b_map (R, m) in float32;
    scaled so that every product stays near unit size."""
    import torch

    dt = dtype or torch.bfloat16
    x = torch.randn(T, d_in, device=device, dtype=dt)
    w = torch.randn(d_out, d_in, device=device, dtype=dt) / d_in ** 0.5
    a = torch.randn(R, d_in, device=device, dtype=dt) / d_in ** 0.5
    b = torch.randn(d_out, R, device=device, dtype=dt) / R ** 0.5
    scale = torch.ones(R, device=device, dtype=torch.float32)
    am = torch.randn(m, R, device=device) / R ** 0.5
    bm = torch.randn(R, m, device=device) / m ** 0.5
    return x, w, a, b, scale, am, bm

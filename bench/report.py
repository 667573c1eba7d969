"""Turn a kernel benchmark result into the README's table and plot.

    python bench/report.py bench/results/kernels-nvidia-h100-80gb-hbm3-2026-11-22.json

Prints a markdown table (forward / forward+backward time over the base layer, K=3 adapters of
rank 16 unless --K/--r say otherwise) and writes <json>.png beside the input: ratio against T per
implementation, one panel per (d_in, d_out), forward on top, forward+backward below.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

from lorafuse.export import default_mode

SHOW = ["lorafuse_sum", "lorafuse_concat", "lorafuse_loramap", "peft", "peft_frozen", "eager_loop", "eager_cat",
        "eager_map", "compile_map", "graph_loramap"]


def shown(rows):
    """The columns of SHOW that the run measured (older results lack some)."""
    return [s for s in SHOW if any(s in row["impls"] for row in rows)]


def rows_for(doc, K, r):
    return [row for row in doc["rows"] if row["K"] == K and row["r"] == r]


def markdown(doc, K, r) -> str:
    rows = sorted(rows_for(doc, K, r), key=lambda x: (x["d_in"], x["d_out"], x["T"]))
    show = shown(rows)
    head = "| T | d_in x d_out | base fwd ms | " + " | ".join(s.replace("lorafuse_", "lorafuse ") for s in show) + " |"
    out = [head, "|" + " --- |" * (3 + len(show))]
    for row in rows:
        im = row["impls"]
        cells = []
        for s in show:
            e = im.get(s, {})
            if "fwd_ratio" in e:
                fb = e.get("fb_ratio", float("nan"))
                cells.append(f"{e['fwd_ratio']:.2f} / " + ("-" if fb != fb else f"{fb:.2f}"))
            else:
                cells.append("error" if "error" in e else "-")
        out.append(f"| {row['T']} | {row['d_in']}x{row['d_out']} | {im['base']['fwd_ms']:.3f} | " + " | ".join(cells)
                   + " |")
    return "\n".join(out)


def plot(doc, K, r, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = rows_for(doc, K, r)
    dims = sorted({(x["d_in"], x["d_out"]) for x in rows})
    fig, axes = plt.subplots(2, len(dims), figsize=(5 * len(dims), 7), squeeze=False, sharey="row")
    for j, (di, do) in enumerate(dims):
        sel = sorted([x for x in rows if (x["d_in"], x["d_out"]) == (di, do)], key=lambda x: x["T"])
        for i, key in enumerate(["fwd_ratio", "fb_ratio"]):
            ax = axes[i][j]
            for s in shown(rows):
                pts = [(x["T"], x["impls"].get(s, {}).get(key)) for x in sel]
                pts = [(t, v) for t, v in pts if v is not None]
                if pts:
                    style = "-o" if s.startswith("lorafuse") else "--."
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=s.replace("lorafuse_", "lorafuse "))
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log", base=2)
            ax.set_title(f"{'forward' if i == 0 else 'forward+backward'}, {di}x{do}")
            ax.set_xlabel("tokens T")
            if j == 0:
                ax.set_ylabel("time / base layer")
    axes[0][0].legend(fontsize=8)
    env = doc["env"]
    fig.suptitle(f"one linear layer, K={K} adapters of rank {r}, {doc['dtype']}, {env['gpu']} "
                 f"(commit {env['commit']}, {env['date'][:10]})", fontsize=10)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=110)
    os.chmod(tmp, default_mode(folder=False))
    os.replace(tmp, path)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("result")
    p.add_argument("--K", type=int, default=3)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args()
    with open(args.result) as f:
        doc = json.load(f)
    print(markdown(doc, args.K, args.r))
    if not args.no_plot:
        out = os.path.splitext(args.result)[0] + ".png"
        plot(doc, args.K, args.r, out)
        print("wrote", out)


if __name__ == "__main__":
    main()

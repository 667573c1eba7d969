"""Turn kernel benchmark results into the README's tables and plots.

    python bench/report.py bench/results/kernels-nvidia-h100-80gb-hbm3-2026-11-22.json

Prints a markdown table (forward / forward+backward time over the base layer, K=3 adapters of
rank 16 unless --K/--r say otherwise) and writes <json>.png beside the input: ratio against T per
implementation, one panel per (d_in, d_out), forward on top, forward+backward below.

The whole grid (K x r x T x shapes) takes longer than one device call allows, so it may be run in
parts; parts of one commit on one GPU merge into one file, every row keeping the run it came from:

    python bench/report.py part-a.json part-b.json --merge bench/results/kernels-grid-<commit>-<gpu>-<date>.json

`--grid` prints, for every (K, r), the ratios of each T (markdown) and writes <json>-grid.png.
A shape measured in more than one part is shown as the mean of its runs.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from lorafuse.export import atomic_write

SHOW = ["lorafuse_sum", "lorafuse_concat", "lorafuse_loramap", "peft", "peft_frozen", "eager_loop", "eager_cat",
        "eager_map", "compile_map", "graph_loramap"]


def shown(rows):
    """The columns of SHOW that the run measured (older results lack some)."""
    return [s for s in SHOW if any(s in row["impls"] for row in rows)]


SHAPE = ("T", "d_in", "d_out", "K", "r")
RATIOS = ("fwd_ratio", "fb_ratio", "fwd_loop_ratio")


def merge(docs: list, sources: list) -> dict:
    """One result from several parts of one grid: same commit, GPU and dtype, rows kept as measured,
    each tagged with the index of its run in `runs`."""
    for key in ("commit", "gpu"):
        seen = {d["env"].get(key) for d in docs}
        if len(seen) != 1:
            raise SystemExit(f"refusing to merge runs of different {key}s: {sorted(map(str, seen))}")
    if len({d["dtype"] for d in docs}) != 1:
        raise SystemExit(f"refusing to merge runs of different dtypes: {sorted({d['dtype'] for d in docs})}")
    out = {"env": dict(docs[0]["env"]), "dtype": docs[0]["dtype"], "runs": [], "rows": []}
    out["env"]["command"] = "; ".join(d["env"]["command"] for d in docs)
    for i, (d, src) in enumerate(zip(docs, sources)):
        out["runs"].append({"file": os.path.basename(src), "command": d["env"]["command"], "date": d["env"]["date"],
                            "seconds": d.get("seconds"), "complete": d.get("complete"),
                            "shapes_planned": d.get("shapes_planned"), "rows": len(d["rows"])})
        out["rows"] += [dict(row, run=i) for row in d["rows"]]
    grid = {}
    for key in SHAPE:
        grid[key] = sorted({row[key] for row in out["rows"]})
    out["grid"] = grid
    out["shapes"] = len({tuple(row[k] for k in SHAPE) for row in out["rows"]})
    return out


def combined(rows: list) -> list:
    """One row per shape: a shape measured in several runs gets the mean of each ratio (and of the
    base time), with `repeats` saying how many runs it averages."""
    groups = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in SHAPE), []).append(row)
    out = []
    for key, group in groups.items():
        if len(group) == 1:
            out.append(dict(group[0], repeats=1))
            continue
        impls = {}
        for name in {n for row in group for n in row["impls"]}:
            entries = [row["impls"][name] for row in group if name in row["impls"]]
            e = {}
            for field in RATIOS + ("fwd_ms",):
                vals = [x[field] for x in entries if field in x]
                if vals:
                    e[field] = sum(vals) / len(vals)
            if any("error" in x for x in entries):
                e["error"] = next(x["error"] for x in entries if "error" in x)
            impls[name] = e
        out.append(dict(zip(SHAPE, key), m=group[0].get("m"), impls=impls, repeats=len(group)))
    return out


def repeat_spread(rows: list, min_T: int = 8192) -> dict:
    """For shapes measured in more than one run: the largest difference of each lorafuse forward
    ratio between runs at T >= min_T -- how far single cells of this grid can be trusted."""
    groups = {}
    for row in rows:
        if row["T"] >= min_T:
            groups.setdefault(tuple(row[k] for k in SHAPE), []).append(row)
    out = {}
    for group in groups.values():
        if len(group) < 2:
            continue
        for name in ("lorafuse_sum", "lorafuse_concat", "lorafuse_loramap"):
            vals = [row["impls"].get(name, {}).get("fwd_ratio") for row in group]
            vals = [v for v in vals if v is not None]
            if len(vals) >= 2:
                out[name] = max(out.get(name, 0.0), max(vals) - min(vals))
    return out


def rows_for(doc, K, r):
    return combined([row for row in doc["rows"] if row["K"] == K and row["r"] == r])


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


def _format_axes(ax, row: int, d_in: int, d_out: int, ylabel=None) -> None:
    """One panel: log-log ratio against T, the base layer's 1.0 marked; row 0 forward, 1 forward+backward."""
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_title(f"{'forward' if row == 0 else 'forward+backward'}, {d_in}x{d_out}")
    ax.set_xlabel("tokens T")
    if ylabel:
        ax.set_ylabel(ylabel)


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
                ts, vs = _series(sel, s, key)
                if ts:
                    style = "-o" if s.startswith("lorafuse") else "--."
                    ax.plot(ts, vs, style, label=s.replace("lorafuse_", "lorafuse "))
            _format_axes(ax, i, di, do, "time / base layer" if j == 0 else None)
    axes[0][0].legend(fontsize=8)
    env = doc["env"]
    fig.suptitle(f"one linear layer, K={K} adapters of rank {r}, {doc['dtype']}, {env['gpu']} "
                 f"(commit {env['commit']}, {env['date'][:10]})", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


GRID_SHOW = ["lorafuse_sum", "lorafuse_concat", "lorafuse_loramap", "peft", "compile_map"]


def grid_markdown(doc, T: int) -> str:
    """The K x r grid at one T: forward / forward+backward ratio of each implementation per shape."""
    rows = combined([row for row in doc["rows"] if row["T"] == T])
    dims = sorted({(x["d_in"], x["d_out"]) for x in rows})
    show = [s for s in GRID_SHOW if any(s in row["impls"] for row in rows)]
    head = "| K | r | R | d_in x d_out | " + " | ".join(s.replace("lorafuse_", "lorafuse ") for s in show) + " |"
    out = [f"T = {T}:", "", head, "|" + " --- |" * (4 + len(show))]
    for row in sorted(rows, key=lambda x: (x["K"], x["r"], dims.index((x["d_in"], x["d_out"])))):
        cells = []
        for s in show:
            e = row["impls"].get(s, {})
            fb = e.get("fb_ratio")
            fb = "-" if fb is None else f"{fb:.2f}"
            cells.append("-" if "fwd_ratio" not in e else f"{e['fwd_ratio']:.2f} / {fb}")
        out.append(f"| {row['K']} | {row['r']} | {row['K'] * row['r']} | {row['d_in']}x{row['d_out']} | "
                   + " | ".join(cells) + " |")
    return "\n".join(out)


def plot_grid(doc, impl: str, path: str) -> None:
    """Forward (top) and forward+backward (bottom) ratio of one implementation against T, a line per
    (K, r), a panel per (d_in, d_out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = combined(doc["rows"])
    dims = sorted({(x["d_in"], x["d_out"]) for x in rows})
    kr = sorted({(x["K"], x["r"]) for x in rows})
    fig, axes = plt.subplots(2, len(dims), figsize=(5 * len(dims), 7), squeeze=False, sharey="row")
    cmap = plt.get_cmap("viridis")
    for j, (di, do) in enumerate(dims):
        for i, key in enumerate(["fwd_ratio", "fb_ratio"]):
            ax = axes[i][j]
            for n, (K, r) in enumerate(kr):
                sel = sorted([x for x in rows if (x["d_in"], x["d_out"], x["K"], x["r"]) == (di, do, K, r)],
                             key=lambda x: x["T"])
                ts, vs = _series(sel, impl, key)
                if ts:
                    ax.plot(ts, vs, "-o", ms=3, color=cmap(n / max(1, len(kr) - 1)), label=f"K={K}, r={r} (R={K * r})")
            _format_axes(ax, i, di, do, f"{impl} time / base layer" if j == 0 else None)
    axes[0][0].legend(fontsize=7)
    env = doc["env"]
    fig.suptitle(f"one linear layer, {impl}, every K and r, {doc['dtype']}, {env['gpu']} "
                 f"(commit {env['commit']}, {env['date'][:10]})", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def _series(rows: list, impl: str, key: str) -> tuple:
    """(T values, ratios) of one implementation over rows sorted by T, rows it lacks left out."""
    pts = [(x["T"], x["impls"].get(impl, {}).get(key)) for x in rows]
    pts = [(t, v) for t, v in pts if v is not None]
    return [t for t, _ in pts], [v for _, v in pts]


def save_figure(fig, path: str) -> None:
    import matplotlib.pyplot as plt

    try:
        atomic_write(Path(path), lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)


def write_json(doc: dict, path: str) -> None:
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(json.dumps(doc, indent=1)))


def pick_shape(doc: dict, K, r, error) -> tuple:
    """(K, r) of the table: as asked, else 3 adapters of rank 16, else the first pair the run measured
    (the smoke grid has r = 5). A pair the run lacks is an error naming the pairs it has."""
    pairs = sorted({(row["K"], row["r"]) for row in doc["rows"]})
    if not pairs:
        error("the result file has no rows")
    if K is None and r is None and (3, 16) not in pairs:
        K, r = pairs[0]
        print(f"(K, r) = ({K}, {r}): the run has no K = 3, r = 16 rows")
    K = 3 if K is None else K
    r = 16 if r is None else r
    if (K, r) not in pairs:
        error(f"the run has no rows with K = {K}, r = {r}; it measured (K, r) in {pairs}")
    return K, r


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("result", nargs="+", help="one result file, or several parts of one grid with --merge")
    p.add_argument("--merge", metavar="OUT.json", help="merge the parts into OUT.json first (same commit and GPU)")
    p.add_argument("--K", type=int, help="adapters of the table and plot (default 3 if measured)")
    p.add_argument("--r", type=int, help="their rank (default 16 if measured)")
    p.add_argument("--grid", type=int, nargs="*", metavar="T",
                   help="print the K x r grid at these T (default: every T) and plot it per lorafuse method")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    for path in args.result:
        if not os.path.isfile(path):
            p.error(f"result file {path!r} does not exist")
    docs = []
    for path in args.result:
        with open(path) as f:
            docs.append(json.load(f))
    if len(docs) > 1 and not args.merge:
        p.error("several result files need --merge OUT.json (one grid's parts, merged into one file)")
    if args.merge:
        doc = merge(docs, args.result)
        write_json(doc, args.merge)
        path = args.merge
        print("wrote", path, f"({len(doc['rows'])} rows, {doc['shapes']} shapes, {len(docs)} runs)")
        spread = repeat_spread(doc["rows"])
        if spread:
            print("largest forward-ratio difference between runs of one shape, T >= 8192:",
                  ", ".join(f"{k} {v:.3f}" for k, v in spread.items()))
    else:
        doc, path = docs[0], args.result[0]
    base = os.path.splitext(path)[0]
    if args.grid is not None:
        for T in args.grid or sorted({row["T"] for row in doc["rows"]}):
            print(grid_markdown(doc, T) + "\n")
        if not args.no_plot:
            for impl in ("lorafuse_loramap", "lorafuse_sum"):
                out = f"{base}-grid-{impl.replace('lorafuse_', '')}.png"
                plot_grid(doc, impl, out)
                print("wrote", out)
        return
    K, r = pick_shape(doc, args.K, args.r, p.error)
    print(markdown(doc, K, r))
    if not args.no_plot:
        out = base + ".png"
        plot(doc, K, r, out)
        print("wrote", out)


if __name__ == "__main__":
    main()

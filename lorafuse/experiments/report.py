"""Writing a study's results: JSON, a markdown table and a PNG, each atomically, with the command and machine."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from lorafuse.export import atomic_write

def machine() -> Dict[str, str]:
    info = {"python": platform.python_version(), "platform": platform.platform(), "cpus": str(os.cpu_count()),
            "torch": torch.__version__}
    try:
        import transformers
        import peft

        info.update(transformers=transformers.__version__, peft=peft.__version__)
    except ImportError:
        pass
    info["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return info


def commit() -> str:
    """The commit the study ran from: $LORAFUSE_COMMIT when set (a copied tree, e.g. on a GPU machine, may
    carry stale git metadata), else git's HEAD here, with '+dirty' when tracked files differ from it."""
    if os.environ.get("LORAFUSE_COMMIT"):
        return os.environ["LORAFUSE_COMMIT"]
    try:
        root = str(Path(__file__).resolve().parents[2])
        sha = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        if not sha:
            return "unknown"
        dirty = subprocess.run(["git", "-C", root, "diff", "--quiet", "HEAD"], capture_output=True, timeout=10)
        return sha + ("+dirty" if dirty.returncode == 1 else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# The command line that runs a study, set by lorafuse.cli; a study called from Python records the script.
COMMAND: Optional[str] = None


def header(study: str, config: dict) -> dict:
    script = sys.argv[0] if sys.argv and sys.argv[0] not in ("", "-c") else "an interactive session"
    command = COMMAND or f"python ({study} called from {script}; the config below gives its arguments)"
    return {"study": study, "command": command,
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "commit": commit(),
            "machine": machine(), "config": config}


def markdown_table(rows: List[dict], columns: Sequence[str]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
        return "" if v is None else str(v)
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_results(out_dir: str, name: str, doc: dict, columns: Sequence[str], plot_metrics: Sequence[str],
                  label_key: str = "method", ylim: Optional[tuple] = (0, 1), notes: str = "",
                  log_y: bool = False) -> dict:
    """<name>.json, <name>.md (table, then notes) and <name>.png (bars of plot_metrics per row, labelled by
    label_key) in out_dir, each written atomically; returns the paths."""
    out = Path(out_dir)
    paths = {"json": out / f"{name}.json", "md": out / f"{name}.md", "png": out / f"{name}.png"}
    from ..train import is_main_process

    if not is_main_process():  # under torchrun, rank 0 writes
        return {k: str(v) for k, v in paths.items()}
    atomic_write(paths["json"], lambda p: Path(p).write_text(json.dumps(doc, indent=1, default=str)))
    table = markdown_table(doc["rows"], columns)
    md = (f"# {doc['study']}\n\nCommand: `{doc['command']}`  \nCommit {doc['commit']}, {doc['date']}, "
          f"{doc['machine'].get('device')} ({doc['machine'].get('cpus')} CPUs)\n\n{table}")
    if notes:
        md += f"\n{notes}\n"
    atomic_write(paths["md"], lambda p: Path(p).write_text(md))

    def plot(p):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [r for r in doc["rows"] if any(isinstance(r.get(m), float) for m in plot_metrics)]
        fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows)), 3.6))
        width = 0.8 / max(1, len(plot_metrics))
        for i, m in enumerate(plot_metrics):
            vals = [r.get(m) if isinstance(r.get(m), float) else 0.0 for r in rows]
            ax.bar([j + i * width for j in range(len(rows))], vals, width, label=m)
        ax.set_xticks([j + width * (len(plot_metrics) - 1) / 2 for j in range(len(rows))])
        ax.set_xticklabels([r[label_key] for r in rows], rotation=30, ha="right", fontsize=8)
        if ylim:
            ax.set_ylim(*ylim)
        if log_y:
            ax.set_yscale("log")
        ax.legend(fontsize=8)
        ax.set_title(doc["study"], fontsize=9)
        fig.tight_layout()
        fig.savefig(p, format="png", dpi=110)
        plt.close(fig)
    atomic_write(paths["png"], plot)
    return {k: str(v) for k, v in paths.items()}

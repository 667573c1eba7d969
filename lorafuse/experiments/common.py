"""What every study shares besides writing results: the methods asked for, data subsets, seeds."""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple


def check_methods(methods: Optional[Sequence[str]], valid: Sequence[str]) -> List[str]:
    """The methods to run (all of `valid` when None), in order; ValueError naming any unknown one."""
    methods = list(methods or valid)
    bad = [m for m in methods if m not in valid]
    if bad:
        raise ValueError(f"unknown methods {bad}; valid: {', '.join(valid)}")
    return methods


def subset(ds, limit: Optional[int], seed: int):
    """A random `limit` examples of a datasets.Dataset (all of it when limit is None or 0)."""
    return ds.shuffle(seed=seed).select(range(min(limit, len(ds)))) if limit else ds


def check_seeds(seeds: Sequence[int]) -> List[int]:
    """The seeds of a multi-seed study: at least one, each once."""
    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct and at least one, got {seeds}")
    return seeds


def mean_sd(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def saved_run(path: Path, seed: int, settings: Dict[str, Any], log: Callable = print,
              as_settings: Optional[Callable[[dict], dict]] = None) -> Optional[Dict[str, Any]]:
    """A seed's saved results (its <study>.json at `path`) when they were run with this seed and
    these settings (each compared with the saved config's value, or with as_settings(saved results)'s),
    else None, saying why: a multi-seed study cut short goes on where it stopped, and never mixes
    settings."""
    if not path.is_file():
        return None
    try:
        prev = json.loads(path.read_text(encoding="utf-8"))
        config = as_settings(prev) if as_settings else prev.get("config", {})
        if not isinstance(config, dict):
            raise ValueError(f"its config is a {type(config).__name__}")
    except (ValueError, UnicodeDecodeError, AttributeError, KeyError, TypeError) as e:
        log(f"seed {seed}: {path} cannot be read back ({type(e).__name__}: {str(e)[:120]}); running again")
        return None
    mismatch = {k: (config.get(k), v) for k, v in settings.items() if config.get(k) != v}
    if config.get("seed") != seed:
        mismatch["seed"] = (config.get("seed"), seed)
    if mismatch:
        log(f"seed {seed}: {path} was run with other settings (saved, now: {mismatch}); running again")
        return None
    from .report import commit, machine

    here = {"commit": commit(), "device": machine()["device"]}
    there = {"commit": prev.get("commit"), "device": prev.get("machine", {}).get("device")}
    differs = [f"{k} {there[k]} (now {here[k]})" for k in here if there[k] != here[k]]
    log(f"seed {seed}: reusing {path} (commit {there['commit']}, {there['device']})"
        + (f"; note: saved from another {', '.join(differs)}" if differs else ""))
    return prev

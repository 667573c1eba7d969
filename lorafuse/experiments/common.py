"""What every study shares besides writing results: the methods asked for, data subsets, seeds."""
from __future__ import annotations

import statistics
from typing import List, Optional, Sequence, Tuple


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

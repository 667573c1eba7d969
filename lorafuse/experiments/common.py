"""What every study shares besides writing results: the methods asked for, and data subsets."""
from __future__ import annotations

from typing import List, Optional, Sequence


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

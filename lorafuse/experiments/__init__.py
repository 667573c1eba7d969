"""The studies: each runs every method on the same footing and writes JSON, a markdown table and a plot.

    recycling   two-hop reasoning from two recycled adapters (the main job, `lorafuse demo`)
    loramap     three perspective adapters composed on COVID-Fact (LoraMap, LoraConcat, LoraHub, ...)
    summation   naive summation of per-domain adapters on SmolLM2, against delta cosines
"""
from .loramap import run_loramap
from .recycling import run_recycling
from .summation import run_summation

__all__ = ["run_loramap", "run_recycling", "run_summation"]

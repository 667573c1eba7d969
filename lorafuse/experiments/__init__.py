"""The studies: each runs every method on the same footing and writes JSON, a markdown table and a plot.

    recycling   two-hop reasoning from two recycled adapters (the main job, `lorafuse demo`)
"""
from .recycling import run_recycling

__all__ = ["run_recycling"]

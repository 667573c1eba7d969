"""Merging baselines on the adapters' weight deltas: task arithmetic, TIES, DARE, magnitude pruning.

    merged = lorafuse.merge_adapters(dirs, method="ties", weights=[1, 1, 1], density=0.2)
    lorafuse.export_peft(merged, "out/ties")        # one standard peft LoRA adapter

Each layer's dense deltas Delta W_i = s_i B_i A_i go through peft's own implementations
(peft.utils.merge_utils), as peft's add_weighted_adapter does; the merged delta is then brought back
to a LoRA by truncated SVD (B = U_r diag(S_r), A = V_r^T, as peft's "*_svd" combinations do).
Task arithmetic is already low rank, so it is kept exactly (concatenated factors) unless a smaller
rank is asked for. As in peft, a layer merges only the adapters that target it.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor

from .adapters import LoraAdapter, load_adapters
from .modules import check_weights
from .train import seeded

__all__ = ["merge_adapters", "MERGE_METHODS"]

MERGE_METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune")
_NEEDS_DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
_RANDOM = ("dare_linear", "dare_ties")


def _peft_merge(method: str, deltas: List[Tensor], weights: Tensor, density: Optional[float],
                majority_sign_method: str) -> Tensor:
    from peft.utils import merge_utils

    if method == "task_arithmetic":
        return merge_utils.task_arithmetic(deltas, weights)
    if method == "ties":
        return merge_utils.ties(deltas, weights, density, majority_sign_method)
    if method == "dare_linear":
        return merge_utils.dare_linear(deltas, weights, density)
    if method == "dare_ties":
        return merge_utils.dare_ties(deltas, weights, density, majority_sign_method)
    return merge_utils.magnitude_prune(deltas, weights, density)


def _truncate(delta: Tensor, rank: int):
    """(A (rank, d_in), B (d_out, rank), relative Frobenius error) of the best rank-`rank` approximation."""
    u, sv, vh = torch.linalg.svd(delta, full_matrices=False)
    rank = min(rank, sv.numel())
    total = sv.square().sum()
    err = (sv[rank:].square().sum() / total).sqrt().item() if total > 0 else 0.0
    return vh[:rank].contiguous(), (u[:, :rank] * sv[:rank]).contiguous(), err


def _layer_stack(module: str) -> str:
    """The path of a module's layer stack: "transformer.h" for "transformer.h.3.attn.c_attn", "" for a
    module outside any numbered stack (lm_head)."""
    parts = module.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:i])
    return ""


@torch.no_grad()
def merge_adapters(
    adapters: Sequence[Any],
    method: str = "task_arithmetic",
    weights: Optional[Sequence[float]] = None,
    density: Optional[float] = None,
    majority_sign_method: str = "total",
    seed: int = 0,
    rank: Union[int, str, None] = None,
    name: Optional[str] = None,
) -> LoraAdapter:
    """Merge K adapters into one LoraAdapter (export it with lorafuse.export_peft).

    Args:
        adapters: peft adapter directories, (state_dict, config) pairs or LoraAdapters.
        method: "task_arithmetic" (sum_i w_i Delta W_i), "ties", "dare_linear", "dare_ties" or
            "magnitude_prune" (peft.utils.merge_utils semantics).
        weights: K numbers (task-arithmetic scaling lambda_i); default 1.0 each.
        density: the fraction of entries kept (0 < density <= 1); required by all but task_arithmetic.
        majority_sign_method: "total" or "frequency" (TIES / DARE-TIES sign election).
        seed: DARE's random drop is drawn from torch's generator seeded with this, layers in order;
            the global RNG state is left as it was.
        rank: the rank of each merged layer: an int, "full" (min(d_out, d_in): exact), or None (the sum
            of the merged adapters' ranks on that layer). Other methods than task_arithmetic are
            truncated by SVD, with the relative Frobenius error in info["truncation_error"];
            task_arithmetic layers stay exact (at their own, lower rank) whenever rank allows it.
    Returns a LoraAdapter with scale 1 on every layer; info holds the method and its arguments.
    """
    if method not in MERGE_METHODS:
        raise ValueError(f"method must be one of {MERGE_METHODS}, got {method!r}")
    loaded = load_adapters(adapters)
    K = len(loaded)
    if weights is None:
        weights = [1.0] * K
    weights = check_weights(weights, K)
    if method in _NEEDS_DENSITY:
        if (density is None or isinstance(density, bool) or not isinstance(density, (int, float))
                or not 0 < float(density) <= 1):
            raise ValueError(f"method {method!r} needs density in (0, 1] (the fraction of entries kept), "
                             f"got {density!r}")
        density = float(density)
    elif density is not None:
        raise ValueError(f"density is not used by method {method!r}; leave it None")
    if majority_sign_method not in ("total", "frequency"):
        raise ValueError(f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}")
    if not (rank is None or rank == "full" or (isinstance(rank, int) and not isinstance(rank, bool) and rank > 0)):
        raise ValueError(f"rank must be a positive int, 'full' or None, got {rank!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")

    # A and B are stored in one orientation whatever fan_in_fan_out says, and peft rewrites the flag
    # per module (a GPT-2 adapter on c_attn and lm_head is saved with False, one on c_fc alone with
    # True): differing flags are refused only when both sides target layer stacks (the path before the
    # layer number: "transformer.h" against "model.layers") and share neither a module nor a stack,
    # i.e. look like adapters of different kinds of models; a side on modules outside any stack alone
    # (lm_head) proves nothing either way. Shapes are checked per module below.
    fifo = [bool(getattr(ad.config, "fan_in_fan_out", False)) if ad.config is not None
            else bool(ad.info.get("fan_in_fan_out", False)) for ad in loaded]
    conv = set().union(*(ad.layers for ad, f in zip(loaded, fifo) if f))
    lin = set().union(*(ad.layers for ad, f in zip(loaded, fifo) if not f))
    conv_stacks = {st for st in map(_layer_stack, conv) if st}
    lin_stacks = {st for st in map(_layer_stack, lin) if st}
    if conv_stacks and lin_stacks and not conv & lin and not conv_stacks & lin_stacks:
        raise ValueError(f"the adapters disagree on fan_in_fan_out (GPT-2-style Conv1D layers or not) and share no "
                         f"module: {dict(zip([ad.name for ad in loaded], fifo))}; they look trained on different "
                         "kinds of models and cannot be merged")

    modules: List[str] = []
    for ad in loaded:
        modules += [k for k in ad.layers if k not in modules]

    layers: Dict[str, tuple] = {}
    errors: Dict[str, float] = {}
    factors = [t for ad in loaded for layer in ad.layers.values() for t in layer[:2]]
    with seeded(seed, tensors=factors):
        for key in modules:
            present = [i for i, ad in enumerate(loaded) if key in ad.layers]
            shapes = {(loaded[i].layers[key][1].shape[0], loaded[i].layers[key][0].shape[1]) for i in present}
            if len(shapes) > 1:
                raise ValueError(f"module {key!r}: the adapters disagree on its shape (d_out, d_in): {sorted(shapes)}")
            layer_rank = sum(loaded[i].layers[key][0].shape[0] for i in present)
            if method == "task_arithmetic" and (rank is None or (rank != "full" and rank >= layer_rank)):
                # exact: concatenated factors, scale and weight folded into B
                a = torch.cat([loaded[i].layers[key][0].float() for i in present], 0)
                b = torch.cat([loaded[i].layers[key][1].float() * (loaded[i].layers[key][2] * weights[i])
                               for i in present], 1)
                layers[key] = (a, b, 1.0)
                errors[key] = 0.0
                continue
            deltas = [loaded[i].delta_weight(key) for i in present]
            w = torch.tensor([weights[i] for i in present], dtype=deltas[0].dtype)
            merged = _peft_merge(method, deltas, w, density, majority_sign_method)
            r = min(merged.shape) if rank == "full" else (layer_rank if rank is None else rank)
            a, b, errors[key] = _truncate(merged, r)
            layers[key] = (a, b, 1.0)

    first = loaded[0].config
    info = {"method": method, "weights": weights, "density": density, "majority_sign_method": majority_sign_method,
            "seed": seed if method in _RANDOM else None, "rank": rank, "adapters": [ad.name for ad in loaded],
            "truncation_error": errors,
            "fan_in_fan_out": any(fifo),
            "task_type": getattr(first, "task_type", None),
            "base_model_name_or_path": getattr(first, "base_model_name_or_path", None)}
    return LoraAdapter(name or f"{method}_merge", layers, config=None, source="merge_adapters", info=info)

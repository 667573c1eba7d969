"""LoraHub: find K adapter weights that make the composition do well on a few examples.

    result = lorafuse.lorahub_search(model, adapter_dirs, batches, budget=40)   # gradient-free
    result = lorafuse.lorahub_train(model, adapter_dirs, batches, steps=50)     # by gradient

The model is composed once (lorafuse.compose) and every candidate is evaluated by writing its weights
into the composed layers, so each evaluation is one forward pass of the fused layers: no re-merge
and no copy of any weight matrix per candidate.

Two compositions:
- "exact" (default): Delta W = sum_i w_i s_i B_i A_i, the exact weighted sum of the deltas
  (MultiLoraLinear method "weighted").
- "factorwise": LoraHub's original Delta W = (sum_i w_i s_i B_i)(sum_i w_i A_i), which carries the
  cross terms w_i w_j B_i A_j. It needs equal ranks on each layer and runs as a LoraMap whose maps are
  stacked w_i I blocks (a_map = [w_1 I .. w_K I], b_map its transpose).
Results say which one was used.

Gradient-free search follows LoraHub: nevergrad's NGOpt over weights in [-1.5, 1.5], starting at 0,
one candidate per budget step, objective = mean loss over the examples + l1 * mean |w|, seed 42.
nevergrad is what LoraHub itself uses, which keeps results comparable with the paper's.
"""
from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from .adapters import adapter_list
from .compose import compose, decompose, get_composition

__all__ = ["lorahub_search", "lorahub_train", "LoraHubResult", "set_lorahub_weights", "COMPOSITIONS"]

COMPOSITIONS = ("exact", "factorwise")
LossFn = Callable[[nn.Module, Any], Any]


@dataclass
class LoraHubResult:
    """weights: the K weights found (global adapter order), also left set in the model.
    objective: loss + l1 * mean|w| at those weights; loss: the mean task loss (or -metric) alone.
    composition: "exact" or "factorwise"; method: the optimiser ("NGOpt", "adam", ...);
    history: (weights, objective) of every evaluation or step, in order; adapters: their names;
    seed: the search's seed (None for gradient training, which draws nothing at random).
    """

    weights: List[float]
    objective: float
    loss: float
    composition: str
    method: str
    adapters: List[str]
    seed: Optional[int]
    l1: float
    history: List[Tuple[List[float], float]] = field(default_factory=list)
    info: Dict[str, Any] = field(default_factory=dict)


def _default_loss(model: nn.Module, batch: Any) -> Tensor:
    """Mean cross-entropy of a transformers model on a batch with labels (its own .loss)."""
    if not isinstance(batch, Mapping):
        raise TypeError(f"with the default loss each example batch must be a dict of model inputs with 'labels', "
                        f"got {type(batch).__name__}; or pass metric_or_loss")
    if "labels" not in batch:
        raise ValueError("with the default loss each example batch needs 'labels' (the model computes the "
                         "cross-entropy); or pass metric_or_loss")
    return model(**batch).loss


def _batches(examples: Any) -> List[Any]:
    if isinstance(examples, Mapping):
        return [examples]
    batches = list(examples)
    if not batches:
        raise ValueError("examples must hold at least one batch")
    return batches


def _prepare(model: nn.Module, adapters: Optional[Sequence[Any]], composition: str):
    """Compose the model for the search (or check an existing composition); returns the Composition."""
    if composition not in COMPOSITIONS:
        raise ValueError(f"composition must be one of {COMPOSITIONS}, got {composition!r}")
    want = "weighted" if composition == "exact" else "loramap"
    comp = getattr(model, "_lorafuse_composition", None)
    if comp is None:
        if adapters is None:
            raise ValueError("adapters is required unless the model is already composed")
        adapters = adapter_list(adapters)
        if composition == "exact":
            compose(model, adapters, method="weighted", weights=[0.0] * len(adapters))
        else:
            _check_equal_ranks(adapters)
            r = _common_rank(adapters)
            compose(model, adapters, method="loramap", map_rank=r)
        comp = get_composition(model)
    else:
        if adapters is not None:
            raise ValueError("the model is already composed: pass adapters=None to search over its adapters")
        if comp.method != want:
            raise ValueError(f"composition={composition!r} needs a model composed with method={want!r}, "
                             f"got method={comp.method!r}")
        if comp.state != "composed":
            raise ValueError("the model is merged: call lorafuse.unmerge(model) first")
    if composition == "factorwise":
        for key, layer in comp.layers().items():
            if len(set(layer.ranks)) != 1 or layer.map_rank != layer.ranks[0]:
                raise ValueError(f"composition='factorwise' needs equal ranks on each layer and map_rank equal to "
                                 f"them; module {key!r} has ranks {layer.ranks}, map_rank {layer.map_rank}")
    return comp


def _check_equal_ranks(adapters) -> None:
    from .adapters import load_adapters

    loaded = load_adapters(adapters)
    for ad in loaded[1:]:
        for key, (a, _, _) in ad.layers.items():
            for other in loaded:
                if key in other.layers and other.layers[key][0].shape[0] != a.shape[0]:
                    raise ValueError(f"composition='factorwise' (LoraHub's sum of A's and of B's) needs equal ranks: "
                                     f"module {key!r} has rank {other.layers[key][0].shape[0]} in adapter "
                                     f"{other.name!r} and {a.shape[0]} in {ad.name!r}")


def _common_rank(adapters) -> int:
    from .adapters import load_adapters

    ranks = {a.shape[0] for ad in load_adapters(adapters) for a, _, _ in ad.layers.values()}
    if len(ranks) != 1:
        raise ValueError(f"composition='factorwise' needs one rank across layers to set map_rank, got {sorted(ranks)}")
    return ranks.pop()


def _check_l1(l1: Any) -> None:
    if isinstance(l1, bool) or not isinstance(l1, numbers.Real) or not math.isfinite(l1) or l1 < 0:
        raise ValueError(f"l1 must be a finite number >= 0, got {l1!r}")


@torch.no_grad()
def set_lorahub_weights(model: nn.Module, weights: Sequence[float]) -> None:
    """Write K global weights into every composed layer (each layer takes the entries of its adapters)."""
    comp = get_composition(model)
    given = [float(x) for x in weights]
    w = torch.as_tensor(given, dtype=torch.float32)
    if w.numel() != len(comp.adapters):
        raise ValueError(f"weights must have one entry per adapter ({len(comp.adapters)}), got {w.numel()}")
    if not all(math.isfinite(x) for x in given):
        raise ValueError(f"weights must be finite, got {given}")
    for slot in comp.slots.values():  # every layer checked before any is written
        layer = slot.composed
        if layer.method not in ("weighted", "loramap"):
            raise ValueError(f"module {slot.key!r} is composed with method {layer.method!r}; LoraHub weights "
                             f"apply to 'weighted' (exact) or 'loramap' (factorwise) compositions")
        if layer.method == "loramap":
            r, k = layer.ranks[0], len(slot.adapter_indices)
            if any(ri != r for ri in layer.ranks) or tuple(layer.a_map.shape) != (r, k * r):
                raise ValueError(f"module {slot.key!r}: LoraHub's factorwise weights need equal ranks and "
                                 f"map_rank = the rank ({r}), got ranks {list(layer.ranks)} and a_map "
                                 f"{tuple(layer.a_map.shape)}")
    for slot in comp.slots.values():
        layer = slot.composed
        w_layer = w[slot.adapter_indices].to(layer.adapter_scales.device)
        if layer.method == "weighted":
            layer.weights.copy_(w_layer)
        else:
            r = layer.ranks[0]
            eye = torch.eye(r, device=layer.a_map.device)
            blocks = torch.cat([wi * eye for wi in w_layer], 1)  # (r, K_layer r)
            layer.a_map.copy_(blocks)
            layer.b_map.copy_(blocks.t())
    comp.weights = given


def _restorer(model: nn.Module, comp) -> Callable[[], None]:
    """A function that puts an already composed model back as it is now: its composed layers' own
    tensors (weights, maps; not the base layers), their grads, the composition's recorded weights and
    the training flag."""
    comp_weights = None if comp.weights is None else list(comp.weights)
    saved = []
    for slot in comp.slots.values():
        layer = slot.composed
        for p in layer.parameters(recurse=False):
            saved.append((p, p.detach().clone(), p.requires_grad, p.grad))
    training = {m: m.training for m in model.modules()}

    def restore() -> None:
        with torch.no_grad():
            for p, value, flag, grad in saved:
                p.copy_(value)
                p.requires_grad_(flag)
                p.grad = grad
        for m, flag in training.items():
            m.train(flag)
        comp.weights = comp_weights

    return restore


def _mean_loss(model, batches, loss_fn, maximize: bool) -> Tensor:
    total = 0.0
    for batch in batches:
        value = loss_fn(model, batch)
        total = total + (value if isinstance(value, Tensor) else torch.tensor(float(value)))
    mean = total / len(batches)
    return -mean if maximize else mean


def _import_nevergrad():
    try:
        import nevergrad
    except ImportError as e:
        raise ImportError("lorahub_search needs nevergrad: pip install nevergrad "
                          "(or, in a lorafuse checkout, pip install -e '.[lorahub]')") from e
    return nevergrad


def lorahub_search(
    model: nn.Module,
    adapters: Optional[Sequence[Any]],
    examples: Any,
    metric_or_loss: Optional[LossFn] = None,
    budget: int = 40,
    l1: float = 0.05,
    seed: int = 42,
    bounds: Tuple[float, float] = (-1.5, 1.5),
    composition: str = "exact",
    maximize: bool = False,
    optimizer: str = "NGOpt",
) -> LoraHubResult:
    """Gradient-free search of the K adapter weights (LoraHub), each candidate one pass of the fused layers.

    Args:
        model: a transformers model (composed here) or one composed by lorafuse.compose with
            method "weighted" (exact) / "loramap" (factorwise), then adapters=None.
        adapters: K peft adapter directories, (state_dict, config) pairs or LoraAdapters.
        examples: a batch (dict of model inputs) or a list of batches.
        metric_or_loss: fn(model, batch) -> number; default: the model's own loss (mean cross-entropy,
            the batches need "labels"). Lower is better unless maximize=True (then it is a metric).
        budget: number of candidates evaluated (LoraHub: 40). l1: weight of the mean |w| penalty.
        seed: seeds nevergrad's parametrization (deterministic search). bounds: the weights' box.
        composition: "exact" or "factorwise" (module docstring). optimizer: a nevergrad optimizer name.
    Returns a LoraHubResult; the model is left composed with the weights found.
    """
    ng = _import_nevergrad()
    if not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be a positive int, got {budget!r}")
    try:
        lo, hi = (float(b) for b in bounds)
    except (TypeError, ValueError):
        raise ValueError(f"bounds must be (low, high), two numbers, got {bounds!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"bounds must be (low, high), finite with low < high, got {bounds!r}")
    _check_l1(l1)
    if not lo <= 0.0 <= hi:
        raise ValueError(f"bounds must contain 0 (the search starts from all weights 0, as LoraHub's), got {bounds!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2 ** 32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    if optimizer not in ng.optimizers.registry:
        raise ValueError(f"optimizer {optimizer!r} is not a nevergrad optimizer (e.g. 'NGOpt', 'CMA', 'OnePlusOne')")
    batches = _batches(examples)
    loss_fn = metric_or_loss or _default_loss
    composed_here = getattr(model, "_lorafuse_composition", None) is None
    comp = _prepare(model, adapters, composition)
    restore = None if composed_here else _restorer(model, comp)
    try:
        return _search(model, comp, batches, loss_fn, budget, l1, seed, lo, hi, composition, maximize, optimizer, ng)
    except BaseException:
        # A failed search leaves the model as it was given: not composed, or composed as it was.
        if composed_here:
            decompose(model)
        else:
            restore()
        raise


def _search(model, comp, batches, loss_fn, budget, l1, seed, lo, hi, composition, maximize, optimizer, ng):
    """lorahub_search's loop on a prepared composition (arguments checked there)."""
    import numpy as np

    K = len(comp.adapters)
    was_training = model.training
    model.eval()

    history: List[Tuple[List[float], float]] = []

    @torch.no_grad()
    def objective(w: "np.ndarray") -> float:
        w_list = [float(x) for x in w]
        set_lorahub_weights(model, w_list)
        value = float(_mean_loss(model, batches, loss_fn, maximize)) + l1 * float(np.mean(np.abs(w)))
        if not math.isfinite(value):
            value = float("inf")
        history.append((w_list, value))
        return value

    param = ng.p.Array(init=np.zeros(K), lower=lo, upper=hi)
    param.random_state = np.random.RandomState(seed)
    opt = ng.optimizers.registry[optimizer](parametrization=param, budget=budget)
    try:
        with warnings.catch_warnings():
            # For a few weights NGOpt runs nevergrad's COBYLA, which hands scipy a stopping radius that
            # scipy replaces with a valid one and warns about on every search: nothing a caller can fix.
            warnings.filterwarnings("ignore", message="COBYLA: Invalid RHOEND", category=UserWarning)
            recommendation = opt.minimize(objective)
        best = [float(x) for x in recommendation.value]
        set_lorahub_weights(model, best)
        with torch.no_grad():
            loss = float(_mean_loss(model, batches, loss_fn, maximize))
    finally:
        model.train(was_training)
    return LoraHubResult(weights=best, objective=loss + l1 * sum(abs(x) for x in best) / K, loss=loss,
                         composition=composition, method=optimizer, adapters=comp.adapter_names, seed=seed, l1=l1,
                         history=history, info={"budget": budget, "bounds": (lo, hi), "maximize": maximize})


def lorahub_train(
    model: nn.Module,
    adapters: Optional[Sequence[Any]],
    examples: Any,
    loss: Optional[LossFn] = None,
    steps: int = 50,
    lr: float = 0.05,
    l1: float = 0.05,
    composition: str = "exact",
    per_layer: bool = False,
    init: Optional[Sequence[float]] = None,
) -> LoraHubResult:
    """Train the K weights by gradient (Adam) on mean loss + l1 * mean |w|; everything else stays frozen.

    per_layer=False (default) trains K global weights shared by all layers, as LoraHub has: each step
    writes them into the layers and sums the layers' gradients back (the chain rule for tied weights).
    per_layer=True lets every layer keep its own weights ("exact" only). loss: fn(model, batch) ->
    scalar tensor (default: the model's own cross-entropy). init: starting weights (default 1/K each).
    Each step uses every batch in `examples` once. Returns a LoraHubResult (method "adam"); the model
    is left composed with the trained weights.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if per_layer and composition != "exact":
        raise ValueError("per_layer=True needs composition='exact'")
    lr_value = lr.item() if isinstance(lr, Tensor) and lr.numel() == 1 else lr  # Adam takes a tensor lr too
    if (isinstance(lr_value, bool) or not isinstance(lr_value, numbers.Real) or not math.isfinite(lr_value)
            or lr_value < 0):
        raise ValueError(f"lr must be a finite number >= 0, got {lr!r}")
    _check_l1(l1)
    if init is not None:
        try:
            init = [float(x) for x in init]
        except (TypeError, ValueError):
            raise ValueError(f"init must be a sequence of numbers, one per adapter, got {init!r}") from None
        if not all(math.isfinite(x) for x in init):
            raise ValueError(f"init must be finite, got {init}")
    batches = _batches(examples)
    loss_fn = loss or _default_loss
    composed_here = getattr(model, "_lorafuse_composition", None) is None
    comp = _prepare(model, adapters, composition)
    restore = None if composed_here else _restorer(model, comp)
    try:
        return _train(model, comp, batches, loss_fn, steps, lr, l1, composition, per_layer, init)
    except BaseException:
        # A failed run leaves the model as it was given: not composed, or composed as it was.
        if composed_here:
            decompose(model)
        else:
            restore()
        raise


def _train(model, comp, batches, loss_fn, steps, lr, l1, composition, per_layer, init):
    """lorahub_train's loop on a prepared composition (arguments checked there)."""
    K = len(comp.adapters)
    w0 = [1.0 / K] * K if init is None else [float(x) for x in init]
    if len(w0) != K:
        raise ValueError(f"init must have one entry per adapter ({K}), got {len(w0)}")
    set_lorahub_weights(model, w0)
    layers = [s.composed for s in comp.slots.values()]
    index = [torch.as_tensor(s.adapter_indices) for s in comp.slots.values()]
    params: List[Tensor] = []
    if per_layer:
        params = [layer.weights for layer in layers]
    else:
        w = torch.tensor(w0, dtype=torch.float32, requires_grad=True)
        params = [w]
    # Only the mixing weights train; remember and restore the composition's own flags afterwards.
    own = [(p, p.requires_grad) for layer in layers for p in layer.parameters()]
    for p, _ in own:
        p.requires_grad_(False)
    for layer in layers:
        if layer.method == "weighted":
            layer.weights.requires_grad_(True)
        else:
            layer.a_map.requires_grad_(True)
            layer.b_map.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    history: List[Tuple[List[float], float]] = []
    was_training = model.training
    model.eval()  # no dropout: the objective is the same function of w at every step
    try:
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            for layer in layers:
                for p in layer.parameters():
                    p.grad = None
            if not per_layer:
                set_lorahub_weights(model, w.detach().tolist())
            task = _mean_loss(model, batches, loss_fn, False)
            flat = torch.cat([p.reshape(-1) for p in params]) if per_layer else w
            pen = l1 * flat.abs().mean()
            task.backward()
            pen.backward()
            if not per_layer:
                with torch.no_grad():
                    grad = torch.zeros(K)
                    for layer, idx in zip(layers, index):
                        grad.index_add_(0, idx, _weight_grad(layer).cpu())
                    w.grad = grad + (w.grad if w.grad is not None else 0)
            # per_layer: no global weights to record (each layer has its own .weights)
            step_w = [float("nan")] * K if per_layer else w.detach().tolist()
            history.append((step_w, task.item() + pen.item()))
            opt.step()
    finally:
        for p, flag in own:
            p.requires_grad_(flag)
        model.train(was_training)
    if not per_layer:
        set_lorahub_weights(model, w.detach().tolist())
        final = w.detach().tolist()
    else:
        final = [float("nan")] * K  # no global weights: see each layer's .weights
        comp.weights = None
    with torch.no_grad():
        task = float(_mean_loss(model, batches, loss_fn, False))
        flat = torch.cat([p.detach().reshape(-1) for p in params])
    return LoraHubResult(weights=final, objective=task + l1 * float(flat.abs().mean()), loss=task,
                         composition=composition, method="adam", adapters=comp.adapter_names, seed=None, l1=l1,
                         history=history, info={"steps": steps, "lr": lr, "per_layer": per_layer})


def _weight_grad(layer) -> Tensor:
    """d loss / d w_layer (one entry per adapter the layer carries)."""
    if layer.method == "weighted":
        g = layer.weights.grad
        return torch.zeros(len(layer.ranks)) if g is None else g.float()
    # factorwise: a_map = [w_1 I .. w_K I], b_map = a_map^T; d/dw_i = trace of block i of each gradient
    r = layer.ranks[0]
    out = torch.zeros(len(layer.ranks))
    for g, blocks in ((layer.a_map.grad, lambda g: g.reshape(r, -1, r).transpose(0, 1)),
                      (layer.b_map.grad, lambda g: g.reshape(-1, r, r))):
        if g is not None:
            out += blocks(g.float()).diagonal(dim1=1, dim2=2).sum(-1).cpu()
    return out

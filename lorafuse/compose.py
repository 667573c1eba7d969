"""Compose several peft LoRA adapters onto a transformers model: every targeted linear layer becomes a
MultiLoraLinear holding the adapters that target it.

    model = lorafuse.compose(model, ["adapters/math", "adapters/med"], method="weighted", weights=[0.7, 0.3])
    lorafuse.merge(model)      # plain layers (nn.Linear, or Conv1D on GPT-2) with the composition folded in
    lorafuse.unmerge(model)    # back to the MultiLoraLinear layers
    lorafuse.decompose(model)  # the original modules (the same objects) and requires_grad flags

The integration (peft adapters, transformers modules) lives here and in adapters.py; the math is
MultiLoraLinear's (lorafuse.modules) and lora_linear's.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from . import modules as _modules
from .adapters import LoraAdapter, adapters_from_peft, load_adapters
from .modules import MultiLoraLinear, check_weights

__all__ = ["compose", "decompose", "unmerge", "merge", "get_composition", "Composition"]

_ATTR = "_lorafuse_composition"


@dataclass
class _Slot:
    """One replaced module: what was there, the composed layer, and (after merge) the merged layer."""

    key: str
    original: nn.Module
    composed: MultiLoraLinear
    adapter_indices: List[int]
    conv1d: Optional[nn.Module] = None  # the GPT-2 Conv1D whose transposed weight the base nn.Linear views
    merged: Optional[nn.Module] = None  # nn.Linear, or Conv1D where the original was one


@dataclass
class Composition:
    """What compose() did to a model (read it with lorafuse.get_composition(model)).

    adapters: the LoraAdapters in the global order; method; weights (global, K entries: compose's, or
    the last ones LoraHub wrote into every layer; None where there are none, or after LoraHub trained
    each layer's own; a layer trained since holds its own: read its `weights`);
    kwargs: what was passed on to MultiLoraLinear; slots: module path -> _Slot; state: "composed" or
    "merged"; requires_grad: every parameter's flag before compose (restored by decompose).
    """

    adapters: List[LoraAdapter]
    method: str
    weights: Optional[List[float]]
    kwargs: Dict[str, Any]
    slots: Dict[str, _Slot]
    root: nn.Module
    requires_grad: Dict[str, bool] = field(default_factory=dict)
    state: str = "composed"
    # PeftModel input: peft LoRA wrappers of layers that no composed adapter targets, replaced by their
    # base layer so that adapters left out of the composition do not act through them.
    unwrapped: Dict[str, nn.Module] = field(default_factory=dict)

    @property
    def adapter_names(self) -> List[str]:
        return [a.name for a in self.adapters]

    def layers(self) -> Dict[str, MultiLoraLinear]:
        """module path -> its MultiLoraLinear (also while merged)."""
        return {k: s.composed for k, s in self.slots.items()}

    def layer_adapters(self) -> Dict[str, List[str]]:
        """module path -> names of the adapters that layer carries, in the global order."""
        return {k: [self.adapters[i].name for i in s.adapter_indices] for k, s in self.slots.items()}


def _root_of(model: nn.Module) -> nn.Module:
    """The module that peft adapter keys (prefix stripped) are relative to."""
    try:
        from peft import PeftModel
    except ImportError:  # peft is a core dependency; keep plain models working regardless
        return model
    if isinstance(model, PeftModel):
        return model.base_model.model
    return model


def _is_conv1d(module: nn.Module) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return False
    return isinstance(module, Conv1D)


def _base_of(module: nn.Module) -> nn.Module:
    """The frozen linear under a peft LoRA wrapper, the original module under a peft training wrapper
    (modules_to_save, trainable tokens), or the module itself."""
    get_base = getattr(module, "get_base_layer", None)
    if callable(get_base):
        return get_base()
    kinds = _peft_wrapper_types()
    training_wrapper = kinds[1] if kinds else None
    return module.original_module if training_wrapper and isinstance(module, training_wrapper) else module


def _peft_wrapper_types() -> tuple:
    """(peft's LoRA layer base class, its training wrappers' base class: modules_to_save, trainable
    tokens), as this peft has them; () without peft."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return ()
    try:
        from peft.utils.other import AuxiliaryTrainingWrapper as Aux
    except ImportError:  # older peft: modules_to_save only
        from peft.utils.other import ModulesToSaveWrapper as Aux
    return (BaseTunerLayer, Aux)


def _linear_for(key: str, module: nn.Module):
    """(nn.Linear base for MultiLoraLinear, Conv1D or None). Conv1D's weight is (d_in, d_out): the
    nn.Linear gets its transposed view (no copy) and the same bias Parameter."""
    base = _base_of(module)
    if isinstance(base, MultiLoraLinear):
        raise ValueError(f"module {key!r} is already a MultiLoraLinear: call lorafuse.decompose(model) first")
    if isinstance(base, nn.Linear):
        return base, None
    if _is_conv1d(base):
        d_in, d_out = base.weight.shape
        lin = nn.Linear(d_in, d_out, bias=base.bias is not None, device="meta")
        lin.weight = nn.Parameter(base.weight.detach().t(), requires_grad=False)
        if base.bias is not None:
            lin.bias = base.bias
        return lin, base
    raise NotImplementedError(f"module {key!r} is a {type(base).__name__}: only nn.Linear and GPT-2 Conv1D "
                              f"layers can carry composed LoRA adapters")


def _in_out(base: nn.Module) -> tuple:
    """(d_in, d_out) of an nn.Linear or Conv1D without building anything."""
    if _is_conv1d(base):
        return tuple(base.weight.shape)
    return base.weight.shape[1], base.weight.shape[0]


def _plan(root: nn.Module, adapters: List[LoraAdapter]) -> Dict[str, List[int]]:
    """module path -> indices of the adapters that target it, in model order. Raises before any change."""
    named = dict(root.named_modules())
    targeted: Dict[str, List[int]] = {}
    for i, ad in enumerate(adapters):
        for key, (a, b, _) in ad.layers.items():
            module = named.get(key)
            if module is None:
                raise ValueError(f"adapter {ad.name!r} targets module {key!r}, which the model "
                                 f"({type(root).__name__}) does not have: is the adapter for another architecture?")
            base = _base_of(module)
            if isinstance(base, MultiLoraLinear):
                raise ValueError(f"module {key!r} is already a MultiLoraLinear: call lorafuse.decompose(model) first")
            if not (isinstance(base, nn.Linear) or _is_conv1d(base)):
                raise NotImplementedError(f"adapter {ad.name!r} targets module {key!r}, a {type(base).__name__}: "
                                          f"only nn.Linear and GPT-2 Conv1D layers are supported")
            d_in, d_out = _in_out(base)
            r = a.shape[0]
            if a.shape[1] != d_in or b.shape[0] != d_out:
                raise ValueError(f"adapter {ad.name!r} does not fit module {key!r}: the module maps {d_in} -> "
                                 f"{d_out} features, so lora_A must be ({r}, {d_in}) and lora_B ({d_out}, {r}); "
                                 f"got lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}")
            targeted.setdefault(key, []).append(i)
        for path, saved in ad.base_weights.items():
            key, param = path.rsplit(".", 1)
            module = named.get(key)
            w = getattr(_base_of(module), param, None) if module is not None else None
            if not isinstance(w, torch.Tensor):
                raise ValueError(f"adapter {ad.name!r} carries a saved base {param} for module {key!r}, which the "
                                 f"model ({type(root).__name__}) does not have")
            if saved.shape != w.shape or not torch.equal(saved.to(w.device, w.dtype), w.detach()):
                how = (f"shape {tuple(saved.shape)} against the model's {tuple(w.shape)}" if saved.shape != w.shape
                       else f"same shape {tuple(w.shape)} as the model's, different values")
                raise NotImplementedError(
                    f"adapter {ad.name!r} carries its own base {param} for module {key!r} (saved with it: peft's "
                    f"save_embedding_layers, e.g. after resizing the vocabulary, or a whole model's state dict), "
                    f"which differs from the model's ({how}): adapters that change base weights are not supported")
    order = {k: n for n, k in enumerate(named)}
    return dict(sorted(targeted.items(), key=lambda kv: order[kv[0]]))


def _other_peft_wrappers(root: nn.Module, composed_keys) -> Dict[str, nn.Module]:
    """Outermost peft wrappers (module path -> wrapper) that are not among composed_keys: LoRA layers and
    the training wrappers of adapters left out (another adapter's modules_to_save copy of a head would
    act otherwise)."""
    kinds = _peft_wrapper_types()
    if not kinds:
        return {}
    found: Dict[str, nn.Module] = {}
    for key, module in root.named_modules():
        if isinstance(module, kinds) and not any(key.startswith(k + ".") for k in found):
            if key not in composed_keys:
                found[key] = module
    return found


def _check_peft_layers(model: nn.Module, root: nn.Module) -> None:
    """peft LoRA layers already in the model: merged ones would count their deltas twice, and outside a
    PeftModel (e.g. transformers' load_adapter) compose cannot tell which adapters should stay active."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return
    for key, module in root.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        if getattr(module, "merged", False):
            raise ValueError(f"module {key!r} has peft adapters merged into its base weights (merge_adapter): "
                             f"call unmerge_adapter() before compose")
        if root is model:
            raise ValueError(f"module {key!r} is a peft LoRA layer, but the model is not a PeftModel (adapters "
                             f"loaded with transformers' load_adapter?): remove them first (delete_adapter), "
                             f"or pass a PeftModel and choose its adapters with adapter_names")


def _set_module(root: nn.Module, key: str, module: nn.Module) -> None:
    parent_name, _, child = key.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def _valid_methods() -> tuple:
    # Read at call time so that methods added to MultiLoraLinear later are accepted here unchanged.
    return tuple(getattr(_modules, "METHODS", ()))


def compose(
    model: nn.Module,
    adapters: Optional[Sequence[Any]] = None,
    method: str = "sum",
    weights: Optional[Sequence[float]] = None,
    map_rank: Optional[int] = None,
    adapter_names: Optional[Sequence[str]] = None,
    **kw: Any,
) -> nn.Module:
    """Replace every layer that the adapters target with a MultiLoraLinear carrying them; freeze the rest.

    Args:
        model: a transformers model (Llama-, BERT-, GPT-2-style, ...) or a PeftModel.
        adapters: K peft adapter directories, (state_dict, LoraConfig) pairs or LoraAdapters. With a
            PeftModel, leave it None and name its loaded adapters in `adapter_names` (default: all).
        method: one of MultiLoraLinear's methods ("sum", "weighted", "concat", "loramap", ...).
        weights: K numbers (global adapter order); a layer that carries only some adapters gets theirs.
            For "weighted" the default is 1/K each (averaging over all K adapters).
        map_rank: m for "loramap".
        **kw: passed on unchanged to every MultiLoraLinear (e.g. map_init="sum").

    Returns the same model object, modified in place. Nothing is modified when compose raises.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if getattr(model, _ATTR, None) is not None:
        raise ValueError("model is already composed: call lorafuse.decompose(model) first")
    methods = _valid_methods()
    if method not in methods:
        raise ValueError(f"method must be one of {methods}, got {method!r}")
    root = _root_of(model)
    _check_peft_layers(model, root)
    if adapters is None:
        if root is model:
            raise ValueError("adapters is required unless model is a PeftModel with loaded adapters")
        # Composed onto the PeftModel's own base, which holds any change its adapters' init made.
        adapters = adapters_from_peft(model, adapter_names, base_changed_ok=True)
    else:
        if adapter_names is not None:
            raise ValueError("adapter_names selects adapters loaded in a PeftModel; pass adapters=None with it")
        adapters = load_adapters(adapters)
    K = len(adapters)
    if weights is not None:
        weights = check_weights(weights, K)
    elif method == "weighted":
        weights = [1.0 / K] * K

    plan = _plan(root, adapters)
    if not plan:
        raise ValueError("the adapters target no module of the model")

    # Build every layer before touching the model, so a failure leaves it as it was.
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    slots: Dict[str, _Slot] = {}
    try:
        for key, idx in plan.items():
            original = root.get_submodule(key)
            base, conv = _linear_for(key, original)
            triples = [adapters[i].layers[key] for i in idx]
            layer_kw = dict(kw)
            if weights is not None:
                layer_kw["weights"] = [weights[i] for i in idx]
            if map_rank is not None:
                layer_kw["map_rank"] = map_rank
            if method == "route" and kw.get("router") == "uniform" and len(idx) < K:
                # averaging over the whole library: the adapters absent here add a zero delta
                layer_kw["num_adapters"] = K
            top_k = kw.get("top_k")
            if (method == "route" and isinstance(top_k, numbers.Integral) and not isinstance(top_k, bool)
                    and top_k > len(idx)):
                raise ValueError(f"top_k={top_k} but only {len(idx)} of the {len(adapters)} adapters target {key!r}: "
                                 f"routing chooses among each layer's own adapters, so top_k can be at most the "
                                 f"fewest adapters on any targeted layer")
            composed = MultiLoraLinear(base, triples, method=method, **layer_kw)
            slots[key] = _Slot(key, original, composed, list(idx), conv1d=conv)
    except Exception:
        # MultiLoraLinear freezes its base as it is built: give the flags back.
        for n, p in model.named_parameters():
            p.requires_grad_(requires_grad[n])
        raise

    # MultiLoraLinear decides what trains (weights, a_cat/b_cat, maps): keep its flags through the freeze.
    own_flags = [(p, p.requires_grad) for s in slots.values()
                 for n, p in s.composed.named_parameters() if not n.startswith("base_layer.")]
    for p in model.parameters():
        p.requires_grad_(False)
    for p, flag in own_flags:
        p.requires_grad_(flag)
    unwrapped = _other_peft_wrappers(root, slots) if root is not model else {}
    for key, slot in slots.items():
        _set_module(root, key, slot.composed)
    for key, wrapper in unwrapped.items():
        _set_module(root, key, _base_of(wrapper))
    setattr(model, _ATTR, Composition(adapters, method, weights, dict(kw, map_rank=map_rank), slots, root,
                                      requires_grad, unwrapped=unwrapped))
    return model


def get_composition(model: nn.Module) -> Composition:
    """The Composition that compose() attached to `model` (ValueError if it has none)."""
    comp = getattr(model, _ATTR, None)
    if comp is None:
        raise ValueError("model has no lorafuse composition: call lorafuse.compose(model, adapters) first")
    return comp


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Fold each composed layer into a plain layer with weight W + delta W (a new tensor in W's dtype):
    an nn.Linear, or a Conv1D where the model had one (GPT-2), so that the merged model saves and
    reloads with its own class.

    The original weights stay untouched, so unmerge()/decompose() restore them exactly. Returns the model.
    """
    comp = get_composition(model)
    if comp.state == "merged":
        return model
    for key, slot in comp.slots.items():
        layer = slot.composed
        base = layer.base_layer
        w = base.weight
        delta = layer.delta_weight().to(w.device)
        if slot.conv1d is not None:
            # Conv1D keeps W^T (d_in, d_out), contiguous as save_pretrained needs. Built from the Linear
            # view, which model.to()/half() kept current (the Conv1D itself is off the model).
            with torch.device("meta"):
                merged = type(slot.conv1d)(layer.out_features, layer.in_features)
            merged.weight = nn.Parameter((w.to(delta.dtype) + delta).t().contiguous().to(w.dtype), requires_grad=False)
        else:
            merged = nn.Linear(layer.in_features, layer.out_features, bias=base.bias is not None, device="meta")
            merged.weight = nn.Parameter((w.to(delta.dtype) + delta).to(w.dtype), requires_grad=False)
        if base.bias is not None:
            merged.bias = base.bias
        slot.merged = merged
        _set_module(comp.root, key, merged)
    comp.state = "merged"
    return model


def _follow_merged(slot: _Slot) -> None:
    """model.to()/half() while merged reached the merged layers, not the composed ones (off the model):
    bring a composed layer to its merged layer's device and dtype."""
    if slot.merged is None:
        return
    w, base_w = slot.merged.weight, slot.composed.base_layer.weight
    if base_w.dtype != w.dtype or base_w.device != w.device:
        slot.composed.to(device=w.device, dtype=w.dtype)


def unmerge(model: nn.Module) -> nn.Module:
    """Undo merge(): put the MultiLoraLinear layers back (the same objects). Returns the model."""
    comp = get_composition(model)
    for key, slot in comp.slots.items():
        _follow_merged(slot)
        _set_module(comp.root, key, slot.composed)
        slot.merged = None
    comp.state = "composed"
    return model


def _follow_device(module: nn.Module) -> None:
    """A peft wrapper's LoRA factors were outside the model while it was composed, so model.to(device)
    did not move them: put them on the device of the base layer they wrap."""
    base = _base_of(module)
    if base is module or getattr(base, "weight", None) is None:
        return
    device = base.weight.device
    if any(p.device != device for p in module.parameters()):
        module.to(device=device)


@torch.no_grad()
def _copy_back_conv1d(conv: nn.Module, linear_weight: torch.Tensor) -> None:
    """model.to()/half() replace the data of a Conv1D's Linear view (_linear_for), not the Conv1D's:
    copy it back before the Conv1D returns to the model."""
    if linear_weight.data_ptr() != conv.weight.data_ptr() or linear_weight.dtype != conv.weight.dtype:
        conv.weight.data = linear_weight.data.t()


@torch.no_grad()
def decompose(model: nn.Module) -> nn.Module:
    """Undo compose() (merged or not): the original modules, the same objects, and every parameter's
    requires_grad flag as before compose. Returns the model."""
    comp = get_composition(model)
    for key, slot in comp.slots.items():
        _follow_merged(slot)
        if slot.conv1d is not None:
            _copy_back_conv1d(slot.conv1d, slot.composed.base_layer.weight)
        _set_module(comp.root, key, slot.original)
        _follow_device(slot.original)
    for key, wrapper in comp.unwrapped.items():
        _set_module(comp.root, key, wrapper)
        _follow_device(wrapper)
    delattr(model, _ATTR)
    for n, p in model.named_parameters():
        if n in comp.requires_grad:
            p.requires_grad_(comp.requires_grad[n])
    return model

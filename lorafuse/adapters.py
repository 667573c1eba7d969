"""Reading peft LoRA adapters into per-module (A, B, scale) triples.

An adapter comes from a peft adapter directory (adapter_config.json + adapter_model.safetensors or
adapter_model.bin), from an already-loaded state dict paired with its config, or from a PeftModel that
has it loaded. Whatever the source, the result is a `LoraAdapter`: for every module path of the base
transformers model that the adapter targets (e.g. "model.layers.0.self_attn.q_proj"), A (r, d_in),
B (d_out, r) and the scale s (lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA, per-module
rank_pattern / alpha_pattern honoured), so that the layer computes y = base(x) + s * (x A^T) B^T.

peft stores A and B in that orientation for GPT-2's Conv1D too (fan_in_fan_out only transposes the
merged delta), so the triples need no transposition here.
"""
from __future__ import annotations

import math
import numbers
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from torch import Tensor

__all__ = ["LoraAdapter", "load_adapter", "load_adapters", "adapters_from_peft", "PEFT_PREFIX"]

# Keys in a saved peft adapter start with this prefix before the base model's module path.
PEFT_PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
# Beside a CLI-trained adapter: {"model", "seed", "task"} it was trained with (lorafuse.cli reads it).
TRAINED_WITH = "lorafuse_trained_with.json"

# module path, A or B, optional adapter name (state dicts taken from model.state_dict() keep it).
_KEY_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")

# LoraConfig fields whose non-default value means the adapter is more than A, B and a scale.
_UNSUPPORTED_FIELDS = (
    ("use_dora", "DoRA (use_dora=True)"),
    ("lora_bias", "LoRA bias (lora_bias=True)"),
    ("modules_to_save", "modules_to_save"),
    ("trainable_token_indices", "trainable tokens (trainable_token_indices)"),
    ("target_parameters", "nn.Parameter targets (target_parameters)"),
    ("layer_replication", "layer_replication"),
    ("alora_invocation_tokens", "activated LoRA (alora_invocation_tokens)"),
    ("use_qalora", "QA-LoRA (use_qalora=True)"),
    ("velora_config", "VeLoRA (velora_config)"),
    ("monteclora_config", "MonteCLoRA (monteclora_config)"),
    ("use_bdlora", "block-diagonal LoRA (use_bdlora)"),
    ("kasa_config", "KaSA (kasa_config)"),
    ("arrow_config", "peft's Arrow routing (arrow_config; lorafuse routes with method='route')"),
)

# peft initialisations that subtract the initial B A from the base weight (PiSSA, CorDA, OLoRA, LoftQ,
# LoRA-GA): the saved factors only reproduce the trained layer on that changed weight.
_BASE_CHANGING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")

# A saved base weight (peft's save_embedding_layers): '<module>.weight' or '<module>.base_layer.weight'.
_BASE_KEY_RE = re.compile(r"^(?P<module>.+?)(?:\.base_layer)?\.(?P<param>weight|bias)$")

LayerFactors = Tuple[Tensor, Tensor, float]


@dataclass
class LoraAdapter:
    """One LoRA adapter as plain tensors.

    name: a label (the directory name, the peft adapter name, or "adapter<i>").
    layers: module path in the base model -> (A (r, d_in), B (d_out, r), scale), in the order read.
    config: the peft LoraConfig it was read with (None for adapters built by lorafuse itself).
    source: where it came from (a path, "state dict", "peft model").
    """

    name: str
    layers: Dict[str, LayerFactors]
    config: Any = None
    source: str = ""
    info: Dict[str, Any] = field(default_factory=dict)
    # "<module path>.weight" / ".bias" -> a copy of that base parameter saved with the adapter (peft's
    # save_embedding_layers, or a whole model.state_dict()); compose() accepts it only where it equals
    # the model's own.
    base_weights: Dict[str, Tensor] = field(default_factory=dict)

    @property
    def ranks(self) -> Dict[str, int]:
        return {k: a.shape[0] for k, (a, _, _) in self.layers.items()}

    def delta_weight(self, module: str) -> Tensor:
        """The dense (d_out, d_in) delta s * B A of one module, float32 (for analysis and merging)."""
        a, b, s = self.layers[module]
        return s * (b.float() @ a.float())

    def __repr__(self) -> str:
        ranks = sorted(set(self.ranks.values()))
        return f"LoraAdapter(name={self.name!r}, modules={len(self.layers)}, ranks={ranks}, source={self.source!r})"


def check_supported(config: Any, name: str, base_changed_ok: bool = False) -> None:
    """Raise NotImplementedError naming the first feature of `config` that is not a plain LoRA.
    base_changed_ok: the adapter is read from a live PeftModel, whose base weight an initialisation such
    as PiSSA has already changed (its factors are right on that model; not so from a folder)."""
    from peft import LoraConfig

    # peft's LoRA variants (AdaLoRA among them) subclass LoraConfig: their peft_type says what they are.
    kind = str(getattr(config, "peft_type", type(config).__name__)).split(".")[-1]
    if not isinstance(config, LoraConfig) or kind != "LORA":
        raise NotImplementedError(f"adapter {name!r}: only LoRA adapters are supported, got peft_type {kind}")
    if getattr(config, "bias", "none") != "none":
        raise NotImplementedError(f"adapter {name!r}: bias={config.bias!r} is not supported (only bias='none')")
    for attr, feature in _UNSUPPORTED_FIELDS:
        if getattr(config, attr, None):
            raise NotImplementedError(f"adapter {name!r}: {feature} is not supported")
    init = getattr(config, "init_lora_weights", True)
    if not base_changed_ok and isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise NotImplementedError(
            f"adapter {name!r}: init_lora_weights={init!r} trains against a changed base weight (W minus its "
            "initial B A), which this folder does not hold; save the adapter converted to a plain LoRA with "
            "peft's save_pretrained(..., path_initial_model_for_weight_conversion=...) and compose that")


def _as_config(config: Any, name: str) -> Any:
    from peft import LoraConfig, PeftConfig

    if isinstance(config, PeftConfig):
        return config
    if isinstance(config, Mapping):
        cfg = dict(config)
        peft_type = str(cfg.pop("peft_type", "LORA")).split(".")[-1]
        if peft_type != "LORA":
            raise NotImplementedError(f"adapter {name!r}: only LoRA adapters are supported, got peft_type {peft_type}")
        return LoraConfig(**{k: v for k, v in cfg.items() if k in LoraConfig.__dataclass_fields__})
    raise TypeError(f"adapter {name!r}: config must be a peft LoraConfig or a dict, got {type(config).__name__}")


def layer_rank_alpha(config: Any, module: str) -> Tuple[int, float]:
    """(r, lora_alpha) peft uses for `module`, rank_pattern / alpha_pattern applied as peft applies them."""
    from peft.utils.other import get_pattern_key

    rank_pattern = config.rank_pattern or {}
    alpha_pattern = config.alpha_pattern or {}
    r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), config.r)
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), config.lora_alpha)
    if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 1:
        raise ValueError(f"the adapter config's r for {module!r} must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha):
        raise ValueError(f"the adapter config's lora_alpha for {module!r} must be a finite number, got {alpha!r}")
    return int(r), float(alpha)


def layer_scale(config: Any, module: str, rank: int) -> float:
    _, alpha = layer_rank_alpha(config, module)
    return alpha / math.sqrt(rank) if config.use_rslora else alpha / rank


def _split_state_dict(state_dict: Mapping[str, Tensor], name: str
                      ) -> Tuple[Dict[str, Dict[str, Tensor]], Dict[str, Tensor]]:
    """peft state dict -> (module path (prefix stripped) -> {"A": tensor, "B": tensor},
    "<module path>.weight" / ".bias" -> saved base parameter)."""
    # Features first, so that their companion keys (e.g. saved embedding weights) do not mask them.
    for key in state_dict:
        if "lora_magnitude_vector" in key:
            raise NotImplementedError(f"adapter {name!r}: DoRA (key {key!r}) is not supported")
        if "lora_embedding_" in key:
            raise NotImplementedError(f"adapter {name!r}: LoRA on embedding layers (key {key!r}) is not supported")
        if "modules_to_save" in key:
            raise NotImplementedError(f"adapter {name!r}: modules_to_save (key {key!r}) is not supported")
        if re.search(r"\.lora_B(\.[^.]+)?\.bias$", key):
            raise NotImplementedError(f"adapter {name!r}: LoRA bias (key {key!r}) is not supported")
    modules: Dict[str, Dict[str, Tensor]] = {}
    base_weights: Dict[str, Tensor] = {}
    adapter_names = set()
    for key, value in state_dict.items():
        m = _KEY_RE.match(key)
        if m is None:
            base = _BASE_KEY_RE.match(key)
            if base is not None and "lora_" not in key and isinstance(value, Tensor):
                module = base.group("module")
                module = module[len(PEFT_PREFIX):] if module.startswith(PEFT_PREFIX) else module
                base_weights[f"{module}.{base.group('param')}"] = value
                continue
            raise NotImplementedError(
                f"adapter {name!r}: state dict key {key!r} is not a LoRA A/B weight "
                f"(expected '<module>.lora_A.weight' / '<module>.lora_B.weight')")
        module = m.group("module")
        if module.startswith(PEFT_PREFIX):
            module = module[len(PEFT_PREFIX):]
        adapter_names.add(m.group("adapter"))
        if len(adapter_names) > 1:
            raise ValueError(f"adapter {name!r}: the state dict holds several adapters "
                             f"({sorted(str(n) for n in adapter_names)}, from their keys' adapter names): "
                             f"pass one adapter per state dict")
        if m.group("ab") in modules.get(module, {}):
            raise ValueError(f"adapter {name!r}: module {module!r} has two lora_{m.group('ab')} weights")
        if not isinstance(value, Tensor) or value.dim() != 2:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"adapter {name!r}: {key!r} must be a 2-D tensor, got {shape} "
                             f"(LoRA on convolutions is not supported)")
        modules.setdefault(module, {})[m.group("ab")] = value
    if not modules:
        raise ValueError(f"adapter {name!r}: the state dict holds no LoRA weights")
    return modules, base_weights


def adapter_from_state_dict(state_dict: Mapping[str, Tensor], config: Any, name: str = "adapter",
                            source: str = "state dict", base_changed_ok: bool = False) -> LoraAdapter:
    """Build a LoraAdapter from a peft state dict (keys as saved by peft) and its LoraConfig (or dict)."""
    config = _as_config(config, name)
    check_supported(config, name, base_changed_ok)
    layers: Dict[str, LayerFactors] = {}
    modules, base_weights = _split_state_dict(state_dict, name)
    for module, ab in modules.items():
        if set(ab) != {"A", "B"}:
            missing = ({"A", "B"} - set(ab)).pop()
            raise ValueError(f"adapter {name!r}: module {module!r} has no lora_{missing} weight")
        a, b = ab["A"], ab["B"]
        r = a.shape[0]
        if b.shape[1] != r:
            raise ValueError(f"adapter {name!r}: module {module!r} has lora_A of shape {tuple(a.shape)} and "
                             f"lora_B of shape {tuple(b.shape)}; expected lora_B of shape ({b.shape[0]}, {r})")
        expected_r, _ = layer_rank_alpha(config, module)
        if expected_r != r:
            raise ValueError(f"adapter {name!r}: module {module!r} has rank {r} but its config gives r={expected_r}")
        layers[module] = (a.detach(), b.detach(), layer_scale(config, module, r))
    return LoraAdapter(name=name, layers=layers, config=config, source=source,
                       base_weights={k: v.detach() for k, v in base_weights.items()})


def read_adapter_dir(path: Union[str, os.PathLike], name: Optional[str] = None) -> LoraAdapter:
    """Read a peft adapter directory. FileNotFoundError names the missing directory or file."""
    from peft import PeftConfig
    from peft.utils import load_peft_weights

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"adapter directory not found: {path!r}")
    config_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"adapter config not found: {config_path!r}")
    if not any(os.path.isfile(os.path.join(path, w)) for w in WEIGHT_NAMES):
        raise FileNotFoundError(f"adapter weights not found: {os.path.join(path, WEIGHT_NAMES[0])!r} "
                                f"(nor {WEIGHT_NAMES[1]})")
    name = name or os.path.basename(os.path.normpath(path))
    # A damaged file is reported with its path (peft and safetensors name neither).
    try:
        config = PeftConfig.from_pretrained(path)
    except (ValueError, TypeError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"adapter config {config_path!r} could not be read: {e}") from e
    check_supported(config, name)
    try:
        state_dict = load_peft_weights(path, device="cpu")
    except Exception as e:  # safetensors raises its own error type for a truncated or foreign file
        raise ValueError(f"adapter weights in {path!r} could not be read: {type(e).__name__}: {e}") from e
    return adapter_from_state_dict(state_dict, config, name=name, source=path)


AdapterSource = Union[str, os.PathLike, LoraAdapter, Tuple[Mapping[str, Tensor], Any]]


def load_adapter(source: AdapterSource, name: Optional[str] = None) -> LoraAdapter:
    """One adapter from a directory path, a (state_dict, config) pair, or a LoraAdapter (returned as is)."""
    if isinstance(source, LoraAdapter):
        return source
    if isinstance(source, (str, os.PathLike)):
        return read_adapter_dir(source, name)
    if isinstance(source, tuple) and len(source) == 2 and isinstance(source[0], Mapping):
        return adapter_from_state_dict(source[0], source[1], name=name or "adapter")
    if isinstance(source, Mapping):
        raise TypeError("a state dict alone does not give the LoRA scale: pass (state_dict, LoraConfig) "
                        "or (state_dict, config_dict)")
    raise TypeError(f"an adapter must be a directory path, a (state_dict, config) pair or a LoraAdapter, "
                    f"got {type(source).__name__}")


def adapter_list(sources: Sequence[AdapterSource]) -> List[AdapterSource]:
    """`sources` as a list (read once: a generator would be spent by its first use); a single adapter
    or anything that is not a list of adapters is refused by name."""
    if isinstance(sources, (str, os.PathLike, LoraAdapter)) or (
            isinstance(sources, tuple) and len(sources) == 2 and isinstance(sources[0], Mapping)):
        raise TypeError("adapters must be a list of adapters; wrap a single adapter in a list")
    if isinstance(sources, Mapping) or not isinstance(sources, Iterable):
        raise TypeError(f"adapters must be a list of peft adapter folders, (state_dict, config) pairs or "
                        f"LoraAdapters, got {type(sources).__name__}")
    return list(sources)


def load_adapters(sources: Sequence[AdapterSource]) -> List[LoraAdapter]:
    """Several adapters; names default to the directory names (or adapter<i>) and are made unique."""
    sources = adapter_list(sources)
    if not sources:
        raise ValueError("adapters must hold at least one adapter, got an empty list")
    loaded = [load_adapter(src, None if isinstance(src, (str, os.PathLike, LoraAdapter)) else f"adapter{i}")
              for i, src in enumerate(sources)]
    # Two directories with the same base name: the later one becomes <name>_<i> (or the next free
    # number), never a name another adapter of the list has.
    taken = {ad.name for ad in loaded}
    seen: set = set()
    out: List[LoraAdapter] = []
    for i, ad in enumerate(loaded):
        if ad.name in seen:
            n = i
            while f"{ad.name}_{n}" in taken:
                n += 1
            ad = LoraAdapter(f"{ad.name}_{n}", ad.layers, ad.config, ad.source, ad.info, ad.base_weights)
            taken.add(ad.name)
        seen.add(ad.name)
        out.append(ad)
    return out


def adapters_from_peft(peft_model: Any, adapter_names: Optional[Sequence[str]] = None,
                       base_changed_ok: bool = False) -> List[LoraAdapter]:
    """The named LoRA adapters loaded in a PeftModel (default: all of them), in the order given.
    base_changed_ok: accept adapters whose initialisation changed the base weight (PiSSA, OLoRA, ...),
    for use on this same model only (compose of the PeftModel itself), whose base holds that change."""
    from peft.utils import get_peft_model_state_dict

    configs = peft_model.peft_config
    names = list(configs) if adapter_names is None else list(adapter_names)
    if isinstance(adapter_names, str):
        raise TypeError(f"adapter_names must be a list of names, got the string {adapter_names!r}")
    if not names:
        raise ValueError("adapter_names must name at least one adapter")
    out = []
    for n in names:
        if n not in configs:
            raise ValueError(f"adapter_names: {n!r} is not loaded in the PeftModel; loaded: {sorted(configs)}")
        check_supported(configs[n], n, base_changed_ok)
        sd = get_peft_model_state_dict(peft_model, adapter_name=n)
        out.append(adapter_from_state_dict(sd, configs[n], name=n, source="peft model",
                                           base_changed_ok=base_changed_ok))
    return out

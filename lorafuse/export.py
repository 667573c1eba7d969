"""export_peft: write a composition (or a LoraAdapter) as ONE standard peft LoRA adapter directory.

sum / weighted / concat export at rank R = sum of the layer's ranks, a LoraMap at rank m
(B' = b_cat diag(s) b_map, A' = a_map a_cat), with the scale folded into B' (lora_alpha = r per
layer, so peft's scale is 1). Layers of different ranks use peft's rank_pattern / alpha_pattern.
The directory is written to a temporary sibling and renamed into place: never half-written.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor

from .adapters import CONFIG_NAME, PEFT_PREFIX, TRAINED_WITH, WEIGHT_NAMES, LoraAdapter

__all__ = ["export_peft", "EXPORTABLE_METHODS"]

# Compositions that are one fixed LoRA; routing depends on the input and is not.
EXPORTABLE_METHODS = ("sum", "weighted", "concat", "loramap")


def _factors_of_model(model: nn.Module) -> Tuple[Dict[str, Tuple[Tensor, Tensor]], Dict[str, Any]]:
    from .compose import get_composition

    comp = get_composition(model)
    factors = {}
    for key, slot in comp.slots.items():
        layer = slot.composed
        if layer.method not in EXPORTABLE_METHODS:
            raise ValueError(f"cannot export a {layer.method!r} composition (module {key!r}) as one peft adapter: "
                             f"its delta depends on the input; exportable methods are {EXPORTABLE_METHODS}")
        a, b = layer.lowrank_factors()
        factors[key] = (a, b)
    first = comp.adapters[0].config if comp.adapters else None
    meta = {
        "fan_in_fan_out": any(s.conv1d is not None for s in comp.slots.values()),
        "task_type": getattr(first, "task_type", None),
        "base_model_name_or_path": getattr(first, "base_model_name_or_path", None),
    }
    config = getattr(comp.root, "config", None)
    name = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None)
    if name:
        meta["base_model_name_or_path"] = name
    return factors, meta


def _factors_of_adapter(adapter: LoraAdapter) -> Tuple[Dict[str, Tuple[Tensor, Tensor]], Dict[str, Any]]:
    factors = {k: (a.detach().float(), s * b.detach().float()) for k, (a, b, s) in adapter.layers.items()}
    # Adapters read from peft carry these in their config; merged ones (merge_adapters) in info.
    meta = {k: adapter.info.get(k, getattr(adapter.config, k, None))
            for k in ("fan_in_fan_out", "task_type", "base_model_name_or_path")}
    meta["fan_in_fan_out"] = bool(meta["fan_in_fan_out"])
    return factors, meta


def _lora_config(factors: Dict[str, Tuple[Tensor, Tensor]], meta: Dict[str, Any]):
    from peft import LoraConfig

    ranks = {k: a.shape[0] for k, (a, _) in factors.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    # Full module paths, escaped, as patterns: peft matches them as regexes anchored at the end.
    other = {re.escape(k): v for k, v in ranks.items() if v != r}
    return LoraConfig(
        r=r,
        lora_alpha=r,  # scale 1: the scale is folded into lora_B
        target_modules=sorted(factors),
        rank_pattern=dict(other),
        alpha_pattern=dict(other),
        fan_in_fan_out=meta["fan_in_fan_out"],
        bias="none",
        lora_dropout=0.0,
        task_type=meta["task_type"],
        base_model_name_or_path=meta["base_model_name_or_path"],
        inference_mode=True,
    )


def default_mode(folder: bool) -> int:
    """The mode a plain open()/mkdir would give under the current umask (temporary files and
    folders are created private, 0600/0700, and keep that mode when renamed into place)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if folder else 0o666) & ~umask


def atomic_write(path: Union[str, os.PathLike], write: Callable[[str], Any]) -> None:
    """write(tmp) into a temp file beside path, then rename it over path (the usual file mode):
    path is either the old file or the whole new one, never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, default_mode(folder=False))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# What a peft adapter folder written by peft or lorafuse holds; a folder with anything else (a Trainer's
# checkpoints, training arguments, other files) is not replaced.
ADAPTER_FOLDER_FILES = frozenset({CONFIG_NAME, *WEIGHT_NAMES, "README.md", TRAINED_WITH})


def why_not_replaceable(out_dir: Union[str, os.PathLike]) -> Optional[str]:
    """Why an existing out_dir may not be replaced, or None if it may: lorafuse replaces only what it
    writes there, a peft adapter folder (adapter_config.json, the weights, peft's README.md, lorafuse's
    record) or an empty folder; never a file, a folder holding anything else, the working folder or a
    folder that holds it."""
    path = os.path.realpath(os.fspath(out_dir))
    if not os.path.lexists(path):
        return None
    cwd = os.path.realpath(os.getcwd())
    name = repr(os.fspath(out_dir))
    if path == cwd or cwd.startswith(path.rstrip(os.sep) + os.sep):
        return f"{name} is the working folder or holds it"
    if not os.path.isdir(path):
        return f"{name} is a file, not a folder"
    entries = sorted(os.listdir(path))
    if entries and not os.path.isfile(os.path.join(path, CONFIG_NAME)):
        return f"{name} holds files but is not a peft adapter folder (no {CONFIG_NAME})"
    other = [e for e in entries if e not in ADAPTER_FOLDER_FILES or not os.path.isfile(os.path.join(path, e))]
    if other:
        return (f"{name} holds more than a peft adapter ({', '.join(map(repr, other[:3]))}"
                f"{', ...' if len(other) > 3 else ''}), which replacing it would delete")
    return None


def check_replaceable(out_dir: Union[str, os.PathLike]) -> None:
    """ValueError naming the path unless an existing out_dir may be replaced (why_not_replaceable)."""
    why = why_not_replaceable(out_dir)
    if why:
        raise ValueError(f"out_dir {why}: it is not replaced (only a peft adapter folder or an empty one is)")


def write_dir_atomically(out_dir: str, write: Callable[[str], None]) -> None:
    """write(tmp) fills a temporary folder beside out_dir, which is then renamed into place (an existing
    out_dir is first renamed aside, if check_replaceable allows it): a reader never sees a half-written
    folder (for an instant, while an existing one is replaced, none at all)."""
    check_replaceable(out_dir)
    out_dir = os.path.abspath(os.fspath(out_dir))
    parent = os.path.dirname(out_dir)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    except OSError as e:
        raise OSError(e.errno, f"cannot write {out_dir!r}: {e.strerror}") from e
    try:
        os.chmod(tmp, default_mode(folder=True))
        write(tmp)
        # Writers that stage through private temp files (safetensors: 0600) get the usual modes too.
        for root, dirs, files in os.walk(tmp):
            for d in dirs:
                os.chmod(os.path.join(root, d), default_mode(folder=True))
            for f in files:
                os.chmod(os.path.join(root, f), default_mode(folder=False))
        if os.path.exists(out_dir):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
            aside = os.path.join(old, "x")
            os.replace(out_dir, aside)
            try:
                os.replace(tmp, out_dir)
            except BaseException:
                # The new folder did not take the old one's place: put the old one back.
                if not os.path.exists(out_dir):
                    os.replace(aside, out_dir)
                shutil.rmtree(old, ignore_errors=True)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export_peft(
    model_or_adapter: Union[nn.Module, LoraAdapter],
    out_dir: Union[str, os.PathLike],
    dtype: torch.dtype = torch.float32,
    base_model_name_or_path: Optional[str] = None,
    overwrite: bool = False,
    record: Optional[Dict[str, Any]] = None,
) -> str:
    """Write the composition of a composed model (lorafuse.compose) or a LoraAdapter (e.g. from
    lorafuse.merge_adapters) as one peft LoRA adapter: out_dir/adapter_config.json and
    out_dir/adapter_model.safetensors, loadable with peft.PeftModel.from_pretrained(base_model, out_dir).

    Args:
        dtype: the dtype of the saved factors (float32 by default).
        base_model_name_or_path: recorded in the config (default: the model's own name, if any).
        overwrite: replace an existing out_dir, if it is empty or a peft adapter folder with nothing but
            an adapter's own files (why_not_replaceable; default: refuse with FileExistsError).
        record: JSON-serialisable facts written beside the adapter, in the same atomic write, as
            lorafuse_trained_with.json (the command line records the model, seed and task there).
    Returns out_dir as a string.
    """
    from safetensors.torch import save_file

    if not isinstance(out_dir, (str, os.PathLike)) or not os.fspath(out_dir):
        raise TypeError(f"out_dir must be a folder path (str or os.PathLike), got {out_dir!r}")
    if isinstance(model_or_adapter, LoraAdapter):
        factors, meta = _factors_of_adapter(model_or_adapter)
    elif isinstance(model_or_adapter, nn.Module):
        factors, meta = _factors_of_model(model_or_adapter)
    else:
        raise TypeError(f"export_peft needs a composed model or a LoraAdapter, got {type(model_or_adapter).__name__}")
    if not factors:
        raise ValueError("nothing to export: the composition has no layers")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if base_model_name_or_path is not None:
        if not isinstance(base_model_name_or_path, str):
            raise TypeError(f"base_model_name_or_path must be a str or None, got "
                            f"{type(base_model_name_or_path).__name__}")
        meta["base_model_name_or_path"] = base_model_name_or_path

    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"out_dir already exists: {out_dir!r} (pass overwrite=True to replace it)")
    check_replaceable(out_dir)
    parent = os.path.dirname(out_dir)
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"the parent directory of out_dir does not exist: {parent!r}")

    if all(not b.detach().any() for _, b in factors.values()):
        warnings.warn("every lora_B of this export is zero, so the adapter adds nothing to the base model (an "
                      "untrained LoraMap starts with b_map = 0: train it first, or compose with map_init='sum')",
                      stacklevel=2)
    if record is not None and not isinstance(record, dict):
        raise TypeError(f"record must be a dict or None, got {type(record).__name__}")
    record_json = json.dumps(record, indent=1) + "\n"  # (a record that is not JSON fails here, before writing)
    config = _lora_config(factors, meta)
    tensors = {}
    for key, (a, b) in factors.items():
        tensors[f"{PEFT_PREFIX}{key}.lora_A.weight"] = a.detach().to("cpu", dtype).contiguous()
        tensors[f"{PEFT_PREFIX}{key}.lora_B.weight"] = b.detach().to("cpu", dtype).contiguous()

    def write(tmp: str) -> None:
        config.save_pretrained(tmp)
        save_file(tensors, os.path.join(tmp, WEIGHT_NAMES[0]), metadata={"format": "pt"})
        if record is not None:
            with open(os.path.join(tmp, TRAINED_WITH), "w", encoding="utf-8") as f:
                f.write(record_json)
        assert os.path.isfile(os.path.join(tmp, CONFIG_NAME))

    write_dir_atomically(out_dir, write)
    return out_dir

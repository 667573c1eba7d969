"""Study: can recycled adapters compose knowledge? Two-hop reasoning from two single-hop adapters.

On the synthetic two-hop world (lorafuse.synthetic): adapter 1 learns the hop-1 facts ("The mother
of A is B."), adapter 2 the hop-2 facts ("B was born in C."); a third adapter learns both (the
union). Each composition of adapters 1 and 2 is then asked the two-hop statements ("The mother of A
was born in C.", true or false) of subjects it never saw in a two-hop statement, and re-asked the
hop-1 and hop-2 facts (what the composition kept of each adapter). Methods:

  base            the model without adapters (chance, the frozen head's bias)
  hop1 / hop2     one adapter alone
  union           one adapter trained on hop-1 and hop-2 facts together
  average         weighted, 1/2 each (parameter averaging of the outputs' deltas)
  sum             naive summation
  arrow_top1      Arrow routing (data-agnostic), top-1 per token
  lorahub         LoraHub's gradient-free search of the two weights on the two_hop_train split
  loramap_lora    LoraMap (trained on two_hop_train), map_init="lora" (starts at the base model)
  loramap_sum     LoraMap, map_init="sum" (starts at the plain sum)

Every trained method gets the same data, seed and number of epochs; trainable parameters and
wall time are recorded. The test split (two_hop) is used once, at the end of each method.
"""
from __future__ import annotations

import inspect
import math
import statistics
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from .common import check_methods, check_seeds, mean_sd, saved_run
from .report import header, write_results

METHODS = ("base", "hop1", "hop2", "union", "average", "sum", "arrow_top1", "lorahub", "loramap_lora", "loramap_sum")
COLUMNS = ("method", "two_hop_acc", "two_hop_f1", "hop1_acc", "hop2_acc", "trainable_params", "seconds")
SEEDS_COLUMNS = ("method", "two_hop_acc", "two_hop_acc_sd", "hop1_acc", "hop1_acc_sd", "hop2_acc", "hop2_acc_sd",
                 "trainable_params", "seconds", "seeds")


# The adapters a run trains, each saved as <out>/adapters/<name>.
ADAPTER_NAMES = ("hop1", "hop2", "union")

def run_recycling(out_dir: str = "lorafuse-demo", model: str = "minilm", seed: int = 0, n_people: int = 32,
                  n_cities: int = 8, r: int = 16, alpha: float = 32, adapter_epochs: float = 30,
                  compose_epochs: float = 30, lr: float = 3e-3, compose_lr: float = 3e-3, batch_size: int = 16,
                  lorahub_budget: int = 20, methods: Optional[Sequence[str]] = None, progress: bool = True,
                  log=print) -> Dict[str, Any]:
    """Run the study; writes out_dir/recycling.{json,md,png} and the adapters under out_dir/adapters."""
    import lorafuse
    from ..evaluate import evaluate_classification
    from ..models import load_model
    from ..synthetic import two_hop
    from ..train import derived_seed, train_adapter, train_composition

    methods = check_methods(methods, METHODS)
    import datasets

    t_start = time.perf_counter()
    out = Path(out_dir)
    data = two_hop(n_people=n_people, n_cities=n_cities, seed=seed)
    net, tok = load_model(model, task="classification", seed=seed)
    fit_kw = dict(epochs=adapter_epochs, lr=lr, batch_size=batch_size, seed=seed, progress=progress)
    config = dict(model=model, seed=seed, n_people=n_people, n_cities=n_cities, r=r, alpha=alpha,
                  adapter_epochs=adapter_epochs, compose_epochs=compose_epochs, lr=lr, compose_lr=compose_lr,
                  batch_size=batch_size, lorahub_budget=lorahub_budget,
                  sizes={k: len(v) for k, v in data.items()})
    doc = header("recycling: two-hop reasoning from recycled adapters", config)
    doc["rows"] = []

    def evaluate(method: str, extra: Dict[str, Any]) -> None:
        row: Dict[str, Any] = {"method": method}
        test = evaluate_classification(net, tok, data["two_hop"])
        row.update(two_hop_acc=test["accuracy"], two_hop_f1=test["macro_f1"],
                   hop1_acc=evaluate_classification(net, tok, data["hop1"])["accuracy"],
                   hop2_acc=evaluate_classification(net, tok, data["hop2"])["accuracy"])
        row.update(extra)
        doc["rows"].append(row)
        log(f"  {method:13s} two-hop acc {row['two_hop_acc']:.3f}  hop1 {row['hop1_acc']:.3f}  "
            f"hop2 {row['hop2_acc']:.3f}  ({row.get('seconds', 0):.0f}s)")

    adapters: Dict[str, str] = {}
    needs = {"hop1": {"hop1"}, "hop2": {"hop2"}, "union": {"union"}}
    wanted = set().union(*[needs.get(m, {"hop1", "hop2"}) for m in methods if m != "base"]) if methods else set()
    train_sets = {"hop1": data["hop1"], "hop2": data["hop2"],
                  "union": datasets.concatenate_datasets([data["hop1"], data["hop2"]]).shuffle(seed=seed)}
    train_info: Dict[str, dict] = {}
    for name in ADAPTER_NAMES:
        if name in wanted:
            log(f"training adapter {name} ({len(train_sets[name])} examples)")
            info = train_adapter(net, tok, train_sets[name], str(out / "adapters" / name), r=r, alpha=alpha, **fit_kw)
            adapters[name] = info["path"]
            train_info[name] = info
    doc["adapters"] = {k: {"path": v, **{kk: train_info[k][kk] for kk in ("train_loss", "train_seconds",
                                                                             "trainable_params")}}
                       for k, v in adapters.items()}
    pair = [adapters.get("hop1"), adapters.get("hop2")]
    compose_kw = dict(epochs=compose_epochs, lr=compose_lr, batch_size=batch_size, seed=seed, progress=progress)
    for method in methods:
        t0 = time.perf_counter()
        # Each method draws its own initialisation (a LoraMap's a_map) from (seed, method): its result
        # does not depend on which methods ran before it.
        torch.manual_seed(derived_seed(seed, "method", method))
        extra: Dict[str, Any] = {"trainable_params": 0}
        if method == "base":
            evaluate(method, {**extra, "seconds": 0.0})
            continue
        if method in ("hop1", "hop2", "union"):
            lorafuse.compose(net, [adapters[method]], method="sum")
            extra["trainable_params"] = train_info[method]["trainable_params"]
            extra["seconds"] = train_info[method]["train_seconds"]
        elif method == "average":
            lorafuse.compose(net, pair, method="weighted", weights=[0.5, 0.5])
        elif method == "sum":
            lorafuse.compose(net, pair, method="sum")
        elif method == "arrow_top1":
            lorafuse.compose(net, pair, method="route", router="arrow", top_k=1)
        elif method == "lorahub":
            from ..train import _collator, tokenize

            batch = _collator(tok, "classification")(list(tokenize(data["two_hop_train"], tok)))
            batch = {k: v.to(next(net.parameters()).device) for k, v in batch.items()}
            res = lorafuse.lorahub_search(net, pair, [batch], budget=lorahub_budget, seed=seed)
            extra["weights"] = [round(w, 4) for w in res.weights]
            extra["trainable_params"] = 2
        elif method.startswith("loramap"):
            init = method.split("_", 1)[1]
            lorafuse.compose(net, pair, method="loramap", map_rank=r, map_init=init)
            info = train_composition(net, tok, data["two_hop_train"], **compose_kw)
            extra["trainable_params"] = info["trainable_params"]
            extra["train_loss"] = info["train_loss"]
        if method not in ("hop1", "hop2", "union"):
            extra["seconds"] = time.perf_counter() - t0
        try:
            evaluate(method, extra)
        finally:
            lorafuse.decompose(net)
    doc["total_seconds"] = time.perf_counter() - t_start
    doc["paths"] = write_results(str(out), "recycling", doc, COLUMNS, ["two_hop_acc", "hop1_acc", "hop2_acc"])
    return doc


def run_recycling_seeds(out_dir: str, seeds: Sequence[int], reuse: bool = False, log=print,
                        **kw) -> Dict[str, Any]:
    """run_recycling once per seed (each seed draws its own world, head and data order) into
    out_dir/seed<N>/, then out_dir/recycling.{json,md,png}: per method the mean and standard
    deviation over the seeds. reuse: take a seed's existing out_dir/seed<N>/recycling.json when its
    settings and methods match this run's (a study cut short goes on where it stopped; each seed's
    commit is listed in `seed_commits`). kw: run_recycling's other arguments."""
    seeds = check_seeds(seeds)
    t_start = time.perf_counter()
    runs: List[dict] = []
    settings = _settings(kw)
    for seed in seeds:
        sub = Path(out_dir) / f"seed{seed}"
        prev = saved_run(sub / "recycling.json", seed, settings, log, _saved_settings) if reuse else None
        if prev is not None:
            runs.append(prev)
            continue
        log(f"seed {seed}")
        runs.append(run_recycling(out_dir=str(sub), seed=seed, log=log, **kw))
    config = dict(runs[0]["config"], seeds=seeds)
    config.pop("seed", None)
    config["sizes"] = {f"seed{s}": r["config"]["sizes"] for s, r in zip(seeds, runs)}
    doc = header(f"recycling: two-hop reasoning from recycled adapters ({len(seeds)} seeds)", config)
    doc["runs"] = [dict(row, seed=s) for s, r in zip(seeds, runs) for row in r["rows"]]
    doc["seed_commits"] = {f"seed{s}": r.get("commit", doc.get("commit")) for s, r in zip(seeds, runs)}
    doc["rows"] = []
    for method in [row["method"] for row in runs[0]["rows"]]:
        rows = [row for r in runs for row in r["rows"] if row["method"] == method]
        out: Dict[str, Any] = {"method": method}
        for k in ("two_hop_acc", "hop1_acc", "hop2_acc"):
            out[k], out[k + "_sd"] = mean_sd([row[k] for row in rows])
        out.update(trainable_params=rows[0]["trainable_params"], seeds=len(rows),
                   seconds=statistics.fmean(row.get("seconds", 0.0) for row in rows))
        doc["rows"].append(out)
    # How far a mean over all seeds' two-hop statements may stray from 0.5 by chance (95 %).
    n = sum(r["config"]["sizes"]["two_hop"] for r in runs)
    doc["two_hop_statements"] = n
    doc["chance_band_95"] = [0.5 - 1.96 * 0.5 / math.sqrt(n), 0.5 + 1.96 * 0.5 / math.sqrt(n)]
    doc["total_seconds"] = time.perf_counter() - t_start
    lo, hi = doc["chance_band_95"]
    # This call's wall time counts reused seeds as nothing; the seeds' own run times:
    doc["seeds_seconds"] = sum(d.get("total_seconds", 0.0) for d in runs)
    notes = (f"{n} two-hop test statements over {len(seeds)} seeds: a mean two-hop accuracy between {lo:.3f} "
             f"and {hi:.3f} is within chance (95 %). Per-seed results: seed<N>/recycling.json.")
    doc["paths"] = write_results(out_dir, "recycling", doc, SEEDS_COLUMNS, ["two_hop_acc", "hop1_acc", "hop2_acc"],
                                 notes=notes)
    return doc


_SETTINGS = ("model", "n_people", "n_cities", "r", "alpha", "adapter_epochs", "compose_epochs", "lr", "compose_lr",
             "batch_size", "lorahub_budget")
_DEFAULTS = {k: p.default for k, p in inspect.signature(run_recycling).parameters.items()}


def _settings(kw: dict) -> Dict[str, Any]:
    """run_recycling's settings for these keyword arguments, its defaults filling the rest, and the
    methods it runs."""
    out = {k: kw.get(k, _DEFAULTS[k]) for k in _SETTINGS}
    out["methods"] = check_methods(kw.get("methods"), METHODS)
    return out


def _saved_settings(doc: dict) -> dict:
    # The methods a saved run ran are its rows'.
    return dict(doc.get("config", {}), methods=[row["method"] for row in doc.get("rows", [])])

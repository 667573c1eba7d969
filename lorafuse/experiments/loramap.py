"""Study: LoraMap on COVID-Fact (after Kim et al. 2024, "LoraMap", arXiv 2408.16264).

Three perspective adapters (lorafuse.data: perspective-evidence, -difference, -correction) are trained
once per seed, each through a classification head of its own that is then discarded (the adapter
file holds the LoRA only). Each method is then fitted to COVID-Fact's train split and scored on its
dev and test splits (macro-F1 and accuracy). Every method gets the same data, seed, epochs, learning
rate and sequence length, and the same task head: a linear probe drawn alike for all and trained with
whatever the method trains (the encoder's counterpart of the paper's shared output vocabulary; its
2 x (d + 1) parameters are included in the counts).

  base                  the model without adapters (the probe alone)
  evidence / difference / correction
                        one perspective adapter, frozen (the probe alone)
  sum / average         naive summation / weights 1/K, frozen (the probe alone)
  lorahub               the probe fitted on the average, then LoraHub's gradient-free search of the K
                        weights on train examples
  loraconcat            the K adapters concatenated, A and B fitted (LoraConcat)
  loramap_lora          LoraMap, map_init="lora" (b_map = 0: starts as the base model)
  loramap_sum           LoraMap, map_init="sum" (starts at the plain sum)
  lora_direct           a fresh LoRA of rank r fitted to COVID-Fact (the no-composition reference)

Nothing is selected on the test split: hyperparameters are fixed in advance, dev is reported beside
test, and test is scored once per method and seed.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from .common import check_methods, subset
from .report import header, write_results

PERSPECTIVES = ("evidence", "difference", "correction")
METHODS = ("base",) + PERSPECTIVES + ("sum", "average", "lorahub", "loraconcat", "loramap_lora", "loramap_sum",
                                      "lora_direct")
COLUMNS = ("method", "test_f1", "test_f1_sd", "test_acc", "test_acc_sd", "dev_f1", "perspective_dev_acc",
           "trainable_params", "seconds", "seeds")


def _balanced(ds, limit: Optional[int], seed: int):
    """Up to limit // n_classes examples of each class (all of a smaller class), shuffled. With a
    small training budget a 68/32 split teaches the class prior first and little else."""
    if not limit:
        return ds
    shuffled = ds.shuffle(seed=seed)
    labels = list(shuffled["label"])
    n = shuffled.features["label"].num_classes
    if limit < n:
        raise ValueError(f"train_limit must be at least the number of classes ({n}) to keep one example of each, "
                         f"got {limit}")
    keep = []
    for c in range(n):
        keep += [i for i, y in enumerate(labels) if y == c][:limit // n]
    return shuffled.select(sorted(keep))


def run_loramap(out_dir: str = "results/loramap", model: str = "minilm", data_dir: Optional[str] = None,
                seeds: Sequence[int] = (0, 1, 2), r: int = 8, alpha: float = 16, map_rank: int = 16,
                adapter_epochs: float = 5, compose_epochs: float = 2, lr: float = 3e-3, compose_lr: float = 3e-3,
                batch_size: int = 16, max_length: int = 128, train_limit: Optional[int] = None,
                eval_limit: Optional[int] = None, lorahub_budget: int = 20, lorahub_examples: int = 32,
                methods: Optional[Sequence[str]] = None, progress: bool = True, log=print) -> Dict[str, Any]:
    """Run the study; writes out_dir/loramap.{json,md,png}. train_limit: class-balanced training subsets
    of that size (for CPU runs); eval_limit: random dev/test subsets of that size (the perspective
    tasks' dev splits too)."""
    import lorafuse
    from ..data import load_perspective, load_task
    from ..evaluate import evaluate_classification
    from ..models import load_model
    from ..train import (_collator, derived_seed, freeze_all, fresh_head, tokenize, train_adapter,
                         train_composition)

    methods = check_methods(methods, METHODS)
    t_start = time.perf_counter()
    out = Path(out_dir)
    cf = load_task("covidfact", data_dir)
    tasks = {p: load_perspective(f"perspective-{p}", data_dir) for p in PERSPECTIVES}
    config = dict(model=model, seeds=list(seeds), r=r, alpha=alpha, map_rank=map_rank, adapter_epochs=adapter_epochs,
                  compose_epochs=compose_epochs, lr=lr, compose_lr=compose_lr, batch_size=batch_size,
                  max_length=max_length, train_limit=train_limit, eval_limit=eval_limit,
                  lorahub_budget=lorahub_budget, lorahub_examples=lorahub_examples,
                  sizes={"covidfact": {k: len(v) for k, v in cf.items()},
                         **{p: {k: len(v) for k, v in d.items()} for p, d in tasks.items()}})
    doc = header("loramap: composing three perspective adapters on COVID-Fact", config)
    doc["runs"] = []
    per_method: Dict[str, List[dict]] = {m: [] for m in methods}
    fit_kw = dict(batch_size=batch_size, max_length=max_length, progress=progress)
    ev_kw = dict(max_length=max_length)

    for seed in seeds:
        log(f"seed {seed}")
        net, tok = load_model(model, task="classification", seed=seed)
        train = _balanced(cf["train"], train_limit, seed)
        dev, test = subset(cf["dev"], eval_limit, seed), subset(cf["test"], eval_limit, seed)
        paths, info = {}, {}
        probe_seed = 10_000 + seed  # one head draw per seed, the same start for every method
        for p in PERSPECTIVES:
            if not set(methods) - {"base", "lora_direct"}:
                break  # no method needs the perspective adapters
            log(f"  training perspective adapter {p}")
            # Each adapter learns its task through a head of its own, discarded afterwards (the
            # adapter file holds the LoRA only): what is kept is what the adapter did to the features.
            with fresh_head(net, probe_seed) as head:
                info[p] = train_adapter(net, tok, _balanced(tasks[p]["train"], train_limit, seed),
                                        str(out / "adapters" / f"seed{seed}" / p), r=r, alpha=alpha,
                                        also_train=[head], epochs=adapter_epochs, lr=lr, seed=seed, **fit_kw)
                # How well the adapter learned its own task (its dev split), with its own head.
                lorafuse.compose(net, [info[p]["path"]], method="sum")
                try:
                    own_dev = subset(tasks[p]["dev"], eval_limit, seed)
                    info[p]["dev_acc"] = evaluate_classification(net, tok, own_dev, **ev_kw)["accuracy"]
                finally:
                    lorafuse.decompose(net)
            log(f"    {p}: dev accuracy on its own task {info[p]['dev_acc']:.3f}")
            paths[p] = info[p]["path"]
        adapters = [paths[p] for p in PERSPECTIVES if p in paths]
        fit_c = dict(epochs=compose_epochs, lr=compose_lr, seed=seed, **fit_kw)
        for method in methods:
            t0 = time.perf_counter()
            # Each method's own initialisation (a LoraMap's a_map) comes from (seed, method), not from
            # whatever ran before it; adapters' lora_A from their folder names (train_adapter).
            torch.manual_seed(derived_seed(seed, "method", method))
            row: Dict[str, Any] = {"method": method, "seed": seed}
            # Every method is fitted to COVID-Fact with the same budget through a fresh head (a linear
            # probe, drawn alike for all), plus whatever the method itself trains.
            with fresh_head(net, probe_seed) as head:
                try:
                    if method == "lora_direct":
                        fit = train_adapter(net, tok, train, str(out / "adapters" / f"seed{seed}" / "direct"),
                                            r=r, alpha=alpha, also_train=[head], **fit_c)
                        lorafuse.compose(net, [fit["path"]], method="sum")
                    else:
                        if method in PERSPECTIVES:
                            lorafuse.compose(net, [paths[method]], method="sum")
                            row["perspective_dev_acc"] = info[method]["dev_acc"]
                        elif method == "sum":
                            lorafuse.compose(net, adapters, method="sum")
                        elif method in ("average", "lorahub"):
                            lorafuse.compose(net, adapters, method="weighted",
                                             weights=[1 / len(adapters)] * len(adapters))
                        elif method == "loraconcat":
                            lorafuse.compose(net, adapters, method="concat")
                        elif method.startswith("loramap"):
                            lorafuse.compose(net, adapters, method="loramap", map_rank=map_rank,
                                             map_init=method.split("_", 1)[1])
                        if method not in ("loraconcat", "loramap_lora", "loramap_sum"):
                            freeze_all(net)  # sum, averaging, single adapters, LoraHub: the head only
                        head.requires_grad_(True)  # compose() froze everything but the method's own
                        fit = train_composition(net, tok, train, **fit_c)
                    row.update(trainable_params=fit["trainable_params"], train_loss=fit["train_loss"])
                    if method == "lorahub":
                        # LoraHub then searches the K weights, gradient-free, with the fitted head.
                        few = tokenize(subset(train, lorahub_examples, seed), tok, max_length)  # a seeded draw
                        batch = _collator(tok, "classification")(list(few))
                        batch = {k: v.to(next(net.parameters()).device) for k, v in batch.items()}
                        res = lorafuse.lorahub_search(net, None, [batch], budget=lorahub_budget, seed=seed)
                        row["weights"] = [round(w, 4) for w in res.weights]
                        row["trainable_params"] += len(adapters)
                    row["seconds"] = time.perf_counter() - t0
                    d = evaluate_classification(net, tok, dev, **ev_kw)
                    t = evaluate_classification(net, tok, test, **ev_kw)
                    row.update(dev_f1=d["macro_f1"], dev_acc=d["accuracy"], test_f1=t["macro_f1"],
                               test_acc=t["accuracy"])
                finally:
                    _reset(net)
            doc["runs"].append(row)
            per_method[method].append(row)
            log(f"  {method:13s} test macro-F1 {row['test_f1']:.4f} acc {row['test_acc']:.4f} "
                f"(dev F1 {row['dev_f1']:.4f}; {row['seconds']:.0f}s)")
        del net
        # Written after every seed (complete: false until the last), so a run cut short keeps what it did.
        doc["rows"] = [_summarise(m, per_method[m]) for m in methods]
        doc["seeds_done"] = len(per_method[methods[0]])
        doc["complete"] = doc["seeds_done"] == len(seeds)
        doc["total_seconds"] = time.perf_counter() - t_start
        doc["paths"] = write_results(str(out), "loramap", doc, COLUMNS, ["test_f1", "test_acc", "dev_f1"])
    return doc


def _reset(net) -> None:
    """Restore the base model if a composition is attached (none for "base", or when compose() raised)."""
    import lorafuse
    from ..compose import get_composition

    try:
        get_composition(net)
    except ValueError:
        return
    lorafuse.decompose(net)


def _summarise(method: str, rows: List[dict]) -> Dict[str, Any]:
    def mean(k):
        return statistics.fmean(r[k] for r in rows)

    def sd(k):
        return statistics.stdev(r[k] for r in rows) if len(rows) > 1 else 0.0

    out = {"method": method, "test_f1": mean("test_f1"), "test_f1_sd": sd("test_f1"), "test_acc": mean("test_acc"),
           "test_acc_sd": sd("test_acc"), "dev_f1": mean("dev_f1"), "trainable_params": rows[0]["trainable_params"],
           "seconds": mean("seconds"), "seeds": len(rows)}
    if "perspective_dev_acc" in rows[0]:  # a single perspective adapter: its accuracy on its own task's dev split
        out["perspective_dev_acc"] = mean("perspective_dev_acc")
    return out

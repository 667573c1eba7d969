"""Study: when does naive LoRA summation work? (after arXiv 2508.11985)

One LoRA per domain is trained on a decoder (SmolLM2-135M by default; rank 4, alpha 64), plus one
LoRA on the merged data of all domains. Every pairwise sum and the triple sum of the domain adapters
is scored by perplexity (answer tokens only) on each domain's held-out split, beside the single
adapters and the merged-data adapter. The adapters' weight deltas are compared without forming them
(lorafuse.analysis.delta_cosine): the RMS over layers of the per-layer cosine. The study asks whether
near-orthogonal deltas sum with little interference: the Pearson correlation between a pair's RMS
cosine and the perplexity its sum loses against the single adapter of each domain in the pair.

Domains: math = GSM8K (question -> worked solution), medicine = PubMedQA (question -> long answer),
claims = COVID-Fact claims (a third domain in place of the paper's finance QA, which the data folder
does not hold).
"""
from __future__ import annotations

import inspect
import itertools
import statistics
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .common import check_seeds, mean_sd, saved_run, subset
from .report import header, write_results

DOMAINS = {"math": "gsm8k", "medicine": "pubmedqa", "claims": "covidfact-claims"}
COLUMNS = ("adapters", "math_ppl", "medicine_ppl", "claims_ppl", "rms_cosine", "overall_cosine", "trained_params",
           "train_seconds")
SEEDS_COLUMNS = ("adapters", "math_ppl", "math_ppl_sd", "medicine_ppl", "medicine_ppl_sd", "claims_ppl",
                 "claims_ppl_sd", "rms_cosine", "trained_params", "train_seconds", "seeds")


def _row_cost(label: str, adapters: Dict[str, dict]) -> Dict[str, Any]:
    """What a row cost to train: the parameters and seconds of the adapters it sums ("base": none;
    a sum itself trains nothing)."""
    names = [] if label == "base" else label.split("+")
    return {"trained_params": sum(adapters[n]["trainable_params"] for n in names),
            "train_seconds": sum(adapters[n]["train_seconds"] for n in names)}


def run_summation(out_dir: str = "results/summation", model: str = "smollm2", data_dir: Optional[str] = None,
                  seed: int = 0, r: int = 4, alpha: float = 64, epochs: float = 1, lr: float = 1e-3,
                  batch_size: int = 8, max_length: int = 128, train_limit: Optional[int] = None,
                  eval_limit: Optional[int] = None, domains: Sequence[str] = tuple(DOMAINS), progress: bool = True,
                  log=print) -> Dict[str, Any]:
    """Run the study; writes out_dir/summation.{json,md,png}. train_limit / eval_limit subsample
    (for CPU; None: every example, as the CLI does by default)."""
    import datasets

    import lorafuse
    from ..analysis import delta_cosine
    from ..data import load_task
    from ..evaluate import perplexity
    from ..models import load_model
    from ..train import train_adapter

    bad = [d for d in domains if d not in DOMAINS]
    if bad or len(domains) < 2:
        raise ValueError(f"domains: need two or more of {', '.join(DOMAINS)}, got {list(domains)}")
    t_start = time.perf_counter()
    out = Path(out_dir)
    data = {d: load_task(DOMAINS[d], data_dir) for d in domains}
    train = {d: subset(data[d]["train"], train_limit, seed).select_columns(["prompt", "answer"]) for d in domains}
    test = {d: subset(data[d]["test"], eval_limit, seed).select_columns(["prompt", "answer"]) for d in domains}
    config = dict(model=model, seed=seed, r=r, alpha=alpha, epochs=epochs, lr=lr, batch_size=batch_size,
                  max_length=max_length, train_limit=train_limit, eval_limit=eval_limit,
                  domains={d: DOMAINS[d] for d in domains},
                  sizes={d: {"train": len(train[d]), "test": len(test[d])} for d in domains})
    doc = header("summation: naive LoRA summation across domains", config)
    net, tok = load_model(model, task="lm", seed=seed)
    fit_kw = dict(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, max_length=max_length, task="lm",
                  progress=progress)
    paths: Dict[str, str] = {}
    doc["adapters"] = {}
    sets = dict(train)
    sets["merged"] = datasets.concatenate_datasets([train[d] for d in domains]).shuffle(seed=seed)
    for name, ds in sets.items():
        log(f"training adapter {name} ({len(ds)} examples)")
        info = train_adapter(net, tok, ds, str(out / "adapters" / name), r=r, alpha=alpha, **fit_kw)
        paths[name] = info["path"]
        doc["adapters"][name] = {k: info[k] for k in ("train_loss", "train_seconds", "trainable_params", "steps")}

    analysis = delta_cosine([paths[d] for d in domains])
    rms = {(a, b): float(analysis.rms_cosine[i, j]) for (i, a), (j, b) in itertools.combinations(enumerate(domains), 2)}
    overall = {(a, b): float(analysis.overall_cosine[i, j])
               for (i, a), (j, b) in itertools.combinations(enumerate(domains), 2)}

    combos: List[tuple] = [()] + [(d,) for d in domains] + list(itertools.combinations(domains, 2))
    if len(domains) > 2:
        combos.append(tuple(domains))
    combos.append(("merged",))
    rows = []
    for combo in combos:
        label = "base" if not combo else "+".join(combo)
        if combo:
            lorafuse.compose(net, [paths[c] for c in combo], method="sum")
        try:
            row: Dict[str, Any] = {"adapters": label}
            for d in domains:
                row[f"{d}_ppl"] = perplexity(net, tok, test[d], batch_size=batch_size, max_length=max_length)[
                    "perplexity"]
        finally:
            if combo:
                lorafuse.decompose(net)
        if len(combo) == 2:
            row.update(rms_cosine=rms[combo], overall_cosine=overall[combo])
        row.update(_row_cost(label, doc["adapters"]))
        rows.append(row)
        log(f"  {label:24s} " + "  ".join(f"{d} {row[f'{d}_ppl']:.3f}" for d in domains))
    doc["rows"] = rows

    # Interference of each pair on each of its domains: perplexity of the sum over that of the domain's own
    # adapter (and over the merged-data adapter), as relative changes.
    by = {r["adapters"]: r for r in rows}
    points = []
    for (a, b), cos in rms.items():
        for d in (a, b):
            pair_ppl = by[f"{a}+{b}"][f"{d}_ppl"]
            points.append({"pair": f"{a}+{b}", "domain": d, "rms_cosine": cos,
                           "ppl_change_vs_single": pair_ppl / by[d][f"{d}_ppl"] - 1,
                           "ppl_change_vs_merged": pair_ppl / by["merged"][f"{d}_ppl"] - 1})
    doc["interference"] = points

    doc["pearson_rms_cosine_vs_ppl_change"] = _pearson(points)
    doc["total_seconds"] = time.perf_counter() - t_start
    cols = [c for c in COLUMNS if c == "adapters" or not c.endswith("_ppl") or c[:-4] in domains]
    pc = doc["pearson_rms_cosine_vs_ppl_change"]
    notes = (f"Pearson r between a pair's RMS delta cosine and its sum's perplexity change on each of its domains "
             f"({pc['points']} points): {pc['vs_single']:.3f} against the domain's own adapter, "
             f"{pc['vs_merged']:.3f} against the merged-data adapter.")
    doc["paths"] = write_results(str(out), "summation", doc, cols, [f"{d}_ppl" for d in domains],
                                 label_key="adapters", ylim=None, notes=notes, log_y=True)
    return doc


def _pearson(points: Sequence[dict]) -> Dict[str, Any]:
    """Pearson r between the pairs' RMS cosine and their sums' perplexity change, against the domain's
    own adapter and against the merged-data adapter (nan for constant input or too few points)."""
    def r(key):
        try:
            return statistics.correlation([p["rms_cosine"] for p in points], [p[key] for p in points])
        except statistics.StatisticsError:
            return float("nan")

    return {"vs_single": r("ppl_change_vs_single"), "vs_merged": r("ppl_change_vs_merged"), "points": len(points)}


def run_summation_seeds(out_dir: str, seeds: Sequence[int], reuse: bool = False, log=print,
                        **kw) -> Dict[str, Any]:
    """run_summation once per seed (each seed draws its own training and test subsets, data order and
    initialisation) into out_dir/seed<N>/, then out_dir/summation.{json,md,png}: per row the mean and
    standard deviation of each perplexity over the seeds, and the Pearson correlation between RMS
    cosine and perplexity change, per seed and over all seeds' points pooled. reuse: take a seed's
    existing out_dir/seed<N>/summation.json when its config matches this run's (a study cut short
    goes on where it stopped). kw: run_summation's other arguments."""
    seeds = check_seeds(seeds)
    t_start = time.perf_counter()
    docs: List[dict] = []
    for seed in seeds:
        sub = Path(out_dir) / f"seed{seed}"
        prev = saved_run(sub / "summation.json", seed, _settings(kw), log, _saved_settings) if reuse else None
        if prev is not None:
            docs.append(prev)
            continue
        log(f"seed {seed}")
        docs.append(run_summation(out_dir=str(sub), seed=seed, log=log, **kw))
    doc = summarise_seeds(docs)
    doc["total_seconds"] = time.perf_counter() - t_start
    # This call's wall time counts reused seeds as nothing; the seeds' own run times:
    doc["seeds_seconds"] = sum(d.get("total_seconds", 0.0) for d in docs)
    domains = list(docs[0]["config"]["domains"])
    cols = [c for c in SEEDS_COLUMNS if c.split("_ppl")[0] in domains or "_ppl" not in c]
    pc = doc["pearson_rms_cosine_vs_ppl_change"]
    notes = (f"Pearson r between a pair's RMS delta cosine and its sum's perplexity change on each of its domains, "
             f"all seeds' {pc['points']} points pooled: {pc['vs_single']:.3f} against the domain's own adapter, "
             f"{pc['vs_merged']:.3f} against the merged-data adapter; per seed: "
             + ", ".join(f"{s['vs_single']:.2f} / {s['vs_merged']:.2f}" for s in doc["pearson_per_seed"])
             + ". Per-seed results: seed<N>/summation.json.")
    doc["paths"] = write_results(out_dir, "summation", doc, cols, [f"{d}_ppl" for d in domains],
                                 label_key="adapters", ylim=None, notes=notes, log_y=True)
    return doc


# What makes two runs of one seed the same study (the data folder and progress bars do not).
_SETTINGS = ("model", "r", "alpha", "epochs", "lr", "batch_size", "max_length", "train_limit", "eval_limit", "domains")
_DEFAULTS = {k: p.default for k, p in inspect.signature(run_summation).parameters.items()}


def _settings(kw: dict) -> Dict[str, Any]:
    """run_summation's settings for these keyword arguments, its defaults filling the rest."""
    out = {k: kw.get(k, _DEFAULTS[k]) for k in _SETTINGS}
    out["domains"] = list(out["domains"])
    return out


def _saved_settings(doc: dict) -> dict:
    # A saved config maps each domain to its dataset; the settings name the domains.
    config = doc.get("config", {})
    return dict(config, domains=list(config.get("domains", ())))


def summarise_seeds(docs: Sequence[dict]) -> Dict[str, Any]:
    """The multi-seed summary of run_summation results (see run_summation_seeds)."""
    first = docs[0]
    domains = list(first["config"]["domains"])
    config = dict(first["config"], seeds=[d["config"]["seed"] for d in docs])
    config.pop("seed", None)
    config["sizes"] = {f"seed{d['config']['seed']}": d["config"]["sizes"] for d in docs}
    doc = header(f"summation: naive LoRA summation across domains ({len(docs)} seeds)", config)
    # Rows saved before the cost columns existed get them from their run's adapters.
    runs = [[dict(_row_cost(row["adapters"], d["adapters"]), **row) for row in d["rows"]] for d in docs]
    doc["runs"] = [dict(row, seed=d["config"]["seed"]) for d, rs in zip(docs, runs) for row in rs]
    doc["seed_commits"] = {f"seed{d['config']['seed']}": d.get("commit") for d in docs}
    doc["rows"] = []
    for label in [row["adapters"] for row in first["rows"]]:
        rows = [row for rs in runs for row in rs if row["adapters"] == label]
        out: Dict[str, Any] = {"adapters": label, "seeds": len(rows)}
        for k in [f"{d}_ppl" for d in domains] + (["rms_cosine", "overall_cosine"] if "rms_cosine" in rows[0] else []):
            out[k], out[k + "_sd"] = mean_sd([row[k] for row in rows])
        out["trained_params"] = rows[0]["trained_params"]
        out["train_seconds"] = statistics.fmean(row["train_seconds"] for row in rows)
        doc["rows"].append(out)
    points = [dict(p, seed=d["config"]["seed"]) for d in docs for p in d["interference"]]
    doc["interference"] = points
    doc["pearson_rms_cosine_vs_ppl_change"] = _pearson(points)
    doc["pearson_per_seed"] = [dict(d["pearson_rms_cosine_vs_ppl_change"], seed=d["config"]["seed"]) for d in docs]
    return doc

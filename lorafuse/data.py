"""Loaders for the experiments' data (HF `datasets`), read from raw copies of the public sources.

    dsets = load_task("covidfact", "../shared/data")      # DatasetDict train / dev / test
    dsets["test"][0]  -> {"text": claim, "text_pair": evidence, "label": 1}   # 1 = supported

Every loader takes the data folder (the layout of ../shared/data: covidfact/, scifact-rte/,
gsm8k/, pubmedqa/; see its README) and returns a DatasetDict:

  classification tasks: columns text, text_pair, label (ClassLabel); the tokenizer sees
      (text, text_pair) as a sentence pair
  lm tasks: columns prompt, answer (perplexity is scored on the answer tokens only)

Tasks (TASKS):
  covidfact               claim vs evidence, supported (1) / refuted (0); train, dev, test (= test1.tsv)
  scifact                 SciFact claims as RTE pairs, entailment (1) / not (0); train, dev
  gsm8k                   grade-school math, question -> worked solution; train, test
  pubmedqa                PubMed question (+ abstract) -> long answer; train (the 500 non-test ids), test
  covidfact-claims        COVID-Fact claims as text: "Claim:" -> the claim, plus its verdict; train, test
  Three perspective tasks for LoraMap (in the spirit of the paper's DifferenceCoT, EntityCoT and
  CorrectClaim sets, which are not public), built from public data without touching COVID-Fact's
  dev and test claims:
  perspective-evidence    claim-vs-evidence verification on SciFact (= scifact): reading evidence
  perspective-difference  spotting substituted words: (refuted claim, one of its words) -> was this
                          word substituted into the supported twin? From COVIDFACT_dataset.jsonl,
                          where refuted claims are the supported claim with salient words replaced;
                          words of four letters or more on both sides (length gives nothing away)
  perspective-correction  correcting a refuted claim: (refuted claim, candidate) -> is the candidate
                          its supported twin (1) or another counter-claim of the same twin (0)?
"""
from __future__ import annotations

import csv
import json
import os
import random
import re
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence

if TYPE_CHECKING:  # hints only: datasets and transformers are imported where used
    from datasets import DatasetDict

CLASS_NAMES = {"covidfact": ["refuted", "supported"], "scifact": ["not_entailment", "entailment"],
               "perspective-evidence": ["not_entailment", "entailment"],
               "perspective-difference": ["kept", "substituted"],
               "perspective-correction": ["other", "correction"]}

ENTAILMENT = {"entailment": 1, "not_entailment": 0}


def default_data_dir() -> Optional[Path]:
    """$LORAFUSE_DATA, else ../shared/data from the working folder, else ../shared/data beside the
    source checkout (where the tests find it from any folder)."""
    env = os.environ.get("LORAFUSE_DATA")
    if env:
        return Path(env)
    for base in (Path.cwd(), Path(__file__).resolve().parent.parent):
        here = base.parent / "shared" / "data"
        if here.is_dir():
            return here
    return None


class DataFileError(ValueError):
    """A data file that is there but not in the expected format; the message names the file."""


def _require(rows: Sequence, fields: Dict[str, type], path: Path) -> None:
    """DataFileError naming the file and the row unless every row is a mapping holding these fields with
    values of these types."""
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise DataFileError(f"{path}: row {i} is a {type(r).__name__}, expected an object with fields "
                                f"{', '.join(fields)}")
        for name, kind in fields.items():
            if not isinstance(r.get(name), kind):
                got = "missing" if name not in r else f"a {type(r[name]).__name__}"
                raise DataFileError(f"{path}: row {i}: field {name!r} is {got}, expected a {kind.__name__}")


def _root(data_dir: Optional[str]) -> Path:
    if data_dir is None:
        found = default_data_dir()
        if found is None:
            raise FileNotFoundError("data_dir: no data folder given and none found (set LORAFUSE_DATA or pass "
                                    "--data <folder with covidfact/, scifact-rte/, gsm8k/, pubmedqa/>)")
        return found
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"data_dir: {root} is not a directory")
    return root


def _file(root: Path, *parts: str) -> Path:
    path = root.joinpath(*parts)
    if not path.is_file():
        raise FileNotFoundError(f"data_dir: expected the file {path} (see the data folder's README for the layout)")
    return path


def read_tsv(path: Path) -> List[Dict[str, str]]:
    """Tab-separated, no quoting: some fields hold quote characters that must stay as they are."""
    csv.field_size_limit(1 << 30)
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows:
        raise DataFileError(f"{path}: no rows")
    header = len(rows[0]) - (None in rows[0])
    for i, r in enumerate(rows):
        # csv marks a short row's missing fields None and collects a long row's extra ones under None.
        if None in r.values() or None in r:
            got = sum(v is not None for k, v in r.items() if k is not None) + len(r.get(None) or ())
            raise DataFileError(f"{path}: row {i} has {got} fields, the header {header}")
    return rows


def _label_column(row: Dict[str, str], path: Path) -> str:
    # The label column is `label` in COVID-Fact's train/test1 but `entailment` in its dev split.
    for name in ("label", "entailment"):
        if name in row:
            return name
    raise DataFileError(f"{path}: no label column (expected 'label' or 'entailment'; columns: {list(row)})")


def _rte(path: Path, claim_col: str) -> Dict[str, list]:
    rows = read_tsv(path)
    lab = _label_column(rows[0], path)
    for col in (claim_col, "sentence1"):
        if col not in rows[0]:
            raise DataFileError(f"{path}: no column {col!r} (columns: {list(rows[0])})")
    out: Dict[str, list] = {"text": [], "text_pair": [], "label": []}
    for i, r in enumerate(rows):
        if r[lab] not in ENTAILMENT:
            raise DataFileError(f"{path}: row {i} has label {r[lab]!r}, expected entailment or not_entailment")
        # Claim first: with truncation, the (long) evidence loses its tail, never the claim.
        out["text"].append(r[claim_col].strip())
        out["text_pair"].append(r["sentence1"].strip())
        out["label"].append(ENTAILMENT[r[lab]])
    return out


def _classification(splits: Dict[str, Dict[str, list]], names: Sequence[str]):
    import datasets

    features = datasets.Features({"text": datasets.Value("string"), "text_pair": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=list(names))})
    return datasets.DatasetDict({k: datasets.Dataset.from_dict(v, features=features) for k, v in splits.items()})


def _lm(splits: Dict[str, Dict[str, list]]):
    import datasets

    return datasets.DatasetDict({k: datasets.Dataset.from_dict(v) for k, v in splits.items()})


def load_covidfact(data_dir: Optional[str] = None) -> DatasetDict:
    """COVID-Fact: train (3,263), dev (419), test (401, the source's labelled test1.tsv); 1 = supported."""
    root = _root(data_dir)
    files = {"train": "train.tsv", "dev": "dev.tsv", "test": "test1.tsv"}
    return _classification({k: _rte(_file(root, "covidfact", f), "Sentence2") for k, f in files.items()},
                           CLASS_NAMES["covidfact"])


def load_scifact(data_dir: Optional[str] = None) -> DatasetDict:
    """SciFact claims as RTE pairs: train (564), dev (209); 1 = entailment."""
    root = _root(data_dir)
    return _classification({k: _rte(_file(root, "scifact-rte", f"{k}.tsv"), "sentence2") for k in ("train", "dev")},
                           CLASS_NAMES["scifact"])


def _jsonl(path: Path, fields: Dict[str, type]) -> List[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError as e:
                    raise DataFileError(f"{path}: line {n} is not JSON ({e})") from None
    if not rows:
        raise DataFileError(f"{path}: no rows")
    _require(rows, fields, path)
    return rows


def _json(path: Path):
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except ValueError as e:
            raise DataFileError(f"{path}: not JSON ({e})") from None


def gsm8k_final(answer: str) -> str:
    """The final number of a GSM8K solution (the text after '####')."""
    if "####" not in answer:
        raise ValueError(f"not a GSM8K answer (no '####'): {answer[:80]!r}")
    return answer.rsplit("####", 1)[1].strip().replace(",", "")


def load_gsm8k(data_dir: Optional[str] = None) -> DatasetDict:
    """GSM8K: train (7,473), test (1,319); prompt = "Question: ...\\nAnswer:", answer = the worked solution
    (calculator annotations <<...>> removed), plus its final number."""
    root = _root(data_dir)
    splits = {}
    for k in ("train", "test"):
        path = _file(root, "gsm8k", f"{k}.jsonl")
        rows = _jsonl(path, {"question": str, "answer": str})
        for i, r in enumerate(rows):
            if "####" not in r["answer"]:
                raise DataFileError(f"{path}: row {i}: the answer has no '####' before its final number")
        splits[k] = {"prompt": [f"Question: {r['question'].strip()}\nAnswer:" for r in rows],
                     "answer": [re.sub(r"<<[^>]*>>", "", r["answer"]).strip() for r in rows],
                     "final": [gsm8k_final(r["answer"]) for r in rows]}
    return _lm(splits)


def load_pubmedqa(data_dir: Optional[str] = None, with_context: bool = False) -> DatasetDict:
    """PubMedQA expert set: train (500 ids), test (the 500 official test ids); prompt = the question
    (and the abstract with with_context=True), answer = the long answer; decision = yes/no/maybe."""
    root = _root(data_dir)
    path = _file(root, "pubmedqa", "ori_pqal.json")
    entries = _json(path)
    if not isinstance(entries, dict) or not entries:
        raise DataFileError(f"{path}: expected an object of entries by PubMed id, got a {type(entries).__name__}"
                            + (" with none" if isinstance(entries, dict) else ""))
    _require(list(entries.values()), {"QUESTION": str, "LONG_ANSWER": str, "final_decision": str, "CONTEXTS": list},
             path)
    truth = _file(root, "pubmedqa", "test_ground_truth.json")
    test_ids = _json(truth)
    if not isinstance(test_ids, (dict, list)):
        raise DataFileError(f"{truth}: expected the test ids (an object or a list), got a {type(test_ids).__name__}")
    test_ids = set(test_ids)
    splits: Dict[str, Dict[str, list]] = {k: {"prompt": [], "answer": [], "decision": [], "pubid": []}
                                          for k in ("train", "test")}
    for pid in sorted(entries):
        e = entries[pid]
        ctx = (" ".join(e["CONTEXTS"]) + "\n") if with_context else ""
        s = splits["test" if pid in test_ids else "train"]
        s["prompt"].append(f"{ctx}Question: {e['QUESTION'].strip()}\nAnswer:")
        s["answer"].append(e["LONG_ANSWER"].strip())
        s["decision"].append(e["final_decision"])
        s["pubid"].append(pid)
    return _lm(splits)


def load_covidfact_claims(data_dir: Optional[str] = None) -> DatasetDict:
    """COVID-Fact claims as a text domain (an lm task): prompt "Claim:", answer = claim and its verdict.
    train from train.tsv, test from test1.tsv."""
    cf = load_covidfact(data_dir)
    names = CLASS_NAMES["covidfact"]
    return _lm({k: {"prompt": ["Claim:"] * len(cf[s]),
                    "answer": [f"{t} ({names[y]})" for t, y in zip(cf[s]["text"], cf[s]["label"])]}
                for k, s in (("train", "train"), ("test", "test"))})


def _norm(s: str) -> str:
    return " ".join(s.lower().split())


def _twin_groups(root: Path) -> List[dict]:
    """COVIDFACT_dataset.jsonl grouped by shared evidence: one supported claim and its refuted
    counter-claims. Groups with any claim in COVID-Fact's dev or test split are left out."""
    held_out = set()
    for f in ("dev.tsv", "test1.tsv"):
        path = _file(root, "covidfact", f)
        rows = read_tsv(path)
        if "Sentence2" not in rows[0]:
            raise DataFileError(f"{path}: no column 'Sentence2' (columns: {list(rows[0])})")
        held_out |= {_norm(r["Sentence2"]) for r in rows}
    groups: Dict[tuple, List[dict]] = defaultdict(list)
    twins = _file(root, "covidfact", "COVIDFACT_dataset.jsonl")
    for r in _jsonl(twins, {"claim": str, "label": str, "evidence": list}):
        groups[tuple(r["evidence"])].append(r)
    out = []
    for evidence, rows in groups.items():
        sup = [r["claim"] for r in rows if r["label"] == "SUPPORTED"]
        ref = [r["claim"] for r in rows if r["label"] == "REFUTED"]
        if len(sup) != 1 or not ref or any(_norm(r["claim"]) in held_out for r in rows):
            continue
        out.append({"supported": sup[0], "refuted": ref, "evidence": " ".join(evidence)})
    return out


_WORD = re.compile(r"[\w'-]+")


def _difference_rows(groups: List[dict], rng: random.Random) -> Dict[str, list]:
    rows: Dict[str, list] = {"text": [], "text_pair": [], "label": []}
    for g in groups:
        twin = {w.lower() for w in _WORD.findall(g["supported"])}
        for claim in g["refuted"]:
            words = _WORD.findall(claim)
            # Both sides from words of four letters or more: with short words only among the
            # substituted ones, "short -> substituted" alone had scored 0.58.
            subst = [w for w in words if w.lower() not in twin and len(w) > 3]
            kept = [w for w in words if w.lower() in twin and len(w) > 3]
            if not subst or not kept:
                continue
            # One substituted and one kept word per claim: balanced classes.
            for word, label in ((rng.choice(subst), 1), (rng.choice(kept), 0)):
                rows["text"].append(claim)
                rows["text_pair"].append(word)
                rows["label"].append(label)
    return rows


def _correction_rows(groups: List[dict], rng: random.Random) -> Dict[str, list]:
    rows: Dict[str, list] = {"text": [], "text_pair": [], "label": []}
    for g in groups:
        if len(g["refuted"]) < 2:
            continue
        for claim in g["refuted"]:
            other = rng.choice([c for c in g["refuted"] if c != claim] or [claim])
            if other == claim:
                continue
            for cand, label in ((g["supported"], 1), (other, 0)):
                rows["text"].append(claim)
                rows["text_pair"].append(cand)
                rows["label"].append(label)
    return rows


def load_perspective(name: str, data_dir: Optional[str] = None, seed: int = 0,
                     dev_fraction: float = 0.1) -> DatasetDict:
    """One of the three perspective tasks (train, dev); see the module docstring."""
    if name == "perspective-evidence":
        return _classification({k: v.to_dict() for k, v in load_scifact(data_dir).items()}, CLASS_NAMES[name])
    build: Dict[str, Callable] = {"perspective-difference": _difference_rows,
                                  "perspective-correction": _correction_rows}
    if name not in build:
        raise ValueError(f"unknown perspective task {name!r}; valid: perspective-evidence, "
                         f"{', '.join(build)}")
    rng = random.Random(seed)
    groups = _twin_groups(_root(data_dir))
    rng.shuffle(groups)
    n_dev = max(1, int(len(groups) * dev_fraction))
    # Split by twin group, so no claim family is in both train and dev.
    return _classification({"train": build[name](groups[n_dev:], rng), "dev": build[name](groups[:n_dev], rng)},
                           CLASS_NAMES[name])


LOADERS: Dict[str, Callable] = {
    "covidfact": load_covidfact, "scifact": load_scifact, "gsm8k": load_gsm8k, "pubmedqa": load_pubmedqa,
    "covidfact-claims": load_covidfact_claims,
    "perspective-evidence": lambda d: load_perspective("perspective-evidence", d),
    "perspective-difference": lambda d: load_perspective("perspective-difference", d),
    "perspective-correction": lambda d: load_perspective("perspective-correction", d),
}
TASKS = tuple(LOADERS)
LM_TASKS = ("gsm8k", "pubmedqa", "covidfact-claims")


def load_task(name: str, data_dir: Optional[str] = None) -> DatasetDict:
    """The DatasetDict of a task by name (TASKS, or "two-hop": lorafuse.synthetic.two_hop()'s default
    world, which needs no data folder)."""
    if name == "two-hop":
        from .synthetic import two_hop

        return two_hop()
    if name not in LOADERS:
        raise ValueError(f"unknown task {name!r}; valid: two-hop, {', '.join(TASKS)}")
    return LOADERS[name](data_dir)

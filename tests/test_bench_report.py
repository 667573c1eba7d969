"""bench/report.py: merging a benchmark grid's parts, the K x r tables and plots (no GPU needed)."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import report  # noqa: E402


def _part(commit, shapes, fwd, gpu="GPU X"):
    rows = []
    for (T, K, r), f in zip(shapes, fwd):
        impls = {"base": {"fwd_ms": 1.0, "fwd_ratio": 1.0, "fb_ratio": 1.0},
                 "lorafuse_loramap": {"fwd_ms": f, "fwd_ratio": f, "fb_ratio": 2 * f},
                 "peft": {"fwd_ms": 3.0, "fwd_ratio": 3.0, "fb_ratio": 3.5}}
        rows.append({"T": T, "d_in": 64, "d_out": 32, "K": K, "r": r, "m": 16, "impls": impls})
    return {"env": {"gpu": gpu, "commit": commit, "date": "2026-12-02T00:00:00", "command": f"python part {fwd}"},
            "dtype": "torch.bfloat16", "rows": rows, "seconds": 1.0, "complete": True, "shapes_planned": len(rows)}


def _write(tmp_path, name, doc):
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return str(path)


def test_merge_keeps_every_row_and_averages_repeats(tmp_path, capsys):
    a = _write(tmp_path, "a.json", _part("abc", [(8192, 3, 8), (8192, 3, 16)], [1.10, 1.20]))
    b = _write(tmp_path, "b.json", _part("abc", [(8192, 3, 8), (2048, 8, 64)], [1.30, 1.50]))
    out = str(tmp_path / "grid.json")
    report.main([a, b, "--merge", out, "--grid", "--no-plot"])
    doc = json.load(open(out))
    assert len(doc["rows"]) == 4 and doc["shapes"] == 3
    assert [run["file"] for run in doc["runs"]] == ["a.json", "b.json"]
    assert sorted({row["run"] for row in doc["rows"]}) == [0, 1]
    assert doc["grid"]["K"] == [3, 8] and doc["grid"]["T"] == [2048, 8192]
    rows = report.combined(doc["rows"])
    repeated = [row for row in rows if (row["T"], row["K"], row["r"]) == (8192, 3, 8)]
    assert len(repeated) == 1 and repeated[0]["repeats"] == 2
    assert repeated[0]["impls"]["lorafuse_loramap"]["fwd_ratio"] == pytest.approx(1.20)
    assert report.repeat_spread(doc["rows"])["lorafuse_loramap"] == pytest.approx(0.20)
    text = capsys.readouterr().out
    assert "| 3 | 8 | 24 | 64x32 | 1.20 / 2.40 | 3.00 / 3.50 |" in text
    assert "| 8 | 64 | 512 | 64x32 | 1.50 / 3.00 | 3.00 / 3.50 |" in text


def test_merge_refuses_parts_of_different_commits_or_gpus(tmp_path):
    a = _write(tmp_path, "a.json", _part("abc", [(8192, 3, 8)], [1.1]))
    b = _write(tmp_path, "b.json", _part("def", [(8192, 3, 16)], [1.2]))
    c = _write(tmp_path, "c.json", _part("abc", [(8192, 3, 16)], [1.2], gpu="GPU Y"))
    for other, word in ((b, "commits"), (c, "gpus")):
        with pytest.raises(SystemExit, match=word):
            report.main([a, other, "--merge", str(tmp_path / "grid.json")])
    assert not (tmp_path / "grid.json").exists()
    with pytest.raises(SystemExit):  # several files without --merge
        report.main([a, b])


def test_grid_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    a = _write(tmp_path, "a.json", _part("abc", [(2048, 1, 8), (8192, 1, 8), (8192, 3, 16)], [1.3, 1.1, 1.2]))
    report.main([a, "--grid", "8192"])
    for name in ("a-grid-loramap.png", "a-grid-sum.png"):
        assert (tmp_path / name).stat().st_size > 1000


def test_round_order_balances_places():
    """The A/B scripts' timing order: over an even number of rounds every variant sits in every place
    equally often (a fixed order favoured the later variant by 3-13 % on an H200)."""
    import common

    names = ["base", "triton", "cublas", "base_graph", "triton_graph"]
    places = {n: [] for n in names}
    for i in range(4):
        order = common.round_order(names, i)
        assert sorted(order) == sorted(names)
        for place, n in enumerate(order):
            places[n].append(place)
    mean = (len(names) - 1) / 2
    assert all(sum(p) / len(p) == mean for p in places.values()), places
    assert common.round_order(names, 0) == names and names == ["base", "triton", "cublas", "base_graph",
                                                                "triton_graph"]


def test_report_picks_a_measured_shape(tmp_path, capsys):
    """A smoke run has no K = 3, r = 16 rows: the table takes a pair it has, and a pair it lacks is
    an error naming the ones it has (not an empty table and a plotting crash)."""
    path = _write(tmp_path, "smoke.json", _part("abc", [(37, 1, 5), (37, 3, 5)], [1.5, 1.7]))
    report.main([path, "--no-plot"])
    out = capsys.readouterr().out
    assert "(K, r) = (1, 5)" in out and "1.50" in out
    with pytest.raises(SystemExit):
        report.main([path, "--K", "3", "--r", "16", "--no-plot"])
    assert "it measured (K, r) in [(1, 5), (3, 5)]" in capsys.readouterr().err


def test_save_json_keeps_an_earlier_runs_file(tmp_path, monkeypatch):
    """Two runs with one prefix on one day (two parts of a grid): the second writes a new file, and
    rewrites only its own file after every row."""
    import common

    monkeypatch.setattr(common, "_SAVED_PATHS", {})
    monkeypatch.setattr(common, "gpu_slug", lambda: "gpu-x")
    first = common.save_json({"rows": [1]}, str(tmp_path), "kernels")
    monkeypatch.setattr(common, "_SAVED_PATHS", {})  # a new process
    second = common.save_json({"rows": [2]}, str(tmp_path), "kernels")
    again = common.save_json({"rows": [2, 3]}, str(tmp_path), "kernels")
    assert first != second == again and second.endswith("-2.json")
    assert json.load(open(first)) == {"rows": [1]} and json.load(open(second)) == {"rows": [2, 3]}


def test_patched_switch_is_restored_even_on_error():
    """The A/B scripts flip module switches (ops.PERSISTENT, TAIL_PIPE_MIN_STEPS) per variant: the
    next variant must see the original value, also after a variant raised."""
    import types

    import common

    mod = types.SimpleNamespace(SWITCH=2)
    with common.patched(mod, "SWITCH", 1):
        assert mod.SWITCH == 1
    assert mod.SWITCH == 2
    with pytest.raises(RuntimeError):
        with common.patched(mod, "SWITCH", 1):
            raise RuntimeError("a variant that does not compile")
    assert mod.SWITCH == 2


def test_bench_scripts_compile():
    """Every benchmark script is valid Python (most need a GPU to run)."""
    bench = os.path.join(os.path.dirname(__file__), os.pardir, "bench")
    scripts = sorted(f for f in os.listdir(bench) if f.endswith(".py"))
    assert "persistent_plan_ab.py" in scripts and "tail_steps_ab.py" in scripts
    for name in scripts:
        with open(os.path.join(bench, name)) as f:
            compile(f.read(), name, "exec")  # a SyntaxError names the script


def test_model_benchmark_runs_tiny(tmp_path):
    """bench/bench_model.py end to end on a tiny CPU model: every row timed, the composed sum and
    concat equal to peft with all adapters active, the trainable sets counted, the file written."""
    import bench_model

    doc = bench_model.main(["--tiny", "--out", str(tmp_path)])
    rows = {(r["kind"], r["variant"]): r for r in doc["rows"]}
    assert set(rows) == {("forward", v) for v in ("base", "peft", "lorafuse_sum", "lorafuse_concat",
                                                   "lorafuse_loramap")} | {
        ("train_step", v) for v in ("base", "peft_frozen", "peft", "lorafuse_sum", "lorafuse_concat",
                                    "lorafuse_loramap")}
    for r in doc["rows"]:
        assert r["ms"] > 0 and r["tokens_per_s"] > 0 and r["ratio_to_base"] > 0
    assert rows[("forward", "base")]["ratio_to_base"] == pytest.approx(1.0)
    for v in ("lorafuse_sum", "lorafuse_concat"):  # float32 on the CPU: the same sums, rounding apart
        assert rows[("forward", v)]["rel_err_vs_peft"] < 1e-4 and rows[("forward", v)]["rel_err_vs_fp32"] < 1e-4
    assert rows[("forward", "peft")]["rel_err_vs_fp32"] < 1e-5
    assert "rel_err_vs_fp32" not in rows[("forward", "lorafuse_loramap")]
    tp = {v: rows[("train_step", v)]["trainable_params"] for v in ("peft", "peft_frozen", "lorafuse_sum",
                                                                   "lorafuse_concat", "lorafuse_loramap")}
    # 2 layers x 7 projections, K = 3 adapters of rank 4; LoraMap: (m x R) + (R x m) per layer, m = 4, R = 12
    assert tp["peft"] == tp["lorafuse_concat"] > 0 and tp["peft_frozen"] == tp["lorafuse_sum"] == 0
    assert tp["lorafuse_loramap"] == 2 * 7 * 2 * 4 * 12
    path = os.path.join(tmp_path, os.listdir(tmp_path)[0])
    saved = json.loads(open(path).read())
    assert saved["config"]["adapters"] == 3 and len(saved["rows"]) == 11
    png = tmp_path / "model.png"
    bench_model.main(["--plot", path, path, "--png", str(png)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_model_profile_attributes_kernels_to_projections():
    """bench_model's per-projection profile: the host ranges open and close around each targeted
    projection (and are gone afterwards), and kernels are counted in the projection whose GPU-side
    range they start in, nowhere else."""
    from types import SimpleNamespace

    import torch
    from torch.profiler import ProfilerActivity, profile

    import bench_model

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj, self.other = (torch.nn.Linear(8, 8) for _ in range(3))

        def forward(self, x):
            return self.other(self.k_proj(self.q_proj(x)))

    m = Block()
    with bench_model.projection_ranges(m):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            m(torch.randn(4, 8))
    names = [e.name for e in prof.events() if e.name.startswith("proj:")]
    assert sorted(names) == ["proj:k_proj", "proj:q_proj"]
    assert not any(mod._forward_hooks or mod._forward_pre_hooks for mod in m.modules())
    assert m.q_proj.__dict__.keys() == torch.nn.Linear(8, 8).__dict__.keys()  # nothing left on the modules
    with pytest.raises(RuntimeError):  # a forward that raises inside a range: closed, hooks removed
        with bench_model.projection_ranges(m):
            m(torch.randn(4, 7))
    assert not any(mod._forward_hooks or mod._forward_pre_hooks for mod in m.modules())

    cuda = torch.autograd.DeviceType.CUDA
    ev = lambda name, a, b: SimpleNamespace(name=name, device_type=cuda,  # noqa: E731
                                            time_range=SimpleNamespace(start=a, end=b))
    fake = SimpleNamespace(events=lambda: [
        ev("proj:q_proj", 0, 100), ev("gemm", 10, 60), ev("shrink", 0, 8), ev("norm", 120, 150),
        ev("proj:k_proj", 200, 300), ev("gemm", 210, 290), ev("proj:q_proj", 400, 500), ev("gemm", 400, 480)])
    per = bench_model.projection_kernels(fake, calls=2)
    assert set(per) == {"q_proj", "k_proj"}
    adjacent = SimpleNamespace(events=lambda: [  # a range ends where its last kernel ends: no kernel twice
        ev("proj:q_proj", 0, 100), ev("g1", 0, 100), ev("proj:k_proj", 100, 200), ev("g2", 100, 200)])
    two = bench_model.projection_kernels(adjacent, calls=1)
    assert two["q_proj"]["kernels"].keys() == {"g1"} and two["k_proj"]["kernels"].keys() == {"g2"}
    assert per["q_proj"]["kernels"] == {"gemm": [1.0, pytest.approx(0.065)], "shrink": [0.5, pytest.approx(0.004)]}
    assert per["q_proj"]["kernel_ms"] == pytest.approx(0.069) and per["q_proj"]["span_ms"] == pytest.approx(0.1)
    assert per["k_proj"]["kernel_ms"] == pytest.approx(0.04) and per["k_proj"]["span_ms"] == pytest.approx(0.05)

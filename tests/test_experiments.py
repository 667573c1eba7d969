"""The recycling study end to end on a tiny random model: every method runs and its outputs are written."""
import json
import math

from lorafuse.experiments.recycling import METHODS, run_recycling


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

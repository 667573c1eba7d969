"""Loaders on the shared data (../shared/data, or $LORAFUSE_DATA): counts and label maps as the
sources publish them, and the perspective tasks kept apart from COVID-Fact's dev and test claims."""
import pytest

# The training path's packages come with the test extra; a bare install (the GPU machine) skips.
for _mod in ("datasets", "sklearn", "accelerate"):
    pytest.importorskip(_mod)

from lorafuse import data  # noqa: E402

ROOT = data.default_data_dir()
pytestmark = pytest.mark.skipif(ROOT is None, reason="no data folder (set LORAFUSE_DATA)")


def counts(ds):
    return [list(ds["label"]).count(i) for i in range(ds.features["label"].num_classes)]


def test_covidfact_splits_counts_and_labels():
    d = data.load_task("covidfact", str(ROOT))
    assert {k: len(v) for k, v in d.items()} == {"train": 3263, "dev": 419, "test": 401}
    # (refuted, supported) = (not_entailment, entailment); dev's label column is named `entailment`.
    assert counts(d["train"]) == [2227, 1036]
    assert counts(d["dev"]) == [289, 130]
    assert counts(d["test"]) == [271, 130]
    assert d["test"].features["label"].names == ["refuted", "supported"]
    row = d["test"][0]
    assert row["text"] and len(row["text_pair"]) > len(row["text"])  # claim first, evidence second


def test_scifact_counts():
    d = data.load_task("scifact", str(ROOT))
    assert {k: len(v) for k, v in d.items()} == {"train": 564, "dev": 209}
    assert counts(d["train"]) == [194, 370]


def test_gsm8k_and_pubmedqa():
    g = data.load_task("gsm8k", str(ROOT))
    assert (len(g["train"]), len(g["test"])) == (7473, 1319)
    assert g["train"][0]["final"] == "72" and "<<" not in g["train"][0]["answer"]
    assert g["train"][0]["prompt"].startswith("Question:") and g["train"][0]["prompt"].endswith("Answer:")
    p = data.load_task("pubmedqa", str(ROOT))
    assert (len(p["train"]), len(p["test"])) == (500, 500)
    assert not set(p["train"]["pubid"]) & set(p["test"]["pubid"])
    assert set(p["test"]["decision"]) <= {"yes", "no", "maybe"}


def test_perspective_tasks_avoid_covidfact_dev_and_test_claims():
    cf = data.load_task("covidfact", str(ROOT))
    held = {" ".join(t.lower().split()) for t in list(cf["dev"]["text"]) + list(cf["test"]["text"])}
    for name in ("perspective-difference", "perspective-correction"):
        d = data.load_task(name, str(ROOT))
        assert len(d["train"]) > 1000 and len(d["dev"]) > 100
        assert counts(d["train"])[0] == counts(d["train"])[1]  # balanced by construction
        seen = {" ".join(t.lower().split()) for t in list(d["train"]["text"]) + list(d["train"]["text_pair"])
                + list(d["dev"]["text"])}
        assert not seen & held, name
        # train and dev come from different claim families
        assert not set(d["train"]["text"]) & set(d["dev"]["text"])
    diff = data.load_task("perspective-difference", str(ROOT))["train"]
    for row in diff.select(range(50)):
        assert row["text_pair"] in row["text"]
    # the word's length gives nothing away: four letters or more in both classes
    assert min(len(w) for w in diff["text_pair"]) >= 4


def test_perspective_tasks_are_deterministic():
    a = data.load_perspective("perspective-correction", str(ROOT), seed=3)
    b = data.load_perspective("perspective-correction", str(ROOT), seed=3)
    assert list(a["train"]["text_pair"]) == list(b["train"]["text_pair"])


def test_bad_paths_and_names(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_dir"):
        data.load_task("covidfact", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="covidfact/train.tsv"):
        data.load_task("covidfact", str(tmp_path))
    with pytest.raises(ValueError, match="unknown task 'nope'.*covidfact"):
        data.load_task("nope", str(tmp_path))
    # every name the message lists loads; two-hop needs no data folder
    assert set(data.load_task("two-hop", str(tmp_path / "nowhere"))) >= {"hop1", "hop2", "two_hop"}
    (tmp_path / "scifact-rte").mkdir()
    (tmp_path / "scifact-rte" / "train.tsv").write_text("index\tsentence1\tsentence2\tentailment\n0\te\tc\tmaybe\n")
    (tmp_path / "scifact-rte" / "dev.tsv").write_text("index\tsentence1\tsentence2\tentailment\n0\te\tc\tentailment\n")
    with pytest.raises(ValueError, match="label 'maybe'"):
        data.load_task("scifact", str(tmp_path))


def test_quotes_are_kept_verbatim(tmp_path):
    (tmp_path / "scifact-rte").mkdir()
    for split in ("train", "dev"):
        (tmp_path / "scifact-rte" / f"{split}.tsv").write_text(
            'index\tsentence1\tsentence2\tentailment\n0\the said "no\t"quoted" claim\tentailment\n')
    d = data.load_task("scifact", str(tmp_path))
    assert d["train"][0]["text"] == '"quoted" claim' and d["train"][0]["text_pair"] == 'he said "no'


def test_default_data_dir_from_the_working_folder(tmp_path, monkeypatch):
    # ../shared/data is looked for from the working folder first (an installed package has no checkout).
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "work").mkdir()
    monkeypatch.delenv("LORAFUSE_DATA", raising=False)
    monkeypatch.chdir(tmp_path / "work")
    assert data.default_data_dir().resolve() == (tmp_path / "shared" / "data").resolve()
    monkeypatch.setenv("LORAFUSE_DATA", str(tmp_path / "elsewhere"))
    assert data.default_data_dir() == tmp_path / "elsewhere"


@pytest.mark.parametrize("task,files,msg", [
    ("scifact", {"scifact-rte/train.tsv": "index\tsentence2\tentailment\n0\tc\tentailment\n"},
     "train.tsv: no column 'sentence1'"),
    ("scifact", {"scifact-rte/train.tsv": "index\tsentence1\tsentence2\tentailment\n0\te\tc\n"},
     "train.tsv: row 0 has 3 fields, the header 4"),
    ("gsm8k", {"gsm8k/train.jsonl": '{"question": "q", "answer": "a #### 1"}\n{"question": \n'},
     "train.jsonl: line 2 is not JSON"),
    ("gsm8k", {"gsm8k/train.jsonl": '{"question": "q", "answer": "no final number"}\n'},
     "train.jsonl: row 0: the answer has no '####'"),
    ("pubmedqa", {"pubmedqa/ori_pqal.json": "[1, 2]", "pubmedqa/test_ground_truth.json": "{}"},
     "ori_pqal.json: expected an object of entries by PubMed id, got a list"),
    ("pubmedqa", {"pubmedqa/ori_pqal.json": '{"1": {"QUESTION": "q"}}', "pubmedqa/test_ground_truth.json": "{}"},
     "ori_pqal.json: row 0: field 'LONG_ANSWER' is missing"),
])
def test_malformed_files_are_named(tmp_path, task, files, msg):
    """A file that is there but not in its format: DataFileError (a ValueError) naming the file."""
    good = {"scifact-rte/dev.tsv": "index\tsentence1\tsentence2\tentailment\n0\te\tc\tentailment\n",
            "scifact-rte/train.tsv": "index\tsentence1\tsentence2\tentailment\n0\te\tc\tentailment\n",
            "gsm8k/test.jsonl": '{"question": "q", "answer": "a #### 1"}\n'}
    for name, text in {**good, **files}.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    with pytest.raises(data.DataFileError, match=msg):
        data.load_task(task, str(tmp_path))

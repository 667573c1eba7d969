"""merge_adapters: the same numbers as peft's merge_utils on the deltas and as peft's add_weighted_adapter;
the merged adapter exports to peft and reloads with the same outputs."""
import pytest
import torch

from conftest import rel_err
from lorafuse import use_backend
from lorafuse.compose import compose
from lorafuse.export import export_peft
from lorafuse.merging import MERGE_METHODS, merge_adapters
from test_compose import model_inputs, model_output, peft_with_adapters, save_adapters, tiny_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = {}
    for fam in ("llama", "gpt2"):
        fresh, peft_model, names = peft_with_adapters(fam)
        out[fam] = (fresh.state_dict(), peft_model, names, save_adapters(peft_model, names,
                                                                         tmp_path_factory.mktemp(fam)))
    return out


def fresh_model(saved, family):
    model = tiny_model(family, seed=5)
    model.load_state_dict(saved[family][0])
    return model


def _peft_delta(peft_model, key, name):
    layer = peft_model.base_model.model.get_submodule(key)
    d = layer.get_delta_weight(name).detach()
    return d.t() if layer.fan_in_fan_out else d  # peft returns Conv1D deltas as (d_in, d_out)


def _dense(adapter, key):
    a, b, s = adapter.layers[key]
    return s * b.double() @ a.double()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("method", MERGE_METHODS)
def test_matches_peft_merge_utils(saved, family, method, seeded):
    from peft.utils import merge_utils

    _, peft_model, names, dirs = saved[family]
    weights = (torch.rand(3) + 0.3).tolist()
    density = None if method == "task_arithmetic" else 0.4
    seed = int(torch.randint(0, 2 ** 31, ()))
    merged = merge_adapters(dirs, method=method, weights=weights, density=density, seed=seed, rank="full")
    assert merged.info["method"] == method
    torch.manual_seed(seed)  # peft draws DARE's masks from the global generator, layer by layer
    for key in merged.layers:
        lora_layer = peft_model.base_model.model.get_submodule(key)
        present = [i for i, n in enumerate(names) if n in lora_layer.lora_A]
        deltas = [_peft_delta(peft_model, key, names[i]) for i in present]
        w = torch.tensor([weights[i] for i in present])
        fn = getattr(merge_utils, method)
        args = (deltas, w) if method == "task_arithmetic" else (deltas, w, density)
        if method in ("ties", "dare_ties"):
            args += ("total",)
        ref = fn(*args)
        assert rel_err(_dense(merged, key), ref) < 1e-5, key


def test_dare_seeded_and_rng_untouched(saved, monkeypatch):
    dirs = saved["llama"][3]
    state = torch.get_rng_state()
    # CPU adapters draw from the CPU generator only: no CUDA device may be reseeded (torch.manual_seed
    # would reseed every one, or queue it until CUDA starts, and restore none).
    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda s: reseeded.append(s))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda s: reseeded.append(s))
    m1 = merge_adapters(dirs, method="dare_ties", density=0.3, seed=3, rank="full")
    assert torch.equal(torch.get_rng_state(), state) and not reseeded
    m2 = merge_adapters(dirs, method="dare_ties", density=0.3, seed=3, rank="full")
    m3 = merge_adapters(dirs, method="dare_ties", density=0.3, seed=4, rank="full")
    key = next(iter(m1.layers))
    assert torch.equal(_dense(m1, key), _dense(m2, key))
    assert not torch.equal(_dense(m1, key), _dense(m3, key))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("method,peft_type", [("ties", "ties_svd"), ("magnitude_prune", "magnitude_prune_svd"),
                                              ("task_arithmetic", "svd")])
def test_matches_peft_add_weighted_adapter_svd(saved, tmp_path, family, method, peft_type, seeded):
    from peft import PeftModel

    _, peft_model, names, dirs = saved[family]
    weights = (torch.rand(3) * 2 - 0.5).tolist()
    density = None if method == "task_arithmetic" else 0.5
    peft_model.add_weighted_adapter(names, weights, "m", combination_type=peft_type, svd_rank=3,
                                    density=density)
    peft_model.set_adapter("m")
    inputs = model_inputs(family)
    ref = model_output(peft_model, inputs)
    peft_model.delete_adapter("m")

    merged = merge_adapters(dirs, method=method, weights=weights, density=density, rank=3)
    assert max(a.shape[0] for a, _, _ in merged.layers.values()) == 3
    out_dir = export_peft(merged, tmp_path / method)
    out = model_output(PeftModel.from_pretrained(fresh_model(saved, family), out_dir).eval(), inputs)
    assert rel_err(out, ref) < 1e-4


def test_task_arithmetic_exact_equals_weighted_composition(saved, tmp_path, seeded):
    from peft import PeftModel

    _, _, _, dirs = saved["gpt2"]
    weights = [0.5, -0.25, 1.5]
    merged = merge_adapters(dirs, method="task_arithmetic", weights=weights)
    assert all(e == 0.0 for e in merged.info["truncation_error"].values())
    inputs = model_inputs("gpt2")
    composed = compose(fresh_model(saved, "gpt2"), dirs, method="weighted", weights=weights)
    with use_backend("torch"):
        ref = model_output(composed, inputs)
    out_dir = export_peft(merged, tmp_path / "ta")
    out = model_output(PeftModel.from_pretrained(fresh_model(saved, "gpt2"), out_dir).eval(), inputs)
    assert rel_err(out, ref) < 2e-5
    # TIES at a small rank reports its truncation error
    ties = merge_adapters(dirs, method="ties", density=0.5, rank=1)
    assert all(0 < e < 1 for e in ties.info["truncation_error"].values())


def test_bad_input(saved):
    dirs = saved["llama"][3]
    with pytest.raises(ValueError, match=r"method must be one of \('task_arithmetic', 'ties'"):
        merge_adapters(dirs, method="avg")
    with pytest.raises(ValueError, match="density in \\(0, 1\\]"):
        merge_adapters(dirs, method="ties")
    with pytest.raises(ValueError, match="density is not used"):
        merge_adapters(dirs, method="task_arithmetic", density=0.5)
    with pytest.raises(ValueError, match=r"one entry per adapter \(3\), got 1"):
        merge_adapters(dirs, weights=[1.0])
    with pytest.raises(ValueError, match="rank must be"):
        merge_adapters(dirs, rank=0)
    with pytest.raises(FileNotFoundError, match="no-such"):
        merge_adapters(dirs + ["/tmp/no-such-adapter"])


def test_weights_must_be_finite(saved):
    dirs = saved["llama"][3]
    with pytest.raises(ValueError, match="weights must be finite"):
        merge_adapters(dirs, method="task_arithmetic", weights=[1.0, float("inf"), 1.0], rank="full")


def test_adapters_of_different_model_kinds_are_refused(saved):
    with pytest.raises(ValueError, match="disagree on fan_in_fan_out"):
        merge_adapters([saved["llama"][3][0], saved["gpt2"][3][0]], method="task_arithmetic")


def test_gpt2_adapters_with_differing_saved_flags_merge(tmp_path):
    # peft saves a GPT-2 adapter on c_attn and lm_head with fan_in_fan_out False, one on c_attn alone
    # with True: both are adapters of the same model, and so is their merge.
    from peft import LoraConfig, get_peft_model
    from test_compose import randomize_lora

    dirs = []
    for name, targets in (("both", ["c_attn", "lm_head"]), ("attn", ["c_attn"])):
        pm = get_peft_model(tiny_model("gpt2", seed=5), LoraConfig(r=2, lora_alpha=4, target_modules=targets,
                                                                   fan_in_fan_out=True))
        randomize_lora(pm)
        pm.save_pretrained(str(tmp_path / name))
        dirs.append(str(tmp_path / name))
    merged = merge_adapters(dirs, method="task_arithmetic")
    assert merged.info["fan_in_fan_out"]
    again = merge_adapters([merged, dirs[1]], method="task_arithmetic")
    key = next(k for k in again.layers if k.endswith("c_attn"))
    want = 2 * _dense(merge_adapters([dirs[1]]), key) + _dense(merge_adapters([dirs[0]]), key)
    assert rel_err(_dense(again, key), want) < 1e-5
    # No module in common (c_attn + lm_head against c_fc), the same layer stack: still one model.
    pm = get_peft_model(tiny_model("gpt2", seed=5), LoraConfig(r=2, lora_alpha=4, target_modules=["c_fc"],
                                                               fan_in_fan_out=True))
    randomize_lora(pm)
    pm.save_pretrained(str(tmp_path / "fc"))
    apart = merge_adapters([dirs[0], str(tmp_path / "fc")], method="task_arithmetic")
    assert any(k.endswith("c_fc") for k in apart.layers) and any(k.endswith("lm_head") for k in apart.layers)
    # An adapter on lm_head alone (saved with False) beside one on c_attn alone (True): nothing shared,
    # but the head is outside any layer stack, so nothing says another model either (compose takes them).
    pm = get_peft_model(tiny_model("gpt2", seed=5), LoraConfig(r=2, lora_alpha=4, target_modules=["lm_head"]))
    randomize_lora(pm)
    pm.save_pretrained(str(tmp_path / "head"))
    both = merge_adapters([dirs[1], str(tmp_path / "head")], method="task_arithmetic")
    assert any(k.endswith("c_attn") for k in both.layers) and any(k.endswith("lm_head") for k in both.layers)


def test_density_and_seed_types_are_named(saved):
    dirs = saved["llama"][3]
    with pytest.raises(ValueError, match="needs density in"):
        merge_adapters(dirs, method="ties", density="half")
    with pytest.raises(ValueError, match="seed must be an integer"):
        merge_adapters(dirs, method="dare_ties", density=0.5, seed="a")

"""LoraHub search and training: deterministic, the loss it reports is the one of the exact (or LoraHub's
factor-wise) composition as peft computes it, and gradients of the K weights are right."""
import copy
from pathlib import Path

import pytest
import torch

pytest.importorskip("nevergrad")

from conftest import rel_err  # noqa: E402
from lorafuse import use_backend  # noqa: E402
from lorafuse.compose import compose, get_composition  # noqa: E402
from lorafuse.lorahub import lorahub_search, lorahub_train, set_lorahub_weights  # noqa: E402
from test_compose import VOCAB, model_output, peft_with_adapters, save_adapters, tiny_model  # noqa: E402

EQUAL_RANK_SPECS = [
    dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
    dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "o_proj"]),
    dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
]
TARGET_W = [1.0, -0.6, 0.8]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    fresh, peft_model, names = peft_with_adapters("llama", EQUAL_RANK_SPECS, seed=1)
    dirs = save_adapters(peft_model, names, tmp_path_factory.mktemp("hub"))
    base_sd = fresh.state_dict()
    # few-shot task: reproduce the greedy tokens of the exact composition at TARGET_W
    torch.manual_seed(0)
    teacher = compose(_fresh(base_sd), dirs, method="weighted", weights=TARGET_W)
    batches = []
    with torch.no_grad(), use_backend("torch"):
        for _ in range(2):
            ids = torch.randint(0, VOCAB, (2, 8))
            labels = teacher(input_ids=ids).logits.argmax(-1)
            labels = torch.cat([torch.full((2, 1), -100), labels[:, :-1]], 1)  # the model shifts labels itself
            batches.append({"input_ids": ids, "labels": labels})
    return base_sd, peft_model, names, dirs, batches


def _fresh(base_sd):
    model = tiny_model("llama", seed=9)
    model.load_state_dict(base_sd)
    return model


def _loss_at(base_sd, dirs, batches, weights):
    model = compose(_fresh(base_sd), dirs, method="weighted", weights=weights)
    with torch.no_grad(), use_backend("torch"):
        return sum(float(model(**b).loss) for b in batches) / len(batches)


def test_search_deterministic_and_improves(setup):
    base_sd, _, names, dirs, batches = setup
    with use_backend("torch"):
        model = _fresh(base_sd)
        r1 = lorahub_search(model, dirs, batches, budget=30, seed=42)
        assert get_composition(model).weights == r1.weights  # the composition records the weights found
        r2 = lorahub_search(_fresh(base_sd), dirs, batches, budget=30, seed=42)
    assert r1.weights == r2.weights and r1.history == r2.history
    assert len(r1.history) == 30 and r1.history[0][0] == [0.0, 0.0, 0.0]
    assert r1.composition == "exact" and r1.method == "NGOpt" and r1.adapters == names
    assert all(-1.5 <= w <= 1.5 for w in r1.weights)
    start = r1.history[0][1]
    target = _loss_at(base_sd, dirs, batches, TARGET_W)
    assert target < start - 0.1
    assert r1.objective < start - 0.5 * (start - target)  # closes at least half of the gap to the teacher
    assert r1.objective == pytest.approx(r1.loss + 0.05 * sum(abs(w) for w in r1.weights) / 3)
    assert r1.loss == pytest.approx(_loss_at(base_sd, dirs, batches, r1.weights), rel=1e-6)


def test_search_with_two_adapters_warns_nothing(setup):
    """NGOpt on two weights runs nevergrad's COBYLA, whose stopping radius scipy corrects with a
    warning on every search (lorafuse demo's LoraHub row): the search silences that one warning."""
    import warnings

    base_sd, _, _, dirs, batches = setup
    with warnings.catch_warnings(record=True) as caught, use_backend("torch"):
        warnings.simplefilter("always")
        lorahub_search(_fresh(base_sd), dirs[:2], batches, budget=12, seed=0)
    assert not [w for w in caught if "RHOEND" in str(w.message)]


def test_search_seed_matters_for_stochastic_optimizers(setup):
    base_sd, _, _, dirs, batches = setup
    with use_backend("torch"):
        runs = [lorahub_search(_fresh(base_sd), dirs, batches, budget=6, seed=s, optimizer="OnePlusOne")
                for s in (3, 3, 4)]
    assert runs[0].history == runs[1].history and runs[0].history != runs[2].history


def test_search_loss_matches_peft_cat(setup):
    """The loss reported for the weights found is peft's own loss with a `cat` adapter of those weights."""
    base_sd, peft_model, names, dirs, batches = setup
    model = _fresh(base_sd)
    with use_backend("torch"):
        res = lorahub_search(model, dirs, batches, budget=12, seed=42)
    peft_model.add_weighted_adapter(names, res.weights, "hub", combination_type="cat")
    peft_model.set_adapter("hub")
    with torch.no_grad():
        ref = sum(float(peft_model(**b).loss) for b in batches) / len(batches)
    peft_model.delete_adapter("hub")
    assert res.loss == pytest.approx(ref, rel=1e-5)
    # the model is left composed with the weights found
    layer = next(iter(get_composition(model).layers().values()))
    assert layer.weights.tolist() == pytest.approx([res.weights[i] for i in
                                                    get_composition(model).slots[
                                                        next(iter(get_composition(model).slots))].adapter_indices])


def test_metric_maximize_equals_loss(setup):
    base_sd, _, _, dirs, batches = setup
    with use_backend("torch"):
        a = lorahub_search(_fresh(base_sd), dirs, batches, budget=8)
        b = lorahub_search(_fresh(base_sd), dirs, batches, budget=8, maximize=True,
                           metric_or_loss=lambda m, batch: -float(m(**batch).loss))
    assert a.history == b.history


def test_factorwise_equals_lorahub_state_dict_sum(setup, seeded):
    """LoraHub's composition: lora_A' = sum w_i A_i, lora_B' = sum w_i B_i, loaded into peft as one adapter."""
    from peft import LoraConfig, get_peft_model
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    base_sd, _, _, dirs, batches = setup
    w = (torch.rand(3) * 3 - 1.5).tolist()
    model = _fresh(base_sd)
    with use_backend("torch"):
        res = lorahub_search(model, dirs, batches, budget=2, composition="factorwise")
    assert res.composition == "factorwise"
    set_lorahub_weights(model, w)
    ids = torch.randint(0, VOCAB, (2, 6))
    with use_backend("torch"):
        out = model_output(model, {"input_ids": ids})

    sds = [load_file(f"{d}/adapter_model.safetensors") for d in dirs]
    summed = {}
    for wi, sd in zip(w, sds):
        for k, v in sd.items():
            summed[k] = summed.get(k, 0) + wi * v
    ref_model = get_peft_model(_fresh(base_sd), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj",
                                                                                              "o_proj"]))
    set_peft_model_state_dict(ref_model, summed)
    ref = model_output(ref_model.eval(), {"input_ids": ids})
    assert rel_err(out, ref) < 2e-5
    # and it is not the exact sum of deltas
    exact = compose(_fresh(base_sd), dirs, method="weighted", weights=w)
    with use_backend("torch"):
        assert rel_err(model_output(exact, {"input_ids": ids}), ref) > 1e-3


def _ce64(model, batch):
    """Next-token cross-entropy in float64 (the model's own .loss is computed in float32)."""
    logits = model(input_ids=batch["input_ids"]).logits.double()[:, :-1]
    labels = batch["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=-100)


@pytest.mark.parametrize("composition", ["exact", "factorwise"])
def test_train_gradient_matches_finite_differences(setup, composition, seeded):
    base_sd, _, _, dirs, batches = setup
    model = _fresh(base_sd).double()
    w0 = (torch.rand(3) - 0.5).tolist()
    res = lorahub_train(model, dirs, batches, loss=_ce64, steps=1, lr=0.0, l1=0.0, init=w0,
                        composition=composition)
    comp = get_composition(model)

    def loss_at(w):
        set_lorahub_weights(model, w)
        with torch.no_grad():
            return sum(float(_ce64(model, b)) for b in batches) / len(batches)

    # one Adam step with lr 0 leaves w0; recompute the gradient the trainer used
    from lorafuse.lorahub import _weight_grad
    set_lorahub_weights(model, w0)
    for layer in comp.layers().values():
        for p in layer.parameters():
            p.grad = None
        if layer.method == "weighted":
            layer.weights.requires_grad_(True)
        else:
            layer.a_map.requires_grad_(True)
            layer.b_map.requires_grad_(True)
    (sum(_ce64(model, b) for b in batches) / len(batches)).backward()
    grad = torch.zeros(3, dtype=torch.float64)
    for slot in comp.slots.values():
        grad.index_add_(0, torch.as_tensor(slot.adapter_indices), _weight_grad(slot.composed).double())
    eps = 1e-3  # the weights are stored in float32: larger steps keep their rounding out of the quotient
    for i in range(3):
        hi, lo = list(w0), list(w0)
        hi[i] += eps
        lo[i] -= eps
        fd = (loss_at(hi) - loss_at(lo)) / (2 * eps)
        assert grad[i].item() == pytest.approx(fd, rel=2e-4, abs=1e-7)
    assert res.weights == pytest.approx(w0)


def test_train_reduces_objective(setup):
    base_sd, _, _, dirs, batches = setup
    model = _fresh(base_sd)
    with use_backend("torch"):
        res = lorahub_train(model, dirs, batches, steps=25, lr=0.1)
    assert res.objective < res.history[0][1] - 0.02
    comp = get_composition(model)
    for slot in comp.slots.values():  # the global weights are tied across layers
        assert slot.composed.weights.tolist() == pytest.approx([res.weights[i] for i in slot.adapter_indices])
    assert comp.weights == res.weights
    assert not any(p.requires_grad for n, p in model.named_parameters() if "base_layer" in n)
    model = _fresh(base_sd)
    per_layer = lorahub_train(model, dirs, batches, steps=3, lr=0.1, per_layer=True)
    assert per_layer.info["per_layer"]
    assert get_composition(model).weights is None  # each layer holds its own


def test_bad_input(setup, tmp_path):
    base_sd, _, _, dirs, batches = setup
    with pytest.raises(ValueError, match="composition must be one of"):
        lorahub_search(_fresh(base_sd), dirs, batches, composition="linear")
    with pytest.raises(ValueError, match="budget must be a positive int"):
        lorahub_search(_fresh(base_sd), dirs, batches, budget=0)
    model = _fresh(base_sd)
    with pytest.raises(ValueError, match="needs 'labels'"):
        lorahub_search(model, dirs, [{"input_ids": batches[0]["input_ids"]}], budget=1)
    assert getattr(model, "_lorafuse_composition", None) is None  # a failed search leaves the model as given
    with pytest.raises(ValueError, match=r"init must have one entry per adapter \(3\), got 1"):
        lorahub_train(model, dirs, batches, steps=1, init=[1.0])
    assert getattr(model, "_lorafuse_composition", None) is None  # and so does a failed training run
    for bounds in ((-1.0, 0.0, 1.0), 1.5, (float("-inf"), 1.0), (1.0, -1.0)):
        with pytest.raises(ValueError, match="bounds must be"):
            lorahub_search(_fresh(base_sd), dirs, batches, bounds=bounds)
    with pytest.raises(ValueError, match="l1 must be"):
        lorahub_search(_fresh(base_sd), dirs, batches, l1=float("nan"))
    result = lorahub_search(_fresh(base_sd), (d for d in dirs), batches, budget=2)  # a generator of adapters
    assert len(result.weights) == len(dirs)
    for single in (dirs[0], Path(dirs[0])):  # one adapter, not a list of them
        with pytest.raises(TypeError, match="wrap a single adapter in a list"):
            lorahub_search(_fresh(base_sd), single, batches, budget=1)
        with pytest.raises(TypeError, match="wrap a single adapter in a list"):
            lorahub_train(_fresh(base_sd), single, batches, steps=1)
    composed = compose(_fresh(base_sd), dirs, method="sum")
    with pytest.raises(ValueError, match="method='weighted'"):
        lorahub_search(composed, None, batches)
    fresh, peft_model, names = peft_with_adapters("llama")  # ranks 4, 2, 3 / 5
    mixed = save_adapters(peft_model, names, tmp_path)
    with pytest.raises(ValueError, match="factorwise.*equal ranks"):
        lorahub_search(copy.deepcopy(fresh), mixed, batches, composition="factorwise")
    with pytest.raises(ValueError, match=r"one entry per adapter \(3\)"):
        set_lorahub_weights(composed, [1.0])
    # Every number named, checked before the model is touched.
    for kw, match in ((dict(init=[float("nan"), 0.5, 0.5]), "init must be finite"), (dict(l1=None), "l1 must be"),
                      (dict(lr=-0.1), "lr must be"), (dict(lr="0.1"), "lr must be")):
        model = _fresh(base_sd)
        with pytest.raises(ValueError, match=match):
            lorahub_train(model, dirs, batches, steps=1, **kw)
        assert getattr(model, "_lorafuse_composition", None) is None
    for kw, match in ((dict(seed="1"), "seed must be an integer"), (dict(seed=-1), "seed must be an integer"),
                      (dict(bounds=(0.2, 1.0)), "bounds must contain 0")):
        with pytest.raises(ValueError, match=match):
            lorahub_search(_fresh(base_sd), dirs, batches, budget=1, **kw)
    weighted = compose(_fresh(base_sd), dirs, method="weighted")
    with pytest.raises(ValueError, match="weights must be finite"):
        set_lorahub_weights(weighted, [1.0, float("nan"), 0.0])
    # A LoraMap of another map rank is not a factorwise LoraHub layout: refused before any layer is written.
    mapped = compose(_fresh(base_sd), dirs, method="loramap", map_rank=3)
    maps = {n: p.detach().clone() for n, p in mapped.named_parameters() if "map" in n}
    with pytest.raises(ValueError, match="factorwise weights need equal ranks and map_rank"):
        set_lorahub_weights(mapped, [1.0, 1.0, 1.0])
    assert all(torch.equal(p, maps[n]) for n, p in mapped.named_parameters() if "map" in n)


@pytest.mark.parametrize("run", ["search", "train"])
def test_a_failed_run_restores_an_already_composed_model(setup, run):
    """The model was composed (weighted) before the call: a loss that fails midway leaves its weights
    (in the layers and as the composition records them), flags and training mode as they were."""
    base_sd, _, _, dirs, batches = setup
    model = _fresh(base_sd)
    compose(model, dirs, method="weighted", weights=[0.3, 0.7, -0.2])
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    calls = []

    def failing(m, batch):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("loss failed")
        return m(**batch).loss

    with pytest.raises(RuntimeError, match="loss failed"), use_backend("torch"):
        if run == "search":
            lorahub_search(model, None, batches, failing, budget=10)
        else:
            lorahub_train(model, None, batches, failing, steps=10)
    assert model.training and all(m.training for m in model.modules())
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.requires_grad == flags[n], n
    assert get_composition(model).method == "weighted" and get_composition(model).weights == [0.3, 0.7, -0.2]

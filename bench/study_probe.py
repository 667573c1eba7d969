"""Can the base model learn COVID-Fact at all, and with what adapter? A check to run before study 1
(`lorafuse experiment loramap`): composing perspective adapters says nothing if no single adapter
learns the task. Fits one configuration after another to COVID-Fact's (class-balanced) train split
and scores dev accuracy / macro-F1 after each epoch; writes results/loramap-probe/probe.json.

    python bench/study_probe.py --data ../shared/data [--model minilm] [--configs qv128 qv256 ...]

Configurations (name: what is trained, sequence length, learning rate, epochs):
  qv128     LoRA r=8 on query/value + the head, 128 tokens, lr 3e-3   (study 1's setting so far)
  qv256     the same with 256 tokens (the median claim+evidence pair is about 125 tokens)
  qv256lo   the same at lr 5e-4
  all256    LoRA r=16 on every linear layer of the encoder + the head, 256 tokens, lr 1e-3
  full256   every weight (full fine-tuning), 256 tokens, lr 3e-5
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CONFIGS = {
    "qv128": dict(kind="lora", targets=None, r=8, alpha=16, max_length=128, lr=3e-3),
    "qv256": dict(kind="lora", targets=None, r=8, alpha=16, max_length=256, lr=3e-3),
    "qv256lo": dict(kind="lora", targets=None, r=8, alpha=16, max_length=256, lr=5e-4),
    "all256": dict(kind="lora", targets=["query", "key", "value", "dense"], r=16, alpha=32, max_length=256, lr=1e-3),
    "full256": dict(kind="full", max_length=256, lr=3e-5),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="the data folder (holds covidfact/)")
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--train-limit", type=int, default=2072, help="class-balanced training examples (2072 = all "
                    "1,036 supported + as many refuted)")
    ap.add_argument("--eval-limit", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/loramap-probe")
    args = ap.parse_args(argv)

    import torch
    from peft import LoraConfig, get_peft_model

    from lorafuse.data import load_task
    from lorafuse.evaluate import evaluate_classification
    from lorafuse.experiments.common import subset
    from lorafuse.experiments.loramap import _balanced
    from lorafuse.models import classification_head, load_model
    from lorafuse.train import fit

    cf = load_task("covidfact", args.data)
    train = _balanced(cf["train"], args.train_limit, args.seed)
    dev = subset(cf["dev"], args.eval_limit, args.seed)
    rows = []
    for name in args.configs:
        c = CONFIGS[name]
        net, tok = load_model(args.model, task="classification", seed=args.seed)
        if c["kind"] == "lora":
            cfg = LoraConfig(r=c["r"], lora_alpha=c["alpha"], target_modules=c["targets"] or ["query", "value"],
                             lora_dropout=0.0, bias="none")
            net = get_peft_model(net, cfg)
        else:
            net.requires_grad_(True)
        classification_head(net.base_model.model if c["kind"] == "lora" else net).requires_grad_(True)
        if torch.cuda.is_available():
            net = net.cuda()
        hist = []
        t0 = time.perf_counter()
        for ep in range(args.epochs):
            # One epoch per fit() call (the learning rate decays linearly within each), then score dev.
            info = fit(net, tok, train, epochs=1, lr=c["lr"], seed=args.seed + ep, max_length=c["max_length"],
                       progress=False)
            ev = evaluate_classification(net, tok, dev, max_length=c["max_length"])
            hist.append({"epoch": ep + 1, "train_loss": info["train_loss"], "dev_acc": ev["accuracy"],
                         "dev_f1": ev["macro_f1"]})
            print(f"{name:8s} epoch {ep + 1}: train loss {info['train_loss']:.3f}  dev acc {ev['accuracy']:.3f}  "
                  f"dev macro-F1 {ev['macro_f1']:.3f}", flush=True)
        rows.append({"config": name, **c, "trainable_params": info["trainable_params"], "history": hist,
                     "seconds": time.perf_counter() - t0})
        del net
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"command": " ".join(["python", "bench/study_probe.py"] + (argv or sys.argv[1:])),
           "commit": os.environ.get("LORAFUSE_COMMIT"), "date": time.strftime("%Y-%m-%d"),
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "train_examples": len(train), "dev_examples": len(dev), "seed": args.seed, "runs": rows}
    tmp = out / "probe.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, out / "probe.json")
    print(f"wrote {out / 'probe.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

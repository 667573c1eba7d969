"""Training single LoRA adapters (peft) and compositions (lorafuse) with the transformers Trainer.

Both go through one `fit()`, so every method of an experiment gets the same data order, seed
handling and budget; multi-GPU runs work through torchrun/accelerate as the Trainer does.

    info = train_adapter(model, tok, dsets["hop1"], "out/hop1", r=8, alpha=16, epochs=10, seed=0)
    lorafuse.compose(model, ["out/hop1", "out/hop2"], method="loramap", map_rank=8)
    info = train_composition(model, tok, dsets["two_hop_train"], epochs=10, seed=0)
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, Optional, Sequence

if TYPE_CHECKING:  # hints only: datasets and transformers are imported where used
    from datasets import Dataset
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase

import torch
import torch.nn as nn

from .adapters import TRAINED_WITH

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "labels")


def _encode_pairs(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], pairs: Sequence[str],
                  max_length: int) -> Dict[str, list]:
    """(claim, evidence) pairs cut to max_length tokens by the evidence's tail: the claim is what the
    label is about. A claim that alone leaves no room for the evidence is cut with it (longest first)."""
    room = max_length - tokenizer.num_special_tokens_to_add(pair=True)
    claim_len = [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
    groups = {"only_second": [i for i, n in enumerate(claim_len) if n < room],
              "longest_first": [i for i, n in enumerate(claim_len) if n >= room]}
    out: Dict[str, list] = {}
    for mode, rows in groups.items():
        if not rows:
            continue
        enc = tokenizer([texts[i] for i in rows], [pairs[i] for i in rows], truncation=mode, max_length=max_length)
        for key, values in enc.items():
            col = out.setdefault(key, [None] * len(texts))
            for i, v in zip(rows, values):
                col[i] = v
    return out


def tokenize(dataset: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int = 64,
             task: str = "classification") -> Dataset:
    """A datasets.Dataset of model inputs.

    classification: columns text, text_pair ("" = none), label -> input_ids, attention_mask, labels;
        over max_length a pair loses the end of text_pair (the evidence), never of text (the claim)
        unless the claim alone fills the window.
    lm: columns prompt, answer -> input_ids of prompt + answer + eos, labels = -100 on the prompt; over
        max_length, the prompt loses its start (down to half the window), then the answer its end.
    """
    if task == "classification":
        def enc(batch):
            pairs = batch.get("text_pair") or [""] * len(batch["text"])
            if any(pairs):
                out = _encode_pairs(tokenizer, batch["text"], [p or "" for p in pairs], max_length)
            else:
                out = tokenizer(batch["text"], truncation=True, max_length=max_length)
            out["labels"] = batch["label"]
            return out
    elif task == "lm":
        eos = tokenizer.eos_token or ""

        def enc(batch):
            ids, labels, masks = [], [], []
            for p, a in zip(batch["prompt"], batch["answer"]):
                pi = tokenizer(p, add_special_tokens=False)["input_ids"]
                ai = tokenizer(" " + a + eos, add_special_tokens=False)["input_ids"]
                if len(pi) + len(ai) > max_length:
                    # Keep the prompt's end (nearest the answer) and at least half the window for the answer.
                    keep = max(max_length - len(ai), max_length // 2)
                    pi = pi[len(pi) - min(len(pi), keep):]
                seq = (pi + ai)[:max_length]
                lab = ([-100] * len(pi) + ai)[:max_length]
                ids.append(seq)
                labels.append(lab)
                masks.append([1] * len(seq))
            return {"input_ids": ids, "attention_mask": masks, "labels": labels}
    else:
        raise ValueError(f"task must be 'classification' or 'lm', got {task!r}")
    import datasets

    datasets.disable_progress_bars()  # one bar per tiny map call is noise; training keeps its own bar
    return dataset.map(enc, batched=True, remove_columns=dataset.column_names)


def _collator(tokenizer, task: str):
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding

    if task == "lm":
        return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    return DataCollatorWithPadding(tokenizer)


def derived_seed(seed: int, *parts: Any) -> int:
    """A seed drawn from (seed, *parts), the same in every process (unlike hash() of a str)."""
    digest = hashlib.sha256(repr((int(seed),) + tuple(str(p) for p in parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


@contextlib.contextmanager
def seeded(seed: int, model: Optional[nn.Module] = None, tensors: Sequence[torch.Tensor] = ()) -> Iterator[None]:
    """Inside the block the global RNG of the CPU and of the CUDA devices that `model` or `tensors` live
    on starts from `seed`; after it, the state from before is back, on every device. For draws from the
    global RNG (peft's LoRA A, a LoraMap's a_map, DARE's masks): each then depends on its own seed, not
    on what ran before it. (torch.manual_seed would also reseed every other CUDA device, unrestored.)"""
    params = list(model.parameters()) if model is not None else []
    cuda = sorted({t.device.index or 0 for t in params + list(tensors) if t.is_cuda})
    with torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(seed)
        for d in cuda:
            with torch.cuda.device(d):
                torch.cuda.manual_seed(seed)
        yield


def is_main_process() -> bool:
    """False on every rank but 0 of a torch.distributed run (torchrun): only rank 0 writes files."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def fit(model: nn.Module, tokenizer: PreTrainedTokenizerBase, train_dataset: Dataset, epochs: float = 3.0,
        lr: float = 1e-3, batch_size: int = 16, seed: int = 0, max_length: int = 64, task: str = "classification",
        max_steps: int = -1, progress: bool = True, weight_decay: float = 0.0) -> Dict[str, Any]:
    """Train the parameters of `model` that require grad on `train_dataset` with a transformers Trainer.

    Returns {"train_loss", "train_seconds", "trainable_params", "steps"}.
    """
    from transformers import Trainer, TrainingArguments

    n_train = count_trainable(model)
    if n_train == 0:
        raise ValueError("the model has no trainable parameters (nothing requires grad)")
    if len(train_dataset) == 0:
        raise ValueError("train_dataset is empty: nothing to train on")
    data = tokenize(train_dataset, tokenizer, max_length, task)
    with tempfile.TemporaryDirectory(prefix="lorafuse-trainer-") as tmp:
        args = TrainingArguments(
            output_dir=tmp, num_train_epochs=epochs, max_steps=max_steps, learning_rate=lr,
            per_device_train_batch_size=batch_size, seed=seed, data_seed=seed, weight_decay=weight_decay,
            lr_scheduler_type="linear", warmup_steps=0, save_strategy="no", report_to=[],
            logging_strategy="no", disable_tqdm=not progress, remove_unused_columns=False,
            use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0)
        trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=_collator(tokenizer, task))
        if not progress:  # without its bar the Trainer prints the final metrics instead
            from transformers.trainer_callback import PrinterCallback

            trainer.remove_callback(PrinterCallback)
        t0 = time.perf_counter()
        out = trainer.train()
        seconds = time.perf_counter() - t0
    model.eval()
    return {"train_loss": float(out.training_loss), "train_seconds": seconds, "trainable_params": n_train,
            "steps": int(out.global_step)}


def train_adapter(model: nn.Module, tokenizer: PreTrainedTokenizerBase, train_dataset: Dataset, out_dir: str,
                  r: int = 8, alpha: float = 16, target_modules: Optional[Sequence[str]] = None, dropout: float = 0.0,
                  also_train: Sequence[nn.Module] = (), init_seed: Optional[int] = None,
                  record: Optional[Dict[str, Any]] = None, **fit_kw) -> Dict[str, Any]:
    """Train one peft LoRA on `train_dataset` and save it (peft format, atomically) to out_dir.

    The model is returned to its original state (LoRA layers removed, not merged), so the same base
    model serves every adapter of an experiment. `also_train`: modules of the model trained with the
    adapter but not saved with it (e.g. a task head, see `fresh_head`); their weights stay as trained.
    init_seed: the seed of the adapter's initial lora_A (default: derived from fit's `seed` and
    out_dir's folder name, so that adapters trained one after another do not start alike, and each
    is the same whatever ran before it). record: JSON-able facts saved beside the adapter as
    TRAINED_WITH (the CLI records model, seed and task: its classification heads are drawn from the
    seed). Under torchrun every rank trains; rank 0 saves. Returns fit()'s dict plus "path".
    """
    from peft import LoraConfig, get_peft_model

    from .models import lora_target_modules

    if r < 1:
        raise ValueError(f"r must be a positive int, got {r!r}")
    targets = list(target_modules) if target_modules else lora_target_modules(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=dropout, bias="none")
    if init_seed is None:
        init_seed = derived_seed(fit_kw.get("seed", 0), "lora-init", Path(out_dir).name)
    with seeded(init_seed, model):
        peft_model = get_peft_model(model, cfg)
    for m in also_train:
        m.requires_grad_(True)
    try:
        info = fit(peft_model, tokenizer, train_dataset, **fit_kw)
        if is_main_process():
            save_adapter(peft_model, out_dir, record)
        _barrier()  # the other ranks read the adapter only once it is there
    finally:
        peft_model.unload()
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, False))
    info["path"] = str(out_dir)
    return info




def save_adapter(peft_model: PeftModel, out_dir: str, record: Optional[Dict[str, Any]] = None) -> None:
    """peft's save_pretrained into a temporary folder beside out_dir, then one rename; record, if
    given, is written into the same folder as TRAINED_WITH."""
    from .export import write_dir_atomically

    def write(tmp: str) -> None:
        peft_model.save_pretrained(tmp)
        if record is not None:
            Path(tmp, TRAINED_WITH).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")

    write_dir_atomically(out_dir, write)


@contextlib.contextmanager
def fresh_head(model: nn.Module, seed: int) -> Iterator[nn.Module]:
    """Inside the block the classification head is redrawn from `seed` and trainable (a task probe that
    every method of a study gets alike); after it, the model's own head is back, frozen."""
    from .models import classification_head, init_head

    head = classification_head(model)
    saved = {k: v.detach().clone() for k, v in head.state_dict().items()}
    init_head(model, seed)
    head.requires_grad_(True)
    try:
        yield head
    finally:
        with torch.no_grad():
            head.load_state_dict(saved)
        head.requires_grad_(False)


def freeze_all(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def train_composition(model: nn.Module, tokenizer: PreTrainedTokenizerBase, train_dataset: Dataset,
                      **fit_kw) -> Dict[str, Any]:
    """Train what a lorafuse composition leaves trainable (LoraMap maps, concat factors, weights)."""
    return fit(model, tokenizer, train_dataset, **fit_kw)

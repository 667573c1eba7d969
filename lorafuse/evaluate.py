"""Metrics: accuracy and macro-F1 (scikit-learn) for classification, perplexity for language modelling."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Dict

if TYPE_CHECKING:  # hints only: datasets and transformers are imported where used
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

import torch
import torch.nn as nn

from .train import _collator, tokenize


def _batches(model: nn.Module, tokenizer, dataset, task: str, batch_size: int, max_length: int):
    data = tokenize(dataset, tokenizer, max_length, task)
    collate = _collator(tokenizer, task)
    device = next(model.parameters()).device
    for i in range(0, len(data), batch_size):
        batch = collate([data[j] for j in range(i, min(i + batch_size, len(data)))])
        yield {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def evaluate_classification(model: nn.Module, tokenizer: PreTrainedTokenizerBase, dataset: Dataset,
                            batch_size: int = 64, max_length: int = 64) -> Dict[str, float]:
    """{"accuracy", "macro_f1", "n"} of the model's argmax predictions on a classification dataset."""
    from sklearn.metrics import accuracy_score, f1_score

    if len(dataset) == 0:
        raise ValueError("dataset is empty")
    was = model.training
    model.eval()
    preds, labels = [], []
    n_classes = 0
    for batch in _batches(model, tokenizer, dataset, "classification", batch_size, max_length):
        y = batch.pop("labels")
        logits = model(**batch).logits
        n_classes = logits.shape[-1]
        preds += logits.argmax(-1).tolist()
        labels += y.tolist()
    model.train(was)
    # Macro-F1 over every class the model has, not only those present: a set holding one class
    # predicted right scores 1/n_classes (as it would with the absent class counted at F1 0), not 1.
    return {"accuracy": float(accuracy_score(labels, preds)),
            "macro_f1": float(f1_score(labels, preds, labels=list(range(n_classes)), average="macro",
                                       zero_division=0)), "n": len(labels)}


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer: PreTrainedTokenizerBase, dataset: Dataset, batch_size: int = 8,
               max_length: int = 256) -> Dict[str, float]:
    """{"perplexity", "nll", "tokens"} over the answer tokens of an lm dataset (columns prompt, answer)."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in _batches(model, tokenizer, dataset, "lm", batch_size, max_length):
        labels = batch.pop("labels")
        logits = model(**batch).logits[:, :-1].float()
        target = labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                ignore_index=-100, reduction="sum")
        total += float(nll)
        count += int((target != -100).sum())
    model.train(was)
    if count == 0:
        raise ValueError("no answer tokens to score")
    return {"perplexity": math.exp(total / count), "nll": total / count, "tokens": count}

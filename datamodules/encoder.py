"""Running a frozen transformers model: loading (once per process), pooling, and in-memory extraction.

`StateEncoder` turns a few texts (a client's queries) into exactly the states `extract()` stores for the same
model, pooling, layer and max_length; `loaded_model` keeps the last `LOADED_MODELS` models loaded, so extractions
in one process share each model's one load; `pool`/`pooled_states` are the pooling of every extraction.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from datamodules.assets import resolve_model
from datamodules.models import check_layer, check_options, model_defaults

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool (B, T, D) states to (B, D) using the attention mask (either padding side)."""
    mask = attention_mask.to(hidden.dtype)
    if pooling == "mean":
        return (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
    positions = torch.arange(hidden.shape[1], device=hidden.device).expand_as(attention_mask)
    masked = torch.where(attention_mask.bool(), positions, -1 if pooling == "last" else hidden.shape[1])
    index = masked.max(1).values if pooling == "last" else masked.min(1).values
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index.clamp(0, hidden.shape[1] - 1)]


def pooled_states(encoder, input_ids: torch.Tensor, attention_mask: torch.Tensor, layer: int,
                  pooling: str) -> torch.Tensor:
    """One forward pass → pooled float32 states of `layer` (-1: the final, normed layer)."""
    final = layer in (-1, encoder.config.get_text_config().num_hidden_layers)
    out = encoder(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=not final)
    hidden = out.last_hidden_state if final else out.hidden_states[layer]
    return pool(hidden, attention_mask, pooling).float()


def load_frozen_model(model_path: str, dtype: str):
    """The bare transformers model in eval mode, without gradients."""
    from transformers import AutoModel

    return AutoModel.from_pretrained(model_path, dtype=DTYPES[dtype]).eval().requires_grad_(False)


LOADED_MODELS = 2  # evaluate and evaluate_ood alternate a source and a target model
_loaded: OrderedDict[tuple[str, str, str, str], tuple[Any, Any]] = OrderedDict()


def loaded_model(key: tuple[str, str, str, str]) -> tuple[Any, Any]:
    """(tokenizer, frozen model) for key = (model path, model identity, dtype, device), loaded once
    per process and kept for the `LOADED_MODELS` most recently used keys. The identity (a digest of
    the weights) makes a folder rewritten in place load again."""
    if key in _loaded:
        _loaded.move_to_end(key)
        tokenizer, encoder = _loaded[key]
        return tokenizer, encoder.eval()
    while len(_loaded) >= LOADED_MODELS:
        _loaded.popitem(last=False)  # free the oldest before loading the next
    entry = load_tokenizer(key[0]), load_frozen_model(key[0], key[2])
    _loaded[key] = entry
    return entry


def loaded_model_keys() -> list[tuple[str, str, str, str]]:
    """The keys `loaded_model` keeps, oldest first."""
    return list(_loaded)


def clear_loaded_models() -> None:
    """Drop every model `loaded_model` keeps (frees their memory)."""
    _loaded.clear()


def load_tokenizer(model_path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:  # GPT-2/Llama-style tokenizers ship without one
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


class StateEncoder:
    """In-memory extraction for a few texts (a client's queries), no cache and no Trainer.

    Produces exactly what `extract()` stores for the same model, pooling, layer and max_length.
    """

    def __init__(self, model: str, pooling: str | None = None, layer: int = -1, max_length: int | None = None,
                 dtype: str = "float32", batch_size: int = 16, threads: int | None = None):
        from transformers import AutoConfig

        check_options(pooling, max_length, dtype, batch_size)
        if threads:
            torch.set_num_threads(threads)
        self.model_path = resolve_model(model)
        config = AutoConfig.from_pretrained(self.model_path)
        check_layer(layer, config.get_text_config().num_hidden_layers)
        defaults = model_defaults(self.model_path, config)
        self.pooling = pooling or defaults.pooling
        self.layer, self.max_length, self.batch_size = layer, max_length or defaults.max_length, batch_size
        self.tokenizer = load_tokenizer(self.model_path)
        self.encoder = load_frozen_model(self.model_path, dtype)
        self.hidden_size = config.get_text_config().hidden_size

    @torch.inference_mode()
    def __call__(self, texts: list[str]) -> np.ndarray:
        if isinstance(texts, str):
            texts = [texts]
        out = np.zeros((len(texts), self.hidden_size), np.float32)
        order = sorted(range(len(texts)), key=lambda i: (-len(texts[i]), i))
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            enc = self.tokenizer([texts[i] for i in rows], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
            out[rows] = pooled_states(self.encoder, enc["input_ids"], enc["attention_mask"], self.layer,
                                      self.pooling).numpy()
        return out

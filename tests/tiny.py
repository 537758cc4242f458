"""Tiny random models, a word-level tokenizer and tiny labelled CSVs, built in seconds from configs (no download).
Tests import them from here; `tests/conftest.py` turns them into fixtures."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ("the a an of to and in is was it for on with as by at from this that film movie good bad "
         "great awful news sport market team game win lose money bank happy sad love hate plot "
         "story actor music dull bright fast slow red blue cat dog").split()


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["[PAD]", "[UNK]", "[BOS]", "[EOS]", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   bos_token="[BOS]", eos_token="[EOS]")


def build_tiny_model(kind: str, path: Path, seed: int = 0, hidden: int = 32) -> Path:
    """A 2-layer random model of the given family, saved with a word-level tokenizer."""
    from transformers import (BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                              LlamaForCausalLM)

    torch.manual_seed(seed)
    tokenizer = make_tokenizer()
    vocab = len(tokenizer)
    if kind == "bert":
        model = BertModel(BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64, pad_token_id=0))
    elif kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=2,
                                             num_attention_heads=2, num_key_value_heads=2,
                                             intermediate_size=64, pad_token_id=0, bos_token_id=2,
                                             eos_token_id=3))
    elif kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=2, n_head=2,
                                           n_positions=128, bos_token_id=2, eos_token_id=3))
    else:
        raise ValueError(kind)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_tiny_csv(path: Path, n: int = 60, seed: int = 0, n_classes: int = 3) -> Path:
    import random

    rng = random.Random(seed)
    lines = ["text,label"]
    for i in range(n):
        label = i % n_classes
        words = [WORDS[(label * 7 + rng.randrange(12)) % len(WORDS)] for _ in range(rng.randrange(2, 15))]
        lines.append(f"\"{' '.join(words)} {i}\",c{label}")
    path.write_text("\n".join(lines) + "\n")
    return path

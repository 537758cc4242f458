"""Shared fixtures: an isolated XSILO_HOME, tiny random HF models built from configs, tiny datasets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REAL_XSILO_HOME = os.environ.get("XSILO_HOME", str(Path.home() / ".cache" / "xsilo"))
WORDS = ("the a an of to and in is was it for on with as by at from this that film movie good bad "
         "great awful news sport market team game win lose money bank happy sad love hate plot "
         "story actor music dull bright fast slow red blue cat dog").split()


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    """Each unit test gets an empty XSILO_HOME; integration tests opt in with `real_home`."""
    home = tmp_path / "xsilo-home"
    monkeypatch.setenv("XSILO_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    return home


@pytest.fixture
def no_leftover_process_group():
    """DDP tests: never leak a process group into the next test (Lightning #21308)."""
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.fixture
def real_home(monkeypatch):
    monkeypatch.setenv("XSILO_HOME", REAL_XSILO_HOME)
    return Path(REAL_XSILO_HOME)


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


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {kind: build_tiny_model(kind, root / kind, seed=i) for i, kind in enumerate(("bert", "llama", "gpt2"))}


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


@pytest.fixture
def tiny_csv(tmp_path) -> Path:
    return write_tiny_csv(tmp_path / "tiny.csv")

"""Synthetic texts of a domain, written by a causal LM from short prompts: a few words on what each class of a head
looks like ("questions that ask for a place"), crossed with topics for variety. No text of anyone's task goes in,
so the texts are public: both parties can extract them. The provider's class names are already public (a client must
know what the labels mean), so the provider can write a head's synthetic set without any input from a client.

The texts are written once per settings and model, atomically, to $XSILO_HOME/synthetic/<key>.jsonl, one
`{"text": ...}` per line, and read from there as an ordinary data file."""

from __future__ import annotations

import hashlib
import json
import random
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from datamodules.assets import resolve_model
from datamodules.cache import atomic_write_bytes
from datamodules.models import model_identity
from datamodules.registry import AssetError, xsilo_home

TOPICS = ("history", "geography", "science", "sports", "music", "movies", "food", "animals", "politics",
          "literature", "technology", "medicine", "space", "art", "business", "religion", "language", "cars",
          "weather", "television", "famous people", "inventions", "the human body", "money", "war", "plants")
LIST_MARK = re.compile(r"^\s*(\d+[.):]|[-*•]|Q\d*[.):])\s*")
WRITER_VERSION = 2  # part of every set's key: bump it when the prompting or `kept_lines` changes what is written


FIELD_KINDS = {"tuple[str, ...]": (tuple, "a list of texts"), "int": (int, "a whole number"),
               "float": ((int, float), "a number"), "str": (str, "a text")}


class SyntheticTextError(AssetError):
    """Settings that cannot write a synthetic set; the message names the setting and the fix."""


@dataclass(frozen=True)
class SyntheticTextSettings:
    """How a synthetic set is written.

    Attributes:
        prompts: instructions to the LM, each with a `{topic}` field, e.g. "Write ten short questions about
            {topic} that each ask for a place, one per line." One per class spreads the set over the classes.
        topics: what `{topic}` takes, drawn at random per prompt.
        rows: distinct texts to keep.
        model: the writing LM (registry name, folder or hub id); an instruction-tuned one follows prompts.
        suffix: keep only lines that end with it ("?" for questions; "" keeps every line).
        min_chars, max_chars: keep only lines of this length, after list marks and quotes are stripped.
        max_new_tokens, temperature, top_p: sampling.
        batch_size: prompts per generate call.
        max_batches: give up (an error) after this many calls without `rows` texts.
        seed: the prompt draw and the sampling.
    """

    prompts: tuple[str, ...]
    topics: tuple[str, ...] = TOPICS
    rows: int = 256
    model: str = "smollm2"
    suffix: str = ""
    min_chars: int = 10
    max_chars: int = 120
    max_new_tokens: int = 200
    temperature: float = 0.9
    top_p: float = 0.95
    batch_size: int = 16
    max_batches: int = 200
    seed: int = 0

    def validate(self) -> None:
        for name, field in self.__dataclass_fields__.items():  # a YAML file's values arrive untyped
            value, kind = getattr(self, name), FIELD_KINDS[field.type]
            if isinstance(value, bool) or not isinstance(value, kind[0]) or (
                    kind[0] is tuple and not all(isinstance(v, str) for v in value)):
                raise SyntheticTextError(f"synthetic.{name} must be {kind[1]}, got {value!r}")
        if not self.prompts or not all(_formats(p) for p in self.prompts):
            raise SyntheticTextError("synthetic.prompts must be one or more instructions, each with a {topic} field "
                                     f"and no other {{...}} field; got {list(self.prompts)}")
        if not self.topics or any(not t.strip() for t in self.topics):
            raise SyntheticTextError("synthetic.topics must be one or more non-empty topics")
        if not 1 <= self.rows <= 100_000:
            raise SyntheticTextError(f"synthetic.rows must be in [1, 100000], got {self.rows}")
        if not 1 <= self.min_chars <= self.max_chars:
            raise SyntheticTextError(f"synthetic.min_chars ({self.min_chars}) must be >= 1 and <= max_chars "
                                     f"({self.max_chars})")
        if not (0 < self.temperature <= 5 and 0 < self.top_p <= 1):
            raise SyntheticTextError(f"synthetic.temperature must be in (0, 5] and top_p in (0, 1], got "
                                     f"{self.temperature} and {self.top_p}")
        for name in ("max_new_tokens", "batch_size", "max_batches"):
            if getattr(self, name) < 1:
                raise SyntheticTextError(f"synthetic.{name} must be >= 1, got {getattr(self, name)}")


def _formats(prompt: str) -> bool:
    """Whether a prompt fills with a topic: it has a {topic} field and no other."""
    try:
        return "{topic}" in prompt and prompt.format(topic="x") is not None
    except (KeyError, IndexError, ValueError):
        return False


def load_settings(path: str | Path) -> SyntheticTextSettings:
    """The settings in a `public-set synthesize` config (configs/synthetic/*.yaml: the fields of
    `SyntheticTextSettings` under `synthetic:`), validated."""
    import yaml

    try:
        raw = (yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}).get("synthetic")
    except (OSError, yaml.YAMLError, AttributeError) as e:
        raise SyntheticTextError(f"cannot read synthetic settings from {str(path)!r}: {e}") from None
    known = set(SyntheticTextSettings.__dataclass_fields__)
    if not isinstance(raw, dict) or set(raw) - known:
        extra = sorted(set(raw) - known) if isinstance(raw, dict) else type(raw).__name__
        raise SyntheticTextError(f"{str(path)!r} must hold a `synthetic:` section of the settings {sorted(known)}; "
                                 f"unknown: {extra}")
    lists = {k: tuple(raw[k]) for k in ("prompts", "topics") if isinstance(raw.get(k), list)}
    try:
        settings = SyntheticTextSettings(**{**raw, **lists})
    except TypeError as e:
        raise SyntheticTextError(f"{str(path)!r}: {e}") from None
    settings.validate()
    return settings


def kept_lines(reply: str, settings: SyntheticTextSettings) -> list[str]:
    """The texts in one reply: its lines, list marks and quotes stripped, filtered by suffix and length."""
    out = []
    for line in reply.split("\n"):
        text = LIST_MARK.sub("", line).strip().strip('"').strip()
        if text.endswith(settings.suffix) and settings.min_chars <= len(text) <= settings.max_chars:
            out.append(text)
    return out


def synthetic_path(settings: SyntheticTextSettings) -> Path:
    """Where the set of these settings is written: keyed by every setting and the writing model's identity."""
    settings.validate()
    key = {**asdict(settings), "model": model_identity(resolve_model(settings.model)), "writer": WRITER_VERSION}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return xsilo_home() / "synthetic" / f"{digest}.jsonl"


def synthesize(settings: SyntheticTextSettings, threads: int | None = None) -> Path:
    """The synthetic set's jsonl file: written on first use, found afterwards (no model is loaded)."""
    path = synthetic_path(settings)
    if path.is_file():
        return path
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if threads:
        torch.set_num_threads(threads)
    print(f"writing {settings.rows} synthetic texts with {settings.model} into {path} (once; can take minutes) ...",
          file=sys.stderr, flush=True)
    folder = resolve_model(settings.model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    rng = random.Random(settings.seed)
    torch.manual_seed(settings.seed)
    texts: dict[str, None] = {}
    for batch in range(1, settings.max_batches + 1):
        prompts = [rng.choice(settings.prompts).format(topic=rng.choice(settings.topics))
                   for _ in range(settings.batch_size)]
        if tokenizer.chat_template:
            prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                     add_generation_prompt=True) for p in prompts]
        enc = tokenizer(prompts, return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=settings.max_new_tokens, do_sample=True,
                                 temperature=settings.temperature, top_p=settings.top_p,
                                 pad_token_id=tokenizer.pad_token_id)
        for row in out[:, enc["input_ids"].shape[1]:]:
            texts.update(dict.fromkeys(kept_lines(tokenizer.decode(row, skip_special_tokens=True), settings)))
        if len(texts) >= settings.rows:
            break
        if batch % 10 == 0:
            print(f"  {len(texts)} of {settings.rows} texts after {batch} batches", file=sys.stderr, flush=True)
    else:
        raise SyntheticTextError(f"{settings.model} wrote {len(texts)} usable texts of the {settings.rows} asked in "
                                 f"{settings.max_batches} batches; loosen synthetic.suffix or the length bounds, "
                                 "raise max_batches, or ask for fewer rows")
    body = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in list(texts)[:settings.rows])
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, body.encode())
    return path

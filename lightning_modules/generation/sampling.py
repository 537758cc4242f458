"""Cross-model generation: one LM reads, an affine map translates its final state, another LM's head writes.

The source LM reads the prompt; its last final hidden state is mapped into the target's state
space and the target's LM head picks the next token. That token's text is appended and the
source reads on (reusing its KV cache whenever its re-tokenisation only appends tokens).

`generate` / `stream_generate` run the loop (greedy or temperature / top-k / top-p sampling, stop strings,
max_new_tokens, streamed text pieces); with no source they run the target alone. The map is fitted, saved and
loaded by `generation.maps`; `generation.run` evaluates a pair and drives `xsilo generate`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Generator, Sequence

import torch
from torch import Tensor

from datamodules.registry import AssetError
from datamodules.tokens import CausalLM
from lightning_modules.fitting.affine_map import AffineMap
from serve.formats.folders import ExportError

_DECODE_CONTEXT = 8  # target tokens decoded before a new one, so its text carries the right spacing


class GenerationError(AssetError):
    """Bad generation input (prompt, lengths, sampling, map vs models); the message names the fix."""


def check_map(amap: AffineMap, source: CausalLM, target: CausalLM, where: str = "the map") -> None:
    if (amap.d_x, amap.d_y) != (source.hidden_size, target.hidden_size):
        raise ExportError(
            f"{where} maps {amap.d_x}-d states to {amap.d_y}-d ones, but {source.name!r} has {source.hidden_size}-d "
            f"and {target.name!r} {target.hidden_size}-d final states; fit a map for this pair with "
            f"`xsilo evaluate_generation --source {source.name} --target {target.name} --out DIR`")


@dataclass
class Sampling:
    """temperature 0 is greedy; otherwise sample (seeded) from the top-k / top-p truncated softmax."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0

    def validate(self) -> None:
        if self.temperature < 0 or not math.isfinite(self.temperature):
            raise GenerationError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise GenerationError(f"top_k must be >= 1 or unset, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1] or unset, got {self.top_p}")

    def warpers(self):
        """transformers' temperature, top-k and top-p logits warpers, in that order (temperature > 0)."""
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        warpers = LogitsProcessorList([TemperatureLogitsWarper(self.temperature)])
        if self.top_k is not None:
            warpers.append(TopKLogitsWarper(self.top_k))
        if self.top_p is not None and self.top_p < 1:
            warpers.append(TopPLogitsWarper(self.top_p))
        return warpers


def pick_token(logits: Tensor, allowed: Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """The next token: the best allowed one (temperature 0), else a seeded draw from the warped softmax."""
    logits = logits.float().masked_fill(~allowed, float("-inf"))
    if sampling.temperature == 0:
        return int(logits.argmax())
    scores = sampling.warpers()(None, logits[None])[0]
    return int(torch.multinomial(scores.softmax(0), 1, generator=generator))


def check_request(prompt: str, max_new_tokens: int, sampling: Sampling) -> None:
    if not isinstance(prompt, str) or not prompt.strip():
        raise GenerationError("the prompt is empty; pass some text to continue")
    if max_new_tokens <= 0:
        raise GenerationError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    sampling.validate()


class Detokenizer:
    """Text of each new target token, decoded after a few previous ones so spacing is right."""

    def __init__(self, lm: CausalLM, prompt: str):
        self.tokenizer = lm.tokenizer
        self.context = self.tokenizer(prompt, add_special_tokens=False)["input_ids"][-_DECODE_CONTEXT:]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def piece(self, token: int) -> str:
        before, after = self._decode(self.context), self._decode(self.context + [token])
        self.context = (self.context + [token])[-_DECODE_CONTEXT:]
        return after[len(before):] if after.startswith(before) else self._decode([token])


class StopText:
    """Generated text cut at the first stop string; `push` returns what is safe to show, holding
    back a tail that could begin a stop string."""

    def __init__(self, stops: Sequence[str]):
        if any(not s for s in stops):
            raise GenerationError("stop strings must be non-empty")
        self.stops, self.text, self.emitted, self.stopped = list(stops), "", 0, False

    def push(self, piece: str) -> str:
        start = max(0, len(self.text) - max((len(s) for s in self.stops), default=0))
        self.text += piece
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[:min(hits)], True
            return self.flush()
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        return self._emit_to(len(self.text) - hold)

    def flush(self) -> str:
        return self._emit_to(len(self.text))

    def _emit_to(self, end: int) -> str:
        out, self.emitted = self.text[self.emitted:end], max(self.emitted, end)
        return out


class Reader:
    """A model reading a growing text with its KV cache; `state` is the last final hidden state."""

    def __init__(self, lm: CausalLM, text: str, reuse_cache: bool = True):
        self.lm, self.reuse_cache = lm, reuse_cache
        self.ids: list[int] = []
        self.cache = None
        self.reused = self.recomputed = 0
        self._read(lm.encode(text))

    def _read(self, ids: list[int]) -> None:
        extends = len(ids) > len(self.ids) and ids[:len(self.ids)] == self.ids
        if self.cache is not None and self.reuse_cache and extends:
            new, self.reused = ids[len(self.ids):], self.reused + 1
        else:
            self.recomputed += self.cache is not None
            new, self.cache = ids, None
        hidden, self.cache = self.lm.states(torch.tensor([new]), cache=self.cache)
        self.ids, self.state = list(ids), hidden[0, -1]

    def read_text(self, text: str) -> None:
        ids = self.lm.encode(text)
        if ids != self.ids:  # else the same input: the same state
            self._read(ids)

    def read_token(self, token: int) -> None:
        self._read(self.ids + [token])


@dataclass
class GenerationResult:
    prompt: str
    text: str
    token_ids: list[int]  # the target's tokens
    stop_reason: str  # max_new_tokens, stop_string or eos
    seconds: float
    cache_reused: int = 0
    recomputed: int = 0

    @property
    def tokens_per_second(self) -> float:
        return len(self.token_ids) / self.seconds if self.seconds > 0 else float("nan")


def stream_generate(target: CausalLM, prompt: str, *, source: CausalLM | None = None, amap: AffineMap | None = None,
                    max_new_tokens: int = 32, stop: Sequence[str] = (), sampling: Sampling | None = None,
                    reuse_cache: bool = True) -> Generator[str, None, GenerationResult]:
    """Yield the generated text piece by piece; the generator's return value is the `GenerationResult`.

    With `source` and `amap`, the source reads and the target's head writes; with neither, the
    target generates on its own (the reference its hybrid output is compared with).
    """
    sampling = sampling or Sampling()
    check_request(prompt, max_new_tokens, sampling)
    if (source is None) != (amap is None):
        raise GenerationError("pass both a source model and a map (or neither, for the target alone)")
    if amap is not None:
        check_map(amap, source, target)
        amap = amap.to(torch.float32)
    allowed, eos = target.text_token_mask, target.eos_ids  # computed once per model, not timed
    t0 = time.perf_counter()
    reader = Reader(source or target, prompt, reuse_cache)
    detok, text = Detokenizer(target, prompt), StopText(stop or ())
    generator = torch.Generator().manual_seed(sampling.seed)
    tokens: list[int] = []
    reason = "max_new_tokens"
    while len(tokens) < max_new_tokens:
        state = reader.state if amap is None else amap(reader.state[None])[0]
        token = pick_token(target.logits(state), allowed, sampling, generator)
        if token in eos:
            reason = "eos"
            break
        tokens.append(token)
        piece = text.push(detok.piece(token))
        if piece:
            yield piece
        if text.stopped:
            reason = "stop_string"
            break
        if len(tokens) == max_new_tokens:
            break
        if source is None:
            reader.read_token(token)
        else:
            reader.read_text(prompt + text.text)
    if tail := text.flush():
        yield tail
    return GenerationResult(prompt, text.text, tokens, reason, time.perf_counter() - t0,
                            reader.reused, reader.recomputed)


def generate(target: CausalLM, prompt: str, *, on_text: Callable[[str], None] | None = None,
             **kwargs: Any) -> GenerationResult:
    """Run `stream_generate` to the end, passing each text piece to `on_text`."""
    stream = stream_generate(target, prompt, **kwargs)
    while True:
        try:
            piece = next(stream)
        except StopIteration as done:
            return done.value
        if on_text is not None:
            on_text(piece)

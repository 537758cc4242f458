"""Cross-model generation: one LM reads, an affine map translates its final state, another LM's head writes.

The source LM reads the prompt; its last final hidden state is mapped into the target's state
space and the target's LM head picks the next token. That token's text is appended and the
source reads on (reusing its KV cache whenever its re-tokenisation only appends tokens).

* `fit_generation_map` fits the map on paired per-position states (`lightning_modules.paired_stats`) with
  the aligner's estimators; `save_generation_map` / `load_generation_map` store it as a map
  folder (`AffineAligner.save_pretrained` / `from_pretrained`: config.json + model.safetensors).
* `generate` / `stream_generate` run the loop (greedy or temperature / top-k / top-p sampling,
  stop strings, max_new_tokens, streamed text pieces); with no source they run the target alone.
* `evaluate_generation` reports next-token agreement (top-1, top-5, KL) on held-out texts'
  paired positions, and the target's perplexity of generated text and tokens/s, beside the
  identity (target on its own states) and a null map (fitted on shuffled pairs), with the
  tokenizers' exact-token-match rate; `paper_prediction` says whether the pair falls where the
  paper predicts, `compare_generation` how agreement moves between two fits (e.g. 2,000 vs 4,000 texts).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Generator, Sequence

import torch
from torch import Tensor

from datamodules.assets import AssetError
from datamodules.cache import atomic_write_bytes, atomic_write_json
from datamodules.tokens import CausalLM, load_causal_lm, paired_batches, split_texts, tokenizer_compatibility
from lightning_modules.aligner import AffineAligner
from lightning_modules.export import MAP_CONFIG, MANIFEST, ExportError
from lightning_modules.paired_stats import PairedStats, paired_stats
from lightning_modules.settings import GENERATION_PUBLIC, DeviceSettings, FitSettings, PublicSetSettings, seed_all
from lightning_modules.solvers import DEFAULT_LAMBDAS, AffineMap, fit_affine, solve

MAP_DIR = "map"  # the map folder under `xsilo evaluate_generation --out DIR`
# The paper's generation findings (PAPER_NOTES.md): every source under 4B parameters fails, and pairs
# that work have an exact-token-match rate >= 0.67.
PAPER_MIN_SOURCE_PARAMETERS = 4_000_000_000
PAPER_MIN_EXACT_MATCH = 0.67
# The paper judges generated text; ours "works" when the mapped state picks the target's own next token
# on at least half of the held-out positions AND the target finds the mapped greedy text at most twice
# as perplexing as its own greedy text (teacher-forced agreement alone misses degenerate free-running text).
WORKS_TOP1 = 0.5
WORKS_PERPLEXITY_RATIO = 2.0
_DECODE_CONTEXT = 8  # target tokens decoded before a new one, so its text carries the right spacing


class GenerationError(AssetError):
    """Bad generation input (prompt, lengths, sampling, map vs models); the message names the fix."""


# --- the map ----------------------------------------------------------------------------

@dataclass(eq=False)
class FittedGenerationMap:
    amap: AffineMap
    null: AffineMap  # the same estimator on shuffled pairs
    lam: float | None
    val_mses: list[float] | None = None


def fit_generation_map(stats: PairedStats, estimator: str = "ridge", lambdas: Sequence[float] = DEFAULT_LAMBDAS,
                       center: bool = True, standardize: bool = False) -> FittedGenerationMap:
    """Ridge picks λ by validation MSE on held-out texts' positions (`solvers.solve`, criterion val_mse: the
    positions of one text are correlated, so GCV's row-wise view would be optimistic); other estimators fit
    train only."""
    if stats.train.count < 2:
        raise GenerationError(f"only {stats.train.count} paired positions to fit on; use more texts or check "
                              "that the two tokenizers share token boundaries (tokenizer_compatibility)")
    if estimator == "ridge":
        if stats.val.count == 0:
            raise GenerationError("ridge needs held-out texts to choose λ; set val_fraction > 0")
        amap, lam, path = solve(stats.train, stats.val, "ridge", lambdas, center, standardize, criterion="val_mse")
        null = fit_affine(stats.null, "ridge", lam=lam, center=center, standardize=standardize)
        return FittedGenerationMap(amap.to(torch.float32), null.to(torch.float32), lam, path.scores["val_mse"])
    amap = fit_affine(stats.train, estimator, center=center, standardize=standardize)
    null = fit_affine(stats.null, estimator, center=center, standardize=standardize)
    return FittedGenerationMap(amap.to(torch.float32), null.to(torch.float32), None)


def check_map(amap: AffineMap, source: CausalLM, target: CausalLM, where: str = "the map") -> None:
    if (amap.d_x, amap.d_y) != (source.hidden_size, target.hidden_size):
        raise ExportError(
            f"{where} maps {amap.d_x}-d states to {amap.d_y}-d ones, but {source.name!r} has {source.hidden_size}-d "
            f"and {target.name!r} {target.hidden_size}-d final states; fit a map for this pair with "
            f"`xsilo evaluate_generation --source {source.name} --target {target.name} --out DIR`")


def save_generation_map(out: str | Path, amap: AffineMap, source: CausalLM, target: CausalLM, max_length: int, *,
                        estimator: str = "ridge", lambdas: Sequence[float] = DEFAULT_LAMBDAS,
                        chosen_lambda: float | None = None, center: bool = True, standardize: bool = False,
                        metrics: dict[str, Any] | None = None) -> Path:
    """Save the map as a map folder (`AffineAligner.save_pretrained`), with both models' specs."""
    aligner = AffineAligner(amap.d_x, amap.d_y, estimator=estimator, lambdas=lambdas, center=center,
                            standardize=standardize)
    aligner.load_map(amap)
    if chosen_lambda is not None:
        aligner.chosen_lambda.fill_(chosen_lambda)
    spec = lambda lm: {**lm.spec(), "max_length": max_length, "pooling": "per-position"}  # noqa: E731
    aligner.source_spec, aligner.target_spec = spec(source), spec(target)
    return aligner.save_pretrained(out, metrics=metrics)


def load_generation_map(directory: str | Path, source: CausalLM, target: CausalLM) -> AffineMap:
    """The map of a map folder (DIR, DIR/map or a hub id), checked against both models."""
    directory = Path(directory)
    if (directory / MAP_DIR / MAP_CONFIG).is_file():
        directory = directory / MAP_DIR
    elif (directory / "export" / MANIFEST).is_file() and not (directory / MAP_CONFIG).is_file():
        raise ExportError(f"{directory / 'export'} is a generation map saved by an older xsilo as an export with an "
                          f"identity head; re-run `xsilo evaluate_generation --out {directory}` to save it as a map "
                          "folder")
    aligner = AffineAligner.from_pretrained(directory)
    for role, lm, spec in (("source", source, aligner.source_spec), ("target", target, aligner.target_spec)):
        recorded = spec.get("model_identity")
        if recorded and lm.identity and recorded != lm.identity:
            raise ExportError(f"the map in {directory} was fitted for {role} {spec.get('model')!r}, not {lm.name!r} "
                              f"(model identities differ); fit one with "
                              f"`xsilo evaluate_generation --source {source.name} --target {target.name}`")
    amap = aligner.affine_map
    check_map(amap, source, target, f"the map in {directory}")
    return amap


# --- sampling and text ------------------------------------------------------------------

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


# --- evaluation -------------------------------------------------------------------------

@dataclass
class GenerationEvalConfig:
    """Fit source→target on a public set's paired positions and evaluate on its held-out texts."""

    source: str
    target: str
    # a dataset, or a mix such as movie-dialog:0.8,bbc:0.2 (of limit rows)
    public: PublicSetSettings = GENERATION_PUBLIC
    max_length: int = 64
    fit: FitSettings = field(default_factory=FitSettings)
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    eval_texts: int | None = 100  # held-out texts scored for next-token agreement
    prompts: list[str] | None = None  # default: the first words of held-out texts
    n_prompts: int = 4
    prompt_words: int = 4
    max_new_tokens: int = 20
    seed: int = 0
    batch_size: int = 16
    dtype: str = "float32"  # the forward pass's dtype unless device.precision names one
    device: DeviceSettings = field(default_factory=DeviceSettings)
    baseline: str | None = None  # an earlier run's metrics.json (or its folder) to compare agreement with


@dataclass
class Agreement:
    """Running next-token agreement of one map with the target's own predictions."""

    positions: int = 0
    top1: int = 0
    top5: int = 0
    kl_sum: float = 0.0

    def add(self, target_logp: Tensor, logp: Tensor) -> None:
        best = target_logp.argmax(1)
        self.positions += best.shape[0]
        self.top1 += int((logp.argmax(1) == best).sum())
        self.top5 += int((logp.topk(5, dim=1).indices == best[:, None]).any(1).sum())
        self.kl_sum += float((target_logp.exp() * (target_logp - logp)).sum())

    def as_dict(self) -> dict[str, float]:
        n = max(self.positions, 1)
        return {"positions": self.positions, "top1": self.top1 / n, "top5": self.top5 / n, "kl": self.kl_sum / n}


def next_token_agreement(source: CausalLM, target: CausalLM, maps: dict[str, AffineMap | None],
                         texts: Sequence[str], max_length: int, batch_size: int = 16, chunk: int = 64
                         ) -> dict[str, dict[str, float]]:
    """Top-1/top-5 agreement and KL(target ‖ mapped) at held-out paired positions; None is the identity."""
    scores = {name: Agreement() for name in maps}
    for batch in paired_batches(source, target, texts, max_length, batch_size):
        for s in range(0, batch.x.shape[0], chunk):
            x, y = batch.x[s:s + chunk], batch.y[s:s + chunk]
            target_logp = target.logits(y).log_softmax(1)
            for name, amap in maps.items():
                logp = target_logp if amap is None else target.logits(amap(x)).log_softmax(1)
                scores[name].add(target_logp, logp)
    return {name: agg.as_dict() for name, agg in scores.items()}


@torch.inference_mode()
def continuation_nll(lm: CausalLM, prompt: str, continuation: str) -> tuple[float, int]:
    """(summed negative log-likelihood, token count) of `continuation`'s tokens after `prompt` under `lm`."""
    enc = lm.tokenizer(prompt + continuation, add_special_tokens=True, return_offsets_mapping=True,
                       return_special_tokens_mask=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    scored = [t for t in range(1, len(ids))
              if offsets[t][1] > len(prompt) and not enc["special_tokens_mask"][t]]
    if not continuation or not scored:
        return 0.0, 0
    hidden, _ = lm.states(torch.tensor([ids]))
    logp = lm.logits(hidden[0, [t - 1 for t in scored]]).log_softmax(1)
    return -float(logp[torch.arange(len(scored)), torch.tensor([ids[t] for t in scored])].sum()), len(scored)


def default_prompts(texts: Sequence[str], n: int, words: int) -> list[str]:
    """The first `words` words of the first `n` texts that have more."""
    picked = [" ".join(t.split()[:words]) for t in texts if len(t.split()) > words + 1]
    return picked[:n]


def generation_quality(source: CausalLM, target: CausalLM, maps: dict[str, AffineMap | None],
                       prompts: Sequence[str], max_new_tokens: int) -> tuple[dict[str, dict], list[dict]]:
    """Per map: the target's perplexity of the greedy text it generates, and tokens/s; plus samples."""
    quality, samples = {}, [{"prompt": p} for p in prompts]
    for name, amap in maps.items():
        nll, count, seconds, tokens = 0.0, 0, 0.0, 0
        for sample in samples:
            kwargs = {} if amap is None else {"source": source, "amap": amap}
            result = generate(target, sample["prompt"], max_new_tokens=max_new_tokens, **kwargs)
            n_ll, n_tok = continuation_nll(target, sample["prompt"], result.text)
            nll, count = nll + n_ll, count + n_tok
            seconds, tokens = seconds + result.seconds, tokens + len(result.token_ids)
            sample[name] = result.text
        quality[name] = {"perplexity": math.exp(nll / count) if count else float("nan"),
                         "tokens_per_second": tokens / seconds if seconds else float("nan"),
                         "generated_tokens": tokens}
    for sample in samples:
        sample["source_native"] = generate(source, sample["prompt"], max_new_tokens=max_new_tokens).text
    return quality, samples


def public_texts(spec: str, limit: int | None) -> list[str]:
    """Texts of one dataset (`limit` rows, or all) or of a mix in `public-set build`'s syntax: with
    `movie-dialog:0.8,bbc:0.2` and limit 2000, 1600 rows of movie dialog then 400 of BBC, each drawn as
    `load_texts(limit=N)` draws them."""
    from datamodules.assets import is_registered
    from datamodules.public_set import mix_rows, parse_mix
    from datamodules.text import load_texts

    single = is_registered(spec, "dataset") or Path(spec).expanduser().exists()
    weights = {spec: 1.0} if single else parse_mix(spec)
    if len(weights) == 1:
        return list(load_texts(next(iter(weights)), limit=limit, label_column=None)["text"])
    if limit is None:
        raise GenerationError(f"the public mix {spec!r} needs a total row count: pass --public.limit N "
                              "(each source gives round(N x weight) rows)")
    texts: list[str] = []
    for name, rows in mix_rows(weights, limit).items():
        if rows:
            texts += load_texts(name, limit=rows, label_column=None)["text"]
    return texts


def evaluate_generation(cfg: GenerationEvalConfig, out: str | Path | None = None,
                        source: CausalLM | None = None, target: CausalLM | None = None) -> dict[str, Any]:
    """Compatibility, fit (cached paired statistics), agreement and generation metrics; writes
    metrics.json, metrics.md and the map folder (OUT/map) under `out` when given. Models may be injected."""
    cfg.device.apply_threads()
    seed_all(cfg.seed)
    baseline = load_generation_metrics(cfg.baseline) if cfg.baseline else None  # a bad path fails before any work
    dtype, device = cfg.device.forward_dtype(cfg.dtype), cfg.device.torch_device()
    texts = public_texts(cfg.public.data, cfg.public.limit)
    source = source or load_causal_lm(cfg.source, dtype, device)
    target = target or load_causal_lm(cfg.target, dtype, device)
    splits = split_texts(len(texts), cfg.val_fraction, cfg.test_fraction, cfg.seed)
    train_texts = [texts[i] for i in splits["train"]]
    test_texts = [texts[i] for i in splits["test"]][:cfg.eval_texts]
    compatibility = tokenizer_compatibility(source.tokenizer, target.tokenizer, train_texts, cfg.max_length)

    t0 = time.perf_counter()
    stats = paired_stats(source, target, texts, cfg.public.data, cfg.max_length, cfg.public.limit, splits,
                         cfg.val_fraction, cfg.test_fraction, cfg.seed, cfg.batch_size,
                         # the statistics' cache key holds no dtype: only float32 states are cached
                         use_cache=source.model.dtype == target.model.dtype == torch.float32)
    stats_seconds = time.perf_counter() - t0
    fitted = fit_generation_map(stats, cfg.fit.estimator, cfg.fit.lambdas, cfg.fit.center, cfg.fit.standardize)
    maps = {"identity": None, "mapped": fitted.amap, "null": fitted.null}
    agreement = next_token_agreement(source, target, maps, test_texts, cfg.max_length, cfg.batch_size)
    prompts = cfg.prompts or default_prompts(test_texts, cfg.n_prompts, cfg.prompt_words)
    quality, samples = generation_quality(source, target, maps, prompts, cfg.max_new_tokens)

    results = {
        "config": asdict(cfg),
        "seed": cfg.seed,
        "forward": {"device": str(source.device), "dtype": str(source.model.dtype).removeprefix("torch.")},
        "pair": f"{source.name} -> {target.name}",
        "models": {"source": {"name": source.name, "parameters": source.parameters},
                   "target": {"name": target.name, "parameters": target.parameters}},
        "compatibility": compatibility.as_dict(),
        "positions": {"train": stats.train.count, "val": stats.val.count,
                      "test": agreement["mapped"]["positions"]},
        "texts": {"train": len(splits["train"]), "val": len(splits["val"]), "test": len(test_texts)},
        "stats_cache_hit": stats.hit,
        "stats_seconds": stats_seconds,
        "chosen_lambda": fitted.lam,
        "rows": {name: {**agreement[name], **quality[name]} for name in maps},
        "samples": samples,
    }
    results["paper_prediction"] = paper_prediction(results)
    if baseline is not None:
        results["comparison"] = compare_generation(baseline, results)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        save_generation_map(out / MAP_DIR, fitted.amap, source, target, cfg.max_length, estimator=cfg.fit.estimator,
                            lambdas=cfg.fit.lambdas, chosen_lambda=fitted.lam, center=cfg.fit.center,
                            standardize=cfg.fit.standardize,
                            metrics={k: results[k] for k in ("pair", "compatibility", "positions", "rows",
                                                             "paper_prediction")})
        write_report(results, out)
    return results


# --- where the pair falls against the paper -------------------------------------------------

def load_generation_metrics(path: str | Path) -> dict[str, Any]:
    """An `evaluate_generation` metrics.json (the file or its run folder), checked for the keys compared."""
    path = Path(path).expanduser()
    path = path / "metrics.json" if path.is_dir() else path
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise GenerationError(f"cannot read generation metrics {path} ({e}); pass the metrics.json (or the --out "
                              "folder) of an earlier `xsilo evaluate_generation` run") from e
    if not isinstance(results, dict) or not {"pair", "rows", "positions", "texts"} <= results.keys():
        raise GenerationError(f"{path} is not the metrics.json of `xsilo evaluate_generation` (no pair, rows, "
                              "positions and texts); pass that run's metrics.json or --out folder")
    return results


def _parameters(n: int) -> str:
    return f"{n / 1e9:.1f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e5 else f"{n:,}"


def paper_prediction(results: dict[str, Any]) -> dict[str, Any]:
    """What the paper predicts for this pair (sources under 4B fail; exact match < 0.67 fails), what we
    observe (works: mapped top-1 >= WORKS_TOP1 and perplexity ratio <= WORKS_PERPLEXITY_RATIO), whether
    they agree, and a sentence saying so."""
    if "exact_token_match" not in results["compatibility"] or "models" not in results:
        raise GenerationError(f"the metrics of {results.get('pair')!r} predate the exact-token-match rate; re-run "
                              "`xsilo evaluate_generation` for this pair")
    params = int(results["models"]["source"]["parameters"])
    exact = float(results["compatibility"]["exact_token_match"])
    reasons = []
    if params < PAPER_MIN_SOURCE_PARAMETERS:
        reasons.append(f"the source has {_parameters(params)} parameters, under 4 B")
    if exact < PAPER_MIN_EXACT_MATCH:
        reasons.append(f"exact token match {exact:.2f}, under {PAPER_MIN_EXACT_MATCH}")
    rows = results["rows"]
    top1, null = float(rows["mapped"]["top1"]), float(rows["null"]["top1"])
    mapped_ppl, own_ppl = float(rows["mapped"]["perplexity"]), float(rows["identity"]["perplexity"])
    ratio = mapped_ppl / own_ppl if own_ppl > 0 else float("nan")
    works = top1 >= WORKS_TOP1 and math.isfinite(ratio) and ratio <= WORKS_PERPLEXITY_RATIO
    predicted, observed = ("fail" if reasons else "work"), ("works" if works else "fails")
    as_predicted = (predicted == "fail") == (observed == "fails")
    why = "; ".join(reasons) if reasons else (f"the source has {_parameters(params)} parameters and exact token "
                                              f"match {exact:.2f}, both at or above the paper's thresholds")
    text = (f"{results['pair']}: the paper predicts it {'fails' if reasons else 'can work'} ({why}). Observed: the "
            f"mapped source states pick the target's own next token at {top1:.1%} of held-out positions (null map "
            f"{null:.1%}, {top1 - null:+.1%} over it), and the target finds the mapped greedy text {ratio:.1f}x as "
            f"perplexing as its own ({mapped_ppl:.1f} vs {own_ppl:.1f}); works needs at least {WORKS_TOP1:.0%} and "
            f"at most {WORKS_PERPLEXITY_RATIO:g}x, so it {observed}, "
            + ("as the paper predicts." if as_predicted else "against the paper's prediction."))
    return {"predicted": predicted, "observed": observed, "as_predicted": as_predicted, "reasons": reasons,
            "source_parameters": params, "exact_token_match": exact, "mapped_top1": top1, "null_top1": null,
            "lift_over_null": top1 - null, "perplexity_ratio": ratio, "works_top1": WORKS_TOP1,
            "works_perplexity_ratio": WORKS_PERPLEXITY_RATIO, "text": text}


def compare_generation(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """How next-token agreement moves from one fit (e.g. 2,000 texts) to another (e.g. 4,000) of the same pair."""
    if before["pair"] != after["pair"]:
        raise GenerationError(f"cannot compare {before['pair']!r} with {after['pair']!r}: pass a baseline run of "
                              "the same source -> target pair")
    pick = lambda r, row, key: float(r["rows"][row][key])  # noqa: E731
    out = {"pair": after["pair"],
           "train_texts": [before["texts"]["train"], after["texts"]["train"]],
           "train_positions": [before["positions"]["train"], after["positions"]["train"]],
           **{f"{row}_{key}": [pick(before, row, key), pick(after, row, key)]
              for row in ("mapped", "null") for key in ("top1", "top5", "kl")}}
    out["top1_rise"] = out["mapped_top1"][1] - out["mapped_top1"][0]
    out["text"] = (f"From {out['train_texts'][0]:,} to {out['train_texts'][1]:,} training texts "
                   f"({out['train_positions'][0]:,} -> {out['train_positions'][1]:,} paired positions), mapped top-1 "
                   f"agreement goes {out['mapped_top1'][0]:.1%} -> {out['mapped_top1'][1]:.1%} "
                   f"({out['top1_rise']:+.1%}; null {out['null_top1'][0]:.1%} -> {out['null_top1'][1]:.1%}), "
                   f"KL {out['mapped_kl'][0]:.2f} -> {out['mapped_kl'][1]:.2f}. Each run scores its own held-out "
                   "texts.")
    return out


def prediction_markdown(results: dict[str, Any]) -> str:
    """The paper-prediction paragraph (and the comparison with a baseline fit, if any) of one run's metrics."""
    lines = [f"Against the paper: {paper_prediction(results)['text']}"]
    if "comparison" in results:
        lines.append(f"More public texts: {results['comparison']['text']}")
    return "\n\n".join(lines) + "\n"


def markdown_report(results: dict[str, Any]) -> str:
    c, p, rows = results["compatibility"], results["positions"], results["rows"]
    lam = results.get("chosen_lambda")
    lines = [
        f"## Cross-model generation: {results['pair']}",
        "",
        f"Tokenizers: {c['source_boundary_match']:.1%} of source token ends match a target token end "
        f"({c['target_boundary_match']:.1%} of target ends); exact token match {c['exact_token_match']:.1%} of "
        f"aligned positions read one identical token ({c['source_exact_match']:.1%} of source tokens); "
        f"vocabulary overlap {c['shared_vocab']:,} strings "
        f"(Jaccard {c['vocab_jaccard']:.3f}, {c['source_vocab_shared']:.1%} of the source's).",
        f"Paired positions: {p['train']:,} train, {p['val']:,} val, {p['test']:,} held-out test "
        f"({results['texts']['test']} texts)." + (f" Ridge λ (relative): {lam:.0e}." if lam is not None else ""),
        "",
        "| next-token head on | top-1 | top-5 | KL(target ‖ row) | target ppl of greedy text | tokens/s |",
        "|---|---|---|---|---|---|",
    ]
    labels = {"identity": "target's own states (identity)", "mapped": "mapped source states",
              "null": "null map (shuffled pairs)"}
    for name, label in labels.items():
        r = rows[name]
        lines.append(f"| {label} | {r['top1']:.3f} | {r['top5']:.3f} | {r['kl']:.3f} | {r['perplexity']:.1f} "
                     f"| {r['tokens_per_second']:.1f} |")
    lines += ["", "| prompt | mapped (source reads, target writes) | target alone | source alone |",
              "|---|---|---|---|"]
    cell = lambda s: repr(s)[1:-1].replace("|", "\\|")  # noqa: E731
    for s in results["samples"]:
        cells = (s["prompt"], s["mapped"], s["identity"], s["source_native"])
        lines.append("| " + " | ".join(cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n\n" + prediction_markdown(results)


def write_report(results: dict[str, Any], out: Path) -> None:
    atomic_write_json(out / "metrics.json", results)
    atomic_write_bytes(out / "metrics.md", markdown_report(results).encode())


# --- command-line bodies (the `xsilo` functions call these) --------------------------------

def run_generate(prompt: str, *, source: str, target: str, aligner: str, max_new_tokens: int = 32,
                 stop: Sequence[str] = (), sampling: Sampling | None = None, reuse_cache: bool = True,
                 compare: bool = False, dtype: str = "float32", device: DeviceSettings | None = None,
                 write: Callable[[str], None] | None = None) -> GenerationResult:
    """Load both models (on `device`, in its precision's dtype or `dtype`) and the map, stream the mapped
    generation through `write` (stdout by default)."""
    import sys

    def write_out(s: str) -> None:
        sys.stdout.write(s)
        sys.stdout.flush()

    write = write or write_out
    sampling = sampling or Sampling()
    check_request(prompt, max_new_tokens, sampling)
    device = device or DeviceSettings()
    device.apply_threads()
    dtype, where = device.forward_dtype(dtype), device.torch_device()
    src, tgt = load_causal_lm(source, dtype, where), load_causal_lm(target, dtype, where)
    amap = load_generation_map(aligner, src, tgt)
    common = dict(max_new_tokens=max_new_tokens, stop=stop, sampling=sampling)
    if compare:
        write(f"[{source} -> {target}] ")
    write(prompt)
    result = generate(tgt, prompt, source=src, amap=amap, reuse_cache=reuse_cache, on_text=write, **common)
    write("\n")
    if compare:
        for label, lm in ((f"{target} alone", tgt), (f"{source} alone", src)):
            write(f"[{label}] {prompt}")
            generate(lm, prompt, on_text=write, **common)
            write("\n")
    return result

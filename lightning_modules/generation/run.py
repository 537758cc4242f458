"""Generation runs: `evaluate_generation` (`xsilo evaluate_generation`) and `run_generate` (`xsilo generate`).

`evaluate_generation` reports next-token agreement (top-1, top-5, KL) on held-out texts' paired positions, and
the target's perplexity of generated text and tokens/s, beside the identity (target on its own states) and a
null map (fitted on shuffled pairs), with the tokenizers' exact-token-match rate; `generation.report` says
whether the pair falls where the paper predicts, and how agreement moves between two fits (e.g. 2,000 vs 4,000
texts)."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from datamodules.tokens import CausalLM, load_causal_lm, paired_batches, split_texts, tokenizer_compatibility
from lightning_modules.fitting.affine_map import AffineMap
from lightning_modules.fitting.paired_stats import paired_stats
from lightning_modules.generation.maps import MAP_DIR, fit_generation_map, load_generation_map, save_generation_map
from lightning_modules.generation.report import (compare_generation, load_generation_metrics, paper_prediction,
                                                 write_report)
from lightning_modules.generation.sampling import (GenerationError, GenerationResult, Sampling, check_request,
                                                   generate)
from lightning_modules.settings import (GENERATION_MAX_LENGTH, GENERATION_PUBLIC, DeviceSettings, FitSettings,
                                        PublicSetSettings, seed_all)


@dataclass
class GenerationEvalConfig:
    """Fit source→target on a public set's paired positions and evaluate on its held-out texts."""

    source: str
    target: str
    # a dataset, or a mix such as movie-dialog:0.8,bbc:0.2 (of limit rows)
    public: PublicSetSettings = GENERATION_PUBLIC
    max_length: int = GENERATION_MAX_LENGTH
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
    from datamodules.registry import is_registered
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

"""`xsilo generate` and `xsilo evaluate_generation`: typed functions whose signatures are their options (see
`lightning_modules.cli`); the drivers are imported when a command runs."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

from datamodules.commands import quiet
from lightning_modules.settings import (GENERATION_MAX_LENGTH, GENERATION_PUBLIC, DeviceSettings, FitSettings,
                                        PublicSetSettings)


def generate(
    prompt: str,
    *,
    source: str,
    target: str,
    aligner: str,
    max_new_tokens: int = 32,
    stop: list[str] | str | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    reuse_cache: bool = True,
    compare: bool = False,
    dtype: Literal["float32", "bfloat16", "float16"] = "float32",
    device: DeviceSettings = DeviceSettings(),
) -> None:
    """Continue PROMPT with the target's LM head reading the source's mapped final states (streamed).

    Args:
        prompt: text to continue.
        source: model that reads (registry name, folder or hub id).
        target: model whose LM head writes.
        aligner: the map of `xsilo evaluate_generation --out DIR`: DIR, DIR/map or a hub id.
        max_new_tokens: the most target tokens to generate.
        stop: a stop string or a list of them; the output ends before the first one.
        temperature: 0 is greedy; otherwise sample at this temperature.
        top_k: sample among the k most likely tokens.
        top_p: sample from the smallest set of tokens with this probability mass.
        seed: sampling seed.
        reuse_cache: reuse the source's KV cache when its re-tokenisation only appends tokens.
        compare: also print each model's own continuation.
        dtype: compute dtype: float32, bfloat16 or float16 (or set by --precision: bf16-* runs the forward pass
            in bfloat16, 16-* in float16; auto is --dtype).
        device: where it runs (--accelerator, --devices, --precision, --threads).
    """
    from lightning_modules.generation.run import run_generate
    from lightning_modules.generation.sampling import Sampling

    quiet()
    result = run_generate(prompt, source=source, target=target, aligner=aligner, max_new_tokens=max_new_tokens,
                          stop=[stop] if isinstance(stop, str) else stop or (),
                          sampling=Sampling(temperature, top_k, top_p, seed), reuse_cache=reuse_cache,
                          compare=compare, dtype=dtype, device=device)
    print(f"{len(result.token_ids)} tokens, {result.tokens_per_second:.1f} tokens/s, stop: {result.stop_reason}; "
          f"source KV cache reused {result.cache_reused}x, recomputed {result.recomputed}x", file=sys.stderr)


def evaluate_generation(
    *,
    source: str,
    target: str,
    public: PublicSetSettings = GENERATION_PUBLIC,
    max_length: int = GENERATION_MAX_LENGTH,
    fit: FitSettings = FitSettings(),
    eval_texts: int | None = 100,
    prompts: list[str] | str | None = None,
    max_new_tokens: int = 20,
    seed: int = 0,
    device: DeviceSettings = DeviceSettings(),
    baseline: str | None = None,
    out: str = "runs/generation",
) -> None:
    """Fit a source→target map on paired token positions of the public set; score next-token agreement
    and generation on held-out texts; say whether the pair falls where the paper predicts (sources under 4B
    and exact token match under 0.67 fail); write metrics.json, metrics.md and the map folder (OUT/map).

    Args:
        source: model that reads.
        target: model whose LM head writes.
        public: public texts (a dataset or a mix such as movie-dialog:300,bbc:50); every paired token position
            is a training pair; of its limit texts 10% choose λ and 10% are held out for the metrics.
        max_length: truncation length in tokens.
        fit: how the map is fitted (ridge λ chosen on held-out texts).
        eval_texts: held-out texts scored for next-token agreement.
        prompts: a prompt, or a list, for the generation samples and perplexity (default: starts of held-out
            texts): --prompts '["The capital of France is", "Once upon a time"]'.
        max_new_tokens: tokens generated per prompt.
        seed: split seed (recorded in metrics.json).
        device: where it runs (--accelerator, --devices, --threads; --precision: bf16-* runs both models in
            bfloat16, 16-* in float16, auto and 32-true in float32; the device is recorded in metrics.json).
        baseline: metrics.json (or --out folder) of an earlier run of the same pair, e.g. the 2,000-text fit:
            the report says how much next-token agreement rises over it.
        out: output directory.
    """
    from lightning_modules.generation.report import markdown_report
    from lightning_modules.generation.run import GenerationEvalConfig, evaluate_generation as run

    quiet()
    cfg = GenerationEvalConfig(source=source, target=target, public=public, max_length=max_length, fit=fit,
                               eval_texts=eval_texts, prompts=[prompts] if isinstance(prompts, str) else prompts,
                               max_new_tokens=max_new_tokens, seed=seed,
                               device=device, baseline=baseline)
    results = run(cfg, out=out)
    print(markdown_report(results))
    print(f"wrote {Path(out) / 'metrics.json'}, {Path(out) / 'metrics.md'} and the map folder {Path(out) / 'map'}")

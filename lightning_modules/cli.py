"""The `xsilo` console script: one root parser (`build_parser`) that lists every subcommand.

`fit`, `validate`, `test` and `predict` are LightningCLI subcommands over configs in `configs/`
(`lightning_modules.lightning_cli` parses their options when one runs). Every other subcommand is a
typed function whose signature declares its options, as litgpt does with jsonargparse. A list option
takes the words after it (`--models a b`) or one JSON/YAML list (`--models '[a,b]'`), in every
subcommand. Imports are lazy so that `xsilo serve` never loads training code.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

from lightning_modules.settings import (GENERATION_PUBLIC, Accelerator, DeviceSettings, Devices, ExtractionSettings,
                                        FitSettings, HeadSettings, Precision, PublicSetSettings, Recipe)
from serve.settings import ServerSettings

SERVER = ServerSettings()  # `xsilo serve` flags default to the server's own settings, declared once there

LIGHTNING_SUBCOMMANDS = {
    "fit": "Fit the config's model on its DataModule (LightningCLI): -c configs/trainer/cpu.yaml -c configs/data/... "
           "-c configs/model/...",
    "validate": "Score a fitted checkpoint (--ckpt_path) on the DataModule's validation split (LightningCLI).",
    "test": "Score a fitted checkpoint (--ckpt_path) on the DataModule's test split (LightningCLI).",
    "predict": "Write a fitted checkpoint's (--ckpt_path) mapped states (aligner) or logits (classifier) of the test "
               "split to --output FILE.npz (LightningCLI).",
}


def _quiet() -> None:
    """Commands that are not LightningCLI print results, not library chatter."""
    import logging
    import warnings

    import datasets
    import transformers

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def assets_list() -> None:
    """Show the known models and datasets and whether each is prepared under $XSILO_HOME."""
    from datamodules.assets import asset_table, xsilo_home

    rows = asset_table()
    print(f"XSILO_HOME={xsilo_home()}")
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        print(f"{r['name']:<{width}}  {r['kind']:<7}  prepared={r['prepared']:<3}  {r['description']}")


def assets_prepare(names: list[str] | None = None) -> None:
    """Install, join and convert assets (all when no NAME is given). Idempotent.

    Args:
        names: asset names, e.g. smollm2 gemma3 bbc.
    """
    from datamodules.assets import prepare

    _quiet()
    t0 = time.perf_counter()
    worked = prepare(names or None)
    if worked:
        print(f"prepared {', '.join(worked)} in {time.perf_counter() - t0:.1f}s")
    else:
        print("nothing to do: every requested asset is already prepared")


def extract(
    *,
    model: str,
    data: str,
    split: str = "train",
    pooling: str | None = None,
    layer: int = -1,
    max_length: int | None = ExtractionSettings.max_length,
    dtype: str = "float32",
    batch_size: int = 16,
    limit: int | None = None,
    text_column: str = "text",
    label_column: str | None = "label",
    cache_dir: str | None = None,
    shard_size: int = 2048,
    accelerator: Accelerator = "auto",
    devices: Devices = "auto",
    strategy: str = "auto",
    threads: int | None = None,
) -> None:
    """Extract pooled hidden states into the cache (or find them there) and print its path.

    Without a terminal it prints a progress line every $XSILO_PROGRESS_S seconds (default 10). SIGTERM or
    Ctrl-C stops it within a batch; finished shards are kept and the same command resumes from them.

    Args:
        model: registry name (minilm, smollm2, gemma3), local checkpoint folder or hub id.
        data: registry dataset name, local file/folder or hub id.
        split: dataset split.
        pooling: mean, last or first; default last for causal LMs, mean otherwise.
        layer: hidden_states index; -1 is the final layer.
        max_length: truncation length in tokens; null: the model's own limit (capped at 128).
        dtype: compute dtype: float32, bfloat16 or float16.
        batch_size: texts per forward pass.
        limit: keep N rows (a seeded random sample, in file order).
        text_column: text column of a non-registry dataset.
        label_column: label column of a non-registry dataset.
        cache_dir: cache root (default $XSILO_HOME/states).
        shard_size: rows per shard file (the unit that is kept when a run stops).
        accelerator: cpu, gpu or auto (a GPU when one is visible).
        devices: number of devices (DDP when > 1), or auto (every visible GPU, else one CPU process).
        strategy: Lightning strategy, e.g. ddp.
        threads: torch threads per process.
    """
    from datamodules.extraction import ExtractionConfig, extract as run_extract

    _quiet()
    config = ExtractionConfig(model=model, data=data, split=split, pooling=pooling, layer=layer,
                              max_length=max_length, dtype=dtype, batch_size=batch_size, limit=limit,
                              text_column=text_column, label_column=label_column)
    if shard_size <= 0:
        raise ValueError(f"shard_size must be a positive number of rows, got {shard_size}")
    result = run_extract(config, cache_root=cache_dir, shard_size=shard_size, accelerator=accelerator,
                         devices=devices, strategy=strategy, threads=threads)
    status = "cache hit" if result.hit else f"computed {result.computed_shards} shard(s)"
    print(f"{status}: {result.n_rows} x {result.dim} in {result.seconds:.1f}s", file=sys.stderr)
    print(result.path)


def evaluate(
    *,
    source: str,
    target: str,
    task: str,
    task_limit: int | None = None,
    public: PublicSetSettings = PublicSetSettings(),
    extraction: ExtractionSettings = ExtractionSettings(),
    fit: FitSettings = FitSettings(),
    head: HeadSettings = HeadSettings(),
    seed: int = 0,
    accelerator: Accelerator = "auto",
    devices: Devices = "auto",
    precision: Precision = "auto",
    threads: int | None = None,
    out: str = "runs/evaluate",
) -> None:
    """Fit source→target on the public set and heads on the task; write metrics.json/metrics.md.

    A recipe file sets any of these: --config configs/recipe/bbc.yaml (flags after it win).

    Args:
        source: client model (registry name, folder or hub id).
        target: server model whose classifier reads the mapped states.
        task: labelled dataset (stratified train/val/test split): a registry name, a CSV/TSV/JSONL/Parquet
            file, a saved datasets folder or a hub id.
        task_limit: keep N task rows (a seeded random sample; the split is stratified within it).
        public: the shared public set the map is fitted on.
        extraction: how states are read (pooling, layer, max_length, dtype, columns of a user's file).
        fit: how the map is fitted (estimator, λ path, centring, standardisation).
        head: the logistic-regression heads.
        seed: split, training and sampling seed (recorded in metrics.json).
        accelerator: cpu, gpu or auto.
        devices: number of devices, or auto.
        precision: Lightning precision of fitting (32-true, bf16-mixed, ...); auto is 32-true.
        threads: torch threads.
        out: output directory (checkpoints, metrics.json, metrics.md).
    """
    from lightning_modules.evaluate import PairConfig, evaluate_pair, markdown_report

    _quiet()
    cfg = PairConfig(source, target, task, task_limit=task_limit, public=public, extraction=extraction, fit=fit,
                     head=head, device=DeviceSettings(accelerator, devices, precision, threads), seed=seed)
    results = evaluate_pair(cfg, out=out)
    print(markdown_report(results))
    print(f"wrote {Path(out) / 'metrics.json'} and {Path(out) / 'metrics.md'}")


def evaluate_ood(
    *,
    source: str,
    target: str,
    task: str,
    ood: list[str],
    task_limit: int | None = None,
    ood_limit: int | None = 500,
    knn_k: int = 50,
    mahalanobis_shrinkage: float = 1e-2,
    threshold_tpr: float = 0.95,
    export_detector: str = "auto",
    public: PublicSetSettings = PublicSetSettings(),
    extraction: ExtractionSettings = ExtractionSettings(),
    fit: FitSettings = FitSettings(),
    head: HeadSettings = HeadSettings(),
    seed: int = 0,
    accelerator: Accelerator = "auto",
    devices: Devices = "auto",
    precision: Precision = "auto",
    threads: int | None = None,
    out: str = "runs/ood",
) -> None:
    """Out-of-distribution detection with native target states and mapped source states.

    Writes ood.json/ood.md, the checkpoints and ood-threshold.json (for `xsilo export --ood`). A recipe file
    sets any of these: --config configs/recipe/vader-movies.yaml.

    Args:
        source: client model (registry name, folder or hub id).
        target: server model whose classifier reads the mapped states.
        task: labelled in-distribution dataset (train fits detectors, val sets thresholds, test is scored).
        ood: out-of-distribution datasets, e.g. vader-tweets trec; labels, if any, are ignored.
        task_limit: keep N task rows (a seeded random sample).
        ood_limit: keep N rows of each OOD set (a seeded random sample).
        knn_k: neighbours for the cosine kNN detector.
        mahalanobis_shrinkage: shrinkage of the shared covariance towards a scaled identity.
        threshold_tpr: share of ID validation inputs kept at or below each threshold.
        export_detector: the logit detector named in the export manifest: auto (best validation AUROC), msp,
            max_logit or energy. Whichever detector a fused-mode client can run scores best on validation
            (logits or its own states) is reported; a state detector is written to OUT/client-ood.npz.
        public: the shared public set the map is fitted on.
        extraction: how states are read (pooling, layer, max_length, dtype, columns of a user's file).
        fit: how the map is fitted.
        head: the target's logistic-regression head.
        seed: split and training seed (recorded in ood.json).
        accelerator: cpu, gpu or auto.
        devices: number of devices, or auto.
        precision: Lightning precision of fitting (32-true, bf16-mixed, ...); auto is 32-true.
        threads: torch threads.
        out: output directory.
    """
    from lightning_modules.ood import OODConfig, evaluate_ood as run_evaluate_ood, markdown_report

    _quiet()
    cfg = OODConfig(source, target, task, task_limit=task_limit, public=public, extraction=extraction, fit=fit,
                    head=head, device=DeviceSettings(accelerator, devices, precision, threads), seed=seed, ood=ood,
                    ood_limit=ood_limit, knn_k=knn_k, mahalanobis_shrinkage=mahalanobis_shrinkage,
                    threshold_tpr=threshold_tpr, export_detector=export_detector)
    results = run_evaluate_ood(cfg, out=out)
    print(markdown_report(results))
    print(f"wrote {', '.join(str(Path(out) / f) for f in ('ood.json', 'ood.md', 'ood-threshold.json'))}")


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
    dtype: str = "float32",
    accelerator: Accelerator = "auto",
    devices: Devices = "auto",
    precision: Precision = "auto",
    threads: int | None = None,
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
        dtype: compute dtype: float32, bfloat16 or float16 (or set by --precision).
        accelerator: cpu, gpu or auto (a GPU when one is visible).
        devices: 1 or auto (one device).
        precision: the forward pass's precision: bf16-* runs it in bfloat16, 16-* in float16; auto is --dtype.
        threads: torch threads.
    """
    from lightning_modules.generation import Sampling, run_generate

    _quiet()
    result = run_generate(prompt, source=source, target=target, aligner=aligner, max_new_tokens=max_new_tokens,
                          stop=[stop] if isinstance(stop, str) else stop or (), sampling=Sampling(temperature, top_k, top_p, seed),
                          reuse_cache=reuse_cache, compare=compare, dtype=dtype,
                          device=DeviceSettings(accelerator, devices, precision, threads))
    print(f"{len(result.token_ids)} tokens, {result.tokens_per_second:.1f} tokens/s, stop: {result.stop_reason}; "
          f"source KV cache reused {result.cache_reused}x, recomputed {result.recomputed}x", file=sys.stderr)


def evaluate_generation(
    *,
    source: str,
    target: str,
    public: PublicSetSettings = GENERATION_PUBLIC,
    max_length: int = 64,
    fit: FitSettings = FitSettings(),
    eval_texts: int | None = 100,
    prompts: list[str] | None = None,
    max_new_tokens: int = 20,
    seed: int = 0,
    accelerator: Accelerator = "auto",
    devices: Devices = "auto",
    precision: Precision = "auto",
    threads: int | None = None,
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
        prompts: prompts for the generation samples and perplexity (default: starts of held-out texts).
        max_new_tokens: tokens generated per prompt.
        seed: split seed (recorded in metrics.json).
        accelerator: cpu, gpu or auto (a GPU when one is visible; the device is recorded in metrics.json).
        devices: 1 or auto (one device).
        precision: the forward pass's precision: bf16-* runs both models in bfloat16, 16-* in float16; auto and
            32-true in float32.
        threads: torch threads.
        baseline: metrics.json (or --out folder) of an earlier run of the same pair, e.g. the 2,000-text fit:
            the report says how much next-token agreement rises over it.
        out: output directory.
    """
    from lightning_modules.generation import GenerationEvalConfig, evaluate_generation as run, markdown_report

    _quiet()
    cfg = GenerationEvalConfig(source=source, target=target, public=public, max_length=max_length, fit=fit,
                               eval_texts=eval_texts, prompts=prompts, max_new_tokens=max_new_tokens, seed=seed,
                               device=DeviceSettings(accelerator, devices, precision, threads), baseline=baseline)
    results = run(cfg, out=out)
    print(markdown_report(results))
    print(f"wrote {Path(out) / 'metrics.json'}, {Path(out) / 'metrics.md'} and the map folder {Path(out) / 'map'}")


def study(
    *,
    models: list[str],
    tasks: list[str],
    task_limit: int | None = None,
    ood: list[str] | None = None,
    ood_limit: int | None = 500,
    ood_detector: str = "energy",
    bootstrap: int = 1000,
    regimes: list[str] | None = None,
    in_domain_size: int = 2000,
    leave_task_out_size: int | None = 3500,
    public_sources: list[str] | None = None,
    public: PublicSetSettings = PublicSetSettings(),
    extraction: ExtractionSettings = ExtractionSettings(),
    fit: FitSettings = FitSettings(),
    head: HeadSettings = HeadSettings(),
    seed: int = 0,
    accelerator: Accelerator = "auto",
    devices: Devices = "auto",
    precision: Precision = "auto",
    threads: int | None = None,
    out: str = "runs/study",
) -> None:
    """Every ordered pair of models: alignment, mapped accuracy and OOD drops per task, with bootstrap intervals.

    Writes study.json, study.md (one table per regime, collapses flagged), the λ-path plots and one N×N
    heatmap PNG per metric. Cached states are reused and each (model, task) classifier is fitted once, so
    adding a model costs that model's extraction. A recipe file sets the settings: --config
    configs/recipe/bbc.yaml; the paper's two tables: --config configs/study/paper-tables.yaml.

    Args:
        models: two or more models (registry names, folders or hub ids): --models smollm2 gemma3 minilm.
        tasks: labelled datasets: --tasks bbc vader-movies.
        task_limit: keep N rows of each task (a seeded random sample).
        ood: out-of-distribution datasets; none skips OOD.
        ood_limit: keep N rows of each OOD set.
        ood_detector: msp, max_logit, energy, mahalanobis or knn: the detector whose AUROC is reported.
        bootstrap: resamples of the test rows for the 95% intervals.
        regimes: which public sets the maps are fitted on (default: given): given (--public, one for every task),
            in-domain (per task: half movie dialog, half the task's training texts; paper Table 1) and
            leave-task-out (per task: every other unlabelled source, no text of the task; paper Table 2).
        in_domain_size: rows of each in-domain public set.
        leave_task_out_size: rows of each leave-task-out public set (null: every eligible row of every source).
        public_sources: the unlabelled sources of the leave-task-out sets (default: every registry dataset).
        public: the shared public set of the given regime.
        extraction: how states are read (pooling, layer, max_length, dtype, columns of a user's file).
        fit: how each map is fitted.
        head: the logistic-regression heads.
        seed: split, training and bootstrap seed (recorded in study.json).
        accelerator: cpu, gpu or auto.
        devices: number of devices, or auto.
        precision: Lightning precision of fitting (32-true, bf16-mixed, ...); auto is 32-true.
        threads: torch threads.
        out: output directory.
    """
    from lightning_modules.experiments.study import StudyConfig, run_study

    _quiet()
    cfg = StudyConfig(models=models, tasks=tasks, task_limit=task_limit, ood=ood or (), ood_limit=ood_limit,
                      ood_detector=ood_detector, bootstrap=bootstrap, public=public, extraction=extraction, fit=fit,
                      head=head, device=DeviceSettings(accelerator, devices, precision, threads), seed=seed,
                      regimes=regimes or ("given",), in_domain_size=in_domain_size,
                      leave_task_out_size=leave_task_out_size, public_sources=public_sources)
    results = run_study(cfg, out=out)
    flagged = sum(v["collapse"] for r in results["regimes"].values() for p in r["pairs"].values()
                  for v in p["tasks"].values())
    print(f"wrote {Path(out) / 'study.json'}, {Path(out) / 'study.md'}, {len(results.get('lambda_paths', {}))} "
          f"λ-path plots and {len(results['heatmaps'])} heatmaps; {flagged} (pair, task, regime) rows flagged as "
          "collapsed")


def report(*, run: str = "runs/demo") -> None:
    """Write RUN/report.md with PNG plots from the demo's JSON results; stages that did not run are noted.

    Args:
        run: the demo's run folder ($RUN in scripts/demo.sh).
    """
    from lightning_modules.report import write_demo_report

    print(write_demo_report(run))


def public_set_build(
    *,
    sources: list[str] | None = None,
    mix: str | None = None,
    leave_out: str | None = None,
    size: int | None = None,
    exclude_tasks: list[str] | None = None,
    exclude_datasets: list[str] | None = None,
    name: str | None = None,
    models: list[str] | None = None,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    split_seed: int = 0,
    seed: int = 0,
    text_column: str = "text",
    strict: bool = False,
    max_length: int | None = ExtractionSettings.max_length,
    accelerator: Accelerator = "auto",
    devices: Devices = "auto",
    precision: Precision = "auto",
    threads: int | None = None,
) -> None:
    """Compose the shared public set from unlabelled sources; it never holds a task's validation or test texts.

    Writes $XSILO_HOME/public/NAME/NAME.jsonl and manifest.json and prints the .jsonl path: pass it as
    --public to evaluate, evaluate_ood or study (or as data: in configs/data/public.yaml).

    Args:
        sources: datasets to draw from (registry names, local .csv/.jsonl/.txt files, hub ids); labels are dropped.
        mix: domain weights, e.g. movie-dialog:0.5,bbc:0.5 (names not in --sources are added).
        leave_out: a task whose domain the set must not know: every registry dataset but it, in equal weights,
            with every text of it removed (the study's leave-task-out regime; not with --sources or --mix).
        size: rows in the set (default: every eligible row; with a mix, the largest set that meets it).
        exclude_tasks: tasks whose validation and test texts are removed, as NAME or NAME@LIMIT (the task_limit
            the task is evaluated with); labelled sources are always added.
        exclude_datasets: datasets whose every text is removed (e.g. OOD test sets).
        name: the set's name under $XSILO_HOME/public/ (or a folder path); default public-<fingerprint>.
        models: fill these models' state caches from rows already cached for the same texts (rows cached for
            all of them are drawn first); only texts no cache holds run through a model.
        val_fraction: the tasks' validation fraction.
        test_fraction: the tasks' test fraction.
        split_seed: the tasks' split seed.
        seed: sampling seed.
        text_column: text column of file and hub sources.
        strict: fail instead of redistributing when the size or mix cannot be met.
        max_length: truncation length in tokens of the --models caches (use the one you evaluate with); null:
            each model's own limit (capped), as `evaluate` reads it by default.
        accelerator: where any extraction for --models runs: cpu, gpu or auto (a GPU when one is visible).
        devices: 1 or auto (one device).
        precision: the extraction's dtype: bf16-* is bfloat16, 16-* float16, auto and 32-true float32 (the
            dtype is part of the cache key: use the one you evaluate with).
        threads: torch threads for any extraction.
    """
    from datamodules.extraction import ExtractionConfig
    from datamodules.public_set import (PublicSetError, build_public_set, cached_texts, leave_task_out_recipe,
                                        prefill_states, read_manifest)

    _quiet()
    if leave_out is not None:
        if sources or mix:
            raise PublicSetError(f"--leave_out {leave_out} draws from every registry dataset but {leave_out} in "
                                 "equal weights; drop --sources and --mix, or drop --leave_out")
        recipe = leave_task_out_recipe(leave_out, exclude_tasks or [], size)
        sources, mix = list(recipe.sources), recipe.mix
        exclude_datasets = [*(exclude_datasets or ()), *recipe.exclude_datasets]
    device = DeviceSettings(accelerator, devices, precision, threads)
    dtype = device.forward_dtype()
    path = build_public_set(sources or (), size=size, mix=mix, exclude_tasks=exclude_tasks, out=name,
                            exclude_datasets=exclude_datasets or (), val_fraction=val_fraction,
                            test_fraction=test_fraction, split_seed=split_seed, seed=seed, text_column=text_column,
                            prefer=cached_texts(models, max_length=max_length, dtype=dtype) if models else None,
                            strict=strict)
    m = read_manifest(path)
    parts = ", ".join(f"{s['name']} {s['selected']}" for s in m["sources"])
    print(f"{m['rows']} rows ({parts}); excluded {m['excluded']['rows_total']} held-out/excluded texts of "
          f"{', '.join(t['task'] for t in m['excluded']['tasks']) or 'no task'}", file=sys.stderr)
    for model in models or ():
        r = prefill_states(ExtractionConfig(model=model, data=str(path), max_length=max_length, dtype=dtype,
                                            label_column=None), **device.extraction_kwargs())
        print(f"{model}: {'cache hit' if r.hit else f'{r.reused} rows reused, {r.extracted} extracted'}",
              file=sys.stderr)
    print(path)


def public_set_export(
    *,
    model: str,
    data: str,
    out: str,
    limit: int | None = None,
    val_fraction: float = 0.125,
    seed: int = 0,
    name: str | None = None,
    extraction: ExtractionSettings = ExtractionSettings(),
    overwrite: bool = False,
    accelerator: Accelerator = "auto",
    devices: Devices = "auto",
    threads: int | None = None,
) -> None:
    """Provider: write the public-states folder a private fit needs (`xsilo serve --public DIR`).

    It holds the public texts, their fingerprint, the train/val split and MODEL's states on each part; only the
    texts, the fingerprint and the split are ever published.

    Args:
        model: the provider's model (registry name, folder or hub id).
        data: the public set: a registry dataset, a file, or a set from `xsilo public-set build` (its .jsonl).
        out: output folder (must be empty or missing unless --overwrite).
        limit: keep N rows (a seeded random sample).
        val_fraction: share of rows held out to choose the client's ridge λ.
        seed: split seed.
        name: the set's published name (default: the data's file name).
        extraction: how MODEL's states are read (pooling, layer, max_length, dtype, batch_size).
        overwrite: replace an existing folder.
        accelerator: where any extraction runs: cpu, gpu or auto (a GPU when one is visible).
        devices: 1 or auto (one device).
        threads: torch threads.
    """
    from lightning_modules.public_states import export_public_states

    _quiet()
    path = export_public_states(model, data, out, limit=limit, val_fraction=val_fraction, seed=seed, name=name,
                                extraction=extraction, device=DeviceSettings(accelerator, devices, "auto", threads),
                                overwrite=overwrite)
    manifest = json.loads((path / "manifest.json").read_text())
    print(f"{manifest['rows']} rows ({manifest['parts']['train']} train, {manifest['parts']['val']} val) of "
          f"{manifest['hidden_size']}-d states, fingerprint {manifest['fingerprint'][:16]}", file=sys.stderr)
    print(path)


def head_fit(
    *,
    model: str,
    task: str,
    out: str,
    publish_ood: bool = False,
    ood_tpr: float = 0.95,
    mahalanobis_shrinkage: float = 1e-2,
    task_limit: int | None = None,
    extraction: ExtractionSettings = ExtractionSettings(),
    head: HeadSettings = HeadSettings(),
    seed: int = 0,
    overwrite: bool = False,
    accelerator: Accelerator = "auto",
    devices: Devices = "auto",
    precision: Precision = "auto",
    threads: int | None = None,
) -> None:
    """Provider: fit a task head on MODEL's own states and write a head export (`xsilo serve --heads DIR`).

    No client model is involved. A recipe file sets the extraction and head settings: --config
    configs/recipe/bbc.yaml (its other sections are skipped).

    Args:
        model: the provider's model (registry name, folder or hub id).
        task: labelled dataset (stratified train/val/test split), as in `xsilo evaluate`.
        out: the head's folder; it is served under the folder's name (must be empty or missing unless --overwrite).
        publish_ood: also publish a feature-space Mahalanobis detector (class means and shared precision of
            MODEL's states: it reveals them), thresholded on the val split, that split-mode clients run.
        ood_tpr: share of val states the detector's threshold keeps.
        mahalanobis_shrinkage: shrinkage of the shared covariance towards a scaled identity.
        task_limit: keep N task rows (a seeded random sample).
        extraction: how states are read (pooling, layer, max_length, dtype, columns of a user's file).
        head: the logistic-regression head.
        seed: split and training seed (recorded in the manifest's metrics).
        overwrite: replace an existing folder.
        accelerator: cpu, gpu or auto.
        devices: 1 or auto (one device).
        precision: Lightning precision of fitting; auto is 32-true.
        threads: torch threads.
    """
    from lightning_modules.heads import HeadConfig, fit_head

    _quiet()
    cfg = HeadConfig(model=model, task=task, task_limit=task_limit, extraction=extraction, head=head,
                     device=DeviceSettings(accelerator, devices, precision, threads), seed=seed,
                     publish_ood=publish_ood, ood_tpr=ood_tpr, mahalanobis_shrinkage=mahalanobis_shrinkage)
    result = fit_head(cfg, out, overwrite=overwrite)
    m = result["metrics"]
    ood = result["feature_ood"]
    print(f"{len(result['label_names'])} classes; native accuracy val {m['native_val']['accuracy']:.3f}, test "
          f"{m['native_test']['accuracy']:.3f}" + (f"; feature OOD threshold {ood['threshold']:.4g} at tpr "
                                                   f"{ood['tpr']}" if ood else ""), file=sys.stderr)
    print(out)


def align(
    *,
    server: str,
    model: str,
    out: str,
    head: str | None = None,
    extraction: ExtractionSettings = ExtractionSettings(),
    fit: FitSettings = FitSettings(),
    api_key: str | None = None,
    timeout: float = 300.0,
    accelerator: Accelerator = "auto",
    devices: Devices = "auto",
    threads: int | None = None,
) -> None:
    """Client: fit the map from MODEL into a provider's states by a private fit, and save it as a map folder.

    The provider sends its public texts; MODEL's states on them are encrypted here, the provider multiplies them
    by its own under CKKS, and only this client decrypts the products and solves the ridge map. Neither side
    sees the other's states; the map stays here (`xsilo query --head NAME --aligner OUT`). A recipe file sets
    the extraction and fit settings: --config configs/recipe/bbc.yaml (its other sections are skipped).

    Args:
        server: the provider's base URL (it serves --public DIR).
        model: the client's model (registry name, folder or hub id).
        out: the map folder to write.
        head: a head the provider serves: choose λ by the logit error through it on the public val rows
            (criterion auto = head; the provider must serve --publish_val_logits true; costs one encrypted query
            per direction the maps can reach, at most min(d_A, d_B) + 2 rows). Default: λ by GCV.
        extraction: how MODEL's states are read (pooling, layer, max_length, dtype).
        fit: how the map is solved (estimator, λ path and its criterion, centring, standardisation).
        api_key: the server's API key (default $XSILO_API_KEY).
        timeout: seconds per HTTP request.
        accelerator: where the extraction runs: cpu, gpu or auto.
        devices: 1 or auto (one device).
        threads: torch threads (extraction, key generation and encryption).
    """
    from lightning_modules.private_fit import align as run_align
    from serve.client import ServeError

    _quiet()
    last = [0.0]

    def progress(done: int, total: int) -> None:
        if done == total or time.monotonic() - last[0] > float(os.environ.get("XSILO_PROGRESS_S", "10")):
            last[0] = time.monotonic()
            print(f"fit: {done}/{total} chunks sent", file=sys.stderr)

    try:
        result = run_align(server, model, out, fit=fit, extraction=extraction,
                           device=DeviceSettings(accelerator, devices, "auto", threads),
                           api_key=api_key or os.environ.get("XSILO_API_KEY"), timeout=timeout, progress=progress,
                           head=head)
    except ServeError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    m = result.metrics
    lam = "none" if m["chosen_lambda"] is None else f"{m['chosen_lambda']:.0e}"
    r2 = "n/a" if m["val_r2"] is None else f"{m['val_r2']:.3f}"
    if m["chosen"]:
        lam += f" by {m['criterion']} (" + ", ".join(f"{k} {v:.0e}" for k, v in m["chosen"].items()) + ")"
    print(f"private fit on {m['rows']['train']} + {m['rows']['val']} public rows: λ {lam}, val R² {r2}; sent "
          f"{m['bytes_sent'] / 1e6:.1f} MB, received {m['bytes_received'] / 1e6:.1f} MB; provider "
          f"{m['provider_ms'] / 1000:.1f} s, client {m['client_ms'] / 1000:.1f} s", file=sys.stderr)
    if "head" in m:
        probed = m["head"]
        print(f"head {probed['name']!r} probed on {probed['probe_rows']} encrypted rows ({probed['ciphertexts']} "
              f"queries, {probed['rows_charged']} rows of the provider's budget)", file=sys.stderr)
    print(out)


def ablate(
    *,
    source: str = "smollm2",
    target: str = "gemma3",
    task: str = "bbc",
    task_limit: int | None = None,
    base: Recipe = Recipe(),
    factors: list[str] | None = None,
    sizes: list[int] | None = None,
    mixes: list[str] | None = None,
    views: list[str] | None = None,
    view_task_limit: int | None = None,
    view_size: int | None = None,
    estimators: list[str] | None = None,
    ranks: list[int | str] | None = None,
    criteria: list[str] | None = None,
    whiten_estimators: list[str] | None = None,
    finetune_losses: list[str] | None = None,
    public_seeds: list[int] | None = None,
    exclude_tasks: list[str] | None = None,
    ood: list[str] | None = None,
    ood_limit: int | None = 500,
    ood_detector: str = "mahalanobis",
    max_extract: int | None = 0,
    bootstrap: int = 1000,
    extraction: ExtractionSettings = ExtractionSettings(),
    fit: FitSettings = FitSettings(),
    head: HeadSettings = HeadSettings(),
    seed: int = 0,
    accelerator: Accelerator = "auto",
    devices: Devices = "auto",
    precision: Precision = "auto",
    threads: int | None = None,
    out: str = "runs/ablation",
) -> None:
    """Vary each factor of the alignment recipe alone from a base recipe; mapped accuracy, macro-F1, the
    majority-class rate, the top-prediction share and a collapse flag, drop from native, alignment and OOD AUROC
    per setting. Writes ablation.json, ablation.md and ablation.png.

    Args:
        source: client model.
        target: server model whose head reads the mapped states.
        task: labelled dataset.
        task_limit: keep N task rows (a seeded random sample).
        base: the base recipe: --base.mix movie-dialog:0.5,bbc:0.5 --base.size 4000 --base.standardize true ...
            (pooling/layer default to the extraction settings', estimator/standardize to the fit settings');
            --base.mix broad: every unlabelled registry source but the task (leave-task-out).
        factors: factors to vary: size, mix, view, standardize, estimator, criterion, whiten_target, recenter,
            finetune, seed (default: all).
        sizes: public-set sizes (default 1000 4000 16000 64000).
        mixes: public-set mixes, or broad (default: dialog, dialog + the task's training texts, the task's texts
            only, broad).
        views: POOLING@LAYER or POOLING@SOURCE_LAYER/TARGET_LAYER, e.g. mean@-1 last@15/9 (default mean@-1).
        view_task_limit: task rows for the view factor (new views need new forward passes).
        view_size: public rows for the view factor.
        estimators: estimators besides the ridge λ path (default lstsq procrustes scaled_procrustes reduced_rank
            cca).
        ranks: ranks of reduced_rank and cca; k-1 is the task's classes minus one (default k-1 16 64 256; a rank
            above min(d_x, d_y) is reported as skipped).
        criteria: λ criteria of the criterion factor (default gcv val_mse head).
        whiten_estimators: estimators the whiten_target factor fits with and without target whitening (default
            ridge reduced_rank procrustes; reduced_rank at the first rank).
        finetune_losses: fine-tuning losses to try (default mse task).
        public_seeds: public-set sampling seeds besides the base one (default 1 2).
        exclude_tasks: other tasks whose val/test texts stay out of every public set (NAME or NAME@LIMIT).
        ood: OOD datasets (excluded from every public set); AUROC of --ood_detector per setting.
        ood_limit: rows per OOD set.
        ood_detector: msp, max_logit, energy, mahalanobis or knn.
        max_extract: new forward passes allowed per (model, dataset); settings needing more are reported as
            skipped (states already cached for the same texts are reused for free).
        bootstrap: resamples for the 95% intervals.
        extraction: what every view shares (max_length, dtype, columns); pooling/layer are the recipe's.
        fit: the ridge λ path (fit.lambdas) of the estimator factor.
        head: the logistic-regression heads.
        seed: split, training and bootstrap seed (recorded in ablation.json).
        accelerator: cpu, gpu or auto.
        devices: number of devices, or auto.
        precision: Lightning precision of fitting (32-true, bf16-mixed, ...); auto is 32-true.
        threads: torch threads.
        out: output directory.
    """
    from lightning_modules.experiments.ablation import FACTORS, AblationConfig, run_ablation

    _quiet()
    defaults = AblationConfig()
    cfg = AblationConfig(
        source=source, target=target, task=task, task_limit=task_limit, base=base,
        factors=factors or FACTORS, sizes=sizes or defaults.sizes, mixes=mixes or (), views=views or defaults.views,
        view_task_limit=view_task_limit, view_size=view_size, estimators=estimators or defaults.estimators,
        ranks=ranks or defaults.ranks, criteria=criteria or defaults.criteria,
        whiten_estimators=whiten_estimators or defaults.whiten_estimators,
        finetune=finetune_losses or defaults.finetune, public_seeds=public_seeds or defaults.public_seeds,
        exclude_tasks=exclude_tasks or (), ood=ood or (), ood_limit=ood_limit, ood_detector=ood_detector,
        max_extract=max_extract, bootstrap=bootstrap, extraction=extraction, fit=fit, head=head,
        device=DeviceSettings(accelerator, devices, precision, threads), seed=seed)

    def progress(row: dict) -> None:
        text = (f"{row['mapped']['accuracy']:.3f} (drop {row['mapped_drop']:+.3f}, macro-F1 "
                f"{row['mapped']['macro_f1']:.3f}{', COLLAPSE' if row['collapse'] else ''})" if row["status"] == "ok"
                else f"skipped: {row['reason']}")
        print(f"{row['factor']:<12} {row['value']:<45} {text}", file=sys.stderr)

    results = run_ablation(cfg, out=out, progress=progress)
    print(f"wrote {', '.join(results['files'])}")


def export(
    *,
    aligner: str,
    classifier: str,
    out: str,
    metrics: str | None = None,
    ood: str | None = None,
    overwrite: bool = False,
) -> None:
    """Fuse an aligner and a target classifier into one linear layer (safetensors + ONNX + manifest).

    Also writes the map alone and the head alone, for split mode.

    Args:
        aligner: the map: an AffineAligner checkpoint (.ckpt), a map folder (`save_pretrained`, e.g.
            `xsilo evaluate --out DIR`'s DIR/map) or a hub id.
        classifier: LinearClassifier checkpoint trained on the aligner's target states.
        out: export directory (must be empty or missing unless --overwrite).
        metrics: a metrics.json to record in the manifest.
        ood: an ood-threshold.json from `xsilo evaluate_ood`, applied by clients to decrypted logits.
        overwrite: replace an existing export.
    """
    from lightning_modules.export import export_checkpoints

    recorded = json.loads(Path(metrics).read_text()) if metrics else None
    thresholds = json.loads(Path(ood).read_text()) if ood else None
    path = export_checkpoints(aligner, classifier, out, metrics=recorded, ood=thresholds, overwrite=overwrite)
    print(path)


def serve(*, export: str | None = None, heads: list[str] | None = None, public: str | None = None,
          host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_sessions: int = SERVER.max_sessions, session_ttl_s: float = SERVER.session_ttl_s,
          max_concurrency: int = SERVER.max_concurrency, replica_id: str | None = SERVER.replica_id,
          header_timeout_s: float = SERVER.header_timeout_s, body_timeout_s: float = SERVER.body_timeout_s,
          max_connections: int = SERVER.max_connections, rows_per_session: int | None = SERVER.rows_per_session,
          rows_per_client: int | None = SERVER.rows_per_client, output_noise: float = SERVER.output_noise,
          circuit_privacy: int | None = SERVER.circuit_privacy, max_fit_sessions: int = SERVER.max_fit_sessions,
          fits_per_client: int | None = SERVER.fits_per_client, max_fit_source_dim: int = SERVER.max_fit_source_dim,
          publish_val_logits: bool = SERVER.publish_val_logits, log_level: str = "info") -> None:
    """Serve linear layers under CKKS encryption over HTTP, and private fits (API docs at /docs).

    The server evaluates W h + b on encrypted hidden states: it never sees texts, states or logits. Pass at least
    one of --export, --heads and --public.

    Args:
        export: a fused export directory (from `xsilo export`).
        heads: head folders (from `xsilo head fit`), each served under its folder's name for split-mode clients.
        public: a public-states folder (from `xsilo public-set export`): offers private fits (`xsilo align`).
        host: interface to bind (0.0.0.0 for all).
        port: TCP port.
        api_key: require this key as 'Authorization: Bearer KEY' or 'X-API-Key: KEY' (default $XSILO_API_KEY;
            an empty key is refused).
        max_sessions: sessions kept at once; beyond it the least recently used is evicted.
        session_ttl_s: idle seconds before a session is dropped.
        max_concurrency: HE evaluations running at once (threads).
        replica_id: prefix of session ids, for routing by session id behind a load balancer.
        header_timeout_s: seconds a client has to send a request's headers.
        body_timeout_s: seconds a client has to send a request's body, after its headers.
        max_connections: open connections; beyond it requests get 503.
        rows_per_session: query budget: rows (query lanes) answered per session (default: no limit).
        rows_per_client: query budget per API key, or per client address without a key (default: no limit).
        output_noise: standard deviation of Gaussian noise added to every output, against model extraction.
        circuit_privacy: statistical security in bits (e.g. 30) of circuit-private replies (profile n8192-private).
        max_fit_sessions: private fits running at once; beyond it 503.
        fits_per_client: private fits opened per API key, or per client address without one (null: no limit).
        max_fit_source_dim: the largest client state dimension a private fit accepts.
        publish_val_logits: publish each head's logits on the public set's val rows (GET
            /v1/public-set/val-logits), so clients can choose λ through the head (`xsilo align --head NAME`).
        log_level: log level of uvicorn and the request log.
    """
    import os

    from serve.server import run

    run(export, heads=heads or (), public=public, host=host, port=port,
        api_key=api_key if api_key is not None else os.environ.get("XSILO_API_KEY"),
        max_sessions=max_sessions, session_ttl_s=session_ttl_s, max_concurrency=max_concurrency,
        replica_id=replica_id, header_timeout_s=header_timeout_s, body_timeout_s=body_timeout_s,
        max_connections=max_connections, rows_per_session=rows_per_session, rows_per_client=rows_per_client,
        output_noise=output_noise, circuit_privacy=circuit_privacy, max_fit_sessions=max_fit_sessions,
        fits_per_client=fits_per_client, max_fit_source_dim=max_fit_source_dim,
        publish_val_logits=publish_val_logits, log_level=log_level)


def query(*, server: str = "http://127.0.0.1:8000", text: list[str] | str | None = None, file: str | None = None,
          head: str | None = None, aligner: str | None = None, api_key: str | None = None,
          client_model: str | None = None, threads: int | None = None, timeout: float = 60.0) -> None:
    """Classify texts through an encrypted server; print one JSON line per text.

    Extraction, encryption and decryption run here: the server sees public keys and ciphertexts only.

    Args:
        server: server base URL.
        text: a text, or a list: --text '["first text", "second text"]'.
        file: a file with one text per line (- for stdin).
        head: split mode: the served head to query (its name in the server's /v1/model "heads"); needs --aligner.
        aligner: split mode: this client's map folder (`xsilo align --out DIR`), applied here before encryption.
        api_key: the server's API key (default $XSILO_API_KEY).
        client_model: local copy of the client model (default: the model the server names).
        threads: torch threads for extraction.
        timeout: seconds per HTTP request.
    """
    import os

    from serve.client import Client, ServeError

    texts = [text] if isinstance(text, str) else list(text or [])
    if file:
        lines = sys.stdin.read() if file == "-" else Path(file).read_text(encoding="utf-8")
        texts += [line for line in lines.splitlines() if line.strip()]
    if not texts:
        print("error: nothing to classify; pass --text or --file", file=sys.stderr)
        raise SystemExit(2)
    _quiet()
    try:
        with Client(server, api_key=api_key or os.environ.get("XSILO_API_KEY"), timeout=timeout, head=head,
                    aligner=aligner, client_model=client_model, threads=threads) as client:
            results = client.classify(texts)
    except ServeError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    for t, r in zip(texts, results):
        line = {"text": t[:60], "label": r["label"],
                "probabilities": {k: round(v, 4) for k, v in r["probabilities"].items()}}
        if "ood" in r:
            line["ood"] = r["ood"]
        print(json.dumps(line))
    timings = results[0]["timings"]
    print(", ".join(f"{k[:-3]} {timings[k]:.1f} ms" for k in ("extract_ms", "encrypt_ms", "http_ms", "server_ms",
                                                               "decrypt_ms", "total_ms")), file=sys.stderr)


COMMANDS = {
    "assets": {"list": assets_list, "prepare": assets_prepare},
    "extract": extract,
    "evaluate": evaluate,
    "evaluate_ood": evaluate_ood,
    "evaluate_generation": evaluate_generation,
    "generate": generate,
    "study": study,
    "report": report,
    "ablate": ablate,
    "public-set": {"build": public_set_build, "export": public_set_export},
    "export": export,
    "head": {"fit": head_fit},
    "align": align,
    "serve": serve,
    "query": query,
}
PARTY_COMMANDS = (head_fit, align, public_set_export)  # one side of a two-party recipe (see RECIPE_SECTIONS)


def build_parser():
    """The one `xsilo` parser (a jsonargparse ArgumentParser): every subcommand, each with its --help.

    The LightningCLI subcommands are listed with their help line; their options belong to LightningCLI's
    own parser, built only when one of them runs, so that no other subcommand imports Lightning.
    """
    from jsonargparse import ArgumentParser

    root = ArgumentParser(prog="xsilo", description="Secure linear alignment of LLMs: extract, fit, evaluate, "
                                                    "export and serve under CKKS. Each subcommand has --help.")
    root.add_argument(REGISTRY_FLAG, type=str, help="a registry YAML of your own models and datasets, used before "
                                                    "the packaged one (sets $XSILO_REGISTRY), e.g. xsilo --registry "
                                                    "my.yaml evaluate ...")
    _add_subcommands(root, {**LIGHTNING_SUBCOMMANDS, **COMMANDS})
    return root


def _add_subcommands(parser, commands: dict) -> None:
    from jsonargparse import ActionConfigFile, ArgumentParser

    subcommands = parser.add_subcommands(required=True)
    for name, command in commands.items():
        if isinstance(command, str):  # a LightningCLI subcommand
            help_line, description = command, f"{command} Options: xsilo {name} --help"
        elif isinstance(command, dict):
            help_line = description = f"{name} subcommands: {', '.join(command)}"
        else:
            help_line = description = " ".join((command.__doc__ or name).strip().split("\n\n")[0].split())
        sub = ArgumentParser(description=description)
        subcommands.add_subcommand(name, sub, help=help_line)  # a level is added before the levels under it
        if isinstance(command, dict):
            _add_subcommands(sub, command)
        elif callable(command):
            sub.add_argument("--config", action=ActionConfigFile, help="a YAML file holding any of these options")
            sub.add_function_arguments(command, as_group=False, as_positional=True, fail_untyped=True,
                                       sub_configs=True)


REGISTRY_FLAG = "--registry"


def use_registry_flag(argv: list[str]) -> list[str]:
    """Apply a leading `--registry PATH` (or `--registry=PATH`) and return the rest of `argv`."""
    if argv[:1] == [REGISTRY_FLAG] and len(argv) > 1:
        path, rest = argv[1], argv[2:]
    elif argv and argv[0].startswith(REGISTRY_FLAG + "="):
        path, rest = argv[0].split("=", 1)[1], argv[1:]
    else:
        return argv
    from datamodules.assets import use_registry

    use_registry(path)
    return rest


def _command(argv: list[str]):
    """The function `argv` names (`assets prepare` → assets_prepare), or None."""
    command = COMMANDS.get(argv[0]) if argv else None
    if isinstance(command, dict):
        command = command.get(argv[1]) if len(argv) > 1 else None
    return command if callable(command) else None


def list_options(command) -> set[str]:
    """The options of a command function that take a list (`list[...]` anywhere in their type), including
    the fields of dataclass parameters (`--recipe.ood`)."""
    import dataclasses
    import types
    import typing

    def alternatives(t) -> tuple:
        union = typing.get_origin(t) in (typing.Union, types.UnionType)
        return typing.get_args(t) if union else (t,)

    def options(hints: dict, prefix: str) -> set[str]:
        found: set[str] = set()
        for name, t in hints.items():
            for alt in alternatives(t):
                if alt is list or typing.get_origin(alt) is list:
                    found.add(f"{prefix}{name}")
                elif dataclasses.is_dataclass(alt):
                    found |= options(typing.get_type_hints(alt), f"{prefix}{name}.")
        return found

    hints = {k: v for k, v in typing.get_type_hints(command).items() if k != "return"}
    return options(hints, "--")


# The sections of a recipe file (configs/recipe/*.yaml). Each party's command takes only its side of them
# (`head fit`: extraction and head; `align`: extraction and fit; `public-set export`: extraction) and skips the
# others of a --config file, so one recipe serves both parties. Every other command still refuses a section it
# does not take, as does a party's command any other unknown key.
RECIPE_SECTIONS = ("public", "extraction", "fit", "head", "seed", "task_limit")


def skip_recipe_sections(argv: list[str], command) -> list[str]:
    """`argv` with each `--config FILE` that holds recipe sections `command` does not take replaced by the file's
    other keys (as one YAML/JSON string, which `--config` accepts too)."""
    import dataclasses
    import inspect

    import yaml

    if command not in PARTY_COMMANDS:
        return argv
    params = inspect.signature(command).parameters

    def skipped(key: str, value: object) -> bool:  # align's --head NAME is a string: the recipe's head section is not
        return key in RECIPE_SECTIONS and (key not in params or (
            isinstance(value, dict) and not dataclasses.is_dataclass(params[key].default)))

    out = list(argv)
    for i, word in enumerate(argv):
        value, at = (argv[i + 1], i + 1) if word == "--config" and i + 1 < len(argv) else (
            (word.split("=", 1)[1], i) if word.startswith("--config=") else (None, None))
        if value is None or not Path(value).is_file():
            continue
        try:
            doc = yaml.safe_load(Path(value).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue  # jsonargparse reports an unreadable file itself
        if isinstance(doc, dict) and any(skipped(k, v) for k, v in doc.items()):
            kept = json.dumps({k: v for k, v in doc.items() if not skipped(k, v)})
            out[at] = kept if at != i else f"--config={kept}"
    return out


_NEGATIVE = re.compile(r"-\.?\d")  # a word like -1 or -5% is a value, not an option


def word_lists(argv: list[str], options: set[str] | None = None) -> list[str]:
    """`--models a b c` → `--models ["a", "b", "c"]`, because jsonargparse takes one value per option.

    options=None (LightningCLI, whose types are not known here): any option followed by two or more
    words. A list already written as `[a,b]` or `null` is kept as it is.
    """
    out: list[str] = []
    i = 0
    while i < len(argv):
        out.append(argv[i])
        j = i + 1
        if argv[i].startswith("--") and (options is None or argv[i] in options):
            while j < len(argv) and not (argv[j].startswith("-") and not _NEGATIVE.match(argv[j])):
                j += 1
        words = argv[i + 1:j]
        single_kept = len(words) == 1 and (options is None or words[0].startswith("[") or words[0] == "null")
        if words and not single_kept:
            out.append(json.dumps(words))
            i = j
        else:
            i += 1
    return out


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:  # the server handles its own signals (uvicorn's graceful shutdown)
        _main(argv)
        return
    from datamodules.signals import Stopped, stop_on_signals

    try:
        with stop_on_signals():
            _main(argv)
    except Stopped as e:
        # SIGTERM or Ctrl-C: every file is written atomically, so what finished is kept and a rerun resumes.
        print(str(e), file=sys.stderr)
        raise SystemExit(e.exit_code) from None


def _main(argv: list[str]) -> None:
    try:
        argv = use_registry_flag(argv)
        if argv and argv[0] in LIGHTNING_SUBCOMMANDS:
            from lightning_modules.lightning_cli import run_lightning_cli

            run_lightning_cli(word_lists(argv))
            return
        if argv[:2] == ["assets", "prepare"] and len(argv) > 2 and not argv[2].startswith("-"):
            argv = argv[:2] + ["--names"] + argv[2:]
        command = _command(argv)
        if command is not None:
            argv = word_lists(skip_recipe_sections(argv, command), list_options(command))
        parser = build_parser()
        run_parsed(parser.instantiate(parser.parse_args(argv)))  # settings groups become their dataclasses
    except ValueError as e:
        # Every xsilo check of user input (assets, caches, exports, configs, ciphertexts) raises a
        # ValueError whose message names the problem and the fix. XSILO_DEBUG=1 shows the traceback.
        if os.environ.get("XSILO_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("interrupted: finished shards and files are kept; rerun to resume", file=sys.stderr)
        raise SystemExit(130) from None
    except ModuleNotFoundError as e:
        # The base install serves only; models, fitting and evaluation need the `train` extra.
        if not e.name or e.name.split(".")[0] not in _train_modules():
            raise
        command = " ".join(argv[:2] if argv and isinstance(COMMANDS.get(argv[0]), dict) else argv[:1])
        print(f"error: `xsilo {command}` needs {e.name}, which is not installed; "
              "install the training extras: pip install 'xsilo[train]'", file=sys.stderr)
        raise SystemExit(2) from None


def run_parsed(cfg) -> None:
    """Call the function that a `build_parser()` parse names, with its parsed options."""
    command, options = COMMANDS, cfg
    while isinstance(command, dict):
        name = options.subcommand
        command, options = command[name], options[name]
    kwargs = options.as_dict()
    kwargs.pop("config", None)
    command(**kwargs)


def _train_modules() -> set[str]:
    """Top-level modules of the `train` extra (each is named like its distribution)."""
    import re
    from importlib.metadata import PackageNotFoundError, requires

    try:
        requirements = requires("xsilo") or []
    except PackageNotFoundError:
        return set()
    return {re.split(r"[^A-Za-z0-9_.-]", r, maxsplit=1)[0].lower().replace("-", "_")
            for r in requirements if re.search(r"extra\s*==\s*['\"]train['\"]", r)}


if __name__ == "__main__":
    main()

"""The data commands of `xsilo` (`assets list`, `assets prepare`, `extract`, `public-set synthesize`) and `quiet`,
which every command that loads a model calls first. Each command is a typed function whose signature is its options
(see `lightning_modules.cli`); the heavy imports happen inside it, when it runs.
"""

from __future__ import annotations

import sys
import time
from typing import Literal

from datamodules.synthetic import SyntheticTextSettings
from serve.formats.views import StateView

Accelerator = Literal["auto", "cpu", "gpu", "cuda", "mps"]  # as lightning_modules.settings.Accelerator


# Lightning's banners ("GPU available: ...", "TPU available: ...", the litlogger tip) are INFO records of these
# loggers; `import lightning.pytorch` sets its package logger back to INFO, so the leaves are set instead.
LIGHTNING_CHATTER = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                     "lightning.pytorch.accelerators.cuda", "lightning.pytorch.utilities.distributed")


def quiet() -> None:
    """Commands that are not LightningCLI print results, not library chatter (Lightning's banners and tips,
    progress bars of datasets and transformers, their info logs), whether Lightning is imported before or after."""
    import logging
    import os
    import warnings

    import transformers

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    for name in LIGHTNING_CHATTER:
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    if "datasets" in sys.modules:  # else it reads this when (if) it is imported: a client never pays its import
        sys.modules["datasets"].disable_progress_bars()
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def assets_list() -> None:
    """Show the known models and datasets and whether each is prepared under $XSILO_HOME."""
    from datamodules.assets import asset_table
    from datamodules.registry import xsilo_home

    rows = asset_table()
    print(f"XSILO_HOME={xsilo_home()}")
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        print(f"{r['name']:<{width}}  {r['kind']:<7}  prepared={r['prepared']:<3}  {r['description']}")


def assets_prepare(*names: str) -> None:
    """Install, join and convert assets (all when no NAME is given). Idempotent.

    Args:
        names: asset names, e.g. smollm2 gemma3 bbc.
    """
    from datamodules.assets import prepare

    quiet()
    t0 = time.perf_counter()
    worked = prepare(list(names) or None)
    if worked:
        print(f"prepared {', '.join(worked)} in {time.perf_counter() - t0:.1f}s")
    else:
        print("nothing to do: every requested asset is already prepared")


def public_set_synthesize(*, synthetic: SyntheticTextSettings, threads: int | None = None) -> None:
    """Provider: write a synthetic set of a head's domain, from a few words per class, and print its .jsonl path.

    An LM writes the texts from your prompts (one per class: what its texts look like), crossed with topics; no
    text of anyone's task goes in, so the set is public. Publish it as your public set's anchors (`xsilo public-set
    export ... --anchors PATH`): every client's fit then weighs texts like your task's, at a share the client
    chooses, without a client disclosing any. Written once per settings and model; a second run prints the same
    path at once.

    Args:
        synthetic: the prompts (each with {topic}), topics, rows, writing model and filters:
            --config configs/synthetic/trec.yaml.
        threads: torch threads for the writing model.
    """
    from datamodules.synthetic import synthesize

    quiet()
    t0 = time.perf_counter()
    path = synthesize(synthetic, threads)
    rows = sum(1 for _ in open(path, encoding="utf-8"))
    print(f"{rows} synthetic texts by {synthetic.model} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    print(path)


def extract(
    *,
    model: str,
    data: str,
    split: str = "train",
    view: StateView = StateView(),
    batch_size: int = 16,
    limit: int | None = None,
    text_column: str = "text",
    label_column: str | None = "label",
    cache_dir: str | None = None,
    shard_size: int = 2048,
    accelerator: Accelerator = "auto",
    devices: int | Literal["auto"] = "auto",
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
        view: which states are read (--pooling, --layer, --max_length, --dtype).
        batch_size: texts per forward pass.
        limit: keep N rows (a seeded random sample, in file order).
        text_column: text column of a non-registry dataset.
        label_column: label column of a non-registry dataset.
        cache_dir: cache root (default $XSILO_HOME/states).
        shard_size: rows per shard file (the unit that is kept when a run stops).
        accelerator: cpu, gpu or auto (a GPU when one is visible).
        devices: number of devices (DDP when > 1), or auto (every visible GPU, else one CPU process). The one
            command that runs on several devices, so it takes these rather than the one-device DeviceSettings.
        strategy: Lightning strategy, e.g. ddp.
        threads: torch threads per process.
    """
    from datamodules.extraction import ExtractionConfig, extract as run_extract

    quiet()
    config = ExtractionConfig(model=model, data=data, split=split, pooling=view.pooling, layer=view.layer,
                              max_length=view.max_length, dtype=view.dtype, batch_size=batch_size, limit=limit,
                              text_column=text_column, label_column=label_column)
    if shard_size <= 0:
        raise ValueError(f"shard_size must be a positive number of rows, got {shard_size}")
    result = run_extract(config, cache_root=cache_dir, shard_size=shard_size, accelerator=accelerator,
                         devices=devices, strategy=strategy, threads=threads)
    status = "cache hit" if result.hit else f"computed {result.computed_shards} shard(s)"
    print(f"{status}: {result.n_rows} x {result.dim} in {result.seconds:.1f}s", file=sys.stderr)
    print(result.path)

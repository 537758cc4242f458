"""Pooled hidden-state extraction through Lightning's predict loop, into the state cache.

`extract()` is the entry point. On a cache hit it returns without loading the model. On a
miss it plans contiguous shards, gives each rank every world_size-th unfinished shard,
and runs `Trainer.predict` with a `ShardWriter` that writes each shard once it is whole.
The same code runs on one CPU process or N GPUs under DDP. On one device, extractions in the
same process share each model's one load (`datamodules.encoder.loaded_model`, at most `LOADED_MODELS` kept).
A model's defaults and identity are `datamodules.models`'; running it (pooling, loading, `StateEncoder` for a few
texts in memory) `datamodules.encoder`'s.
"""

from __future__ import annotations

import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader

from datamodules.assets import resolve_model
from datamodules.registry import AssetError
from datamodules.cache import (
    LABELS,
    MANIFEST,
    FORMAT_VERSION,
    CacheError,
    CacheKey,
    StateCache,
    atomic_save_npy,
    atomic_write_bytes,
    atomic_write_json,
    cache_dir_for,
    encode_states,
    ensure_writable,
    find_equivalent,
    link_shards,
    shard_name,
    valid_shard,
)
from datamodules.distributed import ProcessGroupCleanup
from datamodules.progress import ProgressLines, is_terminal, record_stage
from datamodules.signals import Stopped, stop_on_signals
from datamodules.encoder import load_frozen_model, load_tokenizer, loaded_model, pooled_states
from datamodules.models import Pooling, check_layer, check_options, model_defaults, model_identity
from datamodules.text import dataset_fingerprint, label_names, load_texts
from serve.formats.digests import texts_fingerprint
from serve.formats.views import StateView


# --- config -----------------------------------------------------------------------------

@dataclass
class ExtractionConfig:
    """What to extract. `model`/`data` take registry names, local paths or hub ids."""

    model: str
    data: str
    split: str = "train"
    pooling: Pooling | None = StateView.pooling  # None: the model's own (`model_defaults`)
    layer: int = StateView.layer  # index into hidden_states: -1 is the final (normed) layer, 0 the embeddings
    max_length: int | None = StateView.max_length  # None: the model's own limit, at most MAX_LENGTH_CAP
    dtype: Literal["float32", "bfloat16", "float16"] = StateView.dtype
    batch_size: int = 16
    limit: int | None = None
    text_column: str | None = None
    label_column: str | None = "label"

    def validate(self) -> None:
        check_options(self.pooling, self.max_length, self.dtype, self.batch_size)

    @property
    def view(self) -> StateView:
        """Which states are read: the one extraction vocabulary (serve.formats.views), declared there once."""
        return StateView(self.pooling, self.layer, self.max_length, self.dtype)


@dataclass
class ResolvedExtraction:
    """An ExtractionConfig with everything looked up: paths, pooling, cache key and folder."""

    config: ExtractionConfig
    model_path: str
    pooling: str
    max_length: int
    n_layers: int
    hidden_size: int
    key: CacheKey
    directory: Path
    texts: list[str] = field(repr=False)
    labels: list[int] | None = field(repr=False)
    label_names: list[str] | None
    defaults_from: dict[str, str] = field(default_factory=dict)

    def spec(self) -> dict[str, Any]:
        """What a client needs to reproduce these states: model identity, pooling, layer, length.

        `pooling`, `layer` and `max_length` are as resolved; `defaults_from` says where each one
        the user left unset came from (the model's files, or xsilo's rule)."""
        c = self.config
        return {"model": c.model, "model_identity": self.key.model_identity, "pooling": self.pooling,
                "layer": c.layer, "n_layers": self.n_layers, "max_length": self.max_length, "dtype": c.dtype,
                "hidden_size": self.hidden_size, "data": c.data, "text_column": c.text_column,
                "label_column": c.label_column, "defaults_from": self.defaults_from, "cache": str(self.directory)}

    def describe(self) -> str:
        """One line: the resolved pooling, layer and max_length, and where the defaults came from."""
        layer = f"{self.config.layer} (final of {self.n_layers})" if self.config.layer == -1 else str(self.config.layer)
        why = "; ".join(f"{k} from {v}" for k, v in self.defaults_from.items())
        return (f"{self.config.model}: pooling {self.pooling}, layer {layer}, max_length {self.max_length}"
                + (f" ({why})" if why else ""))


def resolve(config: ExtractionConfig, cache_root: str | Path | None = None) -> ResolvedExtraction:
    from transformers import AutoConfig

    config.validate()
    model_path = resolve_model(config.model)
    try:
        model_config = AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError) as e:
        raise AssetError(f"cannot read a model config from {config.model!r}: {e}") from e
    text_config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    check_layer(config.layer, text_config.num_hidden_layers)
    defaults = model_defaults(model_path, model_config)
    pooling = config.pooling or defaults.pooling
    max_length = config.max_length or defaults.max_length
    defaults_from = {k: v for k, v in defaults.sources.items() if getattr(config, k) is None}
    ds = load_texts(config.data, config.split, config.text_column, config.label_column, config.limit)
    key = CacheKey(
        model_identity=model_identity(model_path),
        dataset_fingerprint=dataset_fingerprint(ds),
        split=config.split,
        pooling=pooling,
        layer=config.layer,
        max_length=max_length,
        dtype=config.dtype,
    )
    directory = cache_dir_for(key, config.model, f"{config.data}-{config.split}", cache_root)
    job = ResolvedExtraction(
        config=config, model_path=model_path, pooling=pooling, max_length=max_length,
        n_layers=text_config.num_hidden_layers, hidden_size=text_config.hidden_size,
        key=key, directory=directory, texts=list(ds["text"]),
        labels=list(ds["label"]) if "label" in ds.column_names else None, label_names=label_names(ds),
        defaults_from=defaults_from,
    )
    _announce(job.describe())
    return job


_ANNOUNCED: set[str] = set()


def _announce(line: str) -> None:
    """Print each resolved-extraction line once per process (DataModules resolve the same job often)."""
    if line not in _ANNOUNCED and len(_ANNOUNCED) < 1024:
        _ANNOUNCED.add(line)
        print(line, file=sys.stderr)


# --- Lightning pieces -------------------------------------------------------------------

def shard_ranges(n_rows: int, shard_size: int) -> list[tuple[int, int]]:
    return [(s, min(s + shard_size, n_rows)) for s in range(0, n_rows, shard_size)]


class HiddenStateExtractor(L.LightningModule):
    """Runs a frozen HF model over texts and returns pooled states per batch.

    The model is loaded in `setup()`, inside each process, so nothing large is pickled for
    spawned ranks. On one device, with `model_identity` given, it comes from `loaded_model`, so
    extracting several datasets in one process loads each model once. `predict_dataloader()`
    serves this rank's shards only.
    """

    def __init__(self, model_path: str, texts: list[str], shards: list[tuple[int, int]],
                 pooling: str, layer: int, max_length: int, dtype: str, batch_size: int,
                 threads: int | None = None, model_identity: str | None = None):
        super().__init__()
        self.model_path, self.model_identity, self.texts, self.shards = model_path, model_identity, texts, shards
        self.pooling, self.layer, self.max_length = pooling, layer, max_length
        self.compute_dtype, self.batch_size, self.threads = dtype, batch_size, threads
        self.encoder = None
        self.tokenizer = None

    def setup(self, stage: str) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        if self.trainer.world_size == 1 and self.model_identity is not None:
            key = (self.model_path, self.model_identity, self.compute_dtype, str(self.trainer.strategy.root_device))
            self.tokenizer, self.encoder = loaded_model(key)
        else:  # DDP: every rank loads its own copy, and nothing outlives the run
            self.tokenizer = load_tokenizer(self.model_path)
            self.encoder = load_frozen_model(self.model_path, self.compute_dtype)

    def batches(self, rank: int, world_size: int) -> list[list[int]]:
        """Row-index batches for this rank: whole shards, rows sorted by length within each."""
        out = []
        for start, stop in self.shards[rank::world_size]:
            rows = sorted(range(start, stop), key=lambda i: (-len(self.texts[i]), i))
            out.extend(rows[i:i + self.batch_size] for i in range(0, len(rows), self.batch_size))
        return out

    def batch_costs(self, rank: int, world_size: int) -> list[float]:
        """Padded tokens of each of this rank's batches, in the order they run: the weights of the progress
        estimate (the first batches hold the longest rows)."""
        batches = self.batches(rank, world_size)
        rows = [i for batch in batches for i in batch]
        if not rows:
            return []
        ids = self.tokenizer([self.texts[i] for i in rows], truncation=True, max_length=self.max_length)["input_ids"]
        tokens = dict(zip(rows, (len(x) for x in ids)))
        return [float(len(batch) * max(tokens[i] for i in batch)) for batch in batches]

    def collate(self, rows: list[int]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer([self.texts[i] for i in rows], padding=True, truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "rows": torch.tensor(rows, dtype=torch.long)}

    def predict_dataloader(self) -> DataLoader:
        batches = self.batches(self.trainer.global_rank, self.trainer.world_size)
        return DataLoader(range(len(self.texts)), batch_sampler=FixedBatches(batches), collate_fn=self.collate)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        return {"rows": batch["rows"], "states": self(batch["input_ids"], batch["attention_mask"])}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return pooled_states(self.encoder, input_ids, attention_mask, self.layer, self.pooling)


class FixedBatches(torch.utils.data.Sampler[list[int]]):
    """A batch sampler over precomputed row-index batches (Lightning wraps it for predict)."""

    def __init__(self, batches: list[list[int]]):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class ShardWriter(BasePredictionWriter):
    """Collects batch outputs per shard and writes each shard atomically once it is whole.

    `shards` is the full plan, so a row's shard is `row // shard_size` on every rank.
    """

    def __init__(self, directory: Path, shards: list[tuple[int, int]], dim: int, dtype: str = "float32"):
        super().__init__(write_interval="batch")
        self.directory, self.shards, self.dim, self.dtype = directory, shards, dim, dtype
        self.shard_size = shards[0][1] - shards[0][0] if shards else 1
        self.buffers: dict[int, np.ndarray] = {}
        self.filled: dict[int, int] = {}

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx=0) -> None:
        rows = prediction["rows"].cpu().numpy()
        states = prediction["states"].cpu().numpy()
        for shard in np.unique(rows // self.shard_size):
            start, stop = self.shards[shard]
            sel = (rows // self.shard_size) == shard
            buf = self.buffers.setdefault(shard, np.zeros((stop - start, self.dim), np.float32))
            buf[rows[sel] - start] = states[sel]
            self.filled[shard] = self.filled.get(shard, 0) + int(sel.sum())
            if self.filled[shard] == stop - start:
                atomic_save_npy(self.directory / shard_name(shard), encode_states(self.buffers.pop(shard), self.dtype))


# --- entry point --------------------------------------------------------------------------

@dataclass
class ExtractionResult:
    path: Path
    hit: bool
    computed_shards: int
    seconds: float
    n_rows: int
    dim: int


def cache_hit(directory: Path) -> bool:
    try:
        StateCache(directory, verify=True)
        return True
    except CacheError:
        return False


def extract(
    config: ExtractionConfig,
    cache_root: str | Path | None = None,
    shard_size: int = 2048,
    accelerator: str = "cpu",
    devices: int | str = 1,
    strategy: str = "auto",
    threads: int | None = None,
    progress: bool = True,
) -> ExtractionResult:
    """Return the cache of pooled states for `config`, computing only what is missing: nothing when a cache of
    the same texts, model and view exists under another name (`adopt`). Its time is a stage of the active
    `progress.StageTimes`."""
    t0 = time.perf_counter()
    job = resolve(config, cache_root)
    directory = job.directory
    if cache_hit(directory) or adopt(job, cache_root):
        cache = StateCache(directory)
        return ExtractionResult(directory, True, 0, time.perf_counter() - t0, cache.n_rows, cache.dim)
    ensure_writable(directory)
    manifest = directory / MANIFEST
    if manifest.exists():
        manifest.unlink()  # never leave a complete-looking manifest over shards being redone
    shards = shard_ranges(len(job.texts), shard_size)
    done = {i for i, (a, b) in enumerate(shards) if valid_shard(directory, i, b - a, job.hidden_size)}
    pending = [i for i in range(len(shards)) if i not in done]
    if pending:
        module = HiddenStateExtractor(job.model_path, job.texts, [shards[i] for i in pending],
                                      job.pooling, config.layer, job.max_length, config.dtype,
                                      config.batch_size, threads, model_identity=job.key.model_identity)
        callbacks = [ShardWriter(directory, shards, job.hidden_size, config.dtype), ProcessGroupCleanup()]
        bar = progress and is_terminal()
        if progress and not bar:  # a log or a pipe: plain periodic lines instead of a bar
            rows = sum(shards[i][1] - shards[i][0] for i in pending)
            callbacks.append(ProgressLines(f"extract {config.model} {config.data}:{config.split}", rows))
        trainer = L.Trainer(accelerator=accelerator, devices=devices, strategy=strategy,
                            callbacks=callbacks, logger=False, enable_checkpointing=False,
                            enable_progress_bar=bar, enable_model_summary=False,
                            use_distributed_sampler=False, inference_mode=True)
        try:
            with stop_on_signals(), warnings.catch_warnings():
                # FixedBatches yields every pending row exactly once; Lightning cannot know that.
                warnings.filterwarnings("ignore", message=".*custom batch sampler.*")
                trainer.predict(module, return_predictions=False)
        except Stopped as stop:
            kept = sum(valid_shard(directory, i, b - a, job.hidden_size) is not None
                       for i, (a, b) in enumerate(shards))
            raise Stopped(stop.signum, f"{kept} of {len(shards)} shard(s) finished in {directory} are kept; "
                                       "rerun the same command to resume") from None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
        if trainer.global_rank != 0:
            return ExtractionResult(directory, False, len(pending), time.perf_counter() - t0,
                                    len(job.texts), job.hidden_size)
    finalise(job, shards)
    record_stage(f"extract {Path(config.model).name} {Path(config.data).name}:{config.split}",
                 time.perf_counter() - t0)
    return ExtractionResult(directory, False, len(pending), time.perf_counter() - t0,
                            len(job.texts), job.hidden_size)


def adopt(job: ResolvedExtraction, cache_root: str | Path | None = None) -> bool:
    """Make `job`'s cache from a finished cache of the same texts, model and view under another name (a registry
    name and the file it points to, another split or labels): its shards are linked, nothing is extracted. True
    when it did."""
    source = find_equivalent(job.key, texts_fingerprint(job.texts), Path(cache_root) if cache_root else None,
                             skip=job.directory)
    if source is None:
        return False
    ensure_writable(job.directory)
    stale = job.directory / MANIFEST
    if stale.exists():
        stale.unlink()
    try:
        shards = link_shards(source, job.directory)
        finalise(job, shards)
    except (CacheError, OSError, KeyError, ValueError):
        return False  # the other cache changed under us: extract as usual
    _announce(f"{job.config.model} on {job.config.data}: the same rows' states are cached in {source.name}; reused")
    return True


def finalise(job: ResolvedExtraction, shards: list[tuple[int, int]]) -> None:
    """Check every shard of a finished job, write its labels and, last, its manifest."""
    directory = job.directory
    records = []
    for i, (start, stop) in enumerate(shards):
        digest = valid_shard(directory, i, stop - start, job.hidden_size)
        if digest is None:
            raise CacheError(
                f"shard {shard_name(i)} in {directory} is missing or corrupt after extraction; "
                "rerun the same command to recompute it"
            )
        records.append({"file": shard_name(i), "start": start, "stop": stop, "sha256": digest})
    if job.labels is not None:
        import io

        buf = io.BytesIO()
        np.save(buf, np.asarray(job.labels, dtype=np.int64))
        atomic_write_bytes(directory / LABELS, buf.getvalue())
    cfg = job.config
    atomic_write_json(directory / MANIFEST, {
        "format": FORMAT_VERSION,
        "complete": True,
        "fingerprint": job.key.fingerprint(),
        "key": asdict(job.key),
        "model": cfg.model,
        "model_path": job.model_path,
        "data": cfg.data,
        "split": cfg.split,
        "limit": cfg.limit,
        "pooling": job.pooling,
        "layer": cfg.layer,
        "max_length": job.max_length,
        "dtype": cfg.dtype,
        "n_rows": len(job.texts),
        "texts_sha256": texts_fingerprint(job.texts),
        "dim": job.hidden_size,
        "label_names": job.label_names,
        "shards": records,
    })

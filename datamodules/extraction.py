"""Pooled hidden-state extraction through Lightning's predict loop, into the state cache.

`extract()` is the entry point. On a cache hit it returns without loading the model. On a
miss it plans contiguous shards, gives each rank every world_size-th unfinished shard,
and runs `Trainer.predict` with a `ShardWriter` that writes each shard once it is whole.
The same code runs on one CPU process or N GPUs under DDP. On one device, extractions in the
same process share each model's one load (`loaded_model`, at most `LOADED_MODELS` kept).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader

from datamodules.assets import AssetError, resolve_model, sha256_file, xsilo_home
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
    shard_name,
    valid_shard,
)
from datamodules.progress import ProgressLines, is_terminal
from datamodules.signals import Stopped, stop_on_signals
from datamodules.text import dataset_fingerprint, label_names, load_texts

Pooling = Literal["mean", "last", "first"]
POOLINGS = ("mean", "last", "first")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt")


# --- pooling ----------------------------------------------------------------------------

def is_causal_lm(config) -> bool:
    """Decoder-only LMs pool their last token; encoders pool the mean."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    archs = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return True
    model_type = getattr(config, "model_type", "")
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def default_pooling(config) -> str:
    return "last" if is_causal_lm(config) else "mean"


# sentence-transformers `1_Pooling/config.json` modes → xsilo's poolings (max pooling has no equivalent).
ST_POOLING_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "first",
                    "pooling_mode_lasttoken": "last"}
MAX_LENGTH_CAP = 128  # the longest default truncation: a model's own limit only ever lowers it


@dataclass(frozen=True)
class ModelDefaults:
    """Pooling and max_length as the model's own files state them, and where each came from."""

    pooling: str
    max_length: int
    sources: dict[str, str]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def model_defaults(model_path: str, config) -> ModelDefaults:
    """The pooling and max_length a model declares: sentence-transformers' `1_Pooling/config.json`
    and `sentence_bert_config.json` when the folder has them, else `max_position_embeddings`,
    capped at `MAX_LENGTH_CAP`; else last-token pooling for causal LMs and mean for encoders."""
    folder = Path(model_path)
    pooling, sources = default_pooling(config), {"pooling": "causal LM: last token" if is_causal_lm(config)
                                                              else "encoder: mean"}
    st_pooling = _read_json(folder / "1_Pooling" / "config.json")
    chosen = [mode for key, mode in ST_POOLING_MODES.items() if st_pooling.get(key) is True]
    if len(chosen) == 1:
        pooling, sources["pooling"] = chosen[0], "1_Pooling/config.json"
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    limits = {"sentence_bert_config.json max_seq_length": _read_json(folder / "sentence_bert_config.json").get("max_seq_length"),
              "config max_position_embeddings": getattr(text_config, "max_position_embeddings", None)}
    limits = {k: v for k, v in limits.items() if isinstance(v, int) and not isinstance(v, bool) and v > 0}
    max_length, sources["max_length"] = MAX_LENGTH_CAP, f"cap {MAX_LENGTH_CAP}"
    if limits:
        where, limit = next(iter(limits.items()))
        if limit < MAX_LENGTH_CAP:
            max_length, sources["max_length"] = limit, where
        else:
            sources["max_length"] = f"{where} {limit}, capped at {MAX_LENGTH_CAP}"
    return ModelDefaults(pooling, max_length, sources)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool (B, T, D) states to (B, D) using the attention mask (either padding side)."""
    mask = attention_mask.to(hidden.dtype)
    if pooling == "mean":
        return (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
    positions = torch.arange(hidden.shape[1], device=hidden.device).expand_as(attention_mask)
    masked = torch.where(attention_mask.bool(), positions, -1 if pooling == "last" else hidden.shape[1])
    index = masked.max(1).values if pooling == "last" else masked.min(1).values
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index.clamp(0, hidden.shape[1] - 1)]


# --- identity ---------------------------------------------------------------------------

def model_identity(model_path: str) -> str:
    """sha256 over a checkpoint folder's config and weight files (memoised by size+mtime).

    A hub id is first resolved to its local snapshot, so a hub model and the same files in
    a local folder share an identity.
    """
    path = Path(model_path)
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(model_path))
    memo_path = xsilo_home() / "identity-memo.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    digest_parts = []
    changed = False
    for file in sorted(p for p in path.iterdir() if p.is_file()):
        if file.suffix not in WEIGHT_SUFFIXES and file.name != "config.json":
            continue
        stat = file.stat()
        key = f"{file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
        if key not in memo:
            memo[key] = sha256_file(file)
            changed = True
        digest_parts.append(f"{file.name}={memo[key]}")
    if not digest_parts:
        raise AssetError(f"{path} holds no config.json or weight files; is it a model checkpoint folder?")
    if changed:
        try:
            memo_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(memo_path, memo)
        except OSError:
            pass  # the memo only saves time
    import hashlib

    return hashlib.sha256("\n".join(digest_parts).encode()).hexdigest()


# --- config -----------------------------------------------------------------------------

@dataclass
class ExtractionConfig:
    """What to extract. `model`/`data` take registry names, local paths or hub ids."""

    model: str
    data: str
    split: str = "train"
    pooling: Pooling | None = None  # None: the model's own (`model_defaults`)
    layer: int = -1  # index into hidden_states: -1 is the final (normed) layer, 0 the embeddings
    max_length: int | None = None  # None: the model's own limit, at most MAX_LENGTH_CAP
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    batch_size: int = 16
    limit: int | None = None
    text_column: str | None = None
    label_column: str | None = "label"

    def validate(self) -> None:
        if self.max_length is not None and self.max_length <= 0:
            raise AssetError(f"max_length must be a positive number of tokens, got {self.max_length}")
        if self.batch_size <= 0:
            raise AssetError(f"batch_size must be positive, got {self.batch_size}")
        if self.pooling is not None and self.pooling not in POOLINGS:
            raise AssetError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.dtype not in DTYPES:
            raise AssetError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")


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


def _check_layer(layer: int, n_layers: int) -> None:
    if not -(n_layers + 1) <= layer <= n_layers:
        raise AssetError(
            f"layer {layer} is out of range for a model with {n_layers} layers; "
            f"use -1 for the final layer, or {-(n_layers + 1)}..{n_layers}"
        )


def resolve(config: ExtractionConfig, cache_root: str | Path | None = None) -> ResolvedExtraction:
    from transformers import AutoConfig

    config.validate()
    model_path = resolve_model(config.model)
    try:
        model_config = AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError) as e:
        raise AssetError(f"cannot read a model config from {config.model!r}: {e}") from e
    text_config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    _check_layer(config.layer, text_config.num_hidden_layers)
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

def pooled_states(encoder, input_ids: torch.Tensor, attention_mask: torch.Tensor, layer: int,
                  pooling: str) -> torch.Tensor:
    """One forward pass → pooled float32 states of `layer` (-1: the final, normed layer)."""
    final = layer in (-1, encoder.config.get_text_config().num_hidden_layers)
    out = encoder(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=not final)
    hidden = out.last_hidden_state if final else out.hidden_states[layer]
    return pool(hidden, attention_mask, pooling).float()


class StateEncoder:
    """In-memory extraction for a few texts (a client's queries), no cache and no Trainer.

    Produces exactly what `extract()` stores for the same model, pooling, layer and max_length.
    """

    def __init__(self, model: str, pooling: str | None = None, layer: int = -1, max_length: int | None = None,
                 dtype: str = "float32", batch_size: int = 16, threads: int | None = None):
        from transformers import AutoConfig

        ExtractionConfig(model=model, data="-", pooling=pooling, layer=layer, max_length=max_length,
                         dtype=dtype, batch_size=batch_size).validate()
        if threads:
            torch.set_num_threads(threads)
        self.model_path = resolve_model(model)
        config = AutoConfig.from_pretrained(self.model_path)
        _check_layer(layer, config.get_text_config().num_hidden_layers)
        defaults = model_defaults(self.model_path, config)
        self.pooling = pooling or defaults.pooling
        self.layer, self.max_length, self.batch_size = layer, max_length or defaults.max_length, batch_size
        self.tokenizer = load_tokenizer(self.model_path)
        self.encoder = load_frozen_model(self.model_path, dtype)
        self.hidden_size = config.get_text_config().hidden_size

    @torch.inference_mode()
    def __call__(self, texts: list[str]) -> np.ndarray:
        if isinstance(texts, str):
            texts = [texts]
        out = np.zeros((len(texts), self.hidden_size), np.float32)
        order = sorted(range(len(texts)), key=lambda i: (-len(texts[i]), i))
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            enc = self.tokenizer([texts[i] for i in rows], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
            out[rows] = pooled_states(self.encoder, enc["input_ids"], enc["attention_mask"], self.layer,
                                      self.pooling).numpy()
        return out


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


def load_frozen_model(model_path: str, dtype: str):
    """The bare transformers model in eval mode, without gradients."""
    from transformers import AutoModel

    return AutoModel.from_pretrained(model_path, dtype=DTYPES[dtype]).eval().requires_grad_(False)


LOADED_MODELS = 2  # evaluate and evaluate_ood alternate a source and a target model
_loaded: OrderedDict[tuple[str, str, str, str], tuple[Any, Any]] = OrderedDict()


def loaded_model(key: tuple[str, str, str, str]) -> tuple[Any, Any]:
    """(tokenizer, frozen model) for key = (model path, model identity, dtype, device), loaded once
    per process and kept for the `LOADED_MODELS` most recently used keys. The identity (a digest of
    the weights) makes a folder rewritten in place load again."""
    if key in _loaded:
        _loaded.move_to_end(key)
        tokenizer, encoder = _loaded[key]
        return tokenizer, encoder.eval()
    while len(_loaded) >= LOADED_MODELS:
        _loaded.popitem(last=False)  # free the oldest before loading the next
    entry = load_tokenizer(key[0]), load_frozen_model(key[0], key[2])
    _loaded[key] = entry
    return entry


def loaded_model_keys() -> list[tuple[str, str, str, str]]:
    """The keys `loaded_model` keeps, oldest first."""
    return list(_loaded)


def clear_loaded_models() -> None:
    """Drop every model `loaded_model` keeps (frees their memory)."""
    _loaded.clear()


def load_tokenizer(model_path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:  # GPT-2/Llama-style tokenizers ship without one
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


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
    """Return the cache of pooled states for `config`, computing only what is missing."""
    t0 = time.perf_counter()
    job = resolve(config, cache_root)
    directory = job.directory
    if cache_hit(directory):
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
        callbacks = [ShardWriter(directory, shards, job.hidden_size, config.dtype)]
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
    return ExtractionResult(directory, False, len(pending), time.perf_counter() - t0,
                            len(job.texts), job.hidden_size)


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
        "dim": job.hidden_size,
        "label_names": job.label_names,
        "shards": records,
    })

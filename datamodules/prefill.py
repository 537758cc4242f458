"""Filling a dataset's state cache from rows already cached for the same texts.

`prefill_states` makes the cache of an extraction (a public set, usually) from every finished cache whose states
are interchangeable (same model weights, pooling, layer, max_length and dtype), running the model only on texts
that no cache holds: a public set composed of cached datasets costs no forward pass. `cached_texts` lists the
texts cached for every one of several models, for `build_public_set(prefer=...)`.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from datamodules.cache import (MANIFEST, CacheError, StateCache, atomic_save_npy, atomic_write_bytes,
                               atomic_write_json, ensure_writable, shard_name, states_root)
from datamodules.public_set import PublicSetError
from datamodules.registry import xsilo_home
from datamodules.text import dataset_fingerprint, load_texts
from serve.formats.views import StateView


class ExtractionBudgetError(PublicSetError):
    """Filling a cache would need more new forward passes than allowed."""

    def __init__(self, message: str, missing: int):
        super().__init__(message)
        self.missing = missing


@dataclass
class PrefillResult:
    path: Path
    hit: bool
    reused: int
    extracted: int


@lru_cache(maxsize=256)
def _texts_of(data: str, split: str, limit: int | None, fingerprint: str) -> tuple[str, ...] | None:
    """The texts a finished cache holds, if its dataset still loads to the same content."""
    for label_column in ("label", None):
        try:
            ds = load_texts(data, split, "text", label_column, limit)
        except Exception:  # noqa: BLE001 - a cache whose dataset is gone or unreadable is skipped
            return None
        if dataset_fingerprint(ds) == fingerprint:
            return tuple(ds["text"])
    return None


def cached_text_index(key: dict[str, Any], root: Path | None = None, skip: Path | None = None
                      ) -> dict[str, tuple[Path, int]]:
    """text → (cache folder, row) over every finished cache whose states are interchangeable with `key`'s
    (same model identity, pooling, layer, max_length and dtype)."""
    same = ("model_identity", "pooling", "layer", "max_length", "dtype")
    index: dict[str, tuple[Path, int]] = {}
    root = Path(root or states_root())
    if not root.is_dir():
        return index
    for folder in sorted(root.iterdir()):
        if skip is not None and folder.resolve() == skip.resolve():
            continue
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
        except (OSError, ValueError):
            continue
        k = manifest.get("key", {})
        if not manifest.get("complete") or any(k.get(f) != key[f] for f in same):
            continue
        texts = _texts_of(manifest["data"], manifest["split"], manifest.get("limit"), k["dataset_fingerprint"])
        if texts is None or len(texts) != manifest["n_rows"]:
            continue
        for row, text in enumerate(texts):
            index.setdefault(text, (folder, row))
    return index


def cached_texts(models: Sequence[str], pooling: str | None = StateView.pooling, layer: int = StateView.layer,
                 max_length: int | None = StateView.max_length, dtype: str = StateView.dtype,
                 cache_root: str | Path | None = None) -> set[str]:
    """Texts whose states are cached for every one of `models` (same pooling, layer, length, dtype): pass
    them as `prefer` to build a public set that needs no new forward pass where it can. Pooling and
    max_length default to each model's own, as extraction resolves them."""
    from transformers import AutoConfig

    from datamodules.assets import resolve_model
    from datamodules.models import model_defaults, model_identity

    found: set[str] | None = None
    for model in models:
        path = resolve_model(model)
        defaults = model_defaults(path, AutoConfig.from_pretrained(path))
        key = {"model_identity": model_identity(path), "pooling": pooling or defaults.pooling,
               "layer": layer, "max_length": max_length or defaults.max_length, "dtype": dtype}
        texts = set(cached_text_index(key, Path(cache_root) if cache_root else None))
        found = texts if found is None else found & texts
    return found or set()


def prefill_states(config, cache_root: str | Path | None = None, max_extract: int | None = None,
                   threads: int | None = None, accelerator: str = "cpu", devices: int | str = 1) -> PrefillResult:
    """Make the cache for `config` (an ExtractionConfig) from cached rows of the same texts.

    Texts no cache holds are extracted first (their own cache, under $XSILO_HOME/public/_extra/), unless
    there are more than `max_extract` of them: then ExtractionBudgetError, and nothing is written.
    The result is an ordinary cache: `extract(config)` and the DataModules find it as a hit. `accelerator`,
    `devices` and `threads` are `extract`'s, for those texts.
    """
    from datamodules.extraction import ExtractionConfig, adopt, cache_hit, extract, finalise, resolve, shard_ranges

    job = resolve(config, cache_root)
    if cache_hit(job.directory) or adopt(job, cache_root):
        return PrefillResult(job.directory, True, 0, 0)
    key = asdict(job.key)
    index = cached_text_index(key, Path(cache_root) if cache_root else None, skip=job.directory)
    missing = list(dict.fromkeys(t for t in job.texts if t not in index))
    if missing:
        if max_extract is not None and len(missing) > max_extract:
            raise ExtractionBudgetError(
                f"{len(missing)} texts of {config.data!r} have no cached {config.model} states; "
                f"at most {max_extract} may be extracted", len(missing))
        extra_dir = xsilo_home() / "public" / "_extra"
        extra_dir.mkdir(parents=True, exist_ok=True)
        body = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in missing).encode()
        extra = extra_dir / f"{hashlib.sha256(body).hexdigest()[:16]}.jsonl"
        if not extra.is_file():
            atomic_write_bytes(extra, body)
        extra_cfg = ExtractionConfig(model=config.model, data=str(extra), pooling=job.pooling, layer=config.layer,
                                     max_length=job.max_length, dtype=config.dtype, batch_size=config.batch_size,
                                     label_column=None)
        result = extract(extra_cfg, cache_root=cache_root, accelerator=accelerator, devices=devices, threads=threads)
        for row, text in enumerate(missing):
            index[text] = (result.path, row)
    ensure_writable(job.directory)
    stale = job.directory / MANIFEST
    if stale.exists():
        stale.unlink()
    caches: dict[Path, StateCache] = {}
    where = [index[t] for t in job.texts]
    shards = shard_ranges(len(job.texts), 2048)
    for i, (start, stop) in enumerate(shards):
        block = np.empty((stop - start, job.hidden_size), np.float32)
        part = where[start:stop]
        for folder in dict.fromkeys(f for f, _ in part):
            cache = caches.setdefault(folder, StateCache(folder))
            if cache.dim != job.hidden_size:
                raise CacheError(f"{folder} holds {cache.dim}-d states, expected {job.hidden_size}")
            sel = [j for j, (f, _) in enumerate(part) if f == folder]
            block[sel] = cache.rows(np.array([part[j][1] for j in sel]))
        atomic_save_npy(job.directory / shard_name(i), block)
    atomic_write_json(job.directory / "assembled.json",
                      {"from": sorted(str(f) for f in caches), "extracted": len(missing)})
    finalise(job, shards)
    return PrefillResult(job.directory, False, len(job.texts) - len(missing), len(missing))

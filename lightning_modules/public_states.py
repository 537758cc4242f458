"""The provider's public-states folder: the public set's texts and the provider model's states on them.

`xsilo public-set export` writes it and `xsilo serve --public DIR` publishes it for the private fit:

    manifest.json       {"format": "xsilo-public-states", "version": 1, name, rows, fingerprint, val_fraction,
                         seed, parts {train, val}, model (the published extraction spec), hidden_size, files}
    texts.jsonl         {"text": ...} per row, in public-set order (what the client extracts its own states on)
    states.safetensors  train (n_train, d) and val (n_val, d) float32; train_index, val_index int64 row indices
                        into texts.jsonl, from `datamodules.states.random_split(rows, val_fraction, seed)`

The states never leave the provider; the texts, the fingerprint and the split do.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from datamodules.states import random_split
from lightning_modules.export import ExportError, file_records, published_spec, staged_folder
# The reader (serve.public_format, numpy only) declares the format: one declaration for both sides.
from serve.public_format import (PUBLIC_FORMAT, PUBLIC_MANIFEST, PUBLIC_VERSION, STATES_FILE, TEXTS_FILE,
                                 texts_fingerprint)

if TYPE_CHECKING:
    from lightning_modules.settings import DeviceSettings, ExtractionSettings



def write_public_states(
    out: str | Path,
    texts: list[str],
    states: np.ndarray,
    *,
    model: dict[str, Any],
    val_fraction: float,
    seed: int,
    name: str,
    overwrite: bool = False,
) -> Path:
    """Write a public-states folder atomically (temp folder, then rename); returns `out`."""
    from safetensors.numpy import save_file

    out = Path(out)
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise ExportError("texts must be a list of strings, one per public row")
    states = np.asarray(states)
    if states.ndim != 2 or states.shape[0] != len(texts):
        raise ExportError(f"states must be (rows, d) with one row per text: {len(texts)} texts, states "
                          f"{states.shape}")
    if not np.isfinite(states).all():
        raise ExportError("the states hold NaN/inf; re-extract them (the cache may be corrupt)")
    n, d = states.shape
    if not 0 < val_fraction < 1:
        raise ExportError(f"val_fraction must be in (0, 1): the private fit chooses λ on the val part, got "
                          f"{val_fraction}")
    train_idx, val_idx = random_split(n, val_fraction, seed)
    if len(train_idx) < 2 or len(val_idx) < 1:
        raise ExportError(f"{n} rows at val_fraction {val_fraction} give {len(train_idx)} train and {len(val_idx)} "
                          "val rows; use more public rows (at least 2 train and 1 val)")
    spec = published_spec(model, d, "model")
    rows = np.asarray(states, dtype=np.float32)
    with staged_folder(out, overwrite) as tmp:
        with open(tmp / TEXTS_FILE, "w", encoding="utf-8") as f:
            for text in texts:
                f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
        save_file({"train": np.ascontiguousarray(rows[train_idx]), "val": np.ascontiguousarray(rows[val_idx]),
                   "train_index": train_idx.astype(np.int64), "val_index": val_idx.astype(np.int64)},
                  str(tmp / STATES_FILE))
        manifest = {
            "format": PUBLIC_FORMAT,
            "version": PUBLIC_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "name": str(name),
            "rows": int(n),
            "fingerprint": texts_fingerprint(texts),
            "val_fraction": float(val_fraction),
            "seed": int(seed),
            "parts": {"train": int(len(train_idx)), "val": int(len(val_idx))},
            "model": spec,
            "hidden_size": int(d),
            "files": file_records(tmp),
        }
        (tmp / PUBLIC_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def export_public_states(model: str, data: str, out: str | Path, *, limit: int | None = None,
                         val_fraction: float = 0.125, seed: int = 0, name: str | None = None,
                         extraction: "ExtractionSettings | None" = None, device: "DeviceSettings | None" = None,
                         overwrite: bool = False) -> Path:
    """`xsilo public-set export`: the provider model's states on the public set (from the cache, extracted
    when missing), written with `write_public_states`."""
    from datamodules.cache import StateCache
    from datamodules.extraction import ExtractionConfig, cache_hit, extract, resolve
    from lightning_modules.settings import DeviceSettings, ExtractionSettings

    extraction, device = extraction or ExtractionSettings(), device or DeviceSettings()
    device.apply_threads()
    job = resolve(ExtractionConfig(model=model, data=data, limit=limit, pooling=extraction.pooling,
                                   layer=extraction.layer, max_length=extraction.max_length, dtype=extraction.dtype,
                                   batch_size=extraction.batch_size, label_column=None))
    if not cache_hit(job.directory):
        extract(job.config, **device.extraction_kwargs())
    cache = StateCache(job.directory)
    if cache.n_rows != len(job.texts):
        raise ExportError(f"the cache {cache.path} holds {cache.n_rows} rows for {len(job.texts)} texts; re-extract "
                          f"it (`xsilo extract --model {model} --data {data}`)")
    states = cache.rows(np.arange(cache.n_rows))
    return write_public_states(out, job.texts, states, model=job.spec(), val_fraction=val_fraction, seed=seed,
                               name=name or Path(str(data)).stem, overwrite=overwrite)

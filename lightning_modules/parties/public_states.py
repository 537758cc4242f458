"""The provider's public-states folder: the public set's texts and the provider model's states on them.

`xsilo public-set export` writes it (`export_public_states`: extraction here, the folder by
`serve.formats.public_states.write_public_states`) and `xsilo serve --public DIR` publishes it for the private fit:

    manifest.json       {"format": "xsilo-public-states", "version": 1, name, rows, fingerprint, val_fraction,
                         seed, parts {train, val}, model (the published extraction spec), hidden_size, files}
    texts.jsonl         {"text": ...} per row, in public-set order (what the client extracts its own states on)
    states.safetensors  train (n_train, d) and val (n_val, d) float32; train_index, val_index int64 row indices
                        into texts.jsonl, from `serve.formats.splits.public_split(rows, val_fraction, seed)`

With `anchors` (e.g. a synthetic set from `xsilo public-set synthesize`) the folder also holds anchors.jsonl and
the states on it: the private fit's third part (`serve.formats.public_states`).

The states never leave the provider; the texts, the fingerprint and the split do.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from serve.formats.folders import ExportError
# The format (reader and writer, numpy only) lives in serve.formats: one declaration for both sides.
from serve.formats.public_states import Anchors, write_public_states
from serve.formats.splits import SPLIT

if TYPE_CHECKING:
    from lightning_modules.settings import DeviceSettings, ExtractionSettings


def export_public_states(model: str, data: str, out: str | Path, *, limit: int | None = None,
                         val_fraction: float = SPLIT.public_val_fraction, seed: int = SPLIT.public_seed,
                         name: str | None = None, anchors: str | None = None,
                         extraction: "ExtractionSettings | None" = None, device: "DeviceSettings | None" = None,
                         overwrite: bool = False) -> Path:
    """`xsilo public-set export`: the provider model's states on the public set, and on the `anchors` data when
    given (from the cache, extracted when missing), written with `write_public_states`."""
    from datamodules.cache import StateCache
    from datamodules.extraction import ExtractionConfig, cache_hit, extract, resolve
    from lightning_modules.settings import DeviceSettings, ExtractionSettings

    extraction, device = extraction or ExtractionSettings(), device or DeviceSettings()
    device.apply_threads()

    def job_of(source: str, rows: int | None) -> Any:
        return resolve(ExtractionConfig(model=model, data=source, limit=rows, pooling=extraction.pooling,
                                        layer=extraction.layer, max_length=extraction.max_length,
                                        dtype=extraction.dtype, batch_size=extraction.batch_size, label_column=None))

    def states_of(job: Any) -> np.ndarray:
        if not cache_hit(job.directory):
            extract(job.config, **device.extraction_kwargs())
        cache = StateCache(job.directory)
        if cache.n_rows != len(job.texts):
            raise ExportError(f"the cache {cache.path} holds {cache.n_rows} rows for {len(job.texts)} texts; "
                              f"re-extract it (`xsilo extract --model {model} --data {job.config.data}`)")
        return cache.rows(np.arange(cache.n_rows))

    # both sources are read and checked before either is extracted: a bad --anchors costs no extraction
    job, anchor_job = job_of(data, limit), (job_of(anchors, None) if anchors is not None else None)
    states = states_of(job)
    anchor_set = None if anchor_job is None else Anchors(list(anchor_job.texts), states_of(anchor_job))
    return write_public_states(out, job.texts, states, model=job.spec(), val_fraction=val_fraction, seed=seed,
                               name=name or Path(str(data)).stem, overwrite=overwrite, anchors=anchor_set)

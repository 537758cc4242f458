"""The study's anchors: states of texts both parties hold, for `fitting.adaptation.adapt(..., anchors=...)`.

Disclosed anchors are a seeded sample of the client's own task-train texts (the paper's remedy, an opt-in); synthetic
anchors are a set written from the provider's class descriptions (`datamodules.synthetic`), extracted by each model
with the study's view."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from datamodules.cache import StateCache
from datamodules.extraction import ExtractionConfig, extract
from datamodules.synthetic import SyntheticTextSettings, synthesize

if TYPE_CHECKING:
    from lightning_modules.experiments.study import Native
    from lightning_modules.settings import ExtractionSettings


def disclosed_pairs(src: "Native", tgt: "Native", rows: int, seed: int) -> tuple[Tensor, Tensor]:
    """The source's and target's states of `rows` task-train texts the client discloses: a seeded sample, the same
    texts for every pair of the task."""
    if src.train_labels is None or tgt.train_labels is None or not torch.equal(src.train_labels, tgt.train_labels):
        raise RuntimeError("the source's and target's task-train rows differ; both must come from the same split")
    chosen = torch.randperm(len(src.train), generator=torch.Generator().manual_seed(seed))[:rows]
    return src.train[chosen], tgt.train[chosen]


def synthetic_pairs(source: str, target: str, settings: SyntheticTextSettings, view: "ExtractionSettings",
                    threads: int | None = None) -> tuple[Tensor, Tensor]:
    """The source's and target's states of a synthetic set (written once, extracted once per model and view)."""
    data = str(synthesize(settings, threads))
    states = []
    for model in (source, target):
        config = ExtractionConfig(model=model, data=data, pooling=view.pooling, layer=view.layer,
                                  max_length=view.max_length, dtype=view.dtype, label_column=None)
        cache = StateCache(extract(config, threads=threads, progress=False).path)
        states.append(torch.from_numpy(np.asarray(cache.rows(slice(0, cache.n_rows)), dtype=np.float32)))
    return states[0], states[1]

"""Percentile bootstrap intervals over test rows, through torchmetrics' `BootStrapper`.

`BootStrapper` resamples every tensor of one `update` call along its rows with the same indices, so one
call per group gives each group (ID rows, OOD rows) its own resample, and two views of the same rows in
one call (a paired drop) share theirs. Resampling is seeded and leaves the global torch RNG as it was.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor
from torchmetrics import MeanMetric, Metric
from torchmetrics.classification import MulticlassF1Score
from torchmetrics.utilities import dim_zero_cat
from torchmetrics.wrappers import BootStrapper

from lightning_modules.evaluation.metrics import auroc


class AUROCViews(Metric):
    """AUROC (OOD positive, exact float64) of each view's scores; `paired`: the first view's minus the second's."""

    full_state_update = False

    def __init__(self, paired: bool = False) -> None:
        super().__init__()
        self.paired = paired
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("is_ood", default=[], dist_reduce_fx="cat")

    def update(self, scores: Tensor, is_ood: Tensor) -> None:
        self.scores.append(scores.reshape(len(scores), -1).double())
        self.is_ood.append(is_ood.bool())

    def compute(self) -> Tensor:
        scores, is_ood = dim_zero_cat(self.scores), dim_zero_cat(self.is_ood)
        values = [auroc(scores[~is_ood, v].numpy(), scores[is_ood, v].numpy()) for v in range(scores.shape[1])]
        return torch.tensor(values[0] - values[1] if self.paired else values[0], dtype=torch.float64)


def interval(metric: Metric, groups: Sequence[Sequence[Tensor]], n_resamples: int = 1000, seed: int = 0,
             confidence: float = 0.95) -> tuple[float, float]:
    """The percentile interval of `metric` over `n_resamples` resamples, each group resampled on its own."""
    if n_resamples < 1 or not 0 < confidence < 1 or min((len(g[0]) for g in groups), default=0) < 1:
        raise ValueError(f"bootstrap needs n_resamples >= 1, 0 < confidence < 1 and non-empty groups; got "
                         f"{n_resamples}, {confidence}, sizes {[len(g[0]) for g in groups]}")
    tail = (1 - confidence) / 2
    boot = BootStrapper(metric, num_bootstraps=n_resamples, mean=False, std=False, raw=True,
                        sampling_strategy="multinomial")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for group in groups:
            boot.update(*group)
    raw = boot.compute()["raw"].double()
    lo, hi = torch.quantile(raw, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return float(lo), float(hi)


def _rows(values) -> Tensor:
    return torch.as_tensor(np.asarray(values, dtype=np.float64))


def mean_ci(values: np.ndarray, **kwargs) -> tuple[float, float]:
    """Interval of a mean: accuracy from 0/1 correctness, a paired drop from differences of them."""
    return interval(MeanMetric().set_dtype(torch.float64), [[_rows(values)]], **kwargs)


def macro_f1_ci(predicted: np.ndarray, labels: np.ndarray, num_classes: int, **kwargs) -> tuple[float, float]:
    """Interval of the macro-F1 of predicted class indices against the true labels (rows resampled together)."""
    metric = MulticlassF1Score(num_classes, average="macro").set_dtype(torch.float64)
    return interval(metric, [[torch.as_tensor(np.asarray(predicted), dtype=torch.long),
                              torch.as_tensor(np.asarray(labels), dtype=torch.long)]], **kwargs)


def auroc_ci(id_scores: np.ndarray, ood_scores: np.ndarray, **kwargs) -> tuple[float, float]:
    """Interval of the AUROC; ID and OOD rows are resampled separately."""
    id_rows, ood_rows = _rows(id_scores), _rows(ood_scores)
    return interval(AUROCViews(), [[id_rows, torch.zeros(len(id_rows))], [ood_rows, torch.ones(len(ood_rows))]],
                    **kwargs)


def auroc_drop_ci(native: tuple[np.ndarray, np.ndarray], mapped: tuple[np.ndarray, np.ndarray],
                  **kwargs) -> tuple[float, float]:
    """Paired interval of native AUROC − mapped AUROC: both views score the same ID and OOD rows."""
    id_rows = torch.stack([_rows(native[0]), _rows(mapped[0])], 1)
    ood_rows = torch.stack([_rows(native[1]), _rows(mapped[1])], 1)
    return interval(AUROCViews(paired=True), [[id_rows, torch.zeros(len(id_rows))],
                                              [ood_rows, torch.ones(len(ood_rows))]], **kwargs)

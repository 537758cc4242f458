"""`xsilo head fit`: the provider's task head on its own model's states, written as a head-only export.

No client model is involved: the provider extracts its model's states of the task (as `xsilo evaluate` does),
fits the logistic-regression head (`evaluate.fit_classifier`), scores it on its own val and test splits, and
optionally publishes a feature-space Mahalanobis detector (class means + shared precision in raw coordinates,
threshold at 95% of its val states) that a split-mode client runs on its mapped states, with the class priors (train
shares): a client's `xsilo align --private` adapts its map with all three.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_modules.evaluation.evaluate import classification_scores, fit_classifier, prepare_states, split_rows
from lightning_modules.settings import DeviceSettings, ExtractionSettings, HeadSettings, seed_all
from serve.formats.heads import write_head_export
from serve.ood_client import mahalanobis_scores  # what a client computes from feature-ood.npz

F64 = torch.float64


@dataclass
class HeadConfig:
    """One provider head: the model, the task and the recipe's extraction and head settings."""

    model: str
    task: str
    task_limit: int | None = None
    extraction: ExtractionSettings = field(default_factory=ExtractionSettings)
    head: HeadSettings = field(default_factory=HeadSettings)
    device: DeviceSettings = field(default_factory=DeviceSettings)
    seed: int = 0
    publish_ood: bool = False
    ood_tpr: float = 0.95
    mahalanobis_shrinkage: float = 1e-2


def mahalanobis_raw(train: torch.Tensor, labels: torch.Tensor, num_classes: int,
                    shrinkage: float) -> tuple[np.ndarray, np.ndarray]:
    """`ood.Mahalanobis` fitted on `train`, in raw coordinates: (class means (k, d), precision (d, d)) with
    score(x) = min_c (x - mu_c)ᵀ P (x - mu_c); dead dimensions get zero precision, as the detector drops them."""
    from lightning_modules.evaluation.ood_detectors import Mahalanobis

    x = train.to(F64)
    detector = Mahalanobis(shrinkage).fit(x, labels)
    index = labels.long()
    means = torch.zeros(num_classes, x.shape[1], dtype=F64).index_add_(0, index, x)
    means /= torch.bincount(index, minlength=num_classes).clamp_min(1).to(F64)[:, None]
    scaled = detector.whiten / detector.scale[None, :]  # L⁻¹ D⁻¹ on the kept dims
    keep = detector.keep.nonzero().flatten()
    precision = torch.zeros(x.shape[1], x.shape[1], dtype=F64)
    precision[keep[:, None], keep[None, :]] = scaled.T @ scaled
    return means.numpy(), precision.numpy()


def published_statistics(train: torch.Tensor, labels: torch.Tensor, num_classes: int,
                         shrinkage: float) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """What `--publish_ood true` publishes of a task: its class means and shared precision on the train states
    (`mahalanobis_raw`) and the train split's class shares (priors)."""
    means, precision = mahalanobis_raw(train, labels, num_classes, shrinkage)
    priors = torch.bincount(labels.long(), minlength=num_classes).to(F64) / len(labels)
    return means, precision, priors


def fit_head(cfg: HeadConfig, out: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Fit the head, write the head export to `out`, and return what it records (metrics, detector)."""
    from datamodules.states import LabelledStatesDataModule
    from lightning_modules.evaluation.ood_detectors import calibrate_threshold

    cfg.device.apply_threads()
    seed_all(cfg.seed)
    dm = LabelledStatesDataModule(model=cfg.model, data=cfg.task, limit=cfg.task_limit, seed=cfg.seed,
                                  **cfg.extraction.task_kwargs())
    prepare_states(cfg.device, dm)
    work = Path(tempfile.mkdtemp(prefix="xsilo-head-"))
    try:
        classifier, _ = fit_classifier(dm, cfg.head, cfg.device, cfg.seed, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    dm.setup("test")
    k = dm.num_classes
    metrics: dict[str, Any] = {"task": cfg.task, "seed": cfg.seed, "rows": {}, "head": classifier.fit_record()}
    with torch.no_grad():
        for split in ("val", "test"):
            h, labels = split_rows(dm, split)
            metrics[f"native_{split}"] = classification_scores(classifier(h), labels, k)
            metrics["rows"][split] = len(labels)
    metrics["rows"]["train"] = len(dm.split_index["train"])
    feature_ood = None
    if cfg.publish_ood:
        h_train, y_train = split_rows(dm, "train")
        h_val, _ = split_rows(dm, "val")
        means, precision, priors = published_statistics(h_train, y_train, k, cfg.mahalanobis_shrinkage)
        threshold = calibrate_threshold(torch.from_numpy(mahalanobis_scores(h_val.numpy(), means, precision)),
                                        cfg.ood_tpr)
        feature_ood = {"means": means, "precision": precision, "threshold": threshold, "tpr": cfg.ood_tpr,
                       "priors": priors.numpy()}
    amap = classifier.affine_map
    write_head_export(out, amap.weight.numpy(), amap.bias.numpy(), target=dm.job.spec(),
                      label_names=dm.label_names, metrics=metrics, feature_ood=feature_ood, overwrite=overwrite)
    return {"metrics": metrics, "label_names": dm.label_names,
            "feature_ood": None if feature_ood is None else {"threshold": feature_ood["threshold"],
                                                            "tpr": cfg.ood_tpr}}

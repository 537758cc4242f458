"""The two-party inputs of `xsilo ablate`'s adaptation factor: what the provider publishes of its task, and the
synthetic anchors both parties extract, for `fitting.adaptation.adapt` (what `xsilo align --private` fits)."""
from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from torch import Tensor

from datamodules.synthetic import load_settings
from lightning_modules.evaluation.evaluate import split_rows, task_datamodule
from lightning_modules.experiments.ablation_config import AblationConfig, AblationError
from lightning_modules.experiments.anchors import synthetic_pairs
from lightning_modules.fitting.adaptation import TaskStatistics
from lightning_modules.parties.heads import published_statistics

if TYPE_CHECKING:
    from lightning_modules.experiments.study import Study


def published_task(study: "Study", target: str, task: str) -> TaskStatistics:
    """What the provider publishes of the task with `xsilo head fit --publish_ood true`: its class means, shared
    precision and priors on its own task-train states (of `study`'s view)."""
    dm = task_datamodule(study.cfg.pair(target, target, task), target, task)
    dm.prepare_data()
    dm.setup("fit")
    train, labels = split_rows(dm, "train")
    return TaskStatistics.from_arrays(*published_statistics(train, labels, dm.num_classes,
                                                            study.cfg.mahalanobis_shrinkage))


def synthetic_anchors(cfg: AblationConfig, pooling: str | None, layers: tuple[int, int]) -> tuple[Tensor, Tensor] | None:
    """Both models' states of `cfg.synthetic`'s set in the view (pooling, source and target layer); None without
    one. Written once and extracted once per model and view (cached on disk)."""
    if cfg.synthetic is None:
        return None
    if layers[0] != layers[1]:
        raise AblationError(f"synthetic anchors are extracted in one view for both models, but this recipe reads "
                            f"layers {list(layers)}; drop --synthetic or use one layer for both")
    view = replace(cfg.extraction, pooling=pooling, layer=layers[0])
    return synthetic_pairs(cfg.source, cfg.target, load_settings(cfg.synthetic), view, cfg.device.threads)

"""`xsilo align --private DATA`: adapt the public-set map to the client's own unlabelled texts, at home.

The client extracts its model's states on DATA (the public set's extraction view, cached like any dataset; labels
are never read), fetches what the provider publishes of its task with the head (`xsilo head fit --publish_ood true`:
class means, a shared precision and the class priors, the feature-ood.npz a split-mode client already reads for its
OOD flag), and once the private fit has solved the public map (λ through the head) refits it with
`fitting.adaptation.adapt`, then moves its intercept so that the head predicts DATA at the published priors
(`fitting.prior_matching`, through the head probe). Nothing of DATA crosses: the requests are those of `xsilo align
--head NAME` plus that one download, and the probe reads the head on the class means' directions too (k more rows,
computed from what the provider published): the same bytes whatever the texts are
(`tests/lightning_modules/parties/test_align_private.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lightning_modules.fitting.adaptation import AdaptationError, TaskStatistics
from lightning_modules.fitting.affine_map import AffineMap
from lightning_modules.fitting.prior_matching import adapt_to_priors
from lightning_modules.fitting.solvers import val_mse, val_r2

if TYPE_CHECKING:
    from datamodules.extraction import ResolvedExtraction
    from lightning_modules.fitting.stats import SufficientStats
    from lightning_modules.settings import AdaptationSettings, DeviceSettings, FitSettings

PUBLISH = "the provider must run xsilo head fit --publish_ood true (and serve that head)"


class PrivateTextsError(ValueError):
    """--private cannot run as asked; the message names the fix."""


@dataclass
class PublishedTask:
    """The head's published task statistics and where its priors came from."""

    stats: TaskStatistics
    head: str
    priors: str  # "published", or "uniform" for a head written before priors were published
    sha256: str

    @property
    def classes(self) -> int:
        return int(self.stats.means.shape[0])


def check_request(head: str | None, fit: "FitSettings") -> None:
    """Before any request: --private needs --head and a ridge map (the adaptation refits one)."""
    if head is None:
        raise PrivateTextsError("--private adapts the map through the class statistics a head publishes: name it "
                                f"with --head NAME ({PUBLISH}), or align without --private")
    if fit.estimator != "ridge" or fit.whiten_target:
        raise PrivateTextsError(f"--private refits a ridge map, but --fit.estimator is {fit.estimator}"
                                f"{' with --fit.whiten_target true' if fit.whiten_target else ''}; use "
                                "--fit.estimator ridge --fit.whiten_target false, or align without --private")


def published_task(server: str, head: str, target_dim: int, *, api_key: str | None = None,
                   timeout: float = 300.0, traffic: Any = None) -> PublishedTask:
    """Head `head`'s class means, shared precision and priors (GET /v1/heads/{head}/feature-ood: size bounded,
    sha256 checked against /v1/model, arrays validated), checked against the public set's `target_dim`; `traffic`
    (a serve.http_client.Traffic) counts the requests."""
    from serve.head_client import HeadClient

    with HeadClient(server, head, api_key=api_key, timeout=timeout, traffic=traffic) as client:
        info = client.model_info()
        if not info.feature_ood:
            raise PrivateTextsError(f"head {head!r} publishes no class statistics: {PUBLISH}, or align without "
                                    "--private")
        published = client.feature_detector()
    k, d = published.means.shape
    if d != target_dim:
        raise PrivateTextsError(f"head {head!r} publishes {d}-d class statistics but the public set holds "
                                f"{target_dim}-d provider states; the provider must fit the head and export the "
                                "public set with the same model and view")
    try:
        stats = TaskStatistics.from_arrays(published.means, published.precision, published.priors)
    except AdaptationError as exc:
        raise PrivateTextsError(str(exc)) from None
    return PublishedTask(stats, head, "uniform" if published.priors is None else "published", published.sha256)


def private_states(data: str, public_job: "ResolvedExtraction", text_column: str | None, limit: int | None,
                   device: "DeviceSettings", classes: int) -> np.ndarray:
    """The client model's states on DATA's texts (`limit`: a seeded sample of that many rows), read with the public
    set's extraction view and cached like any dataset; labels are never read."""
    from datamodules.cache import StateCache
    from datamodules.extraction import ExtractionConfig, cache_hit, extract, resolve

    if limit is not None and limit < 1:
        raise PrivateTextsError(f"--private_limit must be a positive number of texts, got {limit}")
    view = public_job.config
    job = resolve(replace(view, data=str(data), split="train", limit=limit, text_column=text_column,
                          label_column=None))
    if (job.pooling, job.max_length, job.key.model_identity) != (public_job.pooling, public_job.max_length,
                                                                 public_job.key.model_identity):
        raise PrivateTextsError(f"the private texts resolve to another view ({job.pooling}, max_length "
                                f"{job.max_length}) than the public set ({public_job.pooling}, "
                                f"{public_job.max_length}); pass --extraction.pooling and --extraction.max_length")
    if len(job.texts) < classes:
        raise PrivateTextsError(f"--private {data} holds {len(job.texts)} text(s), fewer than the head's {classes} "
                                "classes: give at least one text per class (hundreds work best)")
    if not cache_hit(job.directory):
        extract(job.config, **device.extraction_kwargs())
    x = StateCache(job.directory).rows(np.arange(len(job.texts))).astype(np.float64)
    if x.ndim != 2 or x.shape[1] != public_job.hidden_size or not np.isfinite(x).all():
        raise PrivateTextsError(f"the private states {x.shape} are not finite rows of the public set's "
                                f"{public_job.hidden_size}-d states; delete {job.directory} and run again")
    return x


def adapted(public_map: AffineMap, metrics: dict[str, Any], train: "SufficientStats", val: "SufficientStats | None",
            x: np.ndarray, task: PublishedTask, fit: "FitSettings", settings: "AdaptationSettings",
            head: AffineMap) -> tuple[AffineMap, dict[str, Any]]:
    """The private fit's map refitted on the private states (`adapt` at the public fit's λ) and, with
    `settings.match_priors`, matched to the task's priors through `head` (the probe's head, exact on the adapted
    map's directions: `head_probe.probe(..., means=)`), with its config, and the private fit's `metrics` plus
    {"adaptation": adapt's record, the public map's λ and scores, the private row count, the head and its priors}
    (never a text)."""
    lam = public_map.config.chosen_lambda if public_map.config is not None else None
    if lam is None:
        raise PrivateTextsError("the public fit chose no λ; --private refits a ridge map: use --fit.estimator ridge")
    try:
        out = adapt_to_priors(train, torch.from_numpy(x), task.stats, float(lam), fit, settings, head)
    except AdaptationError as exc:
        raise PrivateTextsError(str(exc)) from None
    amap = out.map
    record: dict[str, Any] = {
        **out.record, "private_rows": int(x.shape[0]), "shrinkage": settings.shrinkage,
        "head": task.head, "priors": task.priors, "task_statistics_sha256": task.sha256,
        "public_map": {"chosen_lambda": lam, "train_r2": metrics.get("train_r2"), "val_mse": metrics.get("val_mse"),
                       "val_r2": metrics.get("val_r2")},
        "train_r2": val_r2(train, amap), "val_mse": val_mse(val, amap) if val is not None else None,
        "val_r2": val_r2(val, amap) if val is not None else None}
    return AffineMap(amap.weight, amap.bias, public_map.config), {**metrics, "adaptation": record}

"""Client-side adaptation of a public-set map to the client's own unlabelled texts (the two-party regime).

A public set that holds no text of the client's task leaves the task's directions out of the fit, and the
provider's head can then put nearly every mapped state in one class (the study's leave-task-out collapses). The
client holds two things the plain fit does not use: its own unlabelled private texts (states in its own model's
space, never sent) and what the provider publishes of its task with the head (`xsilo head fit --publish_ood
true`: class means μ_c and a shared precision P of its model's task states, and the class priors π).

`adapt` adds pseudo-pairs (x_i, Σ_c r_ic μ_c) of the client's private states x_i to the public fit, carrying a
share `weight` of the fit's total weight, where r_i are class responsibilities found in rounds:

1. map the private states with the current map; score each class by the provider's Gaussian model (shared
   precision, priors), and balance the responsibilities to the priors (Sinkhorn): a collapsed map cannot then
   put every text in one class;
2. refine them by EM of a shared-covariance Gaussian mixture in the client's own space, where its texts' clusters
   are (its own model separates them; the map does not yet), on its top principal components (one per
   `rows_per_component` texts: a covariance over fewer dimensions than texts fits less noise);
3. refit the ridge map at the public fit's λ on the public statistics plus the weighted pseudo-pairs.

Nothing of this crosses: the provider's view of the private fit is the same for any private texts.

`anchors` are pairs (x, z) of texts both parties hold, each extracted by its own model, that carry `anchor_weight`
of the public fit's weight before the rounds start. Two kinds are measured: synthetic texts written from the
provider's public class descriptions (`datamodules.synthetic`: nothing of the client's crosses), and the paper's
remedy, texts the client opts to disclose (those texts cross; never the default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_modules.fitting.affine_map import AffineMap
from lightning_modules.fitting.solvers import fit_affine
from lightning_modules.fitting.stats import SufficientStats

if TYPE_CHECKING:
    from lightning_modules.settings import AdaptationSettings, FitSettings

F64 = torch.float64
SINKHORN_ITERATIONS = 50


class AdaptationError(ValueError):
    """The private states or the task statistics cannot adapt this map; the message names the fix."""


@dataclass(frozen=True)
class TaskStatistics:
    """What the provider publishes of its task in its own model's space: class means (k, d), a shared precision
    (d, d) and class priors (k,), all float64."""

    means: Tensor
    precision: Tensor
    priors: Tensor

    def __post_init__(self) -> None:
        k, d = self.means.shape
        if self.precision.shape != (d, d) or self.priors.shape != (k,):
            raise AdaptationError(f"task statistics disagree: means {tuple(self.means.shape)}, precision "
                                  f"{tuple(self.precision.shape)}, priors {tuple(self.priors.shape)}; the head's "
                                  "published statistics are corrupt: refit it with --publish_ood true")
        if k < 2 or not bool((self.priors > 0).all()) or not math.isclose(float(self.priors.sum()), 1.0, rel_tol=1e-6):
            raise AdaptationError(f"class priors must be {k} >= 2 positive numbers summing to 1, got "
                                  f"{self.priors.tolist()}")

    @classmethod
    def from_arrays(cls, means: Any, precision: Any, priors: Any | None = None) -> "TaskStatistics":
        """From published arrays; priors None (a head published before priors were) means uniform."""
        m = torch.as_tensor(means, dtype=F64)
        p = torch.full((m.shape[0],), 1.0 / m.shape[0], dtype=F64) if priors is None else torch.as_tensor(priors, dtype=F64)
        return cls(m, torch.as_tensor(precision, dtype=F64), p)

    def log_likelihood(self, y: Tensor) -> Tensor:
        """(n, k) Gaussian log-likelihood of each row under each class, plus its log prior (constants dropped)."""
        yp = y @ self.precision
        quad = (yp * y).sum(1, keepdim=True) - 2 * yp @ self.means.T + ((self.means @ self.precision) * self.means).sum(1)
        return -0.5 * quad + self.priors.log()


@dataclass
class Adaptation:
    """The adapted map, the statistics it was solved from (public + weighted pseudo-pairs) and a record."""

    map: AffineMap
    stats: SufficientStats
    record: dict[str, Any]


def column_potentials(log_scores: Tensor, priors: Tensor, iterations: int = SINKHORN_ITERATIONS) -> Tensor:
    """Per-class offsets v (k,) such that the row-wise softmax of `log_scores` + v has class totals matching
    `priors` (Sinkhorn in log space: the column potentials of entropic optimal transport)."""
    log_r = log_scores - log_scores.logsumexp(1, keepdim=True)
    target = priors.log() + math.log(log_scores.shape[0])
    potentials = torch.zeros(log_scores.shape[1], dtype=log_scores.dtype)
    for _ in range(iterations):
        step = target - log_r.logsumexp(0)
        potentials = potentials + step
        log_r = log_r + step
        log_r = log_r - log_r.logsumexp(1, keepdim=True)
    return potentials


def balanced(log_scores: Tensor, priors: Tensor, iterations: int = SINKHORN_ITERATIONS) -> Tensor:
    """Responsibilities (n, k) from log-scores whose class totals match `priors` (Sinkhorn in log space)."""
    return (log_scores + column_potentials(log_scores, priors, iterations)).softmax(1)


def ledoit_wolf(residuals: Tensor, cov: Tensor) -> float:
    """Ledoit & Wolf's shrinkage toward the mean variance for the covariance `cov` of `residuals` (n, d)."""
    n, d = residuals.shape
    target = cov.diagonal().mean()
    spread = float(((cov - target * torch.eye(d, dtype=F64)) ** 2).sum())
    noise = float((residuals.square().sum(1).square().sum() / n - cov.square().sum()) / n)
    return 1.0 if spread <= 0 else min(max(noise, 0.0), spread) / spread


def mixture_em(x: Tensor, r: Tensor, priors: Tensor, iterations: int, shrinkage: float | None) -> Tensor:
    """Refine responsibilities by EM of a shared-covariance Gaussian mixture on `x` (the client's own space),
    each step balanced to `priors`; the covariance is shrunk toward its mean variance by `shrinkage` (None: the
    Ledoit-Wolf amount, which grows as the client's texts get fewer against its model's width)."""
    d = x.shape[1]
    for _ in range(iterations):
        counts = r.sum(0).clamp_min(1e-12)
        means = (r.T @ x) / counts[:, None]
        cov = (x.T @ x - (means.T * counts) @ means) / x.shape[0]
        amount = ledoit_wolf(x - r @ means, cov) if shrinkage is None else shrinkage
        cov = (1 - amount) * cov + amount * (cov.diagonal().mean() * torch.eye(d, dtype=F64))
        precision = torch.linalg.pinv((cov + cov.T) / 2, hermitian=True)
        r = balanced(TaskStatistics(means, precision, priors).log_likelihood(x), priors)
    return r


def principal_components(x: Tensor, rows_per_component: int, classes: int) -> Tensor:
    """`x` centred and projected on its top principal components, one per `rows_per_component` rows (at least
    `classes`, at most the width); 0 keeps every dimension."""
    if rows_per_component == 0:
        return x
    components = min(x.shape[1], max(classes, x.shape[0] // rows_per_component))
    centred = x - x.mean(0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    return centred @ vh[:components].T


def weighted_rows(x: Tensor, y: Tensor, scale: float, full_yty: bool = False) -> SufficientStats:
    """The statistics of rows (x, y), each row counting `scale` times."""
    return SufficientStats.zeros(x.shape[1], y.shape[1], full_yty=full_yty).update(x, y).scaled(scale)


def with_anchors(public: SufficientStats, anchors: tuple[Tensor, Tensor], weight: float) -> SufficientStats:
    """The public statistics plus the anchor pairs (x, z), these carrying `weight` of the total weight."""
    x, z = (t.to(F64) for t in anchors)
    if x.ndim != 2 or z.ndim != 2 or x.shape[0] != z.shape[0] or x.shape[0] < 1 or (x.shape[1], z.shape[1]) != (
            public.d_x, public.d_y):
        raise AdaptationError(f"anchor pairs must be (rows, {public.d_x}) source and (rows, {public.d_y}) target "
                              f"states of the same texts, got {tuple(x.shape)} and {tuple(z.shape)}")
    if not (bool(torch.isfinite(x).all()) and bool(torch.isfinite(z).all())):
        raise AdaptationError("the anchor states hold NaN/inf; re-extract them")
    return with_anchor_stats(public, weighted_rows(x, z, 1.0, public.full_yty), weight)


def with_anchor_stats(public: SufficientStats, anchors: SufficientStats, weight: float) -> SufficientStats:
    """The public statistics plus the anchors' statistics, scaled so that the anchors carry `weight` of the total
    weight (the private fit's anchor part arrives as statistics, the lab's anchors as pairs: one weighting)."""
    if (anchors.d_x, anchors.d_y) != (public.d_x, public.d_y) or float(anchors.n) < 1:
        raise AdaptationError(f"the anchors' statistics must be of {public.d_x} x {public.d_y} states and at least "
                              f"one row, got {anchors.d_x} x {anchors.d_y} and {float(anchors.n):g} rows")
    if not 0 < weight < 1:
        raise AdaptationError(f"the anchors' weight must be in (0, 1), got {weight}")
    return public.clone().merge(anchors.scaled(weight / (1 - weight) * float(public.n) / float(anchors.n)))


def adapt(public: SufficientStats, private: Tensor, task: TaskStatistics, lam: float, fit: "FitSettings",
          settings: "AdaptationSettings", anchors: tuple[Tensor, Tensor] | None = None) -> Adaptation:
    """The ridge map at `lam` refitted on the public statistics plus pseudo-pairs of the private states (module
    docstring). `private` (n, d_A) are the client's states of its own texts, in its model's raw space;
    `anchors` are source and target states of texts both parties hold (synthetic or disclosed)."""
    x = private.to(F64)
    if x.ndim != 2 or x.shape[1] != public.d_x:
        raise AdaptationError(f"the private states must be (rows, {public.d_x}) like the public set's source "
                              f"states, got {tuple(x.shape)}; extract them with the same model and view")
    if x.shape[0] < task.means.shape[0]:
        raise AdaptationError(f"{x.shape[0]} private rows cannot adapt a {task.means.shape[0]}-class map; give at "
                              "least one text per class (hundreds work best)")
    if task.means.shape[1] != public.d_y:
        raise AdaptationError(f"the provider's task statistics are {task.means.shape[1]}-d but its public-set "
                              f"states are {public.d_y}-d; the head and the public set come from different models")
    if not bool(torch.isfinite(x).all()):
        raise AdaptationError("the private states hold NaN/inf; re-extract them")
    if anchors is not None:
        public = with_anchors(public, anchors, settings.anchor_weight)
    scale = settings.weight / (1 - settings.weight) * float(public.n) / x.shape[0]  # n: weighted with the anchors
    amap = fit_affine(public, "ridge", lam, fit.center, fit.standardize)
    x_em = principal_components(x, settings.rows_per_component, task.means.shape[0]) if settings.em_iterations else x
    stats, shares = public, []
    for _ in range(settings.rounds):
        r = balanced(task.log_likelihood(amap(x)), task.priors)
        if settings.em_iterations:
            r = mixture_em(x_em, r, task.priors, settings.em_iterations, settings.shrinkage)
        stats = public.clone().merge(weighted_rows(x, r @ task.means, scale, public.full_yty))
        amap = fit_affine(stats, "ridge", lam, fit.center, fit.standardize)
        shares.append((torch.bincount(r.argmax(1), minlength=r.shape[1]).double() / x.shape[0]).tolist())
    record = {"private_rows": int(x.shape[0]), "weight": settings.weight, "rounds": settings.rounds,
              "em_iterations": settings.em_iterations, "shrinkage": settings.shrinkage,
              "em_components": int(x_em.shape[1]), "lambda": lam,
              "anchor_rows": 0 if anchors is None else int(anchors[0].shape[0]),
              "anchor_weight": None if anchors is None else settings.anchor_weight,
              "class_shares": shares[-1] if shares else None}
    return Adaptation(amap, stats, record)

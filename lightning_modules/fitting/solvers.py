"""Closed-form affine alignment x -> y from streamed sufficient statistics (plain torch, no Lightning).

Everything is computed from `SufficientStats` (n, sums and second moments in float64), so a fit is
one pass over the data, DDP is one all-reduce of one flat tensor, and validation MSE for a whole
ridge path needs no second pass.

Conventions
-----------
* Covariances are 1/n-normalised: Cxx = xtx/n - mx mxᵀ (when centering).
* Ridge λ is *relative*: the penalty added to the normalised Cxx is ``λ · tr(Cxx)/d_x``, i.e. λ times
  the mean eigenvalue, so one grid (`DEFAULT_LAMBDAS`, 1e-6..1e2) fits any model's scale.
  The sklearn equivalent on the same (centred/standardised) X is ``Ridge(alpha=λ·n·tr(Cxx)/d_x)``
  (see `sklearn_alpha`).
* center=True fits an intercept (means are removed); center=False fits through the origin (bias 0).
* Singular systems (λ = 0 with n <= d_x, or rank-deficient Cxx): `fit_lstsq` and ridge with λ = 0
  return the minimum-norm solution (eigen-thresholded pseudo-inverse, in the coordinates the problem
  is solved in) and emit a `SingularSystemWarning` suggesting ridge.
* Every returned `AffineMap` is in raw coordinates: y ≈ x @ weight.T + bias.

Choosing λ (`solve`): the whole path comes from ONE eigendecomposition of Cxx (`path_factors`), and each
criterion is closed-form on it: gcv (generalised cross-validation on the training rows, no held-out rows
needed), val_mse (per-element MSE on held-out stats) and head (logit MSE of head ∘ map_λ on held-out stats of
(x, head(y)): λ chosen for what the target's classifier reads). `LambdaPath` keeps every computable score.

The pieces live beside this module: `stats` (SufficientStats), `affine_map` (AffineMap, the artifact),
`estimators` (ridge, its λ path, least squares, Procrustes) and `subspace` (reduced-rank, CCA, target whitening).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from lightning_modules.fitting import subspace
from lightning_modules.fitting.affine_map import AffineMap
from lightning_modules.fitting.estimators import fit_lstsq, fit_procrustes, fit_ridge, path_factors
from lightning_modules.fitting.stats import F64, SufficientStats
from lightning_modules.settings import DEFAULT_LAMBDAS, Criterion, Estimator  # declared with the recipe


def fit_affine(stats: SufficientStats, method: Estimator = "ridge", lam: float = 1e-3, center: bool = True,
               standardize: bool = False, rank: int | None = None, whiten_target: bool = False) -> AffineMap:
    """Dispatch to `fit_ridge` (relative λ), `fit_lstsq`, (scaled) `fit_procrustes`, or `subspace`'s
    reduced-rank / CCA maps (rank `rank`, null: full); whiten_target solves in whitened-target coordinates
    (CCA is whitened by construction)."""
    if method in ("reduced_rank", "cca"):
        if method == "reduced_rank":
            return subspace.fit_reduced_rank(stats, lam, rank, center, standardize, whiten_target)
        return subspace.fit_cca(stats, lam, rank, center, standardize)
    if whiten_target:  # solved in whitened-target coordinates and mapped back (needs full yty)
        return subspace.fit_whitened(stats, lambda s: fit_affine(s, method, lam, center, standardize),
                                     center=center)
    if method == "ridge":
        return fit_ridge(stats, lam, center, standardize)
    if method == "lstsq":
        return fit_lstsq(stats, center, standardize)
    if method in ("procrustes", "scaled_procrustes"):
        return fit_procrustes(stats, method == "scaled_procrustes", center, standardize)
    raise ValueError(f"unknown method {method!r}; expected ridge, lstsq, procrustes, scaled_procrustes, "
                     "reduced_rank or cca")


# --------------------------------------------------------------------------- closed-form evaluation


def _sse_per_row(stats: SufficientStats, amap: AffineMap) -> tuple[float, float]:
    """(E||y - Wx - b||², E||y - E y||²) from the stats, in centred form to limit cancellation."""
    n = stats.n
    w = amap.weight.to(device=stats.xtx.device, dtype=F64)
    b = amap.bias.to(device=stats.xtx.device, dtype=F64)
    mx, my = stats.sum_x / n, stats.sum_y / n
    cxx = stats.xtx / n - torch.outer(mx, mx)
    cxy = stats.xty / n - torch.outer(mx, my)
    tr_cyy = float(stats.yty_diag.sum() / n - my @ my)
    resid_mean = my - w @ mx - b
    sse = tr_cyy - 2 * float((w * cxy.T).sum()) + float(((w @ cxx) * w).sum()) + float(resid_mean @ resid_mean)
    return max(sse, 0.0), max(tr_cyy, 0.0)


def val_mse(stats: SufficientStats, amap: AffineMap) -> float:
    """Mean squared error per element (as F.mse_loss(amap(x), y)) over the rows summarised by `stats`."""
    return _sse_per_row(stats, amap)[0] / stats.d_y


def val_r2(stats: SufficientStats, amap: AffineMap) -> float:
    """Variance-weighted R² = 1 - SSE/SST over the rows summarised by `stats`."""
    sse, sst = _sse_per_row(stats, amap)
    return 1.0 - sse / sst if sst > 0 else float("nan")

CRITERIA: tuple[str, ...] = ("gcv", "val_mse", "head")
LAMBDA_ESTIMATORS: tuple[str, ...] = ("ridge", "reduced_rank", "cca")  # estimators that take a ridge λ


@dataclass
class LambdaPath(Mapping):
    """The λ path of one fit: every computable criterion's score per λ (lower is better), the λ each one picks,
    and the criterion that chose the returned map. As a mapping it is {λ: that criterion's score}."""

    lambdas: list[float]
    scores: dict[str, list[float]]  # "gcv", "val_mse", "head" -> one score per λ
    chosen: dict[str, float]        # criterion -> the λ it picks
    criterion: str                  # the one that chose the returned map ("none": the estimator takes no λ)

    def __getitem__(self, lam: float) -> float:
        try:
            return self.scores[self.criterion][self.lambdas.index(lam)]
        except (KeyError, ValueError):
            raise KeyError(lam) from None

    def __iter__(self):
        return iter(self.lambdas if self.criterion in self.scores else ())

    def __len__(self) -> int:
        return len(self.lambdas) if self.criterion in self.scores else 0

    def finite_pairs(self) -> list[list[float]]:
        """[λ, score] of the deciding criterion where the score is finite (a map folder's `lambda_path`)."""
        return [[float(k), float(v)] for k, v in self.items() if math.isfinite(v)]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (a non-finite score is null)."""
        finite = lambda v: float(v) if math.isfinite(v) else None  # noqa: E731
        return {"criterion": self.criterion, "lambdas": [float(v) for v in self.lambdas],
                "chosen": {k: float(v) for k, v in self.chosen.items()},
                "scores": {k: [finite(v) for v in vs] for k, vs in self.scores.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LambdaPath":
        num = lambda v: math.inf if v is None else float(v)  # noqa: E731
        return cls([float(v) for v in data.get("lambdas") or []],
                   {k: [num(v) for v in vs] for k, vs in (data.get("scores") or {}).items()},
                   {k: float(v) for k, v in (data.get("chosen") or {}).items()}, str(data.get("criterion", "none")))

    @classmethod
    def empty(cls) -> "LambdaPath":
        return cls([], {}, {}, "none")


def resolve_criterion(criterion: str, head: AffineMap | None, head_val: SufficientStats | None,
                      train: SufficientStats | None = None, val: SufficientStats | None = None) -> str:
    """auto -> head when the head and its validation stats are known, else gcv -- except that with no more fit
    rows than source dims (the fit can interpolate, and GCV's 0/0 then favours the smallest λ) it takes val_mse
    when validation rows are given; anything else is checked."""
    if criterion == "auto":
        if head is not None and head_val is not None:
            return "head"
        interpolates = train is not None and train.count <= train.d_x + 1
        return "val_mse" if interpolates and val is not None else "gcv"
    if criterion not in CRITERIA:
        raise ValueError(f"unknown λ criterion {criterion!r}; use auto, gcv, val_mse or head")
    return criterion


def solve(train: SufficientStats, val: SufficientStats | None, estimator: Estimator = "ridge",
          lambdas: Sequence[float] = DEFAULT_LAMBDAS, center: bool = True, standardize: bool = False,
          criterion: Criterion = "auto", head: AffineMap | None = None, head_val: SufficientStats | None = None,
          rank: int | None = None, whiten_target: bool = False) -> tuple[AffineMap, float | None, LambdaPath]:
    """The closed-form fit of every aligner: (map, chosen λ or None, its `LambdaPath`).

    λ-taking estimators (ridge, reduced_rank, cca) score the whole ridge path from ONE eigh of the training
    Cxx: gcv always; val_mse (per-element MSE on `val`) when validation rows are given; head (logit MSE of
    head ∘ map_λ on `head_val`, the stats of (x_val, head(y_val))) when the target head is given. `criterion`
    picks λ (auto: head where known, else gcv); reduced_rank/cca are then fitted at that λ. Other estimators
    take no λ: their path is empty.
    """
    crit = resolve_criterion(criterion, head, head_val, train, val)
    if estimator not in LAMBDA_ESTIMATORS:
        amap = fit_affine(train, estimator, center=center, standardize=standardize, rank=rank,
                          whiten_target=whiten_target)
        return amap, None, LambdaPath.empty()
    lambdas = [float(v) for v in lambdas]
    if not lambdas:
        raise ValueError(f"{estimator} needs at least one λ in `lambdas`")
    if any(lam < 0 or not math.isfinite(lam) for lam in lambdas):
        raise ValueError(f"ridge λ must be finite and >= 0, got {lambdas}")
    if crit == "val_mse" and val is None:
        raise ValueError("criterion='val_mse' needs validation rows; give val stats or use criterion='gcv'")
    if crit == "head" and (head is None or head_val is None):
        raise ValueError("criterion='head' needs the target head and the validation stats of (x, head(y)); "
                         "give head= and head_val= or use criterion='gcv'")
    if head is not None and head.d_x != train.d_y:
        raise ValueError(f"the head reads {head.d_x}-d states but the map's targets are {train.d_y}-d; "
                         "pass the classifier trained on these target states")
    factors = path_factors(train, center, standardize)
    scores = {"gcv": factors.gcv(lambdas)}
    if val is not None:
        scores["val_mse"] = factors.mse(val, lambdas)
    if head is not None and head_val is not None:
        scores["head"] = factors.mse(head_val, lambdas, head)
    chosen = {name: lambdas[min(range(len(v)), key=v.__getitem__)] for name, v in scores.items()}
    lam = chosen[crit]
    if estimator == "ridge" and not whiten_target:
        amap = factors.map(lam)
    else:
        amap = fit_affine(train, estimator, lam, center, standardize, rank=rank, whiten_target=whiten_target)
    return amap, lam, LambdaPath(lambdas, scores, chosen, crit)

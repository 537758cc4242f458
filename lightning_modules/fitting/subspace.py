"""Constrained affine maps x -> y from `SufficientStats`: reduced-rank ridge, CCA, and target whitening.

Every estimator returns an `AffineMap` in raw coordinates (y ≈ x @ weight.T + bias), as `solvers`' do, and
uses the same conventions: 1/n covariances, relative λ (the penalty λ·tr(Cxx)/d_x on the normalised Cxx),
`center` fits an intercept, `standardize` z-scores each dim before solving.

Target whitening solves in y' = (Cyy + ε·tr(Cyy)/d_y·I)^{-1/2} (y - μ_y) and maps the fit back. An
unconstrained ridge or least-squares map is equivariant under any invertible affine transform of the
outputs (each output column is solved independently and the penalty is on x only), so whitening changes
NOTHING for plain ridge: the same predictions, up to round-off. It matters only for constrained maps: the
rank constraint of `fit_reduced_rank` (which then keeps the directions of most *correlation* instead of most
target variance) and the orthogonality of Procrustes.

`fit_cca` is the map through the top canonical pairs. Up to the shrinkage of Cyy in the reconstruction it is
reduced-rank ridge in whitened-target coordinates (classical: RRR with weight Cyy^{-1} is CCA); the tests
check that identity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from lightning_modules.fitting.affine_map import AffineMap
from lightning_modules.fitting.estimators import Normalization
from lightning_modules.fitting.stats import F64, SufficientStats

Fit = Callable[[SufficientStats], AffineMap]
TARGET_SHRINK = 1e-3  # whitening's relative shrinkage ε of Cyy: keeps y's near-dead directions from exploding


class SubspaceError(ValueError):
    """A reduced-rank or CCA fit cannot run as asked; the message names the fix."""


def _unit(c: Tensor) -> float:
    unit = float(c.diagonal().mean()) if c.numel() else 0.0
    return unit if unit > 0 and math.isfinite(unit) else 1.0


def _check(stats: SufficientStats, lam: float, rank: int | None, where: str) -> int:
    """The rank to use (None: min(d_x, d_y)); a clear error for a bad λ, rank or empty stats."""
    if stats.count < 1:
        raise SubspaceError(f"{where}: cannot fit from empty SufficientStats (n=0)")
    if lam < 0 or not math.isfinite(lam):
        raise SubspaceError(f"{where}: λ must be finite and >= 0, got {lam}")
    full = min(stats.d_x, stats.d_y)
    if rank is None:
        return full
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= full:
        raise SubspaceError(f"{where}: rank must be an integer in 1..min(d_x, d_y)={full} (d_x={stats.d_x}, "
                            f"d_y={stats.d_y}), got {rank!r}; pass fit.rank in that range or null for full rank")
    return rank


def _need_full_yty(stats: SufficientStats, where: str) -> None:
    if not stats.full_yty:
        raise SubspaceError(f"{where} needs the full target covariance: accumulate the statistics with "
                            "SufficientStats.zeros(d_x, d_y, full_yty=True)")


def _inv_sqrt(c: Tensor, shrink: float) -> tuple[Tensor, Tensor]:
    """((C + s·tr/d·I)^{-1/2}, (C + s·tr/d·I)^{1/2}) of a symmetric PSD matrix, by one eigh."""
    evals, evecs = torch.linalg.eigh((c + c.T) / 2)
    evals = evals.clamp_min(0) + shrink * _unit(c)
    floor = evals.max().clamp_min(1e-300) * c.shape[0] * torch.finfo(F64).eps
    evals = evals.clamp_min(floor)  # shrink=0 on a singular C: a pseudo-whitening, never inf
    return (evecs / evals.sqrt()) @ evecs.T, (evecs * evals.sqrt()) @ evecs.T


def target_covariance(stats: SufficientStats, center: bool = True) -> Tensor:
    """Cyy = yty/n - μ μᵀ (μ = 0 when not centring), 1/n-normalised, raw coordinates."""
    _need_full_yty(stats, "target_covariance")
    n = stats.n
    mean = stats.sum_y / n if center else torch.zeros_like(stats.sum_y)
    cyy = stats.yty / n - torch.outer(mean, mean)
    return (cyy + cyy.T) / 2


def transform_target(stats: SufficientStats, t: Tensor, shift: Tensor) -> SufficientStats:
    """The statistics of (x, y' = t (y - shift)) from those of (x, y), exactly; t is (d_y', d_y)."""
    _need_full_yty(stats, "transform_target")
    t, shift = t.to(F64), shift.to(F64)
    n = stats.n
    sum_c = stats.sum_y - n * shift
    cross = torch.outer(stats.sum_y, shift)
    yty_c = stats.yty - cross - cross.T + n * torch.outer(shift, shift)
    return SufficientStats(n.clone(), stats.sum_x.clone(), t @ sum_c, stats.xtx.clone(),
                           (stats.xty - torch.outer(stats.sum_x, shift)) @ t.T, t @ yty_c @ t.T)


@dataclass(eq=False)
class TargetWhitening:
    """y' = forward @ (y - mean); y = inverse @ y' + mean."""

    forward: Tensor
    inverse: Tensor
    mean: Tensor

    @classmethod
    def from_stats(cls, stats: SufficientStats, shrink: float = TARGET_SHRINK, center: bool = True
                   ) -> "TargetWhitening":
        """Shrunk whitening (Cyy + shrink·tr(Cyy)/d_y·I)^{-1/2}; shrink > 0 keeps it finite on a singular Cyy."""
        if shrink < 0 or not math.isfinite(shrink):
            raise SubspaceError(f"target whitening: shrink must be finite and >= 0, got {shrink}")
        forward, inverse = _inv_sqrt(target_covariance(stats, center), shrink)
        mean = stats.sum_y / stats.n if center else torch.zeros_like(stats.sum_y)
        return cls(forward, inverse, mean)

    def unwhiten(self, amap: AffineMap) -> AffineMap:
        """The raw-target map y = inverse (W' x + b') + mean of a map fitted in whitened coordinates."""
        weight = self.inverse @ amap.weight.to(F64)
        return AffineMap(weight, self.inverse @ amap.bias.to(F64) + self.mean)


def fit_whitened(stats: SufficientStats, fit: Fit, shrink: float = TARGET_SHRINK, center: bool = True) -> AffineMap:
    """Any estimator `fit` (stats -> map) solved in whitened-target coordinates, mapped back to raw y.

    For unconstrained ridge/least squares the result equals the plain fit (output equivariance); it differs
    for rank-constrained or orthogonal maps."""
    white = TargetWhitening.from_stats(stats, shrink, center)
    return white.unwhiten(fit(transform_target(stats, white.forward, white.mean)))


def _ridge_parts(stats: SufficientStats, lam: float, center: bool, standardize: bool
                 ) -> tuple[Normalization, Tensor, Tensor]:
    """(normalisation, B = (Cxx + λu)^{-1} Cxy, M = Cxyᵀ (Cxx + λu)^{-1} Cxy); λ = 0 uses the pseudo-inverse."""
    norm = Normalization.from_stats(stats, center, standardize)
    cxx, cxy = norm.covariances(stats)
    evals, evecs = torch.linalg.eigh(cxx)
    evals = evals.clamp_min(0)
    if lam > 0:
        inv = 1.0 / (evals + lam * _unit(cxx))
    else:
        keep = evals > cxx.shape[0] * torch.finfo(F64).eps * float(evals.max().clamp_min(0))
        inv = torch.where(keep, 1.0 / torch.where(keep, evals, torch.ones_like(evals)), torch.zeros_like(evals))
    proj = evecs.T @ cxy
    scaled = inv[:, None] * proj
    return norm, evecs @ scaled, (proj.T @ scaled + scaled.T @ proj) / 2


def fit_reduced_rank(stats: SufficientStats, lam: float, rank: int | None, center: bool = True,
                     standardize: bool = False, whiten_target: bool = False,
                     target_shrink: float = TARGET_SHRINK) -> AffineMap:
    """Reduced-rank ridge (Mukherjee & Zhu 2011): the ridge map projected onto the top-`rank` right singular
    directions of its fitted values, i.e. the top eigenvectors V_r of Cxyᵀ (Cxx + λu)^{-1} Cxy:
    Wᵀ = (Cxx + λu)^{-1} Cxy V_r V_rᵀ. rank = min(d_x, d_y) (or None) is plain ridge.

    whiten_target: solve in whitened target coordinates (relative shrink `target_shrink`; needs full yty),
    so the kept directions are those of most correlation rather than most target variance; then map back.
    """
    rank = _check(stats, lam, rank, "fit_reduced_rank")
    if whiten_target:
        return fit_whitened(stats, lambda s: fit_reduced_rank(s, lam, rank, center, standardize), target_shrink,
                            center)
    norm, b, m = _ridge_parts(stats, lam, center, standardize)
    if rank < stats.d_y:
        v = torch.linalg.eigh(m)[1][:, -rank:]
        b = (b @ v) @ v.T
    return norm.fold(b.T)


@dataclass(eq=False)
class CanonicalPairs:
    """Top canonical pairs in the solved (normalised) coordinates: x_dirs (d_x, r), y_dirs (d_y, r) with
    aᵀ(Cxx + λu_x)a = 1 and bᵀ(Cyy + λu_y)b = 1, and their (regularised) correlations, descending."""

    x_dirs: Tensor
    y_dirs: Tensor
    correlations: Tensor


def canonical_pairs(stats: SufficientStats, lam: float, rank: int | None, center: bool = True,
                    standardize: bool = False) -> tuple[Normalization, CanonicalPairs, Tensor]:
    """(normalisation, the top-`rank` ridge-regularised canonical pairs, the normalised Cyy): the SVD of
    (Cxx + λu_x)^{-1/2} Cxy (Cyy + λu_y)^{-1/2}; λ = 0 is classical CCA."""
    rank = _check(stats, lam, rank, "canonical_pairs")
    _need_full_yty(stats, "fit_cca")
    norm = Normalization.from_stats(stats, center, standardize)
    cxx, cxy = norm.covariances(stats)
    cyy = target_covariance(stats, center) / torch.outer(norm.scale_y, norm.scale_y)
    wx, _ = _inv_sqrt(cxx, lam)
    wy, _ = _inv_sqrt(cyy, lam)
    u, s, vh = torch.linalg.svd(wx @ cxy @ wy, full_matrices=False)
    return norm, CanonicalPairs(wx @ u[:, :rank], wy @ vh[:rank].T, s[:rank]), cyy


def fit_cca(stats: SufficientStats, lam: float, rank: int | None, center: bool = True,
            standardize: bool = False) -> AffineMap:
    """A CCA map read by a target head: x's top-`rank` canonical variates predict y's (each scaled by its
    correlation), and y is reconstructed from its predicted variates by least squares,
    y ≈ Cyy B (Bᵀ Cyy B)^{-1} diag(ρ) Aᵀ x. Regularised by relative λ on both sides; needs full yty
    (`SufficientStats.zeros(..., full_yty=True)`)."""
    norm, pairs, cyy = canonical_pairs(stats, lam, rank, center, standardize)
    b = pairs.y_dirs
    recon = cyy @ b @ torch.linalg.pinv(b.T @ cyy @ b, hermitian=True)
    return norm.fold(recon @ (pairs.correlations[:, None] * pairs.x_dirs.T))

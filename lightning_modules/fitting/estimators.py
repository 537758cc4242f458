"""The closed-form estimators on `SufficientStats`: ridge (one λ by Cholesky, or the whole λ path from ONE
eigendecomposition, `RidgeFactors`), least squares and (scaled) orthogonal Procrustes, each solved in the
normalised coordinates of a `Normalization` and returned as an `AffineMap` in raw coordinates.

Conventions (see `solvers` for the λ criteria):
* Covariances are 1/n-normalised: Cxx = xtx/n - mx mxᵀ (when centering).
* Ridge λ is *relative*: the penalty added to the normalised Cxx is ``λ · tr(Cxx)/d_x``, i.e. λ times
  the mean eigenvalue; the sklearn equivalent is ``Ridge(alpha=λ·n·tr(Cxx)/d_x)`` (`sklearn_alpha`).
* Singular systems (λ = 0 with n <= d_x, or rank-deficient Cxx): `fit_lstsq` and ridge with λ = 0
  return the minimum-norm solution and emit a `SingularSystemWarning`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from lightning_modules.fitting.affine_map import AffineMap
from lightning_modules.fitting.standardize import REL_TOL, safe_scale, std_from_moments
from lightning_modules.fitting.stats import F64, SufficientStats


class SingularSystemWarning(UserWarning):
    """Least squares on a singular / rank-deficient system: a minimum-norm solution was returned."""


@dataclass(eq=False)
class Normalization:
    """Affine normalisation x' = (x - mean_x)/scale_x, y' = (y - mean_y)/scale_y used inside a fit.

    center=False sets the means to 0 (fit through the origin); standardize=False sets the scales to 1.
    Standardisation uses each dim's true std; dead dims (`lightning_modules.fitting.standardize`) keep scale 1.
    """

    mean_x: Tensor
    mean_y: Tensor
    scale_x: Tensor
    scale_y: Tensor

    @classmethod
    def from_stats(cls, stats: SufficientStats, center: bool = True, standardize: bool = False,
                   rel_tol: float = REL_TOL) -> "Normalization":
        if stats.count < 1:
            raise ValueError("cannot fit from empty SufficientStats (n=0)")
        n = stats.n
        mx, my = stats.sum_x / n, stats.sum_y / n
        if standardize:
            sx = safe_scale(std_from_moments(n, stats.sum_x, stats.xtx.diagonal())[1], rel_tol)
            sy = safe_scale(std_from_moments(n, stats.sum_y, stats.yty_diag)[1], rel_tol)
        else:
            sx, sy = torch.ones_like(mx), torch.ones_like(my)
        if not center:
            mx, my = torch.zeros_like(mx), torch.zeros_like(my)
        return cls(mx, my, sx, sy)

    def covariances(self, stats: SufficientStats) -> tuple[Tensor, Tensor]:
        """(Cxx, Cxy) of the normalised variables, 1/n-normalised."""
        n = stats.n
        cxx = stats.xtx / n - torch.outer(self.mean_x, self.mean_x)
        cxy = stats.xty / n - torch.outer(self.mean_x, self.mean_y)
        cxx = cxx / torch.outer(self.scale_x, self.scale_x)
        cxy = cxy / torch.outer(self.scale_x, self.scale_y)
        return (cxx + cxx.T) / 2, cxy

    def normalize_x(self, x: Tensor) -> Tensor:
        return (x.to(F64) - self.mean_x) / self.scale_x

    def denormalize_y(self, y_n: Tensor) -> Tensor:
        return y_n.to(F64) * self.scale_y + self.mean_y

    def fold(self, weight_n: Tensor) -> AffineMap:
        """Raw-coordinate map equal to denormalize_y(normalize_x(x) @ weight_n.T)."""
        weight = weight_n * self.scale_y[:, None] / self.scale_x[None, :]
        return AffineMap(weight, self.mean_y - weight @ self.mean_x)


# --------------------------------------------------------------------------- estimators


def _problem(stats: SufficientStats, center: bool, standardize: bool) -> tuple[Normalization, Tensor, Tensor]:
    norm = Normalization.from_stats(stats, center, standardize)
    cxx, cxy = norm.covariances(stats)
    return norm, cxx, cxy


def _lambda_unit(cxx: Tensor) -> float:
    unit = float(cxx.diagonal().mean()) if cxx.numel() else 0.0
    return unit if unit > 0 and math.isfinite(unit) else 1.0


def _pinv_inverse(evals: Tensor, n: int, rcond: float | None, where: str) -> Tensor:
    """1/e on eigenvalues above rcond·max(e), 0 below; warns when anything was cut."""
    d = evals.shape[0]
    rcond = d * torch.finfo(F64).eps if rcond is None else rcond
    keep = evals > rcond * float(evals.max().clamp_min(0))
    rank = int(keep.sum())
    if rank < d:
        warnings.warn(
            f"{where}: singular system, Cxx has numerical rank {rank} < d_x={d} (n={n} rows"
            f"{', fewer than dims' if n <= d else ''}); returning the minimum-norm least-squares solution "
            "(eigen-thresholded pseudo-inverse). Use method='ridge' with lam > 0 for a stable fit.",
            SingularSystemWarning, stacklevel=3)
    return torch.where(keep, 1.0 / torch.where(keep, evals, torch.ones_like(evals)), torch.zeros_like(evals))


def sklearn_alpha(stats: SufficientStats, lam: float, center: bool = True, standardize: bool = False) -> float:
    """sklearn `Ridge(alpha=...)` equivalent of relative λ on the same normalised X: λ·n·tr(Cxx)/d_x."""
    _, cxx, _ = _problem(stats, center, standardize)
    return lam * stats.count * _lambda_unit(cxx)


@dataclass(eq=False)
class RidgeFactors:
    """The ridge path's one eigendecomposition: every map_λ, its degrees of freedom, its GCV score and its MSE
    on any held-out statistics (optionally through a head) follow from these in O(d_x²) per λ.

    In the normalised coordinates of `norm`: Cxx = V diag(evals) Vᵀ, proj = Vᵀ Cxy, and
    map_λ's normalised weight is projᵀ diag(s_λ) Vᵀ with s_λ = 1/(evals + λ·unit).
    """

    norm: Normalization
    evals: Tensor       # (d_x,) eigenvalues of the normalised Cxx, clamped >= 0
    evecs: Tensor       # (d_x, d_x) V
    proj: Tensor        # (d_x, d_y) Vᵀ Cxy
    unit: float         # λ's unit: tr(Cxx)/d_x
    n: int              # training rows
    sst: float          # Σ_j Var(y_j) in raw coordinates (second moment about mean_y), per row
    intercept: bool     # an intercept was fitted (center=True): one more degree of freedom
    rcond: float | None = None

    def inverse(self, lam: float) -> Tensor:
        """s_λ: 1/(e + λ·unit); λ = 0 is the thresholded pseudo-inverse (warns when singular)."""
        if lam < 0 or not math.isfinite(lam):
            raise ValueError(f"ridge λ must be finite and >= 0, got {lam}")
        if lam == 0:
            return _pinv_inverse(self.evals, self.n, self.rcond, "ridge path (λ=0)")
        return 1.0 / (self.evals + lam * self.unit)

    def df(self, lam: float) -> float:
        """Effective degrees of freedom tr(H_λ) = Σ e/(e + λ·unit), plus 1 for the intercept."""
        return float((self.evals * self.inverse(lam)).sum()) + (1.0 if self.intercept else 0.0)

    def map(self, lam: float, head: AffineMap | None = None) -> AffineMap:
        """The ridge map at λ in raw coordinates; with `head`, the composition head ∘ map_λ (= `compose`),
        built without forming the d_y × d_x map."""
        s = self.inverse(lam)
        if head is None:
            return self.norm.fold((self.evecs @ (s[:, None] * self.proj)).T)
        b, c = self._out(head)
        weight = ((b * s[:, None]).T @ self.evecs.T) / self.norm.scale_x[None, :]
        return AffineMap(weight, c - weight @ self.norm.mean_x)

    def _out(self, head: AffineMap | None) -> tuple[Tensor, Tensor]:
        """(B, c) with raw weight_λ = Bᵀ diag(s_λ) (D_x⁻¹V)ᵀ and bias_λ = c - weight_λ · mean_x."""
        b, c = self.proj * self.norm.scale_y[None, :], self.norm.mean_y
        if head is not None:
            hw = head.weight.to(device=b.device, dtype=F64)
            b, c = b @ hw.T, hw @ c + head.bias.to(device=b.device, dtype=F64)
        return b, c

    def gcv(self, lambdas: Sequence[float]) -> list[float]:
        """GCV(λ) = (per-element training MSE of map_λ) / (1 - df_λ/n)², lower is better (inf when df_λ >= n).

        Training residual per row (raw coordinates), from the eigenbasis alone:
        E||y - ŷ_λ||² = Σ_j Var(y_j) - Σ_i w_i (2 s_i - e_i s_i²), with w_i = Σ_j scale_y_j² proj_ij².
        """
        w = ((self.proj * self.norm.scale_y[None, :]) ** 2).sum(1)
        d_y = self.proj.shape[1]
        out = []
        for lam in lambdas:
            s = self.inverse(lam)
            sse = max(self.sst - float(w @ (2 * s - self.evals * s * s)), 0.0)
            dof = 1.0 - self.df(lam) / self.n
            out.append(sse / d_y / dof ** 2 if dof > 0 else math.inf)
        return out

    def mse(self, stats: SufficientStats, lambdas: Sequence[float], head: AffineMap | None = None) -> list[float]:
        """Per-element MSE of map_λ on the rows summarised by `stats` (as `val_mse(stats, self.map(λ))`), for
        every λ; with `head`, of head ∘ map_λ on stats of (x, head(y)) (the head criterion's logit MSE).

        One O(d_x²·(d_x + d_out)) setup, then O(d_x²) per λ: with A = D_x⁻¹V, G = Aᵀ Cxx' A, H = Aᵀ Cxz',
        K = B Bᵀ, u = Aᵀ(mean_x' - mean_x), δ = mean_z' - c:
        E||z - W_λx - b_λ||² = tr Czz' - 2 sᵀ rowsum(B∘H) + sᵀ(G∘K)s + ||δ||² - 2 (s∘u)ᵀBδ + (s∘u)ᵀK(s∘u).
        """
        b, c = self._out(head)
        if (stats.d_x, stats.d_y) != (self.evecs.shape[0], b.shape[1]):
            raise ValueError(f"scoring stats hold {stats.d_x} -> {stats.d_y} columns, but the path maps "
                             f"{self.evecs.shape[0]} -> {b.shape[1]}" + (" (through the head)" if head else ""))
        dev = self.evecs.device
        n = stats.n.to(dev)
        mx, mz = stats.sum_x.to(dev) / n, stats.sum_y.to(dev) / n
        cxx = stats.xtx.to(dev) / n - torch.outer(mx, mx)
        cxz = stats.xty.to(dev) / n - torch.outer(mx, mz)
        tr_czz = float(stats.yty_diag.to(dev).sum() / n - mz @ mz)
        a = self.evecs / self.norm.scale_x[:, None]
        g = a.T @ cxx @ a
        k = b @ b.T
        m = g * k
        bh = (b * (a.T @ cxz)).sum(1)
        u = a.T @ (mx - self.norm.mean_x)
        delta = mz - c
        r, dd = b @ delta, float(delta @ delta)
        out = []
        for lam in lambdas:
            s = self.inverse(lam)
            su = s * u
            sse = (tr_czz - 2 * float(s @ bh) + float(s @ (m @ s)) + dd - 2 * float(su @ r) + float(su @ (k @ su)))
            out.append(max(sse, 0.0) / b.shape[1])
        return out


def path_factors(train: SufficientStats, center: bool = True, standardize: bool = False,
                 rcond: float | None = None) -> RidgeFactors:
    """The ONE eigendecomposition behind the whole ridge path (`RidgeFactors.map(λ)` for any λ)."""
    norm, cxx, cxy = _problem(train, center, standardize)
    evals, evecs = torch.linalg.eigh(cxx)
    n = train.n
    sst = float((train.yty_diag / n - norm.mean_y ** 2).sum())
    return RidgeFactors(norm, evals.clamp_min(0), evecs, evecs.T @ cxy, _lambda_unit(cxx), train.count, sst,
                        center, rcond)


def ridge_path(stats: SufficientStats, lambdas: Sequence[float], center: bool = True,
               standardize: bool = False, rcond: float | None = None) -> list[AffineMap]:
    """Ridge maps for many relative λ from ONE eigendecomposition: Wᵀ_λ = V diag(1/(e + λ·tr/d)) Vᵀ Cxy.

    λ = 0 gives the least-squares solution (minimum-norm + warning if singular, as `fit_lstsq`).
    """
    if any(lam < 0 or not math.isfinite(lam) for lam in lambdas):
        raise ValueError(f"ridge λ must be finite and >= 0, got {list(lambdas)}")
    factors = path_factors(stats, center, standardize, rcond)
    return [factors.map(lam) for lam in lambdas]


def fit_ridge(stats: SufficientStats, lam: float, center: bool = True, standardize: bool = False) -> AffineMap:
    """Single ridge fit via Cholesky (λ > 0); λ = 0 is `fit_lstsq`."""
    if lam < 0 or not math.isfinite(lam):
        raise ValueError(f"ridge λ must be finite and >= 0, got {lam}")
    if lam == 0:
        return fit_lstsq(stats, center=center, standardize=standardize)
    norm, cxx, cxy = _problem(stats, center, standardize)
    a = cxx + lam * _lambda_unit(cxx) * torch.eye(cxx.shape[0], dtype=F64, device=cxx.device)
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) != 0:  # numerically indefinite (tiny λ on a degenerate Cxx): use the eigen path
        return ridge_path(stats, [lam], center, standardize)[0]
    return norm.fold(torch.cholesky_solve(cxy, chol).T)


def fit_lstsq(stats: SufficientStats, center: bool = True, standardize: bool = False,
              rcond: float | None = None) -> AffineMap:
    """Least squares via the eigendecomposition of Cxx.

    Singular / rank-deficient Cxx (eigenvalues <= rcond·max, rcond default d_x·eps): the
    minimum-norm solution is returned and a `SingularSystemWarning` is emitted.
    """
    norm, cxx, cxy = _problem(stats, center, standardize)
    evals, evecs = torch.linalg.eigh(cxx)
    inv = _pinv_inverse(evals, stats.count, rcond, "fit_lstsq")
    return norm.fold((evecs @ (inv[:, None] * (evecs.T @ cxy))).T)


def fit_procrustes(stats: SufficientStats, scaled: bool = False, center: bool = True,
                   standardize: bool = False) -> AffineMap:
    """Orthogonal Procrustes: W = polar factor of Cxyᵀ (semi-orthogonal if d_x != d_y).

    With Cxy = U Σ Vᵀ, Wᵀ = Q = U Vᵀ. `scaled` multiplies by the least-squares optimal
    s = tr(Σ)/tr(Qᵀ Cxx Q), which is tr(Σ)/tr(Cxx) when d_x <= d_y; for d_x > d_y, Q drops part of
    x's variance and dividing by the full tr(Cxx) would shrink s.
    """
    norm, cxx, cxy = _problem(stats, center, standardize)
    u, sv, vh = torch.linalg.svd(cxy, full_matrices=False)
    q = u @ vh
    if scaled:
        tr = float(((cxx @ q) * q).sum())
        q = q * (float(sv.sum()) / tr if tr > 0 else 0.0)
    return norm.fold(q.T)

def gcv_scores(train: SufficientStats, lambdas: Sequence[float], center: bool = True,
               standardize: bool = False) -> list[float]:
    """Generalised cross-validation score of every λ (lower is better), from the one eigh (`RidgeFactors.gcv`)."""
    return path_factors(train, center, standardize).gcv(lambdas)

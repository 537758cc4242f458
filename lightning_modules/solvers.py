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
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from lightning_modules.settings import DEFAULT_LAMBDAS, Criterion, Estimator  # declared with the recipe's other settings
from lightning_modules.standardize import REL_TOL, safe_scale, std_from_moments

F64 = torch.float64

# Rows per float64 block in `update` (bounds the float64 copy of a float32/bf16 batch) and column
# panel width for the symmetric Gram updates.
_CHUNK_ROWS = 8192
_PANEL = 256


class SingularSystemWarning(UserWarning):
    """Least squares on a singular / rank-deficient system: a minimum-norm solution was returned."""


# --------------------------------------------------------------------------- statistics


def _gram_update_(acc: Tensor, a: Tensor) -> None:
    """acc += aᵀa, computing only the upper block-trapezoid (≈ (1 + 1/B)/2 of a full GEMM) and mirroring."""
    d = a.shape[1]
    if d < 2 * _PANEL:
        acc.addmm_(a.T, a)
        return
    for s in range(0, d, _PANEL):
        e = min(s + _PANEL, d)
        acc[s:e, s:].addmm_(a[:, s:e].T, a[:, s:])
    for s in range(0, d - _PANEL, _PANEL):
        e = min(s + _PANEL, d)
        acc[e:, s:e].copy_(acc[s:e, e:].T)


def _bad_rows_error(name: str, t: Tensor) -> ValueError:
    bad = int((~torch.isfinite(t)).any(dim=1).sum())
    what = (f"{bad} of {t.shape[0]} rows contain NaN/inf" if bad
            else "its values are finite but their sums overflow float64")
    return ValueError(f"SufficientStats.update: `{name}` (shape {tuple(t.shape)}): {what}. "
                      "The statistics were not updated; the cached hidden states may be corrupt "
                      "(re-extract them or drop the bad rows).")


@dataclass(eq=False)
class SufficientStats:
    """Streaming sufficient statistics of paired rows (x, y), all float64.

    `yty` is the full (d_y, d_y) matrix, or only its diagonal (d_y,) when created with
    ``full_yty=False``: every estimator and `val_mse` here needs only the diagonal, and skipping the
    d_y² product saves ~30% of `update`. The full matrix is for closed-form CKA or reverse fits.
    """

    n: Tensor       # () float64 row count (exact up to 2**53)
    sum_x: Tensor   # (d_x,)
    sum_y: Tensor   # (d_y,)
    xtx: Tensor     # (d_x, d_x)
    xty: Tensor     # (d_x, d_y)
    yty: Tensor     # (d_y, d_y), or (d_y,) diagonal only

    @classmethod
    def zeros(cls, d_x: int, d_y: int, device: torch.device | str | None = None,
              full_yty: bool = True) -> "SufficientStats":
        z = lambda *shape: torch.zeros(*shape, dtype=F64, device=device)  # noqa: E731
        return cls(z(()), z(d_x), z(d_y), z(d_x, d_x), z(d_x, d_y), z(d_y, d_y) if full_yty else z(d_y))

    @property
    def d_x(self) -> int:
        return self.sum_x.shape[0]

    @property
    def d_y(self) -> int:
        return self.sum_y.shape[0]

    @property
    def full_yty(self) -> bool:
        return self.yty.ndim == 2

    @property
    def yty_diag(self) -> Tensor:
        return self.yty.diagonal() if self.full_yty else self.yty

    @property
    def count(self) -> int:
        return int(self.n.item())

    @torch.no_grad()  # states straight from a forward pass must not drag autograd graphs into the stats
    def update(self, x: Tensor, y: Tensor) -> "SufficientStats":
        """Accumulate a batch of paired rows x (m, d_x), y (m, d_y) in place; returns self."""
        for name, t, d in (("x", x, self.d_x), ("y", y, self.d_y)):
            if not isinstance(t, Tensor) or t.ndim != 2 or t.shape[1] != d:
                shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"SufficientStats.update: `{name}` must be a 2-D tensor (rows, {d}), "
                                 f"got {shape}. Flatten (batch, seq, d) to (batch*seq, d) first.")
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"SufficientStats.update: x has {x.shape[0]} rows but y has {y.shape[0]}; "
                             "rows must be paired.")
        dev = self.xtx.device
        starts = range(0, x.shape[0], _CHUNK_ROWS)
        cast = lambda t, s: t[s:s + _CHUNK_ROWS].to(device=dev, dtype=F64)  # noqa: E731
        # Pass 1: column sums (GEMV, ~1% of the cost) double as the NaN/inf check -- any non-finite
        # value propagates into its column's sum -- so a bad batch raises before anything is touched.
        sums, cached = [], None
        for s in starts:
            xb, yb = cast(x, s), cast(y, s)
            ones = torch.ones(xb.shape[0], dtype=F64, device=dev)
            sums.append((ones @ xb, ones @ yb))
            for name, t, col_sum in (("x", x, sums[-1][0]), ("y", y, sums[-1][1])):
                if not bool(torch.isfinite(col_sum).all()):
                    raise _bad_rows_error(name, t)
            if len(starts) == 1:
                cached = xb, yb
        for s, (sx, sy) in zip(starts, sums):
            xb, yb = cached or (cast(x, s), cast(y, s))
            _gram_update_(self.xtx, xb)
            self.xty.addmm_(xb.T, yb)
            if self.full_yty:
                _gram_update_(self.yty, yb)
            else:
                for r in range(0, yb.shape[0], 512):  # small blocks keep the square in cache
                    yr = yb[r:r + 512]
                    self.yty.add_((yr * yr).sum(0))
            self.sum_x.add_(sx)
            self.sum_y.add_(sy)
            self.n.add_(xb.shape[0])
        return self

    def _check_compatible(self, other: "SufficientStats") -> None:
        if (other.d_x, other.d_y, other.full_yty) != (self.d_x, self.d_y, self.full_yty):
            raise ValueError(f"cannot merge stats with (d_x, d_y, full_yty)={(other.d_x, other.d_y, other.full_yty)} "
                             f"into {(self.d_x, self.d_y, self.full_yty)}")

    def merge(self, other: "SufficientStats") -> "SufficientStats":
        """Add another shard's statistics in place; returns self."""
        self._check_compatible(other)
        for a, b in zip(self.tensors(), other.tensors()):
            a.add_(b.to(a.device))
        return self

    def clone(self) -> "SufficientStats":
        return SufficientStats(*(t.clone() for t in self.tensors()))

    def tensors(self) -> tuple[Tensor, ...]:
        """(n, sum_x, sum_y, xtx, xty, yty): the constructor's arguments, in order."""
        return (self.n, self.sum_x, self.sum_y, self.xtx, self.xty, self.yty)

    def flatten(self) -> Tensor:
        """One flat float64 tensor of every statistic (sum-reducible across ranks)."""
        return torch.cat([t.reshape(-1) for t in self.tensors()])

    def unflatten(self, vec: Tensor) -> "SufficientStats":
        """New stats with this one's shapes whose fields are views into `vec` (e.g. after all-reduce)."""
        shapes = [t.shape for t in self.tensors()]
        sizes = [math.prod(s) for s in shapes]
        if vec.ndim != 1 or vec.numel() != sum(sizes):
            raise ValueError(f"unflatten: expected a 1-D tensor of {sum(sizes)} values for "
                             f"d_x={self.d_x}, d_y={self.d_y}, got shape {tuple(vec.shape)}")
        parts = torch.split(vec.to(F64), sizes)
        return SufficientStats(*(p.view(s) for p, s in zip(parts, shapes)))

    def all_reduce(self, fn: Callable[[Tensor], Tensor | None]) -> "SufficientStats":
        """Sum across ranks in place with ONE collective; `fn` sums a tensor across ranks and either
        works in place (torch.distributed.all_reduce) or returns the result (strategy.reduce)."""
        flat = self.flatten()
        out = fn(flat)
        reduced = self.unflatten(out if isinstance(out, Tensor) else flat)
        for a, b in zip(self.tensors(), reduced.tensors()):
            a.copy_(b)
        return self


# --------------------------------------------------------------------------- maps & normalisation


@dataclass(eq=False)
class AffineMap:
    """y = x @ weight.T + bias, weight (d_y, d_x), bias (d_y,), in raw coordinates."""

    weight: Tensor
    bias: Tensor

    @property
    def d_x(self) -> int:
        return self.weight.shape[1]

    @property
    def d_y(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: Tensor) -> Tensor:
        x = x.to(device=self.weight.device, dtype=self.weight.dtype)
        return torch.addmm(self.bias, x, self.weight.T) if x.ndim == 2 else x @ self.weight.T + self.bias

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> "AffineMap":
        return AffineMap(self.weight.to(device=device, dtype=dtype), self.bias.to(device=device, dtype=dtype))


@dataclass(eq=False)
class Normalization:
    """Affine normalisation x' = (x - mean_x)/scale_x, y' = (y - mean_y)/scale_y used inside a fit.

    center=False sets the means to 0 (fit through the origin); standardize=False sets the scales to 1.
    Standardisation uses each dim's true std; dead dims (`lightning_modules.standardize`) keep scale 1.
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


def fit_affine(stats: SufficientStats, method: Estimator = "ridge", lam: float = 1e-3, center: bool = True,
               standardize: bool = False, rank: int | None = None, whiten_target: bool = False) -> AffineMap:
    """Dispatch to `fit_ridge` (relative λ), `fit_lstsq`, (scaled) `fit_procrustes`, or `subspace`'s
    reduced-rank / CCA maps (rank `rank`, null: full); whiten_target solves in whitened-target coordinates
    (CCA is whitened by construction)."""
    if method in ("reduced_rank", "cca"):
        from lightning_modules import subspace  # lazy: subspace builds on this module

        if method == "reduced_rank":
            return subspace.fit_reduced_rank(stats, lam, rank, center, standardize, whiten_target)
        return subspace.fit_cca(stats, lam, rank, center, standardize)
    if whiten_target:  # solved in whitened-target coordinates and mapped back (needs full yty)
        from lightning_modules import subspace

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


def compose(head: AffineMap, amap: AffineMap) -> AffineMap:
    """head ∘ amap in raw coordinates: x ↦ head(amap(x)) (head: k × d_y, amap: d_y × d_x)."""
    if head.d_x != amap.d_y:
        raise ValueError(f"compose: the head reads {head.d_x}-d states but the map writes {amap.d_y}-d ones")
    hw, hb = head.weight.to(device=amap.weight.device, dtype=amap.weight.dtype), head.bias.to(amap.bias)
    return AffineMap(hw @ amap.weight, hw @ amap.bias + hb)


def gcv_scores(train: SufficientStats, lambdas: Sequence[float], center: bool = True,
               standardize: bool = False) -> list[float]:
    """Generalised cross-validation score of every λ (lower is better), from the one eigh (`RidgeFactors.gcv`)."""
    return path_factors(train, center, standardize).gcv(lambdas)


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

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
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch
from torch import Tensor

from lightning_modules.settings import DEFAULT_LAMBDAS  # declared with the recipe's other settings
from lightning_modules.standardize import REL_TOL, safe_scale, std_from_moments

F64 = torch.float64
Method = Literal["ridge", "lstsq", "procrustes", "scaled_procrustes"]

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


def ridge_path(stats: SufficientStats, lambdas: Sequence[float], center: bool = True,
               standardize: bool = False, rcond: float | None = None) -> list[AffineMap]:
    """Ridge maps for many relative λ from ONE eigendecomposition: Wᵀ_λ = V diag(1/(e + λ·tr/d)) Vᵀ Cxy.

    λ = 0 gives the least-squares solution (minimum-norm + warning if singular, as `fit_lstsq`).
    """
    if any(lam < 0 or not math.isfinite(lam) for lam in lambdas):
        raise ValueError(f"ridge λ must be finite and >= 0, got {list(lambdas)}")
    norm, cxx, cxy = _problem(stats, center, standardize)
    evals, evecs = torch.linalg.eigh(cxx)
    evals = evals.clamp_min(0)  # round-off negatives of a PSD matrix
    proj = evecs.T @ cxy
    unit = _lambda_unit(cxx)
    maps = []
    for lam in lambdas:
        inv = (_pinv_inverse(evals, stats.count, rcond, "ridge_path(λ=0)") if lam == 0
               else 1.0 / (evals + lam * unit))
        maps.append(norm.fold((evecs @ (inv[:, None] * proj)).T))
    return maps


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


def fit_affine(stats: SufficientStats, method: Method = "ridge", lam: float = 1e-3, center: bool = True,
               standardize: bool = False) -> AffineMap:
    """Dispatch to `fit_ridge` (relative λ), `fit_lstsq` or (scaled) `fit_procrustes`."""
    if method == "ridge":
        return fit_ridge(stats, lam, center, standardize)
    if method == "lstsq":
        return fit_lstsq(stats, center, standardize)
    if method in ("procrustes", "scaled_procrustes"):
        return fit_procrustes(stats, method == "scaled_procrustes", center, standardize)
    raise ValueError(f"unknown method {method!r}; expected ridge, lstsq, procrustes or scaled_procrustes")


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


def select_lambda(train_stats: SufficientStats, val_stats: SufficientStats,
                  lambdas: Sequence[float] = DEFAULT_LAMBDAS, center: bool = True,
                  standardize: bool = False) -> tuple[float, AffineMap, list[float]]:
    """Fit the ridge path on train, score each λ by closed-form val MSE; returns (λ*, map, mses)."""
    if not lambdas:
        raise ValueError("select_lambda needs at least one λ")
    maps = ridge_path(train_stats, lambdas, center, standardize)
    mses = [val_mse(val_stats, m) for m in maps]
    best = min(range(len(mses)), key=mses.__getitem__)
    return float(lambdas[best]), maps[best], mses


def solve(train: SufficientStats, val: SufficientStats | None, estimator: Method = "ridge",
          lambdas: Sequence[float] = DEFAULT_LAMBDAS, center: bool = True,
          standardize: bool = False) -> tuple[AffineMap, float | None, dict[float, float]]:
    """The closed-form fit of every aligner: (map, chosen λ or None, {λ: validation MSE}).

    Ridge fits the λ path on `train` and keeps the λ of least validation MSE; without validation rows it
    warns and uses the largest λ (the path is then empty). Other estimators ignore λ and `val`.
    """
    if estimator != "ridge":
        return fit_affine(train, estimator, center=center, standardize=standardize), None, {}
    lambdas = [float(v) for v in lambdas]
    if not lambdas:
        raise ValueError("ridge needs at least one λ in `lambdas`")
    if val is None and len(lambdas) > 1:
        warnings.warn("no validation rows to choose λ: using the largest λ of the path", stacklevel=2)
        lambdas = [max(lambdas)]
    if val is None:
        return ridge_path(train, lambdas, center, standardize)[0], lambdas[0], {}
    lam, amap, mses = select_lambda(train, val, lambdas, center, standardize)
    return amap, lam, dict(zip(lambdas, mses))

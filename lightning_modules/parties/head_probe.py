"""The head-aware λ of a private fit: the provider's head, known on the directions the client's maps can reach.

In two-party mode the client solves the map but the head (W_h, b_h: k × d_B) is the provider's. Every ridge map of
the path, in raw coordinates, is

    W_λ = diag(s_y) Cxyᵀ V diag(1/(e + λu)) Vᵀ diag(1/s_x),   b_λ = μ_y - W_λ μ_x

(Cxy the normalised cross-covariance, V, e the eigenpairs of the normalised Cxx), so every W_λ's columns lie in
the span of P = diag(s_y) Cxyᵀ (d_B × d_A) and head∘map_λ needs only W_h on that span and W_h μ_y + b_h. The
client queries the head under HE (ordinary encrypted session queries, counted against the provider's budgets) on
c·Q (Q an orthonormal basis of P's column space: r <= min(d_A, d_B) columns; c the provider's typical state norm,
so the queries look like states to CKKS), on μ_y and on 0: r + 2 rows. Then

    W_h' = ((logits(c Q) - logits(0)) / c)ᵀ Qᵀ,   b_h' = logits(μ_y) - W_h' μ_y

is a head that equals the provider's on every head∘map_λ (W_h' P = W_h P, and the composed biases agree), so
`solvers.solve(..., head=W_h', head_val=...)` scores the path exactly as the lab does with the real head.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lightning_modules.fitting.affine_map import AffineMap
from lightning_modules.fitting.estimators import Normalization
from lightning_modules.fitting.stats import SufficientStats


class HeadProbeError(ValueError):
    """The head cannot be probed (budgets, shapes); the message names the problem and the flag that fixes it."""


@dataclass
class HeadProbe:
    """The rows sent to the head (float64, provider space) and how to turn its answers into a head."""

    basis: np.ndarray  # (d_B, r) orthonormal columns: the span every map of the path writes into
    mean_y: np.ndarray  # (d_B,) the fit's target mean (0 without centring)
    scale: float  # c: each basis column is queried as c·q

    @property
    def rows(self) -> np.ndarray:
        """The r + 2 query rows: c·Q's columns, μ_y, 0."""
        return np.vstack([self.scale * self.basis.T, self.mean_y[None, :], np.zeros((1, self.basis.shape[0]))])

    def head(self, logits: np.ndarray) -> AffineMap:
        """The head equal to the provider's on every map of the path, from its logits (r + 2, k) on `rows`."""
        r = self.basis.shape[1]
        logits = np.asarray(logits, dtype=np.float64)
        if logits.ndim != 2 or logits.shape[0] != r + 2 or not np.isfinite(logits).all():
            raise HeadProbeError(f"the head's answers must be {r + 2} finite rows, got shape {logits.shape}")
        on_basis = ((logits[:r] - logits[r + 1]) / self.scale).T  # W_h Q, k × r
        weight = on_basis @ self.basis.T
        bias = logits[r] - weight @ self.mean_y
        return AffineMap(torch.from_numpy(weight), torch.from_numpy(bias))


def probe(train: SufficientStats, center: bool = True, standardize: bool = False,
          means: np.ndarray | None = None) -> HeadProbe:
    """The probe of the ridge path fitted on `train` with this centring and standardisation. `means` (k, d_B):
    the provider's published class means, whose directions from the fit's target mean a map adapted to the
    client's texts also writes into (`fitting.adaptation`: its pseudo-targets are mixtures of them)."""
    norm = Normalization.from_stats(train, center, standardize)
    _, cxy = norm.covariances(train)
    span = (norm.scale_y[:, None] * cxy.T).numpy()  # d_B × d_A: every W_λ's columns lie in its column space
    basis = orthonormal_columns(span)
    if means is not None:  # only what the path's span lacks: a residual above rounding of the offsets
        extra = np.asarray(means, dtype=np.float64).T - norm.mean_y.numpy()[:, None]
        residual = extra - basis @ (basis.T @ extra)
        basis = np.hstack([basis, orthonormal_columns(residual, floor=1e-8 * float(np.linalg.norm(extra, 2)))])
    typical = math.sqrt(max(float(train.yty_diag.sum() / train.n), 0.0))  # RMS norm of the provider's states
    return HeadProbe(basis, norm.mean_y.numpy().astype(np.float64), typical if typical > 0 else 1.0)


def orthonormal_columns(a: np.ndarray, floor: float | None = None) -> np.ndarray:
    """An orthonormal basis of `a`'s column space: its directions whose singular value exceeds `floor` (default:
    rounding of the largest)."""
    u, sv, _ = np.linalg.svd(a, full_matrices=False)
    if not sv.size or sv.max() <= 0:
        return u[:, :0]
    return u[:, sv > (float(sv.max()) * max(a.shape) * np.finfo(np.float64).eps if floor is None else floor)]


def rows_charged(rows: int, lanes: int) -> int:
    """Rows a server charges for `rows` query rows: a full `lanes` per ciphertext."""
    return -(-rows // lanes) * lanes


def check_budgets(rows: int, head_info: dict[str, Any], limits: dict[str, Any], head: str,
                  val_rows: int = 0) -> int:
    """The rows the probe will be charged; HeadProbeError naming the server flag when a budget is too small.
    `val_rows`: the head's val logits fetched too, charged to the client's budget (not the session's)."""
    try:
        lanes = int(head_info["lanes"])
    except (KeyError, TypeError, ValueError):
        raise HeadProbeError(f"the server's entry for head {head!r} lacks lanes; use a client of the same xsilo "
                             "version as the server") from None
    charged = rows_charged(rows, max(lanes, 1))
    for flag, needed in (("rows_per_session", charged), ("rows_per_client", charged + val_rows)):
        budget = limits.get(flag)
        if isinstance(budget, int) and not isinstance(budget, bool) and budget < needed:
            val = f" and reads its {val_rows} val logits" if flag == "rows_per_client" and val_rows else ""
            raise HeadProbeError(f"the head-aware λ queries head {head!r} on {rows} rows ({charged} charged at "
                                 f"{lanes} lanes per query){val}, but the server's --{flag} is {budget}; ask its "
                                 f"operator to raise --{flag} to at least {needed}, or align without --head "
                                 "(λ by GCV)")
    return charged


def head_val_stats(x_val: np.ndarray, logits_val: np.ndarray) -> SufficientStats:
    """SufficientStats of (the client's val states, the head's logits on the provider's val states): k columns."""
    x = torch.from_numpy(np.ascontiguousarray(x_val, dtype=np.float64))
    y = torch.from_numpy(np.ascontiguousarray(logits_val, dtype=np.float64))
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise HeadProbeError(f"the client's val states {tuple(x.shape)} and the head's val logits {tuple(y.shape)} "
                             "must have one row per val row of the public set")
    return SufficientStats.zeros(x.shape[1], y.shape[1], full_yty=False).update(x, y)

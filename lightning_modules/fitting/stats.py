"""`SufficientStats`: streamed float64 sufficient statistics of paired rows (x, y) -- n, sums and second moments.

Everything a closed-form fit needs comes from them, so a fit is one pass over the data, DDP is one all-reduce of
one flat tensor, and validation MSE for a whole ridge path needs no second pass (`solvers`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

F64 = torch.float64

# Rows per float64 block in `update` (bounds the float64 copy of a float32/bf16 batch) and column
# panel width for the symmetric Gram updates.
_CHUNK_ROWS = 8192
_PANEL = 256


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

    def scaled(self, factor: float) -> "SufficientStats":
        """New stats of the same rows, each counting `factor` times (a weighted share in a merge)."""
        return SufficientStats(*(t * factor for t in self.tensors()))

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

"""`fit_logistic`: multinomial logistic regression as scikit-learn's `LogisticRegression` solves it.

The objective is scikit-learn's exactly: C · Σ_i s_i CE_i + ½‖W‖² (s_i the sample's class weight, the bias
unpenalised), minimised here in the equivalent scaled form (1/S) Σ_i s_i CE_i + ‖W‖² / (2·C·S), S = Σ_i s_i.
Two classes use one weight vector (binary logistic regression, as scikit-learn does), returned as the
symmetric two-row head [-w/2, w/2]; k > 2 classes use k rows. States are standardised with the train rows'
mean and std (dead dimensions keep scale 1, `lightning_modules.fitting.standardize`), the problem is solved full batch
in float64 with `torch.optim.LBFGS` (strong-Wolfe line search), and the path of C values runs in increasing
order, each C warm-started from the previous solution.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_modules.fitting.standardize import safe_scale
from lightning_modules.settings import DEFAULT_CS

F64 = torch.float64
ClassWeight = Literal["balanced"] | Sequence[float] | None


@dataclass
class LogisticFit:
    """The chosen head and the C path it was chosen on.

    `weight` (k, d) and `bias` (k,) act on raw states (logits = h @ weightᵀ + bias, standardisation folded in);
    `mean` and `scale` are the train-split standardiser the problem was solved in (zeros and ones when
    `standardize=False`). `cs`, `val_accuracy`, `val_loss` and `iterations` hold one entry per C, in increasing C.
    """

    weight: Tensor
    bias: Tensor
    mean: Tensor
    scale: Tensor
    c: float
    cs: list[float]
    val_accuracy: list[float]
    val_loss: list[float]
    iterations: list[int]
    class_weights: Tensor

    def standardized(self) -> tuple[Tensor, Tensor]:
        """(weight, bias) acting on standardised states (h - mean) / scale."""
        return self.weight * self.scale, self.bias + self.weight @ self.mean

    def as_dict(self) -> dict[str, Any]:
        """The chosen C and the per-C validation scores, for metrics files."""
        return {"chosen_c": self.c, "cs": self.cs, "val_accuracy": self.val_accuracy, "val_loss": self.val_loss,
                "iterations": self.iterations}


def _check_rows(name: str, h: Tensor, y: Tensor) -> None:
    if h.ndim != 2 or y.ndim != 1 or len(h) != len(y):
        raise ValueError(f"{name} needs states of shape (n, d) and n labels, got {tuple(h.shape)} and "
                         f"{tuple(y.shape)}")
    if len(h) == 0:
        raise ValueError(f"{name} has no rows; give the split at least one labelled row")
    if not torch.isfinite(h).all():
        bad = int((~torch.isfinite(h)).any(1).sum())
        raise ValueError(f"{name} has {bad} rows with NaN or inf states; the cache may be corrupt: re-extract it")
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ValueError(f"{name} labels must be integer class indices, got {y.dtype}")


def _class_weights(cw: ClassWeight, counts: Tensor) -> Tensor:
    k = len(counts)
    if cw is None:
        return torch.ones(k, dtype=F64, device=counts.device)
    if isinstance(cw, str):
        if cw != "balanced":
            raise ValueError(f"class_weight must be None, 'balanced' or one weight per class, got {cw!r}")
        return counts.sum() / (k * counts)
    weights = torch.as_tensor(list(cw), dtype=F64, device=counts.device)
    if weights.shape != (k,) or not torch.isfinite(weights).all() or (weights <= 0).any():
        raise ValueError(f"class_weight needs {k} positive weights (one per class), got {list(cw)}")
    return weights


def _logits(params: Tensor, x: Tensor, k: int) -> Tensor:
    """Logits of the flat parameter vector: binary (d + 1 values) or multinomial (k·(d + 1) values)."""
    d = x.shape[1]
    if k == 2:
        z = x @ params[:d] + params[d]
        return torch.stack([-z / 2, z / 2], dim=1)
    w = params.view(k, d + 1)
    return x @ w[:, :d].T + w[:, d]


def _loss_and_grad(params: Tensor, x: Tensor, y: Tensor, sample_weight: Tensor, c: float, k: int
                   ) -> tuple[Tensor, Tensor]:
    """(1/S) Σ s_i CE_i + ‖W‖² / (2 C S) and its gradient, in closed form (no autograd graph per evaluation)."""
    d, total = x.shape[1], sample_weight.sum()
    grad = torch.empty_like(params)
    if k == 2:
        w = params[:d]
        z = x @ w + params[d]
        target = y.to(z.dtype)
        loss = (sample_weight * (F.softplus(z) - target * z)).sum() + 0.5 * (w @ w) / c
        residual = sample_weight * (torch.sigmoid(z) - target)
        grad[:d] = x.T @ residual + w / c
        grad[d] = residual.sum()
        return loss / total, grad / total
    wb = params.view(k, d + 1)
    w = wb[:, :d]
    z = x @ w.T + wb[:, d]
    log_p = torch.log_softmax(z, dim=1)
    loss = -(sample_weight * log_p.gather(1, y[:, None]).squeeze(1)).sum() + 0.5 * (w * w).sum() / c
    residual = log_p.exp()
    residual[torch.arange(len(y), device=y.device), y] -= 1
    residual *= sample_weight[:, None]
    g = grad.view(k, d + 1)
    g[:, :d] = residual.T @ x + w / c
    g[:, d] = residual.sum(0)
    return loss / total, grad / total


def _solve(x: Tensor, y: Tensor, sample_weight: Tensor, c: float, k: int, start: Tensor, max_iter: int,
           tol: float) -> tuple[Tensor, int]:
    """Minimise (1/S) Σ s_i CE_i + ‖W‖² / (2 C S) from `start`; returns the solution and L-BFGS's iterations."""
    params = start.clone()
    opt = torch.optim.LBFGS([params], lr=1.0, max_iter=max_iter, max_eval=2 * max_iter, tolerance_grad=tol,
                            tolerance_change=1e-14, history_size=10, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        loss, params.grad = _loss_and_grad(params, x, y, sample_weight, c, k)
        return loss

    opt.step(closure)
    return params, int(opt.state[params].get("n_iter", 0))


def fit_logistic(train_h: Tensor, train_y: Tensor, val_h: Tensor | None, val_y: Tensor | None,
                 cs: Sequence[float] = DEFAULT_CS, max_iter: int = 500, standardize: bool = True,
                 class_weight: ClassWeight = None, num_classes: int | None = None, tol: float = 1e-4) -> LogisticFit:
    """Fit scikit-learn's L2 logistic regression for every C in `cs` and keep the one best on validation.

    C is chosen by validation accuracy; ties (the same number of correct rows) go to the lower validation
    log-loss (mean unweighted cross-entropy), then to the smaller C. `val_h`/`val_y` may be None only with a
    single C. `class_weight`: None, "balanced" (n / (k · count_c) on the train rows, scikit-learn's rule) or one
    weight per class. `num_classes` defaults to the largest label + 1; every class needs a train row. `tol`
    bounds the largest gradient entry of the scaled objective at convergence: scikit-learn's lbfgs `tol` (gtol),
    whose default 1e-4 is kept (tighter tolerances chose the same C on every study task, 3-4x slower).
    """
    cs = sorted({float(c) for c in cs})
    if not cs or cs[0] <= 0 or not all(torch.isfinite(torch.tensor(cs))):
        raise ValueError(f"cs must be a non-empty list of finite C > 0 (inverse L2 strengths), got {cs}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be at least 1 L-BFGS iteration, got {max_iter}")
    _check_rows("the train split", train_h, train_y)
    has_val = val_h is not None and val_y is not None
    if has_val:
        _check_rows("the val split", val_h, val_y)
        if val_h.shape[1] != train_h.shape[1]:
            raise ValueError(f"the val states are {val_h.shape[1]}-d but the train states {train_h.shape[1]}-d")
    elif len(cs) > 1:
        raise ValueError(f"choosing C among {len(cs)} values needs the val split; give val rows or a single C")
    device = train_h.device
    x, y = train_h.to(F64), train_y.to(device, torch.long)
    k = num_classes if num_classes is not None else int(max(y.max(), val_y.max() if has_val else 0)) + 1
    if y.min() < 0 or y.max() >= k or (has_val and (val_y.min() < 0 or val_y.max() >= k)):
        raise ValueError(f"labels must lie in 0..{k - 1} (num_classes={k})")
    counts = torch.bincount(y, minlength=k).to(F64)
    if (counts == 0).any():
        missing = (counts == 0).nonzero().flatten().tolist()
        raise ValueError(f"logistic regression needs train rows of every class, but classes {missing} of {k} have "
                         "none; use a larger or stratified train split")
    class_weights = _class_weights(class_weight, counts)
    if standardize:
        mean, std = x.mean(0), x.std(0, unbiased=False)
        scale = safe_scale(std)
    else:
        mean, scale = torch.zeros(x.shape[1], dtype=F64, device=device), torch.ones(x.shape[1], dtype=F64, device=device)
    x = (x - mean) / scale
    xv = (val_h.to(device, F64) - mean) / scale if has_val else None
    yv = val_y.to(device, torch.long) if has_val else None
    d = x.shape[1]
    params = torch.zeros(d + 1 if k == 2 else k * (d + 1), dtype=F64, device=device)
    sample_weight = class_weights[y]
    accs, losses, iters, best, best_key = [], [], [], None, None
    for c in cs:
        params, n_iter = _solve(x, y, sample_weight, c, k, params, max_iter, tol)
        iters.append(n_iter)
        if not has_val:
            best = (c, params)
            accs.append(float("nan"))
            losses.append(float("nan"))
            continue
        with torch.no_grad():
            logits = _logits(params, xv, k)
            correct = int((logits.argmax(1) == yv).sum())
            loss = float(F.cross_entropy(logits, yv))
        accs.append(correct / len(yv))
        losses.append(loss)
        key = (-correct, loss)
        if best_key is None or key < best_key:  # strict: on a full tie the smaller C (seen first) stays
            best, best_key = (c, params), key
    c, params = best
    if k == 2:
        w = torch.stack([-params[:d] / 2, params[:d] / 2])
        b = torch.stack([-params[d] / 2, params[d] / 2])
    else:
        w, b = params.view(k, d + 1)[:, :d], params.view(k, d + 1)[:, d]
    weight = w / scale
    return LogisticFit(weight=weight, bias=b - weight @ mean, mean=mean, scale=scale, c=c, cs=cs,
                       val_accuracy=accs, val_loss=losses, iterations=iters, class_weights=class_weights)

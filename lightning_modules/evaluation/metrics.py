"""Alignment-quality metrics between row-paired representations, and the one ROC/AUROC code.

The alignment functions take tensors (n, d) on any device and return Python floats (plain torch,
float64). Large inputs are processed in row blocks, so n = 20k rows needs O(block·n + d²) extra
memory, never O(n²).

`roc_curve`, `auroc` and `average_precision` score a detector (OOD inputs are the positive class)
exactly in float64, ties counted half, from one sort of the scores (numpy arrays or CPU tensors).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

F64 = torch.float64
_CHUNK_ROWS = 4096          # rows per float64 block for the O(n·d) metrics
_KNN_BLOCK_ELEMS = 1 << 22  # similarity entries per kNN block (32 MiB in float64)


def _check_pair(a: Tensor, b: Tensor, same_dim: bool, what: str) -> None:
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"{what}: expected 2-D (n, d) tensors, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{what}: row counts differ ({a.shape[0]} vs {b.shape[0]}); rows must be paired")
    if same_dim and a.shape[1] != b.shape[1]:
        raise ValueError(f"{what}: dims differ ({a.shape[1]} vs {b.shape[1]})")
    if a.shape[0] == 0:
        raise ValueError(f"{what}: no rows")


def _blocks(t: Tensor, rows: int = _CHUNK_ROWS):
    for s in range(0, t.shape[0], rows):
        yield s, t[s:s + rows].to(F64)


def _col_mean(t: Tensor) -> Tensor:
    total = torch.zeros(t.shape[1], dtype=F64, device=t.device)
    for _, blk in _blocks(t):
        total += blk.sum(0)
    return total / t.shape[0]


def r2_score(pred: Tensor, target: Tensor) -> float:
    """Variance-weighted R² = 1 - Σ(target - pred)² / Σ(target - mean(target))² over all dims
    (torchmetrics R2Score(multioutput="variance_weighted"))."""
    _check_pair(pred, target, True, "r2_score")
    mean = _col_mean(target)
    sse = sst = 0.0
    for s, t in _blocks(target):
        p = pred[s:s + t.shape[0]].to(device=t.device, dtype=F64)
        sse += float(((t - p) ** 2).sum())
        sst += float(((t - mean) ** 2).sum())
    return 1.0 - sse / sst if sst > 0 else float("nan")


def mean_cosine(pred: Tensor, target: Tensor, center: bool = False, eps: float = 1e-12) -> float:
    """Mean row-wise cosine(pred_i, target_i); center=True first subtracts the TARGET's mean from both.

    Raw cosine of causal-LM states is dominated by the shared mean vector (predicting the mean
    alone can score ~0.85), so report both.
    """
    _check_pair(pred, target, True, "mean_cosine")
    mu = _col_mean(target) if center else None
    total = 0.0
    for s, t in _blocks(target):
        p = pred[s:s + t.shape[0]].to(device=t.device, dtype=F64)
        if mu is not None:
            p, t = p - mu, t - mu
        cos = (p * t).sum(1) / (p.norm(dim=1) * t.norm(dim=1)).clamp_min(eps)
        total += float(cos.sum())
    return total / target.shape[0]


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear CKA (Kornblith et al. 2019) with centering; x and y may have different dims.

    CKA = ||Ycᵀ Xc||²_F / (||Xcᵀ Xc||_F ||Ycᵀ Yc||_F), computed in feature space (row-chunked
    d×d accumulators) or, when n is smaller than the dims, with the n×n Gram matrices.
    """
    _check_pair(x, y, False, "linear_cka")
    n, dx, dy = x.shape[0], x.shape[1], y.shape[1]
    mx, my = _col_mean(x), _col_mean(y).to(x.device)
    if n * (dx + dy) < dx * dx + dy * dy + dx * dy:
        xc, yc = x.to(F64) - mx, y.to(device=x.device, dtype=F64) - my
        k, l_ = xc @ xc.T, yc @ yc.T
        num, den = float((k * l_).sum()), float(k.norm() * l_.norm())
    else:
        sxx = torch.zeros(dx, dx, dtype=F64, device=x.device)
        syy = torch.zeros(dy, dy, dtype=F64, device=x.device)
        sxy = torch.zeros(dx, dy, dtype=F64, device=x.device)
        for s, xb in _blocks(x):
            xb = xb - mx
            yb = y[s:s + xb.shape[0]].to(device=x.device, dtype=F64) - my
            sxx.addmm_(xb.T, xb)
            syy.addmm_(yb.T, yb)
            sxy.addmm_(xb.T, yb)
        num, den = float(sxy.norm() ** 2), float(sxx.norm() * syy.norm())
    return num / den if den > 0 else float("nan")


def _unit_rows(t: Tensor, dtype: torch.dtype, eps: float = 1e-12) -> Tensor:
    t = t.to(dtype)
    return t / t.norm(dim=1, keepdim=True).clamp_min(eps)


def _knn_block(unit: Tensor, s: int, e: int, k: int) -> Tensor:
    sims = unit[s:e] @ unit.T
    rows = torch.arange(e - s, device=unit.device)
    sims[rows, rows + s] = float("-inf")  # exclude self
    return sims.topk(k, dim=1).indices


def mutual_knn(x: Tensor, y: Tensor, k: int = 10, dtype: torch.dtype = F64) -> float:
    """Mean over rows of |kNN_x(i) ∩ kNN_y(i)| / k, cosine neighbours, self excluded (Huh et al. 2024).

    1 for identical spaces, ≈ k/(n-1) for independent ones. Similarities are computed in row blocks
    (`dtype=torch.float32` halves time and memory with the same neighbours up to ties).
    """
    _check_pair(x, y, False, "mutual_knn")
    n = x.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"mutual_knn: need 1 <= k < n, got k={k}, n={n}")
    ux, uy = _unit_rows(x, dtype), _unit_rows(y.to(x.device), dtype)
    block = max(1, _KNN_BLOCK_ELEMS // n)
    shared = 0
    for s in range(0, n, block):
        e = min(s + block, n)
        ix, iy = _knn_block(ux, s, e, k), _knn_block(uy, s, e, k)
        shared += int((ix.unsqueeze(2) == iy.unsqueeze(1)).any(2).sum())
    return shared / (n * k)


def null_pairs(x: Tensor, y: Tensor, seed: int = 0) -> tuple[Tensor, Tensor]:
    """(x, y with rows permuted by a seeded generator): a chance-level pairing for null metrics."""
    _check_pair(x, y, False, "null_pairs")
    perm = torch.randperm(y.shape[0], generator=torch.Generator().manual_seed(seed))
    return x, y[perm.to(y.device)]


def alignment_report(mapped: Tensor, target: Tensor, source: Tensor | None = None, k: int = 10,
                     seed: int = 0) -> dict[str, float]:
    """r2, cosine, cosine_centered, cka, mutual_knn of mapped vs target, each with a `_null`
    counterpart on a shuffled pairing; plus cka_source_target (raw spaces) when `source` is given."""
    _check_pair(mapped, target, True, "alignment_report")
    _, shuffled = null_pairs(mapped, target, seed)
    k = min(k, target.shape[0] - 1)
    metrics = {
        "r2": r2_score,
        "cosine": lambda p, t: mean_cosine(p, t, center=False),
        "cosine_centered": lambda p, t: mean_cosine(p, t, center=True),
        "cka": linear_cka,
        "mutual_knn": lambda p, t: mutual_knn(p, t, k=k),
    }
    report: dict[str, float] = {}
    for name, fn in metrics.items():
        report[name] = fn(mapped, target)
        report[f"{name}_null"] = fn(mapped, shuffled)
    if source is not None:
        report["cka_source_target"] = linear_cka(source, target)
    return report


# --- detection: ROC, AUROC, average precision (OOD positive) --------------------------------------

def _detection_counts(id_scores, ood_scores) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """(false positives, true positives, thresholds) at each distinct score, highest first; n_id, n_ood."""
    id_scores = np.asarray(id_scores, dtype=np.float64).reshape(-1)
    ood_scores = np.asarray(ood_scores, dtype=np.float64).reshape(-1)
    if len(id_scores) == 0 or len(ood_scores) == 0:
        raise ValueError(f"ROC needs ID and OOD scores, got {len(id_scores)} and {len(ood_scores)}")
    if not (np.isfinite(id_scores).all() and np.isfinite(ood_scores).all()):
        raise ValueError("ROC scores must be finite")
    scores = np.concatenate([id_scores, ood_scores])
    order = np.argsort(-scores, kind="stable")
    scores, is_ood = scores[order], order >= len(id_scores)
    last = np.r_[scores[1:] != scores[:-1], True]  # the last row of each run of tied scores
    tps = np.cumsum(is_ood)[last]
    return np.arange(1, len(scores) + 1)[last] - tps, tps, scores[last], len(id_scores), len(ood_scores)


def roc_curve(id_scores, ood_scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), OOD positive, flagging score >= threshold; starts at (0, 0) (threshold +inf)."""
    fps, tps, thresholds, n_id, n_ood = _detection_counts(id_scores, ood_scores)
    return np.r_[0.0, fps / n_id], np.r_[0.0, tps / n_ood], np.r_[np.inf, thresholds]


def auroc(id_scores, ood_scores) -> float:
    """Area under the ROC curve: P(OOD score > ID score) + ½ P(tie)."""
    fpr, tpr, _ = roc_curve(id_scores, ood_scores)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1])) / 2)


def average_precision(id_scores, ood_scores) -> float:
    """Average precision of finding OOD inputs (AUPR-Out): Σ (recallₖ − recallₖ₋₁) · precisionₖ."""
    fps, tps, _, _, n_ood = _detection_counts(id_scores, ood_scores)
    recall = np.r_[0.0, tps / n_ood]
    return float(np.sum(np.diff(recall) * tps / (tps + fps)))

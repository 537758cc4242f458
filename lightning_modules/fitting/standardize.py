"""The one zero-variance rule of every standardisation (solvers, classifier, OOD detectors).

A dimension is *dead* when its std is at most `REL_TOL` times the median std of all dimensions.
The median, unlike the maximum, ignores the few huge "massive activation" dimensions of causal
LMs, so a near-dead dimension cannot hide behind them: MPNet's fourth dead dimension has
std/max 3.4e-6, which slipped through the old fixed `1e-6 · max` rule. On this project's cached
SmolLM2 and Gemma-3 states the smallest live dimension has std/median ≥ 1.6e-2, 16x above the
threshold; MiniLM's three dead ones sit at ≤ 1e-5.
"""

from __future__ import annotations

import torch
from torch import Tensor

REL_TOL = 1e-3


def dead_dims(std: Tensor, rel_tol: float = REL_TOL) -> Tensor:
    """Boolean mask of the dimensions whose std is ≤ rel_tol · median(std) (or exactly 0)."""
    if std.numel() == 0:
        return std.bool()
    reference = std.median()
    if not reference > 0:  # more than half the dimensions are constant: fall back to the largest std
        reference = std.max()
    return (std <= rel_tol * reference) | (std <= 0)


def safe_scale(std: Tensor, rel_tol: float = REL_TOL) -> Tensor:
    """`std` with 1 on dead dimensions, so dividing by it never blows a ~0 dimension up to ~1e33."""
    std = std.clamp_min(0)
    return torch.where(dead_dims(std, rel_tol), torch.ones_like(std), std)


def std_from_moments(n: Tensor | float, s1: Tensor, s2: Tensor) -> tuple[Tensor, Tensor]:
    """(mean, std) from a count, the sum and the sum of squares (1/n-normalised)."""
    mean = s1 / n
    return mean, (s2 / n - mean * mean).clamp_min(0).sqrt()

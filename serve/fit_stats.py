"""Normalisation and published statistics of the private fit (numpy only; both parties use it).

Each party scales its own states by its train part's mean and std before any ciphertext is made,
so every encrypted value is O(1) and every Gram entry is at most the part's row count in magnitude. The
scale is range scaling only: the client undoes it after decryption (`diag(s_A) G diag(s_B)`), so the
map does not depend on it.
"""
from __future__ import annotations

from typing import Any

import numpy as np

def range_scale(std: np.ndarray) -> np.ndarray:
    """`std`, with 1 where it is 0 (or not finite). Not the fit's standardisation (the client's solver applies
    that, `lightning_modules.fitting.standardize`): dividing a near-constant dimension by its tiny std only makes it O(1),
    still bounded by Cauchy-Schwarz, and the client multiplies it back."""
    std = np.asarray(std, dtype=np.float64)
    return np.where(np.isfinite(std) & (std > 0), std, 1.0)


STEP_ROWS = 4096  # rows read at a time: a memory-mapped part is never loaded whole


def train_normaliser(train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, `range_scale` of the 1/n-normalised std) of the train part's rows, float64, in two passes of
    STEP_ROWS rows (the part may be memory-mapped)."""
    train = train if isinstance(train, np.ndarray) else np.asarray(train, dtype=np.float64)
    if train.ndim != 2 or train.shape[0] < 1:
        raise ValueError(f"the train part must be (rows >= 1, d) states, got shape {train.shape}")
    steps = range(0, train.shape[0], STEP_ROWS)
    mean = sum(np.asarray(train[i:i + STEP_ROWS], dtype=np.float64).sum(axis=0) for i in steps) / train.shape[0]
    squares = sum(((np.asarray(train[i:i + STEP_ROWS], dtype=np.float64) - mean) ** 2).sum(axis=0) for i in steps)
    return mean, range_scale(np.sqrt(squares / train.shape[0]))


def normalise(states: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(states - mean) / scale in float64."""
    return (np.asarray(states, dtype=np.float64) - mean) / scale


def column_squares(states: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Σ over rows of the normalised states squared, per column, STEP_ROWS rows at a time (the private fit's
    `GramPlan.column_shift` reads it)."""
    return sum(((normalise(states[i:i + STEP_ROWS], mean, scale)) ** 2).sum(axis=0)
               for i in range(0, states.shape[0], STEP_ROWS))


def provider_stats(parts: list[np.ndarray], mean: np.ndarray, scale: np.ndarray) -> dict[str, Any]:
    """What the provider publishes with a fit session: mu_B and s_B as used, and per part the row count, the raw
    sum of rows, the raw per-dimension sum of squares (not for the val part, part 1: standardisation needs it of
    the rows a map is fitted on, train and anchors) and the raw trace Σ z² over rows and dims (validation MSE and
    R² need only that). JSON-ready float64 lists."""
    out = []
    for index, part in enumerate(parts):
        raw = np.asarray(part, dtype=np.float64)
        squares = (raw * raw).sum(axis=0)
        out.append({"rows": int(raw.shape[0]), "sum_y": raw.sum(axis=0).tolist(),
                    "yty_diag": squares.tolist() if index != 1 else None, "trace": float(squares.sum())})
    return {"mu_B": np.asarray(mean, np.float64).tolist(), "s_B": np.asarray(scale, np.float64).tolist(),
            "parts": out}

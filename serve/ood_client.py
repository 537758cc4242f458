"""Out-of-distribution scores from decrypted logits: numpy only, for the client.

Under CKKS the server returns encrypted logits; the client decrypts them and calls
`ood_from_logits(logits, manifest["ood"])`, so the server learns nothing beyond what it
already computes. Every score is oriented so that HIGHER means MORE out-of-distribution:

* ``msp``: −max softmax probability (Hendrycks & Gimpel 2017);
* ``max_logit``: −max logit (Hendrycks et al. 2022);
* ``energy``: −logsumexp(logits), the free energy at T = 1 (Liu et al. 2020).

An input is flagged when its score is strictly above the threshold, which was calibrated
so that at least `tpr` (0.95) of in-distribution validation inputs score at or below it.

In split mode the client also holds its mapped state in plaintext, so it can run a feature-space
detector a head publishes: ``mahalanobis`` (min over classes of the squared Mahalanobis distance
under one shared precision; `mahalanobis_scores`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

# An export manifest's "ood" entry is part of the export format: its detectors and checks are declared there.
from .formats.exports import LOGIT_DETECTORS, check_ood_manifest


def _logsumexp(logits: np.ndarray) -> np.ndarray:
    top = logits.max(axis=1)
    return top + np.log(np.exp(logits - top[:, None]).sum(axis=1))


def logit_scores(logits: np.ndarray, detector: str) -> np.ndarray:
    """(n, classes) logits → (n,) float64 scores, higher = more OOD."""
    if detector not in LOGIT_DETECTORS:
        raise ValueError(f"unknown logit detector {detector!r}; use one of {LOGIT_DETECTORS}")
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(f"expected (n, classes >= 2) logits, got shape {logits.shape}")
    if not np.isfinite(logits).all():
        raise ValueError("the logits contain NaN or inf; check the decryption (keys, scale) before scoring")
    if detector == "max_logit":
        return -logits.max(axis=1)
    if detector == "energy":
        return -_logsumexp(logits)
    return -np.exp(logits.max(axis=1) - _logsumexp(logits))  # msp


def ood_from_logits(logits: np.ndarray, manifest_ood: dict[str, Any], detector: str | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Scores (higher = more OOD) and boolean flags (score > threshold) for decrypted logits.

    `detector` picks another calibrated detector from `manifest_ood["all"]`; default the
    manifest's own choice.
    """
    ood = check_ood_manifest(manifest_ood)
    name = detector or ood["detector"]
    if name not in ood["all"]:
        raise ValueError(f"no threshold for detector {name!r} in the manifest; it has {sorted(ood['all'])}")
    scores = logit_scores(np.atleast_2d(logits), name)
    return scores, scores > ood["all"][name]


def mahalanobis_scores(states: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """(n, d) states → (n,) min over classes c of (x - means[c])ᵀ precision (x - means[c]), higher = more OOD."""
    x = np.atleast_2d(np.asarray(states, dtype=np.float64))
    means, precision = np.asarray(means, dtype=np.float64), np.asarray(precision, dtype=np.float64)
    if x.shape[1:] != means.shape[1:] or precision.shape != (means.shape[1], means.shape[1]):
        raise ValueError(f"states {x.shape} do not match a detector with means {means.shape} and precision "
                         f"{precision.shape}")
    if not np.isfinite(x).all():
        raise ValueError("the states contain NaN or inf; check the extraction and the map")
    precision = (precision + precision.T) / 2
    xp, mp = x @ precision, means @ precision
    distances = (xp * x).sum(axis=1)[:, None] - 2 * xp @ means.T + (mp * means).sum(axis=1)[None, :]
    return distances.min(axis=1)

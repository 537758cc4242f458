"""The client's out-of-distribution check: its OOD rule on one batch of decrypted logits (or of its plaintext
states), and fetching a head's published feature-space detector. numpy and httpx only."""
from __future__ import annotations

import hashlib
import math
from typing import Any, Callable

import numpy as np

from .formats.folders import ExportError
from .formats.heads import FEATURE_OOD_DETECTOR, FeatureOod, feature_ood_max_bytes, read_feature_ood_npz
from .http_client import Connection, ServeError
from .ood_client import mahalanobis_scores, ood_from_logits
from .protocol import API_PREFIX


def ood_flags(rule: Any, info: Any, states: np.ndarray, logits: np.ndarray | None, probabilities: np.ndarray | None,
              mapped: Callable[[np.ndarray], np.ndarray], detector: Callable[[], FeatureOod]
              ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(scores or None, flags or None) of a `serve.client.Client`'s OOD rule (see its `ood`) on one batch: `info`
    is its ModelInfo, `mapped` its map_states and `detector` fetches the head's published feature detector."""
    calibrated = info.ood
    if callable(rule):
        flags = np.asarray(rule(states, logits), dtype=bool).reshape(-1)
        if flags.shape != (len(states),):
            raise ValueError(f"the ood callable must return one flag per text ({len(states)}), got {flags.shape}")
        return None, flags
    if isinstance(rule, (int, float)) and not isinstance(rule, bool):
        return None, probabilities.max(axis=1) < float(rule)
    if rule == FEATURE_OOD_DETECTOR or (rule is None and info.feature_ood):
        if not info.feature_ood:
            raise ServeError(f"ood={rule!r} needs a feature-space detector, but this server's "
                             f"{'head' if info.head else 'export'} publishes none; pass a float or a callable")
        published = detector()
        scores = mahalanobis_scores(mapped(states), published.means, published.precision)
        return scores, scores > published.threshold
    if rule is None and (not calibrated or logits is None):  # a label-only layer gives no logits to score
        return None, None
    if not calibrated:
        raise ServeError(f"ood={rule!r} names a calibrated logit detector, but this server's "
                         f"{'head' if info.head else 'export'} has none; pass a float threshold or a callable")
    try:
        return ood_from_logits(logits, calibrated, detector=rule)
    except ValueError as exc:
        raise ServeError(f"cannot flag OOD inputs: {exc}") from None


def fetch_feature_detector(connection: Connection, info: Any, cached: bytes | None = None) -> FeatureOod:
    """A head's published feature-space detector and class priors when published (`info` is the head's ModelInfo):
    `cached` (the bytes a session cache kept) or fetched, size bounded, sha256 checked against /v1/model, arrays
    validated."""
    published = info.feature_ood
    if not published or info.head is None:
        raise ServeError("the server publishes no feature-space OOD detector for this layer")
    limit = feature_ood_max_bytes(info.output_dim, info.input_dim)
    data = cached if cached is not None else \
        connection.request("GET", f"{API_PREFIX}/heads/{info.head}/feature-ood", max_bytes=limit).content
    if hashlib.sha256(data).hexdigest() != published.get("sha256"):
        raise ServeError("the feature-OOD detector the server sent does not match the sha256 in /v1/model; "
                         "retry, or ask the operator")
    try:
        means, precision, priors = read_feature_ood_npz(data, info.output_dim, info.input_dim,
                                                        "the server's feature-OOD detector", "ask the operator")
        threshold = float(published["threshold"])
    except (ExportError, KeyError, TypeError, ValueError) as exc:
        raise ServeError(str(exc)) from None
    if not math.isfinite(threshold):
        raise ServeError("the server's feature-OOD threshold is not a finite number")
    return FeatureOod(means, precision, threshold, float(published.get("tpr") or 0.0), data,
                      published["sha256"], priors)

"""Which OOD detector a fused deployment can run, chosen by validation AUROC.

In fused mode the client sees two things in plaintext: the logits it decrypts and its own
(source-model) hidden states. It never sees target-space states, so the deployable detectors are

* ``msp@logits``, ``max_logit@logits``, ``energy@logits``: on the decrypted (mapped) logits;
* ``mahalanobis@source``, ``knn@source``: on the client's own states, fitted on its in-distribution
  training texts. Mahalanobis's class means use the labels the service itself returns for those
  texts (the mapped head's argmax), which a client can obtain; it needs no ground-truth labels.

`select_detector` scores each candidate on held-out data (ID validation rows against a validation
half of every OOD set), keeps the best mean AUROC, and reports every candidate's validation and
test AUROC. A state detector is saved as a numpy-only file (`save_state_detector`) that the client
loads with `load_state_detector` and applies to the states it extracts anyway.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from datamodules.cache import atomic_write_bytes
from lightning_modules.evaluation.ood_detectors import CosineKNN, Mahalanobis, calibrate_threshold, detection_metrics

LOGIT_CANDIDATES = ("msp@logits", "max_logit@logits", "energy@logits")
STATE_CANDIDATES = ("mahalanobis@source", "knn@source")
FUSED_CANDIDATES = LOGIT_CANDIDATES + STATE_CANDIDATES
STATE_DETECTOR_FORMAT = 1


def fit_source_detectors(h_train: Tensor, labels: Tensor, knn_k: int, shrinkage: float
                         ) -> dict[str, Mahalanobis | CosineKNN]:
    """The state candidates, fitted on the client's own ID training states."""
    return {"mahalanobis@source": Mahalanobis(shrinkage).fit(h_train, labels),
            "knn@source": CosineKNN(min(knn_k, len(h_train))).fit(h_train)}


def select_detector(scores: dict[str, dict[str, Any]], tpr: float) -> dict[str, Any]:
    """Pick the candidate with the best mean validation AUROC over the OOD sets.

    `scores[name]` holds "id_val" and "id_test" score tensors and "ood_val"/"ood_test" dicts of
    them per OOD set. Returns the choice, a one-line reason and per candidate: its threshold (at
    `tpr` of ID validation), validation AUROC per set and their mean, and test metrics per set.
    """
    table = {}
    for name, s in scores.items():
        threshold = calibrate_threshold(s["id_val"], tpr)
        val = {o: detection_metrics(s["id_val"], v)["auroc"] for o, v in s["ood_val"].items()}
        test = {o: {**detection_metrics(s["id_test"], v), "ood_flagged": float((v > threshold).double().mean())}
                for o, v in s["ood_test"].items()}
        table[name] = {"threshold": threshold, "val_auroc": val, "val_auroc_mean": float(np.mean(list(val.values()))),
                       "test": test, "test_auroc_mean": float(np.mean([m["auroc"] for m in test.values()])),
                       "id_test_flagged": float((s["id_test"] > threshold).double().mean())}
    chosen = max(table, key=lambda n: (table[n]["val_auroc_mean"], n in LOGIT_CANDIDATES))
    others = ", ".join(f"{n} {t['val_auroc_mean']:.3f}" for n, t in
                       sorted(table.items(), key=lambda kv: -kv[1]["val_auroc_mean"]) if n != chosen)
    reason = (f"{chosen} has the best mean validation AUROC ({table[chosen]['val_auroc_mean']:.3f}; "
              f"others: {others}) among the detectors a fused-mode client can run: decrypted logits "
              "and its own source states, never target states")
    return {"mode": "fused", "chosen": chosen, "reason": reason, "tpr": tpr, "candidates": table}


# --- the client's state detector: numpy only ----------------------------------------------

def save_state_detector(path: str | Path, name: str, detector: Mahalanobis | CosineKNN, threshold: float,
                        spec: dict[str, Any]) -> Path:
    """Write the fitted detector as one .npz (atomically): arrays, threshold and the client spec."""
    import io

    meta = {"format": STATE_DETECTOR_FORMAT, "detector": name, "threshold": threshold, "client": spec}
    if isinstance(detector, Mahalanobis):
        arrays = {"keep": detector.keep.numpy(), "mean": detector.mean.numpy(), "scale": detector.scale.numpy(),
                  "whiten": detector.whiten.numpy(), "centres": detector.centres.numpy()}
    else:
        arrays = {"bank": detector.bank.numpy(), "k": np.array(detector.k)}
    buf = io.BytesIO()
    np.savez(buf, meta=np.array(json.dumps(meta)), **arrays)
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


@dataclass
class StateDetector:
    """A saved state detector: `score(states)` (higher = more OOD) and `flags(states)`."""

    name: str
    threshold: float
    client: dict[str, Any]
    arrays: dict[str, np.ndarray]

    def score(self, states: np.ndarray) -> np.ndarray:
        x = np.asarray(states, dtype=np.float64)
        a = self.arrays
        if self.name.startswith("mahalanobis"):
            if x.ndim != 2 or x.shape[1] != len(a["keep"]):
                raise ValueError(f"expected (n, {len(a['keep'])}) states, got shape {x.shape}")
            z = ((x[:, a["keep"]] - a["mean"]) / a["scale"]) @ a["whiten"].T
            return (((z[:, None, :] - a["centres"][None]) ** 2).sum(-1)).min(1)
        if x.ndim != 2 or x.shape[1] != a["bank"].shape[1]:
            raise ValueError(f"expected (n, {a['bank'].shape[1]}) states, got shape {x.shape}")
        q = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        k = int(a["k"])
        return 1 - np.partition(q @ a["bank"].T, -k, axis=1)[:, -k]

    def flags(self, states: np.ndarray) -> np.ndarray:
        return self.score(states) > self.threshold


def load_state_detector(path: str | Path) -> StateDetector:
    """Read a `save_state_detector` file, with a clear error for anything else."""
    try:
        with np.load(Path(path), allow_pickle=False) as f:
            meta = json.loads(str(f["meta"]))
            arrays = {k: f[k] for k in f.files if k != "meta"}
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path} is not a state OOD detector file ({e}); write it with `xsilo evaluate_ood`") from None
    if meta.get("format") != STATE_DETECTOR_FORMAT or meta.get("detector") not in STATE_CANDIDATES:
        raise ValueError(f"{path} holds an unknown detector format; rerun `xsilo evaluate_ood` to rewrite it")
    return StateDetector(meta["detector"], float(meta["threshold"]), meta["client"], arrays)

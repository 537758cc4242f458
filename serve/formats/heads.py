"""The head folder: a provider's task head on its own states, as a head-only export (reader and writer).

`xsilo head fit` writes it (`write_head_export`), `xsilo serve --heads DIR` serves it, and `exports.load_export(DIR,
"head")` reads it back (its head checks are `check_head_manifest` and `load_feature_ood`, here)::

    head.safetensors   tensors `weight` (k, d) and `bias` (k,), float32
    head.onnx          one Gemm node
    feature-ood.npz    optional: class `means` (k, d) and a shared `precision` (d, d), float64, and optionally the
                       class `priors` (k,), float64 (train-split class shares: each in (0, 1], summing to 1)
    manifest.json      {"format": "xsilo-export", "version": 1, "kind": "head", "created", "source": {},
                        "target" (the provider's extraction spec), "input_dim": d, "output_dim": k, "target_dim": d,
                        "label_names": [str] | null, "parts": {"head": {"shape": [k, d], ...}}, "normalisation",
                        "metrics", "feature_ood" (optional: {"detector": "mahalanobis", "file", "threshold", "tpr"}),
                        "files": {FILENAME: {"sha256", "bytes"}}}

A split-mode client runs the published detector on its mapped states: score(x) = min_c (x - means[c])ᵀ precision
(x - means[c]), flagged above `threshold`; with `--private`, `xsilo align` adapts its map with the means, the
precision and the priors (a head written before priors were published has none: the client takes them uniform).
`HeadConfig` is the manifest's own part as a dataclass (to_dict /
from_dict; `format_version` is the export family's, and an older version is migrated by `exports.migrate_manifest`).
"""
from __future__ import annotations

import hashlib
import io
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from .folders import (FORMAT, FORMAT_VERSION, HEAD_KIND, MANIFEST, REFIT_HEAD, ExportError, file_records, float32,
                      is_number, now, published_spec, staged_folder, verify_file, write_json, write_part)

FEATURE_OOD_DETECTOR = "mahalanobis"
FEATURE_OOD_ARRAYS = ("means", "precision")
FEATURE_OOD_OPTIONAL = ("priors",)  # absent from heads published before priors were
PRIORS_TOLERANCE = 1e-6  # |sum(priors) - 1|
FEATURE_OOD_FILE = "feature-ood.npz"
NORMALISATION = {"input": "raw target hidden states, pooled and truncated as in `target`",
                 "head": "the classifier's standardisation folded into the head's weight and bias"}


@dataclass(frozen=True)
class FeatureOod:
    """A head's published feature-space detector: score(x) = min_c (x - means[c])ᵀ precision (x - means[c]);
    x is flagged out of distribution when its score is above `threshold` (calibrated to keep `tpr` of ID rows)."""

    means: np.ndarray  # (k, d) float64
    precision: np.ndarray  # (d, d) float64
    threshold: float
    tpr: float
    data: bytes  # the npz file as published (GET /v1/heads/{name}/feature-ood)
    sha256: str
    priors: np.ndarray | None = None  # (k,) float64 train-split class shares; None: not published (older head)


@dataclass
class HeadConfig:
    """A head export's manifest, less its parts, files and creation time."""

    input_dim: int
    output_dim: int
    target: dict[str, Any]  # the provider's published extraction spec (`published_spec`)
    label_names: list[str] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    feature_ood: dict[str, Any] | None = None  # {"detector", "file", "threshold", "tpr"}
    created: str | None = None

    format_version: ClassVar[int] = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        """The manifest's keys, in the order the writer lays them out (without 'files')."""
        d, k = self.input_dim, self.output_dim
        return {"format": FORMAT, "version": self.format_version, "kind": HEAD_KIND, "created": self.created,
                "source": {}, "target": self.target, "input_dim": int(d), "output_dim": int(k), "target_dim": int(d),
                "label_names": None if self.label_names is None else [str(s) for s in self.label_names],
                "parts": {"head": {"shape": [int(k), int(d)], "safetensors": "head.safetensors", "onnx": "head.onnx"}},
                "normalisation": dict(NORMALISATION), "metrics": self.metrics or {},
                **({"feature_ood": self.feature_ood} if self.feature_ood is not None else {})}

    @classmethod
    def from_dict(cls, manifest: dict[str, Any]) -> "HeadConfig":
        """From a checked head manifest (`exports.read_manifest`)."""
        return cls(int(manifest["input_dim"]), int(manifest["output_dim"]), dict(manifest["target"]),
                   manifest.get("label_names"), dict(manifest.get("metrics") or {}), manifest.get("feature_ood"),
                   manifest.get("created"))


# --- reading ------------------------------------------------------------------------------------------------

def check_head_manifest(manifest: dict[str, Any], path: Path | str) -> None:
    """The head-only parts of an export manifest: one `head` part, its dims, a target spec, `feature_ood`."""
    def bad(key: str, problem: str) -> ExportError:
        return ExportError(f"{path}: {key} {problem}; {REFIT_HEAD} to write a valid head export")

    if set(manifest["parts"]) != {"head"}:
        raise bad("'parts'", f"must hold exactly 'head' in a head export, got {sorted(manifest['parts'])}")
    shape = manifest["parts"]["head"]["shape"]
    if manifest.get("input_dim") != shape[1] or manifest.get("output_dim") != shape[0]:
        raise bad("'input_dim'/'output_dim'", f"must be the head's shape {shape[1]} -> {shape[0]}, got "
                                              f"{manifest.get('input_dim')} -> {manifest.get('output_dim')}")
    if not isinstance(manifest.get("target"), dict):
        raise bad("'target'", "must be the provider model's extraction spec (an object)")
    hidden = manifest["target"].get("hidden_size")
    if hidden is not None and hidden != shape[1]:
        raise bad("target['hidden_size']", f"is {hidden!r} but the head reads {shape[1]}-d states")
    labels = manifest.get("label_names")
    if labels is not None and len(labels) != shape[0]:
        raise bad("'label_names'", f"has {len(labels)} names for {shape[0]} outputs")
    ood = manifest.get("feature_ood")
    if ood is None:
        return
    if not isinstance(ood, dict) or ood.get("detector") != FEATURE_OOD_DETECTOR:
        raise bad("'feature_ood'", f"must be an object with detector {FEATURE_OOD_DETECTOR!r}, file, threshold, tpr")
    if not isinstance(ood.get("file"), str) or ood["file"] not in manifest["files"]:
        raise bad("feature_ood['file']", "must name a file listed in 'files'")
    if not is_number(ood.get("threshold")):
        raise bad("feature_ood['threshold']", "must be a finite number")
    if not (is_number(ood.get("tpr")) and 0 < ood["tpr"] <= 1):
        raise bad("feature_ood['tpr']", "must be a number in (0, 1]")


def feature_ood_max_bytes(k: int, d: int) -> int:
    """An upper bound of the npz `np.savez` writes for means (k, d), precision (d, d) and priors (k,) in float64."""
    return 8 * (k * d + d * d + k) + 4096


def check_priors(priors: np.ndarray, k: int, where: str, fix: str) -> np.ndarray:
    """Class priors as float64 (k,): finite, each in (0, 1], summing to 1 (to 1e-6). Raises ExportError."""
    if priors.shape != (k,) or priors.dtype.kind != "f":
        raise ExportError(f"{where}: priors must be {k} floats (one per class), got {priors.dtype} of shape "
                          f"{priors.shape}; {fix}")
    priors = priors.astype(np.float64)
    if not np.isfinite(priors).all() or not ((priors > 0) & (priors <= 1)).all():
        raise ExportError(f"{where}: every class prior must be a finite number in (0, 1] (a class with no train "
                          f"rows has none); {fix}")
    if abs(float(priors.sum()) - 1.0) > PRIORS_TOLERANCE:
        raise ExportError(f"{where}: the class priors sum to {float(priors.sum()):.9g}, not 1; {fix}")
    return priors


def read_feature_ood_npz(data: bytes, k: int, d: int, where: str, fix: str
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(means (k, d), precision (d, d), priors (k,) or None) float64 from npz bytes: exactly those arrays (priors
    optional), sizes bounded before anything is decompressed, no pickles, finite values, priors a distribution.
    Raises ExportError naming `where` and `fix`."""
    limit = feature_ood_max_bytes(k, d)
    if len(data) > limit:
        raise ExportError(f"{where} is {len(data)} bytes, more than a ({k}, {d}) detector needs ({limit}); {fix}")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = {info.filename: info.file_size for info in archive.infolist()}
            required = {f"{name}.npy" for name in FEATURE_OOD_ARRAYS}
            allowed = required | {f"{name}.npy" for name in FEATURE_OOD_OPTIONAL}
            if not required <= set(members) <= allowed or len(members) != len(archive.infolist()):
                raise ExportError(f"{where} must hold {sorted(required)} (and optionally priors.npy), got "
                                  f"{sorted(members)[:8]}; {fix}")
            if sum(members.values()) > limit:
                raise ExportError(f"{where} unpacks to {sum(members.values())} bytes, more than a ({k}, {d}) "
                                  f"detector needs; {fix}")
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                means, precision = (np.asarray(npz[name]) for name in FEATURE_OOD_ARRAYS)
                priors = np.asarray(npz["priors"]) if "priors.npy" in members else None
    except ExportError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
        raise ExportError(f"{where} is not a readable npz ({type(e).__name__}); {fix}") from None
    if means.shape != (k, d) or precision.shape != (d, d):
        raise ExportError(f"{where} holds means {means.shape} and precision {precision.shape}, but the head "
                          f"needs ({k}, {d}) and ({d}, {d}); {fix}")
    if means.dtype.kind != "f" or precision.dtype.kind != "f":
        raise ExportError(f"{where} must hold float arrays, got {means.dtype} and {precision.dtype}; {fix}")
    means, precision = means.astype(np.float64), precision.astype(np.float64)
    if not (np.isfinite(means).all() and np.isfinite(precision).all()):
        raise ExportError(f"{where} holds NaN or inf; {fix}")
    return means, precision, None if priors is None else check_priors(priors, k, where, fix)


def load_feature_ood(directory: Path, manifest: dict[str, Any]) -> FeatureOod | None:
    """A head export's published detector (sha256 and arrays checked), or None when it publishes none."""
    ood = manifest.get("feature_ood")
    if ood is None:
        return None
    path = verify_file(directory, manifest, ood["file"], fix=REFIT_HEAD)
    data = path.read_bytes()
    shape = manifest["parts"]["head"]["shape"]
    means, precision, priors = read_feature_ood_npz(data, shape[0], shape[1], str(path), REFIT_HEAD)
    return FeatureOod(means, precision, float(ood["threshold"]), float(ood["tpr"]), data,
                      hashlib.sha256(data).hexdigest(), priors)


# --- writing ------------------------------------------------------------------------------------------------

def check_feature_ood(ood: dict[str, Any], k: int, d: int
                      ) -> tuple[np.ndarray, np.ndarray, float, float, np.ndarray | None]:
    """(means, precision, threshold, tpr, priors or None) of a feature-space Mahalanobis detector and the task's
    class priors (optional key `priors`), shapes and values checked."""
    missing = {"means", "precision", "threshold", "tpr"} - set(ood)
    if missing:
        raise ExportError(f"feature_ood lacks {sorted(missing)}; pass means (k, d), precision (d, d), threshold, tpr")
    means, precision = np.asarray(ood["means"], np.float64), np.asarray(ood["precision"], np.float64)
    if means.shape != (k, d) or precision.shape != (d, d):
        raise ExportError(f"feature_ood needs means ({k}, {d}) and precision ({d}, {d}) for a {k}-class head on "
                          f"{d}-d states, got {means.shape} and {precision.shape}")
    if not (np.isfinite(means).all() and np.isfinite(precision).all()):
        raise ExportError("feature_ood's means or precision hold NaN/inf; refit the detector")
    threshold, tpr = float(ood["threshold"]), float(ood["tpr"])
    if not np.isfinite(threshold) or not 0 < tpr <= 1:
        raise ExportError(f"feature_ood needs a finite threshold and a tpr in (0, 1], got {threshold} and {tpr}")
    priors = ood.get("priors")
    if priors is not None:
        priors = check_priors(np.asarray(priors, np.float64), k, "feature_ood", "pass the train split's class shares")
    return means, precision, threshold, tpr, priors


def write_head_export(
    out: str | Path,
    weight, bias,
    *,
    target: dict[str, Any],
    label_names: list[str] | None,
    metrics: dict[str, Any] | None = None,
    feature_ood: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a head-only export (`kind: head`): the provider's classifier on its own states `target`.

    `feature_ood` ({"means", "precision", "threshold", "tpr"}, optionally "priors") adds feature-ood.npz, a
    shared-covariance Mahalanobis detector on those states, with the class priors when given; it reveals the class
    means, covariance and shares, so it is opt-in.
    Atomic (temp folder, then rename); `exports.load_export(out, "head")` reads it back.
    """
    out = Path(out)
    w, b = float32(weight), float32(bias)
    if w.ndim != 2 or b.shape != w.shape[:1]:
        raise ExportError(f"a head needs weight (classes, d) and bias (classes,), got {w.shape} and {b.shape}")
    if not (np.isfinite(w).all() and np.isfinite(b).all()):
        raise ExportError("the head's weight or bias holds NaN/inf; retrain it (check the states)")
    k, d = w.shape
    if label_names is not None and len(label_names) != k:
        raise ExportError(f"the head has {k} outputs but {len(label_names)} label names; pass one name per class")
    spec = published_spec(target, d, "target")
    ood = check_feature_ood(feature_ood, k, d) if feature_ood is not None else None
    with staged_folder(out, overwrite) as tmp:
        write_part(tmp, "head", w, b)
        if ood is not None:
            with open(tmp / FEATURE_OOD_FILE, "wb") as f:
                arrays = {"means": ood[0], "precision": ood[1]}
                np.savez(f, **arrays, **({"priors": ood[4]} if ood[4] is not None else {}))
        record = ({"detector": FEATURE_OOD_DETECTOR, "file": FEATURE_OOD_FILE, "threshold": ood[2], "tpr": ood[3]}
                  if ood is not None else None)
        config = HeadConfig(int(d), int(k), spec, label_names, metrics or {}, record, now())
        write_json(tmp / MANIFEST, {**config.to_dict(), "files": file_records(tmp)})
    return out

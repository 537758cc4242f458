"""The export folder (reader and writer), and `LinearExport`: one linear layer of an export or a map folder.

An **export** (`xsilo export`; `LinearExport.from_pretrained(dir, part)`) holds, for each part (`fused`,
`map`, `head`), `NAME.safetensors` (tensors `weight` (out, in) and `bias` (out,)) and `NAME.onnx`, plus
`manifest.json`::

    {"format": "xsilo-export", "version": 1, "input_dim": int, "output_dim": int,
     "parts": {NAME: {"shape": [out, in], "safetensors": "NAME.safetensors", ...}},
     "files": {FILENAME: {"sha256": 64 hex digits, "bytes": int}},
     "label_names": [str] | null, "source": {...}, "target": {...}, "ood": {...} (optional), ...}

`write_export` writes one from its three parts (the fused layer already computed: the fusion is
`lightning_modules.parties.export`'s); `ExportConfig` is the manifest's own part as a dataclass. A **head export**
(`"kind": "head"`) is the same format holding only `head`: `heads` writes it and checks its head-only keys.

`LinearExport.from_pretrained` also reads a **map folder** (`config.json` + `model.safetensors`), through
`maps.load_map_folder`: the one map reader.

Both are found by folder, or by hub id (`owner/name`) through `huggingface_hub.snapshot_download`
(`maps.resolve_pretrained`). An older manifest version is brought up to this one by `MIGRATIONS` before it is
checked (version 1 is the first, so there is none yet). numpy, safetensors, onnx (to write), json and hashlib
only, so the server and a split-mode client load a folder with no training code. Every problem is an
`ExportError` whose one line names the file, the key and the fix.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping

import numpy as np

from .folders import (FORMAT, FORMAT_VERSION, HEAD_KIND, MANIFEST, PARTS, REEXPORT, REFIT_HEAD, ExportError,
                      Migration, check_header, file_records, float32, is_dim, migrate, now, read_json_doc,
                      read_linear, staged_folder, verify_file, write_json, write_part)
from .heads import FeatureOod, check_head_manifest, load_feature_ood
from .maps import MAP_CONFIG, load_map_folder, resolve_pretrained

LOGIT_DETECTORS = ("msp", "max_logit", "energy")  # what a client computes from decrypted logits
NORMALISATION = {
    "input": "raw source hidden states, pooled and truncated as in `source`",
    "map": "centering/standardisation folded into the map's weight and bias",
    "head": "the classifier's standardisation folded into the head's weight and bias",
}
MIGRATIONS: dict[int, Migration] = {}  # version v -> v + 1 of an export manifest (none yet: version 1 is the first)


@dataclass
class LinearExport:
    """One exported linear layer: logits = x @ weight.T + bias."""

    name: str
    weight: np.ndarray  # (out, in) float32
    bias: np.ndarray  # (out,) float32
    manifest: dict[str, Any]  # the export's manifest.json, or a map folder's config.json
    feature_ood: FeatureOod | None = None  # a head export's published detector, if any

    @property
    def input_dim(self) -> int:
        return self.weight.shape[1]

    @property
    def output_dim(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return x @ self.weight.T + self.bias

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | Path, part: str | None = None,
                        revision: str | None = None) -> "LinearExport":
        """One layer of an export folder (`part`: fused by default, map or head), or a map folder's map."""
        directory = resolve_pretrained(path_or_hub_id, revision)
        if (directory / MANIFEST).is_file():
            return load_export(directory, part or "fused")
        if (directory / MAP_CONFIG).is_file():
            if part not in (None, "map"):
                raise ExportError(f"{directory} is a map folder and holds only the map, not part {part!r}; "
                                  "pass part='map', or an export folder from `xsilo export`")
            folder = load_map_folder(directory)
            return cls("map", folder.weight, folder.bias, folder.doc)
        raise ExportError(f"{directory} holds neither {MANIFEST} (an export) nor {MAP_CONFIG} (a map); pass a "
                          "folder that `xsilo export` or `save_pretrained` wrote")


@dataclass
class ExportConfig:
    """A fused export's manifest, less its parts, dimensions, files and creation time."""

    source: dict[str, Any]
    target: dict[str, Any]
    label_names: list[str] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    ood: dict[str, Any] | None = None  # calibrated logit-detector thresholds (`check_ood_manifest`)
    created: str | None = None

    format_version: ClassVar[int] = FORMAT_VERSION

    def to_dict(self, parts: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None) -> dict[str, Any]:
        """The manifest's keys in the order the writer lays them out (without 'files'); `parts` gives the dims."""
        shapes = {name: tuple(w.shape) for name, (w, _) in (parts or {}).items()}
        fused, mapped = shapes.get("fused"), shapes.get("map")
        return {"format": FORMAT, "version": self.format_version, "created": self.created, "source": self.source,
                "target": self.target, "input_dim": int(fused[1]) if fused else None,
                "output_dim": int(fused[0]) if fused else None, "target_dim": int(mapped[0]) if mapped else None,
                "label_names": self.label_names,
                "parts": {name: {"shape": list(shape), "safetensors": f"{name}.safetensors", "onnx": f"{name}.onnx"}
                          for name, shape in shapes.items()},
                "normalisation": dict(NORMALISATION), "metrics": self.metrics or {},
                **({"ood": self.ood} if self.ood is not None else {})}

    @classmethod
    def from_dict(cls, manifest: Mapping[str, Any]) -> "ExportConfig":
        """From a checked manifest (`read_manifest`)."""
        return cls(dict(manifest.get("source") or {}), dict(manifest.get("target") or {}),
                   manifest.get("label_names"), dict(manifest.get("metrics") or {}), manifest.get("ood"),
                   manifest.get("created"))


# --- reading ------------------------------------------------------------------------------------------------

def check_manifest(manifest: Any, path: Path | str) -> dict[str, Any]:
    """Validate an export manifest's whole shape (not the files it lists); return it."""
    def bad(key: str, problem: str) -> ExportError:
        return ExportError(f"{path}: {key} {problem}; {REEXPORT} to write a valid manifest")

    check_header(manifest, path, FORMAT, FORMAT_VERSION, REEXPORT, what="the manifest", writer="`xsilo export`")
    parts = manifest.get("parts")
    if not isinstance(parts, dict) or not parts:
        raise bad("'parts'", f"must be a non-empty object {{part: {{\"shape\": [out, in]}}}} for parts {PARTS}")
    for name, part in parts.items():
        shape = part.get("shape") if isinstance(part, dict) else None
        if not (isinstance(shape, list) and len(shape) == 2 and all(is_dim(n) for n in shape)):
            raise bad(f"parts[{name!r}]['shape']", "must be [out, in], two positive integers")
    for key in ("input_dim", "output_dim"):
        if key in manifest and not is_dim(manifest[key]):
            raise bad(f"{key!r}", "must be a positive integer")
    labels = manifest.get("label_names")
    if labels is not None and not (isinstance(labels, list) and all(isinstance(s, str) for s in labels)):
        raise bad("'label_names'", "must be a list of strings or null")
    kind = manifest.get("kind")
    if kind is not None and kind != HEAD_KIND:
        raise bad("'kind'", f"is {str(kind)[:40]!r}; an export is either fused (no 'kind') or {HEAD_KIND!r}")
    if kind == HEAD_KIND:
        check_head_manifest(manifest, path)
    elif manifest.get("feature_ood") is not None:
        raise bad("'feature_ood'", f"belongs to a head export (kind {HEAD_KIND!r}) only")
    return manifest


def check_ood_manifest(ood: Any) -> dict[str, Any]:
    """Validate `manifest["ood"]`: {"detector", "threshold", "tpr", "all": {detector: threshold}}."""
    fix = "write it with `xsilo evaluate_ood` (ood-threshold.json) and pass it to `xsilo export --ood`"
    if not isinstance(ood, dict) or not {"detector", "threshold", "tpr", "all"} <= set(ood) \
            or not isinstance(ood["all"], dict):
        raise ValueError(f"manifest['ood'] must hold detector, threshold, tpr and all (an object); {fix}")
    unknown = set(ood["all"]) - set(LOGIT_DETECTORS)
    if unknown:
        raise ValueError(f"manifest['ood'] names detectors {sorted(unknown)} that a client cannot compute from "
                         f"logits; use {LOGIT_DETECTORS}")
    numbers = [*ood["all"].values(), ood["threshold"], ood["tpr"]]
    if not all(isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) for t in numbers) \
            or not 0 < ood["tpr"] < 1:
        raise ValueError(f"manifest['ood'] thresholds must be finite numbers and tpr in (0, 1); {fix}")
    if not isinstance(ood["detector"], str) or ood["detector"] not in ood["all"] \
            or ood["all"][ood["detector"]] != ood["threshold"]:
        raise ValueError(f"manifest['ood']['threshold'] must equal all[{ood['detector']!r}]; {fix}")
    return ood


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The export's manifest.json (an older version migrated), its shape validated."""
    path = Path(directory) / MANIFEST
    if not path.is_file() and (Path(directory) / MAP_CONFIG).is_file():
        raise ExportError(f"{directory} is a map folder ({MAP_CONFIG}), not an export; load it with "
                          "`AffineAligner.from_pretrained`, or fuse it with a head by `xsilo export`")
    doc = read_json_doc(path, "an xsilo export", "create one with `xsilo export`", REEXPORT)
    return check_manifest(migrate(doc, FORMAT, FORMAT_VERSION, MIGRATIONS), path)


def load_export(directory: str | Path, name: str = "fused") -> LinearExport:
    """Load one part of an export, checking its checksum and its dimensions against the manifest."""
    if name not in PARTS:
        raise ExportError(f"unknown export part {name!r}; use one of {PARTS}")
    directory = Path(directory)
    manifest = read_manifest(directory)
    part = manifest["parts"].get(name)
    if part is None:
        raise ExportError(f"{directory / MANIFEST}: 'parts' has no {name!r} entry (it has {sorted(manifest['parts'])}); "
                          f"{REEXPORT}")
    fix = REFIT_HEAD if manifest.get("kind") == HEAD_KIND else REEXPORT
    path = verify_file(directory, manifest, f"{name}.safetensors", fix=fix)
    weight, bias = read_linear(path, tuple(part["shape"]), MANIFEST, fix)
    return LinearExport(name, weight, bias, manifest, load_feature_ood(directory, manifest))


# --- writing ------------------------------------------------------------------------------------------------

def write_export(out: str | Path, parts: Mapping[str, tuple[Any, Any]], config: ExportConfig,
                 overwrite: bool = False) -> Path:
    """Write an export's parts (`fused`, `map`, `head`: (weight, bias), rounded to float32 here) and its manifest
    into `out`, atomically (temp folder, then rename). `config.ood`, when given, is checked first: the logit
    detector thresholds a client applies to decrypted logits (`serve.ood_client.ood_from_logits`)."""
    if config.ood is not None:
        try:
            check_ood_manifest(config.ood)
        except ValueError as e:
            raise ExportError(str(e)) from e
    out = Path(out)
    arrays = {name: (float32(w), float32(b)) for name, (w, b) in parts.items()}
    with staged_folder(out, overwrite) as tmp:
        for name, (w, b) in arrays.items():
            write_part(tmp, name, w, b)
        config.created = now()
        write_json(tmp / MANIFEST, {**config.to_dict(arrays), "files": file_records(tmp)})
    return out


"""Reading an xsilo export: the manifest's shape, every file's sha256, the layers' tensors.

The one reader of exports (`lightning_modules.export` writes them and re-exports these names). It needs
numpy, safetensors, json and hashlib only, so the server loads an export with no training code. Every
problem is an `ExportError` whose one-line message names the file, the key and the fix.

An export directory holds, for each part (`fused`, `map`, `head`), `NAME.safetensors` (tensors `weight`
(out, in) and `bias` (out,)) and `NAME.onnx`, plus `manifest.json`::

    {"format": "xsilo-export", "version": 1, "input_dim": int, "output_dim": int,
     "parts": {NAME: {"shape": [out, in], "safetensors": "NAME.safetensors", ...}},
     "files": {FILENAME: {"sha256": 64 hex digits, "bytes": int}},
     "label_names": [str] | null, "source": {...}, "target": {...}, "ood": {...} (optional), ...}
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST = "manifest.json"
FORMAT = "xsilo-export"
FORMAT_VERSION = 1
PARTS = ("fused", "map", "head")
MAX_MANIFEST_BYTES = 16 << 20
REEXPORT = "re-run `xsilo export`"
_SHA256 = re.compile(r"[0-9a-f]{64}")


class ExportError(ValueError):
    """An export is missing, tampered with or does not match what it is used with."""


@dataclass
class LinearExport:
    """One exported linear layer: logits = x @ weight.T + bias."""

    name: str
    weight: np.ndarray  # (out, in) float32
    bias: np.ndarray  # (out,) float32
    manifest: dict[str, Any]

    @property
    def input_dim(self) -> int:
        return self.weight.shape[1]

    @property
    def output_dim(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return x @ self.weight.T + self.bias


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _is_dim(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_manifest(manifest: Any, path: Path | str) -> dict[str, Any]:
    """Validate the manifest's whole shape (not the files it lists); return it."""
    def bad(key: str, problem: str) -> ExportError:
        return ExportError(f"{path}: {key} {problem}; {REEXPORT} to write a valid manifest")

    if not isinstance(manifest, dict):
        raise bad("the manifest", f"must be a JSON object, got a JSON {type(manifest).__name__}")
    if manifest.get("format") != FORMAT:
        raise ExportError(f"{path} is not an xsilo export manifest (format={manifest.get('format')!r}, expected "
                          f"{FORMAT!r}); pass the directory that `xsilo export` wrote")
    if manifest.get("version") != FORMAT_VERSION:
        raise ExportError(f"{path}: version {manifest.get('version')!r} is not the version {FORMAT_VERSION} this "
                          f"xsilo reads; {REEXPORT} with this xsilo")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise bad("'files'", "must be a non-empty object {filename: {\"sha256\": ..., \"bytes\": ...}}")
    for name, record in files.items():
        if not isinstance(record, dict):
            raise bad(f"files[{name!r}]", "must be an object with 'sha256' and 'bytes'")
        if not isinstance(record.get("sha256"), str) or not _SHA256.fullmatch(record["sha256"]):
            raise bad(f"files[{name!r}]['sha256']", "is missing or not 64 lowercase hex digits")
        if "/" in name or "\\" in name or name in ("", ".", ".."):
            raise bad(f"files[{name!r}]", "must name a file inside the export directory")
    parts = manifest.get("parts")
    if not isinstance(parts, dict) or not parts:
        raise bad("'parts'", f"must be a non-empty object {{part: {{\"shape\": [out, in]}}}} for parts {PARTS}")
    for name, part in parts.items():
        shape = part.get("shape") if isinstance(part, dict) else None
        if not (isinstance(shape, list) and len(shape) == 2 and all(_is_dim(n) for n in shape)):
            raise bad(f"parts[{name!r}]['shape']", "must be [out, in], two positive integers")
    for key in ("input_dim", "output_dim"):
        if key in manifest and not _is_dim(manifest[key]):
            raise bad(f"{key!r}", "must be a positive integer")
    labels = manifest.get("label_names")
    if labels is not None and not (isinstance(labels, list) and all(isinstance(s, str) for s in labels)):
        raise bad("'label_names'", "must be a list of strings or null")
    for key in ("source", "target", "metrics"):
        if manifest.get(key) is not None and not isinstance(manifest[key], dict):
            raise bad(f"{key!r}", "must be an object or null")
    return manifest


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The export's manifest.json, its shape validated."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ExportError(f"{directory} is not an xsilo export: {MANIFEST} is missing; create one with `xsilo export`")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise ExportError(f"{path} is over {MAX_MANIFEST_BYTES} bytes, far more than a manifest; {REEXPORT}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:
        raise ExportError(f"{path} is not valid JSON ({str(e)[:200]}); {REEXPORT}") from None
    return check_manifest(manifest, path)


def verify_file(directory: str | Path, manifest: dict[str, Any], filename: str) -> Path:
    """The path of `filename`, after checking it is listed in the manifest and matches its sha256."""
    directory = Path(directory)
    record = manifest["files"].get(filename)
    path = directory / filename
    if record is None:
        raise ExportError(f"{filename} is not listed in {directory / MANIFEST} 'files'; {REEXPORT}")
    if not path.is_file():
        raise ExportError(f"{path} is missing; {REEXPORT}")
    if sha256_file(path) != record["sha256"]:
        raise ExportError(f"{path} does not match its sha256 in {MANIFEST}: the file was modified or "
                          f"corrupted; {REEXPORT} or restore the original file")
    return path


def load_export(directory: str | Path, name: str = "fused") -> LinearExport:
    """Load one part of an export, checking its checksum and its dimensions against the manifest."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    if name not in PARTS:
        raise ExportError(f"unknown export part {name!r}; use one of {PARTS}")
    directory = Path(directory)
    manifest = read_manifest(directory)
    part = manifest["parts"].get(name)
    if part is None:
        raise ExportError(f"{directory / MANIFEST}: 'parts' has no {name!r} entry (it has {sorted(manifest['parts'])}); "
                          f"{REEXPORT}")
    path = verify_file(directory, manifest, f"{name}.safetensors")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ExportError(f"{path} is unreadable ({e}); {REEXPORT}") from None
    weight, bias = tensors.get("weight"), tensors.get("bias")
    expected = tuple(part["shape"])
    if weight is None or bias is None or weight.shape != expected or bias.shape != expected[:1]:
        raise ExportError(f"{path} holds shapes {None if weight is None else weight.shape} / "
                          f"{None if bias is None else bias.shape}, but {MANIFEST} says {expected}; {REEXPORT}")
    return LinearExport(name, weight.astype(np.float32), bias.astype(np.float32), manifest)

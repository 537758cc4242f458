"""Reading xsilo's two folders: an export and a map; their JSON's shape, every file's sha256, the tensors.

The one reader (`lightning_modules.export` writes both kinds and re-exports these names). It needs numpy,
safetensors, json and hashlib only (and `huggingface_hub`, imported only to fetch a hub id), so the server
and a split-mode client load a folder with no training code. Every problem is an `ExportError` whose
one-line message names the file, the key and the fix.

An **export** (`xsilo export`; `LinearExport.from_pretrained(dir, part)`) holds, for each part (`fused`,
`map`, `head`), `NAME.safetensors` (tensors `weight` (out, in) and `bias` (out,)) and `NAME.onnx`, plus
`manifest.json`::

    {"format": "xsilo-export", "version": 1, "input_dim": int, "output_dim": int,
     "parts": {NAME: {"shape": [out, in], "safetensors": "NAME.safetensors", ...}},
     "files": {FILENAME: {"sha256": 64 hex digits, "bytes": int}},
     "label_names": [str] | null, "source": {...}, "target": {...}, "ood": {...} (optional), ...}

A **map** (`AffineAligner.save_pretrained`; `AffineAligner.from_pretrained` or `load_map_folder`) is
laid out as transformers and tuned-lens lay out a model: `model.safetensors` (`weight`, `bias`, as a
part above) and `config.json`::

    {"format": "xsilo-affine-map", "version": 1, "input_dim": int, "output_dim": int,
     "estimator": str, "lambdas": [float], "chosen_lambda": float | null, "center": bool,
     "standardize": bool, "source": {...}, "target": {...}, "files": {...} (as above), ...}

A **head export** (`xsilo head fit`; `load_export(dir, "head")`) is an export whose manifest says
`"kind": "head"` and whose parts hold only `head`: the provider's classifier on its own states, described by
`"target"` (the provider's extraction spec; `"source"` is empty). Its optional `"feature_ood"`
(`{"detector": "mahalanobis", "file": "feature-ood.npz", "threshold", "tpr"}`) names a listed npz of class
`means` (k, d) and a shared `precision` (d, d), float64, for a split-mode client's feature-space OOD check.

Both are found by folder, or by hub id (`owner/name`) through `huggingface_hub.snapshot_download`.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST = "manifest.json"
FORMAT = "xsilo-export"
FORMAT_VERSION = 1
PARTS = ("fused", "map", "head")
HEAD_KIND = "head"
FEATURE_OOD_DETECTOR = "mahalanobis"
FEATURE_OOD_ARRAYS = ("means", "precision")
REFIT_HEAD = "re-run `xsilo head fit`"
MAX_MANIFEST_BYTES = 16 << 20
REEXPORT = "re-run `xsilo export`"
MAP_CONFIG = "config.json"
MAP_WEIGHTS = "model.safetensors"
MAP_FORMAT = "xsilo-affine-map"
MAP_VERSION = 1
RESAVE = "save the map again (`AffineAligner.save_pretrained`, or `xsilo evaluate_generation --out DIR`)"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}")


class ExportError(ValueError):
    """An export or map folder is missing, tampered with or does not match what it is used with."""


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
            return load_map_folder(directory)
        raise ExportError(f"{directory} holds neither {MANIFEST} (an export) nor {MAP_CONFIG} (a map); pass a "
                          "folder that `xsilo export` or `save_pretrained` wrote")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _is_dim(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_number(value: Any) -> bool:
    """A finite JSON number (huge ints would overflow a float: refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return abs(value) < 1e300 if isinstance(value, int) else math.isfinite(value)


def check_header(doc: Any, path: Path | str, fmt: str, version: int, fix: str, *, what: str | None = None,
                 writer: str | None = None) -> None:
    """`doc` is a JSON object of format `fmt`, at `version`, whose 'files' records are well formed. `what` and
    `writer` name the document and the command that writes it in messages (defaults: an export's or a map's)."""
    def bad(key: str, problem: str) -> ExportError:
        return ExportError(f"{path}: {key} {problem}; {fix}")

    what = what or ("the manifest" if fmt == FORMAT else "the map config")
    writer = writer or ("`xsilo export`" if fmt == FORMAT else "`save_pretrained`")
    if not isinstance(doc, dict):
        raise bad(what, f"must be a JSON object, got a JSON {type(doc).__name__}")
    if doc.get("format") != fmt:
        raise ExportError(f"{path} is not an xsilo {fmt!r} file (format={repr(doc.get('format'))[:60]}); pass "
                          f"the folder {writer} wrote")
    if doc.get("version") != version:
        raise ExportError(f"{path}: {fmt} version {doc.get('version')!r} is not the version {version} this xsilo "
                          f"reads; use the xsilo that wrote it, or {fix} with this one")
    files = doc.get("files")
    if not isinstance(files, dict) or not files:
        raise bad("'files'", "must be a non-empty object {filename: {\"sha256\": ..., \"bytes\": ...}}")
    for name, record in files.items():
        if not isinstance(record, dict):
            raise bad(f"files[{name!r}]", "must be an object with 'sha256' and 'bytes'")
        if not isinstance(record.get("sha256"), str) or not _SHA256.fullmatch(record["sha256"]):
            raise bad(f"files[{name!r}]['sha256']", "is missing or not 64 lowercase hex digits")
        if "/" in name or "\\" in name or name in ("", ".", ".."):
            raise bad(f"files[{name!r}]", "must name a file inside the folder")
    for key in ("source", "target", "metrics"):
        if doc.get(key) is not None and not isinstance(doc[key], dict):
            raise bad(f"{key!r}", "must be an object or null")


def check_manifest(manifest: Any, path: Path | str) -> dict[str, Any]:
    """Validate an export manifest's whole shape (not the files it lists); return it."""
    def bad(key: str, problem: str) -> ExportError:
        return ExportError(f"{path}: {key} {problem}; {REEXPORT} to write a valid manifest")

    check_header(manifest, path, FORMAT, FORMAT_VERSION, REEXPORT)
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
    kind = manifest.get("kind")
    if kind is not None and kind != HEAD_KIND:
        raise bad("'kind'", f"is {str(kind)[:40]!r}; an export is either fused (no 'kind') or {HEAD_KIND!r}")
    if kind == HEAD_KIND:
        check_head_manifest(manifest, path)
    elif manifest.get("feature_ood") is not None:
        raise bad("'feature_ood'", f"belongs to a head export (kind {HEAD_KIND!r}) only")
    return manifest


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
    if not _is_number(ood.get("threshold")):
        raise bad("feature_ood['threshold']", "must be a finite number")
    if not (_is_number(ood.get("tpr")) and 0 < ood["tpr"] <= 1):
        raise bad("feature_ood['tpr']", "must be a number in (0, 1]")


def feature_ood_max_bytes(k: int, d: int) -> int:
    """An upper bound of the npz `np.savez` writes for means (k, d) and precision (d, d) in float64."""
    return 8 * (k * d + d * d) + 4096


def read_feature_ood_npz(data: bytes, k: int, d: int, where: str, fix: str) -> tuple[np.ndarray, np.ndarray]:
    """(means (k, d), precision (d, d)) float64 from npz bytes: exactly those two arrays, sizes bounded before
    anything is decompressed, no pickles, finite values. Raises ExportError naming `where` and `fix`."""
    limit = feature_ood_max_bytes(k, d)
    if len(data) > limit:
        raise ExportError(f"{where} is {len(data)} bytes, more than a ({k}, {d}) detector needs ({limit}); {fix}")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = {info.filename: info.file_size for info in archive.infolist()}
            expected = {f"{name}.npy" for name in FEATURE_OOD_ARRAYS}
            if set(members) != expected:
                raise ExportError(f"{where} must hold exactly {sorted(expected)}, got {sorted(members)[:8]}; {fix}")
            if sum(members.values()) > limit:
                raise ExportError(f"{where} unpacks to {sum(members.values())} bytes, more than a ({k}, {d}) "
                                  f"detector needs; {fix}")
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                means, precision = (np.asarray(npz[name]) for name in FEATURE_OOD_ARRAYS)
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
    return means, precision


def load_feature_ood(directory: Path, manifest: dict[str, Any]) -> FeatureOod | None:
    """A head export's published detector (sha256 and arrays checked), or None when it publishes none."""
    ood = manifest.get("feature_ood")
    if ood is None:
        return None
    path = verify_file(directory, manifest, ood["file"], fix=REFIT_HEAD)
    data = path.read_bytes()
    shape = manifest["parts"]["head"]["shape"]
    means, precision = read_feature_ood_npz(data, shape[0], shape[1], str(path), REFIT_HEAD)
    return FeatureOod(means, precision, float(ood["threshold"]), float(ood["tpr"]), data,
                      hashlib.sha256(data).hexdigest())


def check_map_config(config: Any, path: Path | str) -> dict[str, Any]:
    """Validate a map folder's config.json (format, version, dims, fit settings, files); return it."""
    def bad(key: str, problem: str) -> ExportError:
        return ExportError(f"{path}: {key} {problem}; {RESAVE}")

    check_header(config, path, MAP_FORMAT, MAP_VERSION, RESAVE)
    for key in ("input_dim", "output_dim"):
        if not _is_dim(config.get(key)):
            raise bad(f"{key!r}", "must be a positive integer")
    if not isinstance(config.get("estimator"), str):
        raise bad("'estimator'", "must be a string (ridge, lstsq, procrustes or scaled_procrustes)")
    lambdas = config.get("lambdas")
    if not (isinstance(lambdas, list) and all(_is_number(v) and v >= 0 for v in lambdas)):
        raise bad("'lambdas'", "must be a list of finite numbers >= 0")
    if config.get("chosen_lambda") is not None and not _is_number(config["chosen_lambda"]):
        raise bad("'chosen_lambda'", "must be a finite number or null")
    path = config.get("lambda_path")
    if path is not None and not (isinstance(path, list) and all(
            isinstance(p, list) and len(p) == 2 and all(_is_number(v) for v in p) for p in path)):
        raise bad("'lambda_path'", "must be a list of [λ, validation MSE] number pairs")
    for key in ("center", "standardize"):
        if not isinstance(config.get(key), bool):
            raise bad(f"{key!r}", "must be true or false")
    if config.get("finetune") is not None and not isinstance(config["finetune"], dict):
        raise bad("'finetune'", "must be an object or null")
    if MAP_WEIGHTS not in config["files"]:
        raise bad("'files'", f"does not list {MAP_WEIGHTS}")
    return config


def read_json_doc(path: Path, what: str, create: str, fix: str) -> Any:
    """A folder's JSON document, bounded in size; ExportError naming `what`, how to `create` it and the `fix`."""
    if not path.is_file():
        raise ExportError(f"{path.parent} is not {what}: {path.name} is missing; {create}")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise ExportError(f"{path} is over {MAX_MANIFEST_BYTES} bytes, far more than a {path.name}; {fix}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:
        raise ExportError(f"{path} is not valid JSON ({str(e)[:200]}); {fix}") from None


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The export's manifest.json, its shape validated."""
    path = Path(directory) / MANIFEST
    if not path.is_file() and (Path(directory) / MAP_CONFIG).is_file():
        raise ExportError(f"{directory} is a map folder ({MAP_CONFIG}), not an export; load it with "
                          "`AffineAligner.from_pretrained`, or fuse it with a head by `xsilo export`")
    doc = read_json_doc(path, "an xsilo export", "create one with `xsilo export`", REEXPORT)
    return check_manifest(doc, path)


def read_map_config(directory: str | Path) -> dict[str, Any]:
    """A map folder's config.json, its shape validated."""
    path = Path(directory) / MAP_CONFIG
    if not path.is_file() and (Path(directory) / MANIFEST).is_file():
        raise ExportError(f"{directory} is an export ({MANIFEST}), not a map folder; load its map with "
                          "`LinearExport.from_pretrained(DIR, part='map')`, or pass the folder `save_pretrained` wrote")
    doc = read_json_doc(path, "an xsilo map folder", "write one with `AffineAligner.save_pretrained`", RESAVE)
    return check_map_config(doc, path)


def verify_file(directory: str | Path, manifest: dict[str, Any], filename: str,
                listed_in: str = MANIFEST, fix: str = REEXPORT) -> Path:
    """The path of `filename`, after checking it is listed in the folder's JSON and matches its sha256."""
    directory = Path(directory)
    record = manifest["files"].get(filename)
    path = directory / filename
    if record is None:
        raise ExportError(f"{filename} is not listed in {directory / listed_in} 'files'; {fix}")
    if not path.is_file():
        raise ExportError(f"{path} is missing; {fix}")
    if sha256_file(path) != record["sha256"]:
        raise ExportError(f"{path} does not match its sha256 in {listed_in}: the file was modified or "
                          f"corrupted; {fix} or restore the original file")
    return path


def _load_linear(path: Path, expected: tuple[int, int], listed_in: str, fix: str) -> tuple[np.ndarray, np.ndarray]:
    """`weight` and `bias` of a verified safetensors file, their shapes checked against `expected`."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ExportError(f"{path} is unreadable ({e}); {fix}") from None
    weight, bias = tensors.get("weight"), tensors.get("bias")
    if weight is None or bias is None or weight.shape != expected or bias.shape != expected[:1]:
        raise ExportError(f"{path} holds shapes {None if weight is None else weight.shape} / "
                          f"{None if bias is None else bias.shape}, but {listed_in} says {expected}; {fix}")
    return weight.astype(np.float32), bias.astype(np.float32)


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
    weight, bias = _load_linear(path, tuple(part["shape"]), MANIFEST, fix)
    return LinearExport(name, weight, bias, manifest, load_feature_ood(directory, manifest))


def load_map_folder(directory: str | Path) -> LinearExport:
    """The map of a map folder (config.json + model.safetensors), checksum and dimensions checked."""
    directory = Path(directory)
    config = read_map_config(directory)
    path = verify_file(directory, config, MAP_WEIGHTS, MAP_CONFIG, RESAVE)
    weight, bias = _load_linear(path, (config["output_dim"], config["input_dim"]), MAP_CONFIG, RESAVE)
    return LinearExport("map", weight, bias, config)


def resolve_pretrained(path_or_hub_id: str | Path, revision: str | None = None) -> Path:
    """A local folder as it is; otherwise a hub id `owner/name`, fetched (JSON and safetensors only) into
    the Hugging Face cache by `huggingface_hub.snapshot_download`."""
    text = str(path_or_hub_id)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ExportError(f"{text} is a file; pass the folder that holds its {MAP_CONFIG} or {MANIFEST}")
    if not _HUB_ID.fullmatch(text):
        raise ExportError(f"{text} is not a folder (nor a hub id owner/name); pass the folder that "
                          "`save_pretrained` or `xsilo export` wrote")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (HfHubHTTPError, HFValidationError, LocalEntryNotFoundError,
                                            RepositoryNotFoundError, RevisionNotFoundError)
    except ImportError:
        raise ExportError(f"{text} is not a folder, and fetching it as a hub id needs huggingface_hub; "
                          "`pip install huggingface_hub`, or pass a local folder") from None
    try:
        return Path(snapshot_download(text, revision=revision, allow_patterns=[MAP_CONFIG, MANIFEST, "*.safetensors"]))
    except LocalEntryNotFoundError:
        raise ExportError(f"{text} is not a local folder, and as a hub id it is not in the local hub cache while "
                          "the hub is unreachable or HF_HUB_OFFLINE=1; pass a local folder, or go online (unset "
                          "HF_HUB_OFFLINE) to download it") from None
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise ExportError(f"{text} is not a local folder, nor a hub repo (or revision) you can read; check the "
                          "id, or log in with `hf auth login` for a private one") from None
    except (HfHubHTTPError, HFValidationError, OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ExportError(f"{text}: fetching it from the hub failed ({first}); pass a local folder") from None

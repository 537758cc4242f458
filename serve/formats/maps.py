"""The map folder: an affine map y = x @ weight.T + bias between two models' states, laid out as transformers and
tuned-lens lay out a model -- `model.safetensors` (float32 `weight` (out, in) and `bias` (out,)) and
`config.json`::

    {"format": "xsilo-affine-map", "version": 1, "created": str, "input_dim": int, "output_dim": int,
     "estimator": str, "lambdas": [float], "chosen_lambda": float | null, "lambda_path": [[λ, score]],
     "lambda_selection": {...}, "criterion": str, "rank": int | null, "whiten_target": bool, "center": bool,
     "standardize": bool, "normalisation": str, "finetune": {...}, "source": {...}, "target": {...},
     "metrics": {...}, "files": {FILENAME: {"sha256": 64 hex digits, "bytes": int}}}

`MapConfig` is that document less its header (format, version, created, dims, files): `to_dict`/`from_dict`.
`write_map_folder` writes a folder atomically, `load_map_folder` reads one back (format, version, sha256 and
shapes checked); `resolve_pretrained` finds a folder, or fetches a hub id (`owner/name`). The torch side is
`lightning_modules.fitting.affine_map.AffineMap.save_pretrained`/`from_pretrained` (and `AffineAligner`'s,
which delegate to it); `exports.LinearExport.from_pretrained` reads a map folder through `load_map_folder` too:
one reader.

Versions: `MAP_MIGRATIONS[v]` brings a version-v config.json up to v + 1 before it is checked (version 1 is the
first, so there is none yet). Within version 1, folders written before the λ criteria lack `criterion`, `rank`,
`whiten_target` and `lambda_selection`: `MapConfig.from_dict` fills them in as the map was fitted (criterion
auto, full rank, no whitening, and the λ path they record, which was scored by validation MSE).
numpy, json and safetensors only (huggingface_hub imported only to fetch a hub id).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping

import numpy as np

from .folders import (MANIFEST, ExportError, Migration, check_header, file_records, float32, is_dim, is_number,
                      migrate, now, read_json_doc, read_linear, staged_folder, verify_file, write_json)

MAP_CONFIG = "config.json"
MAP_WEIGHTS = "model.safetensors"
MAP_FORMAT = "xsilo-affine-map"
MAP_VERSION = 1
RESAVE = "save the map again (`AffineAligner.save_pretrained`, or `xsilo evaluate_generation --out DIR`)"
MAP_MIGRATIONS: dict[int, Migration] = {}  # version v -> v + 1 of a map folder's config.json (none yet)
NORMALISATION = "centering/standardisation folded into weight and bias: y = x @ weight.T + bias on raw source states"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}")


def _default_finetune() -> dict[str, Any]:
    return {"loss": "mse", "classifier": None, "lr": 1e-4, "weight_decay": 0.0}


def _val_mse_selection(lambda_path: list[list[float]], chosen_lambda: float | None) -> dict[str, Any]:
    """The `lambda_selection` of a folder from before the λ criteria: its λ path was scored by validation MSE."""
    if not lambda_path:
        return {"criterion": "none", "lambdas": [], "chosen": {}, "scores": {}}
    return {"criterion": "val_mse", "lambdas": [float(k) for k, _ in lambda_path],
            "chosen": {"val_mse": float(chosen_lambda)} if chosen_lambda is not None else {},
            "scores": {"val_mse": [float(v) for _, v in lambda_path]}}


@dataclass
class MapConfig:
    """What a map folder records beside its weights: how the map was fitted, the states it reads and writes, and
    what was measured. `lambda_selection` is `LambdaPath.as_dict()` (every criterion's score per λ);
    `lambda_path` the deciding criterion's finite [λ, score] pairs."""

    estimator: str
    lambdas: list[float]
    chosen_lambda: float | None = None
    lambda_path: list[list[float]] = field(default_factory=list)
    lambda_selection: dict[str, Any] | None = None
    criterion: str = "auto"
    rank: int | None = None
    whiten_target: bool = False
    center: bool = True
    standardize: bool = False
    finetune: dict[str, Any] = field(default_factory=_default_finetune)
    source: dict[str, Any] = field(default_factory=dict)
    target: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    created: str | None = None  # kept when a read folder is written again; None: the time of writing
    name_or_path: str | None = field(default=None, compare=False)  # the folder it was read from (not written)

    format_version: ClassVar[int] = MAP_VERSION

    def __post_init__(self) -> None:
        if self.lambda_selection is None:  # a config from before the λ criteria: its path was validation MSE
            self.lambda_selection = _val_mse_selection(self.lambda_path, self.chosen_lambda)

    def to_dict(self) -> dict[str, Any]:
        """config.json's keys after the header (format, version, created, dims), in the order they are written."""
        return {
            "estimator": self.estimator,
            "lambdas": [float(v) for v in self.lambdas],
            "chosen_lambda": None if self.chosen_lambda is None else float(self.chosen_lambda),
            "lambda_path": [[float(k), float(v)] for k, v in self.lambda_path],
            "lambda_selection": self.lambda_selection,
            "criterion": self.criterion,
            "rank": self.rank,
            "whiten_target": bool(self.whiten_target),
            "center": bool(self.center),
            "standardize": bool(self.standardize),
            "normalisation": NORMALISATION,
            "finetune": self.finetune,
            "source": self.source,
            "target": self.target,
            "metrics": self.metrics or {},
        }

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> "MapConfig":
        """From a config.json (any version 1 layout: keys added since are filled in as the map was fitted) or
        `to_dict`'s output; the header keys and `normalisation` are not part of the config."""
        return cls(
            estimator=doc["estimator"], lambdas=[float(v) for v in doc.get("lambdas") or []],
            chosen_lambda=doc.get("chosen_lambda"),
            lambda_path=[[float(k), float(v)] for k, v in doc.get("lambda_path") or []],
            lambda_selection=doc.get("lambda_selection") or None, criterion=doc.get("criterion", "auto"),
            rank=doc.get("rank"), whiten_target=bool(doc.get("whiten_target")), center=doc.get("center", True),
            standardize=doc.get("standardize", False),
            finetune=_default_finetune() if doc.get("finetune") is None else dict(doc["finetune"]),
            source=dict(doc.get("source") or {}), target=dict(doc.get("target") or {}),
            metrics=dict(doc.get("metrics") or {}), created=doc.get("created"))


@dataclass
class MapFolder:
    """A map folder as read: the map's float32 weight (out, in) and bias (out,), its config, and config.json as
    it was written (`doc`, checked)."""

    weight: np.ndarray
    bias: np.ndarray
    config: MapConfig
    doc: dict[str, Any]
    directory: Path


# --- reading ------------------------------------------------------------------------------------------------

def check_map_config(config: Any, path: Path | str) -> dict[str, Any]:
    """Validate a map folder's config.json (format, version, dims, fit settings, files); return it."""
    def bad(key: str, problem: str) -> ExportError:
        return ExportError(f"{path}: {key} {problem}; {RESAVE}")

    check_header(config, path, MAP_FORMAT, MAP_VERSION, RESAVE, what="the map config", writer="`save_pretrained`")
    for key in ("input_dim", "output_dim"):
        if not is_dim(config.get(key)):
            raise bad(f"{key!r}", "must be a positive integer")
    if not isinstance(config.get("estimator"), str):
        raise bad("'estimator'", "must be a string (ridge, lstsq, procrustes or scaled_procrustes)")
    lambdas = config.get("lambdas")
    if not (isinstance(lambdas, list) and all(is_number(v) and v >= 0 for v in lambdas)):
        raise bad("'lambdas'", "must be a list of finite numbers >= 0")
    if config.get("chosen_lambda") is not None and not is_number(config["chosen_lambda"]):
        raise bad("'chosen_lambda'", "must be a finite number or null")
    path_ = config.get("lambda_path")
    if path_ is not None and not (isinstance(path_, list) and all(
            isinstance(p, list) and len(p) == 2 and all(is_number(v) for v in p) for p in path_)):
        raise bad("'lambda_path'", "must be a list of [λ, validation MSE] number pairs")
    for key in ("center", "standardize"):
        if not isinstance(config.get(key), bool):
            raise bad(f"{key!r}", "must be true or false")
    if config.get("finetune") is not None and not isinstance(config["finetune"], dict):
        raise bad("'finetune'", "must be an object or null")
    if MAP_WEIGHTS not in config["files"]:
        raise bad("'files'", f"does not list {MAP_WEIGHTS}")
    return config


def read_map_config(directory: str | Path) -> dict[str, Any]:
    """A map folder's config.json (an older version migrated), its shape validated."""
    path = Path(directory) / MAP_CONFIG
    if not path.is_file() and (Path(directory) / MANIFEST).is_file():
        raise ExportError(f"{directory} is an export ({MANIFEST}), not a map folder; load its map with "
                          "`LinearExport.from_pretrained(DIR, part='map')`, or pass the folder `save_pretrained` wrote")
    doc = read_json_doc(path, "an xsilo map folder", "write one with `AffineAligner.save_pretrained`", RESAVE)
    return check_map_config(migrate(doc, MAP_FORMAT, MAP_VERSION, MAP_MIGRATIONS), path)


def load_map_folder(directory: str | Path) -> MapFolder:
    """The map of a map folder (config.json + model.safetensors), checksum and dimensions checked."""
    directory = Path(directory)
    doc = read_map_config(directory)
    path = verify_file(directory, doc, MAP_WEIGHTS, MAP_CONFIG, RESAVE)
    weight, bias = read_linear(path, (doc["output_dim"], doc["input_dim"]), MAP_CONFIG, RESAVE)
    config = MapConfig.from_dict(doc)
    config.name_or_path = str(directory)
    return MapFolder(weight, bias, config, doc, directory)


def resolve_pretrained(path_or_hub_id: str | Path, revision: str | None = None) -> Path:
    """A local folder as it is (a map folder or an export); otherwise a hub id `owner/name`, fetched (JSON and
    safetensors only) into the Hugging Face cache by `huggingface_hub.snapshot_download`."""
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


# --- writing ------------------------------------------------------------------------------------------------

def _is_map_config(path: Path) -> bool:
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("format") == MAP_FORMAT
    except (ValueError, OSError, AttributeError, RecursionError):
        return False


def write_map_folder(out: str | Path, weight: Any, bias: Any, config: MapConfig | Mapping[str, Any]) -> Path:
    """Write a map folder: `model.safetensors` (float32 `weight`, `bias`) and `config.json` (the header, then
    `config`; a mapping is read with `MapConfig.from_dict`, so an older layout is written in today's), atomically.
    `out` may replace an earlier map folder, never another non-empty folder."""
    from safetensors.numpy import save_file

    if not isinstance(config, MapConfig):
        config = MapConfig.from_dict(config)
    out = Path(out)
    w, b = float32(weight), float32(bias)
    if w.ndim != 2 or b.shape != w.shape[:1]:
        raise ExportError(f"a map needs weight (out, in) and bias (out,), got {w.shape} and {b.shape}")
    if not (np.isfinite(w).all() and np.isfinite(b).all()):
        raise ExportError("the map's weight or bias holds NaN/inf; refit it (a larger ridge λ, or check the states)")
    earlier = (out / MAP_CONFIG).is_file() and _is_map_config(out / MAP_CONFIG)
    if out.exists() and out.is_dir() and any(out.iterdir()) and not earlier:
        raise ExportError(f"{out} holds other files and is not a map folder; save the map into a new or empty folder")
    with staged_folder(out, replaceable=True) as tmp:
        save_file({"weight": w, "bias": b}, str(tmp / MAP_WEIGHTS))
        doc = {"format": MAP_FORMAT, "version": MapConfig.format_version, "created": config.created or now(),
               "input_dim": int(w.shape[1]), "output_dim": int(w.shape[0]), **config.to_dict(),
               "files": file_records(tmp)}
        write_json(tmp / MAP_CONFIG, doc)
    return out

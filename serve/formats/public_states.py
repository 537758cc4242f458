"""The provider's public-states folder (reader and writer): the public set's texts and the provider model's states.

`xsilo public-set export` writes it (`write_public_states`) and `xsilo serve --public DIR` publishes it for the
private fit (`load_public_states`):

    manifest.json       {"format": "xsilo-public-states", "version": 1, "name", "rows", "fingerprint",
                         "val_fraction", "seed", "parts": {"train", "val"}, "model" (extraction spec),
                         "hidden_size", "files": {name: {"sha256", "bytes"}}}
    texts.jsonl         {"text": ...} per row, in public-set order (what the client extracts its own states on)
    states.safetensors  train (n_train, d), val (n_val, d) float32; train_index, val_index int64 row indices
                        into texts.jsonl, from `splits.public_split(rows, val_fraction, seed)`

A set may also carry anchors: texts outside the split that the provider chose to give weight in every client's
fit, such as a synthetic set written from its class descriptions (`xsilo public-set synthesize`). They add

    manifest.json       "anchors": {"rows", "fingerprint"}
    anchors.jsonl       {"text": ...} per anchor row
    states.safetensors  anchor (n_anchor, d) float32

and a third part to the private fit, whose weight each client chooses for itself. A folder without anchors is
written byte for byte as before.

The states never leave the provider; the texts, the fingerprint and the split do. Every file's sha256, the texts'
fingerprint, the states' shapes, dtypes and values, and the split (the one `splits.public_split` draws, which the
client repeats) are checked; each problem is an `ExportError` whose one line names the file and the fix.
`PublicStatesConfig` is the manifest as a dataclass (to_dict / from_dict); an older manifest version is brought up
to this one by `MIGRATIONS` before it is checked (version 1 is the first, so there is none yet).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from .digests import texts_fingerprint
from .folders import (SPEC_KEYS, ExportError, Migration, check_header, file_records, is_int, migrate, now,
                      published_spec, read_json_doc, staged_folder, verify_file)
from .splits import public_split

PUBLIC_FORMAT = "xsilo-public-states"
PUBLIC_VERSION = 1
PUBLIC_MANIFEST = "manifest.json"
TEXTS_FILE = "texts.jsonl"
ANCHORS_FILE = "anchors.jsonl"
ANCHOR = "anchor"  # the anchor part's tensor
STATES_FILE = "states.safetensors"
PART_NAMES = ("train", "val")
REWRITE = "re-run `xsilo public-set export`"
MIGRATIONS: dict[int, Migration] = {}  # version v -> v + 1 of a public-states manifest (none yet)


@dataclass
class PublicStatesConfig:
    """A public-states manifest, less its files."""

    name: str
    rows: int
    fingerprint: str
    val_fraction: float
    seed: int
    parts: dict[str, int]  # {"train": rows, "val": rows}
    model: dict[str, Any]  # the provider's published extraction spec
    hidden_size: int
    created: str | None = None
    anchors: dict[str, Any] | None = None  # {"rows", "fingerprint"} of anchors.jsonl; None: no anchors

    format_version: ClassVar[int] = PUBLIC_VERSION

    def to_dict(self) -> dict[str, Any]:
        """The manifest's keys in the order the writer lays them out (without 'files'; 'anchors' only when set)."""
        doc = {"format": PUBLIC_FORMAT, "version": self.format_version, "created": self.created,
               "name": str(self.name), "rows": int(self.rows), "fingerprint": self.fingerprint,
               "val_fraction": float(self.val_fraction), "seed": int(self.seed),
               "parts": {p: int(self.parts[p]) for p in PART_NAMES}, "model": self.model,
               "hidden_size": int(self.hidden_size)}
        if self.anchors is not None:
            doc["anchors"] = {"rows": int(self.anchors["rows"]), "fingerprint": str(self.anchors["fingerprint"])}
        return doc

    @classmethod
    def from_dict(cls, manifest: dict[str, Any]) -> "PublicStatesConfig":
        """From a checked manifest (`check_public_manifest`)."""
        return cls(str(manifest["name"]), int(manifest["rows"]), str(manifest["fingerprint"]),
                   float(manifest["val_fraction"]), int(manifest["seed"]), dict(manifest["parts"]),
                   dict(manifest["model"]), int(manifest["hidden_size"]), manifest.get("created"),
                   manifest.get("anchors"))


@dataclass(frozen=True)
class Anchors:
    """A public set's anchor rows: their texts and the provider's states on them (outside the train/val split)."""

    texts: list[str]
    states: np.ndarray  # (rows, d) float32

    @property
    def rows(self) -> int:
        return len(self.texts)

    @property
    def fingerprint(self) -> str:
        return texts_fingerprint(self.texts)


@dataclass(frozen=True)
class PublicStates:
    """The public set as the provider serves it: its texts, the split, and the provider's states per part."""

    directory: Path
    manifest: dict[str, Any]
    texts: list[str]
    parts: tuple[np.ndarray, ...]  # (train, val) float32 states, rows in index order
    indices: tuple[np.ndarray, ...]  # (train_index, val_index) int64 rows of `texts`
    anchors: Anchors | None = None

    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def rows(self) -> int:
        return int(self.manifest["rows"])

    @property
    def fingerprint(self) -> str:
        return str(self.manifest["fingerprint"])

    @property
    def hidden_size(self) -> int:
        return int(self.manifest["hidden_size"])

    @property
    def config(self) -> PublicStatesConfig:
        return PublicStatesConfig.from_dict(self.manifest)

    @property
    def part_rows(self) -> tuple[int, ...]:
        return tuple(len(p) for p in self.parts)

    @property
    def fit_parts(self) -> tuple[np.ndarray, ...]:
        """The parts of a private fit: train, val, then the anchors when the set has them."""
        return self.parts + ((self.anchors.states,) if self.anchors is not None else ())

    def info(self) -> dict[str, Any]:
        """What GET /v1/model publishes about the public set (never the states)."""
        m = self.manifest
        anchors = None if self.anchors is None else {"rows": self.anchors.rows,
                                                     "fingerprint": self.anchors.fingerprint}
        return {"name": self.name, "rows": self.rows, "fingerprint": self.fingerprint,
                "val_fraction": float(m["val_fraction"]), "seed": int(m["seed"]), "parts": dict(m["parts"]),
                "model": {key: m["model"].get(key) for key in SPEC_KEYS}, "hidden_size": self.hidden_size,
                "anchors": anchors}


# --- reading ------------------------------------------------------------------------------------------------

def check_public_manifest(doc: Any, path: Path | str) -> dict[str, Any]:
    """Validate a public-states manifest's shape (not its files); return it."""
    def bad(key: str, problem: str) -> ExportError:
        return ExportError(f"{path}: {key} {problem}; {REWRITE} to write a valid folder")

    check_header(doc, path, PUBLIC_FORMAT, PUBLIC_VERSION, REWRITE, what="the public-states manifest",
                 writer="`xsilo public-set export`")
    if not isinstance(doc.get("name"), str) or not doc["name"]:
        raise bad("'name'", "must be a non-empty string")
    if not is_int(doc.get("rows"), 3):
        raise bad("'rows'", "must be an integer >= 3 (2 train rows and 1 val row at least)")
    if not (isinstance(doc.get("fingerprint"), str) and len(doc["fingerprint"]) == 64):
        raise bad("'fingerprint'", "must be the texts' 64-hex-digit fingerprint")
    fraction = doc.get("val_fraction")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise bad("'val_fraction'", "must be a number in (0, 1)")
    if not is_int(doc.get("seed")):
        raise bad("'seed'", "must be a non-negative integer")
    parts = doc.get("parts")
    if not (isinstance(parts, dict) and list(parts) == list(PART_NAMES) and all(is_int(parts[p], 1) for p in parts)):
        raise bad("'parts'", f"must be {{\"train\": rows, \"val\": rows}} with positive counts, got {parts!r:.80}")
    if parts["train"] + parts["val"] != doc["rows"]:
        raise bad("'parts'", f"counts {parts['train']} + {parts['val']} do not add up to rows {doc['rows']}")
    if not is_int(doc.get("hidden_size"), 1):
        raise bad("'hidden_size'", "must be a positive integer")
    model = doc.get("model")
    if not isinstance(model, dict) or model.get("hidden_size") not in (None, doc["hidden_size"]):
        raise bad("'model'", "must be the provider's extraction spec, with the manifest's hidden_size")
    anchors = doc.get("anchors")
    if anchors is not None and not (isinstance(anchors, dict) and set(anchors) == {"rows", "fingerprint"}
                                    and is_int(anchors["rows"], 1) and isinstance(anchors["fingerprint"], str)
                                    and len(anchors["fingerprint"]) == 64):
        raise bad("'anchors'", "must be absent or {\"rows\": count >= 1, \"fingerprint\": 64 hex digits}")
    for name in (TEXTS_FILE, STATES_FILE) + ((ANCHORS_FILE,) if anchors is not None else ()):
        if name not in doc["files"]:
            raise bad("'files'", f"does not list {name}")
    return doc


def read_texts(path: Path, rows: int) -> list[str]:
    """The texts of texts.jsonl: one {"text": str} object per line, exactly `rows` of them."""
    texts = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):
                raise ExportError(f"{path}:{number} is not a JSON line; {REWRITE}") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ExportError(f"{path}:{number} must be an object {{\"text\": str}}; {REWRITE}")
            texts.append(record["text"])
    if len(texts) != rows:
        raise ExportError(f"{path} holds {len(texts)} texts but the manifest says rows={rows}; {REWRITE}")
    return texts


def read_states(path: Path, manifest: dict[str, Any]
                ) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...], np.ndarray | None]:
    """(train, val) float32 states, their int64 indices and the anchors' states (None without anchors): shapes,
    dtypes, values and split checked."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ExportError(f"{path} is unreadable ({str(e)[:200]}); {REWRITE}") from None
    anchors = manifest.get("anchors")
    expected = {*PART_NAMES, *(f"{p}_index" for p in PART_NAMES), *((ANCHOR,) if anchors is not None else ())}
    if set(tensors) != expected:
        raise ExportError(f"{path} must hold exactly {sorted(expected)}, got {sorted(tensors)[:8]}; {REWRITE}")
    d, rows = manifest["hidden_size"], manifest["rows"]
    parts, indices = [], []
    for name in PART_NAMES:
        states, index = tensors[name], tensors[f"{name}_index"]
        n = manifest["parts"][name]
        if states.shape != (n, d) or states.dtype != np.float32:
            raise ExportError(f"{path}: {name!r} is {states.dtype} {states.shape}, the manifest says float32 "
                              f"({n}, {d}); {REWRITE}")
        if index.shape != (n,) or index.dtype != np.int64:
            raise ExportError(f"{path}: '{name}_index' is {index.dtype} {index.shape}, expected int64 ({n},); "
                              f"{REWRITE}")
        if not np.isfinite(states).all():
            raise ExportError(f"{path}: {name!r} holds NaN or inf; re-extract the states and {REWRITE}")
        parts.append(states)
        indices.append(index)
    anchor = None
    if anchors is not None:
        anchor = tensors[ANCHOR]
        if anchor.shape != (anchors["rows"], d) or anchor.dtype != np.float32 or not np.isfinite(anchor).all():
            raise ExportError(f"{path}: {ANCHOR!r} must be float32 ({anchors['rows']}, {d}) finite states, got "
                              f"{anchor.dtype} {anchor.shape}; {REWRITE}")
    expected_split = public_split(rows, float(manifest["val_fraction"]), int(manifest["seed"]))
    if not all(np.array_equal(a, b) for a, b in zip(indices, expected_split)):
        raise ExportError(f"{path}: the train/val indices are not the split of {rows} rows at val_fraction "
                          f"{manifest['val_fraction']}, seed {manifest['seed']} that clients repeat; {REWRITE}")
    return tuple(parts), tuple(indices), anchor


def load_public_states(directory: str | Path) -> PublicStates:
    """A public-states folder, every file's sha256, the fingerprint, the states and the split checked."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ExportError(f"{directory} is not a folder; pass the folder `xsilo public-set export --out` wrote")
    path = directory / PUBLIC_MANIFEST
    doc = read_json_doc(path, "a public-states folder", "write one with `xsilo public-set export`", REWRITE)
    manifest = check_public_manifest(migrate(doc, PUBLIC_FORMAT, PUBLIC_VERSION, MIGRATIONS), path)
    texts = read_texts(verify_file(directory, manifest, TEXTS_FILE, fix=REWRITE), manifest["rows"])
    if texts_fingerprint(texts) != manifest["fingerprint"]:
        raise ExportError(f"{directory / TEXTS_FILE}: the texts' fingerprint is not the manifest's "
                          f"{manifest['fingerprint'][:16]}; {REWRITE}")
    parts, indices, anchor_states = read_states(verify_file(directory, manifest, STATES_FILE, fix=REWRITE), manifest)
    anchors = None
    if manifest.get("anchors") is not None:
        rows = manifest["anchors"]["rows"]
        anchors = Anchors(read_texts(verify_file(directory, manifest, ANCHORS_FILE, fix=REWRITE), rows),
                          anchor_states)
        if anchors.fingerprint != manifest["anchors"]["fingerprint"]:
            raise ExportError(f"{directory / ANCHORS_FILE}: the anchors' fingerprint is not the manifest's; {REWRITE}")
    return PublicStates(directory, manifest, texts, parts, indices, anchors)


# --- writing ------------------------------------------------------------------------------------------------

def write_public_states(
    out: str | Path,
    texts: list[str],
    states: np.ndarray,
    *,
    model: dict[str, Any],
    val_fraction: float,
    seed: int,
    name: str,
    overwrite: bool = False,
    anchors: Anchors | None = None,
) -> Path:
    """Write a public-states folder atomically (temp folder, then rename); returns `out`. `anchors`: texts outside
    the split and the provider's states on them (module docstring)."""
    from safetensors.numpy import save_file

    out = Path(out)
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise ExportError("texts must be a list of strings, one per public row")
    states = np.asarray(states)
    if states.ndim != 2 or states.shape[0] != len(texts):
        raise ExportError(f"states must be (rows, d) with one row per text: {len(texts)} texts, states "
                          f"{states.shape}")
    if not np.isfinite(states).all():
        raise ExportError("the states hold NaN/inf; re-extract them (the cache may be corrupt)")
    n, d = states.shape
    if not 0 < val_fraction < 1:
        raise ExportError(f"val_fraction must be in (0, 1): the private fit chooses λ on the val part, got "
                          f"{val_fraction}")
    train_idx, val_idx = public_split(n, val_fraction, seed)
    if len(train_idx) < 2 or len(val_idx) < 1:
        raise ExportError(f"{n} rows at val_fraction {val_fraction} give {len(train_idx)} train and {len(val_idx)} "
                          "val rows; use more public rows (at least 2 train and 1 val)")
    spec = published_spec(model, d, "model")
    rows = np.asarray(states, dtype=np.float32)
    tensors = {"train": np.ascontiguousarray(rows[train_idx]), "val": np.ascontiguousarray(rows[val_idx]),
               "train_index": train_idx.astype(np.int64), "val_index": val_idx.astype(np.int64)}
    if anchors is not None:
        anchor = np.asarray(anchors.states)
        if not (isinstance(anchors.texts, list) and anchors.texts and all(isinstance(t, str) for t in anchors.texts)):
            raise ExportError("anchors must hold at least one text, as a list of strings")
        if anchor.shape != (anchors.rows, d) or not np.isfinite(anchor).all():
            raise ExportError(f"the anchors' states must be ({anchors.rows}, {d}) finite values, one row per anchor "
                              f"text in the public states' dimension, got {anchor.shape}")
        tensors[ANCHOR] = np.ascontiguousarray(anchor, dtype=np.float32)
    with staged_folder(out, overwrite) as tmp:
        write_texts(tmp / TEXTS_FILE, texts)
        if anchors is not None:
            write_texts(tmp / ANCHORS_FILE, anchors.texts)
        save_file(tensors, str(tmp / STATES_FILE))
        config = PublicStatesConfig(name, n, texts_fingerprint(texts), val_fraction, seed,
                                    {"train": len(train_idx), "val": len(val_idx)}, spec, d, now(),
                                    None if anchors is None else {"rows": anchors.rows,
                                                                  "fingerprint": anchors.fingerprint})
        manifest = {**config.to_dict(), "files": file_records(tmp)}
        (tmp / PUBLIC_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def write_texts(path: Path, texts: list[str]) -> None:
    """One {"text": ...} JSON line per text (inside a staged folder: the folder's rename makes it atomic)."""
    with open(path, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")

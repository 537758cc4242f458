"""On-disk cache of pooled hidden states: fixed-size shards written once, read memory-mapped.

A cache directory is keyed by a fingerprint of everything that determines its contents
(model weights identity, dataset content, split, pooling, layer, max_length, dtype). Its states depend only
on the rows' texts, the model and the view, so a finished cache of the same texts under another name, split or
labels (`find_equivalent`: the manifest's `texts_sha256`) is reused by linking its shards (`link_shards`). Rows
are cut into contiguous shards of `shard_size` rows whatever the number of processes, so
1 and N ranks produce identical files. Each shard is written to a temporary file, given a
`.sha256` sidecar, then renamed into place; `manifest.json` is written last, and only a
directory with a complete manifest is a cache hit.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.registry import xsilo_home
from serve.formats.digests import sha256_file
from serve.formats.folders import atomic_write_bytes  # noqa: F401 (re-exported: the one atomic writer)

MANIFEST = "manifest.json"
LABELS = "labels.npy"
FORMAT_VERSION = 1


class CacheError(ValueError):
    """A state cache is missing, incomplete, corrupt or unwritable; the message says what to do."""


@dataclass(frozen=True)
class CacheKey:
    """Everything that determines a cache's contents."""

    model_identity: str
    dataset_fingerprint: str
    split: str
    pooling: str
    layer: int
    max_length: int
    dtype: str

    def fingerprint(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:20]


def states_root() -> Path:
    return xsilo_home() / "states"


def slug(name: str, max_length: int = 40, suffix: bool = True) -> str:
    """A file-name part for a model or dataset name: its last path part, each character other than a
    letter, digit, '-', '_' or '.' made '-', cut to `max_length` ("x" when empty). `suffix=False` drops
    a path's file suffix (`data/sms.csv` -> `sms`; a registry name is kept whole).

    Cache folder names are built from it, so a change here orphans every existing cache.
    """
    part = Path(name).name
    if not suffix and ("/" in name or "\\" in name):
        part = Path(part).stem
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in part)[:max_length] or "x"


def cache_dir_for(key: CacheKey, model_name: str, data_name: str, root: Path | None = None) -> Path:
    return Path(root or states_root()) / f"{slug(model_name)}--{slug(data_name)}--{key.fingerprint()}"


def encode_states(states: np.ndarray, dtype: str) -> np.ndarray:
    """float32 states → the stored dtype: float32, float16, or bfloat16 kept as its uint16 bit pattern
    (numpy has no bfloat16), rounded to nearest even; `decode_states` reads any of them back."""
    states = np.ascontiguousarray(states, dtype=np.float32)
    if dtype == "float16":
        return states.astype(np.float16)
    if dtype == "bfloat16":
        bits = states.view(np.uint32)
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return states


def decode_states(stored: np.ndarray) -> np.ndarray:
    """Stored shard rows → float32 (a uint16 shard holds bfloat16 bit patterns)."""
    if stored.dtype == np.uint16:
        return (stored.astype(np.uint32) << 16).view(np.float32)
    return np.asarray(stored, dtype=np.float32)


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.npy"


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def atomic_save_npy(path: Path, array: np.ndarray) -> str:
    """Save `array` atomically; returns its file's sha256 (also written to a sidecar)."""
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, np.ascontiguousarray(array))
            f.flush()
            os.fsync(f.fileno())
        digest = sha256_file(Path(tmp))
        atomic_write_bytes(path.with_suffix(".sha256"), digest.encode())
        os.replace(tmp, path)
        return digest
    except BaseException as e:  # a signal mid-write must not leave the temp file behind either
        if os.path.exists(tmp):
            os.unlink(tmp)
        if not isinstance(e, OSError):
            raise
        raise CacheError(
            f"could not write {path}: {e.strerror or e}; free disk space or choose another cache "
            "directory (XSILO_HOME), then rerun: finished shards are kept and the run resumes"
        ) from e


def valid_shard(directory: Path, index: int, rows: int, dim: int | None) -> str | None:
    """The shard's sha256 if its file is whole and matches its sidecar, else None."""
    path = directory / shard_name(index)
    sidecar = path.with_suffix(".sha256")
    if not (path.is_file() and sidecar.is_file()):
        return None
    try:
        expected = sidecar.read_text().strip()
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return None
    if array.ndim != 2 or array.shape[0] != rows or (dim is not None and array.shape[1] != dim):
        return None
    return expected if sha256_file(path) == expected else None


def ensure_writable(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=directory, prefix=".probe-", delete=True)
        probe.close()
    except OSError as e:
        raise CacheError(
            f"cache directory {directory} is not writable ({e.strerror or e}); set XSILO_HOME "
            "or pass --cache-dir to a writable location"
        ) from e


class StateCache:
    """A complete cache directory: `states` (memory-mapped, row-indexable), labels, manifest."""

    def __init__(self, path: str | Path, verify: bool = False):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise CacheError(f"{self.path} is not a finished state cache (no {MANIFEST}); run `xsilo extract` for it")
        self.manifest: dict[str, Any] = json.loads(manifest_path.read_text())
        if not self.manifest.get("complete"):
            raise CacheError(f"{self.path} is incomplete; rerun `xsilo extract` to resume it")
        self._shards: list[np.ndarray] = []
        for shard in self.manifest["shards"]:
            file = self.path / shard["file"]
            if verify and (not file.is_file() or sha256_file(file) != shard["sha256"]):
                raise CacheError(f"{file} is missing or corrupt; rerun `xsilo extract` to recompute it")
            try:
                self._shards.append(np.load(file, mmap_mode="r"))
            except (OSError, ValueError) as e:
                raise CacheError(f"{file} is unreadable ({e}); rerun `xsilo extract` to recompute it") from e
        self._starts = np.array([s["start"] for s in self.manifest["shards"]] + [self.n_rows])
        labels_path = self.path / LABELS
        self.labels: np.ndarray | None = np.load(labels_path) if labels_path.is_file() else None

    @property
    def n_rows(self) -> int:
        return int(self.manifest["n_rows"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def label_names(self) -> list[str] | None:
        return self.manifest.get("label_names")

    def __len__(self) -> int:
        return self.n_rows

    def rows(self, index: np.ndarray | list[int] | slice) -> np.ndarray:
        """Gather rows (float32, in the order given, whatever the stored dtype) across shards."""
        idx = np.arange(self.n_rows)[index] if isinstance(index, slice) else np.asarray(index, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_rows):
            raise IndexError(f"row index out of range for a cache of {self.n_rows} rows")
        out = np.empty((idx.size, self.dim), dtype=np.float32)
        shard_of = np.searchsorted(self._starts, idx, side="right") - 1
        for s in np.unique(shard_of):
            sel = shard_of == s
            out[sel] = decode_states(self._shards[s][idx[sel] - self._starts[s]])
        return out

    def all(self) -> np.ndarray:
        return self.rows(slice(None))


VIEW_FIELDS = ("model_identity", "pooling", "layer", "max_length", "dtype")  # with the texts: what states depend on


def find_equivalent(key: CacheKey, texts_sha256: str, root: Path | None = None, skip: Path | None = None
                    ) -> Path | None:
    """A finished cache under `root` holding the states of the same texts in the same order, for the same model
    and view as `key` (its manifest's `texts_sha256`; a cache written before that field, its dataset fingerprint):
    content-addressed reuse, whatever name, split or labels it was extracted under."""
    root = Path(root or states_root())
    if not root.is_dir():
        return None
    for folder in sorted(root.iterdir()):
        if skip is not None and folder.resolve() == skip.resolve():
            continue
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
            stored = manifest["key"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if not manifest.get("complete") or any(stored.get(f) != getattr(key, f) for f in VIEW_FIELDS):
            continue
        if manifest.get("texts_sha256", None) == texts_sha256 or stored.get("dataset_fingerprint") == \
                key.dataset_fingerprint:
            return folder
    return None


def link_shards(source: Path, directory: Path) -> list[tuple[int, int]]:
    """Hard-link (else copy) a finished cache's shard files and their sidecars into `directory`; returns the
    shards' (start, stop) rows, for `finalise` to check and record."""
    import shutil

    manifest = json.loads((source / MANIFEST).read_text())
    ranges = []
    for index, record in enumerate(manifest["shards"]):
        name = shard_name(index)
        if record.get("file") != name:
            raise CacheError(f"{source} lists shard {record.get('file')!r} where {name} was expected; "
                             "rerun `xsilo extract` for it")
        for file in (name, Path(name).with_suffix(".sha256").name):
            target = directory / file
            if target.exists():
                target.unlink()
            try:
                os.link(source / file, target)
            except OSError:  # another file system: copy, then rename into place
                tmp = directory / f".tmp-{file}-{os.getpid()}"
                shutil.copyfile(source / file, tmp)
                os.replace(tmp, target)
        ranges.append((int(record["start"]), int(record["stop"])))
    return ranges

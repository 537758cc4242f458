"""The registry: short names of models and datasets, from the built-in file and a user's, parsed and validated.

The built-in registry (`datamodules/registry.yaml`, shipped as package data) maps short names to pinned packages;
a user's registry file ($XSILO_REGISTRY, or `use_registry(path)`) adds entries or overrides them by name,
including models and datasets in the user's own files. Every entry is parsed once into an `Asset` and validated
with one-line errors naming the registry, the entry and the key. Preparing what an entry names (installing its
packages, converting GGUF files) is `datamodules.assets`'.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from dataclasses import MISSING, asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from serve.formats.folders import xsilo_home  # noqa: F401 (the one definition, re-exported)

REGISTRY_ENV = "XSILO_REGISTRY"
BUILTIN = "built-in registry"
# The built-in readers of `datamodules/text.py` (its READERS keys; a test keeps the two equal).
READER_NAMES = ("vader", "trec", "label_folders", "rotten", "dialog")
# A user's own data files, read through `datasets`; suffix → format.
FORMATS = {".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "jsonl", ".parquet": "parquet",
           ".txt": "text"}
DATA_FORMATS = (*dict.fromkeys(FORMATS.values()), "datasets")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")
_SPLIT = re.compile(r"[A-Za-z0-9_]+\Z")
_SHA256 = re.compile(r"[0-9a-f]{64}\Z")


class AssetError(ValueError):
    """An asset name, path or preparation step is wrong; the message says how to fix it."""


# --- the registry schema ----------------------------------------------------------------

@dataclass(frozen=True)
class DataFiles:
    """A dataset kept in the user's own files, as its registry entry describes it.

    `datamodules/text.py` reads it through `datasets`. `files` maps split → an existing file or
    saved `datasets` folder (a single file is `{"train": path}`); `fractions`, when set, carve
    the train file into seeded, stratified splits such as `{"train": 0.8, "val": 0.1, "test": 0.1}`.
    """

    files: dict[str, Path]
    format: str  # one of DATA_FORMATS
    text_column: str = "text"
    label_column: str | None = "label"
    fractions: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Asset:
    """One registry entry: the schema of every registry file, built-in or the user's.

    Paths of an entry with `packages` are relative to the installed packages; paths of an
    entry without are the user's own files, relative to the registry file that names them.
    """

    name: str
    kind: str  # "model" | "dataset"
    origin: str = BUILTIN  # the registry file that defined it
    description: str = ""
    packages: tuple[str, ...] = ()
    # models: an HF `folder`, or a `gguf` file (optionally joined from `parts`, checked by sha256)
    folder: str | None = None
    gguf: str | None = None
    parts: tuple[str, ...] = ()
    sha256: str | None = None
    sha256sums: str | None = None
    # datasets: a built-in `reader` over a packaged `file`, or the user's `file`/`splits`
    reader: str | None = None
    file: str | None = None
    format: str | None = None
    text_column: str = "text"
    label_column: str | None = "label"
    splits: dict[str, str | float] = field(default_factory=dict)

    @property
    def is_builtin(self) -> bool:
        return self.origin == BUILTIN

    @property
    def spec(self) -> dict[str, Any]:
        """The entry's keys that differ from their defaults, as a dict."""
        out = {}
        for f in fields(self):
            default = f.default_factory() if f.default_factory is not MISSING else f.default
            if f.name not in ("name", "kind", "origin") and getattr(self, f.name) != default:
                out[f.name] = getattr(self, f.name)
        return out

    @property
    def fingerprint(self) -> str:
        """A short hash of the entry: a user's edited entry never reuses an old conversion."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]

    def data_files(self) -> DataFiles:
        """The user's files of a dataset entry without a built-in `reader`."""
        if self.kind != "dataset" or self.reader is not None:
            raise AssetError(f"asset {self.name!r} is read by xsilo's {self.reader!r} reader, not from data files")
        fractions = {k: float(v) for k, v in self.splits.items() if not isinstance(v, str)}
        named = {"train": self.file} if self.file is not None else {k: v for k, v in self.splits.items() if isinstance(v, str)}
        files = {k: package_file(self, v) if self.packages else Path(v) for k, v in named.items()}
        return DataFiles(files=files, format=self.format or "", text_column=self.text_column,
                         label_column=self.label_column, fractions=fractions)


_KEYS = {
    "model": {"description", "packages", "folder", "gguf", "parts", "sha256", "sha256sums"},
    "dataset": {"description", "packages", "reader", "file", "format", "text_column", "label_column", "splits"},
}
_SECTIONS = {"models": "model", "datasets": "dataset"}


class _Entry:
    """Validates one raw entry; every error names the registry, the entry and the key."""

    def __init__(self, origin: str, kind: str, name: Any, raw: Any, base: Path | None):
        self.origin, self.kind, self.name, self.base = origin, kind, name, base
        if not isinstance(name, str) or not _NAME.match(name):
            self.fail(None, "is not a valid name", "use letters, digits, '.', '_' and '-' (no '/')")
        if not isinstance(raw, dict):
            self.fail(None, f"must be a mapping of keys, got {type(raw).__name__}",
                      f"write its keys ({', '.join(sorted(_KEYS[kind]))}) under it")
        unknown = sorted(map(str, set(raw) - _KEYS[kind]))
        if unknown:
            self.fail(unknown[0], "is not a known key", f"use only {', '.join(sorted(_KEYS[kind]))}")
        self.raw, self.packages = raw, ()

    def fail(self, key: str | None, problem: str, fix: str) -> None:
        where = f"{self.kind} {self.name!r}" + (f", key {key!r}" if key else "")
        raise AssetError(f"registry {self.origin}: {where} {problem}; {fix}")

    def text(self, key: str, default: str | None = None, nullable: bool = False) -> str | None:
        if key not in self.raw:
            return default
        value = self.raw[key]
        if value is None and nullable:
            return None
        if not isinstance(value, str) or not value.strip():
            self.fail(key, f"must be a non-empty string, got {value!r}", "quote it as text"
                      + (" or write null" if nullable else ""))
        return value

    def texts(self, key: str) -> tuple[str, ...]:
        value = self.raw.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
            self.fail(key, f"must be a list of strings, got {value!r}", f"write {key}: [a, b]")
        return tuple(value)

    def path(self, key: str, value: str, want: str) -> str:
        """A user path (no packages): resolved against the registry file's folder, must exist."""
        if self.packages:
            return value
        path = Path(value).expanduser()
        if not path.is_absolute() and self.base is not None:
            path = self.base / path
        ok = path.is_dir() if want == "folder" else path.is_file() if want == "file" else path.exists()
        if not ok:
            self.fail(key, f"names {want} {str(path)!r}, which does not exist",
                      "fix the path (a relative path is relative to the registry file)")
        return str(path.resolve())

    def parse(self) -> Asset:
        self.packages = self.texts("packages")
        for requirement in self.packages:
            if "==" not in requirement:
                self.fail("packages", f"entry {requirement!r} is not pinned", "pin it as name==version")
        common = {"name": self.name, "kind": self.kind, "origin": self.origin, "packages": self.packages,
                  "description": self.text("description", "") or ""}
        return Asset(**common, **(self.model() if self.kind == "model" else self.dataset()))

    def model(self) -> dict[str, Any]:
        folder, gguf, parts = self.text("folder"), self.text("gguf"), self.texts("parts")
        sha256, sha256sums = self.text("sha256"), self.text("sha256sums")
        if (folder is None) == (gguf is None):
            self.fail("folder" if folder else None, "needs exactly one of 'folder' and 'gguf'",
                      "give 'folder' for a Hugging Face folder or 'gguf' for a GGUF file")
        if folder is not None and (parts or sha256 or sha256sums):
            self.fail("parts" if parts else "sha256", "applies to a 'gguf' model only", "remove it or use 'gguf'")
        if not gguf:
            return {"folder": self.path("folder", folder, "folder")}
        if not gguf.endswith(".gguf"):
            self.fail("gguf", f"must name a .gguf file, got {gguf!r}", "give the GGUF file's name")
        if not parts:
            if sha256 or sha256sums:
                self.fail("sha256" if sha256 else "sha256sums", "checks joined 'parts' only",
                          "list the parts or remove the checksum")
            return {"gguf": self.path("gguf", gguf, "file")}
        if "/" in gguf:
            self.fail("gguf", "names the joined file and must be a bare file name", f"write gguf: {Path(gguf).name}")
        if (sha256 is None) == (sha256sums is None):
            self.fail("sha256", "must be given (or 'sha256sums', a checksum file), not both or neither",
                      "add sha256: <64 hex digits of the joined file>")
        if sha256 is not None and not _SHA256.match(sha256):
            self.fail("sha256", f"must be 64 lowercase hex digits, got {sha256!r}", "paste the joined file's sha256sum")
        return {"gguf": gguf, "parts": tuple(self.path("parts", p, "file") for p in parts), "sha256": sha256,
                "sha256sums": sha256sums and self.path("sha256sums", sha256sums, "file")}

    def dataset(self) -> dict[str, Any]:
        reader, file = self.text("reader"), self.text("file")
        if reader is not None:
            if reader not in READER_NAMES:
                self.fail("reader", f"{reader!r} is not a built-in reader",
                          f"use one of {', '.join(READER_NAMES)}, or 'file' and 'format' for your own data")
            if not self.packages or file is None:
                self.fail("reader", "needs 'packages' and a 'file' inside them", "add both, or drop 'reader'")
            extra = sorted({"format", "text_column", "label_column", "splits"} & set(self.raw))
            if extra:
                self.fail(extra[0], "applies to the user's own files, not to a built-in reader", "remove it")
            return {"reader": reader, "file": file}
        splits = self.raw.get("splits", {})
        if not isinstance(splits, dict) or not all(isinstance(k, str) and _SPLIT.match(k) for k in splits):
            self.fail("splits", f"must map split names to files or fractions, got {splits!r}",
                      "write splits: {train: train.csv, test: test.csv} or {train: 0.8, val: 0.1, test: 0.1}")
        as_files = all(isinstance(v, str) for v in splits.values())
        as_fractions = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in splits.values())
        if splits and not (as_files or as_fractions):
            self.fail("splits", "mixes files and fractions", "give every split a file, or every split a fraction")
        if splits and "train" not in splits:
            self.fail("splits", f"has no 'train' split (got {', '.join(splits)})", "add train: ...")
        if (file is None) == (not splits or as_fractions):
            self.fail("file", "is needed for one file (alone or carved by fractions), and not beside split files",
                      "give 'file', or 'splits' that map each split to a file")
        if splits and as_fractions:
            bad = {k: v for k, v in splits.items() if not 0 < v < 1}
            if bad or abs(sum(splits.values()) - 1) > 1e-6:
                self.fail("splits", f"fractions must each be in (0, 1) and sum to 1, got {splits}",
                          "e.g. {train: 0.8, val: 0.1, test: 0.1}")
        paths = {"train": file} if file is not None else dict(splits)
        fmt = self.text("format")
        if fmt is not None and fmt not in DATA_FORMATS:
            self.fail("format", f"{fmt!r} is not a known format", f"use one of {', '.join(DATA_FORMATS)}")
        if fmt is None:
            first = Path(next(iter(paths.values()))).expanduser()
            local = first if first.is_absolute() or self.packages or self.base is None else self.base / first
            folder = not first.suffix and (bool(self.packages) or not local.is_file())
            fmt = FORMATS.get(first.suffix.lower(), "datasets" if folder else None)
            if fmt is None:
                self.fail("format", f"cannot be inferred from {first.name!r}",
                          f"add format: one of {', '.join(DATA_FORMATS)}")
        want = "folder" if fmt == "datasets" else "file"
        resolved = {k: self.path("file" if file is not None else "splits", v, want) for k, v in paths.items()}
        return {"file": resolved["train"] if file is not None else None, "format": fmt,
                "splits": splits if as_fractions else resolved, "text_column": self.text("text_column", "text"),
                "label_column": self.text("label_column", "label", nullable=True)}


def parse_registry(text: str, origin: str, base: Path | None = None) -> dict[str, Asset]:
    """Parse and validate one registry file's text; `base` anchors relative user paths."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise AssetError(f"registry {origin} is not valid YAML{at}: {getattr(e, 'problem', e)}; fix its syntax") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise AssetError(f"registry {origin} must be a mapping with 'models:' and/or 'datasets:' sections")
    assets: dict[str, Asset] = {}
    for section, entries in raw.items():
        kind = _SECTIONS.get(section)
        if kind is None:
            raise AssetError(f"registry {origin}: unknown section {section!r}; entries go under 'models:' "
                             "(kind model) or 'datasets:' (kind dataset)")
        if not isinstance(entries, dict):
            raise AssetError(f"registry {origin}: section {section!r} must map names to entries")
        for name, spec in entries.items():
            if name in assets:
                raise AssetError(f"registry {origin}: {name!r} is both a model and a dataset; rename one")
            assets[name] = _Entry(origin, kind, name, spec, base).parse()
    return assets


@functools.lru_cache(maxsize=8)
def _read_registry(path: str, mtime_ns: int, size: int) -> dict[str, Asset]:
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise AssetError(f"cannot read registry {path}: {e}; point {REGISTRY_ENV} at a readable YAML file") from None
    return parse_registry(text, path, file.parent)


@functools.lru_cache(maxsize=1)
def builtin_registry() -> dict[str, Asset]:
    """xsilo's own entries, read from the package data."""
    return parse_registry(resources.files("datamodules").joinpath("registry.yaml").read_text("utf-8"), BUILTIN)


def _user_registry(path: str | Path) -> dict[str, Asset]:
    file = Path(path).expanduser().resolve()
    try:
        stat = file.stat()
    except OSError:
        raise AssetError(f"registry file {str(path)!r} does not exist; pass an existing YAML file "
                         f"(--registry or {REGISTRY_ENV})") from None
    if not file.is_file():
        raise AssetError(f"registry {str(path)!r} is not a file; pass a YAML file (--registry or {REGISTRY_ENV})")
    return _read_registry(str(file), stat.st_mtime_ns, stat.st_size)


def load_registry(path: str | Path | None = None) -> dict[str, Asset]:
    """The built-in entries, with a user's registry (`path`, else $XSILO_REGISTRY) added on top.

    A user's entry replaces a built-in entry of the same name.
    """
    user = path if path is not None else os.environ.get(REGISTRY_ENV) or None
    return {**builtin_registry(), **(_user_registry(user) if user is not None else {})}


def use_registry(path: str | Path) -> dict[str, Asset]:
    """Validate a user's registry file and use it for the rest of this process and its children.

    The CLI's `--registry PATH` calls this; it sets $XSILO_REGISTRY, so DDP workers see it too.
    """
    registry = load_registry(path)
    os.environ[REGISTRY_ENV] = str(Path(path).expanduser().resolve())
    return registry


def get_asset(name: str, kind: str | None = None) -> Asset:
    registry = load_registry()
    asset = registry.get(name)
    if asset is None or (kind is not None and asset.kind != kind):
        known = sorted(a.name for a in registry.values() if kind is None or a.kind == kind)
        what = f"{kind} " if kind else ""
        raise AssetError(f"unknown {what}asset {name!r}; known: {', '.join(known)}")
    return asset


def is_registered(name: str, kind: str) -> bool:
    asset = load_registry().get(name)
    return asset is not None and asset.kind == kind


# --- where an entry's files are ---------------------------------------------------------------

def package_dir(requirement: str) -> Path:
    return xsilo_home() / "packages" / requirement.replace("==", "-")


def package_file(asset: Asset, relative: str) -> Path:
    """Locate `relative` inside any of the asset's installed packages (a user's path: itself)."""
    if not asset.packages:
        return Path(relative)
    for requirement in asset.packages:
        candidate = package_dir(requirement) / relative
        if candidate.exists():
            return candidate
    raise AssetError(f"{relative} is not in the packages of {asset.name!r}; run `xsilo assets prepare {asset.name}`")

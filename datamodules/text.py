"""Text datasets: registry names, local files and hub ids, all as `datasets.Dataset`.

Every loader returns a Dataset with a `text` column and, for labelled data, a `label`
column of type `ClassLabel`. A registry name reads its installed package files; any other
string goes through `datasets.load_dataset` (a local file or folder, or a hub id).
"""

from __future__ import annotations

import bz2
import csv
import hashlib
from pathlib import Path

import datasets
import numpy as np
from datasets import ClassLabel, Dataset

from datamodules.assets import AssetError, get_asset, is_prepared, is_registered, package_file, prepare

_FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json",
                  ".parquet": "parquet", ".txt": "text"}


def _labelled(texts: list[str], labels: list[str], names: list[str] | None = None) -> Dataset:
    names = names or sorted(set(labels))
    index = {n: i for i, n in enumerate(names)}
    features = datasets.Features({"text": datasets.Value("string"), "label": ClassLabel(names=names)})
    return Dataset.from_dict({"text": texts, "label": [index[x] for x in labels]}, features=features)


def _unlabelled(texts: list[str]) -> Dataset:
    return Dataset.from_dict({"text": texts})


def _dedupe(pairs):
    seen: set = set()
    for item in pairs:
        key = item[0] if isinstance(item, tuple) else item
        if key not in seen:
            seen.add(key)
            yield item


def _read_vader(path: Path) -> Dataset:
    """id <tab> score <tab> text; score 0 dropped, > 0 positive."""
    texts, labels = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        next(f)  # header
        for line in f:
            parts = line.rstrip("\n").split("\t", 2)
            if len(parts) < 3 or not parts[2].strip():
                continue
            score = float(parts[1])
            if score == 0:
                continue
            texts.append(parts[2].strip())
            labels.append("positive" if score > 0 else "negative")
    return _labelled(texts, labels, ["negative", "positive"])


def _read_trec(path: Path) -> Dataset:
    """`COARSE:fine question` per line; questions repeat, so deduplicate."""
    rows = []
    with open(path, encoding="latin-1") as f:
        for line in f:
            head, _, question = line.strip().partition(" ")
            if question:
                rows.append((question, head.split(":")[0]))
    rows = list(_dedupe(rows))
    return _labelled([q for q, _ in rows], [c for _, c in rows])


def _read_label_folders(path: Path) -> Dataset:
    """One file per document, folder name is the label (BBC News is latin-1)."""
    texts, labels = [], []
    for label_dir in sorted(p for p in path.iterdir() if p.is_dir()):
        for doc in sorted(label_dir.glob("*.txt")):
            texts.append(doc.read_text(encoding="latin-1").strip())
            labels.append(label_dir.name)
    return _labelled(texts, labels)


def _read_rotten(path: Path) -> Dataset:
    texts, labels = [], []
    with bz2.open(path, "rt", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["text"].strip():
                texts.append(row["text"].strip())
                labels.append(row["category"])
    return _labelled(texts, labels)


def _read_dialog(path: Path) -> Dataset:
    """Tab-separated utterance pairs → unique utterances in file order."""
    utterances = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            utterances.extend(u.strip() for u in line.split("\t") if u.strip())
    return _unlabelled(list(_dedupe(utterances)))


READERS = {"vader": _read_vader, "trec": _read_trec, "label_folders": _read_label_folders,
           "rotten": _read_rotten, "dialog": _read_dialog}


def _load_generic(name_or_path: str, split: str) -> Dataset:
    path = Path(name_or_path).expanduser()
    try:
        if path.is_file():
            builder = _FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise AssetError(f"cannot read {path.suffix!r} files; use one of {sorted(_FILE_BUILDERS)}")
            kwargs = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
            return datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
        if path.is_dir() and (path / "dataset_info.json").exists():
            loaded = datasets.load_from_disk(str(path))
            return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
        if name_or_path.startswith((".", "/", "~")) and not path.exists():
            raise AssetError(f"dataset path {name_or_path!r} does not exist")
        return datasets.load_dataset(name_or_path, split=split)
    except AssetError:
        raise
    except ValueError as e:
        if "split" in str(e).lower():
            raise AssetError(f"dataset {name_or_path!r} has no split {split!r}: {e}") from e
        raise AssetError(f"cannot load dataset {name_or_path!r}: {e}") from e
    except (FileNotFoundError, ConnectionError, OSError) as e:
        raise AssetError(
            f"cannot load dataset {name_or_path!r}: {e}. Pass a registry name, a local file "
            "(.csv/.tsv/.json/.jsonl/.parquet/.txt), a folder saved with save_to_disk, or a hub id"
        ) from e


def load_texts(
    name_or_path: str,
    split: str = "train",
    text_column: str = "text",
    label_column: str | None = "label",
    limit: int | None = None,
) -> Dataset:
    """Load a dataset as columns `text` (+ `label` as ClassLabel when it has labels).

    Registry datasets have a single split, "train". `limit` keeps N rows drawn at random with a
    fixed seed, in file order: many files are sorted by label (BBC's folders, VADER's scores), so
    the first N rows would hold a few classes only.
    """
    if is_registered(name_or_path, "dataset"):
        if split != "train":
            raise AssetError(f"registry dataset {name_or_path!r} has one split, 'train' (got {split!r}); "
                             "xsilo's DataModules make stratified train/val/test splits from it")
        if not is_prepared(name_or_path):
            prepare([name_or_path])
        asset = get_asset(name_or_path, "dataset")
        ds = READERS[asset.spec["reader"]](package_file(asset, asset.spec["file"]))
    else:
        ds = _load_generic(name_or_path, split)
        if text_column not in ds.column_names:
            raise AssetError(
                f"dataset {name_or_path!r} has no text column {text_column!r}; its columns are "
                f"{ds.column_names}: pass --text_column with one of them"
            )
        keep = {text_column: "text"}
        if label_column and label_column in ds.column_names:
            keep[label_column] = "label"
        ds = ds.select_columns(list(keep)).rename_columns({k: v for k, v in keep.items() if k != v})
        if "label" in ds.column_names and not isinstance(ds.features["label"], ClassLabel):
            ds = ds.class_encode_column("label")
    if limit is not None:
        if limit <= 0:
            raise AssetError(f"limit must be a positive number of rows, got {limit}")
        if limit < len(ds):
            keep = np.sort(np.random.default_rng(0).permutation(len(ds))[:limit])
            ds = ds.select(keep)
    if len(ds) == 0:
        raise AssetError(f"dataset {name_or_path!r} (split {split!r}) has no rows")
    return ds


def label_names(ds: Dataset) -> list[str] | None:
    feature = ds.features.get("label")
    return list(feature.names) if isinstance(feature, ClassLabel) else None


def dataset_fingerprint(ds: Dataset) -> str:
    """Content hash of the texts (and labels): the same rows give the same key anywhere."""
    digest = hashlib.sha256()
    for text in ds["text"]:
        digest.update(text.encode("utf-8"))
        digest.update(b"\x00")
    if "label" in ds.column_names:
        digest.update(repr(label_names(ds)).encode())
        digest.update(bytes(str(list(ds["label"])), "ascii"))
    return digest.hexdigest()

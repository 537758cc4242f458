"""Text datasets: registry names, local files and hub ids, all as `datasets.Dataset`.

Every loader returns a Dataset with a `text` column and, for labelled data, a `label`
column of type `ClassLabel`. A registry name reads its installed package files; any other
string goes through `datasets.load_dataset` (a local file or folder, or a hub id).
"""

from __future__ import annotations

import bz2
import csv
import sys
from pathlib import Path

import datasets
import numpy as np
from datasets import ClassLabel, Dataset

from datamodules.assets import is_prepared, prepare
from datamodules.registry import FORMATS, AssetError, get_asset, is_registered, package_file
from datamodules.dedupe import drop_seen
from serve.formats.digests import texts_fingerprint
from serve.formats.splits import stratified_fractions


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


SPLIT_PRIORITY = ("test", "val", "validation")  # a duplicate is kept in the first of these it is in


def _read_file(path: Path, fmt: str, split: str) -> Dataset:
    """One user file (csv/tsv/json/jsonl/parquet/text) or saved `datasets` folder, through `datasets`."""
    if fmt == "datasets":
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise AssetError(f"dataset folder {str(path)!r} has no split {split!r}; its splits are {list(loaded)}")
            return loaded[split]
        return loaded
    builder = {"tsv": "csv", "jsonl": "json"}.get(fmt, fmt)
    kwargs = {"delimiter": "\t"} if fmt == "tsv" else {}
    return datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)


def _load_generic(name_or_path: str, split: str) -> Dataset:
    path = Path(name_or_path).expanduser()
    if path.is_file():
        fmt = FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise AssetError(f"cannot read {path.suffix!r} files; use one of {sorted(FORMATS)}, or a save_to_disk folder")
        return _read_file(path, fmt, split)
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        return _read_file(path, "datasets", split)
    if name_or_path.startswith((".", "/", "~")) and not path.exists():
        raise AssetError(f"dataset path {name_or_path!r} does not exist")
    return datasets.load_dataset(name_or_path, split=split)


def _guarded(name_or_path: str, split: str, read) -> Dataset:
    """Run a `datasets` read; its errors become one line naming the dataset and the fix."""
    try:
        return read()
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
    except Exception as e:  # noqa: BLE001 - datasets raises its own types for malformed files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AssetError(f"cannot read dataset {name_or_path!r}: {first}; check the file's format") from e


def _select_columns(ds: Dataset, name: str, text_column: str, label_column: str | None,
                    label_required: bool) -> Dataset:
    """Keep `text` (+ `label` as a ClassLabel), renamed from the user's columns."""
    if text_column not in ds.column_names:
        raise AssetError(f"dataset {name!r} has no text column {text_column!r}; its columns are "
                         f"{ds.column_names}: pass --text_column with one of them")
    if label_column is not None and label_column not in ds.column_names:
        if label_required:
            raise AssetError(f"dataset {name!r} has no label column {label_column!r}; its columns are "
                             f"{ds.column_names}: pass --label_column with one of them")
        label_column = None
    keep = {text_column: "text", **({label_column: "label"} if label_column else {})}
    ds = ds.select_columns(list(keep)).rename_columns({k: v for k, v in keep.items() if k != v})
    missing = [i for i, t in enumerate(ds["text"]) if t is None]
    if missing:  # an empty cell: the row has no text at all
        print(f"{name}: skipped {len(missing)} row(s) with no value in text column {text_column!r}", file=sys.stderr)
        ds = ds.select(sorted(set(range(len(ds))) - set(missing)))
    if "label" in ds.column_names and not isinstance(ds.features["label"], ClassLabel):
        missing = sum(v is None for v in ds["label"])
        if missing:
            raise AssetError(f"dataset {name!r}: {missing} row(s) have no value in label column {label_column!r}; "
                             "fill or drop them")
        if ds.features["label"].dtype == "bool" or ds.features["label"].dtype.startswith("float"):
            ds = ds.cast_column("label", datasets.Value("string"))  # class-encoded as their text
        ds = ds.class_encode_column("label")
    return ds


def _load_files(name: str, split: str, text_column: str | None, label_column: str | None,
                dedupe: bool) -> Dataset:
    """A registry entry over the user's own files (H3's `DataFiles`): one file, split files or fractions."""
    files = get_asset(name, "dataset").data_files()
    columns = (files.text_column if text_column in (None, "text") else text_column,
               files.label_column if label_column == "label" else label_column)
    splits = list(files.fractions or files.files)
    if split not in splits:
        raise AssetError(f"dataset {name!r} has no split {split!r}; its splits are {splits}")

    def read(part: str) -> Dataset:
        path = files.files["train" if files.fractions else part]
        ds = _guarded(name, part, lambda: _read_file(path, files.format, part))
        return _select_columns(ds, name, *columns, label_required=columns[1] is not None and columns[1] != "label")

    if files.fractions:
        whole = read("train")
        labels = np.asarray(whole["label"]) if "label" in whole.column_names else np.zeros(len(whole), int)
        parts = {k: whole.select(v) for k, v in stratified_fractions(labels, files.fractions, seed=0).items()}
    else:
        parts = {k: read(k) for k in splits} if dedupe else {split: read(split)}
    ds = parts[split]
    if dedupe and len(parts) > 1:
        ahead = [k for k in dict.fromkeys((*SPLIT_PRIORITY, *splits)) if k in parts]
        ahead = ahead[:ahead.index(split)]
        if ahead:
            keep = drop_seen(ds["text"], [t for k in ahead for t in parts[k]["text"]])
            if len(keep) < len(ds):
                print(f"{name}:{split}: dropped {len(ds) - len(keep)} text(s) that also appear in "
                      f"{'/'.join(ahead)} (dedupe false keeps them)", file=sys.stderr)
                ds = ds.select(keep)
    return ds


def load_texts(
    name_or_path: str,
    split: str = "train",
    text_column: str | None = None,
    label_column: str | None = "label",
    limit: int | None = None,
    dedupe: bool = True,
    labels_optional: bool = False,
) -> Dataset:
    """Load a dataset as columns `text` (+ `label` as ClassLabel when it has labels).

    The default names defer to a registry entry's own: `text_column` None (or "text") is the entry's
    text column, else "text"; `label_column` "label" is the entry's label column, else a `label`
    column when the file has one. Any other name must exist (a one-line error lists the file's
    columns), unless `labels_optional`: then a file or hub dataset without that label column loads
    its texts only, as one without a `label` column does. `label_column` None loads a file's texts
    only. Built-in registry datasets have a single split, "train", carved into stratified
    train/val/test by the DataModules. A user's registry entry with several splits drops, with
    `dedupe`, the texts of a split that also appear in a split ahead of it (test, then val, then the
    rest), and prints the count.

    `limit` keeps N rows drawn at random with a fixed seed, in file order: many files are sorted
    by label (BBC's folders, VADER's scores), so the first N rows would hold a few classes only.
    """
    asset = get_asset(name_or_path, "dataset") if is_registered(name_or_path, "dataset") else None
    if asset is not None and asset.reader is not None:
        if split != "train":
            raise AssetError(f"registry dataset {name_or_path!r} has one split, 'train' (got {split!r}); "
                             "xsilo's DataModules make stratified train/val/test splits from it")
        if not is_prepared(name_or_path):
            prepare([name_or_path])
        ds = READERS[asset.reader](package_file(asset, asset.file))
    elif asset is not None:
        if asset.packages and not is_prepared(name_or_path):
            prepare([name_or_path])
        ds = _load_files(name_or_path, split, text_column, label_column, dedupe)
    else:
        ds = _guarded(name_or_path, split, lambda: _load_generic(name_or_path, split))
        ds = _select_columns(ds, name_or_path, text_column or "text", label_column,
                             label_required=label_column not in (None, "label") and not labels_optional)
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
    """Content hash of the texts (and labels): the same rows give the same key anywhere
    (`serve.formats.digests.texts_fingerprint`)."""
    if "label" in ds.column_names:
        return texts_fingerprint(ds["text"], labels=list(ds["label"]), label_names=label_names(ds))
    return texts_fingerprint(ds["text"])

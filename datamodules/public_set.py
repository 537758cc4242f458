"""The shared public alignment set: composed from unlabelled sources, never holding a task's held-out texts.

`build_public_set` draws rows from several sources (registry datasets with their labels dropped,
`movie-dialog`, local files, hub ids) in a given domain mix and size, deduplicates them, and drops
every text of every listed task's validation and test split (the seeded stratified split that
`LabelledStatesDataModule` makes, recomputed here from the task's labels, read with the task's own columns). A file
source is labelled, so a task too, when it has the label column named (`label_column`). Texts are compared after
normalisation (Unicode NFKC, case folding, whitespace collapsed), so a duplicate or whitespace
variant of a held-out text is dropped too. It writes `<name>.jsonl` (`text` and `source` columns)
and `manifest.json` (sources, counts, exclusions, content fingerprint) atomically under
`$XSILO_HOME/public/<name>/`; the `.jsonl` path is a dataset like any other (`load_texts`,
`PairedStatesDataModule(data=...)`), cached by its content.

The tasks' split is the one split spec's (`serve.formats.splits.SPLIT`), the comparison key `datamodules.dedupe`'s.
Beside this module: `datamodules.prefill` fills a public set's state cache from rows already cached for the same
texts, and `datamodules.recipes` holds the study's regimes (in-domain and leave-task-out sets).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Collection, Mapping, Sequence

import numpy as np

from datamodules.registry import AssetError, is_registered, xsilo_home
from datamodules.cache import atomic_write_bytes, atomic_write_json
from datamodules.dedupe import NORMALIZATION, normalize_text
from datamodules.text import dataset_fingerprint, load_texts
from serve.formats.splits import SPLIT, stratified_split

FORMAT_VERSION = 1


class PublicSetError(AssetError):  # an AssetError: the CLI prints it as a user error
    """A public set cannot be built as asked (unknown source, bad mix, a task without labels, too few rows)."""


# --- mixes and task splits -------------------------------------------------------------------

_OLD_MIX = re.compile(r"[^,+:]+(:\d+)?(\+[^,+:]+(:\d+)?)+")


def parse_mix(mix: str | Mapping[str, float] | None) -> dict[str, float]:
    """`"movie-dialog:0.5,bbc:0.3,vader-movies:0.2"` (or a mapping) → weights summing to 1.

    The one mix syntax: `public-set build --mix`, its YAML and `evaluate_generation --public` read it.
    """
    if mix is None or mix == "":
        return {}
    if isinstance(mix, str) and _OLD_MIX.fullmatch(mix) and not Path(mix).expanduser().exists():
        parts = [p.rpartition(":") for p in mix.split("+")]
        total = sum(int(n) for _, _, n in parts) if all(name for name, _, _ in parts) else None
        raise PublicSetError(f"mix {mix!r} uses the old 'a:N+b:M' form; write weights separated by commas, "
                             f"{mix.replace('+', ',')!r}" + (f", with {total} rows in all (--size, or --public.limit)"
                                                               if total else ""))
    if isinstance(mix, str):
        weights: dict[str, float] = {}
        for part in (p.strip() for p in mix.split(",")):
            if not part:
                continue
            name, sep, weight = part.rpartition(":")
            try:
                value = float(weight) if sep and name else 1.0
            except ValueError:  # a ':' inside a name (a path), no weight
                name, value = part, 1.0
            if not (sep and name):
                name = part
            if name in weights:
                raise PublicSetError(f"mix names {name!r} twice: {mix!r}")
            weights[name] = value
    else:
        weights = {str(k): float(v) for k, v in mix.items()}
    if any(not np.isfinite(w) or w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise PublicSetError(f"mix weights must be non-negative with a positive sum, got {weights}")
    total = sum(weights.values())
    return {k: v / total for k, v in weights.items()}


def mix_rows(weights: Mapping[str, float], size: int) -> dict[str, int]:
    """Rows per source for `size` rows in all: round(size·weight), by largest remainders (sums to `size`)."""
    return _allocate(dict(weights), {k: size for k in weights}, size)


def parse_task(spec: str) -> tuple[str, int | None]:
    """`"vader-movies@3000"` → ("vader-movies", 3000): a task and the row limit it is evaluated with."""
    name, sep, limit = spec.rpartition("@")
    if sep and name and limit.isdigit():
        return name, int(limit)
    return spec, None


@dataclass
class TaskSplit:
    """One task's held-out texts: its validation and test split as LabelledStatesDataModule makes it."""

    task: str
    limit: int | None
    val_fraction: float
    test_fraction: float
    seed: int
    rows: int = 0
    val_rows: int = 0
    test_rows: int = 0
    text_column: str = "text"    # the columns it was read with (a file task's own, as the DataModules read it)
    label_column: str = "label"
    keys: set[str] = field(default_factory=set, repr=False)

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("keys")
        d["held_out_texts"] = len(self.keys)
        return d


def task_heldout(task: str, limit: int | None = None, val_fraction: float = SPLIT.val_fraction,
                 test_fraction: float = SPLIT.test_fraction, seed: int = SPLIT.seed, text_column: str | None = "text",
                 label_column: str = "label") -> TaskSplit:
    """The normalised texts of a task's validation and test split (stratified, seeded, as in
    `LabelledStatesDataModule` with the same limit, fractions, seed and columns)."""
    ds = load_texts(task, "train", text_column, label_column, limit)
    if "label" not in ds.column_names:
        raise PublicSetError(f"task {task!r} has no label column {label_column!r}, and its held-out texts are those of "
                             "its stratified split, which needs its labels: name the column that holds them "
                             "(--label_column in `public-set build`, --extraction.label_column in `evaluate`)")
    _, val, test = stratified_split(np.asarray(ds["label"]), val_fraction, test_fraction, seed)
    texts = ds["text"]
    keys = {normalize_text(texts[i]) for i in np.concatenate([val, test])}
    return TaskSplit(task, limit, val_fraction, test_fraction, seed, len(ds), len(val), len(test),
                     text_column=text_column or "text", label_column=label_column, keys=keys)


# --- the builder ------------------------------------------------------------------------------

@dataclass
class _Source:
    name: str
    texts: list[str]            # eligible texts in file order (deduplicated, not excluded)
    rows_read: int = 0
    empty: int = 0
    duplicates: int = 0         # within this source or already taken by an earlier source
    excluded: int = 0           # held-out texts of a task, or texts of an excluded dataset
    had_labels: bool = False


def _allocate(weights: dict[str, float], available: dict[str, int], size: int) -> dict[str, int]:
    """Rows per source: round(size·w) (largest remainders), capped by what a source has; a capped
    source's shortfall goes to the others in proportion to their weights."""
    quota = {k: 0 for k in weights}
    open_ = {k for k, w in weights.items() if w > 0 and available[k] > 0}
    remaining = size
    while remaining > 0 and open_:
        total = sum(weights[k] for k in open_)
        exact = {k: remaining * weights[k] / total for k in open_}
        share = {k: int(np.floor(v)) for k, v in exact.items()}
        order = sorted(open_, key=lambda k: (-(exact[k] - share[k]), list(weights).index(k)))
        for k in order[:remaining - sum(share.values())]:
            share[k] += 1
        capped = {k for k in open_ if quota[k] + share[k] >= available[k]}
        if not capped:
            for k in open_:
                quota[k] += share[k]
            break
        for k in capped:  # fill capped sources completely, then share the rest again
            remaining -= available[k] - quota[k]
            quota[k] = available[k]
        open_ -= capped
    return quota


def public_set_dir(out: str | Path | None, fingerprint: str) -> tuple[Path, str]:
    if out is None:
        name = f"public-{fingerprint[:12]}"
        return xsilo_home() / "public" / name, name
    text = str(out)
    if os.sep in text or "/" in text or text.startswith((".", "~")):
        path = Path(text).expanduser()
        return path, path.name
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", text):
        raise PublicSetError(f"public set name {text!r}: use letters, digits, '.', '_' and '-' (or pass a folder path)")
    return xsilo_home() / "public" / text, text


def build_public_set(
    sources: Sequence[str] = (),
    size: int | None = None,
    mix: str | Mapping[str, float] | None = None,
    exclude_tasks: Sequence[str] | None = None,
    out: str | Path | None = None,
    *,
    exclude_datasets: Sequence[str] = (),
    exclude_source_tasks: bool = True,
    val_fraction: float = SPLIT.val_fraction,
    test_fraction: float = SPLIT.test_fraction,
    split_seed: int = SPLIT.seed,
    seed: int = 0,
    text_column: str | None = "text",
    label_column: str = "label",
    task_columns: tuple[str | None, str] | None = None,
    prefer: Collection[str] | None = None,
    strict: bool = False,
) -> Path:
    """Compose the public set and write it; returns the `.jsonl` path (a dataset for `load_texts`).

    Args:
        sources: datasets to draw from (registry names, local .csv/.jsonl/.txt files, hub ids); labels
            are dropped. Names in `mix` are added when missing here.
        size: rows in the set; None takes every eligible row (with a mix: the largest set that meets it).
        mix: domain weights, e.g. "movie-dialog:0.5,bbc:0.3,vader-movies:0.2"; default: in proportion to
            each source's eligible rows (a uniform sample of their union). A source with too few rows gives
            all it has and the others make up the difference (see the manifest), unless `strict`.
        exclude_tasks: tasks whose validation and test texts are removed from every source, as
            "name" or "name@limit" (the row limit the task is evaluated with). None: the labelled sources.
        out: a name (written under $XSILO_HOME/public/NAME/) or a folder path; default public-<fingerprint>.
        exclude_datasets: datasets whose every text is removed ("name" or "name@limit"), e.g. OOD test sets.
        exclude_source_tasks: also treat every labelled source as a task to exclude (its default split).
        val_fraction: the tasks' validation fraction (default the one split spec's, as LabelledStatesDataModule's).
        test_fraction: the tasks' test fraction (default the split spec's).
        split_seed: the tasks' split seed (default the split spec's).
        seed: sampling seed.
        text_column: text column of file and hub sources.
        label_column: label column of file and hub sources: a source that has it is labelled, so it is also a task
            whose validation and test texts are removed (with `exclude_source_tasks`).
        task_columns: the (text, label) columns `exclude_tasks` and `exclude_datasets` are read with, as the
            DataModules read the task (e.g. a user's CSV task beside registry sources); default the sources'.
        prefer: texts to draw first within each source (e.g. those with cached states); the rest follow in
            seeded random order.
        strict: raise instead of redistributing when the size or the mix cannot be met.
    """
    weights = parse_mix(mix)
    names = list(dict.fromkeys([*sources, *weights]))
    if not names:
        raise PublicSetError("pass at least one source (sources or mix)")
    if weights and set(names) - set(weights):
        raise PublicSetError(f"sources {sorted(set(names) - set(weights))} have no weight in mix {mix!r}; "
                             "give every source a weight (or pass no mix)")
    if size is not None and size <= 0:
        raise PublicSetError(f"size must be a positive number of rows, got {size}")

    # A file or hub source is labelled when it has `label_column`; a registry source keeps its own labels.
    own = {n: (text_column, "label" if is_registered(n, "dataset") else label_column) for n in names}
    loaded = {}
    for name in names:
        try:
            loaded[name] = load_texts(name, "train", *own[name], labels_optional=True)
        except AssetError as e:
            raise PublicSetError(f"cannot read public source {name!r}: {e}") from None
    task_columns = task_columns or (text_column, label_column)
    columns = {spec: task_columns for spec in (exclude_tasks or ())}  # a listed task: the task's columns
    if exclude_source_tasks or exclude_tasks is None:
        listed = {parse_task(t)[0] for t in columns}
        columns |= {n: own[n] for n in names if "label" in loaded[n].column_names and n not in listed}
    files = [n for n in names if not is_registered(n, "dataset")]
    if (label_column not in (None, "label") and not any("label" in loaded[n].column_names for n in files)
            and not (exclude_tasks and task_columns[1] == label_column)):
        raise PublicSetError(f"no source or task has the label column {label_column!r} (file sources: {files}); "
                             "name a column that holds a source's or task's labels, or drop label_column")
    splits = []
    for spec, (task_text, task_label) in columns.items():
        task, limit = parse_task(spec)
        try:
            splits.append(task_heldout(task, limit, val_fraction, test_fraction, split_seed, task_text, task_label))
        except PublicSetError:
            raise
        except AssetError as e:
            raise PublicSetError(f"cannot read task {task!r} to exclude its held-out texts: {e}") from None
    held_out = set().union(*(s.keys for s in splits)) if splits else set()
    dropped: dict[str, int] = {}
    excluded_texts: set[str] = set()
    for spec in exclude_datasets:
        name, limit = parse_task(spec)
        try:
            keys = {normalize_text(t) for t in load_texts(name, "train", task_columns[0], None, limit)["text"]}
        except AssetError as e:
            raise PublicSetError(f"cannot read excluded dataset {name!r}: {e}") from None
        dropped[spec] = len(keys)
        excluded_texts |= keys
    forbidden = held_out | excluded_texts

    seen: set[str] = set()
    pool: dict[str, _Source] = {}
    for name in names:
        ds = loaded[name]
        src = _Source(name, [], rows_read=len(ds), had_labels="label" in ds.column_names)
        for text in ds["text"]:
            text = text.strip() if isinstance(text, str) else ""
            key = normalize_text(text)
            if not key:
                src.empty += 1
            elif key in forbidden:
                src.excluded += 1
            elif key in seen:
                src.duplicates += 1
            else:
                seen.add(key)
                src.texts.append(text)
        pool[name] = src

    available = {n: len(s.texts) for n, s in pool.items()}
    w = weights or {n: available[n] / max(sum(available.values()), 1) for n in names}
    if size is None:
        positive = [n for n in names if w[n] > 0]
        size = (min(int(np.floor(available[n] / w[n] + 1e-9)) for n in positive) if weights
                else sum(available.values()))
    quota = _allocate(w, available, size)
    short = {n: round(size * w[n]) - quota[n] for n in names if round(size * w[n]) > quota[n]}
    if strict and (sum(quota.values()) < size or short):
        raise PublicSetError(f"cannot meet size {size} with mix {w}: eligible rows per source {available}")
    if sum(quota.values()) == 0:
        raise PublicSetError(f"no eligible rows in {names} after deduplication and exclusions")

    rng = np.random.default_rng(seed)
    preferred = set(prefer) if prefer is not None else None
    rows: list[tuple[str, str]] = []
    for i, name in enumerate(names):
        texts = pool[name].texts
        order = np.random.default_rng([seed, i]).permutation(len(texts))
        if preferred is not None:
            order = np.concatenate([order[[texts[j] in preferred for j in order]],
                                    order[[texts[j] not in preferred for j in order]]]).astype(int)
        rows += [(texts[j], name) for j in sorted(order[:quota[name]])]
    rows = [rows[j] for j in rng.permutation(len(rows))]

    texts = [t for t, _ in rows]
    from datasets import Dataset

    fingerprint = dataset_fingerprint(Dataset.from_dict({"text": texts}))
    directory, name = public_set_dir(out, fingerprint)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.jsonl"
    body = "".join(json.dumps({"text": t, "source": s}, ensure_ascii=False) + "\n" for t, s in rows).encode()
    if not (path.is_file() and hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(body).digest()):
        atomic_write_bytes(path, body)
    counts = {n: sum(1 for _, s in rows if s == n) for n in names}
    atomic_write_json(directory / "manifest.json", {
        "format": FORMAT_VERSION,
        "name": name,
        "file": path.name,
        "rows": len(rows),
        "fingerprint": fingerprint,
        "sha256": hashlib.sha256(body).hexdigest(),
        "size_requested": size,
        "mix_requested": weights or None,
        "mix_actual": {n: counts[n] / max(len(rows), 1) for n in names},
        "shortfall": short,
        "seed": seed,
        "normalization": NORMALIZATION,
        "sources": [{"name": n, "rows_read": s.rows_read, "labels_dropped": s.had_labels, "empty": s.empty,
                     "duplicates": s.duplicates, "excluded": s.excluded, "eligible": available[n],
                     "selected": counts[n], "preferred_selected": (sum(1 for t, src in rows if src == n and t in preferred)
                                                                   if preferred is not None else None)}
                    for n, s in pool.items()],
        "excluded": {"tasks": [s.summary() for s in splits], "datasets": dropped,
                     "rows_total": sum(s.excluded for s in pool.values())},
    })
    return path


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a built public set, from its `.jsonl` path or its folder."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    return json.loads((folder / "manifest.json").read_text())

"""The shared public alignment set: composed from unlabelled sources, never holding a task's held-out texts.

`build_public_set` draws rows from several sources (registry datasets with their labels dropped,
`movie-dialog`, local files, hub ids) in a given domain mix and size, deduplicates them, and drops
every text of every listed task's validation and test split (the seeded stratified split that
`LabelledStatesDataModule` makes, recomputed here from the task's labels). Texts are compared after
normalisation (Unicode NFKC, case folding, whitespace collapsed), so a duplicate or whitespace
variant of a held-out text is dropped too. It writes `<name>.jsonl` (`text` and `source` columns)
and `manifest.json` (sources, counts, exclusions, content fingerprint) atomically under
`$XSILO_HOME/public/<name>/`; the `.jsonl` path is a dataset like any other (`load_texts`,
`PairedStatesDataModule(data=...)`), cached by its content.

`prefill_states` fills the state cache of a dataset from rows already cached for the same texts
(same model weights, pooling, layer, max_length and dtype), running the model only on texts that
no cache holds: a public set composed of cached datasets costs no forward pass.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import unicodedata
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Collection, Mapping, Sequence

import numpy as np

from datamodules.assets import AssetError, is_registered, xsilo_home
from datamodules.cache import (MANIFEST, CacheError, StateCache, atomic_save_npy, atomic_write_bytes,
                               atomic_write_json, ensure_writable, shard_name, states_root)
from datamodules.states import stratified_split
from datamodules.text import dataset_fingerprint, load_texts

FORMAT_VERSION = 1
NORMALIZATION = "NFKC, casefold, whitespace collapsed, stripped"


class PublicSetError(AssetError):  # an AssetError: the CLI prints it as a user error
    """A public set cannot be built as asked (unknown source, bad mix, a task without labels, too few rows)."""


class ExtractionBudgetError(PublicSetError):
    """Filling a cache would need more new forward passes than allowed."""

    def __init__(self, message: str, missing: int):
        super().__init__(message)
        self.missing = missing


# --- texts, mixes and task splits -----------------------------------------------------------

_SPACE = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """The comparison key of a text: NFKC, case folded, runs of whitespace made one space, stripped."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


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
    keys: set[str] = field(default_factory=set, repr=False)

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("keys")
        d["held_out_texts"] = len(self.keys)
        return d


def task_heldout(task: str, limit: int | None = None, val_fraction: float = 0.15, test_fraction: float = 0.15,
                 seed: int = 0, text_column: str = "text", label_column: str = "label") -> TaskSplit:
    """The normalised texts of a task's validation and test split (stratified, seeded, as in
    `LabelledStatesDataModule` with the same limit, fractions and seed)."""
    ds = load_texts(task, "train", text_column, label_column, limit)
    if "label" not in ds.column_names:
        raise PublicSetError(f"task {task!r} has no labels, so it has no stratified split to exclude; "
                             "list it as a dataset to exclude entirely (exclude_datasets) instead")
    _, val, test = stratified_split(np.asarray(ds["label"]), val_fraction, test_fraction, seed)
    texts = ds["text"]
    keys = {normalize_text(texts[i]) for i in np.concatenate([val, test])}
    return TaskSplit(task, limit, val_fraction, test_fraction, seed, len(ds), len(val), len(test), keys)


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


def _public_dir(out: str | Path | None, fingerprint: str) -> tuple[Path, str]:
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
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    split_seed: int = 0,
    seed: int = 0,
    text_column: str = "text",
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
        val_fraction: the tasks' validation fraction (LabelledStatesDataModule's default 0.15).
        test_fraction: the tasks' test fraction (default 0.15).
        split_seed: the tasks' split seed (default 0).
        seed: sampling seed.
        text_column: text column of file and hub sources.
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

    loaded = {}
    for name in names:
        try:
            loaded[name] = load_texts(name, "train", text_column, "label")
        except AssetError as e:
            raise PublicSetError(f"cannot read public source {name!r}: {e}") from None
    task_specs = list(exclude_tasks) if exclude_tasks is not None else []
    if exclude_source_tasks or exclude_tasks is None:
        listed = {parse_task(t)[0] for t in task_specs}
        task_specs += [n for n in names if "label" in loaded[n].column_names and n not in listed]
    splits = []
    for spec in dict.fromkeys(task_specs):
        task, limit = parse_task(spec)
        try:
            splits.append(task_heldout(task, limit, val_fraction, test_fraction, split_seed, text_column))
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
            keys = {normalize_text(t) for t in load_texts(name, "train", text_column, None, limit)["text"]}
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
    directory, name = _public_dir(out, fingerprint)
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


# --- filling state caches from cached rows of the same texts -------------------------------------

@dataclass
class PrefillResult:
    path: Path
    hit: bool
    reused: int
    extracted: int


@lru_cache(maxsize=256)
def _texts_of(data: str, split: str, limit: int | None, fingerprint: str) -> tuple[str, ...] | None:
    """The texts a finished cache holds, if its dataset still loads to the same content."""
    for label_column in ("label", None):
        try:
            ds = load_texts(data, split, "text", label_column, limit)
        except Exception:  # noqa: BLE001 - a cache whose dataset is gone or unreadable is skipped
            return None
        if dataset_fingerprint(ds) == fingerprint:
            return tuple(ds["text"])
    return None


def cached_text_index(key: dict[str, Any], root: Path | None = None, skip: Path | None = None
                      ) -> dict[str, tuple[Path, int]]:
    """text → (cache folder, row) over every finished cache whose states are interchangeable with `key`'s
    (same model identity, pooling, layer, max_length and dtype)."""
    same = ("model_identity", "pooling", "layer", "max_length", "dtype")
    index: dict[str, tuple[Path, int]] = {}
    root = Path(root or states_root())
    if not root.is_dir():
        return index
    for folder in sorted(root.iterdir()):
        if skip is not None and folder.resolve() == skip.resolve():
            continue
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
        except (OSError, ValueError):
            continue
        k = manifest.get("key", {})
        if not manifest.get("complete") or any(k.get(f) != key[f] for f in same):
            continue
        texts = _texts_of(manifest["data"], manifest["split"], manifest.get("limit"), k["dataset_fingerprint"])
        if texts is None or len(texts) != manifest["n_rows"]:
            continue
        for row, text in enumerate(texts):
            index.setdefault(text, (folder, row))
    return index


def cached_texts(models: Sequence[str], pooling: str | None = None, layer: int = -1, max_length: int | None = None,
                 dtype: str = "float32", cache_root: str | Path | None = None) -> set[str]:
    """Texts whose states are cached for every one of `models` (same pooling, layer, length, dtype): pass
    them as `prefer` to build a public set that needs no new forward pass where it can. Pooling and
    max_length default to each model's own, as extraction resolves them."""
    from transformers import AutoConfig

    from datamodules.assets import resolve_model
    from datamodules.extraction import model_defaults, model_identity

    found: set[str] | None = None
    for model in models:
        path = resolve_model(model)
        defaults = model_defaults(path, AutoConfig.from_pretrained(path))
        key = {"model_identity": model_identity(path), "pooling": pooling or defaults.pooling,
               "layer": layer, "max_length": max_length or defaults.max_length, "dtype": dtype}
        texts = set(cached_text_index(key, Path(cache_root) if cache_root else None))
        found = texts if found is None else found & texts
    return found or set()


def prefill_states(config, cache_root: str | Path | None = None, max_extract: int | None = None,
                   threads: int | None = None, accelerator: str = "cpu", devices: int | str = 1) -> PrefillResult:
    """Make the cache for `config` (an ExtractionConfig) from cached rows of the same texts.

    Texts no cache holds are extracted first (their own cache, under $XSILO_HOME/public/_extra/), unless
    there are more than `max_extract` of them: then ExtractionBudgetError, and nothing is written.
    The result is an ordinary cache: `extract(config)` and the DataModules find it as a hit. `accelerator`,
    `devices` and `threads` are `extract`'s, for those texts.
    """
    from datamodules.extraction import ExtractionConfig, cache_hit, extract, finalise, resolve, shard_ranges

    job = resolve(config, cache_root)
    if cache_hit(job.directory):
        return PrefillResult(job.directory, True, 0, 0)
    key = asdict(job.key)
    index = cached_text_index(key, Path(cache_root) if cache_root else None, skip=job.directory)
    missing = list(dict.fromkeys(t for t in job.texts if t not in index))
    if missing:
        if max_extract is not None and len(missing) > max_extract:
            raise ExtractionBudgetError(
                f"{len(missing)} texts of {config.data!r} have no cached {config.model} states; "
                f"at most {max_extract} may be extracted", len(missing))
        extra_dir = xsilo_home() / "public" / "_extra"
        extra_dir.mkdir(parents=True, exist_ok=True)
        body = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in missing).encode()
        extra = extra_dir / f"{hashlib.sha256(body).hexdigest()[:16]}.jsonl"
        if not extra.is_file():
            atomic_write_bytes(extra, body)
        extra_cfg = ExtractionConfig(model=config.model, data=str(extra), pooling=job.pooling, layer=config.layer,
                                     max_length=job.max_length, dtype=config.dtype, batch_size=config.batch_size,
                                     label_column=None)
        result = extract(extra_cfg, cache_root=cache_root, accelerator=accelerator, devices=devices, threads=threads)
        for row, text in enumerate(missing):
            index[text] = (result.path, row)
    ensure_writable(job.directory)
    stale = job.directory / MANIFEST
    if stale.exists():
        stale.unlink()
    caches: dict[Path, StateCache] = {}
    where = [index[t] for t in job.texts]
    shards = shard_ranges(len(job.texts), 2048)
    for i, (start, stop) in enumerate(shards):
        block = np.empty((stop - start, job.hidden_size), np.float32)
        part = where[start:stop]
        for folder in dict.fromkeys(f for f, _ in part):
            cache = caches.setdefault(folder, StateCache(folder))
            if cache.dim != job.hidden_size:
                raise CacheError(f"{folder} holds {cache.dim}-d states, expected {job.hidden_size}")
            sel = [j for j, (f, _) in enumerate(part) if f == folder]
            block[sel] = cache.rows(np.array([part[j][1] for j in sel]))
        atomic_save_npy(job.directory / shard_name(i), block)
    atomic_write_json(job.directory / "assembled.json",
                      {"from": sorted(str(f) for f in caches), "extracted": len(missing)})
    finalise(job, shards)
    return PrefillResult(job.directory, False, len(job.texts) - len(missing), len(missing))


# --- the study's regimes: in-domain and leave-task-out public sets ---------------------------------

DIALOG = "movie-dialog"


def registry_sources() -> list[str]:
    """Every registered dataset, `movie-dialog` first: the unlabelled sources a leave-task-out set draws from."""
    from datamodules.assets import load_registry

    names = [a.name for a in load_registry().values() if a.kind == "dataset"]
    return ([DIALOG] if DIALOG in names else []) + [n for n in names if n != DIALOG]


def leave_task_out_sources(task: str, leave_out: Sequence[str] = (), sources: Sequence[str] | None = None) -> list[str]:
    """A leave-task-out set's sources: `sources` (default every registry dataset) but the task and `leave_out`
    (e.g. OOD sets), in order."""
    pool = [s for s in dict.fromkeys(registry_sources() if sources is None else sources)
            if s != task and s not in leave_out]
    if not pool:
        raise PublicSetError(f"no source is left once {task!r} and {list(leave_out)} are left out; pass other sources")
    return pool


def task_specs(tasks: Sequence[str], limit: int | None) -> list[str]:
    """`exclude_tasks` entries of tasks evaluated with `limit` rows: NAME@LIMIT (NAME when no limit)."""
    return [t if limit is None else f"{t}@{limit}" for t in tasks]


@dataclass(frozen=True)
class PublicRecipe:
    """The arguments of one `build_public_set` call (a regime's public set), with the name it is written under."""

    name: str
    sources: tuple[str, ...]
    mix: str | None
    size: int | None
    exclude_tasks: tuple[str, ...]
    exclude_datasets: tuple[str, ...] = ()

    def build(self, prefer: Collection[str] | None = None, seed: int = 0) -> Path:
        """The set's `.jsonl`: the one already built under this name with these arguments, else a new build."""
        return self.built(seed) or build_public_set(
            self.sources, size=self.size, mix=self.mix, exclude_tasks=list(self.exclude_tasks), out=self.name,
            exclude_datasets=self.exclude_datasets, prefer=prefer, seed=seed)

    def built(self, seed: int = 0) -> Path | None:
        """The `.jsonl` of a set of this name whose manifest records these arguments, if there is one."""
        directory, name = _public_dir(self.name, "")
        path = directory / f"{name}.jsonl"
        try:
            m = read_manifest(path)
        except (OSError, ValueError):
            return None
        weights = parse_mix(self.mix)
        tasks = {(t["task"], t["limit"]) for t in m.get("excluded", {}).get("tasks", [])}
        same = ([s["name"] for s in m.get("sources", [])] == list(self.sources) and m.get("seed") == seed
                and (self.size is None or m.get("size_requested") == self.size)
                and set(m.get("mix_requested") or {}) == set(weights)
                and all(abs(m["mix_requested"][k] - w) < 1e-9 for k, w in weights.items())
                and {parse_task(t) for t in self.exclude_tasks} <= tasks
                and set(m.get("excluded", {}).get("datasets", {})) == set(self.exclude_datasets))
        return path if same and path.is_file() and m.get("file") == path.name else None


def in_domain_recipe(task: str, exclude_tasks: Sequence[str], size: int = 2000, base: str = DIALOG,
                     name: str | None = None) -> PublicRecipe:
    """Half `base` (movie dialog), half the task's own training texts (paper Table 1's regime)."""
    return PublicRecipe(name or f"study-in-domain-{_name_part(task)}", (base, task), f"{base}:0.5,{task}:0.5", size,
                        tuple(exclude_tasks))


def leave_task_out_recipe(task: str, exclude_tasks: Sequence[str], size: int | None = 3500,
                          sources: Sequence[str] | None = None, name: str | None = None) -> PublicRecipe:
    """Every unlabelled source but the task (`sources`, default every registry dataset) in equal weights, with
    every text of the task removed (paper Table 2's regime: the task's domain is unknown). `size` None: every
    eligible row of every source (no mix)."""
    pool = leave_task_out_sources(task, sources=sources)
    mix = None if size is None else ",".join(f"{s}:1" for s in pool)
    return PublicRecipe(name or f"study-leave-out-{_name_part(task)}", tuple(pool), mix, size, tuple(exclude_tasks),
                        (task,))


def _name_part(task: str) -> str:
    """A task name (or a file's stem) as part of a public set's name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(task).stem if ("/" in task or os.sep in task) else task).strip("-.")

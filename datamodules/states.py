"""LightningDataModules over cached hidden states.

Both DataModules resolve their cache key at construction, so their dimensions (and label
names) are known before `setup()` and LightningCLI can link them into models: from the
cache manifest when the cache exists, otherwise from the model config and the dataset.
`prepare_data()` extracts whatever is missing; `setup()` only reads memory-mapped shards.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from datamodules.cache import CacheError, StateCache
from datamodules.extraction import ExtractionConfig, ResolvedExtraction, cache_hit, extract, resolve
from datamodules.dedupe import drop_seen
from serve.formats.splits import SPLIT, public_split, stratified_split


DUPLICATES_REPORTED: set[tuple[str, str]] = set()


class CachedRows(Dataset):
    """Rows of one or more aligned caches; fetches whole batches at once (`__getitems__`)."""

    def __init__(self, caches: list[StateCache], index: np.ndarray, labels: np.ndarray | None = None):
        self.caches, self.index, self.labels = caches, np.asarray(index), labels

    def __len__(self) -> int:
        return len(self.index)

    def __getitems__(self, positions: list[int]) -> list[torch.Tensor]:
        rows = self.index[positions]
        out = [torch.from_numpy(c.rows(rows)) for c in self.caches]
        if self.labels is not None:
            out.append(torch.from_numpy(self.labels[rows]))
        return out

    def __getitem__(self, position: int | list[int]) -> list[torch.Tensor]:
        if isinstance(position, (list, np.ndarray)):
            return self.__getitems__(list(position))
        return [t[0] for t in self.__getitems__([position])]


def _batch_collate(batch):
    return tuple(batch)  # __getitems__ already returns stacked tensors


class EvenShardBatches(DistributedSampler):
    """Yields whole batches of row positions for this rank: no row repeated or dropped, and
    every rank gets the same number of batches.

    Lightning's default DistributedSampler pads ranks with repeated rows, which would double
    count them in sufficient statistics; uneven batch counts would hang gradient sync. Being a
    DistributedSampler, Lightning leaves it in place.
    """

    def __init__(self, n_rows: int, batch_size: int, shuffle: bool, seed: int = 0):
        dist = torch.distributed
        ready = dist.is_available() and dist.is_initialized()
        self.num_replicas = dist.get_world_size() if ready else 1
        self.rank = dist.get_rank() if ready else 0
        self.n_rows, self.batch_size, self.shuffle, self.seed, self.epoch = n_rows, batch_size, shuffle, seed, 0
        if n_rows < self.num_replicas:
            raise ValueError(f"{n_rows} rows cannot be shared by {self.num_replicas} processes")
        largest = -(-n_rows // self.num_replicas)
        self.n_batches = -(-largest // batch_size)

    def __iter__(self):
        order = (np.random.default_rng(self.seed + self.epoch).permutation(self.n_rows) if self.shuffle
                 else np.arange(self.n_rows))
        mine = np.array_split(order, self.num_replicas)[self.rank]
        return iter([b.tolist() for b in np.array_split(mine, self.n_batches)])

    def __len__(self) -> int:
        return self.n_batches


def drop_split_duplicates(texts: list[str], split_index: dict[str, np.ndarray]
                          ) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Drop from each split the rows whose text (normalised) is also in a split ahead of it.

    Test keeps its rows, val loses those also in test, train those in val or test: the evaluation
    rows stay exactly those of the seeded split, and nothing the model is scored on was trained on.
    Returns the new index and the number dropped per split.
    """
    order = [k for k in ("test", "val", "train") if k in split_index]
    out, dropped, seen = dict(split_index), {}, []
    for name in order:
        idx = np.asarray(split_index[name])
        keep = idx[drop_seen([texts[i] for i in idx], seen)] if seen else idx
        out[name], dropped[name] = keep, len(idx) - len(keep)
        seen += [texts[i] for i in idx]
    return out, dropped


random_split = public_split  # the one split of public rows, shared with the provider's server (serve/README.md)


class _StatesDataModule(L.LightningDataModule):
    def __init__(self, batch_size: int, num_workers: int, extract_batch_size: int,
                 cache_dir: str | None):
        super().__init__()
        self.batch_size, self.num_workers = batch_size, num_workers
        self.extract_batch_size, self.cache_dir = extract_batch_size, cache_dir
        self.splits: dict[str, CachedRows] = {}

    def _ensure(self, job: ResolvedExtraction) -> None:
        if not cache_hit(job.directory):
            extract(job.config, cache_root=self.cache_dir)

    def _open(self, job: ResolvedExtraction) -> StateCache:
        try:
            return StateCache(job.directory)
        except CacheError as e:
            raise CacheError(f"{e} (call prepare_data() first, or `xsilo extract`)") from e

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.splits:
            raise RuntimeError(f"the {split!r} split is empty or setup() has not run")
        rows = self.splits[split]
        return DataLoader(rows, sampler=EvenShardBatches(len(rows), self.batch_size, shuffle, self.seed),
                          batch_size=None, num_workers=self.num_workers, collate_fn=_batch_collate)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


class PairedStatesDataModule(_StatesDataModule):
    """Batches `(h_source, h_target)` of the same public texts, for fitting an aligner.

    Rows are split at random (seeded) into train and val; val picks the ridge λ and
    measures held-out alignment.
    """

    def __init__(
        self,
        source: str,
        target: str,
        data: str = "movie-dialog",
        split: str = "train",
        limit: int | None = 4000,
        source_pooling: str | None = None,
        target_pooling: str | None = None,
        source_layer: int = -1,
        target_layer: int = -1,
        max_length: int | None = None,
        dtype: str = "float32",
        text_column: str | None = None,
        val_fraction: float = SPLIT.public_val_fraction,
        seed: int = SPLIT.public_seed,
        batch_size: int = 1024,
        num_workers: int = 0,
        extract_batch_size: int = 16,
        cache_dir: str | None = None,
    ):
        super().__init__(batch_size, num_workers, extract_batch_size, cache_dir)
        self.save_hyperparameters()
        common = dict(data=data, split=split, limit=limit, max_length=max_length, dtype=dtype,
                      text_column=text_column, label_column=None, batch_size=extract_batch_size)
        self.source_job = resolve(ExtractionConfig(model=source, pooling=source_pooling,
                                                   layer=source_layer, **common), cache_dir)
        self.target_job = resolve(ExtractionConfig(model=target, pooling=target_pooling,
                                                   layer=target_layer, **common), cache_dir)
        self.val_fraction, self.seed = val_fraction, seed
        self.source_dim = self.source_job.hidden_size
        self.target_dim = self.target_job.hidden_size
        self.n_rows = len(self.source_job.texts)

    @property
    def input_dim(self) -> int:
        """What a model fitted on this data reads (linked into models by LightningCLI)."""
        return self.source_dim

    @property
    def output_dim(self) -> int:
        """What a model fitted on this data predicts."""
        return self.target_dim

    def prepare_data(self) -> None:
        self._ensure(self.source_job)
        self._ensure(self.target_job)

    def setup(self, stage: str | None = None) -> None:
        source, target = self._open(self.source_job), self._open(self.target_job)
        if source.n_rows != target.n_rows:
            raise CacheError(f"source cache has {source.n_rows} rows but target has {target.n_rows}")
        for cache, dim, role in ((source, self.source_dim, "source"), (target, self.target_dim, "target")):
            if cache.dim != dim:
                raise CacheError(f"{role} cache {cache.path} holds {cache.dim}-d states, expected {dim}")
        train, val = random_split(source.n_rows, self.val_fraction, self.seed)
        self.splits = {"train": CachedRows([source, target], train)}
        if len(val):
            self.splits["val"] = CachedRows([source, target], val)
            self.splits["test"] = self.splits["val"]


class LabelledStatesDataModule(_StatesDataModule):
    """Batches `(h, label)` of a labelled task, split train/val/test (stratified, seeded).

    With `dedupe` (the default), a text that lands in more than one split is kept in test, else
    val, and dropped from the others (`drop_split_duplicates`); the count is printed.

    The split depends only on the labels and the seed, so two models' caches of the same
    task share row indices: a source model's test rows are the target model's test rows.
    """

    def __init__(
        self,
        model: str,
        data: str,
        split: str = "train",
        limit: int | None = None,
        pooling: str | None = None,
        layer: int = -1,
        max_length: int | None = None,
        dtype: str = "float32",
        text_column: str | None = None,
        label_column: str | None = "label",
        dedupe: bool = True,
        val_fraction: float = SPLIT.val_fraction,
        test_fraction: float = SPLIT.test_fraction,
        seed: int = SPLIT.seed,
        batch_size: int = 256,
        num_workers: int = 0,
        extract_batch_size: int = 16,
        cache_dir: str | None = None,
    ):
        super().__init__(batch_size, num_workers, extract_batch_size, cache_dir)
        self.save_hyperparameters()
        self.job = resolve(ExtractionConfig(model=model, data=data, split=split, limit=limit,
                                            pooling=pooling, layer=layer, max_length=max_length,
                                            dtype=dtype, text_column=text_column,
                                            label_column=label_column or "label",
                                            batch_size=extract_batch_size), cache_dir)
        if self.job.labels is None:
            raise CacheError(f"dataset {data!r} has no label column {label_column!r}; pass label_column")
        self.val_fraction, self.test_fraction, self.seed = val_fraction, test_fraction, seed
        self.dim = self.job.hidden_size
        self.label_names: list[str] = self.job.label_names or sorted(set(map(str, self.job.labels)))
        self.num_classes = len(self.label_names)
        self.split_index = dict(zip(("train", "val", "test"), stratified_split(
            np.asarray(self.job.labels), val_fraction, test_fraction, seed)))
        self.duplicates_dropped = {}
        if dedupe:
            self.split_index, self.duplicates_dropped = drop_split_duplicates(self.job.texts, self.split_index)
            counts = ", ".join(f"{n} from {k}" for k, n in sorted(self.duplicates_dropped.items(), reverse=True) if n)
            if counts and (data, counts) not in DUPLICATES_REPORTED:  # once per task, not once per model
                DUPLICATES_REPORTED.add((data, counts))
                print(f"{data}: dropped duplicate texts of the test (or val) split: {counts} "
                      "(test keeps all its rows; dedupe false keeps every copy)", file=sys.stderr)
        missing = {name: sorted(set(range(self.num_classes)) - set(np.asarray(self.job.labels)[idx]))
                   for name, idx in self.split_index.items() if len(idx)}
        missing = {k: v for k, v in missing.items() if v}
        if missing:
            raise CacheError(
                f"label set differs between splits: {', '.join(f'{k} lacks classes {v}' for k, v in missing.items())}; "
                "use more rows (limit) or smaller val/test fractions"
            )

    @property
    def input_dim(self) -> int:
        """What a model fitted on this data reads (linked into models by LightningCLI)."""
        return self.dim

    @property
    def output_dim(self) -> int:
        """What a model fitted on this data predicts: one logit per class."""
        return self.num_classes

    def prepare_data(self) -> None:
        self._ensure(self.job)

    def setup(self, stage: str | None = None) -> None:
        cache = self._open(self.job)
        if cache.dim != self.dim:
            raise CacheError(f"cache {cache.path} holds {cache.dim}-d states, expected {self.dim}")
        labels = cache.labels if cache.labels is not None else np.asarray(self.job.labels)
        self.splits = {name: CachedRows([cache], idx, labels)
                       for name, idx in self.split_index.items() if len(idx)}

    def class_counts(self) -> np.ndarray:
        return np.bincount(np.asarray(self.job.labels)[self.split_index["train"]], minlength=self.num_classes)

"""Sufficient statistics of paired per-position final states, streamed and cached.

`datamodules.tokens.paired_batches` yields the final states of two causal LMs at the token
positions where both have read the same prefix; `accumulate_paired_stats` streams them into
`SufficientStats` (train / held-out / shuffled-pair null) and `paired_stats` caches those on
disk under both models' identities, the dataset fingerprint, max_length and limit, one entry
serving both directions.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from datamodules.cache import CacheError, atomic_write_bytes, atomic_write_json, ensure_writable, slug
from datamodules.progress import Progress
from datamodules.registry import xsilo_home
from datamodules.tokens import CausalLM, paired_batches
from lightning_modules.fitting.stats import SufficientStats

FORMAT_VERSION = 1
STATS_FILE = "stats.safetensors"
MANIFEST = "manifest.json"
SPLITS = ("train", "val", "null")


def reversed_stats(stats: SufficientStats) -> SufficientStats:
    """The statistics of (y, x) from those of (x, y); needs the full yᵀy."""
    if not stats.full_yty:
        raise ValueError("reversing SufficientStats needs full_yty=True")
    return SufficientStats(stats.n.clone(), stats.sum_y.clone(), stats.sum_x.clone(), stats.yty.clone(),
                           stats.xty.T.contiguous(), stats.xtx.clone())


@dataclass(eq=False)
class PairedStats:
    """Streamed statistics of paired final states: train, val (λ selection), null (shuffled pairs)."""

    train: SufficientStats
    val: SufficientStats
    null: SufficientStats
    info: dict = field(default_factory=dict)
    hit: bool = False

    def reversed(self) -> "PairedStats":
        info = {**self.info, "source": self.info.get("target"), "target": self.info.get("source")}
        return PairedStats(reversed_stats(self.train), reversed_stats(self.val), reversed_stats(self.null),
                           info, self.hit)

    def save(self, directory: Path) -> None:
        from safetensors.torch import save

        tensors = {f"{split}.{name}": t.contiguous() for split in SPLITS
                   for name, t in zip(("n", "sum_x", "sum_y", "xtx", "xty", "yty"),
                                      getattr(self, split).tensors())}
        atomic_write_bytes(directory / STATS_FILE, save(tensors))

    @classmethod
    def load(cls, directory: Path, info: dict) -> "PairedStats":
        from safetensors.torch import load

        try:
            tensors = load((directory / STATS_FILE).read_bytes())
            parts = [SufficientStats(*(tensors[f"{split}.{name}"] for name in
                                       ("n", "sum_x", "sum_y", "xtx", "xty", "yty"))) for split in SPLITS]
        except (OSError, KeyError, ValueError) as e:
            raise CacheError(f"{directory / STATS_FILE} is unreadable ({e}); delete {directory} and rerun") from e
        return cls(*parts, info=info, hit=True)


@dataclass(frozen=True)
class PairedStatsKey:
    """Everything that determines paired statistics (identities in a fixed, sorted order)."""

    model_identities: tuple[str, str]
    dataset_fingerprint: str
    max_length: int
    limit: int | None
    val_fraction: float
    test_fraction: float
    seed: int
    format: int = FORMAT_VERSION

    def fingerprint(self) -> str:
        import hashlib

        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:20]


def paired_stats_dir(key: PairedStatsKey, names: tuple[str, str], data: str, root: Path | None = None) -> Path:
    return Path(root or xsilo_home() / "paired-positions") / (
        f"{slug(names[0], 30)}--{slug(names[1], 30)}--{slug(data, 30)}--{key.fingerprint()}")


def accumulate_paired_stats(source: CausalLM, target: CausalLM, texts: Sequence[str], splits: dict[str, np.ndarray],
                            max_length: int, batch_size: int = 16, seed: int = 0) -> PairedStats:
    """One streamed pass: train and val statistics, and the null's (rows shuffled within each batch)."""
    d_x, d_y = source.hidden_size, target.hidden_size
    train, val, null = (SufficientStats.zeros(d_x, d_y) for _ in range(3))
    generator = torch.Generator().manual_seed(seed + 1)
    counts = {"train_positions": 0, "val_positions": 0, "source_tokens": 0, "target_tokens": 0}
    progress = Progress(f"paired token states {source.name} -> {target.name}",
                        len(splits["train"]) + len(splits["val"]), unit="texts")
    for split, stats in (("train", train), ("val", val)):
        chosen = [texts[i] for i in splits[split]]
        for batch in paired_batches(source, target, chosen, max_length, batch_size):
            progress.update(int(batch.text.unique().numel()))
            stats.update(batch.x, batch.y)
            counts[f"{split}_positions"] += batch.x.shape[0]
            counts["source_tokens"] += batch.source_tokens
            counts["target_tokens"] += batch.target_tokens
            if split == "train":
                null.update(batch.x, batch.y[torch.randperm(batch.y.shape[0], generator=generator)])
    progress.close()
    return PairedStats(train, val, null, info=counts)


def paired_stats(source: CausalLM, target: CausalLM, texts: Sequence[str], data: str, max_length: int,
                 limit: int | None, splits: dict[str, np.ndarray], val_fraction: float, test_fraction: float,
                 seed: int, batch_size: int = 16, cache_root: Path | None = None, use_cache: bool = True
                 ) -> PairedStats:
    """Paired statistics oriented source → target, from the cache when it holds them.

    One cache entry serves both directions: it is stored for the pair in sorted identity order
    with the full yᵀy, and reversed on load. Models without an identity are never cached.
    """
    from datasets import Dataset

    from datamodules.text import dataset_fingerprint

    cacheable = use_cache and source.identity is not None and target.identity is not None
    if not cacheable:
        return accumulate_paired_stats(source, target, texts, splits, max_length, batch_size, seed)
    flip = source.identity > target.identity
    first, second = (target, source) if flip else (source, target)
    fingerprint = dataset_fingerprint(Dataset.from_dict({"text": list(texts)}))
    key = PairedStatsKey((first.identity, second.identity), fingerprint, max_length, limit, val_fraction,
                         test_fraction, seed)
    directory = paired_stats_dir(key, (first.name, second.name), data, cache_root)
    manifest = directory / MANIFEST
    if manifest.is_file():
        info = json.loads(manifest.read_text())
        if info.get("complete") and info.get("fingerprint") == key.fingerprint():
            stats = PairedStats.load(directory, info)
            return stats.reversed() if flip else stats
    ensure_writable(directory)
    stats = accumulate_paired_stats(first, second, texts, splits, max_length, batch_size, seed)
    stats.info.update({"complete": True, "fingerprint": key.fingerprint(), "key": asdict(key),
                       "source": first.spec(), "target": second.spec(), "data": data,
                       "texts": {k: int(len(v)) for k, v in splits.items()}})
    if manifest.exists():
        manifest.unlink()  # never leave a complete-looking manifest over a stats file being rewritten
    stats.save(directory)
    atomic_write_json(manifest, stats.info)
    return stats.reversed() if flip else stats

"""The one split spec: a task's stratified train/val/test split and the public set's train/val split (numpy only).

`SPLIT` holds the fractions and seeds every reader of a split uses by default: the DataModules, the public-set
builder (which drops every text of a task's val and test split, so its no-leakage guarantee holds only while
all of them agree), `xsilo public-set build`/`export`, the head fit, the demo check and the YAML configs (which
leave the fractions to these defaults). The index math lives here too, so the provider's server, a client and
the DataModules draw the very same rows:

- `stratified_split(labels, val_fraction, test_fraction, seed)`: per class, a seeded permutation's first
  round(n·test) rows are test, the next round(n·val) are val, the rest train (0.70/0.15/0.15 by default);
- `public_split(rows, val_fraction, seed)`: a seeded permutation's first round(rows·val_fraction) rows are val,
  the rest train (0.875/0.125 by default); `datamodules.states.random_split` is this function.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, Mapping

import numpy as np


def check_task_fractions(val_fraction: float, test_fraction: float) -> None:
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be "
                         "in [0, 1) and sum to less than 1")


@dataclass(frozen=True)
class SplitSpec:
    """A task's train/val/test fractions and seed, and the public set's val fraction and seed.

    `to_dict`/`from_dict` read and write it as JSON (`from_dict` ignores unknown keys and fills missing ones
    with these defaults; `format_version` is the version of that shape)."""

    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0
    public_val_fraction: float = 0.125
    public_seed: int = 0

    format_version: ClassVar[int] = 1

    def __post_init__(self) -> None:
        check_task_fractions(self.val_fraction, self.test_fraction)
        if not 0 <= self.public_val_fraction < 1:
            raise ValueError(f"public_val_fraction must be in [0, 1), got {self.public_val_fraction}")

    @property
    def train_fraction(self) -> float:
        return 1.0 - self.val_fraction - self.test_fraction

    def task_split(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(train, val, test) rows of a labelled task (`stratified_split` with this spec)."""
        return stratified_split(labels, self.val_fraction, self.test_fraction, self.seed)

    def public_split(self, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """(train, val) rows of a public set of `rows` texts (`public_split` with this spec)."""
        return public_split(rows, self.public_val_fraction, self.public_seed)

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.format_version, **asdict(self)}

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> "SplitSpec":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in doc.items() if k in names})


SPLIT = SplitSpec()  # the defaults every split reads


def stratified_fractions(labels: np.ndarray, fractions: dict[str, float], seed: int) -> dict[str, np.ndarray]:
    """Per-class seeded split into the named fractions, in order; the last name takes the remainder."""
    names = list(fractions)
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in names}
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        start = 0
        for name in names[:-1]:
            n = round(len(idx) * fractions[name])
            parts[name].append(idx[start:start + n])
            start += n
        parts[names[-1]].append(idx[start:])
    return {k: np.sort(np.concatenate(v)) for k, v in parts.items()}


def stratified_split(labels: np.ndarray, val_fraction: float = SPLIT.val_fraction,
                     test_fraction: float = SPLIT.test_fraction, seed: int = SPLIT.seed
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, test) rows: per class, seeded; every class keeps its share in every split."""
    check_task_fractions(val_fraction, test_fraction)
    parts = stratified_fractions(np.asarray(labels), {"test": test_fraction, "val": val_fraction, "train": 1.0}, seed)
    return parts["train"], parts["val"], parts["test"]


def public_split(rows: int, val_fraction: float = SPLIT.public_val_fraction,
                 seed: int = SPLIT.public_seed) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) sorted row indices: a seeded permutation's last and first round(rows·val_fraction) rows. The
    one split of public rows (`datamodules.states.random_split` is this function)."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    perm = np.random.default_rng(seed).permutation(rows)
    n_val = round(rows * val_fraction)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])

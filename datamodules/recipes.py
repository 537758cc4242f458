"""The study's regimes as public-set recipes: in-domain and leave-task-out sets (paper Tables 1 and 2).

A `PublicRecipe` is the arguments of one `build_public_set` call with the name it is written under; `built` finds
a set already built with these arguments, `build` builds it otherwise.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Sequence

from datamodules.public_set import (PublicSetError, build_public_set, parse_mix, parse_task, public_set_dir,
                                    read_manifest)

DIALOG = "movie-dialog"


def registry_sources() -> list[str]:
    """Every registered dataset, `movie-dialog` first: the unlabelled sources a leave-task-out set draws from."""
    from datamodules.registry import load_registry

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
    task_columns: tuple[str | None, str] | None = None  # the tasks' (text, label) columns (a file task's own)

    def build(self, prefer: Collection[str] | None = None, seed: int = 0) -> Path:
        """The set's `.jsonl`: the one already built under this name with these arguments, else a new build."""
        return self.built(seed) or build_public_set(
            self.sources, size=self.size, mix=self.mix, exclude_tasks=list(self.exclude_tasks), out=self.name,
            exclude_datasets=self.exclude_datasets, task_columns=self.task_columns, prefer=prefer, seed=seed)

    def built(self, seed: int = 0) -> Path | None:
        """The `.jsonl` of a set of this name whose manifest records these arguments, if there is one."""
        directory, name = public_set_dir(self.name, "")
        path = directory / f"{name}.jsonl"
        try:
            m = read_manifest(path)
        except (OSError, ValueError):
            return None
        weights = parse_mix(self.mix)
        tasks = {(t["task"], t["limit"], t.get("text_column") or "text", t.get("label_column") or "label")
                 for t in m.get("excluded", {}).get("tasks", [])}
        text, label = self.task_columns or (None, "label")
        same = ([s["name"] for s in m.get("sources", [])] == list(self.sources) and m.get("seed") == seed
                and (self.size is None or m.get("size_requested") == self.size)
                and set(m.get("mix_requested") or {}) == set(weights)
                and all(abs(m["mix_requested"][k] - w) < 1e-9 for k, w in weights.items())
                and {(*parse_task(t), text or "text", label) for t in self.exclude_tasks} <= tasks
                and set(m.get("excluded", {}).get("datasets", {})) == set(self.exclude_datasets))
        return path if same and path.is_file() and m.get("file") == path.name else None


def in_domain_recipe(task: str, exclude_tasks: Sequence[str], size: int = 2000, base: str = DIALOG,
                     name: str | None = None) -> PublicRecipe:
    """Half `base` (movie dialog), half the task's own training texts (paper Table 1's regime)."""
    return PublicRecipe(name or f"study-in-domain-{_name_part(task)}", (base, task), f"{base}:0.5,{task}:0.5", size,
                        tuple(exclude_tasks))


def leave_task_out_recipe(task: str, exclude_tasks: Sequence[str], size: int | None = 3500,
                          sources: Sequence[str] | None = None, name: str | None = None,
                          task_columns: tuple[str | None, str] | None = None) -> PublicRecipe:
    """Every unlabelled source but the task (`sources`, default every registry dataset) in equal weights, with
    every text of the task removed (paper Table 2's regime: the task's domain is unknown). `size` None: every
    eligible row of every source (no mix). `task_columns`: the (text, label) columns the task and `exclude_tasks`
    are read with, as the DataModules read them (a user's file: its own; default `text` or the entry's, `label`)."""
    pool = leave_task_out_sources(task, sources=sources)
    mix = None if size is None else ",".join(f"{s}:1" for s in pool)
    return PublicRecipe(name or f"study-leave-out-{_name_part(task)}", tuple(pool), mix, size, tuple(exclude_tasks),
                        (task,), task_columns)


def _name_part(task: str) -> str:
    """A task name (or a file's stem) as part of a public set's name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(task).stem if ("/" in task or os.sep in task) else task).strip("-.")

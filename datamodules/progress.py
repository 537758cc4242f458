"""Plain progress lines for output that is not a terminal (CI logs, `| tee`, files), and the time per stage.

A progress bar redraws one line with carriage returns, so a log shows it only when it ends.
`Progress` instead prints a whole line every `XSILO_PROGRESS_S` seconds (default 10): rows done,
rate and an estimate of the time left. `ProgressLines` is the same for Lightning's predict loop; its estimate
weighs each batch by its padded tokens, in the order the batches run (longest first within a shard), so the
first, longest rows do not inflate it. On a terminal both stay silent and the usual bars are shown.

`StageTimes` collects where a long command's time went (`extract()` reports into the active one by itself) and
prints it as one line when the command ends.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from typing import Iterator, Sequence, TextIO

from lightning.pytorch.callbacks import Callback

PROGRESS_ENV = "XSILO_PROGRESS_S"  # seconds between progress lines; 0 prints one per update
DEFAULT_EVERY_S = 10.0


def progress_every_s() -> float:
    """The progress interval from $XSILO_PROGRESS_S (a bad value is a one-line error)."""
    raw = os.environ.get(PROGRESS_ENV)
    if raw is None or raw == "":
        return DEFAULT_EVERY_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise ValueError(f"{PROGRESS_ENV}={raw!r} is not a number of seconds >= 0; unset it or set e.g. 10")
    return value


def is_terminal(stream: TextIO | None = None) -> bool:
    stream = stream or sys.stderr
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """Counts work done and prints `LABEL: 320/2225 rows (14%), 5.1 rows/s, ~6m13s left` lines.

    Prints only when `stream` is not a terminal (or `force`), at most once per interval, plus a
    final line from `close()` when anything was printed before it. With `work` (the cost of all the rows, e.g.
    padded tokens) and each update's share of it, the time left is the work left at the rate work is done, so
    rows of unequal cost do not skew it; without, it is the rows left at rows/s.
    """

    def __init__(self, label: str, total: int | None, unit: str = "rows", stream: TextIO | None = None,
                 every_s: float | None = None, force: bool = False, work: float | None = None):
        self.label, self.total, self.unit = label, total, unit
        self.stream = stream or sys.stderr
        self.every_s = progress_every_s() if every_s is None else every_s
        self.enabled = force or not is_terminal(self.stream)
        self.done = 0
        self.work, self.work_done = (work if work and work > 0 else None), 0.0
        self.t0 = self.last = time.monotonic()
        self.printed = 0

    def seconds_left(self, elapsed: float) -> float | None:
        if self.work is not None and self.work_done > 0:
            return max(self.work - self.work_done, 0.0) / (self.work_done / elapsed)
        if self.total and self.done > 0:
            return max(self.total - self.done, 0) / (self.done / elapsed)
        return None

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.t0, 1e-9)
        rate = self.done / elapsed
        text = f"{self.label}: {self.done}"
        if self.total:
            text += f"/{self.total} {self.unit} ({self.done / self.total:.0%})"
        else:
            text += f" {self.unit}"
        text += f", {rate:.1f} {self.unit}/s"
        left = self.seconds_left(elapsed) if self.total else None
        if left is not None:
            text += f", ~{duration(left)} left"
        return text + f", {duration(elapsed)} elapsed"

    def update(self, n: int = 1, work: float = 0.0) -> None:
        self.done += n
        self.work_done += work
        now = time.monotonic()
        if self.enabled and now - self.last >= self.every_s:
            self.last = now
            self._print(self.line())

    def close(self) -> None:
        if self.enabled and self.printed:
            self._print(self.line() + ", done")

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)
        self.printed += 1


class ProgressLines(Callback):
    """`Progress` for `Trainer.predict`: counts the rows of each batch (`len(batch["rows"])` or
    the first dimension of the batch's first tensor). Under DDP only rank 0 prints, its share of
    `total` rows. When the module has `batch_costs(rank, world_size)` (the cost of each of this rank's batches, in
    the order they run), the time left is estimated from the cost done per second."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None, every_s: float | None = None):
        self.label, self.total, self.stream, self.every_s = label, total, stream, every_s
        self.progress: Progress | None = None
        self.costs: Sequence[float] = ()

    def on_predict_start(self, trainer, pl_module) -> None:
        total = -(-self.total // trainer.world_size)
        costs = getattr(pl_module, "batch_costs", None)
        self.costs = costs(trainer.global_rank, trainer.world_size) if callable(costs) else ()
        self.progress = Progress(self.label, total, stream=self.stream, every_s=self.every_s, force=True,
                                 work=float(sum(self.costs)) or None)
        self.progress.enabled = trainer.global_rank == 0

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        rows = batch["rows"] if isinstance(batch, dict) and "rows" in batch else batch
        while isinstance(rows, (list, tuple, dict)):
            rows = next(iter(rows.values() if isinstance(rows, dict) else rows))
        self.progress.update(len(rows), self.costs[batch_idx] if batch_idx < len(self.costs) else 0.0)

    def on_predict_end(self, trainer, pl_module) -> None:
        self.progress.close()


class StageTimes:
    """Wall time per named stage of a command, for the one line it prints when it ends (`summary`).

    `with StageTimes() as times:` makes it the active one: `record_stage` (which `extract()` calls) adds to it;
    `times.stage(name)` times a block. Stages of the same name add up; the rest of the wall time is "other"."""

    active: "StageTimes | None" = None

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.stages: dict[str, float] = {}
        self.outer: StageTimes | None = None

    def __enter__(self) -> "StageTimes":
        self.outer, StageTimes.active = StageTimes.active, self
        return self

    def __exit__(self, *exc: object) -> None:
        StageTimes.active = self.outer

    def add(self, name: str, seconds: float) -> None:
        if len(self.stages) < 64 or name in self.stages:
            self.stages[name] = self.stages.get(name, 0.0) + max(seconds, 0.0)
        else:
            self.stages["other stages"] = self.stages.get("other stages", 0.0) + max(seconds, 0.0)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.add(name, time.monotonic() - t0)

    def summary(self) -> str:
        """`time per stage: extract smollm2 bbc:train 1m02s (54%), encrypted fit 40s (35%), other 3s; total 1m55s`"""
        total = max(time.monotonic() - self.t0, 1e-9)
        parts = [f"{name} {duration(s) if s >= 1 else f'{s:.2f}s'} ({s / total:.0%})"
                 for name, s in self.stages.items()]
        other = total - sum(self.stages.values())
        if other >= 0.5:
            parts.append(f"other {duration(other)} ({other / total:.0%})")
        return f"time per stage: {', '.join(parts) or 'none recorded'}; total {duration(total)}"


def record_stage(name: str, seconds: float) -> None:
    """Add `seconds` to stage `name` of the active `StageTimes`, if a command opened one."""
    if StageTimes.active is not None:
        StageTimes.active.add(name, seconds)

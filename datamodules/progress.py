"""Plain progress lines for output that is not a terminal (CI logs, `| tee`, files).

A progress bar redraws one line with carriage returns, so a log shows it only when it ends.
`Progress` instead prints a whole line every `XSILO_PROGRESS_S` seconds (default 10): rows done,
rate and an estimate of the time left. `ProgressLines` is the same for Lightning's predict loop.
On a terminal both stay silent and the usual bars are shown.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO

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


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """Counts work done and prints `LABEL: 320/2225 rows (14%), 5.1 rows/s, ~6m13s left` lines.

    Prints only when `stream` is not a terminal (or `force`), at most once per interval, plus a
    final line from `close()` when anything was printed before it.
    """

    def __init__(self, label: str, total: int | None, unit: str = "rows", stream: TextIO | None = None,
                 every_s: float | None = None, force: bool = False):
        self.label, self.total, self.unit = label, total, unit
        self.stream = stream or sys.stderr
        self.every_s = progress_every_s() if every_s is None else every_s
        self.enabled = force or not is_terminal(self.stream)
        self.done = 0
        self.t0 = self.last = time.monotonic()
        self.printed = 0

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.t0, 1e-9)
        rate = self.done / elapsed
        text = f"{self.label}: {self.done}"
        if self.total:
            text += f"/{self.total} {self.unit} ({self.done / self.total:.0%})"
        else:
            text += f" {self.unit}"
        text += f", {rate:.1f} {self.unit}/s"
        if self.total and rate > 0:
            text += f", ~{_duration(max(self.total - self.done, 0) / rate)} left"
        return text + f", {_duration(elapsed)} elapsed"

    def update(self, n: int = 1) -> None:
        self.done += n
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
    `total` rows."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None, every_s: float | None = None):
        self.label, self.total, self.stream, self.every_s = label, total, stream, every_s
        self.progress: Progress | None = None

    def on_predict_start(self, trainer, pl_module) -> None:
        total = -(-self.total // trainer.world_size)
        self.progress = Progress(self.label, total, stream=self.stream, every_s=self.every_s, force=True)
        self.progress.enabled = trainer.global_rank == 0

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        rows = batch["rows"] if isinstance(batch, dict) and "rows" in batch else batch
        while isinstance(rows, (list, tuple, dict)):
            rows = next(iter(rows.values() if isinstance(rows, dict) else rows))
        self.progress.update(len(rows))

    def on_predict_end(self, trainer, pl_module) -> None:
        self.progress.close()

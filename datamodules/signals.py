"""Stop promptly on SIGTERM and Ctrl-C.

Lightning's Trainer replaces the default SIGTERM action with a handler that only records the
signal ("Bypassing SIGTERM"), so a job stopped with `kill` would run on; and it turns Ctrl-C
into a silent `sys.exit(1)`. Inside `stop_on_signals()` both signals raise `Stopped` instead,
which unwinds through Lightning (it calls the handlers that were installed before it), runs
every `finally` and temp-file cleanup, and reaches the CLI as one clear line.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(Exception):
    """The process received SIGTERM or SIGINT; `signum` says which."""

    def __init__(self, signum: int, detail: str = "finished files are kept; rerun the same command to resume"):
        self.signum, self.detail = signum, detail
        super().__init__(f"stopped by {signal.Signals(signum).name}: {detail}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _raise_stopped(signum: int, frame) -> None:
    raise Stopped(signum)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGTERM and SIGINT raise `Stopped` inside the block (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    for s in SIGNALS:
        signal.signal(s, _raise_stopped)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)

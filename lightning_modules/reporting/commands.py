"""`xsilo report`: a typed function whose signature is its options (see `lightning_modules.cli`)."""

from __future__ import annotations


def report(*, run: str = "runs/demo") -> None:
    """Write RUN/report.md with PNG plots from the demo's JSON results; stages that did not run are noted.

    Args:
        run: the demo's run folder ($RUN in scripts/demo.sh).
    """
    from lightning_modules.reporting.report import write_demo_report

    print(write_demo_report(run))

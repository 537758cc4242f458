"""The one-screen table that ends `make demo`: each stage, its wall time, headline figure and file.

    python -m lightning_modules.reporting.demo_summary runs/demo

Reads `RUN/stage-times.tsv` (written by scripts/demo.sh: number, name, seconds per line) and the
stages' JSON results; a stage whose file is missing says so instead of a figure.
"""

from __future__ import annotations

import glob
import json
import sys
from pathlib import Path
from typing import Any, Callable


def _json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _classification(m: dict) -> str:
    c = m["classification"]
    return (f"mapped {c['mapped']['accuracy']:.3f} vs native {c['native_target']['accuracy']:.3f}, "
            f"null {c['null_map']['accuracy']:.3f} ({m['rows']['task_test']} test docs)")


def _export(m: dict) -> str:
    return f"{m['input_dim']} -> {len(m.get('label_names') or [])} classes, fused W·h+b"


def _serve(m: dict) -> str:
    return (f"encrypted = plaintext on {m['agree']}/{m['queries']}, median {m['median_total_ms']:.0f} ms/query")


def _two_party(m: dict) -> str:
    adapted, labels, anchored = m.get("adaptation"), m.get("label_only"), m.get("anchored")
    tail = (f"; label-only = plaintext on {labels['agree']}/{labels['queries']}, median {labels['median_total_ms']:.0f} ms"
            if labels else "")
    if anchored:
        tail += f"; with {(anchored['anchors'] or {}).get('rows')} anchors {anchored['accuracy_encrypted']:.3f}"
    if adapted and m.get("public_map_accuracy") is not None:  # the queried map is adapted to the private texts
        return (f"split {m['split_accuracy']:.3f} adapted to {adapted['private_rows']} private texts (public map "
                f"{m['public_map_accuracy']:.3f}, lab {m['lab_mapped_accuracy']:.3f}, fused "
                f"{m['fused_accuracy']:.3f}); public map = lab map to {m['map_weight_rel_error_vs_lab']:.0e}, median "
                f"{m['split_median_total_ms']:.0f} ms" + tail)
    return (f"split {m['split_accuracy']:.3f} (lab {m['lab_mapped_accuracy']:.3f}, fused {m['fused_accuracy']:.3f}); "
            f"private map = lab map to {m['map_weight_rel_error_vs_lab']:.0e}, median {m['split_median_total_ms']:.0f} ms"
            + tail)


def _ood(m: dict, samples: dict | None) -> str:
    sel = m.get("deployable")
    if not sel:
        return "no detector selection in ood.json"
    c = sel["candidates"][sel["chosen"]]
    text = f"{sel['chosen']}: test AUROC {c['test_auroc_mean']:.3f} (val {c['val_auroc_mean']:.3f})"
    if samples:
        text += f"; samples right {samples['right']}/{samples['total']}"
    return text


def _generation(run: Path) -> tuple[str, str]:
    parts, files = [], []
    for file in sorted(glob.glob(str(run / "generation" / "*" / "metrics.json"))):
        m = _json(Path(file))
        if m:
            r = m["rows"]
            parts.append(f"{m['pair'].replace(' ', '')} top-1 {r['mapped']['top1']:.2f} (null {r['null']['top1']:.2f})")
            files.append(file)
    return ("; ".join(parts) or "not run"), (str(Path(files[0]).parent.parent) if files else "-")


def _study(data: dict) -> str:
    """Mean mapped accuracy per regime beside the mean native accuracy, and the collapses flagged."""
    parts = []
    for regime, r in data["regimes"].items():
        rows = [t for pair in r["pairs"].values() for t in pair["tasks"].values()]
        mapped = sum(t["mapped"]["accuracy"] for t in rows) / len(rows)
        native = sum(t["mapped"]["accuracy"] + t["mapped_drop"] for t in rows) / len(rows)
        parts.append(f"{regime} mapped {mapped:.2f} vs native {native:.2f}, "
                     f"{sum(bool(t['collapse']) for t in rows)}/{len(rows)} collapsed")
    return "; ".join(parts)


def summary(run: str | Path) -> str:
    run = Path(run)
    times: dict[str, tuple[str, float]] = {}
    try:
        for line in (run / "stage-times.tsv").read_text().splitlines():
            number, name, seconds = line.split("\t")
            times[number] = (name, float(seconds))
    except (OSError, ValueError):
        pass
    figures: dict[str, tuple[str, Callable[[dict], str] | None, str]] = {
        "3": ("bbc/metrics.json", _classification, "BBC accuracy"),
        "4": ("export/manifest.json", _export, "export"),
        "5": ("serve.json", _serve, "serving"),
        "6": ("two-party-summary.json", _two_party, "two parties"),
        "7": ("ood/ood.json", None, "OOD"),
        "9": ("study/study.json", _study, "science"),
    }
    rows = []
    for number, (name, seconds) in times.items():
        if number in figures:
            file, fmt, _ = figures[number]
            data = _json(run / file)
            if not data:
                headline = f"missing: {run / file}"
            elif number == "7":
                headline = _ood(data, _json(run / "ood" / "samples.json"))
            else:
                headline = fmt(data)
            where = str(run / file)
        elif number == "8":
            headline, where = _generation(run)
        elif number == "10":
            headline, where = "plots and every figure traced to its JSON key", str(run / "report.md")
        elif number == "2":
            headline, where = "pooled states of every text the demo uses", "$XSILO_HOME/states"
        else:
            headline, where = "models and datasets installed and converted", "$XSILO_HOME"
        rows.append((f"{number}. {name}", f"{seconds:.0f}s", headline, where))
    total = sum(s for _, s in times.values())
    widths = [max(len(r[i]) for r in rows + [("stage", "time", "headline", "file")]) for i in range(4)]
    fmt_row = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    lines = [fmt_row(("stage", "time", "headline", "file")), fmt_row(tuple("-" * w for w in widths))]
    lines += [fmt_row(r) for r in rows]
    lines.append(f"total {total / 60:.1f} min ({total:.0f} s)")
    return "\n".join(lines)


if __name__ == "__main__":
    print(summary(sys.argv[1] if len(sys.argv) > 1 else "runs/demo"))

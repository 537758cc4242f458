"""The demo report and the study's regime tables (the plots are `charts`).

`write_demo_report(run_dir)` reads the JSON results `scripts/demo.sh` writes under its run folder and
writes `report.md` with PNG plots beside it. Every number in the report sits in its figures table,
each row naming the JSON file and the key (a JSON pointer) it came from. A stage that did not run is
skipped with a note. With a study's output in the folder (`study.json` or `study/study.json`, from
`xsilo study`), it adds the study's λ-path plots and, in the figures section, one table per public-set
regime (each row naming its study.json key) beside the paper's Table 1 / Table 2 figures.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from datamodules.cache import atomic_write_bytes
from lightning_modules.reporting.charts import bar_chart, roc_chart, short_name

CLASSIFICATION, OOD, SERVE, GENERATION = "bbc/metrics.json", "ood/ood.json", "serve.json", "generation/*/metrics.json"
TWO_PARTY = "two-party-summary.json"
# What each result measured; everything else in it (config, labels, ROC points) is not a figure.
MEASURED = {
    CLASSIFICATION: ("classification", "alignment", "rows", "chosen_lambda"),
    OOD: ("accuracy", "ood", "thresholds", "id_test_flagged", "rows"),
    SERVE: None,  # all of it
    TWO_PARTY: None,
    GENERATION: ("rows", "positions", "texts", "compatibility", "chosen_lambda", "stats_seconds"),
}
STAGES = {CLASSIFICATION: "stage 3 (xsilo evaluate ... --out $RUN/bbc)",
          OOD: "stage 7 (xsilo evaluate_ood ... --out $RUN/ood)",
          SERVE: "stage 5 (python -m serve.demo_check ... --out $RUN/serve.json)",
          TWO_PARTY: "stage 6 (python -m lightning_modules.reporting.two_party_report RUN PROVIDER_HOME CLIENT_HOME)",
          GENERATION: "stage 8 (xsilo evaluate_generation ... --out $RUN/generation/SOURCE-TARGET)"}
LATENCY_STAGES = ("extract", "encrypt", "http", "server", "decrypt", "total")
STUDIES = ("study.json", "study/study.json")  # `xsilo study --out RUN` or `--out RUN/study`
# The paper's figures to hold each regime against (/work/shared/PAPER_NOTES.md): (task, pair, native, mapped).
PAPER = {"in-domain": ("Table 1: map fitted on the task's own training texts (embedding APIs)",
                       (("SST-2", "Gemini ← OpenAI", 94.5, 93.1), ("TREC", "OpenAI ← Qwen", 96.0, 95.6),
                        ("TREC", "Cohere ← Gemini", 97.0, 91.2), ("AG News", "Mistral ← Qwen", 92.6, 92.4),
                        ("MNLI", "OpenAI ← Qwen", 87.9, 61.3))),
         "leave-task-out": ("Table 2: map fitted on public data only (Wikipedia or IMDB)",
                            (("TREC", "—", 95.4, 57.6), ("MNLI", "—", 65.0, 44.5), ("DBpedia", "—", 99.1, 53.5)))}


class ReportError(ValueError):
    """The run folder cannot be reported on; the message names the fix."""


# --- the study's regime tables -------------------------------------------------------------

REGIME_TITLES = {"given": "the given public set",
                 "in-domain": "in-domain public sets (half dialog, half the task's training texts; paper Table 1)",
                 "leave-task-out": "leave-task-out public sets (every other unlabelled source; paper Table 2)",
                 "two-party": "two-party: the leave-task-out sets, anchored on the provider's synthetic texts where "
                              "the study writes them, each map adapted on the client's unlabelled task texts through "
                              "the provider's published class statistics and matched to its class priors (no text "
                              "of the client's crosses)",
                 # an older study's name of the anchored two-party regime: its study.json still reports
                 "two-party-synthetic": "two-party with synthetic anchors (texts an LM wrote from the provider's class "
                                        "descriptions, extracted by both models; nothing of the client's crosses)"}
DISCLOSED_PREFIX = "two-party-disclosed-"


def regime_title(regime: str) -> str:
    """A regime's title; `two-party-disclosed-N` is the two-party regime whose client opted to disclose N texts."""
    if regime.startswith(DISCLOSED_PREFIX):
        rows = regime[len(DISCLOSED_PREFIX):]
        return (f"two-party with {rows} of the client's task texts disclosed as its anchors (an opt-in: those texts "
                "cross, paired with the target's states of them)")
    return REGIME_TITLES[regime]


# (header, JSON pointer below a row's native / mapped entry, interval pointer or None)
# "native source": the source's own head; a map followed by the target's linear head is a linear head on source
# states, so (up to regularisation) that is the ceiling of mapped accuracy.
REGIME_COLUMNS = (("native acc", "native", "/accuracy", "/accuracy_ci"),
                  ("native source acc", "native_source", "/accuracy", None),
                  ("mapped acc", "mapped", "/mapped/accuracy", "/mapped/accuracy_ci"),
                  ("drop", "mapped", "/mapped_drop", "/mapped_drop_ci"),
                  ("native macro-F1", "native", "/macro_f1", "/macro_f1_ci"),
                  ("mapped macro-F1", "mapped", "/mapped/macro_f1", "/mapped/macro_f1_ci"),
                  ("null acc", "mapped", "/null_map/accuracy", None),
                  ("majority rate", "mapped", "/mapped/majority_rate", None),
                  ("top prediction share", "mapped", "/mapped/top_prediction_share", None))


def regime_rows(study: dict[str, Any], regime: str) -> list[dict[str, Any]]:
    """One row per (task, pair) of a regime: its cells as text, the collapse flag, and where they come from."""
    rows = []
    pairs = study["regimes"][regime]["pairs"]
    for task in study["config"]["tasks"]:
        for key, pair in pairs.items():
            base = {"native": pointer("native", pair["target"], task),
                    "native_source": pointer("native", pair["source"], task),
                    "mapped": pointer("regimes", regime, "pairs", key, "tasks", task)}
            view = pair["tasks"][task]
            cells = []
            for _, where, ptr, ci in REGIME_COLUMNS:
                text = f"{lookup(study, base[where] + ptr):.3f}"
                if ci is not None:
                    lo, hi = lookup(study, base[where] + ci)
                    text += f" [{lo:.3f}, {hi:.3f}]"
                cells.append(text)
            chosen = (view.get("lambda_path") or {}).get("chosen") or {}
            lam = ", ".join(f"{c}{'*' if c == view.get('criterion') else ''} {v['lambda']:.3g}"
                            for c, v in chosen.items()) or "n/a"
            flag = f"COLLAPSE: {view['collapse_reason']}" if view.get("collapse") else "no"
            names = f"{short_name(pair['source'])} -> {short_name(pair['target'])}"
            rows.append({"task": short_name(task), "pair": names,
                         "cells": cells, "lambda": lam, "collapse": bool(view.get("collapse")), "flag": flag,
                         "source": base["mapped"]})
    return rows


def regime_table(study: dict[str, Any], regime: str, file: str | None = None) -> list[str]:
    """A regime's Markdown table (rows: task, pair); with `file`, a last column names each row's JSON source."""
    head = ["task", "pair", *(c[0] for c in REGIME_COLUMNS), "λ per criterion (* chose the map)", "collapse"]
    if file is not None:
        head.append("source (file#JSON pointer)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in regime_rows(study, regime):
        row = [r["task"], r["pair"], *r["cells"], r["lambda"], r["flag"]]
        if file is not None:
            row.append(f"{file}#{r['source']}")
        lines.append("| " + " | ".join(cell(c) for c in row) + " |")
    return lines


# --- figures and their sources -------------------------------------------------------------

def pointer(*keys: str | int) -> str:
    """A JSON pointer (RFC 6901) to keys."""
    return "".join("/" + str(k).replace("~", "~0").replace("/", "~1") for k in keys)


def lookup(obj: Any, ptr: str) -> Any:
    """The value a JSON pointer names in obj."""
    for part in ptr.split("/")[1:]:
        part = part.replace("~1", "/").replace("~0", "~")
        obj = obj[int(part)] if isinstance(obj, list) else obj[part]
    return obj


def fmt(value: float | int) -> str:
    return str(value) if isinstance(value, int) else f"{value:.4g}"


def cell(text: str) -> str:
    """A Markdown table cell: one line, pipes escaped."""
    return repr(str(text))[1:-1].replace("|", "\\|")


@dataclass
class Figure:
    file: str  # relative to the run folder
    key: str  # JSON pointer
    value: float | int


def numbers(obj: Any, prefix: tuple = ()) -> Iterator[tuple[tuple, float | int]]:
    """(keys, value) of every number in obj (bools and None are not numbers)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from numbers(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from numbers(v, prefix + (i,))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield prefix, obj


def measured(file: str, result: dict, sections: Sequence[str] | None) -> list[Figure]:
    picked = result if sections is None else {k: result[k] for k in sections if k in result}
    return [Figure(file, pointer(*keys), value) for keys, value in numbers(picked)]


def figures_table(figures: Sequence[Figure]) -> list[str]:
    lines = ["| figure | value | source (file#JSON pointer) |", "|---|---|---|"]
    for f in figures:
        label = " · ".join(p.replace("~1", "/").replace("~0", "~") for p in f.key.split("/")[1:])
        lines.append(f"| {cell(label)} | {fmt(f.value)} | {cell(f'{f.file}#{f.key}')} |")
    return lines


# --- the demo report -----------------------------------------------------------------------

def _read(run: Path, file: str, notes: list[str]) -> dict | None:
    path = run / file
    if not path.is_file():
        notes.append(f"`{file}` not found: {STAGES[GENERATION if file.startswith('generation/') else file]} "
                     "did not run; skipped.")
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        notes.append(f"`{file}` could not be read ({e}); skipped. Rerun its stage.")
        return None


def _classification_section(run: Path, result: dict) -> list[str]:
    c = result["classification"]
    values = {"native target": c["native_target"]["accuracy"], "native source": c["native_source"]["accuracy"],
              "mapped": c["mapped"]["accuracy"], "null map": c["null_map"]["accuracy"]}
    source, target = (short_name(m) for m in result["pair"].split(" -> "))
    bar_chart(values, f"{source} -> {target} on {short_name(result['task'])}: test accuracy", "accuracy",
              run / "accuracy.png", ylim=(0, 1.05))
    return [f"## Classification: {cell(result['pair'])} on {cell(result['task'])}", "",
            "Native heads on each model's own states, the source's states mapped into the target's head, "
            "and a null map fitted on shuffled public pairs.", "", "![accuracy](accuracy.png)", ""]


def _ood_section(run: Path, result: dict, notes: list[str]) -> list[str]:
    detector = result.get("export_ood", {}).get("detector", "energy")
    lines = [f"## OOD detection: {cell(result['pair'])}, in-distribution {cell(result['task'])}", ""]
    if "roc" not in result:
        notes.append(f"`{OOD}` holds no ROC points (written before they were stored); rerun stage 7 for the ROC plot.")
        return lines + ["ROC plot skipped: no ROC points in ood.json.", ""]
    curves = {name: per_detector[detector] for name, per_detector in result["roc"].items()}
    roc_chart(curves, f"ROC, detector {detector}: native target states vs mapped source states", run / "roc.png")
    lines.append(f"ROC curves of the `{detector}` detector (the logit detector in the export), OOD as the positive "
                 "class.")
    if "deployable" in result:
        lines.append(f"The detector a fused-mode client runs is `{result['deployable']['chosen']}`, chosen by "
                     f"validation AUROC among those it can compute (`{OOD}` key `deployable`).")
    return lines + ["", "![roc](roc.png)", ""]


def _two_party_section(result: dict) -> list[str]:
    return ["## Two organisations", "",
            "The provider (Gemma-3, its own XSILO_HOME) serves a head and its public-set states; the client "
            "(SmolLM2, another home) fits the map privately over HTTP, adapts it at home to its own unlabelled "
            "texts (`xsilo align --private`: the BBC sample's training texts) and queries in split mode. The figures "
            "table lists, from `two-party-summary.json`, the accuracy of each mode (one machine, fused, two parties; "
            "`public_map_accuracy`: the same private fit without --private), how far that public-set map is from "
            "the lab's, both λ, the adaptation, the fit's traffic, what each home holds, and (`label_only`) the "
            "same head served label-only: labels against the plaintext argmax, latency and traffic.", ""]


def _serve_section(run: Path, result: dict, notes: list[str]) -> list[str]:
    bars = {stage: result[f"median_{stage}_ms"] for stage in LATENCY_STAGES if f"median_{stage}_ms" in result}
    if "p90_total_ms" in result:
        bars["total p90"] = result["p90_total_ms"]
    lines = ["## Encrypted serving", ""]
    if not bars:
        notes.append(f"`{SERVE}` holds no latency figures; latency plot skipped.")
        return lines
    bar_chart(bars, "encrypted query latency per stage (median; p90 of the total)", "ms", run / "latency.png")
    return lines + ["Latency of one encrypted query per stage: client extract, encrypt, HTTP, server HE "
                    "evaluation, decrypt, total (medians), and the total's 90th percentile.", "",
                    "![latency](latency.png)", ""]


def _generation_section(file: str, result: dict) -> list[str]:
    lines = [f"## Cross-model generation: {cell(result['pair'])}", "", f"From `{file}`.", "",
             "| prompt | mapped (source reads, target writes) | target alone | source alone |", "|---|---|---|---|"]
    for s in result.get("samples", []):
        lines.append("| " + " | ".join(cell(s.get(k, "")) for k in ("prompt", "mapped", "identity", "source_native"))
                     + " |")
    return lines + [""]


def _study_section(file: str, study: dict) -> list[str]:
    folder = str(Path(file).parent)
    link = (lambda name: name) if folder == "." else (lambda name: f"{folder}/{name}")
    lines = ["## Convergence study: the paper's two tables at this scale", "",
             f"From `{file}` (the full tables, heatmaps and intervals: [{link('study.md')}]({link('study.md')})). "
             "Every ordered pair of models on each task, its map fitted on each regime's public set: "
             + "; ".join(f"{r}: {regime_title(r)}" for r in study["regimes"]) + ". "
             "The figures section holds one table per regime, rows flagged where the mapped predictions "
             "collapse, beside the paper's reference figures.", ""]
    for regime, png in study.get("lambda_paths", {}).items():
        lines += [f"Mapped test accuracy along the λ path, {regime}, each λ criterion's choice marked:", "",
                  f"![λ path, {regime}]({link(png)})", ""]
    return lines


def _study_figures(file: str, study: dict) -> list[str]:
    lines = []
    for regime in study["regimes"]:
        lines += ["", f"### Study, {regime_title(regime)}", "", *regime_table(study, regime, file)]
        if regime in PAPER:
            title, rows = PAPER[regime]
            lines += ["", f"The paper's {title}, for reference:", "",
                      "| task | pair | native (%) | mapped (%) | source |", "|---|---|---|---|---|"]
            lines += [f"| {task} | {pair} | {native} | {mapped} | PAPER_NOTES.md |" for task, pair, native, mapped
                      in rows]
    return lines


def write_demo_report(run_dir: str | Path) -> Path:
    """Write RUN/report.md (and its PNGs) from the demo's JSON results; returns its path."""
    run = Path(run_dir)
    if not run.is_dir():
        raise ReportError(f"run folder {run} does not exist; run `make demo` first or pass --run DIR")
    notes: list[str] = []
    body: list[str] = []
    figures: list[Figure] = []
    parts = {file: _read(run, file, notes) for file in (CLASSIFICATION, SERVE, TWO_PARTY, OOD)}
    generation = sorted(str(p.relative_to(run)) for p in run.glob(GENERATION))
    if not generation:
        notes.append(f"no `{GENERATION}`: {STAGES[GENERATION]} did not run; skipped.")
    parts.update({file: _read(run, file, notes) for file in generation})
    study_file = next((f for f in STUDIES if (run / f).is_file()), None)
    study = _read(run, study_file, notes) if study_file else None
    if study is not None and all(r is None for r in parts.values()):
        notes = [n for n in notes if n.startswith(f"`{study_file}`")]  # a study's own run folder: no demo stages
    for file, result in parts.items():
        if result is None:
            continue
        kind = GENERATION if file.startswith("generation/") else file
        try:
            if kind == CLASSIFICATION:
                body += _classification_section(run, result)
            elif kind == SERVE:
                body += _serve_section(run, result, notes)
            elif kind == TWO_PARTY:
                body += _two_party_section(result)
            elif kind == OOD:
                body += _ood_section(run, result, notes)
            else:
                body += _generation_section(file, result)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            notes.append(f"`{file}` lacks what its section needs ({type(e).__name__}: {e}); section skipped, "
                         f"its figures kept. Rerun {STAGES[kind]}.")
        figures += measured(file, result, MEASURED[kind])
    study_figures: list[str] = []
    if study is not None:
        try:
            body += _study_section(study_file, study)
            study_figures = _study_figures(study_file, study)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            notes.append(f"`{study_file}` lacks what its section needs ({type(e).__name__}: {e}); section skipped. "
                         "Rerun `xsilo study`.")
    lines = [f"# xsilo {'demo' if figures or study is None else 'study'} report: `{run}`", ""]
    if notes:
        lines += ["Notes:", "", *(f"- {n}" for n in notes), ""]
    lines += body
    lines += ["## Figures", "", "Every number the run measured, with the JSON file and key it came from.", ""]
    lines += figures_table(figures) if figures else (["No results found."] if not study_figures else [])
    lines += study_figures
    path = run / "report.md"
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
    return path

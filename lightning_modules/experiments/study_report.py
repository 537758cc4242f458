"""What a study's results say: the collapse verdict of a mapped head (`collapse`), one N×N matrix per metric
(`matrices`, for the heatmaps), the λ-path panels and study.md (`markdown_report`)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from datamodules.cache import slug
from lightning_modules.reporting.charts import short_name
from lightning_modules.reporting.report import regime_rows, regime_title, regime_table

COLLAPSE_SHARE = 0.9      # mapped predictions this concentrated on one class (when the truth is not) collapse
COLLAPSE_F1_RATIO = 0.8   # and so does a mapped macro-F1 below this fraction of the native one
ALIGNMENT = (("r2", "R²"), ("cosine", "cosine"), ("cosine_centered", "centred cosine"), ("cka", "linear CKA"),
             ("mutual_knn", "mutual kNN (k=10)"))


def collapse(mapped: dict[str, Any], native: dict[str, Any]) -> tuple[bool, str | None]:
    """Whether mapped predictions collapsed, and why: concentrated on one class (where the true labels are
    not), or a macro-F1 below COLLAPSE_F1_RATIO × the native head's."""
    reasons = []
    if mapped["top_prediction_share"] >= COLLAPSE_SHARE > mapped["majority_rate"]:
        reasons.append(f"{mapped['top_prediction_share']:.0%} of mapped predictions are one class "
                       f"(the most common true class is {mapped['majority_rate']:.0%})")
    if mapped["macro_f1"] < COLLAPSE_F1_RATIO * native["macro_f1"]:
        reasons.append(f"mapped macro-F1 {mapped['macro_f1']:.3f} < {COLLAPSE_F1_RATIO} × native "
                       f"{native['macro_f1']:.3f}")
    return bool(reasons), "; ".join(reasons) or None


Cell = tuple[float, Sequence[float] | None, float | None]  # value, interval, null
Add = Callable[[str, str, bool, Callable[[dict], Cell], Callable[[str], Cell]], None]


def matrices(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """One N×N matrix per metric (rows: source, columns: target), with its intervals and nulls: the "given"
    regime's under their own names, each other regime's accuracy and drop under `REGIME-...`."""
    models, native = results["models"], results["native"]
    out: dict[str, dict[str, Any]] = {}
    for regime, r in results["regimes"].items():
        pairs = r["pairs"]
        prefix, tag = ("", "") if regime == "given" else (f"{regime}-", f"{regime} public sets, ")

        def add(name: str, title: str, diverging: bool, off: Callable[[dict], Cell], diagonal: Callable[[str], Cell],
                pairs: dict = pairs, prefix: str = prefix, tag: str = tag, regime: str = regime) -> None:
            cells = [[diagonal(s) if s == t else off(pairs[f"{s} -> {t}"]) for t in models] for s in models]
            parts = {part: [[c[i] for c in row] for row in cells] for i, part in enumerate(("matrix", "ci", "null"))}
            out[prefix + name] = {"title": tag + title, "diverging": diverging, "regime": regime, **parts}

        for task in results["config"]["tasks"]:
            _task_matrices(add, native, task)
            for name in results["config"]["ood"]:
                _ood_matrices(add, native, task, name)
        if regime == "given":
            for key, label in ALIGNMENT:
                _alignment_matrix(add, key, label, results["config"]["tasks"][0])
    return out


def _task_matrices(add: Add, native: dict, task: str) -> None:
    def mapped(p: dict) -> dict:
        return p["tasks"][task]

    def accuracy(p: dict) -> Cell:
        return mapped(p)["mapped"]["accuracy"], mapped(p)["mapped"]["accuracy_ci"], mapped(p)["null_map"]["accuracy"]

    key = slug(task, suffix=False)
    add(f"accuracy-{key}", f"{short_name(task)}: test accuracy (diagonal native, else mapped)", False,
        accuracy, lambda m: (native[m][task]["accuracy"], native[m][task]["accuracy_ci"], None))
    add(f"drop-{key}", f"{short_name(task)}: accuracy drop (target native − mapped)", True,
        lambda p: (mapped(p)["mapped_drop"], mapped(p)["mapped_drop_ci"], None), lambda m: (0.0, None, None))


def _ood_matrices(add: Add, native: dict, task: str, name: str) -> None:
    def mapped(p: dict) -> dict:
        return p["tasks"][task]["ood"][name]

    title, key = f"{short_name(task)} vs {short_name(name)}", f"{slug(task, suffix=False)}-{slug(name, suffix=False)}"
    add(f"ood-auroc-{key}", f"{title}: AUROC (diagonal native, else mapped)", False,
        lambda p: (mapped(p)["auroc"], mapped(p)["auroc_ci"], None),
        lambda m: (native[m][task]["ood"][name]["auroc"], native[m][task]["ood"][name]["auroc_ci"], None))
    add(f"ood-drop-{key}", f"{title}: AUROC drop (target native − mapped)", True,
        lambda p: (mapped(p)["auroc_drop"], mapped(p)["auroc_drop_ci"], None), lambda m: (0.0, None, None))


def _alignment_matrix(add: Add, key: str, label: str, task: str) -> None:
    def alignment(p: dict) -> dict:
        return p["tasks"][task]["alignment"]

    add(key, f"{label}, held-out public rows, the maps λ was chosen for on {short_name(task)} (diagonal: identity)",
        False, lambda p: (alignment(p)[key], None, alignment(p)[f"{key}_null"]), lambda m: (1.0, None, None))


def _cell(value: float, ci: Sequence[float] | None, null: float | None) -> str:
    text = f"{value:.3f}"
    if ci:
        text += f" [{ci[0]:.3f}, {ci[1]:.3f}]"
    if null is not None:
        text += f" (null {null:.3f})"
    return text


CEILING_F1_RATIO = 0.9  # a row passes when free of collapse with mapped macro-F1 >= this × the ceiling's


def ceiling_summary(results: dict[str, Any], regime: str) -> dict[str, Any]:
    """A regime against the linear ceiling, min(native source, native target) (a map followed by the target's
    linear head is a linear head on the source's states): the rows free of collapse whose mapped macro-F1 is at
    least CEILING_F1_RATIO × the ceiling's, and the mean accuracy gap to the ceiling in points."""
    native, passing, gaps = results["native"], 0, []
    for pair in results["regimes"][regime]["pairs"].values():
        for task, view in pair["tasks"].items():
            ends = (native[pair["source"]][task], native[pair["target"]][task])
            f1 = min(n["macro_f1"] for n in ends)
            passing += not view["collapse"] and view["mapped"]["macro_f1"] >= CEILING_F1_RATIO * f1
            gaps.append(min(n["accuracy"] for n in ends) - view["mapped"]["accuracy"])
    return {"passing": passing, "rows": len(gaps), "mean_gap_points": round(100 * float(np.mean(gaps)), 2)}


def markdown_report(results: dict[str, Any]) -> str:
    cfg, labels, models = results["config"], results["labels"], results["models"]
    fits = results["fits"]
    level = f"{cfg['confidence']:.0%}"
    lines = [
        f"# Convergence study: {len(models)} models, regimes {', '.join(results['regimes'])}",
        "",
        "Models: " + ", ".join(f"`{labels[m]}`" + (f" ({m})" if labels[m] != m else "") for m in models) + ".",
        f"Tasks: {', '.join(cfg['tasks'])}." + (f" OOD sets: {', '.join(cfg['ood'])} (detector "
                                                  f"{cfg['ood_detector']})." if cfg["ood"] else ""),
        f"Rows are the source, columns the target. Intervals: {level} percentile bootstrap over test rows "
        f"({cfg['bootstrap']} resamples; drops are paired). Fitted: {fits['classifiers']} classifiers, "
        f"{fits['detectors']} detectors, {fits['aligners']} maps.",
    ]
    for regime in results["regimes"]:
        rows = regime_rows(results, regime)
        flagged = [f"{r['task']} {r['pair']}" for r in rows if r["collapse"]]
        lines += ["", f"## Regime: {regime_title(regime)}", "",
                  _public_note(results, regime),
                  f"Collapse (top-prediction share >= {COLLAPSE_SHARE} where the majority rate is below it, or mapped "
                  f"macro-F1 < {COLLAPSE_F1_RATIO} × native): "
                  + (f"**{len(flagged)} of {len(rows)} rows flagged** ({', '.join(flagged)})." if flagged
                     else f"none of {len(rows)} rows."), _ceiling_note(ceiling_summary(results, regime)), "",
                  *regime_table(results, regime)]
        if regime in results.get("lambda_paths", {}):
            file = results["lambda_paths"][regime]
            lines += ["", f"Mapped test accuracy along the λ path, each criterion's choice marked: [{file}]({file})",
                      "", f"![λ path, {regime}]({file})"]
    for name, m in results["heatmaps"].items():
        lines += ["", f"## {m['title']}", "", f"![{name}]({m['file']})", "",
                  "| source ↓ target → | " + " | ".join(labels[t] for t in models) + " |",
                  "|---|" + "---|" * len(models)]
        for i, s in enumerate(models):
            cells = (_cell(m["matrix"][i][j], m["ci"][i][j], m["null"][i][j]) for j in range(len(models)))
            lines.append(f"| {labels[s]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _ceiling_note(summary: dict[str, Any]) -> str:
    return (f"Against the linear ceiling, min(native source, native target): **{summary['passing']} of "
            f"{summary['rows']} rows** free of collapse with macro-F1 >= {CEILING_F1_RATIO} × the ceiling's; mean "
            f"accuracy gap to it {summary['mean_gap_points']:.1f} points.")


def _public_note(results: dict[str, Any], regime: str) -> str:
    public = results["regimes"][regime]["public"]
    if regime == "given":
        return f"Every map is fitted on `{public['data']}` (limit {public['limit']})."
    return "Public set per task: " + "; ".join(
        f"{short_name(task)}: `{p['recipe']['name']}`, {p['rows']} rows ("
        + ", ".join(f"{short_name(k)} {v}" for k, v in p["selected"].items()) + ")" for task, p in public.items()) + "."


def lambda_panels(results: dict[str, Any], regime: str) -> dict[str, dict[str, dict[str, Any]]]:
    """The λ-path plot's data of a regime: {task: {pair: its lambda_path}}."""
    pairs = results["regimes"][regime]["pairs"]
    def panel(path: dict[str, Any]) -> dict[str, Any]:
        return {"lambdas": [q["lambda"] for q in path["points"]], "accuracy": [q["accuracy"] for q in path["points"]],
                "chosen": {c: v["lambda"] for c, v in path["chosen"].items()}}

    return {task: {f"{short_name(p['source'])} -> {short_name(p['target'])}": panel(p["tasks"][task]["lambda_path"])
                   for p in pairs.values() if p["tasks"][task].get("lambda_path")}
            for task in results["config"]["tasks"]}

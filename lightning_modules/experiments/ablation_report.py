"""The ablation's report: ablation.md (one table per factor, the λ-path lines) and ablation.png (mapped accuracy of
every setting beside native and the null map)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from lightning_modules.reporting.charts import figure, save_png, short_name, wrap_title


def _f(x: float | None, digits: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def markdown_report(results: dict[str, Any]) -> str:
    cfg = results["config"]
    level = f"{cfg['confidence']:.0%}"
    base = ", ".join(f"{k}={v}" for k, v in cfg["base"].items())
    lines = [f"# Ablation: {results['pair']} on {results['task']}", "",
             f"Base recipe: {base}. Each factor varies alone. Task split: stratified 70/15/15, seed "
             f"{cfg['seed']}" + (f", {cfg['task_limit']} rows" if cfg["task_limit"] else "") +
             f". Intervals: {level} bootstrap over test rows ({cfg['bootstrap']} resamples; drops paired). "
             f"Public sets never hold the task's validation/test texts" +
             (f" nor the OOD sets ({', '.join(cfg['ood'])})" if cfg["ood"] else "") + ".",
             f"Fitted: {results['fits']['classifiers']} classifiers, {results['fits']['aligners']} maps, "
             f"{results['fits']['public_sets']} public sets; new forward passes: {results['fits']['forward_passes']}."
             + (f" Every adapted setting takes the synthetic set of {cfg['synthetic']} as anchors (at its anchor "
                "weight, 0.3 unless named)." if cfg.get("synthetic") else ""),
             "'native source' is the source's own linear head: an affine map followed by the target's linear head is "
             "itself a linear head on source states, so it is roughly the ceiling of mapped accuracy. R²/CKA 'task "
             "test': mapped vs true target states of the task's test texts. 'top share': the share of mapped "
             "predictions on the most-predicted class, beside the majority-class rate of the true labels; COLLAPSE: "
             "top share >= 0.9 where the majority rate is not, or mapped macro-F1 < 0.8 × native.",
             "", "| native head | accuracy | macro-F1 | majority rate |", "|---|---|---|---|"]
    for name, r in results["native"].items():
        lines.append(f"| {name} | {_f(r['accuracy'])} [{_f(r['accuracy_ci'][0])}, {_f(r['accuracy_ci'][1])}] | "
                     f"{_f(r.get('macro_f1'))} | {_f(r.get('majority_rate'))} |")
    ood_names = list(cfg["ood"])
    by_factor: dict[str, list] = {}
    for row in results["settings"]:
        by_factor.setdefault(row["factor"], []).append(row)
    for factor, rows in by_factor.items():
        head = ["setting", "public rows", "mapped acc", "drop", "macro-F1", "top share", "null", "native source",
                "R² public", "CKA public", "R² task test", "CKA task test", "λ"]
        head += [f"AUROC {n} (drop)" for n in ood_names]
        lines += ["", f"## {factor}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            if r["status"] != "ok":
                lines.append(f"| {r['value']} | skipped: {r['reason']} |" + " |" * (len(head) - 2))
                continue
            m, ap, at = r["mapped"], r["alignment_public"], r["alignment_task_test"]
            cells = [r["value"] + (f" (task rows {r['task_limit']})" if r["task_limit"] != cfg["task_limit"] else ""),
                     f"{r['public']['train']}+{r['public']['heldout']}",
                     f"{_f(m['accuracy'])} [{_f(m['accuracy_ci'][0])}, {_f(m['accuracy_ci'][1])}]",
                     f"{r['mapped_drop']:+.3f} [{r['mapped_drop_ci'][0]:+.3f}, {r['mapped_drop_ci'][1]:+.3f}]",
                     _f(m["macro_f1"]) + (" COLLAPSE" if r.get("collapse") else ""),
                     f"{_f(m['top_prediction_share'])} (majority {_f(m['majority_rate'])})",
                     _f(r["null_map"]["accuracy"]), _f(r["native_source"]), _f(ap["r2"]), _f(ap["cka"]), _f(at["r2"]), _f(at["cka"]),
                     (f"{r['chosen_lambda']:g}" + (f" ({r['lambda_path']['criterion']})"
                                                   if r.get("lambda_path", {}).get("criterion") else ""))
                     if r.get("chosen_lambda") else "–"]
            for n in ood_names:
                o = r.get("ood", {}).get(n)
                cells.append(f"{_f(o['auroc'])} ({o['auroc_drop']:+.3f})" if o else "–")
            lines.append("| " + " | ".join(cells) + " |")
        if factor == "criterion":
            lines += _path_lines(rows)
    return "\n".join(lines) + "\n"


def _path_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Under the criterion table: the λ each criterion chose on the ridge path, and the path's best λ in hindsight
    (chosen on the TEST labels: an oracle, not a recipe; it says whether any λ avoids collapse)."""
    row = next((r for r in rows if r["status"] == "ok" and r.get("lambda_path", {}).get("points")), None)
    if row is None:
        return []
    path = row["lambda_path"]
    best = max(path["points"], key=lambda p: (p["macro_f1"], p["accuracy"]))
    chosen = "; ".join(f"{c}: λ={v['lambda']:g} (accuracy {_f(v['accuracy'])}, macro-F1 {_f(v['macro_f1'])})"
                       for c, v in path["chosen"].items())
    return ["", f"λ path ({len(path['points'])} values): {chosen}. Best on the path in hindsight (test labels, an "
                f"oracle): λ={best['lambda']:g}, accuracy {_f(best['accuracy'])}, macro-F1 {_f(best['macro_f1'])}, "
                f"top-prediction share {_f(best['top_prediction_share'])}."]


def plot(results: dict[str, Any], path: Path) -> Path:
    """One panel per factor: mapped accuracy per setting (bars, with intervals), native and null lines."""
    by_factor: dict[str, list] = {}
    for row in results["settings"]:
        if row["factor"] != "base":
            by_factor.setdefault(row["factor"], []).append(row)
    panels = list(by_factor.items()) or [("base", [r for r in results["settings"]])]
    fig = figure(6.5, 1.2 + 2.2 * len(panels))
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, (factor, rows) in zip(axes, panels):
        labels = [r["value"][:38] for r in rows]
        acc = [r["mapped"]["accuracy"] if r["status"] == "ok" else 0.0 for r in rows]
        err = [[a - r["mapped"]["accuracy_ci"][0] if r["status"] == "ok" else 0 for a, r in zip(acc, rows)],
               [r["mapped"]["accuracy_ci"][1] - a if r["status"] == "ok" else 0 for a, r in zip(acc, rows)]]
        y = np.arange(len(rows))
        ax.barh(y, acc, xerr=err, zorder=2, color=["#4c72b0" if r["status"] == "ok" else "#dddddd" for r in rows])
        for i, r in enumerate(rows):
            if r["status"] == "ok":
                ax.plot([r["native_target"]] * 2, [i - 0.4, i + 0.4], color="black", lw=1.5, zorder=3)
                ax.plot([r["null_map"]["accuracy"]] * 2, [i - 0.4, i + 0.4], color="#c44e52", lw=1.5, zorder=3)
            else:
                ax.text(0.01, i, "skipped (extraction budget)", va="center", fontsize=7)
        ax.set_yticks(y, labels, fontsize=7)
        ax.set_xlim(0, 1)
        ax.set_title(factor, fontsize=9)
    fig.suptitle(wrap_title(6.5, f"{results['pair']} on {short_name(results['task'])}: mapped accuracy (bars, 95% "
                             "interval); black: native target, red: null map"), fontsize=9)
    return save_png(fig, path)

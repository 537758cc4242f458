"""Where a generation run falls against the paper (`paper_prediction`), how agreement moves between two fits
of one pair (`compare_generation`), and the run's metrics.json / metrics.md."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from datamodules.cache import atomic_write_bytes, atomic_write_json
from lightning_modules.generation.sampling import GenerationError

# The paper's generation findings (PAPER_NOTES.md): every source under 4B parameters fails, and pairs
# that work have an exact-token-match rate >= 0.67.
PAPER_MIN_SOURCE_PARAMETERS = 4_000_000_000
PAPER_MIN_EXACT_MATCH = 0.67
# The paper judges generated text; ours "works" when the mapped state picks the target's own next token
# on at least half of the held-out positions AND the target finds the mapped greedy text at most twice
# as perplexing as its own greedy text (teacher-forced agreement alone misses degenerate free-running text).
WORKS_TOP1 = 0.5
WORKS_PERPLEXITY_RATIO = 2.0


def load_generation_metrics(path: str | Path) -> dict[str, Any]:
    """An `evaluate_generation` metrics.json (the file or its run folder), checked for the keys compared."""
    path = Path(path).expanduser()
    path = path / "metrics.json" if path.is_dir() else path
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise GenerationError(f"cannot read generation metrics {path} ({e}); pass the metrics.json (or the --out "
                              "folder) of an earlier `xsilo evaluate_generation` run") from e
    if not isinstance(results, dict) or not {"pair", "rows", "positions", "texts"} <= results.keys():
        raise GenerationError(f"{path} is not the metrics.json of `xsilo evaluate_generation` (no pair, rows, "
                              "positions and texts); pass that run's metrics.json or --out folder")
    return results


def _parameters(n: int) -> str:
    return f"{n / 1e9:.1f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e5 else f"{n:,}"


def paper_prediction(results: dict[str, Any]) -> dict[str, Any]:
    """What the paper predicts for this pair (sources under 4B fail; exact match < 0.67 fails), what we
    observe (works: mapped top-1 >= WORKS_TOP1 and perplexity ratio <= WORKS_PERPLEXITY_RATIO), whether
    they agree, and a sentence saying so."""
    if "exact_token_match" not in results["compatibility"] or "models" not in results:
        raise GenerationError(f"the metrics of {results.get('pair')!r} predate the exact-token-match rate; re-run "
                              "`xsilo evaluate_generation` for this pair")
    params = int(results["models"]["source"]["parameters"])
    exact = float(results["compatibility"]["exact_token_match"])
    reasons = []
    if params < PAPER_MIN_SOURCE_PARAMETERS:
        reasons.append(f"the source has {_parameters(params)} parameters, under 4 B")
    if exact < PAPER_MIN_EXACT_MATCH:
        reasons.append(f"exact token match {exact:.2f}, under {PAPER_MIN_EXACT_MATCH}")
    rows = results["rows"]
    top1, null = float(rows["mapped"]["top1"]), float(rows["null"]["top1"])
    mapped_ppl, own_ppl = float(rows["mapped"]["perplexity"]), float(rows["identity"]["perplexity"])
    ratio = mapped_ppl / own_ppl if own_ppl > 0 else float("nan")
    works = top1 >= WORKS_TOP1 and math.isfinite(ratio) and ratio <= WORKS_PERPLEXITY_RATIO
    predicted, observed = ("fail" if reasons else "work"), ("works" if works else "fails")
    as_predicted = (predicted == "fail") == (observed == "fails")
    why = "; ".join(reasons) if reasons else (f"the source has {_parameters(params)} parameters and exact token "
                                              f"match {exact:.2f}, both at or above the paper's thresholds")
    text = (f"{results['pair']}: the paper predicts it {'fails' if reasons else 'can work'} ({why}). Observed: the "
            f"mapped source states pick the target's own next token at {top1:.1%} of held-out positions (null map "
            f"{null:.1%}, {top1 - null:+.1%} over it), and the target finds the mapped greedy text {ratio:.1f}x as "
            f"perplexing as its own ({mapped_ppl:.1f} vs {own_ppl:.1f}); works needs at least {WORKS_TOP1:.0%} and "
            f"at most {WORKS_PERPLEXITY_RATIO:g}x, so it {observed}, "
            + ("as the paper predicts." if as_predicted else "against the paper's prediction."))
    return {"predicted": predicted, "observed": observed, "as_predicted": as_predicted, "reasons": reasons,
            "source_parameters": params, "exact_token_match": exact, "mapped_top1": top1, "null_top1": null,
            "lift_over_null": top1 - null, "perplexity_ratio": ratio, "works_top1": WORKS_TOP1,
            "works_perplexity_ratio": WORKS_PERPLEXITY_RATIO, "text": text}


def compare_generation(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """How next-token agreement moves from one fit (e.g. 2,000 texts) to another (e.g. 4,000) of the same pair."""
    if before["pair"] != after["pair"]:
        raise GenerationError(f"cannot compare {before['pair']!r} with {after['pair']!r}: pass a baseline run of "
                              "the same source -> target pair")
    pick = lambda r, row, key: float(r["rows"][row][key])  # noqa: E731
    out = {"pair": after["pair"],
           "train_texts": [before["texts"]["train"], after["texts"]["train"]],
           "train_positions": [before["positions"]["train"], after["positions"]["train"]],
           **{f"{row}_{key}": [pick(before, row, key), pick(after, row, key)]
              for row in ("mapped", "null") for key in ("top1", "top5", "kl")}}
    out["top1_rise"] = out["mapped_top1"][1] - out["mapped_top1"][0]
    out["text"] = (f"From {out['train_texts'][0]:,} to {out['train_texts'][1]:,} training texts "
                   f"({out['train_positions'][0]:,} -> {out['train_positions'][1]:,} paired positions), mapped top-1 "
                   f"agreement goes {out['mapped_top1'][0]:.1%} -> {out['mapped_top1'][1]:.1%} "
                   f"({out['top1_rise']:+.1%}; null {out['null_top1'][0]:.1%} -> {out['null_top1'][1]:.1%}), "
                   f"KL {out['mapped_kl'][0]:.2f} -> {out['mapped_kl'][1]:.2f}. Each run scores its own held-out "
                   "texts.")
    return out


def prediction_markdown(results: dict[str, Any]) -> str:
    """The paper-prediction paragraph (and the comparison with a baseline fit, if any) of one run's metrics."""
    lines = [f"Against the paper: {paper_prediction(results)['text']}"]
    if "comparison" in results:
        lines.append(f"More public texts: {results['comparison']['text']}")
    return "\n\n".join(lines) + "\n"


def markdown_report(results: dict[str, Any]) -> str:
    c, p, rows = results["compatibility"], results["positions"], results["rows"]
    lam = results.get("chosen_lambda")
    lines = [
        f"## Cross-model generation: {results['pair']}",
        "",
        f"Tokenizers: {c['source_boundary_match']:.1%} of source token ends match a target token end "
        f"({c['target_boundary_match']:.1%} of target ends); exact token match {c['exact_token_match']:.1%} of "
        f"aligned positions read one identical token ({c['source_exact_match']:.1%} of source tokens); "
        f"vocabulary overlap {c['shared_vocab']:,} strings "
        f"(Jaccard {c['vocab_jaccard']:.3f}, {c['source_vocab_shared']:.1%} of the source's).",
        f"Paired positions: {p['train']:,} train, {p['val']:,} val, {p['test']:,} held-out test "
        f"({results['texts']['test']} texts)." + (f" Ridge λ (relative): {lam:.0e}." if lam is not None else ""),
        "",
        "| next-token head on | top-1 | top-5 | KL(target ‖ row) | target ppl of greedy text | tokens/s |",
        "|---|---|---|---|---|---|",
    ]
    labels = {"identity": "target's own states (identity)", "mapped": "mapped source states",
              "null": "null map (shuffled pairs)"}
    for name, label in labels.items():
        r = rows[name]
        lines.append(f"| {label} | {r['top1']:.3f} | {r['top5']:.3f} | {r['kl']:.3f} | {r['perplexity']:.1f} "
                     f"| {r['tokens_per_second']:.1f} |")
    lines += ["", "| prompt | mapped (source reads, target writes) | target alone | source alone |",
              "|---|---|---|---|"]
    cell = lambda s: repr(s)[1:-1].replace("|", "\\|")  # noqa: E731
    for s in results["samples"]:
        cells = (s["prompt"], s["mapped"], s["identity"], s["source_native"])
        lines.append("| " + " | ".join(cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n\n" + prediction_markdown(results)


def write_report(results: dict[str, Any], out: Path) -> None:
    atomic_write_json(out / "metrics.json", results)
    atomic_write_bytes(out / "metrics.md", markdown_report(results).encode())

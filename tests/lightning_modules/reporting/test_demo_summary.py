"""The table that ends `make demo`: every stage with its time, headline figure and file."""

from __future__ import annotations

import json

from lightning_modules.reporting.demo_summary import summary


def test_the_summary_names_each_stage_its_figure_and_file_and_says_what_is_missing(tmp_path):
    run = tmp_path / "demo"
    (run / "bbc").mkdir(parents=True)
    (run / "ood").mkdir()
    (run / "stage-times.tsv").write_text("1\tassets\t2\n3\tfit\t9\n5\tserve\t22\n6\ttwo-party\t204\n7\tood\t200\n")
    (run / "bbc" / "metrics.json").write_text(json.dumps({
        "rows": {"task_test": 60},
        "classification": {"mapped": {"accuracy": 0.767}, "native_target": {"accuracy": 0.817},
                           "null_map": {"accuracy": 0.117}}}))
    (run / "ood" / "ood.json").write_text(json.dumps({"deployable": {
        "chosen": "knn@source", "candidates": {"knn@source": {"test_auroc_mean": 0.861, "val_auroc_mean": 0.869}}}}))
    (run / "ood" / "samples.json").write_text(json.dumps({"right": 3, "total": 6}))
    (run / "two-party-summary.json").write_text(json.dumps({
        "split_accuracy": 0.767, "lab_mapped_accuracy": 0.767, "fused_accuracy": 0.8,
        "map_weight_rel_error_vs_lab": 4.6e-7, "split_median_total_ms": 237.0}))
    lines = summary(run).splitlines()
    assert lines[0].split() == ["stage", "time", "headline", "file"]
    fit = next(l for l in lines if l.startswith("3. fit"))
    assert "9s" in fit and "mapped 0.767 vs native 0.817, null 0.117 (60 test docs)" in fit
    assert fit.endswith(str(run / "bbc" / "metrics.json"))
    ood = next(l for l in lines if l.startswith("7. ood"))
    assert "knn@source: test AUROC 0.861 (val 0.869); samples right 3/6" in ood
    two = next(l for l in lines if l.startswith("6. two-party"))
    assert "split 0.767 (lab 0.767, fused 0.800); private map = lab map to 5e-07, median 237 ms" in two
    (run / "two-party-summary.json").write_text(json.dumps({  # the queried map adapted by `align --private`
        "split_accuracy": 0.917, "public_map_accuracy": 0.6, "lab_mapped_accuracy": 0.767, "fused_accuracy": 0.8,
        "map_weight_rel_error_vs_lab": 4.6e-7, "split_median_total_ms": 237.0, "adaptation": {"private_rows": 280}}))
    two = next(l for l in summary(run).splitlines() if l.startswith("6. two-party"))
    assert ("split 0.917 adapted to 280 private texts (public map 0.600, lab 0.767, fused 0.800); public map = lab "
            "map to 5e-07, median 237 ms") in two
    serve = next(l for l in lines if l.startswith("5. serve"))
    assert f"missing: {run / 'serve.json'}" in serve  # a stage without its file says so
    assert lines[-1] == "total 7.3 min (437 s)"


def test_the_science_stage_reports_each_regime_against_native_and_its_collapses(tmp_path):
    run = tmp_path / "demo"
    (run / "study").mkdir(parents=True)
    (run / "stage-times.tsv").write_text("9\tscience\t80\n10\treport\t2\n")
    row = lambda acc, drop, collapse: {"mapped": {"accuracy": acc}, "mapped_drop": drop, "collapse": collapse}  # noqa: E731
    (run / "study" / "study.json").write_text(json.dumps({"regimes": {
        "in-domain": {"pairs": {"a -> b": {"tasks": {"bbc": row(0.8, 0.0, False)}},
                                "b -> a": {"tasks": {"bbc": row(0.7, 0.1, False)}}}},
        "leave-task-out": {"pairs": {"a -> b": {"tasks": {"bbc": row(0.3, 0.5, True)}},
                                     "b -> a": {"tasks": {"bbc": row(0.6, 0.2, False)}}}}}}))
    lines = summary(run).splitlines()
    science = next(l for l in lines if l.startswith("9. science"))
    assert "in-domain mapped 0.75 vs native 0.80, 0/2 collapsed" in science
    assert "leave-task-out mapped 0.45 vs native 0.80, 1/2 collapsed" in science
    assert next(l for l in lines if l.startswith("10. report")).endswith(str(run / "report.md"))

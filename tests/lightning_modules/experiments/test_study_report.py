"""The convergence study (bootstrap intervals, every ordered pair, reuse) and the traceable demo report."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score, roc_curve

import datamodules.states
import lightning_modules.evaluation.evaluate
import lightning_modules.evaluation.ood
import lightning_modules.experiments.study
from datamodules.cache import atomic_write_json
from lightning_modules.evaluation.evaluate import PairConfig, evaluate_pair
from lightning_modules.evaluation.ood import OODConfig, evaluate_ood
from lightning_modules.evaluation.ood_detectors import detection_metrics, roc_points
from lightning_modules.reporting.report import ReportError, lookup, write_demo_report
from lightning_modules.settings import FitSettings, HeadSettings, PublicSetSettings
from lightning_modules.evaluation.bootstrap import auroc_ci, auroc_drop_ci, mean_ci
from lightning_modules.experiments.study import (StudyConfig, StudyError, auroc, check_inputs,
                                     run_study)

from tests.tiny import write_tiny_csv

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --- bootstrap (torchmetrics BootStrapper) and AUROC ------------------------------------------------

def test_accuracy_interval_contains_the_estimate_shrinks_with_rows_and_is_seeded():
    rng = np.random.default_rng(0)
    widths = []
    for n in (100, 2500):
        correct = (rng.random(n) < 0.8).astype(float)
        lo, hi = mean_ci(correct, n_resamples=1000, seed=0)
        assert lo <= correct.mean() <= hi
        widths.append(hi - lo)
        assert mean_ci(correct, n_resamples=1000, seed=0) == (lo, hi)
    assert widths[1] < widths[0] / 3  # width ~ 1/sqrt(n): 25x the rows, about 1/5 the width


def test_auroc_matches_detection_metrics_and_its_interval_shrinks():
    rng = np.random.default_rng(1)
    widths = []
    for n in (60, 1500):
        id_scores, ood_scores = np.round(rng.normal(0, 1, n), 1), np.round(rng.normal(1, 1, n), 1)  # ties
        value = auroc(id_scores, ood_scores)
        is_ood = np.r_[np.zeros(n), np.ones(n)]
        assert value == pytest.approx(roc_auc_score(is_ood, np.r_[id_scores, ood_scores]), abs=1e-12)
        assert value == pytest.approx(detection_metrics(torch.from_numpy(id_scores),
                                                        torch.from_numpy(ood_scores))["auroc"], abs=1e-12)
        lo, hi = auroc_ci(id_scores, ood_scores, n_resamples=500, seed=0)
        assert lo <= value <= hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 3
    # the same view twice: a paired drop of exactly zero
    assert auroc_drop_ci((id_scores, ood_scores), (id_scores, ood_scores), n_resamples=50) == (0.0, 0.0)


def test_roc_points_follow_scikit_learn():
    rng = np.random.default_rng(2)
    id_scores, ood_scores = np.round(rng.normal(0, 1, 300), 1), np.round(rng.normal(1, 1, 200), 1)
    roc = roc_points(torch.from_numpy(id_scores), torch.from_numpy(ood_scores))
    fpr, tpr, _ = roc_curve(np.r_[np.zeros(300), np.ones(200)], np.r_[id_scores, ood_scores])
    assert len(roc["fpr"]) == 101 and roc["tpr"][-1] == 1.0
    expected = [tpr[fpr <= x + 1e-9].max() for x in roc["fpr"]]
    np.testing.assert_allclose(roc["tpr"], expected, atol=1e-6)


# --- the study on tiny models -------------------------------------------------------------------

def _count(monkeypatch, module, name: str, calls: list) -> None:
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)


@pytest.fixture(scope="module")
def studied(tiny_models, tmp_path_factory):
    """Two models, then a third added: what the second study extracts and fits."""
    root = tmp_path_factory.mktemp("study")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XSILO_HOME", str(root / "home"))
        task = write_tiny_csv(root / "task.csv", n=90, seed=3)
        cfg = StudyConfig(models=[str(tiny_models["llama"]), str(tiny_models["gpt2"])], tasks=[str(task)],
                          public=PublicSetSettings(str(write_tiny_csv(root / "public.csv", n=120, seed=4)), limit=None),
                          ood=[str(write_tiny_csv(root / "other.csv", n=40, seed=9, n_classes=5))],
                          head=HeadSettings(epochs=10), fit=FitSettings(lambdas=(1e-2, 1.0)), bootstrap=200)
        first = run_study(cfg, out=root / "two")
        extracted, classifiers = [], []
        for module in (datamodules.states, lightning_modules.evaluation.evaluate, lightning_modules.evaluation.ood):  # each extraction site
            _count(mp, module, "extract", extracted)
        _count(mp, lightning_modules.experiments.study, "fit_classifier", classifiers)
        cfg.models = [*cfg.models, str(tiny_models["bert"])]
        second = run_study(cfg, out=root / "three")
        return root, cfg, first, second, extracted, classifiers


def test_the_study_covers_every_ordered_pair_and_its_heatmaps(studied):
    root, cfg, first, second, _, _ = studied
    models = cfg.models
    assert set(first["regimes"]) == {"given"}
    assert set(first["regimes"]["given"]["pairs"]) == {f"{models[0]} -> {models[1]}", f"{models[1]} -> {models[0]}"}
    assert set(second["regimes"]["given"]["pairs"]) == {f"{s} -> {t}" for s in models for t in models if s != t}
    (task,), (ood,) = cfg.tasks, cfg.ood
    for pair in second["regimes"]["given"]["pairs"].values():
        t = pair["tasks"][task]
        for name in ("r2", "cosine", "cka", "mutual_knn"):
            assert np.isfinite(t["alignment"][name]) and np.isfinite(t["alignment"][name + "_null"])
        lo, hi = t["mapped"]["accuracy_ci"]
        assert lo <= t["mapped"]["accuracy"] <= hi
        native = second["native"][pair["target"]][task]
        assert t["mapped_drop"] == pytest.approx(native["accuracy"] - t["mapped"]["accuracy"])
        o = t["ood"][ood]
        assert o["auroc_ci"][0] <= o["auroc"] <= o["auroc_ci"][1]
        assert o["auroc_drop"] == pytest.approx(native["ood"][ood]["auroc"] - o["auroc"])
    saved = json.loads((root / "three" / "study.json").read_text())
    md = (root / "three" / "study.md").read_text()
    accuracy = saved["heatmaps"]["accuracy-task"]["matrix"]
    for i, m in enumerate(models):
        assert accuracy[i][i] == saved["native"][m][task]["accuracy"]  # the diagonal is the model itself
    assert {"r2", "cka", "mutual_knn", "drop-task", "ood-auroc-task-other"} <= set(saved["heatmaps"])
    ci, null = saved["heatmaps"]["accuracy-task"]["ci"][0][1], saved["heatmaps"]["accuracy-task"]["null"][0][1]
    assert f"{accuracy[0][1]:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] (null {null:.3f})" in md
    for m in saved["heatmaps"].values():
        path = root / "three" / m["file"]
        assert path.read_bytes()[:8] == PNG_MAGIC and f"]({m['file']})" in md
        import matplotlib.image

        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and min(image.shape[:2]) > 100


def test_adding_a_model_extracts_only_that_model_and_fits_each_head_once(studied):
    _, cfg, first, second, extracted, classifiers = studied
    new = cfg.models[-1]
    # public set, task and OOD set of the new model; the other two models' states came from the cache
    assert sorted(c.data for c in extracted) == sorted([cfg.public.data, cfg.tasks[0], cfg.ood[0]])
    assert {c.model for c in extracted} == {new}
    assert len(classifiers) == 3
    assert second["fits"] == {"classifiers": 3, "detectors": 3, "aligners": 6, "public_sets": 0}
    assert first["fits"] == {"classifiers": 2, "detectors": 2, "aligners": 2, "public_sets": 0}


def test_bad_study_input_names_the_fix(tiny_models, tmp_path):
    model = str(tiny_models["llama"])
    with pytest.raises(StudyError, match="at least 2 models"):
        StudyConfig(models=[model], tasks=["t"]).validate()
    with pytest.raises(StudyError, match="more than once"):
        StudyConfig(models=[model, model], tasks=["t"]).validate()
    with pytest.raises(StudyError, match="drop it from --ood"):
        StudyConfig(models=[model, "b"], tasks=["t"], ood=["t"]).validate()
    public = write_tiny_csv(tmp_path / "public.csv", n=30)
    with pytest.raises(StudyError, match="unknown model .*no-such-model"):
        check_inputs(StudyConfig(models=[model, str(tmp_path / "no-such-model")], tasks=[str(public)],
                                 public=PublicSetSettings(str(public))))
    unlabelled = tmp_path / "texts.csv"
    unlabelled.write_text("text\nthe film\na bank\n")
    with pytest.raises(StudyError, match="has no labels"):
        check_inputs(StudyConfig(models=[model, str(tiny_models["gpt2"])], tasks=[str(unlabelled)],
                                 public=PublicSetSettings(str(public))))


# --- the demo report ----------------------------------------------------------------------------

TWO_PARTY = {"lab_mapped_accuracy": 0.767, "fused_accuracy": 0.8, "split_accuracy": 0.767, "split_queries": 60,
             "map_weight_rel_error_vs_lab": 3e-7, "lambda_lab": 0.01, "lambda_private": 0.01}
SERVE = {"queries": 4, "agree": 4, "max_abs_logit_diff": 3.1e-05, "accuracy_encrypted": 0.75,
         "accuracy_plaintext": 0.75, "median_extract_ms": 21.5, "median_encrypt_ms": 12.25,
         "median_http_ms": 30.0, "median_server_ms": 180.75, "median_decrypt_ms": 1.5, "median_total_ms": 246.0,
         "p90_total_ms": 260.5}
GENERATION = {"pair": "a -> b", "positions": {"train": 900, "val": 120, "test": 140},
              "texts": {"train": 80, "val": 10, "test": 10}, "chosen_lambda": 0.01, "stats_seconds": 1.25,
              "compatibility": {"source_boundary_match": 0.97, "vocab_jaccard": 0.4},
              "rows": {v: {"positions": 140, "top1": t, "top5": t + 0.1, "kl": 1.5 - t, "perplexity": 9.5,
                           "tokens_per_second": 40.0, "generated_tokens": 60}
                       for v, t in (("identity", 0.875), ("mapped", 0.5), ("null", 0.0625))},
              "samples": [{"prompt": "The capital of France is", "identity": " Paris, a city",
                           "mapped": " Paris | and", "null": " the the", "source_native": " Paris."}]}


@pytest.fixture(scope="module")
def demo_run(studied, tmp_path_factory):
    """A demo run folder: evaluate and evaluate_ood on the study's tiny cache; serve and generation JSON."""
    root, cfg, *_ = studied
    run = tmp_path_factory.mktemp("demo")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XSILO_HOME", str(root / "home"))
        common = dict(source=cfg.models[0], target=cfg.models[1], task=cfg.tasks[0], public=cfg.public,
                      head=cfg.head, fit=cfg.fit)
        evaluate_pair(PairConfig(**common), out=run / "bbc")
        evaluate_ood(OODConfig(**common, ood=list(cfg.ood), knn_k=5), out=run / "ood")
    atomic_write_json(run / "serve.json", SERVE)
    atomic_write_json(run / "two-party-summary.json", TWO_PARTY)
    (run / "generation" / "a-b").mkdir(parents=True)
    atomic_write_json(run / "generation" / "a-b" / "metrics.json", GENERATION)
    return run


def figure_rows(md: str) -> list[tuple[str, str, str]]:
    """(label, value, source) of each figures-table row."""
    table = md.split("## Figures", 1)[1]
    rows = [re.split(r"(?<!\\)\|", line)[1:-1] for line in table.splitlines() if line.startswith("| ")]
    return [tuple(c.strip() for c in row) for row in rows[1:]]  # type: ignore[misc]


def test_every_figure_in_the_report_is_traceable_to_a_json_key(demo_run):
    path = write_demo_report(demo_run)
    md = path.read_text()
    rows = figure_rows(md)
    sources = {}
    for label, value, source in rows:
        file, key = source.replace("\\|", "|").split("#", 1)
        data = sources.setdefault(file, json.loads((demo_run / file).read_text()))
        expected = lookup(data, key)
        assert float(value) == pytest.approx(expected, rel=1e-3, abs=1e-12), source
    keys = {source for _, _, source in rows}
    for expected in ("bbc/metrics.json#/classification/mapped/accuracy", "bbc/metrics.json#/alignment/cka_null",
                     "serve.json#/median_server_ms", "serve.json#/p90_total_ms",
                     "generation/a-b/metrics.json#/rows/mapped/top1", "ood/ood.json#/accuracy/mapped/accuracy"):
        assert expected in keys
    assert sum(k.startswith("serve.json#") for k in keys) == len(SERVE)
    assert sum(k.startswith("two-party-summary.json#") for k in keys) == len(TWO_PARTY)
    assert not any("/roc/" in k or "/config/" in k for k in keys)  # plot data and settings are not figures
    ood = json.loads((demo_run / "ood" / "ood.json").read_text())
    (name,) = ood["ood"]
    assert {f"ood/ood.json#/ood/{name.replace('/', '~1')}/energy/{view}/auroc" for view in ("native", "mapped")} <= keys
    # no number outside the figures table
    body = md.split("## Figures", 1)[0]
    assert not re.findall(r"\d+\.\d+", "\n".join(line for line in body.splitlines() if not line.startswith("#")))
    for png in ("accuracy.png", "roc.png", "latency.png"):
        assert (demo_run / png).read_bytes()[:8] == PNG_MAGIC and f"]({png})" in md
    assert "Paris \\| and" in md and "Notes:" not in md


def test_missing_or_broken_stages_are_skipped_with_a_note(demo_run, tmp_path):
    partial = tmp_path / "partial"
    (partial / "bbc").mkdir(parents=True)
    (partial / "bbc" / "metrics.json").write_text((demo_run / "bbc" / "metrics.json").read_text())
    (partial / "serve.json").write_text("{not json")
    (partial / "ood").mkdir()
    atomic_write_json(partial / "ood" / "ood.json", {"accuracy": {"native": {"accuracy": 0.5}}})  # wrong shape
    md = write_demo_report(partial).read_text()
    assert "`ood/ood.json` lacks what its section needs" in md and "stage 7" in md
    assert "`serve.json` could not be read" in md and "ood/ood.json#/accuracy/native/accuracy" in md
    assert {source.split("#")[0] for _, _, source in figure_rows(md)} == {"bbc/metrics.json", "ood/ood.json"}
    with pytest.raises(ReportError, match="make demo"):
        write_demo_report(tmp_path / "nothing")

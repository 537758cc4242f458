"""OOD detectors, metrics, thresholds and the client-side check; `evaluate_ood` on tiny models."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from lightning_modules.parties.export import export_checkpoints
from serve.formats.exports import load_export
from serve.formats.folders import ExportError
from lightning_modules.evaluation.ood import OODConfig, evaluate_ood
from lightning_modules.evaluation.ood_detectors import (DETECTORS, OODError, calibrate_threshold, detection_metrics,
                                                        make_detectors)
from serve.ood_client import LOGIT_DETECTORS, logit_scores, ood_from_logits
from lightning_modules.settings import FitSettings, HeadSettings, PublicSetSettings

from tests.tiny import write_tiny_csv

D, K = 16, 3
MEANS = 6.0 * torch.eye(D, dtype=torch.float64)[:K]  # class c sits at 6·e_c


def gaussians(n: int, seed: int, centre: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """n rows around the class means (or around one `centre`), unit noise, with their labels."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % K
    base = MEANS[labels] if centre is None else centre.expand(n, D)
    return base + torch.randn(n, D, generator=g, dtype=torch.float64), labels


def fitted(name: str, x: torch.Tensor, labels: torch.Tensor):
    """A fitted detector and what it reads from states: logits of a fixed linear head, or the states."""
    detector = make_detectors(knn_k=20)[name]
    view = (lambda h: h @ MEANS.T) if detector.input == "logits" else (lambda h: h)
    return detector.fit(view(x), labels), view


@pytest.mark.parametrize("name", DETECTORS)
def test_far_ood_is_found_and_a_second_id_draw_is_chance(name):
    torch.set_num_threads(1)
    detector, view = fitted(name, *gaussians(1200, seed=0))
    id_a, id_b = (detector.score(view(gaussians(1000, seed=s)[0])) for s in (1, 2))
    far = detector.score(view(gaussians(1000, seed=3, centre=6.0 * torch.eye(D, dtype=torch.float64)[10])[0]))
    assert detection_metrics(id_a, far)["auroc"] > 0.97  # OOD positive: also checks higher = more OOD
    assert far.mean() > id_a.mean()
    assert detection_metrics(id_a, id_b)["auroc"] == pytest.approx(0.5, abs=0.06)


def test_metrics_match_scikit_learn():
    rng = np.random.default_rng(0)
    # large, tied scores: a sigmoid inside torchmetrics would collapse these into ties
    id_scores = np.round(rng.normal(500, 40, 700))
    ood_scores = np.round(rng.normal(560, 40, 500))
    got = detection_metrics(torch.from_numpy(id_scores), torch.from_numpy(ood_scores))
    scores = np.concatenate([id_scores, ood_scores])
    is_ood = np.r_[np.zeros(len(id_scores)), np.ones(len(ood_scores))]
    fpr, tpr, _ = roc_curve(is_ood, scores)
    assert got["auroc"] == pytest.approx(roc_auc_score(is_ood, scores), abs=1e-12)  # exact: float64 counts
    assert got["aupr"] == pytest.approx(average_precision_score(is_ood, scores), abs=1e-12)
    assert got["fpr_at_95tpr"] == pytest.approx(fpr[np.searchsorted(tpr, 0.95)], abs=1e-12)


def test_logit_scores_are_oriented_and_one_formula():
    confident, unsure = np.array([[9.0, 0.0, 0.0]]), np.array([[0.1, 0.0, 0.05]])
    for name in LOGIT_DETECTORS:
        assert logit_scores(unsure, name)[0] > logit_scores(confident, name)[0]
        logits = torch.randn(50, 4, dtype=torch.float64) * 30
        np.testing.assert_array_equal(make_detectors()[name].score(logits).numpy(),
                                      logit_scores(logits.numpy(), name))
    p = np.exp(confident[0]) / np.exp(confident[0]).sum()
    assert logit_scores(confident, "msp")[0] == pytest.approx(-p.max())
    assert logit_scores(confident, "energy")[0] == pytest.approx(-np.log(np.exp(confident[0]).sum()))


@pytest.mark.parametrize("n", [20, 100, 333])
def test_threshold_keeps_95_percent_of_id_and_client_flags_agree(n):
    logits = np.random.default_rng(n).normal(size=(n, 3)) * 3
    thresholds = {name: calibrate_threshold(torch.from_numpy(logit_scores(logits, name))) for name in LOGIT_DETECTORS}
    manifest_ood = {"detector": "energy", "threshold": thresholds["energy"], "tpr": 0.95, "all": thresholds}
    for name in LOGIT_DETECTORS:
        scores, flags = ood_from_logits(logits, manifest_ood, detector=name)
        assert (scores <= thresholds[name]).mean() >= 0.95
        assert (scores < thresholds[name]).mean() < 0.95  # the smallest such threshold
        np.testing.assert_array_equal(flags, scores > thresholds[name])
    assert ood_from_logits(logits[0], manifest_ood)[1].shape == (1,)


def test_client_module_needs_no_torch():
    code = "import sys, serve.ood_client; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bad_input_is_refused_with_a_fix():
    x, labels = gaussians(100, seed=0)
    with pytest.raises(OODError, match="NaN or inf"):
        make_detectors()["mahalanobis"].fit(torch.where(x > 8, float("nan"), x), labels)
    with pytest.raises(OODError, match="non-empty"):
        detection_metrics(torch.zeros(0), torch.ones(5))
    with pytest.raises(OODError, match="lower --knn_k"):
        make_detectors(knn_k=500)["knn"].fit(x)
    with pytest.raises(ValueError, match="NaN or inf"):
        ood_from_logits(np.array([[np.nan, 1.0]]), {"detector": "msp", "threshold": 0.0, "tpr": 0.95,
                                                    "all": {"msp": 0.0}})
    with pytest.raises(ValueError, match="cannot compute from logits"):
        ood_from_logits(np.ones((1, 2)), {"detector": "knn", "threshold": 0.0, "tpr": 0.95, "all": {"knn": 0.0}})
    for cfg in (OODConfig("s", "t", "task"), OODConfig("s", "t", "task", ood=["task"]),
                OODConfig("s", "t", "task", ood=["o"], export_detector="mahalanobis")):
        with pytest.raises(OODError):
            cfg.validate()


def test_zero_variance_dims_do_not_blow_up_mahalanobis():
    x, labels = gaussians(600, seed=0)
    x[:, -3:] = 1e-30 * torch.randn(600, 3, dtype=torch.float64)  # MiniLM-like dead dims
    detector = make_detectors()["mahalanobis"].fit(x, labels)
    probe = gaussians(200, seed=1)[0]
    probe[:, -3:] = 1e-6  # far beyond the training noise in those dims, yet meaningless
    assert detector.score(probe).max() < 100


# --- end to end on tiny models ----------------------------------------------------------

@pytest.fixture(scope="module")
def evaluated(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("ood")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XSILO_HOME", str(root / "home"))  # the tests below reuse this cache
        task = write_tiny_csv(root / "task.csv", n=120, seed=3)
        cfg = OODConfig(source=str(tiny_models["llama"]), target=str(tiny_models["gpt2"]), task=str(task),
                        public=PublicSetSettings(str(write_tiny_csv(root / "public.csv", n=200, seed=4)), limit=None),
                        head=HeadSettings(epochs=20), fit=FitSettings(lambdas=(1e-3, 1e-1, 10.0)), knn_k=5,
                        ood=[str(write_tiny_csv(root / "other.csv", n=50, seed=9, n_classes=5))])
        return cfg, root, evaluate_ood(cfg, out=root / "run")


def test_evaluate_ood_reports_every_detector_and_view(evaluated):
    cfg, root, results = evaluated
    run = root / "run"
    saved = json.loads((run / "ood.json").read_text())
    assert saved["ood"] == results["ood"] and saved["positive_class"] == "ood"
    (name,) = cfg.ood
    assert results["rows"]["ood"][name] + results["rows"]["ood_val"][name] == 50 and results["rows"]["task_test"] == 18
    for det in DETECTORS:
        m = results["ood"][name][det]
        for view in ("native", "mapped"):
            assert set(m[view]) == {"auroc", "fpr_at_95tpr", "aupr", "ood_flagged"}
            assert all(0 <= v <= 1 for v in m[view].values())
            assert np.isfinite(results["thresholds"][view][det]) and 0 <= results["id_test_flagged"][view][det] <= 1
        assert m["auroc_drop"] == pytest.approx(m["native"]["auroc"] - m["mapped"]["auroc"])
    md = (run / "ood.md").read_text()
    assert all(f"| {det} |" in md for det in DETECTORS) and "AUROC mapped" in md
    assert json.loads((run / "ood-threshold.json").read_text()) == results["export_ood"]


def test_export_carries_the_threshold_and_the_client_applies_it(evaluated, tmp_path, monkeypatch):
    cfg, root, results = evaluated
    run = root / "run"
    monkeypatch.setenv("XSILO_HOME", str(root / "home"))
    ood = json.loads((run / "ood-threshold.json").read_text())
    out = export_checkpoints(run / "aligner.ckpt", run / "classifier-target.ckpt", tmp_path / "e", ood=ood)
    fused = load_export(out)
    assert fused.manifest["ood"]["threshold"] == results["thresholds"]["mapped"][results["export_ood"]["detector"]]
    assert set(fused.manifest["ood"]["all"]) == set(LOGIT_DETECTORS)
    # the client's flags on fused logits of the ID validation rows: the calibrated 5%
    from datamodules.states import LabelledStatesDataModule
    from lightning_modules.evaluation.evaluate import split_rows

    dm = LabelledStatesDataModule(model=cfg.source, data=cfg.task)
    dm.setup("validate")
    h_val, _ = split_rows(dm, "val")
    for name in LOGIT_DETECTORS:
        _, flags = ood_from_logits(fused(h_val.numpy()), fused.manifest["ood"], detector=name)
        assert flags.mean() <= 0.05 + 1 / len(flags)


def test_export_refuses_thresholds_from_other_checkpoints(evaluated, tmp_path):
    _, root, results = evaluated
    run = root / "run"
    ood = {**results["export_ood"], "checkpoints": {"classifier": "0" * 64}}
    with pytest.raises(ExportError, match="calibrated with another classifier"):
        export_checkpoints(run / "aligner.ckpt", run / "classifier-target.ckpt", tmp_path / "e", ood=ood)
    with pytest.raises(ExportError, match="must equal"):
        export_checkpoints(run / "aligner.ckpt", run / "classifier-target.ckpt", tmp_path / "f",
                           ood={**results["export_ood"], "threshold": 1e9})


def test_an_ood_set_equal_to_the_task_is_refused(evaluated, tmp_path, monkeypatch):
    cfg, root, _ = evaluated
    monkeypatch.setenv("XSILO_HOME", str(root / "home"))
    copy = shutil.copy(cfg.task, tmp_path / "same.csv")
    with pytest.raises(OODError, match="not out-of-distribution"):
        evaluate_ood(OODConfig(**{**cfg.__dict__, "ood": [str(copy)]}))


def test_the_fused_deployment_exports_the_best_detector_it_can_run(evaluated):
    from lightning_modules.evaluation.ood_select import FUSED_CANDIDATES, LOGIT_CANDIDATES, load_state_detector

    _, root, results = evaluated
    sel = results["deployable"]
    assert set(sel["candidates"]) == set(FUSED_CANDIDATES)
    best = max(sel["candidates"], key=lambda n: sel["candidates"][n]["val_auroc_mean"])
    assert sel["candidates"][sel["chosen"]]["val_auroc_mean"] == sel["candidates"][best]["val_auroc_mean"]
    best_logit = max(LOGIT_CANDIDATES, key=lambda n: sel["candidates"][n]["val_auroc_mean"])
    assert results["export_ood"]["detector"] == best_logit.split("@")[0]
    assert results["export_ood"]["selection"]["chosen"] == sel["chosen"]
    client_file = root / "run" / "client-ood.npz"
    assert client_file.exists() == (sel["chosen"] not in LOGIT_CANDIDATES)
    if client_file.exists():
        assert load_state_detector(client_file).name == sel["chosen"]
    assert "chosen by validation AUROC" in (root / "run" / "ood.md").read_text()

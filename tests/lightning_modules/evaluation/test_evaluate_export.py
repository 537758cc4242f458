"""The pair evaluation and the fused export, end to end on tiny random models."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from lightning_modules.models.aligner import AffineAligner
from lightning_modules.models.classifier import LinearClassifier
from datamodules.states import PairedStatesDataModule
from lightning_modules.evaluation.evaluate import PairConfig, evaluate_pair, split_rows
from lightning_modules.evaluation.metrics import r2_score
from lightning_modules.settings import FitSettings, HeadSettings, PublicSetSettings
from lightning_modules.parties.export import export_checkpoints
from serve.formats.exports import load_export
from serve.formats.folders import ExportError

from tests.tiny import write_tiny_csv


@pytest.fixture(scope="module")
def evaluated(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XSILO_HOME", str(root / "home"))
        return _evaluate(tiny_models, root)


def _evaluate(tiny_models, root):
    task = write_tiny_csv(root / "task.csv", n=120, seed=3)
    public = write_tiny_csv(root / "public.csv", n=200, seed=4)
    cfg = PairConfig(source=str(tiny_models["llama"]), target=str(tiny_models["gpt2"]), task=str(task),
                     public=PublicSetSettings(str(public), limit=None), head=HeadSettings(epochs=30),
                     fit=FitSettings())  # the default 33-value λ path, criterion auto
    results = evaluate_pair(cfg, out=root / "run")
    return root / "run", results


def test_evaluation_reports_every_figure(evaluated):
    run, results = evaluated
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["classification"] == results["classification"]
    # the seed and every model's resolved extraction are recorded
    assert saved["seed"] == saved["config"]["seed"] == 0 and saved["config"]["fit"]["standardize"] is True
    assert set(saved["extraction"]) == {"public_source", "public_target", "task_target", "task_source"}
    for spec in saved["extraction"].values():
        assert spec["pooling"] in ("mean", "last", "first") and spec["layer"] == -1 and spec["max_length"] == 128
    c, a = results["classification"], results["alignment"]
    for row in ("native_target", "native_source", "mapped", "null_map"):
        assert 0.0 <= c[row]["accuracy"] <= 1.0 and 0.0 <= c[row]["macro_f1"] <= 1.0
    assert c["mapped_drop"] == pytest.approx(c["native_target"]["accuracy"] - c["mapped"]["accuracy"])
    for name in ("r2", "cosine", "cosine_centered", "cka", "mutual_knn"):
        assert np.isfinite(a[name]) and np.isfinite(a[name + "_null"])
    # the reported alignment is the saved aligner's, on the held-out public rows
    cfg = results["config"]
    public = PairedStatesDataModule(source=cfg["source"], target=cfg["target"], data=cfg["public"]["data"], limit=None,
                                    max_length=cfg["extraction"]["max_length"])
    public.prepare_data()
    public.setup("fit")
    x_val, y_val = split_rows(public, "val")
    aligner = AffineAligner.load_from_checkpoint(run / "aligner.ckpt")
    with torch.no_grad():
        assert r2_score(aligner(x_val).double(), y_val.double()) == pytest.approx(a["r2"], abs=1e-5)
    md = (run / "metrics.md").read_text()
    assert "mapped source → target head" in md and "mutual kNN" in md
    assert results["rows"]["task_test"] == 3 * round(40 * 0.15)


def test_lambda_is_chosen_through_the_target_head_and_the_whole_path_is_reported(evaluated):
    from lightning_modules.settings import DEFAULT_LAMBDAS

    run, results = evaluated
    path = results["lambda_path"]
    assert results["criterion"] == path["criterion"] == "head"  # auto: the target head is fitted first
    assert len(path["points"]) == len(DEFAULT_LAMBDAS) >= 30
    assert [p["lambda"] for p in path["points"]] == list(DEFAULT_LAMBDAS)
    for p in path["points"]:
        assert set(p["scores"]) == {"gcv", "val_mse", "head"} and 0 <= p["accuracy"] <= 1 and 0 <= p["macro_f1"] <= 1
        assert 0 < p["majority_rate"] <= 1 and 0 < p["top_prediction_share"] <= 1
    assert set(path["chosen"]) == {"gcv", "val_mse", "head"}
    by_lambda = {p["lambda"]: p for p in path["points"]}
    for name, pick in path["chosen"].items():
        scores = [p["scores"][name] for p in path["points"] if p["scores"][name] is not None]
        assert by_lambda[pick["lambda"]]["scores"][name] == min(scores)
        assert pick["accuracy"] == by_lambda[pick["lambda"]]["accuracy"]
    assert results["chosen_lambda"] == path["chosen"]["head"]["lambda"]
    # the path's point at the chosen λ is the fitted map (float64 path vs float32 map: at most a tie apart)
    n_test = results["rows"]["task_test"]
    assert path["chosen"]["head"]["accuracy"] == pytest.approx(results["classification"]["mapped"]["accuracy"],
                                                               abs=1.5 / n_test)
    # the saved map (and so the fused export built from it) carries the head-aware λ
    config = json.loads((run / "map" / "config.json").read_text())
    assert config["chosen_lambda"] == results["chosen_lambda"] and config["lambda_selection"]["criterion"] == "head"
    md = (run / "metrics.md").read_text()
    assert "chosen by head" in md and "majority-class rate" in md and "top-prediction share" in md
    assert "| head (used) |" in md and "| val_mse |" in md


def test_the_studys_collapse_verdict_is_written_and_printed(evaluated):
    """`xsilo evaluate` reports the study's collapse flag (predictions on one class, or mapped macro-F1 < 0.8 ×
    native target's): in metrics.json, metrics.md and the printed summary (the command prints markdown_report)."""
    from lightning_modules.evaluation.evaluate import markdown_report
    from lightning_modules.experiments.study_report import collapse

    run, results = evaluated
    c = results["classification"]
    flagged, reason = collapse(c["mapped"], c["native_target"])
    saved = json.loads((run / "metrics.json").read_text())
    assert (saved["collapse"], saved["collapse_reason"]) == (results["collapse"], results["collapse_reason"]) \
        == (flagged, reason)
    line = f"**Collapse**: {reason}." if flagged else "Collapse: no ("
    assert line in (run / "metrics.md").read_text() and line in markdown_report(results)


def test_fused_export_matches_map_then_head_and_onnx(evaluated, tmp_path):
    run, results = evaluated
    out = export_checkpoints(run / "aligner.ckpt", run / "classifier-target.ckpt", tmp_path / "export",
                             metrics=results)
    fused, map_, head = (load_export(out, name) for name in ("fused", "map", "head"))
    aligner = AffineAligner.load_from_checkpoint(run / "aligner.ckpt")
    clf = LinearClassifier.load_from_checkpoint(run / "classifier-target.ckpt")
    x = torch.randn(17, fused.input_dim) * 3
    with torch.no_grad():
        expected = clf(aligner(x)).numpy()
    np.testing.assert_allclose(fused(x.numpy()), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(head(map_(x.numpy())), expected, rtol=1e-4, atol=1e-4)
    for name, part in (("fused", fused), ("map", map_), ("head", head)):
        session = ort.InferenceSession(str(out / f"{name}.onnx"), providers=["CPUExecutionProvider"])
        got = session.run(None, {"hidden": x.numpy()})[0]
        np.testing.assert_allclose(got, part(x.numpy()), rtol=1e-5, atol=1e-5)
    manifest = fused.manifest
    assert manifest["label_names"] == ["c0", "c1", "c2"]
    assert manifest["source"]["pooling"] == "last" and manifest["source"]["max_length"] == 128
    assert manifest["source"]["model_identity"] and manifest["metrics"]["task"]
    assert set(manifest["files"]) == {f"{n}.{s}" for n in ("fused", "map", "head") for s in ("safetensors", "onnx")}


def test_tampered_or_mismatched_export_is_refused(evaluated, tmp_path):
    run, _ = evaluated
    out = export_checkpoints(run / "aligner.ckpt", run / "classifier-target.ckpt", tmp_path / "e")
    with pytest.raises(ExportError, match="not empty"):
        export_checkpoints(run / "aligner.ckpt", run / "classifier-target.ckpt", out)
    blob = bytearray((out / "fused.safetensors").read_bytes())
    blob[-3] ^= 1
    (out / "fused.safetensors").write_bytes(bytes(blob))
    with pytest.raises(ExportError, match="fused.safetensors does not match its sha256"):
        load_export(out)
    load_export(out, "head")  # the other parts are intact
    with pytest.raises(ExportError, match="trained on"):  # head on source states, map into target
        export_checkpoints(run / "aligner.ckpt", run / "classifier-source.ckpt", tmp_path / "bad")
    with pytest.raises(ExportError, match="manifest.json is missing"):
        load_export(tmp_path)

"""Head-only exports (`kind: head`): what a provider publishes about its classifier on its own states."""

from __future__ import annotations

import json
import re

import numpy as np
import onnxruntime as ort
import pytest

from serve.formats.folders import ExportError
from serve.formats.heads import write_head_export
from serve.formats.digests import sha256_file
from serve.formats.exports import load_export

SPEC = {"model": "gemma3", "model_identity": "abc123", "pooling": "last", "layer": -1, "max_length": 128,
        "dtype": "float32", "hidden_size": 24, "cache": "/provider/private/cache/path", "data": "bbc"}


def head(k: int = 4, d: int = 24, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(k, d)), rng.normal(size=k)


def detector(k: int = 4, d: int = 24, seed: int = 1):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(d, d))
    return {"means": rng.normal(size=(k, d)), "precision": a @ a.T + np.eye(d), "threshold": 31.5, "tpr": 0.95}


def test_head_export_reads_back_and_computes_the_head(tmp_path):
    w, b = head()
    out = write_head_export(tmp_path / "bbc", w, b, target=SPEC, label_names=["a", "b", "c", "d"],
                            metrics={"native_val_accuracy": 0.9})
    part = load_export(out, "head")
    assert part.manifest["kind"] == "head" and part.manifest["source"] == {}
    assert (part.input_dim, part.output_dim) == (24, 4) and part.manifest["label_names"] == ["a", "b", "c", "d"]
    assert list(part.manifest["parts"]) == ["head"] and "feature_ood" not in part.manifest
    # the provider's local cache path and dataset are not published
    assert set(part.manifest["target"]) == {"model", "model_identity", "pooling", "layer", "max_length", "dtype",
                                            "hidden_size"}
    assert part.manifest["metrics"] == {"native_val_accuracy": 0.9}
    x = np.random.default_rng(2).normal(size=(5, 24)).astype(np.float32)
    np.testing.assert_allclose(part(x), x @ w.T + b, rtol=1e-5, atol=1e-5)
    onnx_out = ort.InferenceSession(str(out / "head.onnx")).run(None, {"hidden": x})[0]
    np.testing.assert_allclose(onnx_out, x @ w.T + b, rtol=1e-5, atol=1e-5)
    assert sorted(p.name for p in out.iterdir()) == ["head.onnx", "head.safetensors", "manifest.json"]


def test_feature_ood_is_written_only_when_given_and_checksummed(tmp_path):
    w, b = head()
    ood = detector()
    out = write_head_export(tmp_path / "bbc", w, b, target=SPEC, label_names=None, feature_ood=ood)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["feature_ood"] == {"detector": "mahalanobis", "file": "feature-ood.npz", "threshold": 31.5,
                                       "tpr": 0.95}
    assert manifest["files"]["feature-ood.npz"]["sha256"] == sha256_file(out / "feature-ood.npz")
    with np.load(out / "feature-ood.npz") as z:
        assert z["means"].dtype == np.float64 and z["precision"].dtype == np.float64
        np.testing.assert_array_equal(z["means"], ood["means"])
        np.testing.assert_array_equal(z["precision"], ood["precision"])
        assert "priors" not in z.files
    priors = [0.4, 0.3, 0.2, 0.1]  # the task's class priors ride along when given
    out = write_head_export(tmp_path / "priors", w, b, target=SPEC, label_names=None,
                            feature_ood={**ood, "priors": priors})
    assert load_export(out, "head").feature_ood.priors.tolist() == priors


@pytest.mark.parametrize("change, message", [
    (dict(label_names=["a", "b"]), "4 outputs but 2 label names"),
    (dict(feature_ood={**detector(), "means": np.zeros((3, 24))}), "means (4, 24)"),
    (dict(feature_ood={**detector(), "precision": np.full((24, 24), np.nan)}), "NaN/inf"),
    (dict(feature_ood={**detector(), "tpr": 1.5}), "tpr in (0, 1]"),
    (dict(feature_ood={"means": np.zeros((4, 24))}), "lacks"),
    (dict(feature_ood={**detector(), "priors": [0.5, 0.5, 0.0, 0.0]}), "in (0, 1]"),
    (dict(feature_ood={**detector(), "priors": [0.25, 0.25, 0.25]}), "priors must be 4 floats"),
    (dict(feature_ood={**detector(), "priors": [0.3, 0.3, 0.3, 0.3]}), "sum to 1.2, not 1"),
    (dict(target={**SPEC, "hidden_size": 640}), "hidden_size=640"),
])
def test_bad_head_inputs_are_refused_and_nothing_is_written(tmp_path, change, message):
    w, b = head()
    kwargs = {"target": SPEC, "label_names": None, **change}
    with pytest.raises(ExportError, match=re.escape(message)):
        write_head_export(tmp_path / "bbc", w, b, **kwargs)
    assert not (tmp_path / "bbc").exists() and list(tmp_path.iterdir()) == []


def test_a_head_export_never_overwrites_without_being_asked(tmp_path):
    w, b = head()
    out = write_head_export(tmp_path / "bbc", w, b, target=SPEC, label_names=None)
    with pytest.raises(ExportError, match="--overwrite"):
        write_head_export(out, w * 2, b, target=SPEC, label_names=None)
    np.testing.assert_allclose(load_export(out, "head").weight, w.astype(np.float32))
    write_head_export(out, w * 2, b, target=SPEC, label_names=None, overwrite=True)
    np.testing.assert_allclose(load_export(out, "head").weight, (w * 2).astype(np.float32))


# --- `xsilo head fit` on a tiny random model ---------------------------------------------------------------

def test_mahalanobis_in_raw_coordinates_scores_as_the_detector_does():
    """The published means/precision give the same scores as lightning_modules.evaluation.ood_detectors.Mahalanobis (dead dim too)."""
    import torch

    from lightning_modules.parties.heads import mahalanobis_raw
    from lightning_modules.evaluation.ood_detectors import Mahalanobis
    from serve.ood_client import mahalanobis_scores

    rng = np.random.default_rng(0)
    labels = torch.from_numpy(np.arange(120) % 3)
    x = rng.normal(size=(120, 10)) * rng.uniform(0.5, 30, 10) + labels.numpy()[:, None] * 2.0
    x[:, 4] = 3.0  # a dead dimension
    means, precision = mahalanobis_raw(torch.from_numpy(x), labels, 3, shrinkage=0.05)
    test = rng.normal(size=(25, 10)) * 10
    want = Mahalanobis(0.05).fit(torch.from_numpy(x), labels).score(torch.from_numpy(test)).numpy()
    np.testing.assert_allclose(mahalanobis_scores(test, means, precision), want, rtol=1e-9)
    assert np.all(precision[4] == 0) and means.shape == (3, 10)


@pytest.fixture(scope="module")
def head_run(tiny_models, tmp_path_factory):
    from tests.tiny import write_tiny_csv
    from lightning_modules.cli import main

    root = tmp_path_factory.mktemp("head")
    task = write_tiny_csv(root / "task.csv", n=150, seed=5)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XSILO_HOME", str(root / "home"))
        main(["head", "fit", "--model", str(tiny_models["gpt2"]), "--task", str(task), "--out", str(root / "tiny"),
              "--publish_ood", "true", "--head.epochs", "20", "--accelerator", "cpu", "--threads", "1"])
        from datamodules.states import LabelledStatesDataModule

        dm = LabelledStatesDataModule(model=str(tiny_models["gpt2"]), data=str(task))
        dm.setup("test")
    return root / "tiny", dm


def test_head_fit_writes_a_servable_head_whose_metrics_are_its_own(head_run):
    from lightning_modules.evaluation.evaluate import split_rows
    from serve.formats.heads import load_feature_ood
    from serve.layers import load_head

    out, dm = head_run
    part = load_export(out, "head")
    m = part.manifest
    assert m["kind"] == "head" and m["label_names"] == ["c0", "c1", "c2"] and m["source"] == {}
    assert m["target"]["hidden_size"] == dm.dim == part.input_dim and "cache" not in m["target"]
    for split in ("val", "test"):  # the recorded accuracy is the exported head's on the provider's own states
        h, labels = split_rows(dm, split)
        accuracy = float((part(h.numpy()).argmax(1) == labels.numpy()).mean())
        assert m["metrics"][f"native_{split}"]["accuracy"] == pytest.approx(accuracy, abs=1e-6)
        assert m["metrics"]["rows"][split] == len(labels)
    ood = load_feature_ood(out, m)
    assert ood is not None and ood.tpr == 0.95
    from serve.ood_client import mahalanobis_scores

    h_val, _ = split_rows(dm, "val")
    kept = float((mahalanobis_scores(h_val.numpy(), ood.means, ood.precision) <= ood.threshold).mean())
    assert kept >= 0.95
    _, y_train = split_rows(dm, "train")  # the published class priors are the train split's class shares
    np.testing.assert_allclose(ood.priors, np.bincount(y_train.numpy(), minlength=3) / len(y_train), rtol=1e-12)
    assert load_head(out).name == "tiny"  # the server serves it under the folder's name


def test_head_fit_without_publish_ood_writes_no_detector(tiny_models, tmp_path, capsys):
    from tests.tiny import write_tiny_csv
    from lightning_modules.cli import main

    task = write_tiny_csv(tmp_path / "task.csv", n=90, seed=6)
    main(["head", "fit", "--model", str(tiny_models["bert"]), "--task", str(task), "--out", str(tmp_path / "h"),
          "--head.epochs", "5", "--accelerator", "cpu"])
    manifest = json.loads((tmp_path / "h" / "manifest.json").read_text())
    assert "feature_ood" not in manifest and not (tmp_path / "h" / "feature-ood.npz").exists()
    assert "native accuracy val" in capsys.readouterr().err

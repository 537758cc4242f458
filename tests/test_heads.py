"""Head-only exports (`kind: head`): what a provider publishes about its classifier on its own states."""

from __future__ import annotations

import json
import re

import numpy as np
import onnxruntime as ort
import pytest

from lightning_modules.export import ExportError, write_head_export
from serve.export_format import load_export, sha256_file

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


@pytest.mark.parametrize("change, message", [
    (dict(label_names=["a", "b"]), "4 outputs but 2 label names"),
    (dict(feature_ood={**detector(), "means": np.zeros((3, 24))}), "means (4, 24)"),
    (dict(feature_ood={**detector(), "precision": np.full((24, 24), np.nan)}), "NaN/inf"),
    (dict(feature_ood={**detector(), "tpr": 1.5}), "tpr in (0, 1]"),
    (dict(feature_ood={"means": np.zeros((4, 24))}), "lacks"),
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

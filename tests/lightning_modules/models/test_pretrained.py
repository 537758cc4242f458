"""save_pretrained / from_pretrained: map folders (config.json + model.safetensors) and exports, offline.

A user fits an AffineAligner, saves it, and loads it back elsewhere (by folder, or by hub id) with the
same weights and predictions; an export written by `FusedExport.save_pretrained` is read by
`LinearExport.from_pretrained` (numpy only); tampered, mis-versioned or malformed folders are refused
with a one-line error; a generation map is saved and loaded as a map, and `generate` runs from it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules.tokens import load_causal_lm
from lightning_modules.cli import main
from lightning_modules.models.aligner import AffineAligner
from lightning_modules.models.classifier import LinearClassifier
from lightning_modules.parties.export import export_checkpoints, FusedExport, write_export
from serve.formats.exports import load_export
from lightning_modules.generation.maps import load_generation_map, save_generation_map
from lightning_modules.generation.sampling import generate
from lightning_modules.fitting.affine_map import AffineMap
from serve.formats.exports import LinearExport
from serve.formats.folders import ExportError

from tests.helpers import TensorDataModule, linear_pairs, trainer
from tests.tiny import build_tiny_model

ROOT = Path(__file__).resolve().parents[3]
SOURCE = {"model": "tiny-source", "model_identity": "src-id", "pooling": "last", "layer": -1, "max_length": 32}
TARGET = {"model": "tiny-target", "model_identity": "tgt-id", "pooling": "last", "layer": -1, "max_length": 32}
LABELS = ["a", "b", "c"]


@pytest.fixture(scope="module")
def fitted() -> AffineAligner:
    x, y, _, _ = linear_pairs(n=600, noise=0.5)
    aligner = AffineAligner(24, 16, lambdas=[1e-3, 1e-1, 10.0], standardize=True)
    trainer().fit(aligner, TensorDataModule(x, y))
    aligner.source_spec, aligner.target_spec = dict(SOURCE), dict(TARGET)
    return aligner


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> tuple[LinearClassifier, Path]:
    g = torch.Generator().manual_seed(5)
    h = torch.randn(300, 16, generator=g) * 3 + 1
    y = (h[:, 0] > 1).long() + (h[:, 1] > 1).long()
    model = LinearClassifier(16, 3, label_names=LABELS)
    t = trainer(max_epochs=3)
    t.fit(model, TensorDataModule(h, y, batch_size=64, label_names=LABELS))
    model.states_spec = dict(TARGET)
    ckpt = tmp_path_factory.mktemp("clf") / "classifier.ckpt"
    t.save_checkpoint(ckpt)
    return model, ckpt


def one_line_error(call, *args, **kwargs) -> str:
    with pytest.raises(ExportError) as caught:
        call(*args, **kwargs)
    message = str(caught.value)
    assert "\n" not in message, message
    return message


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def edit_json(path: Path, change) -> None:
    doc = json.loads(path.read_text())
    path.write_text(json.dumps(change(doc)))


# --- map folders ---------------------------------------------------------------------------

def test_fitted_map_round_trip_keeps_weights_predictions_and_settings(fitted, tmp_path):
    out = fitted.save_pretrained(str(tmp_path / "map"), metrics={"r2": 0.5})
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert not list(tmp_path.glob(".tmp-*"))  # written through a temp folder, nothing left behind
    config = json.loads((out / "config.json").read_text())
    assert (config["format"], config["version"], config["input_dim"], config["output_dim"]) == \
        ("xsilo-affine-map", 1, 24, 16)
    assert config["estimator"] == "ridge" and config["lambdas"] == [1e-3, 1e-1, 10.0]
    assert config["chosen_lambda"] == float(fitted.chosen_lambda) and config["standardize"] and config["center"]
    assert config["source"] == SOURCE and config["target"] == TARGET and config["metrics"] == {"r2": 0.5}

    loaded = AffineAligner.from_pretrained(out)
    assert torch.equal(loaded.linear.weight, fitted.linear.weight) and torch.equal(loaded.linear.bias, fitted.linear.bias)
    x = torch.randn(33, 24) * 2 + 3
    with torch.no_grad():
        assert torch.equal(loaded(x), fitted(x))
    assert bool(loaded.fitted) and float(loaded.chosen_lambda) == float(fitted.chosen_lambda)
    assert loaded.lambda_path == fitted.lambda_path and len(loaded.lambda_path) == 3
    assert (loaded.source_spec, loaded.target_spec) == (SOURCE, TARGET)
    for key in ("input_dim", "output_dim", "estimator", "center", "standardize", "finetune_loss"):
        assert loaded.hparams[key] == fitted.hparams[key]

    # the numpy-only reader sees the same map
    part = LinearExport.from_pretrained(out)
    with torch.no_grad():
        np.testing.assert_allclose(part(x.numpy()), fitted(x).numpy(), rtol=1e-5, atol=1e-5)


def test_save_replaces_a_map_folder_but_never_another_folder(fitted, tmp_path):
    out = fitted.save_pretrained(tmp_path / "map")
    fitted.save_pretrained(out, metrics={"again": 1})
    assert json.loads((out / "config.json").read_text())["metrics"] == {"again": 1}
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert "not a map folder" in one_line_error(fitted.save_pretrained, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map", "mine"]


def test_an_unfitted_aligner_is_not_saved(tmp_path):
    with pytest.raises(ValueError, match="never fitted"):
        AffineAligner(4, 3).save_pretrained(tmp_path / "map")
    assert not (tmp_path / "map").exists()


@pytest.mark.parametrize("kind", ["map", "export"])
def test_a_tampered_weight_file_is_refused_by_name(kind, fitted, classifier, tmp_path):
    if kind == "map":
        out, weights, load = fitted.save_pretrained(tmp_path / "m"), "model.safetensors", AffineAligner.from_pretrained
    else:
        out = FusedExport.from_modules(fitted, classifier[0]).save_pretrained(tmp_path / "e")
        weights, load = "fused.safetensors", LinearExport.from_pretrained
    flip_last_byte(out / weights)
    message = one_line_error(load, out)
    assert f"{weights} does not match its sha256" in message
    (out / weights).unlink()
    assert f"{weights} is missing" in one_line_error(load, out)


def test_a_wrong_format_or_version_is_refused(fitted, classifier, tmp_path):
    out = fitted.save_pretrained(tmp_path / "map")
    edit_json(out / "config.json", lambda c: {**c, "version": 2})
    message = one_line_error(AffineAligner.from_pretrained, out)
    assert "version 2 is not the version 1" in message and "config.json" in message
    edit_json(out / "config.json", lambda c: {**c, "version": 1, "format": "xsilo-export"})
    assert "is not an xsilo 'xsilo-affine-map' file" in one_line_error(AffineAligner.from_pretrained, out)
    # a transformers model folder is not a map folder
    (out / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32}))
    assert "format=None" in one_line_error(AffineAligner.from_pretrained, out)

    export = FusedExport.from_modules(fitted, classifier[0]).save_pretrained(tmp_path / "export")
    edit_json(export / "manifest.json", lambda m: {**m, "version": 7})
    assert "version 7 is not the version 1" in one_line_error(LinearExport.from_pretrained, export)


def test_malformed_map_configs_give_one_line_errors(fitted, tmp_path):
    out = fitted.save_pretrained(tmp_path / "map")
    good = json.loads((out / "config.json").read_text())
    cases = {
        "a JSON list": ([good], "the map config"),
        "dims as strings": ({**good, "input_dim": "24"}, "'input_dim'"),
        "lambdas a string": ({**good, "lambdas": "abc"}, "'lambdas'"),
        "an infinite lambda": ({**good, "lambdas": [float("inf")]}, "'lambdas'"),
        "a huge integer lambda": ({**good, "lambdas": [10 ** 400]}, "'lambdas'"),
        "chosen_lambda a string": ({**good, "chosen_lambda": "x"}, "'chosen_lambda'"),
        "center a string": ({**good, "center": "yes"}, "'center'"),
        "lambda_path of strings": ({**good, "lambda_path": [["a", 1]]}, "'lambda_path'"),
        "finetune a string": ({**good, "finetune": "x"}, "'finetune'"),
        "an unknown finetune loss": ({**good, "finetune": {"loss": "magic"}}, "'finetune'"),
        "an unknown estimator": ({**good, "estimator": "magic"}, "unknown estimator"),
        "files a list": ({**good, "files": list(good["files"])}, "'files'"),
        "files without the weights": ({**good, "files": {"other.bin": good["files"]["model.safetensors"]}},
                                      "model.safetensors"),
        "dims that disagree with the weights": ({**good, "output_dim": 17}, "holds shapes"),
        "source a list": ({**good, "source": []}, "'source'"),
    }
    for name, (bad, key) in cases.items():
        (out / "config.json").write_text(json.dumps(bad))
        message = one_line_error(AffineAligner.from_pretrained, out)
        assert key in message and "save_pretrained" in message, (name, message)
    (out / "config.json").write_text("[" * 100000)
    assert "not valid JSON" in one_line_error(AffineAligner.from_pretrained, out)


def test_hub_ids_resolve_through_huggingface_hub_and_fail_offline_in_one_line(tmp_path):
    script = (
        "from lightning_modules.models.aligner import AffineAligner\n"
        "from serve.formats.exports import ExportError, LinearExport\n"
        "for load in (AffineAligner.from_pretrained, LinearExport.from_pretrained):\n"
        "    try:\n"
        "        load('xsilo-tests/no-such-map')\n"
        "    except ExportError as e:\n"
        "        print(e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 2, done.stdout
    for line in lines:
        assert line.startswith("xsilo-tests/no-such-map is not a local folder") and "HF_HUB_OFFLINE" in line
        assert "pass a local folder" in line
    message = one_line_error(AffineAligner.from_pretrained, tmp_path / "no" / "such" / "folder")
    assert "is not a folder" in message


# --- exports -------------------------------------------------------------------------------

def test_export_round_trip_through_save_and_from_pretrained(fitted, classifier, tmp_path):
    clf, ckpt = classifier
    out = FusedExport.from_modules(fitted, clf, metrics={"acc": 1.0}).save_pretrained(tmp_path / "export")
    fused = LinearExport.from_pretrained(out)
    map_, head = (LinearExport.from_pretrained(out, part) for part in ("map", "head"))
    x = torch.randn(19, 24) * 2 + 3
    with torch.no_grad():
        expected = clf(fitted(x)).numpy()
    np.testing.assert_allclose(fused(x.numpy()), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(head(map_(x.numpy())), expected, rtol=1e-4, atol=1e-4)
    assert fused.manifest["label_names"] == LABELS and fused.manifest["metrics"] == {"acc": 1.0}
    assert fused.manifest["source"] == SOURCE

    # `xsilo export` takes a map folder for the aligner as well as a checkpoint
    folder = fitted.save_pretrained(tmp_path / "map")
    again = load_export(export_checkpoints(folder, ckpt, tmp_path / "from-folder"))
    np.testing.assert_allclose(again.weight, fused.weight, rtol=1e-5, atol=1e-6)

    # each kind of folder, passed where the other is expected, is named
    assert "holds only the map" in one_line_error(LinearExport.from_pretrained, folder, "head")
    assert "is a map folder" in one_line_error(load_export, folder)
    assert "is an export" in one_line_error(AffineAligner.from_pretrained, out)


def test_an_export_with_an_unfitted_aligner_is_refused(classifier):
    assert "never fitted" in one_line_error(FusedExport.from_modules, AffineAligner(24, 16), classifier[0])


# --- generation maps -------------------------------------------------------------------------

def test_a_generation_map_is_saved_and_loaded_as_a_map(tmp_path, capsys):
    path = build_tiny_model("llama", tmp_path / "llama")
    lm = load_causal_lm(str(path))
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(3)))
    amap = AffineMap(torch.eye(32) + 0.3 * q, 0.1 * torch.ones(32))
    run = tmp_path / "run"
    save_generation_map(run / "map", amap, lm, lm, max_length=32, lambdas=[1e-3, 1e-1], chosen_lambda=1e-3)

    assert sorted(p.name for p in (run / "map").iterdir()) == ["config.json", "model.safetensors"]  # no fake head
    config = json.loads((run / "map" / "config.json").read_text())
    assert config["chosen_lambda"] == 1e-3 and config["lambdas"] == [1e-3, 1e-1]
    for role in ("source", "target"):
        assert config[role]["pooling"] == "per-position" and config[role]["max_length"] == 32
        assert config[role]["model_identity"] == lm.identity
    loaded = load_generation_map(run, lm, lm)  # `--aligner DIR` with DIR from `evaluate_generation --out DIR`
    assert torch.equal(loaded.weight, amap.weight) and torch.equal(loaded.bias, amap.bias)
    assert torch.equal(AffineAligner.from_pretrained(run / "map").affine_map.weight, amap.weight)

    expected = generate(lm, "the cat", source=lm, amap=amap, max_new_tokens=6).text
    assert generate(lm, "the cat", source=lm, amap=loaded, max_new_tokens=6).text == expected
    capsys.readouterr()
    main(["generate", "--source", str(path), "--target", str(path), "--aligner", str(run),
          "--max_new_tokens", "6", "the cat"])
    assert capsys.readouterr().out == "the cat" + expected + "\n"

    # a map written by an older xsilo as an export with an identity head is named, with the fix
    eye = np.eye(32)
    write_export(tmp_path / "old" / "export", eye, np.zeros(32), eye, np.zeros(32), source={}, target={},
                 label_names=None)
    assert "older xsilo" in one_line_error(load_generation_map, tmp_path / "old", lm, lm)

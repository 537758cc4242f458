"""The map folder's format (`serve.formats.maps`): `MapConfig` round trips, older config.json layouts still load
(and are written in today's layout when saved again), version migrations run before the check, and
`AffineMap.save_pretrained`/`from_pretrained` is the one reader and writer under `AffineAligner`'s and
`LinearExport`'s."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from lightning_modules.fitting.affine_map import AffineMap
from lightning_modules.models.aligner import AffineAligner
from serve.formats import maps
from serve.formats.exports import LinearExport
from serve.formats.folders import ExportError
from serve.formats.maps import MAP_CONFIG, MAP_WEIGHTS, MapConfig, load_map_folder, write_map_folder

ROOT = Path(__file__).resolve().parents[3]
SOURCE = {"model": "tiny-source", "model_identity": "src-id", "pooling": "last", "layer": -1, "max_length": 32}
TARGET = {"model": "tiny-target", "model_identity": "tgt-id", "pooling": "last", "layer": -1, "max_length": 32}


def weights(d_in: int = 6, d_out: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(d_out, d_in)).astype(np.float32), rng.normal(size=d_out).astype(np.float32)


def write_by_hand(folder: Path, weight: np.ndarray, bias: np.ndarray, config: dict) -> Path:
    """A map folder laid out exactly as `config` says, checksums included: what an older xsilo wrote."""
    folder.mkdir(parents=True)
    save_file({"weight": weight, "bias": bias}, str(folder / MAP_WEIGHTS))
    data = (folder / MAP_WEIGHTS).read_bytes()
    doc = {**config, "files": {MAP_WEIGHTS: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}}}
    (folder / MAP_CONFIG).write_text(json.dumps(doc, indent=2) + "\n")
    return folder


# The config.json the first save_pretrained wrote (version 1, before the λ criteria: no criterion, rank,
# whiten_target or lambda_selection; its λ path was scored by validation MSE).
FIRST_LAYOUT = {
    "format": "xsilo-affine-map", "version": 1, "created": "2025-01-01T00:00:00Z", "input_dim": 6, "output_dim": 4,
    "estimator": "ridge", "lambdas": [0.001, 0.1, 10.0], "chosen_lambda": 0.1,
    "lambda_path": [[0.001, 0.5], [0.1, 0.25], [10.0, 0.75]], "center": True, "standardize": True,
    "normalisation": maps.NORMALISATION,
    "finetune": {"loss": "mse", "classifier": None, "lr": 0.0001, "weight_decay": 0.0},
    "source": SOURCE, "target": TARGET, "metrics": {"r2": 0.5},
}


def test_a_map_folder_from_before_the_lambda_criteria_still_loads(tmp_path):
    w, b = weights()
    old = write_by_hand(tmp_path / "old", w, b, FIRST_LAYOUT)

    amap = AffineMap.from_pretrained(old)
    assert np.array_equal(amap.weight.numpy(), w) and np.array_equal(amap.bias.numpy(), b)
    config = amap.config
    assert (config.criterion, config.rank, config.whiten_target) == ("auto", None, False)
    assert config.lambda_selection == {"criterion": "val_mse", "lambdas": [0.001, 0.1, 10.0],
                                       "chosen": {"val_mse": 0.1}, "scores": {"val_mse": [0.5, 0.25, 0.75]}}
    assert (config.source, config.target, config.created) == (SOURCE, TARGET, "2025-01-01T00:00:00Z")

    aligner = AffineAligner.from_pretrained(old)
    assert aligner.lambda_path.criterion == "val_mse" and dict(aligner.lambda_path) == {0.001: 0.5, 0.1: 0.25,
                                                                                        10.0: 0.75}
    assert float(aligner.chosen_lambda) == 0.1 and aligner.hparams.criterion == "auto"
    assert torch.equal(aligner.affine_map.weight, torch.from_numpy(w))
    part = LinearExport.from_pretrained(old)  # the numpy reader goes through the same loader
    assert part.name == "map" and np.array_equal(part.weight, w) and part.manifest["lambda_path"][1] == [0.1, 0.25]

    # saved again, it is written in today's layout, with nothing lost
    again = amap.save_pretrained(tmp_path / "again")
    doc = json.loads((again / MAP_CONFIG).read_text())
    assert doc["criterion"] == "auto" and doc["lambda_selection"] == config.lambda_selection
    assert doc["created"] == FIRST_LAYOUT["created"]  # a read folder keeps its creation time
    assert {k: doc[k] for k in FIRST_LAYOUT if k != "files"} == FIRST_LAYOUT
    assert MapConfig.from_dict(doc) == config


def test_map_config_round_trips_and_writes_keys_in_the_documented_order():
    config = MapConfig(estimator="reduced_rank", lambdas=[1e-2, 1.0], chosen_lambda=1.0, lambda_path=[[1.0, 0.3]],
                       lambda_selection={"criterion": "gcv", "lambdas": [1e-2, 1.0], "chosen": {"gcv": 1.0},
                                         "scores": {"gcv": [0.5, 0.3]}},
                       criterion="gcv", rank=3, whiten_target=True, source=SOURCE, target=TARGET,
                       metrics={"val_r2": 0.9})
    doc = config.to_dict()
    assert list(doc) == ["estimator", "lambdas", "chosen_lambda", "lambda_path", "lambda_selection", "criterion",
                         "rank", "whiten_target", "center", "standardize", "normalisation", "finetune", "source",
                         "target", "metrics"]
    assert MapConfig.from_dict(doc) == config and MapConfig.format_version == maps.MAP_VERSION
    json.dumps(doc)  # JSON-ready as it is


def test_an_older_version_is_migrated_before_it_is_checked(tmp_path, monkeypatch):
    w, b = weights()
    v0 = {**FIRST_LAYOUT, "version": 0, "ridge_lambdas": FIRST_LAYOUT["lambdas"]}
    del v0["lambdas"]
    folder = write_by_hand(tmp_path / "v0", w, b, v0)
    assert "version 0 is not the version 1" in str(pytest.raises(ExportError, load_map_folder, folder).value)

    def rename(doc: dict) -> dict:  # what a migration does: version 0 -> 1
        doc["lambdas"] = doc.pop("ridge_lambdas")
        return doc

    monkeypatch.setitem(maps.MAP_MIGRATIONS, 0, rename)
    loaded = load_map_folder(folder)
    assert loaded.doc["version"] == 1 and loaded.config.lambdas == FIRST_LAYOUT["lambdas"]


def test_an_affine_map_saves_and_loads_without_a_lightning_module(tmp_path):
    w, b = weights(seed=3)
    amap = AffineMap(torch.from_numpy(w).double(), torch.from_numpy(b).double())
    with pytest.raises(ValueError, match="MapConfig"):
        amap.save_pretrained(tmp_path / "none")
    out = amap.save_pretrained(tmp_path / "map", MapConfig(estimator="lstsq", lambdas=[], source=SOURCE))
    assert sorted(p.name for p in out.iterdir()) == [MAP_CONFIG, MAP_WEIGHTS]
    loaded = AffineMap.from_pretrained(out)
    assert loaded.weight.dtype == torch.float32 and torch.equal(loaded.weight, torch.from_numpy(w))
    assert loaded.config.estimator == "lstsq" and loaded.config.source == SOURCE
    assert loaded.config.name_or_path == str(out)
    assert AffineAligner.from_pretrained(out).hparams.estimator == "lstsq"
    # a plain dict (an older caller's config) is read as a MapConfig and written in today's layout
    write_map_folder(tmp_path / "dict", w, b, {"estimator": "ridge", "lambdas": [1.0], "center": True,
                                               "standardize": False})
    assert json.loads((tmp_path / "dict" / MAP_CONFIG).read_text())["criterion"] == "auto"


def test_the_map_format_loads_no_torch():
    code = "import sys, serve.formats.maps; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)

"""The provider's public-states folder: texts, fingerprint, split and states, written atomically."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from datamodules.states import random_split
from datamodules.text import dataset_fingerprint, load_texts
from serve.formats.folders import ExportError
from serve.formats.public_states import write_public_states
from serve.formats.digests import sha256_file

SPEC = {"model": "gemma3", "model_identity": "abc123", "pooling": "last", "layer": -1, "max_length": 128,
        "dtype": "float32", "hidden_size": 16, "cache": "/provider/private/cache/path"}
TEXTS = [f"row {i}: café \"quoted\"\nsecond line {'x' * (i % 7)}" for i in range(40)]


def states(n: int = 40, d: int = 16) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(n, d)).astype(np.float32)


def test_public_states_folder_holds_the_split_states_and_the_texts(tmp_path):
    z = states()
    out = write_public_states(tmp_path / "public", TEXTS, z, model=SPEC, val_fraction=0.25, seed=3, name="dialog")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "xsilo-public-states" and manifest["version"] == 1
    assert (manifest["name"], manifest["rows"], manifest["val_fraction"], manifest["seed"]) == ("dialog", 40, 0.25, 3)
    assert manifest["parts"] == {"train": 30, "val": 10} and manifest["hidden_size"] == 16
    assert "cache" not in manifest["model"] and manifest["model"]["model_identity"] == "abc123"
    for name, record in manifest["files"].items():
        assert record == {"sha256": sha256_file(out / name), "bytes": (out / name).stat().st_size}
    assert set(manifest["files"]) == {"texts.jsonl", "states.safetensors"}
    tensors = load_file(str(out / "states.safetensors"))
    train_idx, val_idx = random_split(40, 0.25, 3)
    np.testing.assert_array_equal(tensors["train_index"], train_idx)
    np.testing.assert_array_equal(tensors["val_index"], val_idx)
    np.testing.assert_array_equal(tensors["train"], z[train_idx])
    np.testing.assert_array_equal(tensors["val"], z[val_idx])
    assert tensors["train"].dtype == np.float32 and tensors["train_index"].dtype == np.int64


def test_the_texts_file_reads_back_with_the_published_fingerprint(tmp_path):
    """A client that loads texts.jsonl as a dataset gets the same rows, so the same fingerprint."""
    out = write_public_states(tmp_path / "public", TEXTS, states(), model=SPEC, val_fraction=0.25, seed=0,
                              name="dialog")
    ds = load_texts(str(out / "texts.jsonl"), label_column=None)
    assert list(ds["text"]) == TEXTS
    assert dataset_fingerprint(ds) == json.loads((out / "manifest.json").read_text())["fingerprint"]
    other = write_public_states(tmp_path / "other", TEXTS[:-1] + ["changed"], states(), model=SPEC,
                                val_fraction=0.25, seed=0, name="dialog")
    assert json.loads((other / "manifest.json").read_text())["fingerprint"] != dataset_fingerprint(ds)


@pytest.mark.parametrize("texts, z, val_fraction, message", [
    (TEXTS[:-1], states(), 0.25, "one row per text"),
    (TEXTS, states()[:, :8], 0.25, "hidden_size=16"),
    (TEXTS, np.full((40, 16), np.nan), 0.25, "NaN/inf"),
    (TEXTS, states(), 0.0, "val_fraction must be in"),
    (TEXTS[:2], states(2), 0.1, "use more public rows"),
    ([1, 2], states(2), 0.5, "list of strings"),
])
def test_bad_public_states_are_refused_and_nothing_is_written(tmp_path, texts, z, val_fraction, message):
    with pytest.raises(ExportError, match=message):
        write_public_states(tmp_path / "public", texts, z, model=SPEC, val_fraction=val_fraction, seed=0, name="x")
    assert list(tmp_path.iterdir()) == []


def test_an_existing_folder_is_replaced_only_with_overwrite(tmp_path):
    out = write_public_states(tmp_path / "public", TEXTS, states(), model=SPEC, val_fraction=0.25, seed=0, name="a")
    with pytest.raises(ExportError, match="--overwrite"):
        write_public_states(out, TEXTS, states(), model=SPEC, val_fraction=0.25, seed=0, name="b")
    assert json.loads((out / "manifest.json").read_text())["name"] == "a"
    write_public_states(out, TEXTS, states(), model=SPEC, val_fraction=0.25, seed=0, name="b", overwrite=True)
    assert json.loads((out / "manifest.json").read_text())["name"] == "b"
    assert [p.name for p in tmp_path.iterdir()] == ["public"]


def test_public_set_export_writes_the_models_cached_states(tiny_models, tmp_path, capsys):
    from tests.tiny import write_tiny_csv
    from datamodules.cache import StateCache
    from datamodules.extraction import ExtractionConfig, resolve
    from lightning_modules.cli import main
    from serve.formats.public_states import load_public_states

    data = write_tiny_csv(tmp_path / "public.csv", n=50, seed=2)
    main(["public-set", "export", "--model", str(tiny_models["llama"]), "--data", str(data), "--out",
          str(tmp_path / "pub"), "--val_fraction", "0.2", "--seed", "4", "--accelerator", "cpu"])
    assert capsys.readouterr().out.strip() == str(tmp_path / "pub")
    public = load_public_states(tmp_path / "pub")  # the server's reader accepts it
    job = resolve(ExtractionConfig(model=str(tiny_models["llama"]), data=str(data), label_column=None))
    cached = StateCache(job.directory).rows(np.arange(50))
    train_idx, val_idx = random_split(50, 0.2, 4)
    np.testing.assert_array_equal(public.parts[0], cached[train_idx])
    np.testing.assert_array_equal(public.parts[1], cached[val_idx])
    assert public.fingerprint == job.key.dataset_fingerprint and public.name == "public"
    assert public.manifest["model"]["model_identity"] == job.key.model_identity


def test_a_missing_anchors_file_is_refused_before_any_extraction(tiny_models, tmp_path, capsys):
    from tests.tiny import write_tiny_csv
    from datamodules.extraction import ExtractionConfig, resolve
    from lightning_modules.cli import main

    data = write_tiny_csv(tmp_path / "public.csv", n=50, seed=2)
    with pytest.raises(SystemExit) as stop:
        main(["public-set", "export", "--model", str(tiny_models["llama"]), "--data", str(data), "--anchors",
              str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "pub"), "--accelerator", "cpu"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "missing.jsonl" in err and "does not exist" in err and err.count("\n") == 1
    job = resolve(ExtractionConfig(model=str(tiny_models["llama"]), data=str(data), label_column=None))
    assert not job.directory.exists() and not (tmp_path / "pub").exists()  # nothing extracted, nothing written

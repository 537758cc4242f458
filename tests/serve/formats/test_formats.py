"""serve.formats: folders written by earlier xsilo releases still load, today's writers still write them byte for
byte, the config dataclasses round-trip, older versions are migrated, and the one split spec is what every
split reads by default."""
from __future__ import annotations

import base64
import inspect
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from serve.formats import exports, folders, public_states
from serve.formats.digests import sha256_file, texts_fingerprint
from serve.formats.exports import ExportConfig, LinearExport, load_export, read_manifest, write_export
from serve.formats.folders import ExportError
from serve.formats.heads import HeadConfig, write_head_export
from serve.formats.public_states import PublicStatesConfig, load_public_states, write_public_states
from serve.formats.splits import SPLIT, SplitSpec, public_split, stratified_split

# Folders written by the xsilo of commit 896e1d1, before serve/formats, kept byte for byte in one JSON document
# (binary files base64) rather than as tracked weight files, and laid out again for each test module.
GOLDEN = Path(__file__).parent / "data" / "formats-v1.json"


@pytest.fixture(scope="module")
def v1(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("formats-v1")
    for rel, entry in json.loads(GOLDEN.read_text(encoding="utf-8"))["files"].items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(entry["text"].encode("utf-8") if "text" in entry else base64.b64decode(entry["base64"]))
    return root


def same_folder(old: Path, new: Path) -> None:
    """Every file of `old` is in `new` with the same bytes; JSON documents are equal but for 'created'."""
    assert sorted(p.name for p in old.iterdir()) == sorted(p.name for p in new.iterdir())
    for f in old.iterdir():
        if f.suffix == ".json":
            a, b = json.loads(f.read_text()), json.loads((new / f.name).read_text())
            a.pop("created"), b.pop("created")
            assert list(a) == list(b) and a == b, f.name
        else:
            assert f.read_bytes() == (new / f.name).read_bytes(), f.name


def test_version_1_folders_of_earlier_releases_load(v1):
    fused, mapped, head = (load_export(v1 / "export", part) for part in ("fused", "map", "head"))
    x = np.random.default_rng(0).normal(size=(5, 3))
    np.testing.assert_allclose(fused(x), head(mapped(x)), atol=1e-5)
    assert fused.manifest["label_names"] == ["neg", "pos"] and fused.manifest["ood"]["detector"] == "energy"

    provider = load_export(v1 / "head", "head")
    assert provider.manifest["kind"] == "head" and provider.feature_ood.means.shape == (2, 4)
    assert provider.feature_ood.threshold == 9.0

    amap = LinearExport.from_pretrained(v1 / "map")
    assert (amap.input_dim, amap.output_dim) == (3, 4) and amap.manifest["estimator"] == "ridge"
    np.testing.assert_array_equal(amap.weight, mapped.weight)

    public = load_public_states(v1 / "public")
    assert public.rows == 10 and public.part_rows == (8, 2)
    assert public.fingerprint == texts_fingerprint(public.texts)
    for ours, drawn in zip(public.indices, public_split(10, 0.2, 1)):
        np.testing.assert_array_equal(ours, drawn)


def test_todays_writers_write_version_1_byte_for_byte(v1, tmp_path):
    manifest = read_manifest(v1 / "export")
    parts = {name: (e.weight, e.bias) for name in ("fused", "map", "head") for e in [load_export(v1 / "export", name)]}
    same_folder(v1 / "export", write_export(tmp_path / "export", parts, ExportConfig.from_dict(manifest)))

    head = load_export(v1 / "head", "head")
    config = HeadConfig.from_dict(head.manifest)
    ood = {"means": head.feature_ood.means, "precision": head.feature_ood.precision,
           "threshold": head.feature_ood.threshold, "tpr": head.feature_ood.tpr}
    same_folder(v1 / "head", write_head_export(tmp_path / "head", head.weight, head.bias, target=config.target,
                                               label_names=config.label_names, metrics=config.metrics,
                                               feature_ood=ood))

    public = load_public_states(v1 / "public")
    states = np.zeros((public.rows, public.hidden_size), np.float32)
    for part, index in zip(public.parts, public.indices):
        states[index] = part
    c = public.config
    same_folder(v1 / "public", write_public_states(tmp_path / "public", public.texts, states, model=c.model,
                                                   val_fraction=c.val_fraction, seed=c.seed, name=c.name))


def test_configs_round_trip_their_manifests(v1):
    manifest = read_manifest(v1 / "export")
    parts = {name: (load_export(v1 / "export", name).weight, None) for name in ("fused", "map", "head")}
    written = ExportConfig.from_dict(manifest).to_dict(parts)
    assert written == {k: v for k, v in manifest.items() if k != "files"}

    head = read_manifest(v1 / "head")
    assert HeadConfig.from_dict(head).to_dict() == {k: v for k, v in head.items() if k != "files"}

    public = json.loads((v1 / "public" / "manifest.json").read_text())
    assert PublicStatesConfig.from_dict(public).to_dict() == {k: v for k, v in public.items() if k != "files"}

    spec = SplitSpec(val_fraction=0.2, test_fraction=0.1, seed=3)
    assert SplitSpec.from_dict(spec.to_dict()) == spec and SplitSpec.from_dict({}) == SPLIT


def test_an_older_version_is_migrated_before_it_is_checked(v1, tmp_path, monkeypatch):
    folder = shutil.copytree(v1 / "public", tmp_path / "public")
    doc = json.loads((folder / "manifest.json").read_text())
    doc["version"], doc["split"] = 0, {"val": doc.pop("val_fraction"), "seed": doc.pop("seed")}  # an imagined v0
    (folder / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ExportError, match="version 0 is not the version 1"):
        load_public_states(folder)

    def v0_to_v1(old: dict) -> dict:
        split = old.pop("split")
        return {**old, "val_fraction": split["val"], "seed": split["seed"]}

    monkeypatch.setitem(public_states.MIGRATIONS, 0, v0_to_v1)
    assert load_public_states(folder).config == load_public_states(v1 / "public").config

    export = shutil.copytree(v1 / "export", tmp_path / "export")
    doc = json.loads((export / "manifest.json").read_text())
    (export / "manifest.json").write_text(json.dumps({**doc, "version": 2}))
    with pytest.raises(ExportError, match="version 2 is not the version 1 this xsilo reads"):
        load_export(export)  # a newer folder: refused, never guessed at


def test_every_file_a_folder_lists_is_checked(v1):
    record = read_manifest(v1 / "export")["files"]["fused.safetensors"]
    assert record["sha256"] == sha256_file(v1 / "export" / "fused.safetensors")
    assert folders.FORMAT == exports.FORMAT == "xsilo-export"


def test_one_split_spec_is_every_default():
    from datamodules.public_set import build_public_set, task_heldout
    from datamodules.states import LabelledStatesDataModule, PairedStatesDataModule

    assert (SPLIT.val_fraction, SPLIT.test_fraction, SPLIT.seed) == (0.15, 0.15, 0)
    assert round(SPLIT.train_fraction, 10) == 0.7 and SPLIT.public_val_fraction == 0.125

    def defaults(fn, *names):
        params = inspect.signature(fn).parameters
        return tuple(params[n].default for n in names)

    task = (SPLIT.val_fraction, SPLIT.test_fraction)
    assert defaults(LabelledStatesDataModule.__init__, "val_fraction", "test_fraction", "seed") == (*task, SPLIT.seed)
    assert defaults(task_heldout, "val_fraction", "test_fraction", "seed") == (*task, SPLIT.seed)
    assert defaults(build_public_set, "val_fraction", "test_fraction", "split_seed") == (*task, SPLIT.seed)
    assert defaults(PairedStatesDataModule.__init__, "val_fraction", "seed") == (SPLIT.public_val_fraction,
                                                                                  SPLIT.public_seed)
    labels = np.repeat(np.arange(3), 40)
    for ours, spec in zip(stratified_split(labels), SPLIT.task_split(labels)):
        np.testing.assert_array_equal(ours, spec)
    train, val, test = SPLIT.task_split(labels)
    assert (len(train), len(val), len(test)) == (84, 18, 18)

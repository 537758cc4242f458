"""Hidden-state extraction and its cache, on tiny random models."""

from __future__ import annotations

import errno
import json

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from datamodules import extraction
from datamodules.registry import AssetError
from datamodules.cache import CacheError, StateCache, shard_name
from datamodules.encoder import clear_loaded_models, loaded_model_keys, pool
from datamodules.extraction import ExtractionConfig, HiddenStateExtractor, extract
from datamodules.models import MAX_LENGTH_CAP

from tests.tiny import write_tiny_csv


def reference_states(model_dir, texts, pooling, layer=-1, max_length=128):
    """A plain transformers loop, one text at a time (no padding at all)."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    out = []
    with torch.no_grad():
        for text in texts:
            enc = tok([text], return_tensors="pt", truncation=True, max_length=max_length)
            hs = model(**enc, output_hidden_states=True).hidden_states[layer][0]
            out.append({"mean": hs.mean(0), "last": hs[-1], "first": hs[0]}[pooling])
    return torch.stack(out).numpy()


def count_forwards(monkeypatch) -> list[int]:
    calls = [0]
    original = HiddenStateExtractor.predict_step

    def counting(self, batch, batch_idx):
        calls[0] += 1
        return original(self, batch, batch_idx)

    monkeypatch.setattr(HiddenStateExtractor, "predict_step", counting)
    return calls


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_pool_uses_the_mask_on_either_padding_side(padding_side):
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    if padding_side == "left":
        mask = mask.flip(1)
    real = [hidden[0], hidden[1][mask[1].bool()]]
    torch.testing.assert_close(pool(hidden, mask, "mean"), torch.stack([r.mean(0) for r in real]))
    torch.testing.assert_close(pool(hidden, mask, "last"), torch.stack([r[-1] for r in real]))
    torch.testing.assert_close(pool(hidden, mask, "first"), torch.stack([r[0] for r in real]))


@pytest.mark.parametrize("kind,expected", [("bert", "mean"), ("llama", "last"), ("gpt2", "last")])
def test_each_family_matches_a_plain_transformers_loop(tiny_models, tiny_csv, kind, expected):
    result = extract(ExtractionConfig(model=str(tiny_models[kind]), data=str(tiny_csv), batch_size=7),
                     shard_size=16, progress=False)
    cache = StateCache(result.path, verify=True)
    assert cache.manifest["pooling"] == expected
    texts = [l.split('"')[1] for l in tiny_csv.read_text().splitlines()[1:]]
    ref = reference_states(tiny_models[kind], texts, expected)
    np.testing.assert_allclose(cache.all(), ref, rtol=1e-4, atol=1e-5)
    assert cache.labels.tolist() == [i % 3 for i in range(len(texts))]
    assert cache.label_names == ["c0", "c1", "c2"]


def test_chosen_layer_and_pooling(tiny_models, tiny_csv):
    cfg = ExtractionConfig(model=str(tiny_models["llama"]), data=str(tiny_csv), layer=1, pooling="mean")
    cache = StateCache(extract(cfg, progress=False).path)
    texts = [l.split('"')[1] for l in tiny_csv.read_text().splitlines()[1:]]
    np.testing.assert_allclose(cache.all(), reference_states(tiny_models["llama"], texts, "mean", layer=1),
                               rtol=1e-4, atol=1e-5)


def test_truncation_follows_max_length(tiny_models, tmp_path):
    csv = tmp_path / "long.csv"
    csv.write_text("text,label\n\"" + " ".join(["good"] * 50) + " bad\",x\n\"" + " ".join(["good"] * 50) + " sad\",y\n")
    cfg = ExtractionConfig(model=str(tiny_models["gpt2"]), data=str(csv), max_length=8)
    states = StateCache(extract(cfg, progress=False).path).all()
    np.testing.assert_allclose(states[0], states[1])  # the differing last word was cut off


def test_cache_hit_runs_zero_forward_passes_and_loads_no_model(tiny_models, tiny_csv, monkeypatch):
    cfg = ExtractionConfig(model=str(tiny_models["bert"]), data=str(tiny_csv))
    first = extract(cfg, shard_size=16, progress=False)
    assert not first.hit and first.computed_shards == 4
    calls = count_forwards(monkeypatch)

    def refuse(*a, **k):
        raise AssertionError("a cache hit must not load the model")

    monkeypatch.setattr(AutoModel, "from_pretrained", refuse)
    second = extract(cfg, shard_size=16, progress=False)
    assert second.hit and second.path == first.path and calls[0] == 0


def test_key_changes_with_every_setting(tiny_models, tiny_csv, tmp_path):
    base = dict(model=str(tiny_models["llama"]), data=str(tiny_csv))
    paths = {extraction.resolve(ExtractionConfig(**{**base, **change})).directory
             for change in ({}, {"pooling": "mean"}, {"layer": 1}, {"max_length": 16}, {"dtype": "bfloat16"},
                            {"limit": 10}, {"model": str(tiny_models["gpt2"])})}
    assert len(paths) == 7
    other = write_tiny_csv(tmp_path / "other.csv", seed=1)
    assert extraction.resolve(ExtractionConfig(**{**base, "data": str(other)})).directory not in paths


def test_interrupted_run_resumes_from_finished_shards(tiny_models, tiny_csv, monkeypatch):
    cfg = ExtractionConfig(model=str(tiny_models["llama"]), data=str(tiny_csv), batch_size=4)
    path = extract(cfg, shard_size=16, progress=False).path
    reference = StateCache(path).all()
    (path / "manifest.json").unlink()  # as if the run died before finishing
    (path / shard_name(1)).unlink()
    calls = count_forwards(monkeypatch)
    result = extract(cfg, shard_size=16, progress=False)
    assert result.computed_shards == 1 and calls[0] == 4  # one shard of 16 rows, batches of 4
    np.testing.assert_array_equal(StateCache(result.path).all(), reference)


def test_corrupt_shard_is_detected_and_recomputed(tiny_models, tiny_csv):
    cfg = ExtractionConfig(model=str(tiny_models["gpt2"]), data=str(tiny_csv))
    path = extract(cfg, shard_size=16, progress=False).path
    reference = StateCache(path).all()
    shard = path / shard_name(2)
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="corrupt"):
        StateCache(path, verify=True)
    result = extract(cfg, shard_size=16, progress=False)
    assert not result.hit and result.computed_shards == 1
    np.testing.assert_array_equal(StateCache(result.path, verify=True).all(), reference)


def test_partial_shard_is_recomputed(tiny_models, tiny_csv):
    cfg = ExtractionConfig(model=str(tiny_models["gpt2"]), data=str(tiny_csv))
    path = extract(cfg, shard_size=16, progress=False).path
    shard = path / shard_name(0)
    shard.write_bytes(shard.read_bytes()[:100])
    result = extract(cfg, shard_size=16, progress=False)
    assert result.computed_shards == 1
    StateCache(result.path, verify=True)


def test_disk_full_mid_write_leaves_no_complete_cache_then_resumes(tiny_models, tiny_csv, monkeypatch):
    cfg = ExtractionConfig(model=str(tiny_models["bert"]), data=str(tiny_csv))
    real_save = np.save
    writes = [0]

    def full_disk(file, arr, *a, **k):
        writes[0] += 1
        if writes[0] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(file, arr, *a, **k)

    monkeypatch.setattr(np, "save", full_disk)
    with pytest.raises(CacheError, match="No space left"):
        extract(cfg, shard_size=16, progress=False)
    directory = extraction.resolve(cfg).directory
    assert not (directory / "manifest.json").exists()
    assert not list(directory.glob(".tmp-*"))  # no half-written file left behind
    monkeypatch.setattr(np, "save", real_save)
    result = extract(cfg, shard_size=16, progress=False)
    assert result.computed_shards == 2  # two shards had been written before the failure
    StateCache(result.path, verify=True)


def test_unwritable_cache_dir_is_a_clear_error(tiny_models, tiny_csv, tmp_path):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where a directory should be")
    with pytest.raises(CacheError, match="not writable"):
        extract(ExtractionConfig(model=str(tiny_models["bert"]), data=str(tiny_csv)),
                cache_root=blocked / "states", progress=False)


@pytest.mark.parametrize("change,message", [
    ({"max_length": 0}, "max_length must be a positive"),
    ({"max_length": -3}, "max_length must be a positive"),
    ({"pooling": "max"}, "pooling must be one of"),
    ({"layer": 9}, "out of range"),
    ({"model": "/does/not/exist"}, "does not exist"),
    ({"text_column": "body"}, "no text column 'body'"),
])
def test_bad_input_is_refused_before_any_work(tiny_models, tiny_csv, change, message):
    cfg = ExtractionConfig(**{"model": str(tiny_models["bert"]), "data": str(tiny_csv), **change})
    with pytest.raises(AssetError, match=message):
        extract(cfg, progress=False)


def test_state_encoder_reproduces_the_cache(tiny_models, tiny_csv):
    from datamodules.encoder import StateEncoder

    cache = StateCache(extract(ExtractionConfig(model=str(tiny_models["llama"]), data=str(tiny_csv)),
                               progress=False).path)
    texts = [l.split('"')[1] for l in tiny_csv.read_text().splitlines()[1:]]
    encoder = StateEncoder(str(tiny_models["llama"]), batch_size=16)
    assert encoder.pooling == "last"
    np.testing.assert_allclose(encoder(texts), cache.all(), rtol=1e-5, atol=1e-6)


# --- defaults from the model's own files; stored dtype ------------------------------------------------

def sentence_transformers_folder(tiny_models, tmp_path, mode: str, max_positions: int = 40):
    """A tiny random BERT saved with save_pretrained, plus sentence-transformers' pooling file."""
    from transformers import AutoConfig, AutoTokenizer, BertModel

    folder = tmp_path / f"st-{mode}"
    config = AutoConfig.from_pretrained(tiny_models["bert"])
    config.max_position_embeddings = max_positions
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_models["bert"]).save_pretrained(folder)
    (folder / "1_Pooling").mkdir()
    modes = {k: k == mode for k in ("pooling_mode_mean_tokens", "pooling_mode_cls_token", "pooling_mode_lasttoken")}
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **modes}))
    return folder


def test_pooling_and_max_length_come_from_the_models_files(tiny_models, tiny_csv, tmp_path):
    folder = sentence_transformers_folder(tiny_models, tmp_path, "pooling_mode_cls_token")
    job = extraction.resolve(ExtractionConfig(model=str(folder), data=str(tiny_csv)))
    spec = job.spec()
    assert (spec["pooling"], spec["layer"], spec["max_length"]) == ("first", -1, 40)
    assert spec["defaults_from"] == {"pooling": "1_Pooling/config.json", "max_length": "config max_position_embeddings"}
    assert job.key.pooling == "first" and job.key.max_length == 40
    (folder / "sentence_bert_config.json").write_text('{"max_seq_length": 24}')
    assert extraction.resolve(ExtractionConfig(model=str(folder), data=str(tiny_csv))).max_length == 24
    # a user's explicit choice wins and is not attributed to the model
    mine = extraction.resolve(ExtractionConfig(model=str(folder), data=str(tiny_csv), pooling="mean", max_length=8))
    assert (mine.pooling, mine.max_length, mine.spec()["defaults_from"]) == ("mean", 8, {})
    # a causal LM without those files: last token, and a long context capped
    llama = extraction.resolve(ExtractionConfig(model=str(tiny_models["llama"]), data=str(tiny_csv)))
    assert (llama.pooling, llama.max_length) == ("last", MAX_LENGTH_CAP)


def test_resolved_settings_are_printed(tiny_models, tiny_csv, tmp_path, capsys):
    folder = sentence_transformers_folder(tiny_models, tmp_path, "pooling_mode_mean_tokens", max_positions=30)
    extraction.resolve(ExtractionConfig(model=str(folder), data=str(tiny_csv)))
    assert "pooling mean, layer -1 (final of 2), max_length 30 (pooling from 1_Pooling/config.json" in capsys.readouterr().err


@pytest.mark.parametrize("dtype,stored", [("bfloat16", np.uint16), ("float16", np.float16)])
def test_half_precision_extraction_is_stored_in_that_dtype(tiny_models, tiny_csv, dtype, stored):
    from datamodules.encoder import StateEncoder

    cfg = ExtractionConfig(model=str(tiny_models["llama"]), data=str(tiny_csv), dtype=dtype)
    cache = StateCache(extract(cfg, progress=False).path)
    shards = sorted(cache.path.glob("shard-*.npy"))
    assert shards and all(np.load(s, mmap_mode="r").dtype == stored for s in shards)
    assert cache.manifest["dtype"] == dtype
    texts = [l.split('"')[1] for l in tiny_csv.read_text().splitlines()[1:]]
    expected = StateEncoder(str(tiny_models["llama"]), dtype=dtype)(texts)  # the same model run in that dtype
    np.testing.assert_allclose(cache.all(), expected, rtol=2e-2, atol=2e-2)
    rows = cache.all()  # read back as float32, each value exactly one of that dtype's
    np.testing.assert_array_equal(rows, torch.from_numpy(rows).to(getattr(torch, dtype)).float().numpy())


def count_model_loads(monkeypatch) -> list[int]:
    calls = [0]
    original = AutoModel.from_pretrained

    def counting(*a, **k):
        calls[0] += 1
        return original(*a, **k)

    monkeypatch.setattr(AutoModel, "from_pretrained", counting)
    return calls


def test_one_process_loads_each_model_once_across_datasets(tiny_models, tiny_csv, tmp_path, monkeypatch):
    """The OOD stage's pattern: several datasets, alternating a target and a source model."""
    other = write_tiny_csv(tmp_path / "other.csv", n=37, seed=1)
    jobs = [(kind, data) for data in (tiny_csv, other) for kind in ("llama", "gpt2")]

    def run(kind, data, root):
        cfg = ExtractionConfig(model=str(tiny_models[kind]), data=str(data), batch_size=5)
        return StateCache(extract(cfg, cache_root=root, shard_size=16, progress=False).path).all()

    clear_loaded_models()
    loads = count_model_loads(monkeypatch)
    together = [run(kind, data, tmp_path / "together") for kind, data in jobs]
    assert loads[0] == 2  # one per model, not one per extraction
    separate = []
    for kind, data in jobs:  # as separate processes would: nothing kept between runs
        clear_loaded_models()
        separate.append(run(kind, data, tmp_path / f"separate-{kind}-{data.stem}"))
    assert loads[0] == 2 + len(jobs)
    for a, b in zip(together, separate):
        np.testing.assert_array_equal(a, b)
    clear_loaded_models()


def test_kept_models_are_bounded(tiny_models, tiny_csv, monkeypatch):
    clear_loaded_models()
    loads = count_model_loads(monkeypatch)
    for kind, limit in (("bert", None), ("llama", None), ("gpt2", None), ("bert", 30)):  # the last one misses too
        extract(ExtractionConfig(model=str(tiny_models[kind]), data=str(tiny_csv), limit=limit), progress=False)
    kept = [key[0] for key in loaded_model_keys()]
    assert kept == [str(tiny_models["gpt2"]), str(tiny_models["bert"])]
    assert loads[0] == 4  # bert was the oldest of three, so it was dropped and loads again
    clear_loaded_models()

"""LightningDataModules over cached states."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datamodules.cache import CacheError
from datamodules.states import LabelledStatesDataModule, PairedStatesDataModule
from serve.formats.splits import stratified_split

from tests.tiny import write_tiny_csv


def test_paired_dims_are_known_before_setup_and_rows_align(tiny_models, tmp_path):
    data = write_tiny_csv(tmp_path / "public.csv", n=40)
    dm = PairedStatesDataModule(source=str(tiny_models["llama"]), target=str(tiny_models["bert"]),
                                data=str(data), limit=None, batch_size=8, val_fraction=0.25)
    assert (dm.source_dim, dm.target_dim) == (32, 32)  # from the model config, nothing extracted yet
    dm.prepare_data()
    dm.setup("fit")
    xs, ys = zip(*[(x, y) for x, y in dm.train_dataloader()])
    assert xs[0].shape == (8, 32) and ys[0].dtype == torch.float32
    assert sum(len(x) for x in xs) == 30 and len(dm.splits["val"]) == 10
    # the same text sits in the same row of both caches
    src, tgt = dm.splits["train"].caches
    row = int(dm.splits["train"].index[3])
    x3, y3 = dm.splits["train"].__getitems__([3])
    np.testing.assert_array_equal(x3[0].numpy(), src.rows([row])[0])
    np.testing.assert_array_equal(y3[0].numpy(), tgt.rows([row])[0])
    # a second DataModule reads dims from the finished caches' manifests
    again = PairedStatesDataModule(source=str(tiny_models["llama"]), target=str(tiny_models["bert"]),
                                   data=str(data), limit=None)
    assert again.source_job.directory == dm.source_job.directory


def test_labelled_split_is_stratified_and_shared_across_models(tiny_models, tmp_path):
    data = write_tiny_csv(tmp_path / "task.csv", n=90)
    a = LabelledStatesDataModule(model=str(tiny_models["llama"]), data=str(data), batch_size=16)
    b = LabelledStatesDataModule(model=str(tiny_models["gpt2"]), data=str(data), batch_size=16)
    assert a.num_classes == 3 and a.label_names == ["c0", "c1", "c2"] and a.dim == 32
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(a.split_index[split], b.split_index[split])
    a.prepare_data()
    a.setup("test")
    labels = torch.cat([y for _, y in a.test_dataloader()])
    assert torch.bincount(labels).tolist() == [round(30 * 0.15)] * 3
    assert len(set(a.split_index["train"]) & set(a.split_index["test"])) == 0


def test_label_set_that_differs_between_splits_is_refused(tiny_models, tmp_path):
    data = tmp_path / "rare.csv"
    rows = [f"good {i},common" for i in range(20)] + ["bad one,rare"]
    data.write_text("text,label\n" + "\n".join(rows) + "\n")
    with pytest.raises(CacheError, match="label set differs between splits"):
        LabelledStatesDataModule(model=str(tiny_models["bert"]), data=str(data))


def test_stratified_split_is_seeded():
    labels = np.repeat([0, 1, 2], 50)
    first, second = stratified_split(labels, 0.2, 0.2, 7), stratified_split(labels, 0.2, 0.2, 7)
    other = stratified_split(labels, 0.2, 0.2, 8)
    assert all((x == y).all() for x, y in zip(first, second))
    assert not (first[2] == other[2]).all()
    with pytest.raises(ValueError, match="sum to less than 1"):
        stratified_split(labels, 0.6, 0.5, 0)


def leaky_task(path, n: int = 90):
    """A task CSV in which every text occurs twice, so the seeded split puts copies in train and test."""
    rows = [f"\"good film number {i % (n // 2)}\",c{i % 3}" for i in range(n)]
    path.write_text("text,label\n" + "\n".join(rows) + "\n")
    return path


def test_duplicates_between_splits_are_dropped_from_train_and_counted(tiny_models, tmp_path, capsys):
    data = leaky_task(tmp_path / "leaky.csv")
    kept = LabelledStatesDataModule(model=str(tiny_models["bert"]), data=str(data), dedupe=False)
    texts = kept.job.texts
    leaked = {texts[i] for i in kept.split_index["train"]} & {texts[i] for i in kept.split_index["test"]}
    assert leaked  # the test would prove nothing on a file without leaks
    dm = LabelledStatesDataModule(model=str(tiny_models["bert"]), data=str(data))
    np.testing.assert_array_equal(dm.split_index["test"], kept.split_index["test"])  # scored rows unchanged
    assert set(dm.split_index["val"]) <= set(kept.split_index["val"])
    train = {texts[i] for i in dm.split_index["train"]}
    assert not train & {texts[i] for i in dm.split_index["test"]}
    assert not train & {texts[i] for i in dm.split_index["val"]}
    dropped = dm.duplicates_dropped["train"]
    assert dropped == len(kept.split_index["train"]) - len(dm.split_index["train"]) > 0
    err = capsys.readouterr().err
    assert "dropped duplicate texts of the test (or val) split" in err and f"{dropped} from train" in err

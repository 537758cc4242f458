"""LinearClassifier: logistic regression on states, standardisation, class weights, metrics."""

from __future__ import annotations

import pytest
import torch

from lightning_modules.aligner import AffineAligner
from lightning_modules.classifier import LinearClassifier

from helpers import TensorDataModule, linear_pairs, trainer


def gaussian_classes(n_per_class=200, d=12, k=3, seed=0, scale=50.0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, d, generator=g) * 2
    x = torch.cat([centers[c] + torch.randn(n_per_class, d, generator=g) for c in range(k)])
    y = torch.arange(k).repeat_interleave(n_per_class)
    perm = torch.randperm(len(y), generator=g)
    x, y = x[perm] * scale + 100.0, y[perm]  # far from zero mean / unit scale: needs standardising
    x[:, 0] = 7.0  # a zero-variance dimension (MiniLM has three)
    return x, y


def test_learns_separable_classes_and_reports_metrics():
    x, y = gaussian_classes()
    dm = TensorDataModule(x, y, batch_size=64, label_names=["a", "b", "c"])
    model = LinearClassifier(12, 3)
    t = trainer(max_epochs=30)
    t.fit(model, dm)
    assert model.hparams.label_names == ["a", "b", "c"]
    assert torch.isfinite(model.standardizer.scale).all() and model.standardizer.scale[0] == 1.0
    (scores,) = t.test(model, dm, verbose=False)
    assert scores["test_acc"] > 0.95 and scores["test_f1"] > 0.95
    # the folded affine map on raw states equals the module
    h = x[:10]
    amap = model.affine_map
    torch.testing.assert_close((h.double() @ amap.weight.T + amap.bias).float(), model(h), atol=1e-3, rtol=1e-4)


def test_balanced_class_weights_follow_the_train_split():
    x, y = gaussian_classes(n_per_class=100)
    keep = torch.cat([torch.nonzero(y == 0).flatten()[:20], torch.nonzero(y != 0).flatten()])
    x, y = x[keep], y[keep]
    dm = TensorDataModule(x, y, batch_size=64)
    model = LinearClassifier(12, 3, class_weights="balanced")
    trainer(max_epochs=1).fit(model, dm)
    train_y = dm.parts["train"][1]
    counts = torch.bincount(train_y, minlength=3).float()
    torch.testing.assert_close(model.loss_weights, len(train_y) / (3 * counts))


def test_bad_arguments():
    with pytest.raises(ValueError, match="at least 2 classes"):
        LinearClassifier(4, 1)
    with pytest.raises(ValueError, match="3 entries for 2 classes"):
        LinearClassifier(4, 2, class_weights=[1.0, 2.0, 3.0])
    x, y = gaussian_classes()
    with pytest.raises(ValueError, match="data holds 12-d states"):
        trainer().fit(LinearClassifier(10, 3), TensorDataModule(x, y))


def test_aligner_task_loss_finetunes_through_the_frozen_head(tmp_path):
    """finetune_loss='task' matches the head's predictions on true target states."""
    x_t, labels = gaussian_classes(n_per_class=150, scale=1.0)
    head_trainer = trainer(max_epochs=20)
    head = LinearClassifier(12, 3)
    head_trainer.fit(head, TensorDataModule(x_t, labels))
    ckpt = tmp_path / "head.ckpt"
    head_trainer.save_checkpoint(ckpt)
    g = torch.Generator().manual_seed(5)
    w = torch.randn(12, 12, generator=g)
    x_s = (x_t - 100.0) @ torch.linalg.inv(w).T  # source states: a linear transform of the target's
    x_s = x_s + 0.3 * torch.randn(x_s.shape, generator=g)
    pairs = TensorDataModule(x_s, x_t, batch_size=64)
    # A heavily shrunk ridge start leaves room that only the task loss can recover.
    closed = AffineAligner(12, 12, lambdas=[10.0], finetune_loss="task", classifier=str(ckpt))
    trainer().fit(closed, pairs)
    torch.manual_seed(0)
    tuned = AffineAligner(12, 12, lambdas=[10.0], finetune_loss="task", classifier=str(ckpt), lr=1e-3)
    trainer(max_epochs=10).fit(tuned, pairs)
    xv, yv = pairs.parts["val"]
    with torch.no_grad():  # KL to the head's predictions on the true target states
        assert tuned.finetune_loss(xv, yv) < 0.95 * closed.finetune_loss(xv, yv)
    assert not any(p.requires_grad for p in tuned._head.parameters())  # the head stayed frozen
    assert not any(k.startswith("_head") for k in tuned.state_dict())  # and is not saved with the map

"""LinearClassifier: logistic regression on states, standardisation, class weights, metrics."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from datamodules.states import LabelledStatesDataModule
from lightning_modules.models.aligner import AffineAligner
from lightning_modules.models.classifier import LinearClassifier
from lightning_modules.fitting.logistic import fit_logistic

from tests.helpers import TensorDataModule, linear_pairs, trainer
from tests.tiny import write_tiny_csv


def gaussian_classes(n_per_class=200, d=12, k=3, seed=0, scale=50.0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, d, generator=g) * 2
    x = torch.cat([centers[c] + torch.randn(n_per_class, d, generator=g) for c in range(k)])
    y = torch.arange(k).repeat_interleave(n_per_class)
    perm = torch.randperm(len(y), generator=g)
    x, y = x[perm] * scale + 100.0, y[perm]  # far from zero mean / unit scale: needs standardising
    x[:, 0] = 7.0  # a zero-variance dimension (MiniLM has three)
    return x, y


@pytest.mark.parametrize("solver,epochs", [("lbfgs", 1), ("adamw", 30)])
def test_learns_separable_classes_and_reports_metrics(solver, epochs):
    x, y = gaussian_classes()
    dm = TensorDataModule(x, y, batch_size=64, label_names=["a", "b", "c"])
    model = LinearClassifier(12, 3, solver=solver)
    t = trainer(max_epochs=epochs)
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
    model = LinearClassifier(12, 3, class_weights="balanced", solver="adamw")
    trainer(max_epochs=1).fit(model, dm)
    train_y = dm.parts["train"][1]
    counts = torch.bincount(train_y, minlength=3).float()
    torch.testing.assert_close(model.loss_weights, len(train_y) / (3 * counts))


def overlapping_classes(seed=0):
    """Overlapping classes, few rows per dimension: the validation-chosen C matters."""
    x, y = gaussian_classes(n_per_class=60, d=12, seed=seed, scale=3.0)
    return x + 0.8 * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 1)) * 3.0, y


@pytest.mark.parametrize("class_weights", [None, "balanced"])
def test_lbfgs_epoch_is_fit_logistic_on_the_train_and_val_rows(tmp_path, class_weights):
    x, y = overlapping_classes()
    dm = TensorDataModule(x, y, batch_size=16)
    cs = [1e-3, 1e-2, 1e-1, 1.0, 10.0]
    model = LinearClassifier(12, 3, cs=cs, class_weights=class_weights)
    best = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", mode="min", save_top_k=1)
    t = trainer(max_epochs=1, callbacks=[best], enable_checkpointing=True)
    t.fit(model, dm)
    (xt, yt), (xv, yv) = dm.parts["train"], dm.parts["val"]
    fit = fit_logistic(xt, yt, xv, yv, cs=cs, class_weight=class_weights, num_classes=3)
    assert float(model.chosen_c) == fit.c and model.c_path["val_accuracy"] == fit.val_accuracy
    amap = model.affine_map
    torch.testing.assert_close(amap.weight, fit.weight, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(amap.bias, fit.bias, atol=1e-5, rtol=1e-5)
    acc = fit.val_accuracy[fit.cs.index(fit.c)]
    assert float(t.callback_metrics["val_acc"]) == pytest.approx(acc)  # what ModelCheckpoint/EarlyStopping see
    reloaded = LinearClassifier.load_from_checkpoint(best.best_model_path)  # the checkpoint carries the choice
    assert float(reloaded.chosen_c) == fit.c and reloaded.c_path == model.c_path
    record = reloaded.fit_record()  # what `xsilo head fit` writes into its metrics
    assert record["solver"] == "lbfgs" and record["chosen_c"] == fit.c and record["val_accuracy"] == fit.val_accuracy
    torch.testing.assert_close(reloaded(xv), model(xv))


def test_checkpoint_from_before_the_lbfgs_solver_loads(tmp_path):
    x, y = gaussian_classes()
    model = LinearClassifier(12, 3, solver="adamw")
    t = trainer(max_epochs=1)
    t.fit(model, TensorDataModule(x, y))
    ckpt = tmp_path / "old.ckpt"
    t.save_checkpoint(ckpt)
    old = torch.load(ckpt, weights_only=False)
    del old["state_dict"]["chosen_c"]
    for key in ("solver", "cs", "max_iter"):
        del old["hyper_parameters"][key]
    torch.save(old, ckpt)
    reloaded = LinearClassifier.load_from_checkpoint(ckpt)
    assert torch.isnan(reloaded.chosen_c) and reloaded.fit_record() == {"solver": "adamw"}
    torch.testing.assert_close(reloaded(x[:5]), model(x[:5]))


@pytest.mark.slow
@pytest.mark.usefixtures("no_leftover_process_group")
def test_lbfgs_under_ddp_spawn_equals_single_process(tiny_models, tmp_path):
    data = write_tiny_csv(tmp_path / "task.csv", n=151)  # odd row counts: ranks get uneven shares
    dm = LabelledStatesDataModule(model=str(tiny_models["gpt2"]), data=str(data), batch_size=8)
    dm.prepare_data()
    dm.setup("fit")
    cs = [1e-2, 1e-1, 1.0, 10.0]
    single = LinearClassifier(dm.input_dim, dm.output_dim, cs=cs)
    trainer().fit(single, dm)
    double = LinearClassifier(dm.input_dim, dm.output_dim, cs=cs)
    trainer(devices=2, strategy="ddp_spawn").fit(double, dm)
    assert float(double.chosen_c) == float(single.chosen_c)
    torch.testing.assert_close(double.linear.weight, single.linear.weight, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(double.linear.bias, single.linear.bias, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(double.standardizer.scale, single.standardizer.scale)


def test_bad_arguments():
    with pytest.raises(ValueError, match="at least 2 classes"):
        LinearClassifier(4, 1)
    with pytest.raises(ValueError, match="solver must be lbfgs or adamw"):
        LinearClassifier(4, 2, solver="sgd")
    with pytest.raises(ValueError, match="non-empty list of C > 0"):
        LinearClassifier(4, 2, cs=[])
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
    # the head stayed frozen (only the map trains) and is not saved with the map
    assert {name for name, p in tuned.named_parameters() if p.requires_grad} == {"linear.weight", "linear.bias"}
    assert not any(k.startswith("_head") for k in tuned.state_dict())

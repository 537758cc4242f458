"""AffineAligner: closed form through Lightning's fit loop, λ selection, fine-tuning, DDP."""

from __future__ import annotations

import pytest
import torch

from lightning_modules.models.aligner import AffineAligner, load_head
from lightning_modules.fitting.affine_map import AffineMap
from lightning_modules.fitting.estimators import gcv_scores, ridge_path
from lightning_modules.fitting.solvers import fit_affine, solve, val_mse
from lightning_modules.fitting.stats import SufficientStats

from tests.helpers import TensorDataModule, linear_pairs, trainer


def test_closed_form_equals_the_solver_on_all_training_rows():
    x, y, w, b = linear_pairs()
    dm = TensorDataModule(x, y, batch_size=97)
    model = AffineAligner(24, 16, estimator="ridge", lambdas=[1e-4])
    trainer().fit(model, dm)
    xt, yt = dm.parts["train"]
    expected = fit_affine(SufficientStats.zeros(24, 16).update(xt, yt), "ridge", lam=1e-4)
    torch.testing.assert_close(model.linear.weight, expected.weight.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.linear.weight, w, atol=0.02, rtol=0)  # recovers the truth
    torch.testing.assert_close(model.linear.bias, b, atol=0.1, rtol=0)


def test_lambda_is_chosen_on_the_validation_split():
    x, y, _, _ = linear_pairs(n=300, d_x=64, d_y=8, noise=1.0, seed=3)  # few rows, noisy: needs shrinkage
    dm = TensorDataModule(x, y)
    lambdas = [1e-6, 1e-3, 1e-1, 1.0, 10.0]
    model = AffineAligner(64, 8, lambdas=lambdas, criterion="val_mse")
    trainer().fit(model, dm)
    train = SufficientStats.zeros(64, 8).update(*dm.parts["train"])
    val = SufficientStats.zeros(64, 8).update(*dm.parts["val"])
    scores = [val_mse(val, m) for m in ridge_path(train, lambdas)]
    assert float(model.chosen_lambda) == lambdas[scores.index(min(scores))]
    assert model.lambda_path and min(model.lambda_path.values()) == pytest.approx(min(scores))
    assert model.lambda_path.criterion == "val_mse"
    assert model.lambda_path.scores["gcv"] == pytest.approx(gcv_scores(train, lambdas), rel=1e-9)


def test_auto_without_a_head_chooses_lambda_by_gcv():
    x, y, _, _ = linear_pairs(n=300, d_x=64, d_y=8, noise=1.0, seed=3)
    dm = TensorDataModule(x, y)
    lambdas = [1e-6, 1e-3, 1e-1, 1.0, 10.0]
    model = AffineAligner(64, 8, lambdas=lambdas)
    trainer().fit(model, dm)
    gcv = gcv_scores(SufficientStats.zeros(64, 8).update(*dm.parts["train"]), lambdas)
    assert model.lambda_path.criterion == "gcv" and float(model.chosen_lambda) == lambdas[gcv.index(min(gcv))]


def head_problem():
    """Targets whose first 2 dims carry the task (read by the head) and whose 14 loud dims are noise."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(500, 24, generator=g)
    task = x @ torch.randn(24, 2, generator=g) / 24 ** 0.5
    y = torch.cat([task, 4.0 * torch.randn(500, 14, generator=g)], 1)
    head = AffineMap(torch.cat([torch.randn(3, 2, generator=g, dtype=torch.float64) * 3,
                                torch.zeros(3, 14, dtype=torch.float64)], 1), torch.tensor([1.0, 0.0, -0.5]).double())
    return x, y, head


def test_a_head_chooses_lambda_through_the_validation_logits():
    x, y, head = head_problem()
    dm = TensorDataModule(x, y)
    lambdas = [1e-4, 1e-2, 1.0, 100.0]
    model = AffineAligner(24, 16, lambdas=lambdas)
    model.set_head(head)
    trainer().fit(model, dm)
    (xt, yt), (xv, yv) = dm.parts["train"], dm.parts["val"]
    train = SufficientStats.zeros(24, 16, full_yty=False).update(xt, yt)
    val = SufficientStats.zeros(24, 16, full_yty=False).update(xv, yv)
    head_val = SufficientStats.zeros(24, 3, full_yty=False).update(xv, head(yv))
    want, lam, path = solve(train, val, lambdas=lambdas, head=head, head_val=head_val)
    assert model.lambda_path.criterion == "head" and float(model.chosen_lambda) == lam == path.chosen["head"]
    logit_mse = [float(((head(m(xv)) - head(yv)) ** 2).mean()) for m in ridge_path(train, lambdas)]
    assert model.lambda_path.scores["head"] == pytest.approx(logit_mse, rel=1e-9)
    assert path.chosen["head"] != path.chosen["val_mse"]  # the loud dims would have asked for another λ
    torch.testing.assert_close(model.linear.weight, want.weight.float(), rtol=1e-5, atol=1e-6)


def test_the_head_as_a_classifier_checkpoint_or_a_head_export_gives_the_same_fit(tmp_path):
    import lightning as L
    from lightning_modules.models.classifier import LinearClassifier
    from serve.formats.heads import write_head_export

    x, y, head = head_problem()
    clf = LinearClassifier(16, 3, standardize=False)
    with torch.no_grad():
        clf.linear.weight.copy_(head.weight.float())
        clf.linear.bias.copy_(head.bias.float())
    ckpt = tmp_path / "head.ckpt"
    torch.save({"state_dict": clf.state_dict(), "hyper_parameters": dict(clf.hparams),
                "pytorch-lightning_version": L.__version__}, ckpt)
    folder = write_head_export(tmp_path / "export", head.weight.numpy(), head.bias.numpy(), target={"model": "t"},
                               label_names=["a", "b", "c"])
    for source in (ckpt, folder):
        torch.testing.assert_close(load_head(source).weight, head.weight.float().double())
    fits = []
    for source in (str(ckpt), str(folder)):
        model = AffineAligner(24, 16, lambdas=[1e-4, 1e-2, 1.0, 100.0], classifier=source)
        trainer().fit(model, TensorDataModule(x, y))
        fits.append(model)
    direct = AffineAligner(24, 16, lambdas=[1e-4, 1e-2, 1.0, 100.0])
    direct.set_head(head)
    trainer().fit(direct, TensorDataModule(x, y))
    for model in fits:
        assert model.lambda_path.criterion == "head" and float(model.chosen_lambda) == float(direct.chosen_lambda)
        assert model.lambda_path.scores["head"] == pytest.approx(direct.lambda_path.scores["head"], rel=1e-6)
    with pytest.raises(ValueError, match="does not exist; pass a LinearClassifier checkpoint"):
        load_head(tmp_path / "missing.ckpt")


def test_the_lambda_path_and_criterion_are_saved_with_the_map(tmp_path):
    import json

    x, y, head = head_problem()
    model = AffineAligner(24, 16, lambdas=[1e-4, 1e-2, 1.0])
    model.set_head(head)
    trainer().fit(model, TensorDataModule(x, y))
    folder = model.save_pretrained(tmp_path / "map")
    config = json.loads((folder / "config.json").read_text())
    assert config["criterion"] == "auto" and config["lambda_selection"]["criterion"] == "head"
    assert set(config["lambda_selection"]["scores"]) == {"gcv", "val_mse", "head"}
    loaded = AffineAligner.from_pretrained(folder)
    assert loaded.lambda_path == model.lambda_path and float(loaded.chosen_lambda) == float(model.chosen_lambda)


def test_cca_accumulates_the_full_target_covariance():
    x, y, _, _ = linear_pairs(n=600, d_x=12, d_y=8, noise=0.5, seed=7)
    dm = TensorDataModule(x, y)
    model = AffineAligner(12, 8, estimator="cca", rank=3, lambdas=[1e-3, 1e-1])
    trainer().fit(model, dm)
    train = SufficientStats.zeros(12, 8, full_yty=True).update(*dm.parts["train"])
    lam = float(model.chosen_lambda)
    assert lam == model.lambda_path.chosen["gcv"]
    want = fit_affine(train, "cca", lam=lam, rank=3)
    torch.testing.assert_close(model.linear.weight, want.weight.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("estimator", ["lstsq", "procrustes", "scaled_procrustes"])
def test_other_estimators_recover_a_rotation(estimator):
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    x = torch.randn(1000, 16, generator=g)
    y = 2.0 * x @ q.T if estimator == "scaled_procrustes" else x @ q.T
    model = AffineAligner(16, 16, estimator=estimator)
    trainer().fit(model, TensorDataModule(x, y))
    torch.testing.assert_close(model(x[:50]), y[:50], atol=1e-4, rtol=1e-4)


def test_finetuning_starts_from_the_closed_form_and_improves_a_cosine_loss():
    x, _, w, _ = linear_pairs(n=1500)
    x = x - x.mean(0)
    # Row norms that depend on x: least squares bends toward big rows, cosine wants W's direction.
    y = (x @ w.T) * torch.exp(1.5 * x[:, :1])
    dm = TensorDataModule(x, y, batch_size=128)
    closed = AffineAligner(24, 16, lambdas=[1e-3], finetune_loss="cosine")
    trainer().fit(closed, dm)
    tuned = AffineAligner(24, 16, lambdas=[1e-3], finetune_loss="cosine", lr=3e-3)
    trainer(max_epochs=15).fit(tuned, dm)
    xv, yv = dm.parts["val"]
    cos = lambda m: torch.nn.functional.cosine_similarity(m(xv), yv).mean().item()  # noqa: E731
    assert cos(tuned) > cos(closed) + 0.02


def test_bad_configuration_is_refused():
    with pytest.raises(ValueError, match="unknown estimator"):
        AffineAligner(4, 4, estimator="pca")
    with pytest.raises(ValueError, match="needs `classifier`"):
        AffineAligner(4, 4, finetune_loss="task")
    with pytest.raises(ValueError, match="unknown λ criterion 'loo'; use auto, gcv, val_mse or head"):
        AffineAligner(4, 4, criterion="loo")
    with pytest.raises(ValueError, match="criterion='head' needs the target's head: set `classifier`"):
        trainer().fit(AffineAligner(24, 16, criterion="head"), TensorDataModule(*linear_pairs()[:2]))
    with pytest.raises(ValueError, match="the head reads 3-d states but this aligner maps to 4-d"):
        AffineAligner(4, 4).set_head(AffineMap(torch.ones(2, 3), torch.zeros(2)))
    x, y, _, _ = linear_pairs()
    with pytest.raises(ValueError, match="data holds 24 -> 16"):
        trainer().fit(AffineAligner(20, 16), TensorDataModule(x, y))


def test_nan_states_are_a_clear_error():
    x, y, _, _ = linear_pairs(n=200)
    x[5, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        trainer().fit(AffineAligner(24, 16), TensorDataModule(x, y))

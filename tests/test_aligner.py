"""AffineAligner: closed form through Lightning's fit loop, λ selection, fine-tuning, DDP."""

from __future__ import annotations

import pytest
import torch

from lightning_modules.aligner import AffineAligner
from lightning_modules.solvers import SufficientStats, fit_affine, ridge_path, val_mse

from helpers import TensorDataModule, linear_pairs, trainer


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
    model = AffineAligner(64, 8, lambdas=lambdas)
    trainer().fit(model, dm)
    train = SufficientStats.zeros(64, 8).update(*dm.parts["train"])
    val = SufficientStats.zeros(64, 8).update(*dm.parts["val"])
    scores = [val_mse(val, m) for m in ridge_path(train, lambdas)]
    assert float(model.chosen_lambda) == lambdas[scores.index(min(scores))]
    assert model.lambda_path and min(model.lambda_path.values()) == pytest.approx(min(scores))


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
    x, y, _, _ = linear_pairs()
    with pytest.raises(ValueError, match="data holds 24 -> 16"):
        trainer().fit(AffineAligner(20, 16), TensorDataModule(x, y))


def test_nan_states_are_a_clear_error():
    x, y, _, _ = linear_pairs(n=200)
    x[5, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        trainer().fit(AffineAligner(24, 16), TensorDataModule(x, y))

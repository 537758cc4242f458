"""fit_logistic: scikit-learn's L2 logistic regression, its C chosen on validation, bad input refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from lightning_modules.fitting.logistic import fit_logistic


def blobs(n: int, d: int, k: int, spread: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """k Gaussian classes far from zero mean / unit scale, with one constant dimension; small `spread`:
    overlapping classes, large: separable."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, d, generator=g) * spread
    y = torch.randint(0, k, (n,), generator=g)
    y[:k] = torch.arange(k)  # every class present
    x = (centers[y] + torch.randn(n, d, generator=g)) * torch.linspace(0.5, 20.0, d) + 40.0
    x[:, 0] = 3.0
    return x, y


def sklearn_on_standardised(fit, x, y, c, class_weight=None):
    z = ((x.double() - fit.mean) / fit.scale).numpy()
    return z, LogisticRegression(C=c, max_iter=20000, tol=1e-12, class_weight=class_weight).fit(z, y.numpy())


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("spread,c", [(0.5, 0.01), (0.5, 1.0), (0.5, 30.0), (4.0, 0.1)])
def test_fixed_c_equals_sklearn(k, spread, c):
    x, y = blobs(300, 10, k, spread)
    fit = fit_logistic(x, y, None, None, cs=[c], max_iter=2000, tol=1e-10)
    z, sk = sklearn_on_standardised(fit, x, y, c)
    w, b = fit.standardized()
    # scikit-learn keeps one vector for two classes: our symmetric head's row difference
    coef = (w[1] - w[0])[None].numpy() if k == 2 else w.numpy()
    np.testing.assert_allclose(coef, sk.coef_, atol=1e-4 * max(1.0, np.abs(sk.coef_).max()))
    logits = x.double() @ fit.weight.T + fit.bias  # the folded raw-coordinate head
    np.testing.assert_allclose(torch.softmax(logits, 1).numpy(), sk.predict_proba(z), atol=1e-5)
    assert (logits.argmax(1).numpy() == sk.predict(z)).all()
    assert fit.c == c and fit.scale[0] == 1.0  # the dead dimension keeps scale 1


def test_balanced_class_weight_equals_sklearn():
    x, y = blobs(400, 8, 3, 0.7)
    keep = torch.cat([torch.nonzero(y == 0).flatten()[:15], torch.nonzero(y != 0).flatten()])
    x, y = x[keep], y[keep]
    fit = fit_logistic(x, y, None, None, cs=[0.5], max_iter=2000, tol=1e-10, class_weight="balanced")
    _, sk = sklearn_on_standardised(fit, x, y, 0.5, class_weight="balanced")
    np.testing.assert_allclose(fit.standardized()[0].numpy(), sk.coef_, atol=1e-5)
    counts = torch.bincount(y).double()
    torch.testing.assert_close(fit.class_weights, len(y) / (3 * counts))


def test_c_chosen_by_val_accuracy_then_log_loss():
    x, y = blobs(600, 30, 3, 0.35, seed=1)
    xt, yt, xv, yv = x[:200], y[:200], x[200:], y[200:]  # few train rows per dim: C matters
    cs = [1e-4, 1e-2, 1.0, 100.0]
    fit = fit_logistic(xt, yt, xv, yv, cs=list(reversed(cs)), max_iter=1000)
    assert fit.cs == cs  # solved in increasing C
    for i, c in enumerate(cs):  # each path point scores what a fresh fit at that C scores
        alone = fit_logistic(xt, yt, None, None, cs=[c], max_iter=1000)
        acc = float(((xv.double() @ alone.weight.T + alone.bias).argmax(1) == yv).double().mean())
        assert abs(acc - fit.val_accuracy[i]) <= 1 / len(yv) + 1e-12
    best = max(fit.val_accuracy)
    tied = [i for i, a in enumerate(fit.val_accuracy) if a == best]
    assert fit.c == cs[min(tied, key=lambda i: fit.val_loss[i])]
    assert len(set(fit.val_accuracy)) > 1  # the grid is not flat: the choice is a real one
    # the returned head is the chosen C's
    acc = float(((xv.double() @ fit.weight.T + fit.bias).argmax(1) == yv).double().mean())
    assert acc == best


def test_bad_input_gets_a_clear_error():
    x, y = blobs(100, 5, 3, 1.0)
    bad = x.clone()
    bad[7, 2] = float("nan")
    with pytest.raises(ValueError, match="1 rows with NaN or inf"):
        fit_logistic(bad, y, x, y)
    with pytest.raises(ValueError, match="val split has 1 rows with NaN"):
        fit_logistic(x, y, bad, y)
    with pytest.raises(ValueError, match=r"classes \[1, 2\] of 3 have none"):
        fit_logistic(x, torch.zeros_like(y), x, y)
    with pytest.raises(ValueError, match="non-empty list of finite C > 0"):
        fit_logistic(x, y, x, y, cs=[])
    with pytest.raises(ValueError, match="non-empty list of finite C > 0"):
        fit_logistic(x, y, x, y, cs=[1.0, 0.0])
    with pytest.raises(ValueError, match="needs the val split"):
        fit_logistic(x, y, None, None, cs=[0.1, 1.0])
    with pytest.raises(ValueError, match="labels must lie in 0..2"):
        fit_logistic(x, y, x, y + 1, num_classes=3)
    with pytest.raises(ValueError, match="integer class indices"):
        fit_logistic(x, y.float(), x, y)
    with pytest.raises(ValueError, match="3 positive weights"):
        fit_logistic(x, y, x, y, class_weight=[1.0, 2.0])
    with pytest.raises(ValueError, match="val states are 4-d"):
        fit_logistic(x, y, x[:, :4], y)

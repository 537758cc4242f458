"""λ chosen for the task: GCV, validation MSE and the head criterion, all from the ridge path's one eigh."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_modules.fitting import solvers as S
from lightning_modules.settings import DEFAULT_LAMBDAS
from lightning_modules.fitting.affine_map import AffineMap, compose
from lightning_modules.fitting.estimators import gcv_scores, path_factors, sklearn_alpha
from lightning_modules.fitting.solvers import LambdaPath, solve, val_mse
from lightning_modules.fitting.stats import SufficientStats

F64 = torch.float64
COMBOS = [(True, True), (True, False), (False, True), (False, False)]


def stats_of(x, y, full_yty=False):
    return SufficientStats.zeros(x.shape[1], y.shape[1], full_yty=full_yty).update(x, y)


def problem(n=60, d_x=9, d_y=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_x, generator=g, dtype=F64) * torch.linspace(0.3, 3.0, d_x, dtype=F64) + 2.0
    y = x @ torch.randn(d_x, d_y, generator=g, dtype=F64) + 1.5 * torch.randn(n, d_y, generator=g, dtype=F64) - 1.0
    return x, y


def normalised(x, center, standardize):
    mx = x.mean(0) if center else torch.zeros(x.shape[1], dtype=F64)
    sx = x.std(0, correction=0) if standardize else torch.ones(x.shape[1], dtype=F64)
    return (x - mx) / sx


def brute_force_ridge(x, y, lam, center, standardize):
    """Ridge on explicit rows (numpy normal equations): returns (fitted raw predictions, hat matrix trace)."""
    xn = normalised(x, center, standardize).numpy()
    yc = (y - y.mean(0)).numpy() if center else y.numpy()
    n, d = xn.shape
    alpha = lam * n * float(np.mean(np.diag(xn.T @ xn / n)))
    hat = xn @ np.linalg.solve(xn.T @ xn + alpha * np.eye(d), xn.T)
    fitted = hat @ yc + (y.mean(0).numpy() if center else 0.0)
    return fitted, float(np.trace(hat)) + (1.0 if center else 0.0), alpha


@pytest.mark.parametrize("center, standardize", COMBOS)
def test_gcv_from_statistics_equals_the_explicit_hat_matrix(center, standardize):
    x, y = problem()
    lams = [1e-4, 1e-2, 0.1, 1.0, 10.0]
    got = gcv_scores(stats_of(x, y), lams, center, standardize)
    n, d_y = y.shape
    for lam, score in zip(lams, got):
        fitted, df, _ = brute_force_ridge(x, y, lam, center, standardize)
        mse = float(((y.numpy() - fitted) ** 2).sum()) / (n * d_y)
        assert score == pytest.approx(mse / (1 - df / n) ** 2, rel=1e-8)
        assert path_factors(stats_of(x, y), center, standardize).df(lam) == pytest.approx(df, rel=1e-10)


def test_gcv_is_infinite_when_the_fit_uses_every_row():
    x, y = problem(n=8, d_x=12)  # df -> n as λ -> 0
    scores = gcv_scores(stats_of(x, y), [1e-12, 1.0])
    assert scores[0] == float("inf") and np.isfinite(scores[1])


@pytest.mark.parametrize("center, standardize", COMBOS)
def test_head_criterion_is_the_logit_mse_on_the_validation_rows(center, standardize):
    x, y = problem(seed=1)
    xv, yv = problem(n=40, seed=2)
    g = torch.Generator().manual_seed(3)
    head = AffineMap(torch.randn(3, 5, generator=g, dtype=F64), torch.randn(3, generator=g, dtype=F64))
    lams = [1e-3, 0.1, 1.0, 30.0]
    amap, lam, path = solve(stats_of(x, y), stats_of(xv, yv), lambdas=lams, center=center, standardize=standardize,
                            criterion="head", head=head, head_val=stats_of(xv, head(yv)))
    factors = path_factors(stats_of(x, y), center, standardize)
    for lam_i, score in zip(lams, path.scores["head"]):
        logits = head(factors.map(lam_i)(xv))
        assert score == pytest.approx(float(((logits - head(yv)) ** 2).mean()), rel=1e-9)
        fast = factors.map(lam_i, head)  # head ∘ map_λ without the d_y × d_x map
        slow = compose(head, factors.map(lam_i))
        torch.testing.assert_close(fast.weight, slow.weight, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(fast.bias, slow.bias, rtol=1e-10, atol=1e-12)
    for lam_i, score in zip(lams, path.scores["val_mse"]):
        assert score == pytest.approx(val_mse(stats_of(xv, yv), factors.map(lam_i)), rel=1e-9)
    assert path.criterion == "head" and lam == path.chosen["head"] == lams[int(np.argmin(path.scores["head"]))]


def test_the_whole_path_is_one_eigh(monkeypatch):
    x, y = problem(seed=4)
    xv, yv = problem(n=40, seed=5)
    head = AffineMap(torch.ones(2, 5, dtype=F64), torch.zeros(2, dtype=F64))
    calls = []
    eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda a, *args, **kw: calls.append(a.shape) or eigh(a, *args, **kw))
    amap, lam, path = solve(stats_of(x, y), stats_of(xv, yv), lambdas=DEFAULT_LAMBDAS, head=head,
                            head_val=stats_of(xv, head(yv)))
    assert len(calls) == 1 and calls[0] == (9, 9)
    assert len(path.lambdas) == len(DEFAULT_LAMBDAS) >= 30 and set(path.scores) == {"gcv", "val_mse", "head"}
    assert all(len(v) == len(DEFAULT_LAMBDAS) for v in path.scores.values())
    assert path.criterion == "head"  # auto: the head is known


def planted(n, seed, nuisance_sd=6.0):
    """Targets = 4 task dims (a clean function of x, read by the head) + 40 nuisance dims the head ignores,
    carrying most of the variance and almost unpredictable from x. The head's biases favour class 0, so a
    map shrunk toward the target mean predicts class 0 everywhere (collapse)."""
    g = torch.Generator().manual_seed(100)  # the same truth for every split
    a = torch.randn(40, 4, generator=g, dtype=F64) / 40 ** 0.5
    b = torch.randn(40, 40, generator=g, dtype=F64) * 0.05
    head = AffineMap(torch.cat([torch.randn(3, 4, generator=g, dtype=F64) * 3, torch.zeros(3, 40, dtype=F64)], 1),
                     torch.tensor([2.0, 0.0, -0.5], dtype=F64))
    r = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 40, generator=r, dtype=F64)
    task = x @ a + 0.05 * torch.randn(n, 4, generator=r, dtype=F64)
    nuisance = x @ b + nuisance_sd * torch.randn(n, 40, generator=r, dtype=F64)
    y = torch.cat([task, nuisance], 1)
    labels = head(torch.cat([x @ a, torch.zeros(n, 40, dtype=F64)], 1)).argmax(1)
    return x, y, labels, head


def test_head_criterion_beats_val_mse_where_the_head_ignores_the_loud_dims():
    x, y, _, head = planted(120, seed=1)
    xv, yv, _, _ = planted(400, seed=2)
    xt, _, labels, _ = planted(2000, seed=3)
    train, val, head_val = stats_of(x, y), stats_of(xv, yv), stats_of(xv, head(yv))
    maps = {c: solve(train, val, criterion=c, head=head, head_val=head_val) for c in ("val_mse", "head")}
    (m_val, lam_val, path), (m_head, lam_head, _) = maps["val_mse"], maps["head"]
    assert path.chosen == {"gcv": path.chosen["gcv"], "val_mse": lam_val, "head": lam_head}
    assert lam_head < lam_val  # the loud, unpredictable dims ask for heavy shrinkage, the task dims do not
    acc = {c: float((head(m(xt)).argmax(1) == labels).double().mean()) for c, (m, _, _) in maps.items()}
    assert acc["head"] > acc["val_mse"] + 0.1 and acc["head"] > 0.9, acc


@pytest.mark.parametrize("criterion", ["gcv", "val_mse", "head", "auto"])
def test_every_criterion_returns_the_brute_force_ridge_at_its_lambda(criterion):
    x, y = problem(n=80, seed=6)
    xv, yv = problem(n=50, seed=7)
    head = AffineMap(torch.randn(4, 5, dtype=F64, generator=torch.Generator().manual_seed(8)), torch.zeros(4, dtype=F64))
    amap, lam, path = solve(stats_of(x, y), stats_of(xv, yv), lambdas=[1e-4, 1e-2, 0.1, 1.0, 10.0], center=True,
                            standardize=True, criterion=criterion, head=head, head_val=stats_of(xv, head(yv)))
    assert path.criterion == ("head" if criterion == "auto" else criterion) and lam == path.chosen[path.criterion]
    # explicit rows: sklearn-style Ridge on the standardised X, alpha = λ·n·mean eigenvalue
    mx, sx = x.mean(0), x.std(0, correction=0)
    xn, yc = ((x - mx) / sx).numpy(), (y - y.mean(0)).numpy()
    alpha = sklearn_alpha(stats_of(x, y), lam, True, True)
    coef = np.linalg.solve(xn.T @ xn + alpha * np.eye(xn.shape[1]), xn.T @ yc).T / sx.numpy()
    np.testing.assert_allclose(amap.weight.numpy(), coef, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(amap.bias.numpy(), y.mean(0).numpy() - coef @ mx.numpy(), rtol=1e-8, atol=1e-9)


def test_gcv_needs_no_validation_rows():
    x, y = problem(seed=9)
    amap, lam, path = solve(stats_of(x, y), None, lambdas=[1e-3, 0.1, 1.0])
    assert path.criterion == "gcv" and set(path.scores) == {"gcv"} and lam == path.chosen["gcv"]
    assert dict(path) == dict(zip([1e-3, 0.1, 1.0], path.scores["gcv"]))  # the mapping view: λ -> its score


def test_auto_takes_val_mse_where_the_fit_can_interpolate():
    """With fewer fit rows than source dims GCV's 0/0 favours the smallest λ; auto then scores held-out rows."""
    x, y = problem(n=30, d_x=40, seed=3)
    xv, yv = problem(n=200, d_x=40, seed=4)
    _, lam, path = solve(stats_of(x, y), stats_of(xv, yv))
    assert path.criterion == "val_mse" and lam == path.chosen["val_mse"]
    assert path.chosen["gcv"] < lam  # GCV alone would have picked a smaller, interpolating λ
    _, _, roomy = solve(stats_of(*problem(n=300, d_x=40, seed=3)), stats_of(xv, yv))
    assert roomy.criterion == "gcv"


def test_bad_criteria_are_clear_errors():
    x, y = problem(seed=10)
    train = stats_of(x, y)
    with pytest.raises(ValueError, match="unknown λ criterion 'loo'; use auto, gcv, val_mse or head"):
        solve(train, None, criterion="loo")
    with pytest.raises(ValueError, match="criterion='val_mse' needs validation rows"):
        solve(train, None, criterion="val_mse")
    with pytest.raises(ValueError, match="criterion='head' needs the target head"):
        solve(train, train, criterion="head")
    head = AffineMap(torch.ones(2, 7, dtype=F64), torch.zeros(2, dtype=F64))
    with pytest.raises(ValueError, match="the head reads 7-d states but the map's targets are 5-d"):
        solve(train, None, head=head, head_val=stats_of(x, head(torch.ones(len(x), 7, dtype=F64))))


def test_lambda_path_round_trips_through_json():
    import json

    x, y = problem(n=8, d_x=12, seed=11)
    _, _, path = solve(stats_of(x, y), stats_of(x, y), lambdas=[1e-12, 0.1, 1.0])
    assert path.scores["gcv"][0] == float("inf")
    doc = json.loads(json.dumps(path.as_dict(), allow_nan=False))  # inf is written as null
    assert LambdaPath.from_dict(doc) == path
    assert solve(stats_of(x, y), None, "procrustes")[2] == LambdaPath.empty() and not S.LambdaPath.empty()

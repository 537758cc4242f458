"""Closed-form affine solvers: recovery, equivalence with numpy/sklearn, streaming/DDP exactness, edge cases."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightning_modules.fitting import stats as fitting_stats
from lightning_modules.fitting.affine_map import AffineMap
from lightning_modules.fitting.estimators import (Normalization, SingularSystemWarning, fit_lstsq, fit_procrustes,
                                                  fit_ridge, ridge_path, sklearn_alpha)
from lightning_modules.fitting.solvers import fit_affine, solve, val_mse, val_r2
from lightning_modules.fitting.stats import SufficientStats

F64 = torch.float64


def make_data(n=2000, d_x=12, d_y=7, noise=0.01, seed=0, offset=3.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_x, generator=g, dtype=F64) * torch.linspace(0.5, 2.0, d_x, dtype=F64) + offset
    w = torch.randn(d_y, d_x, generator=g, dtype=F64)
    b = torch.randn(d_y, generator=g, dtype=F64)
    y = x @ w.T + b + noise * torch.randn(n, d_y, generator=g, dtype=F64)
    return x, y, w, b


def stats_of(x, y, **kw):
    return SufficientStats.zeros(x.shape[1], y.shape[1], **kw).update(x, y)


def random_semi_orthogonal(rows, cols, seed):
    """(rows, cols) matrix with orthonormal rows (rows <= cols) or orthonormal columns."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(max(rows, cols), min(rows, cols), generator=g, dtype=F64))
    return q if rows >= cols else q.T


def whitened(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=F64)
    x = x - x.mean(0)
    evals, evecs = torch.linalg.eigh(x.T @ x / n)
    return x @ evecs @ torch.diag(evals.rsqrt()) @ evecs.T


# ----------------------------------------------------------------------------- statistics


def test_stats_match_direct_sums_with_chunking_and_blocked_gram(monkeypatch):
    monkeypatch.setattr(fitting_stats, "_PANEL", 4)       # exercise the block-triangular Gram path at small d
    monkeypatch.setattr(fitting_stats, "_CHUNK_ROWS", 37)  # and the row chunking of one update call
    x, y, _, _ = make_data(n=301, d_x=18, d_y=11)
    st = stats_of(x.float().requires_grad_(), y.float())  # float32 promoted to float64, no autograd
    assert not st.xtx.requires_grad and st.xtx.grad_fn is None
    x64, y64 = x.float().double(), y.float().double()
    assert st.count == 301 and st.xtx.dtype == F64
    torch.testing.assert_close(st.sum_x, x64.sum(0))
    torch.testing.assert_close(st.xtx, x64.T @ x64)
    torch.testing.assert_close(st.xty, x64.T @ y64)
    torch.testing.assert_close(st.yty, y64.T @ y64)
    assert torch.equal(st.xtx, st.xtx.T)
    diag = stats_of(x.float(), y.float(), full_yty=False)
    torch.testing.assert_close(diag.yty, (y64 * y64).sum(0))


def test_two_halves_merged_equal_one_pass_and_all_reduce():
    x, y, _, _ = make_data(n=1001, d_x=20, d_y=9, noise=0.1)
    one = stats_of(x, y)
    a, b = stats_of(x[:500], y[:500]), stats_of(x[500:], y[500:])
    merged = a.clone().merge(b)
    # DDP: each rank sums ONE flat tensor; simulate both an in-place and a returning collective
    rank0, rank1 = a.clone(), b.clone()
    flat1 = rank1.flatten()
    rank0.all_reduce(lambda t: t.add_(flat1))
    returned = a.clone().all_reduce(lambda t: t + flat1)
    for st in (merged, rank0, returned, one.unflatten(one.flatten())):
        torch.testing.assert_close(st.flatten(), one.flatten(), rtol=1e-12, atol=1e-9)
        for method in ("ridge", "lstsq", "procrustes", "scaled_procrustes"):
            for standardize in (False, True):
                w1 = fit_affine(one, method, lam=1e-3, standardize=standardize)
                w2 = fit_affine(st, method, lam=1e-3, standardize=standardize)
                torch.testing.assert_close(w2.weight, w1.weight, rtol=0, atol=1e-6)
                torch.testing.assert_close(w2.bias, w1.bias, rtol=0, atol=1e-6)


def test_merge_and_unflatten_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="merge"):
        SufficientStats.zeros(3, 4).merge(SufficientStats.zeros(3, 5))
    with pytest.raises(ValueError, match="merge"):
        SufficientStats.zeros(3, 4).merge(SufficientStats.zeros(3, 4, full_yty=False))
    with pytest.raises(ValueError, match="unflatten"):
        SufficientStats.zeros(3, 4).unflatten(torch.zeros(10, dtype=F64))


@pytest.mark.parametrize("bad, name", [("x_nan", "x"), ("y_inf", "y")])
def test_non_finite_rows_raise_clear_error_and_leave_stats_untouched(bad, name, monkeypatch):
    monkeypatch.setattr(fitting_stats, "_CHUNK_ROWS", 16)  # bad rows only in later chunks of one update call
    x, y, _, _ = make_data(n=50, d_x=5, d_y=3)
    st = stats_of(x[:10], y[:10])
    before = st.flatten().clone()
    if bad == "x_nan":
        x[[33, 47], 1] = float("nan")
    else:
        y[[20, 21, 49], 0] = float("inf")
    n_bad = 2 if bad == "x_nan" else 3
    with pytest.raises(ValueError, match=rf"`{name}`.*{n_bad} of 50 rows contain NaN/inf.*corrupt"):
        st.update(x, y)
    assert torch.equal(st.flatten(), before)


def test_wrong_shapes_raise():
    st = SufficientStats.zeros(5, 3)
    with pytest.raises(ValueError, match=r"`x` must be a 2-D tensor \(rows, 5\)"):
        st.update(torch.zeros(4, 6), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="`y` must be a 2-D"):
        st.update(torch.zeros(4, 5), torch.zeros(2, 4, 3))
    with pytest.raises(ValueError, match="paired"):
        st.update(torch.zeros(4, 5), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="empty"):
        fit_affine(st, "ridge")


# ----------------------------------------------------------------------------- ridge / lstsq


def test_ridge_recovers_known_map():
    x, y, w, b = make_data(n=4000, noise=0.05)
    for standardize in (False, True):
        amap = fit_affine(stats_of(x, y), "ridge", lam=1e-6, standardize=standardize)
        torch.testing.assert_close(amap.weight, w, rtol=0, atol=5e-3)
        torch.testing.assert_close(amap.bias, b, rtol=0, atol=3e-2)
        assert torch.allclose(amap(x.float()), x @ w.T + b, atol=0.1)  # __call__ accepts float32


def test_lstsq_matches_numpy():
    x, y, _, _ = make_data(n=500, noise=0.5)
    amap = fit_lstsq(stats_of(x, y))
    xa = np.hstack([x.numpy(), np.ones((len(x), 1))])
    sol = np.linalg.lstsq(xa, y.numpy(), rcond=None)[0]
    np.testing.assert_allclose(amap.weight.numpy(), sol[:-1].T, atol=1e-9)
    np.testing.assert_allclose(amap.bias.numpy(), sol[-1], atol=1e-8)
    uncentered = fit_lstsq(stats_of(x, y), center=False)  # through the origin, bias 0
    sol0 = np.linalg.lstsq(x.numpy(), y.numpy(), rcond=None)[0]
    np.testing.assert_allclose(uncentered.weight.numpy(), sol0.T, atol=1e-9)
    assert torch.count_nonzero(uncentered.bias) == 0


@pytest.mark.parametrize("standardize", [False, True])
@pytest.mark.parametrize("lam", [1e-3, 0.3, 10.0])
def test_ridge_matches_sklearn_with_documented_lambda_scaling(standardize, lam):
    from sklearn.linear_model import Ridge

    x, y, _, _ = make_data(n=300, d_x=15, noise=1.0, seed=1)
    xn = x.numpy()
    mean, std = xn.mean(0), (xn.std(0) if standardize else np.ones(xn.shape[1]))
    xs = (xn - mean) / std
    # documented convention: penalty λ·tr(Cxx)/d_x on the 1/n covariance == sklearn alpha λ·n·tr(Cxx)/d_x
    alpha = lam * len(xs) * np.trace(np.cov(xs.T, bias=True)) / xs.shape[1]
    assert sklearn_alpha(stats_of(x, y), lam, standardize=standardize) == pytest.approx(alpha, rel=1e-10)
    sk = Ridge(alpha=alpha).fit(xs, y.numpy())
    amap = fit_ridge(stats_of(x, y), lam, standardize=standardize)
    np.testing.assert_allclose(amap.weight.numpy(), sk.coef_ / std[None, :], rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(amap.bias.numpy(), sk.intercept_ - (sk.coef_ / std) @ mean, rtol=1e-7, atol=1e-8)


def test_lambda_path_equals_individual_fits():
    x, y, _, _ = make_data(n=200, d_x=30, noise=1.0, seed=2)
    st = stats_of(x, y)
    lams = [0.0, 1e-6, 1e-3, 0.1, 1.0, 100.0]
    for standardize in (False, True):
        path = ridge_path(st, lams, standardize=standardize)
        for lam, amap in zip(lams, path):
            single = fit_affine(st, "ridge", lam=lam, standardize=standardize)
            torch.testing.assert_close(amap.weight, single.weight, rtol=1e-8, atol=1e-10)
            torch.testing.assert_close(amap.bias, single.bias, rtol=1e-8, atol=1e-10)
    norms = [float(m.weight.norm()) for m in path]
    assert norms == sorted(norms, reverse=True)  # more shrinkage with larger λ
    with pytest.raises(ValueError, match=">= 0"):
        ridge_path(st, [-1.0])


def test_val_mse_criterion_closed_form_mse_and_sensible_choice():
    # few noisy rows for many dims: the best λ must be interior, not the grid's smallest or largest
    x, y, _, _ = make_data(n=2080, d_x=60, d_y=5, noise=4.0, seed=3)
    xtr, ytr, xva, yva = x[:80], y[:80], x[80:], y[80:]
    lams = [1e-6, 1e-4, 1e-2, 1e-1, 1.0, 10.0, 1e3]
    amap, best, path = solve(stats_of(xtr, ytr), stats_of(xva, yva), lambdas=lams, criterion="val_mse")
    mses = path.scores["val_mse"]
    direct = [float(F.mse_loss(m(xva), yva)) for m in ridge_path(stats_of(xtr, ytr), lams)]
    np.testing.assert_allclose(mses, direct, rtol=1e-9)
    assert best == lams[int(np.argmin(direct))]
    assert best not in (lams[0], lams[-1])
    assert mses[lams.index(best)] < 0.9 * min(mses[0], mses[-1])
    assert val_mse(stats_of(xva, yva), amap) == pytest.approx(float(F.mse_loss(amap(xva), yva)), rel=1e-9)
    sst = float(((yva - yva.mean(0)) ** 2).sum())
    r2 = 1 - float(((yva - amap(xva)) ** 2).sum()) / sst
    assert val_r2(stats_of(xva, yva), amap) == pytest.approx(r2, rel=1e-9)
    # the diagonal-only yty mode gives the same closed-form numbers
    assert val_mse(stats_of(xva, yva, full_yty=False), amap) == pytest.approx(mses[lams.index(best)], rel=1e-12)


def test_singular_system_warns_and_returns_min_norm():
    x, y, _, _ = make_data(n=10, d_x=30, d_y=4, noise=1.0, seed=4)
    st = stats_of(x, y)
    xc, yc = (x - x.mean(0)).numpy(), (y - y.mean(0)).numpy()
    min_norm = np.linalg.lstsq(xc, yc, rcond=None)[0].T
    for fit in (lambda: fit_lstsq(st), lambda: fit_affine(st, "ridge", lam=0.0),
                lambda: ridge_path(st, [0.0, 1e-3])[0]):
        with pytest.warns(SingularSystemWarning, match=r"singular.*rank 9 < d_x=30.*minimum-norm.*ridge"):
            amap = fit()
        np.testing.assert_allclose(amap.weight.numpy(), min_norm, atol=1e-8)
        torch.testing.assert_close(amap(x), y, atol=1e-8, rtol=0)  # interpolates the training rows
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit_affine(st, "ridge", lam=1e-3)          # regularised: no warning
        fit_lstsq(stats_of(*make_data(n=100)[:2]))  # well-posed: no warning


# ----------------------------------------------------------------------------- normalisation


def test_zero_variance_dims_stay_finite_when_standardising():
    g = torch.Generator().manual_seed(5)
    n = 3000
    informative = torch.randn(n, 6, generator=g, dtype=F64) * torch.tensor([0.1, 1, 10, 0.5, 2, 3], dtype=F64)
    degenerate = torch.stack([torch.full((n,), 0.3, dtype=F64),                       # constant
                              1e-33 * torch.randn(n, generator=g, dtype=F64),         # MiniLM-like
                              0.1 + 5e-7 * torch.randn(n, generator=g, dtype=F64)], 1)
    x = torch.cat([informative, degenerate], 1)
    w = torch.randn(4, 6, generator=g, dtype=F64)
    y = torch.cat([informative @ w.T + 0.01 * torch.randn(n, 4, generator=g, dtype=F64),
                   torch.full((n, 1), -2.0, dtype=F64)], 1)                           # constant target dim
    st = stats_of(x, y)
    norm = Normalization.from_stats(st, standardize=True)
    assert torch.equal(norm.scale_x[6:], torch.ones(3, dtype=F64)) and bool((norm.scale_x[:6] != 1).all())
    assert float(norm.scale_y[4]) == 1.0
    for method in ("ridge", "procrustes", "scaled_procrustes"):
        amap = fit_affine(st, method, lam=1e-4, standardize=True)
        assert bool(torch.isfinite(amap.weight).all() and torch.isfinite(amap.bias).all())
        assert float(amap.weight.abs().max()) < 1e3
    amap = fit_affine(st, "ridge", lam=1e-4, standardize=True)
    torch.testing.assert_close(amap(x)[:, 4], y[:, 4])  # constant target dim predicted exactly
    assert val_r2(st, amap) > 0.99
    torch.testing.assert_close(amap.weight[:4, :6], w, atol=2e-3, rtol=0)


def test_fold_back_to_raw_coordinates():
    x, y, _, _ = make_data(n=400, d_x=9, d_y=5)
    for center in (False, True):
        norm = Normalization.from_stats(stats_of(x, y), center=center, standardize=True)
        w_n = torch.randn(5, 9, dtype=F64, generator=torch.Generator().manual_seed(6))
        amap = norm.fold(w_n)
        torch.testing.assert_close(amap(x), norm.denormalize_y(norm.normalize_x(x) @ w_n.T))
    # the normalised-space ridge solution, de-normalised, is what fit_ridge returns in raw coords
    norm = Normalization.from_stats(stats_of(x, y), standardize=True)
    xs, ys = norm.normalize_x(x), (y - norm.mean_y) / norm.scale_y
    w_n = torch.linalg.solve(xs.T @ xs / len(xs) + 0.1 * torch.eye(9, dtype=F64), xs.T @ ys / len(xs)).T
    amap = fit_ridge(stats_of(x, y), 0.1 / float((xs.T @ xs / len(xs)).trace() / 9), standardize=True)
    torch.testing.assert_close(amap(x), norm.denormalize_y(xs @ w_n.T))


# ----------------------------------------------------------------------------- procrustes


@pytest.mark.parametrize("d_x, d_y", [(6, 6), (8, 5), (5, 8)])
def test_procrustes_recovers_rotation_and_scale(d_x, d_y):
    x = whitened(500, d_x, seed=7) * 1.5 + 2.0
    r = random_semi_orthogonal(d_y, d_x, seed=8)  # weight: orthonormal rows or columns
    c = torch.arange(d_y, dtype=F64)
    noise = 1e-4 * torch.randn(500, d_y, dtype=F64, generator=torch.Generator().manual_seed(9))
    st = stats_of(x, x @ r.T + c + noise)
    amap = fit_procrustes(st)
    torch.testing.assert_close(amap.weight, r, atol=1e-3, rtol=0)
    torch.testing.assert_close(amap.bias, c, atol=1e-3, rtol=0)
    k = min(d_x, d_y)
    gram = amap.weight @ amap.weight.T if d_y <= d_x else amap.weight.T @ amap.weight
    torch.testing.assert_close(gram, torch.eye(k, dtype=F64))  # exactly semi-orthogonal

    st2 = stats_of(x, 2.5 * (x @ r.T) + c + noise)
    torch.testing.assert_close(fit_affine(st2, "scaled_procrustes").weight, 2.5 * r, atol=2e-3, rtol=0)
    torch.testing.assert_close(fit_affine(st2, "procrustes").weight, r, atol=1e-3, rtol=0)


def test_unknown_method_raises():
    with pytest.raises(ValueError, match="unknown method"):
        fit_affine(stats_of(*make_data(n=20)[:2]), "pca")  # type: ignore[arg-type]


def test_affine_map_call_and_to():
    amap = AffineMap(torch.eye(3, dtype=F64) * 2, torch.ones(3, dtype=F64))
    torch.testing.assert_close(amap(torch.ones(2, 3)), torch.full((2, 3), 3.0, dtype=F64))
    assert amap.to(torch.float32)(torch.ones(4, 5, 3)).shape == (4, 5, 3)

"""Reduced-rank ridge, CCA and target whitening (lightning_modules/fitting/subspace.py) against their definitions."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from lightning_modules.fitting.affine_map import AffineMap, compose
from lightning_modules.fitting.estimators import fit_procrustes, fit_ridge
from lightning_modules.fitting.solvers import fit_affine
from lightning_modules.fitting.stats import SufficientStats
from lightning_modules.fitting.subspace import (SubspaceError, canonical_pairs, fit_cca, fit_reduced_rank, fit_whitened,
                                        transform_target)

N, DX, DY = 500, 12, 8


@pytest.fixture(scope="module")
def problem() -> tuple[torch.Tensor, torch.Tensor, SufficientStats]:
    """Correlated x, y with very unequal target noise per dim (so whitening reorders the directions)."""
    g = torch.Generator().manual_seed(0)
    f64 = dict(generator=g, dtype=torch.float64)
    x = torch.randn(N, DX, **f64) * torch.linspace(0.5, 3.0, DX, dtype=torch.float64)
    y = (x @ torch.randn(DX, DY, **f64) + torch.randn(N, DY, **f64) * torch.linspace(0.1, 5.0, DY, dtype=torch.float64)
         + 3.0)
    return x, y, SufficientStats.zeros(DX, DY).update(x, y)


@pytest.mark.parametrize("standardize", [False, True])
def test_reduced_rank_at_full_rank_is_ridge(problem, standardize):
    x, _, stats = problem
    ridge = fit_ridge(stats, 1e-2, standardize=standardize)
    for rank in (None, min(DX, DY)):
        torch.testing.assert_close(fit_reduced_rank(stats, 1e-2, rank, standardize=standardize)(x), ridge(x),
                                   atol=1e-10, rtol=0)


@pytest.mark.parametrize("whiten", [False, True])
def test_rank_r_maps_have_rank_r_and_are_the_best_rank_r_fit(problem, whiten):
    x, y, stats = problem
    errors = []
    for rank in (1, 3, 6):
        amap = fit_reduced_rank(stats, 1e-6, rank, whiten_target=whiten)
        s = torch.linalg.svdvals(amap.weight)
        assert int((s > 1e-9 * s[0]).sum()) == rank
        errors.append(float(((amap(x) - y) ** 2).mean()))
    assert errors[0] > errors[1] > errors[2]  # each added direction explains more
    if not whiten:  # at λ→0, reduced rank is the best rank-r fit in squared error (Eckart-Young on Ŷ)
        xc, yc = x - x.mean(0), y - y.mean(0)
        fitted = xc @ torch.linalg.lstsq(xc, yc).solution
        u, s, vh = torch.linalg.svd(fitted, full_matrices=False)
        best = (u[:, :3] * s[:3]) @ vh[:3] + y.mean(0)
        torch.testing.assert_close(fit_reduced_rank(stats, 0.0, 3)(x), best, atol=1e-8, rtol=0)


def test_cca_directions_equal_a_brute_force_cca(problem):
    x, y, stats = problem
    xc, yc = (x - x.mean(0)).numpy(), (y - y.mean(0)).numpy()
    cxx, cyy, cxy = xc.T @ xc / N, yc.T @ yc / N, xc.T @ yc / N
    # Generalised eigenproblem Cxy Cyy^{-1} Cyx a = ρ² Cxx a, aᵀ Cxx a = 1; b ∝ Cyy^{-1} Cyx a.
    rho2, a = scipy.linalg.eigh(cxy @ np.linalg.solve(cyy, cxy.T), cxx)
    rho, a = np.sqrt(rho2[::-1][:4]), a[:, ::-1][:, :4]
    b = np.linalg.solve(cyy, cxy.T @ a) / rho
    _, pairs, _ = canonical_pairs(stats, 0.0, 4)
    np.testing.assert_allclose(pairs.correlations.numpy(), rho, atol=1e-10)
    signs = np.sign((a * pairs.x_dirs.numpy()).sum(0))
    np.testing.assert_allclose(pairs.x_dirs.numpy() * signs, a, atol=1e-8)
    np.testing.assert_allclose(pairs.y_dirs.numpy() * signs, b, atol=1e-8)
    # The canonical variates are uncorrelated with unit variance, and correlate pairwise by ρ.
    u, v = xc @ pairs.x_dirs.numpy(), yc @ pairs.y_dirs.numpy()
    np.testing.assert_allclose(u.T @ v / N, np.diag(rho), atol=1e-8)


def test_cca_map_is_reduced_rank_ridge_in_whitened_target_coordinates(problem):
    x, _, stats = problem
    torch.testing.assert_close(fit_cca(stats, 0.0, 3)(x),
                               fit_reduced_rank(stats, 0.0, 3, whiten_target=True, target_shrink=0.0)(x),
                               atol=1e-8, rtol=0)
    full = fit_cca(stats, 1e-8, None)  # all pairs: the (almost unregularised) least-squares map
    torch.testing.assert_close(full(x), fit_ridge(stats, 1e-8)(x), atol=1e-6, rtol=0)
    torch.testing.assert_close(fit_affine(stats, "cca", lam=1e-2, rank=3)(x), fit_cca(stats, 1e-2, 3)(x))


def test_whitening_leaves_ridge_unchanged_and_changes_constrained_maps(problem):
    """Unconstrained ridge is equivariant under an invertible output transform: whitening is a no-op there."""
    x, _, stats = problem
    for standardize in (False, True):
        plain = fit_ridge(stats, 1e-2, standardize=standardize)
        white = fit_whitened(stats, lambda s: fit_ridge(s, 1e-2, standardize=standardize))
        torch.testing.assert_close(white(x), plain(x), atol=1e-8, rtol=0)
        torch.testing.assert_close(fit_affine(stats, "ridge", 1e-2, standardize=standardize, whiten_target=True)(x),
                                   plain(x), atol=1e-8, rtol=0)
    rank = fit_reduced_rank(stats, 1e-2, 3)(x)
    assert float((fit_reduced_rank(stats, 1e-2, 3, whiten_target=True)(x) - rank).abs().max()) > 0.1
    assert float((fit_whitened(stats, fit_procrustes)(x) - fit_procrustes(stats)(x)).abs().max()) > 0.1


def test_transform_target_gives_the_statistics_of_the_transformed_rows(problem):
    x, y, stats = problem
    t, shift = torch.randn(5, DY, dtype=torch.float64), torch.randn(DY, dtype=torch.float64)
    direct = SufficientStats.zeros(DX, 5).update(x, (y - shift) @ t.T)
    for a, b in zip(transform_target(stats, t, shift).tensors(), direct.tensors()):
        torch.testing.assert_close(a, b, atol=1e-8, rtol=1e-10)


def test_bad_rank_lambda_or_statistics_get_a_clear_error(problem):
    _, _, stats = problem
    for rank in (0, 9, -1, 2.5, True):
        with pytest.raises(SubspaceError, match=r"rank must be an integer in 1..min\(d_x, d_y\)=8"):
            fit_reduced_rank(stats, 1e-2, rank)
    with pytest.raises(SubspaceError, match="rank must be"):
        fit_cca(stats, 1e-2, 100)
    with pytest.raises(SubspaceError, match="λ must be finite and >= 0"):
        fit_reduced_rank(stats, -1.0, 2)
    diag_only = SufficientStats.zeros(DX, DY, full_yty=False).update(*problem[:2])
    with pytest.raises(SubspaceError, match="full_yty=True"):
        fit_cca(diag_only, 1e-2, 2)
    with pytest.raises(SubspaceError, match="full_yty=True"):
        fit_reduced_rank(diag_only, 1e-2, 2, whiten_target=True)
    fit_reduced_rank(diag_only, 1e-2, 2)  # no whitening: the diagonal is enough
    with pytest.raises(SubspaceError, match="empty"):
        fit_reduced_rank(SufficientStats.zeros(DX, DY), 1e-2, 2)


def test_a_head_weighted_squared_loss_gives_the_plain_maps_logits(problem):
    """Why the ablation's head-aware map acts through λ, rank or a task loss: least squares onto a head's logits
    Hy reads the same logits as the head on the plain map (H∘ridge for ridge fitted onto the logits too)."""
    x, y, stats = problem
    head = AffineMap(torch.randn(3, DY, dtype=torch.float64), torch.randn(3, dtype=torch.float64))
    logits = SufficientStats.zeros(DX, 3).update(x, head(y))
    for lam in (0.0, 1e-2):
        plain = compose(head, fit_affine(stats, "ridge", lam))
        torch.testing.assert_close(fit_affine(logits, "ridge", lam)(x), plain(x), atol=1e-8, rtol=0)
    # A rank constraint is where the head matters: rank-1 on the logits is not the head on a rank-1 map.
    assert float((fit_reduced_rank(logits, 1e-2, 1)(x) - head(fit_reduced_rank(stats, 1e-2, 1)(x))).abs().max()) > 0.1

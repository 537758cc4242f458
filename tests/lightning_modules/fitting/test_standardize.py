"""One zero-variance rule, relative to the median std, in every standardiser (solvers, classifier, OOD)."""

from __future__ import annotations

import torch

from lightning_modules.models.classifier import Standardizer
from lightning_modules.evaluation.ood_detectors import Mahalanobis
from lightning_modules.fitting.estimators import Normalization
from lightning_modules.fitting.stats import SufficientStats
from lightning_modules.fitting.standardize import REL_TOL, dead_dims, safe_scale

D, N = 96, 2000
MASSIVE = 0  # one "massive activation" dimension, as causal LMs and MPNet have
DEAD = [7, 21, 50, 83]  # std 0, 1e-33, 5e-7 (MiniLM-like) and 3.4e-6 · max (MPNet's fourth)
LIVE_SMALL = 40  # the smallest live dimension seen on real SmolLM2/Gemma-3 states: 1.6e-2 · median


def mpnet_like(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """States whose dead dimensions the old fixed `1e-6 · max std` rule let through, and labels."""
    g = torch.Generator().manual_seed(seed)
    std = torch.full((D,), 0.1, dtype=torch.float64)
    std[MASSIVE] = 2.0  # max/median 20, as measured on SmolLM2 states
    std[DEAD] = torch.tensor([0.0, 1e-33, 5e-7, 3.4e-6 * 2.0], dtype=torch.float64)
    std[LIVE_SMALL] = 1.6e-2 * 0.1
    labels = torch.randint(0, 3, (N,), generator=g)
    x = torch.randn(N, D, generator=g, dtype=torch.float64) * std + 0.5
    x[:, 1] += labels  # a class signal in a live dimension
    return x, labels


def test_the_rule_flags_near_dead_dims_and_keeps_small_live_ones():
    x, _ = mpnet_like()
    std = x.std(0, correction=0)
    assert float(std[DEAD[-1]] / std.max()) > 1e-6  # the old rule kept this one as live
    assert torch.nonzero(dead_dims(std)).flatten().tolist() == DEAD
    assert not dead_dims(std)[LIVE_SMALL]
    assert torch.equal(safe_scale(std)[DEAD], torch.ones(len(DEAD), dtype=torch.float64))
    assert torch.equal(safe_scale(std)[~dead_dims(std)], std[~dead_dims(std)])


def test_constant_majority_and_empty_inputs():
    std = torch.tensor([0.0, 0.0, 0.0, 2.0, 1e-9])
    assert dead_dims(std).tolist() == [True, True, True, False, True]  # median 0: relative to the max
    assert dead_dims(torch.zeros(0)).numel() == 0


def test_every_standardiser_uses_the_same_rule():
    x, labels = mpnet_like()
    expected = dead_dims(x.std(0, correction=0), REL_TOL)

    stats = SufficientStats.zeros(D, D).update(x, x)
    norm = Normalization.from_stats(stats, standardize=True)
    assert torch.equal(norm.scale_x == 1, expected) and torch.equal(norm.scale_y == 1, expected)

    standardizer = Standardizer(D).double()
    standardizer.set_from_moments(torch.tensor(float(N), dtype=torch.float64), x.sum(0), (x * x).sum(0))
    assert torch.equal(standardizer.scale == 1, expected)

    mahalanobis = Mahalanobis(1e-2).fit(x, labels)
    assert torch.equal(~mahalanobis.keep, expected)


def test_a_mapped_state_writing_into_a_dead_dim_is_not_blown_up():
    """What the map writes into a dead dimension (here 0.01) reaches the head as 0.01, not ~1e4."""
    x, labels = mpnet_like()
    standardizer = Standardizer(D).double()
    standardizer.set_from_moments(torch.tensor(float(N), dtype=torch.float64), x.sum(0), (x * x).sum(0))
    probe = x[:5].clone()
    probe[:, DEAD] += 0.01
    moved = (standardizer(probe) - standardizer(x[:5]))[:, DEAD]
    assert torch.allclose(moved, torch.full_like(moved, 0.01))
    detector = Mahalanobis(1e-2).fit(x, labels)
    assert torch.allclose(detector.score(probe), detector.score(x[:5]))

"""The two-party adaptation (lightning_modules/fitting/adaptation.py): a public set that barely varies along the
task's directions gives a map the target's classes collapse under; the client's unlabelled task states and the
provider's published class statistics recover them, without a label of the client's."""

from __future__ import annotations

import pytest
import torch

from lightning_modules.fitting.adaptation import (AdaptationError, TaskStatistics, adapt, balanced, ledoit_wolf,
                                                  principal_components,
                                                 mixture_em)
from lightning_modules.fitting.solvers import solve
from lightning_modules.fitting.stats import SufficientStats
from lightning_modules.settings import AdaptationSettings, FitSettings, SettingsError

F64 = torch.float64
D_A, D_B, K = 8, 6, 3


def world(seed: int, n_public: int = 600, n_task: int = 300):
    """Paired public rows with almost no variance along dims 5-7 of the source, where the task's classes differ."""
    g = torch.Generator().manual_seed(seed)
    relation = torch.randn(D_B, D_A, generator=g, dtype=F64)
    spread = torch.ones(D_A, dtype=F64)
    spread[5:] = 0.01
    x_pub = torch.randn(n_public, D_A, generator=g, dtype=F64) * spread
    y_pub = x_pub @ relation.T + torch.randn(n_public, D_B, generator=g, dtype=F64)
    centres = torch.zeros(K, D_A, dtype=F64)
    centres[:, 5:] = 3 * torch.randn(K, 3, generator=g, dtype=F64)

    def task():
        labels = torch.arange(n_task) % K
        x = centres[labels] + 0.5 * torch.randn(n_task, D_A, generator=g, dtype=F64)
        return x, x @ relation.T + 0.1 * torch.randn(n_task, D_B, generator=g, dtype=F64), labels

    public = SufficientStats.zeros(D_A, D_B, full_yty=False).update(x_pub, y_pub)
    return public, task(), task()


def published(y: torch.Tensor, labels: torch.Tensor) -> TaskStatistics:
    """What `xsilo head fit --publish_ood true` publishes: class means, shared precision, class priors."""
    means = torch.stack([y[labels == c].mean(0) for c in range(K)])
    residual = y - means[labels]
    priors = torch.bincount(labels, minlength=K).double() / len(labels)
    return TaskStatistics(means, torch.linalg.inv(residual.T @ residual / len(y)), priors)


def accuracy(amap, stats: TaskStatistics, x: torch.Tensor, labels: torch.Tensor) -> float:
    return float((stats.log_likelihood(amap(x)).argmax(1) == labels).double().mean())


@pytest.mark.parametrize("seed", [0, 1, 3])
def test_adaptation_recovers_a_collapsed_map_without_labels(seed):
    public, (x_tr, y_tr, l_tr), (x_te, _, l_te) = world(seed)
    fit = FitSettings(criterion="gcv")
    plain, lam, _ = solve(public, None, "ridge", fit.lambdas, fit.center, fit.standardize, criterion="gcv")
    stats = published(y_tr, l_tr)  # the provider's side: its own states and labels
    adapted = adapt(public, x_tr, stats, lam, fit, AdaptationSettings())  # the client's side: x_tr, no labels
    before, after = accuracy(plain, stats, x_te, l_te), accuracy(adapted.map, stats, x_te, l_te)
    assert before < 0.9 and after >= 0.97, (before, after)
    assert adapted.record["private_rows"] == len(x_tr) and adapted.record["lambda"] == lam
    # the client's rows carry the configured share of the fit's weight
    assert float(adapted.stats.n) == pytest.approx(public.count / (1 - AdaptationSettings().weight), rel=1e-9)


def test_disclosed_pairs_carry_their_share_and_teach_the_map_the_tasks_own_directions():
    public, (x_tr, y_tr, l_tr), (x_te, y_te, _) = world(0)
    fit, settings = FitSettings(criterion="gcv"), AdaptationSettings()
    _, lam, _ = solve(public, None, "ridge", fit.lambdas, fit.center, fit.standardize, criterion="gcv")
    stats = published(y_tr, l_tr)
    plain = adapt(public, x_tr, stats, lam, fit, settings)
    shown = adapt(public, x_tr, stats, lam, fit, settings, anchors=(x_tr[:16], y_tr[:16]))
    # 16 disclosed pairs pin the task's own directions: the mapped task states land nearer their true targets
    error = {name: float((a.map(x_te) - y_te).square().mean()) for name, a in (("plain", plain), ("shown", shown))}
    assert error["shown"] < 0.5 * error["plain"], error
    assert shown.record["anchor_rows"] == 16 and shown.record["anchor_weight"] == settings.anchor_weight
    assert plain.record["anchor_rows"] == 0
    # the disclosed rows carry anchor_weight of the public fit's weight, the client's texts weight of the rest
    expected = public.count / (1 - settings.anchor_weight) / (1 - settings.weight)
    assert float(shown.stats.n) == pytest.approx(expected, rel=1e-9)
    with pytest.raises(AdaptationError, match="same texts"):
        adapt(public, x_tr, stats, lam, fit, settings, anchors=(x_tr[:16], y_tr[:15]))
    with pytest.raises(AdaptationError, match="NaN"):
        adapt(public, x_tr, stats, lam, fit, settings, anchors=(x_tr[:4] * float("nan"), y_tr[:4]))


def test_the_mixture_runs_on_one_principal_component_per_rows_per_component_texts():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 40, generator=g, dtype=F64) * torch.linspace(3.0, 0.1, 40, dtype=F64) + 5.0
    reduced = principal_components(x, 10, classes=3)
    assert reduced.shape == (300, 30)  # one component per 10 texts
    assert torch.allclose(reduced.mean(0), torch.zeros(30, dtype=F64), atol=1e-9)
    # the components are the directions of most variance, in order: their spread decreases
    spread = reduced.var(0)
    assert bool((spread[:-1] >= spread[1:] - 1e-9).all()) and float(spread[0]) > 8.0
    assert principal_components(x, 1, classes=3).shape == (300, 40)    # never wider than the model
    assert principal_components(x, 200, classes=3).shape == (300, 3)   # never fewer than the classes
    assert principal_components(x, 0, classes=3) is x                  # 0: the whole space
    public, (x_tr, y_tr, l_tr), _ = world(0)
    record = adapt(public, x_tr, published(y_tr, l_tr), 0.1, FitSettings(), AdaptationSettings(rows_per_component=100)).record
    assert record["em_components"] == 3


def test_balanced_responsibilities_match_the_priors_even_when_every_score_favours_one_class():
    scores = torch.zeros(90, K, dtype=F64)
    scores[:, 0] = 5.0 + torch.linspace(0, 1, 90, dtype=F64)  # a collapsed map: class 0 wins every row
    priors = torch.tensor([0.5, 0.3, 0.2], dtype=F64)
    r = balanced(scores, priors)
    assert torch.allclose(r.sum(1), torch.ones(90, dtype=F64))
    assert torch.allclose(r.mean(0), priors, atol=1e-6)


def test_mixture_em_finds_clusters_in_the_clients_own_space():
    _, (x, _, labels), _ = world(0)
    noisy = torch.full((len(x), K), 1.0 / K, dtype=F64)
    noisy[torch.arange(len(x)), labels] += 0.05  # a weak hint, as a collapsed map gives
    r = mixture_em(x, noisy / noisy.sum(1, keepdim=True), torch.full((K,), 1.0 / K, dtype=F64), 5, 0.1)
    assert float((r.argmax(1) == labels).double().mean()) >= 0.97


def test_bad_inputs_are_one_line_errors_that_name_the_fix():
    public, (x, y, labels), _ = world(0)
    stats = published(y, labels)
    fit, settings = FitSettings(), AdaptationSettings()
    with pytest.raises(AdaptationError, match="same model"):
        adapt(public, x[:, :4], stats, 0.1, fit, settings)
    with pytest.raises(AdaptationError, match="one text per class"):
        adapt(public, x[:2], stats, 0.1, fit, settings)
    with pytest.raises(AdaptationError, match="NaN"):
        adapt(public, torch.full_like(x, float("nan")), stats, 0.1, fit, settings)
    with pytest.raises(AdaptationError, match="different models"):
        adapt(public, x, TaskStatistics(stats.means[:, :4], stats.precision[:4, :4], stats.priors), 0.1, fit,
              settings)
    with pytest.raises(AdaptationError, match="priors"):
        TaskStatistics(stats.means, stats.precision, torch.tensor([0.5, 0.5, 0.5], dtype=F64))
    assert torch.allclose(TaskStatistics.from_arrays(stats.means, stats.precision).priors,
                          torch.full((K,), 1 / K, dtype=F64))  # a head published before priors: uniform
    for bad in ({"weight": 1.0}, {"rounds": 0}, {"shrinkage": 2.0}, {"anchor_weight": 0.0},
                {"rows_per_component": -1}):
        with pytest.raises(SettingsError, match="adaptation"):
            AdaptationSettings(**bad)


def test_ledoit_wolf_shrinks_more_when_the_clients_texts_are_few_against_its_models_width():
    g = torch.Generator().manual_seed(0)
    spread = torch.linspace(0.5, 2.0, 40, dtype=F64)
    amounts = []
    for n in (30, 300, 3000):
        z = torch.randn(n, 40, generator=g, dtype=F64) * spread
        amounts.append(ledoit_wolf(z, z.T @ z / n))
    assert 0 <= amounts[2] < amounts[1] < amounts[0] <= 1, amounts
    iso = torch.randn(2000, 40, generator=g, dtype=F64)  # already isotropic: shrink (nearly) all the way
    assert ledoit_wolf(iso, iso.T @ iso / 2000) > 0.5

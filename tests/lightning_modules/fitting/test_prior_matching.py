"""Prior matching (`fitting.prior_matching`): the last step of the two-party adaptation moves the map's intercept so
that the provider's head predicts the client's texts at the published priors, and the head probe of `xsilo align`
(extended by the class means) knows the head wherever that adapted map writes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_modules.fitting.adaptation import AdaptationError, TaskStatistics, adapt
from lightning_modules.fitting.affine_map import AffineMap
from lightning_modules.fitting.prior_matching import class_shares, match_priors, prior_offsets
from lightning_modules.fitting.stats import SufficientStats
from lightning_modules.parties.head_probe import probe
from lightning_modules.settings import AdaptationSettings, FitSettings

F64 = torch.float64


def leaning_case(n: int = 600, d_x: int = 6, d_y: int = 12, k: int = 3, seed: int = 0):
    """A map and a head whose predictions on the client's states put most of them in class 0."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_x, generator=g, dtype=F64)
    amap = AffineMap(torch.randn(d_y, d_x, generator=g, dtype=F64), torch.randn(d_y, generator=g, dtype=F64))
    head = AffineMap(torch.randn(k, d_y, generator=g, dtype=F64), torch.zeros(k, dtype=F64))
    logits = head(amap(x))
    head.bias[0] = float((logits.max(1).values - logits[:, 0]).quantile(0.85))  # class 0 wins ~85% of rows
    return x, amap, head


def test_the_matched_map_predicts_the_client_texts_at_the_priors_and_keeps_its_weight():
    x, amap, head = leaning_case()
    priors = torch.tensor([0.5, 0.3, 0.2], dtype=F64)
    before = class_shares(head(amap(x)))
    assert before[0] > 0.8
    moved, record = match_priors(amap, head, x, priors)
    after = class_shares(head(moved(x)))
    assert np.allclose(after, priors.numpy(), atol=0.03)
    assert record["shares_before"] == before and record["shares_after"] == after
    assert torch.equal(moved.weight, amap.weight)  # only the intercept moves
    # the logits move by exactly the recorded offsets, for every state
    shift = head(moved(x)) - head(amap(x))
    assert torch.allclose(shift, torch.tensor(record["offsets"], dtype=F64).expand_as(shift), atol=1e-9)
    assert record["offset_error"] < 1e-9 and abs(sum(record["offsets"])) < 1e-9


def test_prior_offsets_balance_even_scores_that_all_favour_one_class():
    logits = torch.randn(1000, 4, generator=torch.Generator().manual_seed(1), dtype=F64)
    logits[:, 2] += 5.0
    priors = torch.full((4,), 0.25, dtype=F64)
    shares = class_shares(logits + prior_offsets(logits, priors))
    assert max(abs(s - 0.25) for s in shares) < 0.03
    assert torch.equal(prior_offsets(torch.zeros(10, 3, dtype=F64), torch.full((3,), 1 / 3, dtype=F64)),
                       torch.zeros(3, dtype=F64))  # no spread: nothing to move


def test_a_head_of_other_states_or_other_classes_is_refused_naming_the_shapes():
    x, amap, head = leaning_case()
    with pytest.raises(AdaptationError, match="prior matching needs"):
        match_priors(amap, AffineMap(head.weight[:, :5], head.bias), x, torch.full((3,), 1 / 3, dtype=F64))
    with pytest.raises(AdaptationError, match="one prior per class"):
        match_priors(amap, head, x, torch.full((4,), 0.25, dtype=F64))


def test_the_probe_with_the_class_means_knows_the_head_on_the_adapted_map_and_matches_its_priors():
    """A client narrower than the provider (6 < 12 dims): the adapted map writes into the class means' directions,
    which the public fit's span lacks; the probe then reads them too, and prior matching through the probe's head
    shifts every logit as the real head does."""
    g = torch.Generator().manual_seed(3)
    d_x, d_y, k = 6, 12, 3
    x_pub = torch.randn(400, d_x, generator=g, dtype=F64)
    y_pub = x_pub @ torch.randn(d_x, d_y, generator=g, dtype=F64) + 0.3 * torch.randn(400, d_y, generator=g, dtype=F64)
    train = SufficientStats.zeros(d_x, d_y, full_yty=False).update(x_pub, y_pub)
    means = 2.0 * torch.randn(k, d_y, generator=g, dtype=F64)
    task = TaskStatistics(means, torch.eye(d_y, dtype=F64), torch.tensor([0.5, 0.3, 0.2], dtype=F64))
    private = torch.randn(300, d_x, generator=g, dtype=F64) + 1.0
    fit = FitSettings()
    amap = adapt(train, private, task, 1e-2, fit, AdaptationSettings()).map
    head = AffineMap(torch.randn(k, d_y, generator=g, dtype=F64), torch.randn(k, dtype=F64))

    def probe_head(with_means: bool) -> AffineMap:
        rows = probe(train, fit.center, fit.standardize, means.numpy() if with_means else None)
        return rows.head(head(torch.from_numpy(rows.rows)).numpy())

    mapped = amap(private)
    assert float((probe_head(False)(mapped) - head(mapped)).abs().max()) > 1e-3  # the path's span alone misses it
    known = probe_head(True)
    assert torch.allclose(known(mapped), head(mapped), atol=1e-9)
    by_probe, record = match_priors(amap, known, private, task.priors)
    by_head, _ = match_priors(amap, head, private, task.priors)
    assert torch.allclose(head(by_probe(private)), head(by_head(private)), atol=1e-8)
    assert np.allclose(record["shares_after"], task.priors.numpy(), atol=0.05)

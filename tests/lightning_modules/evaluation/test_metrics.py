"""Alignment metrics: reference values, invariances, chance levels, chunking."""

from __future__ import annotations

import pytest
import torch

from lightning_modules.evaluation import metrics as M
from lightning_modules.evaluation.metrics import (alignment_report, linear_cka, mean_cosine, mutual_knn, null_pairs,
                                       r2_score)

F64 = torch.float64


def randn(*shape, seed=0, dtype=F64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def orthogonal(d, seed):
    return torch.linalg.qr(randn(d, d, seed=seed))[0]


def cka_reference(x, y):
    """HSIC form with the n×n centering matrix H (Kornblith et al. 2019, eq. 3)."""
    n = x.shape[0]
    h = torch.eye(n, dtype=F64) - 1.0 / n
    k, l_ = h @ x @ x.T @ h, h @ y @ y.T @ h
    return float((k * l_).sum() / (k.norm() * l_.norm()))


def knn_reference(x, y, k):
    def nn(t):
        u = t / t.norm(dim=1, keepdim=True)
        s = u @ u.T
        s.fill_diagonal_(float("-inf"))
        return [set(r.tolist()) for r in s.topk(k, dim=1).indices]
    return sum(len(a & b) for a, b in zip(nn(x), nn(y))) / (len(x) * k)


def test_r2_reference_values_and_torchmetrics(monkeypatch):
    from torchmetrics.regression import R2Score

    target = randn(300, 6) * torch.tensor([1, 2, 3, 0.5, 5, 1], dtype=F64) + 4
    assert r2_score(target, target) == pytest.approx(1.0)
    assert r2_score(target.mean(0).expand_as(target), target) == pytest.approx(0.0, abs=1e-12)
    pred = target + randn(300, 6, seed=1)
    tm = R2Score(multioutput="variance_weighted")(pred.float(), target.float())
    assert r2_score(pred, target) == pytest.approx(float(tm), abs=1e-5)
    monkeypatch.setattr(M, "_CHUNK_ROWS", 7)
    assert r2_score(pred.float(), target) == pytest.approx(float(tm), abs=1e-5)


def test_cosine_raw_vs_centred():
    target = randn(500, 16) + 5.0  # a dominant mean vector, like causal-LM states
    mean_only = target.mean(0).expand_as(target)
    assert mean_cosine(target, target) == pytest.approx(1.0)
    assert mean_cosine(target, target, center=True) == pytest.approx(1.0)
    assert mean_cosine(mean_only, target) > 0.9          # raw cosine rewards predicting the mean
    assert mean_cosine(mean_only, target, center=True) == pytest.approx(0.0, abs=1e-9)
    assert mean_cosine(-target, target) == pytest.approx(-1.0)
    shifted = target + 2.0  # centred by the TARGET's mean, so a constant offset is penalised
    p, t = shifted - target.mean(0), target - target.mean(0)
    expected = float(torch.nn.functional.cosine_similarity(p, t, dim=1).mean())
    assert mean_cosine(shifted, target, center=True) == pytest.approx(expected, rel=1e-9)
    assert expected < 0.8


@pytest.mark.parametrize("n", [40, 600])  # n < dims (n×n Gram path) and n > dims (feature path)
def test_linear_cka_identity_invariances_and_reference(n, monkeypatch):
    monkeypatch.setattr(M, "_CHUNK_ROWS", 64)
    x = randn(n, 50) * torch.linspace(0.1, 3, 50, dtype=F64) + 2
    y = torch.tanh(x[:, :30]) + 0.5 * randn(n, 30, seed=1)
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, x @ orthogonal(50, 2) * 7.3 + 1.0) == pytest.approx(1.0)  # rotation, scale, shift
    assert linear_cka(x, y) == pytest.approx(cka_reference(x, y), rel=1e-9)
    assert linear_cka(x @ orthogonal(50, 3), 0.1 * y) == pytest.approx(linear_cka(x, y), rel=1e-9)
    assert linear_cka(x.float(), y) == pytest.approx(linear_cka(x, y), rel=1e-5)
    assert linear_cka(x, y) < 0.99


def test_linear_cka_low_for_independent():
    assert linear_cka(randn(4000, 20), randn(4000, 20, seed=1)) < 0.02


def test_mutual_knn_identity_chance_and_blocks(monkeypatch):
    x = randn(400, 32)
    assert mutual_knn(x, x, k=10) == 1.0
    assert mutual_knn(x, 3.0 * x @ orthogonal(32, 1)) == pytest.approx(1.0)  # cosine kNN is rotation-invariant
    chance = mutual_knn(x, randn(400, 16, seed=2), k=10)
    assert abs(chance - 10 / 399) < 0.015
    partial = x[:, :8] + 0.3 * randn(400, 8, seed=3)
    expected = knn_reference(x, partial, 5)
    assert mutual_knn(x, partial, k=5) == pytest.approx(expected)
    monkeypatch.setattr(M, "_KNN_BLOCK_ELEMS", 400 * 7)  # 7-row blocks
    assert mutual_knn(x, partial, k=5) == pytest.approx(expected)
    assert mutual_knn(x, partial, k=5, dtype=torch.float32) == pytest.approx(expected, abs=0.01)
    with pytest.raises(ValueError, match="k < n"):
        mutual_knn(x[:5], x[:5], k=5)


def test_null_pairs_seeded_permutation():
    x, y = randn(50, 3), randn(50, 4, seed=1)
    x2, y_a = null_pairs(x, y, seed=7)
    _, y_b = null_pairs(x, y, seed=7)
    _, y_c = null_pairs(x, y, seed=8)
    assert x2 is x and torch.equal(y_a, y_b) and not torch.equal(y_a, y_c)
    assert torch.equal(y_a.sort(0).values, y.sort(0).values)  # same rows, new order
    with pytest.raises(ValueError, match="row counts"):
        null_pairs(x, y[:10])


def test_alignment_report_good_map_beats_null():
    source = randn(800, 24)
    target = source[:, :16] @ randn(16, 16, seed=1) + 10.0
    mapped = target + 0.1 * randn(800, 16, seed=2)
    rep = alignment_report(mapped, target, source=source, k=10, seed=0)
    names = ["r2", "cosine", "cosine_centered", "cka", "mutual_knn"]
    assert set(rep) == {*names, *(f"{m}_null" for m in names), "cka_source_target"}
    assert all(isinstance(v, float) for v in rep.values())
    assert rep["r2"] > 0.99 and rep["cka"] > 0.99 and rep["cosine_centered"] > 0.99 and rep["mutual_knn"] > 0.6
    assert rep["r2_null"] < -0.5                      # shuffled pairing: worse than predicting the mean
    assert abs(rep["cosine_centered_null"]) < 0.05
    assert rep["cka_null"] < 0.05
    assert rep["mutual_knn_null"] < 0.05              # chance = k/(n-1) ≈ 0.0125
    assert rep["cosine_null"] > 0.5                   # raw cosine stays high under the null: the mean
    assert 0.3 < rep["cka_source_target"] < 1.0
    assert "cka_source_target" not in alignment_report(mapped, target)


# --- the one ROC / AUROC code (OOD positive) --------------------------------------------------------

def _mann_whitney(id_scores, ood_scores) -> float:
    """The AUROC study.py computed before there was one: P(OOD > ID) + ½ P(tie), by counting."""
    import numpy as np

    ordered = np.sort(id_scores)
    below = np.searchsorted(ordered, ood_scores, "left")
    ties = np.searchsorted(ordered, ood_scores, "right") - below
    return float((below.sum() + 0.5 * ties.sum()) / (len(ordered) * len(ood_scores)))


@pytest.mark.parametrize("decimals", [None, 1, 0])
def test_auroc_roc_and_average_precision_match_scikit_learn_and_the_former_count(decimals):
    import numpy as np
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    rng = np.random.default_rng(3)
    for n, m in ((40, 25), (1500, 700)):
        id_scores, ood_scores = rng.normal(0, 1, n), rng.normal(0.8, 1, m)
        if decimals is not None:  # ties
            id_scores, ood_scores = np.round(id_scores, decimals), np.round(ood_scores, decimals)
        is_ood, scores = np.r_[np.zeros(n), np.ones(m)], np.r_[id_scores, ood_scores]
        assert M.auroc(id_scores, ood_scores) == pytest.approx(_mann_whitney(id_scores, ood_scores), abs=1e-9)
        assert M.auroc(id_scores, ood_scores) == pytest.approx(roc_auc_score(is_ood, scores), abs=1e-12)
        assert M.average_precision(id_scores, ood_scores) == pytest.approx(
            average_precision_score(is_ood, scores), abs=1e-12)
        fpr, tpr, thresholds = M.roc_curve(torch.from_numpy(id_scores), torch.from_numpy(ood_scores))
        ref_fpr, ref_tpr, ref_thresholds = roc_curve(is_ood, scores, drop_intermediate=False)
        np.testing.assert_allclose(fpr, ref_fpr, atol=1e-15)
        np.testing.assert_allclose(tpr, ref_tpr, atol=1e-15)
        np.testing.assert_array_equal(thresholds[1:], ref_thresholds[1:])


def test_auroc_is_exact_at_the_extremes_and_refuses_bad_scores():
    assert M.auroc([0.0, 1.0], [2.0, 3.0]) == 1.0
    assert M.auroc([2.0, 3.0], [0.0, 1.0]) == 0.0
    assert M.auroc([1.0, 1.0], [1.0]) == 0.5
    for id_scores, ood_scores, match in (([], [1.0], "ID and OOD"), ([1.0], [float("nan")], "finite")):
        with pytest.raises(ValueError, match=match):
            M.auroc(id_scores, ood_scores)

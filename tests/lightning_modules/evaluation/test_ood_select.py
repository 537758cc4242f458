"""The OOD detector a fused deployment exports: chosen on validation data, runnable by the client."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_modules.evaluation.ood_detectors import CosineKNN, Mahalanobis
from lightning_modules.evaluation.ood_select import (FUSED_CANDIDATES, load_state_detector, save_state_detector,
                                          select_detector)


def _scores(shift_val: float, shift_test: float, n: int = 200, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    def draw(shift: float) -> torch.Tensor:
        return torch.randn(n, generator=g, dtype=torch.float64) + shift
    return {"id_val": draw(0), "id_test": draw(0), "ood_val": {"far": draw(shift_val)},
            "ood_test": {"far": draw(shift_test)}}


def test_the_choice_follows_validation_auroc_not_test_auroc():
    scores = {"energy@logits": _scores(0.2, 3.0, seed=1), "mahalanobis@source": _scores(2.5, 0.5, seed=2)}
    sel = select_detector(scores, tpr=0.95)
    assert sel["chosen"] == "mahalanobis@source"
    c = sel["candidates"]
    assert c["mahalanobis@source"]["val_auroc_mean"] > 0.9 > 0.7 > c["energy@logits"]["val_auroc_mean"]
    assert c["energy@logits"]["test"]["far"]["auroc"] > c["mahalanobis@source"]["test"]["far"]["auroc"]
    assert "mahalanobis@source" in sel["reason"] and "energy@logits" in sel["reason"]
    assert 0 <= c["energy@logits"]["id_test_flagged"] <= 0.15


def test_only_what_a_fused_client_sees_is_a_candidate():
    assert all(name.endswith(("@logits", "@source")) for name in FUSED_CANDIDATES)
    assert not any("target" in name for name in FUSED_CANDIDATES)


@pytest.mark.parametrize("name", ["mahalanobis@source", "knn@source"])
def test_the_saved_state_detector_scores_like_the_fitted_one(name, tmp_path):
    g = torch.Generator().manual_seed(0)
    train = torch.randn(300, 12, generator=g, dtype=torch.float64) + 2
    labels = (train[:, 0] > 2).long()
    detector = Mahalanobis(1e-2).fit(train, labels) if name.startswith("mahalanobis") else CosineKNN(5).fit(train)
    path = save_state_detector(tmp_path / "client-ood.npz", name, detector, threshold=1.5, spec={"model": "m"})
    loaded = load_state_detector(path)
    probe = torch.cat([torch.randn(20, 12, generator=g, dtype=torch.float64) + 2,
                       torch.randn(20, 12, generator=g, dtype=torch.float64) * 4 - 3])
    np.testing.assert_allclose(loaded.score(probe.numpy()), detector.score(probe).numpy(), rtol=1e-9, atol=1e-9)
    assert loaded.client == {"model": "m"} and loaded.threshold == 1.5
    np.testing.assert_array_equal(loaded.flags(probe.numpy()), detector.score(probe).numpy() > 1.5)
    with pytest.raises(ValueError, match="expected \\(n, 12\\) states"):
        loaded.score(np.zeros((2, 7)))


def test_a_file_that_is_not_a_detector_is_refused(tmp_path):
    bad = tmp_path / "x.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="is not a state OOD detector file"):
        load_state_detector(bad)

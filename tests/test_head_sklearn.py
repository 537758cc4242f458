"""Integration: xsilo's default head is on par with scikit-learn's tuned LogisticRegression on real MiniLM states.

For each study task (1500 rows, max_length 48, seed 0: the study's cached states), the head `fit_classifier`
fits with the default `HeadSettings` is compared with scikit-learn's `LogisticRegression`, its C tuned over
the same grid on the same val split, on the same standardised train states. Run with `-s` to see the figures.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss

from datamodules.assets import is_prepared
from datamodules.extraction import cache_hit
from datamodules.states import LabelledStatesDataModule
from lightning_modules.evaluate import classification_scores, fit_classifier, split_rows
from lightning_modules.settings import DeviceSettings, ExtractionSettings, HeadSettings
from lightning_modules.standardize import safe_scale

pytestmark = pytest.mark.slow

TASKS = ["bbc", "vader-movies", "trec", "rotten"]
TOLERANCE = 0.002  # 0.2 accuracy points


def study_states(task: str) -> LabelledStatesDataModule:
    """MiniLM's cached states of `task` as the study reads them; skips when they are not prepared."""
    if not is_prepared("minilm") or not is_prepared(task):
        pytest.skip(f"minilm or {task} is not prepared: run `xsilo assets prepare minilm {task}`")
    dm = LabelledStatesDataModule(model="minilm", data=task, limit=1500, seed=0,
                                  **ExtractionSettings(max_length=48).task_kwargs())
    if not cache_hit(dm.job.directory):
        pytest.skip(f"no MiniLM states of {task} cached: run `xsilo extract --model minilm --data {task} "
                    "--limit 1500 --max_length 48`")
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    return dm


def sklearn_tuned(dm: LabelledStatesDataModule, cs: tuple[float, ...]) -> tuple[float, float]:
    """scikit-learn's test accuracy with C chosen on val (accuracy, then log-loss), and that C."""
    (h, y), (hv, yv), (ht, yt) = (split_rows(dm, s) for s in ("train", "val", "test"))
    h64 = h.double()
    mean, scale = h64.mean(0), safe_scale(h64.std(0, unbiased=False))
    z, zv, zt = (((t.double() - mean) / scale).numpy() for t in (h, hv, ht))
    best = None
    for c in cs:
        model = LogisticRegression(C=c, max_iter=2000).fit(z, y.numpy())
        key = (-int((model.predict(zv) == yv.numpy()).sum()), log_loss(yv.numpy(), model.predict_proba(zv),
                                                                        labels=model.classes_))
        if best is None or key < best[0]:
            best = (key, c, float((model.predict(zt) == yt.numpy()).mean()))
    return best[2], best[1]


@pytest.mark.parametrize("task", TASKS)
def test_default_head_matches_tuned_sklearn(task, real_home, tmp_path):
    dm = study_states(task)
    head = HeadSettings()
    start = time.perf_counter()
    classifier, _ = fit_classifier(dm, head, DeviceSettings(accelerator="cpu"), seed=0, checkpoint_dir=tmp_path)
    seconds = time.perf_counter() - start
    h, labels = split_rows(dm, "test")
    with torch.no_grad():
        ours = classification_scores(classifier(h), labels, dm.num_classes)["accuracy"]
    theirs, their_c = sklearn_tuned(dm, head.cs)
    print(f"\n{task}: xsilo test accuracy {ours:.4f} (C={float(classifier.chosen_c):g}, {seconds:.1f} s) | "
          f"sklearn {theirs:.4f} (C={their_c:g}) | rows train/val/test {len(dm.split_index['train'])}/"
          f"{len(dm.split_index['val'])}/{len(labels)}")
    assert ours >= theirs - TOLERANCE

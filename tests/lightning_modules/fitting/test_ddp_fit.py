"""The closed-form fit under DDP on CPU: 2 spawned processes give the 1-process weights."""

from __future__ import annotations

import pytest
import torch

from datamodules.states import PairedStatesDataModule
from lightning_modules.models.aligner import AffineAligner

from tests.helpers import trainer
from tests.tiny import write_tiny_csv


@pytest.mark.slow
@pytest.mark.usefixtures("no_leftover_process_group")
@pytest.mark.parametrize("estimator", ["ridge", "procrustes"])
def test_ddp_spawn_fit_equals_single_process(tiny_models, tmp_path, estimator):
    data = write_tiny_csv(tmp_path / "public.csv", n=101)  # odd row counts: ranks get uneven shares
    dm = PairedStatesDataModule(source=str(tiny_models["llama"]), target=str(tiny_models["gpt2"]),
                                data=str(data), limit=None, batch_size=8, val_fraction=0.25)
    dm.prepare_data()
    single = AffineAligner(dm.input_dim, dm.output_dim, estimator=estimator, lambdas=[1e-4, 1e-2, 1.0])
    trainer().fit(single, dm)
    double = AffineAligner(dm.input_dim, dm.output_dim, estimator=estimator, lambdas=[1e-4, 1e-2, 1.0])
    trainer(devices=2, strategy="ddp_spawn").fit(double, dm)
    assert bool(double.fitted)
    torch.testing.assert_close(double.linear.weight, single.linear.weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(double.linear.bias, single.linear.bias, atol=1e-6, rtol=0)
    if estimator == "ridge":
        assert float(double.chosen_lambda) == float(single.chosen_lambda)

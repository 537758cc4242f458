"""LightningCLI for `xsilo fit|validate|test|predict --config ...`.

Any LightningModule and LightningDataModule can be named in a config (subclass mode). The
DataModule's `input_dim` and `output_dim` are known at construction (from the cache manifest
or the model config) and are linked into the model's `input_dim` and `output_dim`.
`validate`, `test` and `predict` score a fitted model, so they need `--ckpt_path`; `predict
--output FILE.npz` writes the mapped states (aligner) or logits (classifier).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LightningCLI

from datamodules.distributed import ProcessGroupCleanup
from lightning_modules.evaluation.predictions import PredictionWriter, check_output_path

SEED = 0  # `seed_everything` default: a run is repeatable unless the config sets another seed
SCORING = ("validate", "test", "predict")  # the subcommands that need a fitted checkpoint


class XsiloTrainer(L.Trainer):
    """Lightning's Trainer, whose processes destroy their process group at exit (`ProcessGroupCleanup`); `predict`
    also takes `output`, the file its predictions are written to."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.callbacks.append(ProcessGroupCleanup())

    def predict(self, model: L.LightningModule | None = None, dataloaders: Any = None,
                datamodule: L.LightningDataModule | None = None, return_predictions: bool | None = None,
                ckpt_path: str | None = None, weights_only: bool | None = None, output: str | None = None) -> Any:
        """Predict with a fitted model: mapped states (aligner) or logits (classifier) of the data's test split.

        Args:
            return_predictions: keep the predictions in memory and return them.
            ckpt_path: checkpoint of the fitted model, written by `xsilo fit` (required).
            weights_only: load the checkpoint with torch.load(weights_only=...) (default: Lightning's choice).
            output: write the predictions to this .npz file (atomically): predictions, kind, rows, label_names.
        """
        if output is None:
            return super().predict(model, dataloaders, datamodule, return_predictions, ckpt_path, weights_only)
        writer = PredictionWriter(check_output_path(output))
        self.callbacks.append(writer)
        try:
            return super().predict(model, dataloaders, datamodule, return_predictions, ckpt_path, weights_only)
        finally:  # this call's file only: a later predict names its own
            self.callbacks.remove(writer)


class XsiloCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.input_dim", "model.init_args.input_dim", apply_on="instantiate")
        parser.link_arguments("data.output_dim", "model.init_args.output_dim", apply_on="instantiate")

    def parse_arguments(self, parser, args) -> None:
        # Checked here, before LightningCLI reads the checkpoint's hyperparameters, so that a missing or
        # unreadable file is one line rather than a traceback.
        with warnings.catch_warnings():  # the console script passes its argv on, unchanged
            warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python")
            super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand in SCORING:
            path = self.config[subcommand].get("ckpt_path")
            if path is None:  # the model a config builds is freshly initialised: scoring it would mislead
                raise ValueError(f"`xsilo {subcommand}` needs a fitted model: pass --ckpt_path PATH, a checkpoint "
                                 "written by `xsilo fit` (under its default_root_dir, e.g. runs/fit/**/checkpoints/"
                                 "*.ckpt)")
            self.checkpoint_shapes = checkpoint_shapes(path)

    def _require_matching_model(self) -> None:
        expected = {k: tuple(v.shape) for k, v in self.model.state_dict().items()}
        if self.checkpoint_shapes != expected:
            differ = (sorted(set(self.checkpoint_shapes) ^ set(expected))
                      or sorted(k for k in expected if self.checkpoint_shapes[k] != expected[k]))
            raise ValueError(f"--ckpt_path {self.config[self.subcommand].ckpt_path} does not fit the model that the "
                             f"config and data build ({type(self.model).__name__}: {', '.join(differ[:3])} differ); "
                             "pass the config the checkpoint was fitted with")

    def before_validate(self) -> None:
        self._require_matching_model()

    def before_test(self) -> None:
        self._require_matching_model()

    def before_predict(self) -> None:
        self._require_matching_model()
        if self.config["predict"].get("output") is None:  # the console script would drop what it predicts
            raise ValueError("`xsilo predict` writes its predictions to a file: pass --output FILE.npz")


def checkpoint_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """The tensor shapes a Lightning checkpoint holds; one-line errors for a missing or unreadable file."""
    if not Path(path).is_file():
        raise ValueError(f"--ckpt_path {path}: no such file; pass a .ckpt written by `xsilo fit`")
    try:  # as LightningCLI itself reads it next
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        return {k: tuple(v.shape) for k, v in state.items()}
    except Exception as e:  # whatever makes the file unreadable, the fix is the same
        raise ValueError(f"--ckpt_path {path} is not a Lightning checkpoint ({type(e).__name__}); pass a .ckpt "
                         "written by `xsilo fit`") from None


def run_lightning_cli(argv: list[str] | None = None, run: bool = True) -> XsiloCLI:
    """argv=None reads sys.argv (the console script); a list runs in-process (tests)."""
    return XsiloCLI(L.LightningModule, L.LightningDataModule, trainer_class=XsiloTrainer, subclass_mode_model=True,
                    subclass_mode_data=True, args=argv, run=run, seed_everything_default=SEED,
                    save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False,
                    parser_kwargs={"prog": "xsilo", "exit_on_error": False})  # the console script prints errors

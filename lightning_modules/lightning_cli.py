"""LightningCLI for `xsilo fit|validate|test|predict --config ...`.

Any LightningModule and LightningDataModule can be named in a config (subclass mode). The
DataModule's `input_dim` and `output_dim` are known at construction (from the cache manifest
or the model config) and are linked into the model's `input_dim` and `output_dim`.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.cli import LightningCLI


class XsiloCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.input_dim", "model.init_args.input_dim", apply_on="instantiate")
        parser.link_arguments("data.output_dim", "model.init_args.output_dim", apply_on="instantiate")


def run_lightning_cli(argv: list[str] | None = None, run: bool = True) -> XsiloCLI:
    """argv=None reads sys.argv (the console script); a list runs in-process (tests)."""
    return XsiloCLI(L.LightningModule, L.LightningDataModule, subclass_mode_model=True,
                    subclass_mode_data=True, args=argv, run=run,
                    save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False)

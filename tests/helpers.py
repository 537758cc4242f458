"""In-memory DataModules for testing the LightningModules without any model or cache."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset


class TensorDataModule(L.LightningDataModule):
    """(x, y) tensors split into train/val/test by fixed fractions, in order."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int = 64, val: float = 0.2,
                 test: float = 0.2, label_names: list[str] | None = None):
        super().__init__()
        n = len(x)
        n_val, n_test = int(n * val), int(n * test)
        cut = n - n_val - n_test
        self.parts = {"train": (x[:cut], y[:cut]), "val": (x[cut:cut + n_val], y[cut:cut + n_val]),
                      "test": (x[cut + n_val:], y[cut + n_val:])}
        self.batch_size = batch_size
        self.input_dim = x.shape[1]
        self.output_dim = y.shape[1] if y.ndim == 2 else int(y.max()) + 1
        self.label_names = label_names

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        return DataLoader(TensorDataset(*self.parts[split]), batch_size=self.batch_size, shuffle=shuffle)

    def train_dataloader(self):
        return self._loader("train", shuffle=True)

    def val_dataloader(self):
        return self._loader("val")

    def test_dataloader(self):
        return self._loader("test")


def linear_pairs(n: int = 2000, d_x: int = 24, d_y: int = 16, noise: float = 0.05, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_x, generator=g) * torch.linspace(0.5, 2.0, d_x) + 3.0
    w = torch.randn(d_y, d_x, generator=g) / d_x**0.5
    b = torch.randn(d_y, generator=g)
    y = x @ w.T + b + noise * torch.randn(n, d_y, generator=g)
    return x, y, w, b


def trainer(**kwargs) -> L.Trainer:
    """A quiet CPU Trainer; its processes destroy their process group at exit, as every xsilo Trainer's do."""
    from datamodules.distributed import ProcessGroupCleanup

    defaults = dict(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    kwargs = {**defaults, **kwargs}
    kwargs["callbacks"] = [*kwargs.get("callbacks", []), ProcessGroupCleanup()]
    return L.Trainer(**kwargs)

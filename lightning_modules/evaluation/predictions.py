"""`PredictionWriter`: what `xsilo predict --output FILE.npz` writes (mapped states or logits), atomically.

The file holds `predictions` (float32, one row per predicted row), `kind` (the module's
`prediction_kind`: `mapped_states` for an aligner, `logits` for a classifier), `rows` (the rows'
indices in the DataModule's cache, when its dataset names them) and `label_names` (classifiers).
Read it with `numpy.load(FILE)`.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from datamodules.cache import atomic_write_bytes


def check_output_path(output: str | Path) -> Path:
    """The prediction file's path, refused before any work when it cannot be written."""
    path = Path(output).expanduser()
    if path.suffix != ".npz":
        raise ValueError(f"--output {output}: predictions are written as a NumPy .npz file; name one, e.g. preds.npz")
    if path.is_dir():
        raise ValueError(f"--output {output} is a folder; name a file inside it, e.g. {path / 'preds.npz'}")
    return path


class PredictionWriter(L.Callback):
    """Collects `predict_step` outputs and writes them to one .npz file on rank 0 (gathered across DDP ranks).

    Args:
        output: the .npz file to write (its folder is created; an existing file is replaced).
    """

    def __init__(self, output: str | Path):
        self.output = check_output_path(output)
        self._batches: list[np.ndarray] = []

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._batches = []

    def on_predict_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        if not isinstance(outputs, torch.Tensor):
            raise ValueError(f"{type(pl_module).__name__}.predict_step returned {type(outputs).__name__}; "
                             "PredictionWriter writes one tensor per batch")
        self._batches.append(outputs.detach().float().cpu().numpy())

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        parts = [np.concatenate(self._batches)] if self._batches else []
        if trainer.world_size > 1:
            # Our samplers give each rank a contiguous block of rows in rank order, so rank order is row order.
            gathered: list[list[np.ndarray]] = [[] for _ in range(trainer.world_size)]
            torch.distributed.all_gather_object(gathered, parts)
            parts = [p for rank in gathered for p in rank]
        self._batches = []
        if not trainer.is_global_zero:
            return
        predictions = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
        arrays: dict[str, np.ndarray] = {
            "predictions": predictions,
            "kind": np.array(getattr(pl_module, "prediction_kind", "predictions")),
        }
        rows = _dataset_rows(trainer)
        if rows is not None and len(rows) == len(predictions):
            arrays["rows"] = rows
        label_names = getattr(pl_module.hparams, "label_names", None)
        if label_names:
            arrays["label_names"] = np.array([str(n) for n in label_names])
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        self.output.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.output, buffer.getvalue())


def _dataset_rows(trainer: L.Trainer) -> np.ndarray | None:
    loaders = trainer.predict_dataloaders
    loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
    indices = [getattr(getattr(loader, "dataset", None), "index", None) for loader in loaders]
    if any(i is None for i in indices):
        return None
    return np.concatenate([np.asarray(i, dtype=np.int64) for i in indices])

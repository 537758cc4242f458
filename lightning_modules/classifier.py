"""`LinearClassifier`: multinomial logistic regression on (target) hidden states."""

from __future__ import annotations

from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from lightning_modules.solvers import AffineMap
from lightning_modules.standardize import REL_TOL, safe_scale, std_from_moments


class Standardizer(nn.Module):
    """(x - mean) / scale with buffers; dead dims keep scale 1 (`lightning_modules.standardize`)."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.scale

    @torch.no_grad()
    def set_from_moments(self, n: Tensor, s1: Tensor, s2: Tensor, rel_tol: float = REL_TOL) -> None:
        mean, std = std_from_moments(n, s1, s2)
        self.mean.copy_(mean.to(self.mean))
        self.scale.copy_(safe_scale(std, rel_tol).to(self.scale))


class LinearClassifier(L.LightningModule):
    """logits = W standardize(h) + b, trained with cross-entropy and AdamW weight decay.

    Args:
        input_dim: hidden size (linked from the DataModule).
        output_dim: number of classes (linked from the DataModule).
        label_names: class names; filled from the DataModule when not given.
        standardize: z-score inputs with train-split statistics (computed at fit start).
        class_weights: None, "balanced" (n / (k * count_c) from the train split) or one weight per class.
        lr, weight_decay: AdamW settings.
    """

    prediction_kind = "logits"  # what `predict_step` returns, named in `xsilo predict --output` files

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        label_names: list[str] | None = None,
        standardize: bool = True,
        class_weights: Literal["balanced"] | list[float] | None = None,
        lr: float = 1e-2,
        weight_decay: float = 1e-3,
    ):
        super().__init__()
        self.save_hyperparameters()
        if output_dim < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got output_dim={output_dim}")
        if isinstance(class_weights, list) and len(class_weights) != output_dim:
            raise ValueError(f"class_weights has {len(class_weights)} entries for {output_dim} classes")
        self.standardizer = Standardizer(input_dim)
        self.linear = nn.Linear(input_dim, output_dim)
        self.register_buffer("loss_weights", torch.ones(output_dim))
        metrics = MetricCollection({
            "acc": MulticlassAccuracy(output_dim, average="micro"),
            "f1": MulticlassF1Score(output_dim, average="macro"),
        })
        self.val_metrics = metrics.clone(prefix="val_")
        self.test_metrics = metrics.clone(prefix="test_")
        self.states_spec: dict = {}

    def forward(self, h: Tensor) -> Tensor:
        return self.linear(self.standardizer(h))

    @property
    def affine_map(self) -> AffineMap:
        """The head as one affine map on raw states (standardisation folded in)."""
        w = self.linear.weight.detach().double() / self.standardizer.scale.double()
        b = self.linear.bias.detach().double() - w @ self.standardizer.mean.double()
        return AffineMap(w, b)

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        names = getattr(dm, "label_names", None)
        if self.hparams.label_names is None and names is not None:
            self.hparams.label_names = list(names)
        if getattr(dm, "job", None) is not None:
            self.states_spec = dm.job.spec()
        dims = (getattr(dm, "input_dim", self.hparams.input_dim), getattr(dm, "output_dim", self.hparams.output_dim))
        if dims != (self.hparams.input_dim, self.hparams.output_dim):
            raise ValueError(f"the classifier reads {self.hparams.input_dim}-d states into {self.hparams.output_dim} "
                             f"classes but the data holds {dims[0]}-d states and {dims[1]} classes; "
                             "set input_dim/output_dim to match (LightningCLI links them from the DataModule)")

    def on_train_start(self) -> None:
        """One pass over the train split for standardisation moments and class counts."""
        d, k = self.hparams.input_dim, self.hparams.output_dim
        n = torch.zeros((), dtype=torch.float64, device=self.device)
        s1 = torch.zeros(d, dtype=torch.float64, device=self.device)
        s2 = torch.zeros(d, dtype=torch.float64, device=self.device)
        counts = torch.zeros(k, dtype=torch.float64, device=self.device)
        for h, y in self.trainer.train_dataloader:
            h, y = h.to(self.device, torch.float64), y.to(self.device)
            if not torch.isfinite(h).all():
                raise ValueError("the training states contain NaN or inf; the cache may be corrupt: re-extract it")
            n += len(h)
            s1 += h.sum(0)
            s2 += (h * h).sum(0)
            counts += torch.bincount(y, minlength=k).to(counts)
        reduce = lambda t: self.trainer.strategy.reduce(t, reduce_op="sum")  # noqa: E731
        n, s1, s2, counts = reduce(n), reduce(s1), reduce(s2), reduce(counts)
        if self.hparams.standardize:
            self.standardizer.set_from_moments(n, s1, s2)
        cw = self.hparams.class_weights
        if cw == "balanced":
            self.loss_weights.copy_((n / (k * counts.clamp_min(1))).float())
        elif cw is not None:
            self.loss_weights.copy_(torch.tensor(cw, dtype=torch.float32))

    def _loss(self, logits: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(logits, y, weight=self.loss_weights)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        h, y = batch
        loss = self._loss(self(h), y)
        self.log("train_loss", loss, prog_bar=True, batch_size=len(h))
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        h, y = batch
        logits = self(h)
        self.log("val_loss", self._loss(logits, y), prog_bar=True, sync_dist=True, batch_size=len(h))
        self.val_metrics.update(logits, y)
        self.log_dict(self.val_metrics, prog_bar=True, batch_size=len(h))

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        h, y = batch
        self.test_metrics.update(self(h), y)
        self.log_dict(self.test_metrics, batch_size=len(h))

    def predict_step(self, batch, batch_idx: int) -> Tensor:
        """One logit per class (softmax gives the probabilities)."""
        return self(batch[0])

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["xsilo"] = {"states": self.states_spec}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.states_spec = checkpoint.get("xsilo", {}).get("states", {})

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

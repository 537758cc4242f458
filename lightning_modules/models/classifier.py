"""`LinearClassifier`: multinomial logistic regression on (target) hidden states."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from torchmetrics.functional.classification import multiclass_f1_score

from lightning_modules.fitting.affine_map import AffineMap
from lightning_modules.fitting.logistic import LogisticFit, fit_logistic
from lightning_modules.fitting.standardize import REL_TOL, safe_scale, std_from_moments
from lightning_modules.settings import DEFAULT_CS, HeadSettings


class Standardizer(nn.Module):
    """(x - mean) / scale with buffers; dead dims keep scale 1 (`lightning_modules.fitting.standardize`)."""

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
    """logits = W standardize(h) + b: multinomial logistic regression.

    With solver="lbfgs" (the default) the first training epoch gathers every train and val row (all ranks'
    under DDP), solves scikit-learn's L2 objective for each C in `cs` (`lightning_modules.fitting.logistic`), keeps the
    C best on validation (the `chosen_c` buffer, saved in checkpoints) and logs its val_loss / val_acc; later
    epochs change nothing, so one epoch is enough. With solver="adamw" minibatch AdamW with a fixed weight
    decay trains it over many epochs (early stopping on val_loss).

    Args:
        input_dim: hidden size (linked from the DataModule).
        output_dim: number of classes (linked from the DataModule).
        label_names: class names; filled from the DataModule when not given.
        standardize: z-score inputs with train-split statistics (computed at fit start).
        class_weights: None, "balanced" (n / (k * count_c) from the train split) or one weight per class.
        solver: lbfgs (full batch, C chosen on validation) or adamw.
        cs: lbfgs's inverse L2 strengths (scikit-learn's C, on standardised states).
        max_iter: lbfgs's iterations per C.
        lr, weight_decay: adamw's settings.
    """

    prediction_kind = "logits"  # what `predict_step` returns, named in `xsilo predict --output` files

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        label_names: list[str] | None = None,
        standardize: bool = True,
        class_weights: Literal["balanced"] | list[float] | None = None,
        solver: Literal["lbfgs", "adamw"] = HeadSettings.solver,
        cs: Sequence[float] = DEFAULT_CS,
        max_iter: int = HeadSettings.max_iter,
        lr: float = HeadSettings.lr,
        weight_decay: float = HeadSettings.weight_decay,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.hparams.cs = [float(c) for c in cs]  # a plain list in hparams.yaml and checkpoints
        if solver not in ("lbfgs", "adamw"):
            raise ValueError(f"solver must be lbfgs or adamw, got {solver!r}")
        if not cs or min(cs) <= 0 or max_iter < 1:
            raise ValueError(f"the lbfgs solver needs a non-empty list of C > 0 and max_iter >= 1; got {list(cs)}, "
                             f"{max_iter}")
        if output_dim < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got output_dim={output_dim}")
        if isinstance(class_weights, list) and len(class_weights) != output_dim:
            raise ValueError(f"class_weights has {len(class_weights)} entries for {output_dim} classes")
        self.standardizer = Standardizer(input_dim)
        self.linear = nn.Linear(input_dim, output_dim)
        self.register_buffer("loss_weights", torch.ones(output_dim))
        # The C lbfgs chose (NaN: not solved yet, or adamw); a buffer, so checkpoints carry it.
        self.register_buffer("chosen_c", torch.tensor(float("nan"), dtype=torch.float64))
        self.automatic_optimization = solver == "adamw"
        self.c_path: dict[str, Any] | None = None  # lbfgs's per-C validation scores
        self._rows: dict[str, list[tuple[Tensor, Tensor]]] = {}
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

    @property
    def solving(self) -> bool:
        """True during lbfgs's fitting epoch (before its C path is solved)."""
        return self.hparams.solver == "lbfgs" and bool(torch.isnan(self.chosen_c))

    def on_train_start(self) -> None:
        """adamw: one pass over the train split for standardisation moments and class counts."""
        if self.hparams.solver == "lbfgs":
            return  # fit_logistic standardises the gathered train rows itself
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

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor | None:
        h, y = batch
        if self.hparams.solver == "lbfgs":
            if self.solving:
                self._rows.setdefault("train", []).append((h.detach(), y.detach()))
            # Lightning counts optimizer steps as global steps, and ModelCheckpoint never saves at
            # global_step 0; no parameter has a gradient here, so this step changes nothing.
            self.optimizers().step()
            return None
        loss = self._loss(self(h), y)
        self.log("train_loss", loss, prog_bar=True, batch_size=len(h))
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        h, y = batch
        if self.solving and self.trainer.state.fn == TrainerFn.FITTING:
            if not self.trainer.sanity_checking:
                self._rows.setdefault("val", []).append((h.detach(), y.detach()))
            return
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

    def on_validation_epoch_end(self) -> None:
        if self.solving and self.trainer.state.fn == TrainerFn.FITTING and not self.trainer.sanity_checking:
            self._solve()

    def on_train_epoch_end(self) -> None:
        if self.solving:  # no validation ran (limit_val_batches=0): fit_logistic needs a single C then
            self._solve()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["xsilo"] = {"states": self.states_spec, "c_path": self.c_path}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        meta = checkpoint.get("xsilo", {})
        self.states_spec, self.c_path = meta.get("states", {}), meta.get("c_path")
        if "solver" not in checkpoint.get("hyper_parameters", {"solver": None}):
            # From before the lbfgs solver (no solver hparam, no chosen_c buffer): adamw trained it.
            self.hparams.solver = "adamw"
            self.automatic_optimization = True
            checkpoint.get("state_dict", {}).setdefault("chosen_c", torch.tensor(float("nan"), dtype=torch.float64))

    # -- lbfgs -------------------------------------------------------------------------------

    def _gather(self, split: str) -> tuple[Tensor, Tensor] | None:
        """This split's rows of every rank, in rank order (uneven shards padded for all_gather, then cut)."""
        parts = self._rows.pop(split, [])
        d = self.hparams.input_dim
        h = torch.cat([p[0] for p in parts]) if parts else torch.zeros(0, d, device=self.device)
        y = torch.cat([p[1] for p in parts]) if parts else torch.zeros(0, dtype=torch.long, device=self.device)
        if self.trainer.world_size > 1:
            counts = self.all_gather(torch.tensor(len(y), device=self.device)).flatten().tolist()
            top = max(counts)
            pad = top - len(y)
            h_all = self.all_gather(torch.cat([h, h.new_zeros(pad, d)]))
            y_all = self.all_gather(torch.cat([y, y.new_zeros(pad)]))
            h = torch.cat([h_all[r, :c] for r, c in enumerate(counts)])
            y = torch.cat([y_all[r, :c] for r, c in enumerate(counts)])
        return (h, y) if len(y) else None

    def _solve(self) -> None:
        hp = self.hparams
        train, val = self._gather("train"), self._gather("val")
        if train is None:
            raise ValueError("the lbfgs classifier saw no training rows; the train split is empty")
        fit = fit_logistic(train[0], train[1], *(val or (None, None)), cs=hp.cs, max_iter=hp.max_iter,
                           standardize=hp.standardize, class_weight=hp.class_weights, num_classes=hp.output_dim)
        self.load_fit(fit)
        if val is not None:
            with torch.no_grad():
                logits = self(val[0].to(self.standardizer.mean.dtype))
            self.log("val_loss", self._loss(logits, val[1]), prog_bar=True, sync_dist=True)
            self.log("val_acc", (logits.argmax(-1) == val[1]).float().mean(), prog_bar=True, sync_dist=True)
            self.log("val_f1", multiclass_f1_score(logits, val[1], hp.output_dim, average="macro"), sync_dist=True)

    def fit_record(self) -> dict[str, Any]:
        """How the head was fitted, for metrics files: the solver and, for lbfgs, the chosen C and the per-C
        validation scores (cs, val_accuracy, val_loss, iterations)."""
        record: dict[str, Any] = {"solver": self.hparams.solver}
        if self.hparams.solver == "lbfgs":
            record["chosen_c"] = float(self.chosen_c)
            record.update(self.c_path or {})
        return record

    @torch.no_grad()
    def load_fit(self, fit: LogisticFit) -> None:
        """Take a `fit_logistic` result: its standardiser, weights, class weights and chosen C."""
        weight, bias = fit.standardized()
        self.standardizer.mean.copy_(fit.mean)
        self.standardizer.scale.copy_(fit.scale)
        self.linear.weight.copy_(weight)
        self.linear.bias.copy_(bias)
        self.loss_weights.copy_(fit.class_weights)
        self.chosen_c.fill_(fit.c)
        self.c_path = fit.as_dict()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

"""`AffineAligner`: a LightningModule that maps source hidden states into a target model's space.

Epoch 0 is the closed-form fit: training and validation batches only accumulate float64
sufficient statistics, which are summed across DDP ranks, and the whole λ path (ridge, reduced_rank,
cca) is scored from one eigendecomposition by each computable criterion (GCV on the training rows,
validation MSE, and, when the target's head is given, validation logit MSE through it); `criterion`
picks the λ. Every later epoch is optional gradient fine-tuning from that
initialisation (MSE, cosine, or the task loss through a frozen target classifier), stopped
early on `val_loss` with Lightning's `EarlyStopping`. `max_epochs=1` means closed form only.

A fitted aligner is saved as tuned-lens and transformers save a model: the artifact is its `AffineMap`, and
`save_pretrained(dir)` writes that map's folder (`AffineMap.save_pretrained`: `model.safetensors` and
`config.json` with dims, estimator, λ, the λ path with every criterion's scores, centering/standardisation, the
source and target states' specs, format version, checksums); `AffineAligner.from_pretrained(dir_or_hub_id)`
reads it back (`serve.formats.maps` checks the format, version and checksums).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal, Sequence, get_args

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn

from lightning_modules.fitting.affine_map import AffineMap
from lightning_modules.fitting.solvers import CRITERIA, LAMBDA_ESTIMATORS, LambdaPath, solve, val_mse, val_r2
from lightning_modules.fitting.stats import SufficientStats
from lightning_modules.settings import DEFAULT_LAMBDAS, Criterion, Estimator
from serve.formats.folders import ExportError
from serve.formats.maps import MAP_CONFIG, RESAVE, MapConfig

FinetuneLoss = Literal["mse", "cosine", "task"]


class AffineAligner(L.LightningModule):
    """y_hat = W x + b from source states x (input_dim) to target states y (output_dim).

    `validate`/`test` score a fitted map (MSE, cosine); `predict` returns mapped states.

    Args:
        input_dim: source hidden size (linked from the DataModule).
        output_dim: target hidden size (linked from the DataModule).
        estimator: ridge, lstsq, procrustes, scaled_procrustes, reduced_rank or cca (λ chosen by `criterion`
            for ridge, reduced_rank and cca).
        lambdas: relative ridge penalties (multiples of the mean eigenvalue of Cxx).
        criterion: how λ is chosen: gcv (training rows only), val_mse (validation rows), head (validation
            logit MSE through the target's head, `classifier`); auto: head when `classifier` is given, else gcv.
        rank: output rank of reduced_rank and cca (null: full).
        center: fit an intercept (remove means).
        standardize: z-score x and y before solving (zero-variance dims keep scale 1).
        whiten_target: solve in whitened-target coordinates and map back (accumulates the full Cyy).
        finetune_loss: loss for the gradient epochs after the closed form (if max_epochs > 1).
        classifier: the target's head: a LinearClassifier checkpoint (`.ckpt`) or a head export folder
            (`xsilo head fit`) on target states. It drives criterion head/auto and finetune_loss="task".
            From Python, `aligner.set_head(affine_map)` gives the head as an `AffineMap` instead.
        lr, weight_decay: AdamW settings for fine-tuning.
    """

    prediction_kind = "mapped_states"  # what `predict_step` returns, named in `xsilo predict --output` files

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        estimator: Estimator = "ridge",
        lambdas: Sequence[float] = DEFAULT_LAMBDAS,
        criterion: Criterion = "auto",
        rank: int | None = None,
        center: bool = True,
        standardize: bool = False,
        whiten_target: bool = False,
        finetune_loss: FinetuneLoss = "mse",
        classifier: str | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
    ):
        super().__init__()
        self.save_hyperparameters()
        if estimator not in get_args(Estimator):
            raise ValueError(f"unknown estimator {estimator!r}; use {', '.join(get_args(Estimator))}")
        if estimator in LAMBDA_ESTIMATORS and not lambdas:
            raise ValueError(f"{estimator} needs at least one λ in `lambdas`")
        if criterion != "auto" and criterion not in CRITERIA:
            raise ValueError(f"unknown λ criterion {criterion!r}; use auto, gcv, val_mse or head")
        if finetune_loss == "task" and classifier is None:
            raise ValueError("finetune_loss='task' needs `classifier`: a LinearClassifier checkpoint on target states")
        self.linear = nn.Linear(input_dim, output_dim)
        self.automatic_optimization = False
        self.register_buffer("fitted", torch.tensor(False))
        self.register_buffer("chosen_lambda", torch.tensor(float("nan"), dtype=torch.float64))
        self.source_spec: dict[str, Any] = {}
        self.target_spec: dict[str, Any] = {}
        self._train_stats: SufficientStats | None = None
        self._val_stats: SufficientStats | None = None
        self._head_val: SufficientStats | None = None
        self._head: AffineMap | None = None
        self.lambda_path: LambdaPath = LambdaPath.empty()

    # -- the map -------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x)

    @property
    def affine_map(self) -> AffineMap:
        return AffineMap(self.linear.weight.detach().clone(), self.linear.bias.detach().clone())

    def load_map(self, amap: AffineMap) -> None:
        with torch.no_grad():
            self.linear.weight.copy_(amap.weight.to(self.linear.weight))
            self.linear.bias.copy_(amap.bias.to(self.linear.bias))
        self.fitted.fill_(True)

    # -- saving and loading: config.json + model.safetensors ---------------------------------

    def map_config(self, metrics: dict[str, Any] | None = None) -> MapConfig:
        """What the map folder records beside the weights: the fit's settings, its λ path, both states' specs."""
        hp, lam = self.hparams, float(self.chosen_lambda)
        return MapConfig(
            estimator=hp.estimator,
            lambdas=[float(v) for v in hp.lambdas],
            chosen_lambda=None if math.isnan(lam) else lam,
            lambda_path=self.lambda_path.finite_pairs(),  # the deciding criterion's; every one's in lambda_selection
            lambda_selection=self.lambda_path.as_dict(),
            criterion=hp.criterion,
            rank=hp.rank,
            whiten_target=bool(hp.whiten_target),
            center=bool(hp.center),
            standardize=bool(hp.standardize),
            finetune={"loss": hp.finetune_loss, "classifier": hp.classifier, "lr": float(hp.lr),
                      "weight_decay": float(hp.weight_decay)},
            source=self.source_spec,
            target=self.target_spec,
            metrics=metrics or {},
        )

    def save_pretrained(self, directory: str | Path, metrics: dict[str, Any] | None = None) -> Path:
        """Write the fitted map to `directory` (atomically, `AffineMap.save_pretrained`); `from_pretrained` reads
        it back."""
        if not bool(self.fitted):
            raise ValueError("this aligner was never fitted; fit it first (`xsilo fit` or `Trainer.fit`), then save it")
        return self.affine_map.save_pretrained(directory, self.map_config(metrics))

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | Path, revision: str | None = None) -> "AffineAligner":
        """A fitted aligner from a `save_pretrained` folder, or a hub id (`owner/name`) fetched with
        huggingface_hub (`AffineMap.from_pretrained`); refuses a folder whose format, version or checksums do not
        match."""
        amap = AffineMap.from_pretrained(path_or_hub_id, revision)
        return cls.from_map(amap, where=str(Path(amap.config.name_or_path) / MAP_CONFIG))

    @classmethod
    def from_map(cls, amap: AffineMap, config: MapConfig | None = None, where: str = "the map config"
                 ) -> "AffineAligner":
        """A fitted aligner holding `amap`, with the settings, λ path and specs of `config` (default: the map's
        own, as `AffineMap.from_pretrained` reads it); `where` names the config in errors."""
        config = config or amap.config
        if config is None:
            raise ValueError("AffineAligner.from_map needs the map's MapConfig (how it was fitted): pass config=")
        finetune = config.finetune or {}
        loss, classifier = finetune.get("loss", "mse"), finetune.get("classifier")
        lr, weight_decay = finetune.get("lr", 1e-4), finetune.get("weight_decay", 0.0)
        if (loss not in get_args(FinetuneLoss) or not (classifier is None or isinstance(classifier, str))
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lr, weight_decay))):
            raise ExportError(f"{where}: 'finetune' must hold loss (mse, cosine or task), "
                              f"classifier (a path or null), lr and weight_decay (numbers); {RESAVE}")
        try:
            aligner = cls(amap.d_x, amap.d_y, estimator=config.estimator, lambdas=config.lambdas,
                          criterion=config.criterion, rank=config.rank, center=config.center,
                          standardize=config.standardize, whiten_target=bool(config.whiten_target), finetune_loss=loss,
                          classifier=classifier, lr=lr, weight_decay=weight_decay)
        except ValueError as e:
            raise ExportError(f"{where}: {e}; {RESAVE}") from None
        aligner.load_map(amap)
        if config.chosen_lambda is not None:
            aligner.chosen_lambda.fill_(float(config.chosen_lambda))
        aligner.lambda_path = LambdaPath.from_dict(config.lambda_selection)
        aligner.source_spec, aligner.target_spec = config.source, config.target
        return aligner.eval()

    # -- Lightning hooks -----------------------------------------------------------------

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer else None
        for role in ("source", "target"):
            job = getattr(dm, f"{role}_job", None)
            if job is not None:
                setattr(self, f"{role}_spec", job.spec())
        dims = (getattr(dm, "input_dim", self.hparams.input_dim), getattr(dm, "output_dim", self.hparams.output_dim))
        if dims != (self.hparams.input_dim, self.hparams.output_dim):
            raise ValueError(f"the aligner maps {self.hparams.input_dim} -> {self.hparams.output_dim} but the "
                             f"data holds {dims[0]} -> {dims[1]}-d states; set input_dim/output_dim to match "
                             "(LightningCLI links them from the DataModule)")
        if self.hparams.classifier is not None and self._head is None:
            self.set_head(load_head(self.hparams.classifier))
        if self.hparams.criterion == "head" and self._head is None and self.solving:
            raise ValueError("criterion='head' needs the target's head: set `classifier` (a LinearClassifier "
                             "checkpoint or a head export folder) or call set_head(...) first; or use criterion='gcv'")

    def set_head(self, head: AffineMap) -> None:
        """The target's head (k × output_dim, raw target states -> logits) for criterion head/auto and
        finetune_loss="task". Not a parameter of this module: it belongs to the classifier."""
        if head.d_x != self.hparams.output_dim:
            raise ValueError(f"the head reads {head.d_x}-d states but this aligner maps to "
                             f"{self.hparams.output_dim}-d target states; pass the head of the target model")
        self._head = AffineMap(head.weight.detach().to(torch.float64), head.bias.detach().to(torch.float64))

    @property
    def solving(self) -> bool:
        """True during the statistics epoch (epoch 0 of a fit that has not solved yet)."""
        return not bool(self.fitted)

    def _require_fitted(self) -> None:
        if not bool(self.fitted):
            raise ValueError("this aligner was never fitted, so there is nothing to score or map; pass --ckpt_path "
                             "with a checkpoint written by `xsilo fit` (or run Trainer.fit first)")

    def on_validation_start(self) -> None:
        if self.trainer.state.fn != TrainerFn.FITTING:  # inside fit, epoch 0's validation gathers statistics
            self._require_fitted()

    def on_test_start(self) -> None:
        self._require_fitted()

    def on_predict_start(self) -> None:
        self._require_fitted()

    @property
    def needs_full_yty(self) -> bool:
        """CCA and target whitening need the full target covariance; everything else only its diagonal."""
        return self.hparams.estimator == "cca" or bool(self.hparams.whiten_target)

    @property
    def head_criterion(self) -> bool:
        """Validation statistics through the head are gathered whenever the head is given (k columns: cheap), so
        the λ path reports the head criterion whichever criterion chooses."""
        return self._head is not None

    def on_train_epoch_start(self) -> None:
        if self.solving:
            self._train_stats = SufficientStats.zeros(self.hparams.input_dim, self.hparams.output_dim,
                                                      device=self.device, full_yty=self.needs_full_yty)

    def on_validation_epoch_start(self) -> None:
        if self.solving and not self.trainer.sanity_checking:
            self._val_stats = SufficientStats.zeros(self.hparams.input_dim, self.hparams.output_dim,
                                                    device=self.device, full_yty=False)
            if self.head_criterion:
                self._head_val = SufficientStats.zeros(self.hparams.input_dim, self._head.d_y, device=self.device,
                                                       full_yty=False)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor | None:
        x, y = batch[0], batch[1]
        if self.solving:
            self._train_stats.update(x, y)
            # Lightning counts optimizer steps as global steps, and ModelCheckpoint never saves at
            # global_step 0; no parameter has a gradient here, so this step changes nothing.
            self.optimizers().step()
            return None
        opt = self.optimizers()
        loss = self.finetune_loss(x, y)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        self.log("train_loss", loss, prog_bar=True, sync_dist=True, batch_size=len(x))
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch[0], batch[1]
        if self.solving:
            if not self.trainer.sanity_checking:
                self._val_stats.update(x, y)
                if self._head_val is not None:
                    self._head_val.update(x, self._head(y))
            return
        self.log("val_loss", self.finetune_loss(x, y), prog_bar=True, sync_dist=True, batch_size=len(x))
        self.log("val_mse", F.mse_loss(self(x), y), sync_dist=True, batch_size=len(x))

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch[0], batch[1]
        y_hat = self(x)
        self.log("test_mse", F.mse_loss(y_hat, y), sync_dist=True, batch_size=len(x))
        self.log("test_cosine", F.cosine_similarity(y_hat, y, dim=-1).mean(), sync_dist=True, batch_size=len(x))

    def predict_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        """The source states mapped into the target's space."""
        return self(batch[0])

    def on_validation_epoch_end(self) -> None:
        if self.solving and not self.trainer.sanity_checking:
            self._solve()

    def on_train_epoch_end(self) -> None:
        # Validation runs before this hook; without validation data, solve from train alone.
        if self.solving:
            self._solve()

    def finetune_loss(self, x: Tensor, y: Tensor) -> Tensor:
        y_hat = self(x)
        loss = self.hparams.finetune_loss
        if loss == "mse":
            return F.mse_loss(y_hat, y)
        if loss == "cosine":
            return 1 - F.cosine_similarity(y_hat, y, dim=-1).mean()
        # Task loss: match the frozen target head's distribution on the true target state.
        head = self._head.to(dtype=y_hat.dtype, device=y_hat.device)
        with torch.no_grad():
            teacher = F.log_softmax(head(y), dim=-1)
        return F.kl_div(F.log_softmax(head(y_hat), dim=-1), teacher, log_target=True, reduction="batchmean")

    def configure_optimizers(self):
        return torch.optim.AdamW(self.linear.parameters(), lr=self.hparams.lr,
                                 weight_decay=self.hparams.weight_decay)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["xsilo"] = {"source": self.source_spec, "target": self.target_spec}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        specs = checkpoint.get("xsilo", {})
        self.source_spec, self.target_spec = specs.get("source", {}), specs.get("target", {})

    # -- the closed form -----------------------------------------------------------------

    def _reduce(self, stats: SufficientStats) -> SufficientStats:
        return stats.all_reduce(lambda t: self.trainer.strategy.reduce(t, reduce_op="sum"))

    def _solve(self) -> None:
        hp = self.hparams
        train = self._reduce(self._train_stats)
        val = self._reduce(self._val_stats) if self._val_stats is not None and self._val_stats.count else None
        head_val = self._reduce(self._head_val) if val is not None and self._head_val is not None else None
        amap, lam, path = solve(train, val, hp.estimator, hp.lambdas, hp.center, hp.standardize,
                                criterion=hp.criterion, head=self._head if head_val is not None else None,
                                head_val=head_val, rank=hp.rank, whiten_target=hp.whiten_target)
        if lam is not None:
            self.chosen_lambda.fill_(lam)
            self.lambda_path = path
            self.log("chosen_lambda", lam)
        self.load_map(amap)
        if val is not None:
            baseline = val_mse(val, amap) if hp.finetune_loss == "mse" else self._closed_form_val_loss()
            self.log("val_loss", baseline, prog_bar=True)  # early stopping starts from the closed form
            self.log("val_mse", val_mse(val, amap))
            self.log("val_r2", val_r2(val, amap), prog_bar=True)
        self._train_stats = self._val_stats = self._head_val = None

    def _closed_form_val_loss(self) -> float:
        """The fine-tuning loss of the fresh closed-form map on the validation set (a baseline
        for early stopping when the loss is not MSE)."""
        total, rows = 0.0, 0
        with torch.no_grad():
            for batch in self.trainer.val_dataloaders:
                x, y = (t.to(self.device) for t in batch[:2])
                total += float(self.finetune_loss(x, y)) * len(x)
                rows += len(x)
        return total / max(rows, 1)


def load_head(path: str | Path) -> AffineMap:
    """The target's head as an `AffineMap` on raw target states: a LinearClassifier checkpoint file, or a head
    export folder written by `xsilo head fit` (its head.safetensors, checked as the server checks it)."""
    path = Path(path).expanduser()
    if path.is_dir():
        from serve.formats.exports import load_export

        head = load_export(path, "head")
        return AffineMap(torch.from_numpy(head.weight).double(), torch.from_numpy(head.bias).double())
    if not path.is_file():
        raise ValueError(f"classifier {str(path)!r} does not exist; pass a LinearClassifier checkpoint (.ckpt) or a "
                         "head export folder from `xsilo head fit`")
    from lightning_modules.models.classifier import LinearClassifier

    return LinearClassifier.load_from_checkpoint(str(path), map_location="cpu").affine_map

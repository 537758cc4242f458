"""The recipe's settings, declared once with one set of defaults (the README's best recipe: a centred,
standardised ridge map chosen on held-out public rows, logistic-regression heads).

Every driver (`evaluate`, `evaluate_ood`, `evaluate_generation`, `study`, `ablate`) and every CLI command
takes these dataclasses, so `--fit.standardize false` and a `--config configs/recipe/bbc.yaml` holding
`fit: {standardize: false}` give the same `FitSettings`. Every Trainer a driver builds comes from
`build_trainer(DeviceSettings, ...)`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

from serve.formats.views import StateView

# Ridge λ path, relative to the mean eigenvalue of the source covariance: one grid fits any model's scale.
# Four per decade from 1e-6 to 1e2 (33 values); the whole path comes from one eigendecomposition.
DEFAULT_LAMBDAS: tuple[float, ...] = tuple(10.0 ** (e / 4) for e in range(-24, 9))
# Inverse L2 strengths C of the logistic-regression head (scikit-learn's convention), tried on validation.
DEFAULT_CS: tuple[float, ...] = tuple(10.0 ** (e / 2) for e in range(-6, 7))
Criterion = Literal["auto", "gcv", "val_mse", "head"]
LEAVE_TASK_OUT = "leave-task-out"  # the default public set: built per task from every other unlabelled source
Estimator = Literal["ridge", "lstsq", "procrustes", "scaled_procrustes", "reduced_rank", "cca"]
Accelerator = Literal["auto", "cpu", "gpu", "cuda", "mps"]
Devices = int | Literal["auto"]
Precision = Literal["auto", "32-true", "64-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true"]

# The forward pass's dtype for each Lightning precision; auto and 64-true keep the command's own dtype (float32 by
# default: a model's forward pass never runs in float64).
FORWARD_DTYPES: dict[str, str] = {"32-true": "float32", "bf16-mixed": "bfloat16", "bf16-true": "bfloat16",
                                  "16-mixed": "float16", "16-true": "float16"}


class SettingsError(ValueError):
    """A setting out of range; the message names it and the fix."""


@dataclass(frozen=True)
class ExtractionSettings(StateView):
    """How states are read from every model and dataset: the state view (pooling, layer, max_length, dtype:
    the cache key holds each of these, declared once in `serve.formats.views`) and how it is read.

    Args:
        pooling: mean, last or first; null: the model's own (sentence-transformers 1_Pooling, else last
            token for causal LMs, mean otherwise).
        layer: hidden_states index; -1 is the final (normed) layer.
        max_length: truncation length in tokens; null: the model's own limit.
        dtype: compute dtype of the forward pass (float32, bfloat16 or float16); states are stored in it.
        batch_size: texts per forward pass.
        text_column: text column of the task's file (default: `text`, or the registry entry's); the public
            set and OOD sets keep their own.
        label_column: label column of the task's file (default: `label`, or the registry entry's).
        dedupe: drop texts of a task's train split that also appear in its val/test split (a count is printed).
    """

    batch_size: int = 16
    text_column: str | None = None
    label_column: str = "label"
    dedupe: bool = True

    def __post_init__(self) -> None:
        if self.max_length is not None and self.max_length <= 0:
            raise SettingsError(f"extraction.max_length must be a positive number of tokens, got {self.max_length}")
        if self.batch_size <= 0:
            raise SettingsError(f"extraction.batch_size must be positive, got {self.batch_size}")

    def task_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of a LabelledStatesDataModule (a task's states)."""
        return dict(pooling=self.pooling, layer=self.layer, max_length=self.max_length, dtype=self.dtype,
                    text_column=self.text_column, label_column=self.label_column, dedupe=self.dedupe,
                    extract_batch_size=self.batch_size)

    def public_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of a PairedStatesDataModule (the public set's paired states)."""
        return dict(source_pooling=self.pooling, target_pooling=self.pooling, source_layer=self.layer,
                    target_layer=self.layer, max_length=self.max_length, dtype=self.dtype,
                    extract_batch_size=self.batch_size)


@dataclass(frozen=True)
class PublicSetSettings:
    """The shared public set the map is fitted on.

    Args:
        data: leave-task-out (the default, for a task whose domain is unknown: every unlabelled registry source
            but the task in equal weights, `limit` rows, no text of the task; built once under
            $XSILO_HOME/public/), a registry dataset, a file or hub id, or a set from `xsilo public-set build`
            (its .jsonl path).
        limit: rows of it to use (a seeded sample); null: all.
    """

    data: str = LEAVE_TASK_OUT
    limit: int | None = 4000

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 2:
            raise SettingsError(f"public.limit must be at least 2 rows (or null for all), got {self.limit}")


@dataclass(frozen=True)
class FitSettings:
    """How the source→target map is fitted.

    Args:
        estimator: ridge (λ chosen by `criterion`), lstsq, procrustes, scaled_procrustes, reduced_rank (ridge
            projected onto its top `rank` output directions) or cca (rank-`rank` canonical-correlation map).
        lambdas: the ridge λ path (relative to the mean eigenvalue of the source covariance).
        criterion: how λ is chosen on the path: gcv (generalised cross-validation on the fit rows), val_mse
            (held-out public rows), head (held-out public rows measured through the target's head: logit MSE);
            auto: head where the head is known and the public set is not leave-task-out, else gcv (val_mse when
            the fit rows do not outnumber the source dims: GCV then favours an interpolating λ). On leave-task-out
            sets the head's logit error on public rows outside the task's domain chose worse λ than GCV on 12 of
            24 study rows (4 better), in-domain better on 8 (2 worse): docs/study-report/study.md.
        rank: output rank of reduced_rank and cca (null: min(d_x, d_y)).
        center: fit an intercept.
        standardize: z-score states before solving (the best measured recipe).
        whiten_target: solve in the target's whitened coordinates (full covariance, ridge-shrunk) and map back.
    """

    estimator: Estimator = "ridge"
    lambdas: tuple[float, ...] = DEFAULT_LAMBDAS
    criterion: Criterion = "auto"
    rank: int | None = None
    center: bool = True
    standardize: bool = True
    whiten_target: bool = False

    def __post_init__(self) -> None:
        if not self.lambdas or min(self.lambdas) < 0:
            raise SettingsError(f"fit.lambdas must be a non-empty list of λ >= 0, got {list(self.lambdas)}")
        if self.rank is not None and self.rank < 1:
            raise SettingsError(f"fit.rank must be a positive number of directions (or null for full), got {self.rank}")

    def for_public(self, leave_task_out: bool) -> "FitSettings":
        """These settings on a public set: `auto` takes gcv on a leave-task-out set (see `criterion`)."""
        return replace(self, criterion="gcv") if leave_task_out and self.criterion == "auto" else self


@dataclass(frozen=True)
class AdaptationSettings:
    """The client-side adaptation of the two-party regime (`lightning_modules.fitting.adaptation`): pseudo-pairs of
    the client's own unlabelled texts, labelled in rounds through the provider's published class statistics.

    Args:
        weight: the share of the fit's total weight the client's texts carry (0.3 measured best of 0.1/0.3/0.5).
        rounds: label-and-refit rounds.
        em_iterations: EM steps of a shared-covariance mixture in the client's own space per round (0: none).
        shrinkage: that mixture's covariance shrinkage toward its mean variance (null: Ledoit-Wolf's amount).
        rows_per_component: the mixture runs on the client's top principal components, one per this many of its
            texts (5: 210 components for 1,050 texts; never fewer than the classes nor more than the model's width);
            0 runs it on the whole space. Fewer dimensions than texts keep its covariance from fitting noise.
        anchor_weight: the share of the public fit's weight that anchor texts carry: texts both parties extract,
            synthetic ones written from the provider's class descriptions, or ones the client opts to disclose
            (the paper's remedy, never the default); the study's `synthetic` and `disclosures` measure them. In
            `xsilo align` it weighs the anchors of a provider's public set (`public-set export --anchors`),
            with or without --private; the client applies it after decryption, so the provider never learns it.
        match_priors: last, move the adapted map's intercept so that the provider's head predicts the client's
            texts at the published class priors (`lightning_modules.fitting.prior_matching`; in `xsilo align`
            through the head probe, which then also reads the head on the class means' directions).
    """

    weight: float = 0.3
    rounds: int = 5
    em_iterations: int = 5
    shrinkage: float | None = None
    rows_per_component: int = 5
    anchor_weight: float = 0.3
    match_priors: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.weight < 1:
            raise SettingsError(f"adaptation.weight must be in (0, 1), got {self.weight}")
        if self.rounds < 1 or self.em_iterations < 0:
            raise SettingsError(f"adaptation.rounds must be >= 1 and em_iterations >= 0, got {self.rounds} and "
                                f"{self.em_iterations}")
        if self.shrinkage is not None and not 0 <= self.shrinkage <= 1:
            raise SettingsError(f"adaptation.shrinkage must be in [0, 1], got {self.shrinkage}")
        if self.rows_per_component < 0:
            raise SettingsError(f"adaptation.rows_per_component must be >= 0 (0: the whole space), got "
                                f"{self.rows_per_component}")
        if not 0 < self.anchor_weight < 1:
            raise SettingsError(f"adaptation.anchor_weight must be in (0, 1), got {self.anchor_weight}")


@dataclass(frozen=True)
class HeadSettings:
    """The linear classifier (multinomial logistic regression) on a model's task states.

    Args:
        solver: lbfgs (full batch, float64, the L2 strength C chosen on the validation split from `cs`: on par
            with scikit-learn's LogisticRegression) or adamw (minibatch, fixed weight decay, early stopping).
        cs: inverse L2 strengths tried by lbfgs (scikit-learn's C, on standardised states).
        max_iter: L-BFGS iterations per C.
        epochs: adamw's maximum epochs (early stopping on val_loss, patience 10).
        lr: adamw's learning rate.
        weight_decay: adamw's L2 weight decay.
    """

    solver: Literal["lbfgs", "adamw"] = "lbfgs"
    cs: tuple[float, ...] = DEFAULT_CS
    max_iter: int = 500
    epochs: int = 200
    lr: float = 1e-2
    weight_decay: float = 1e-3

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.lr <= 0 or self.weight_decay < 0:
            raise SettingsError(f"head needs epochs >= 1, lr > 0 and weight_decay >= 0; got {self.epochs}, "
                                f"{self.lr}, {self.weight_decay}")
        if not self.cs or min(self.cs) <= 0 or self.max_iter < 1:
            raise SettingsError(f"head needs a non-empty list of C > 0 and max_iter >= 1; got {list(self.cs)}, "
                                f"{self.max_iter}")


@dataclass(frozen=True)
class DeviceSettings:
    """Where a driver's models and Trainers run: one process on one device. (Several devices: extract
    with `xsilo extract --devices N`, whose cache every driver reads, or fit with `xsilo fit -c
    configs/trainer/ddp.yaml`.)

    Args:
        accelerator: cpu, gpu, cuda, mps or auto (a GPU when one is visible).
        devices: 1 or auto (one device).
        precision: Lightning precision of fitting, e.g. 32-true or bf16-mixed; auto is 32-true.
        threads: torch threads per process (default: torch's own).
    """

    accelerator: Accelerator = "auto"
    devices: Devices = "auto"
    precision: Precision = "auto"
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.devices not in ("auto", 1):
            raise SettingsError(f"devices must be 1 or auto (a driver runs in one process), got {self.devices!r}; "
                                "extract on several devices first with `xsilo extract --devices N`")
        if self.threads is not None and self.threads < 1:
            raise SettingsError(f"threads must be a positive number, got {self.threads}")

    def trainer_kwargs(self) -> dict[str, Any]:
        """The Trainer's accelerator, devices and precision."""
        return dict(accelerator=self.accelerator, devices=1,
                    precision=None if self.precision == "auto" else self.precision)

    def extraction_kwargs(self) -> dict[str, Any]:
        """`datamodules.extraction.extract`'s device keywords."""
        return dict(accelerator=self.accelerator, devices=1, threads=self.threads)

    def torch_device(self) -> str:
        """The device a driver loads a model on: `auto` is cuda when one is visible, else cpu."""
        import torch

        if self.accelerator == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return "cuda" if self.accelerator == "gpu" else self.accelerator

    def forward_dtype(self, dtype: str = "float32") -> str:
        """The compute dtype of a model's forward pass: the precision's (bf16-* → bfloat16, 16-* → float16,
        32-true → float32), or `dtype` when the precision is auto. A precision that contradicts an explicit
        non-float32 `dtype` is an error."""
        chosen = FORWARD_DTYPES.get(self.precision, dtype)
        if dtype != "float32" and chosen != dtype:
            raise SettingsError(f"precision {self.precision!r} runs the forward pass in {chosen}, but dtype is "
                                f"{dtype!r}; pass one of them (e.g. --precision auto --dtype {dtype})")
        return chosen

    def apply_threads(self) -> None:
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)


@dataclass(frozen=True)
class Recipe:
    """One alignment recipe (the base of `xsilo ablate`, and each setting it tries): what the map is fitted on
    and how.

    Args:
        mix: public-set mix, e.g. movie-dialog:0.5,bbc:0.5 (the task's val/test texts are always excluded).
        size: public-set rows.
        pooling: pooling of both models (null: each model's own).
        layer: the source's layer (-1: final).
        target_layer: the target's layer when it differs from the source's.
        standardize: z-score states before solving.
        estimator: ridge, lstsq, procrustes, scaled_procrustes, reduced_rank or cca.
        lam: ridge λ (null: chosen from the λ path by `criterion`).
        criterion: how λ is chosen: gcv, val_mse, head or auto (FitSettings.criterion).
        rank: output rank of reduced_rank and cca (null: full).
        whiten_target: solve in whitened target coordinates (changes only constrained maps).
        recenter: diagnostic: shift the mapped task states so their train-split mean is the target's own
            task-train mean (a two-party deployment needs the provider to publish that mean).
        finetune: gradient fine-tuning loss after the closed form: mse, cosine or task (null: none).
        public_seed: public-set sampling seed.
        adaptation: the two-party adaptation of the ridge map to the source's unlabelled task-train states through
            the target's task statistics (`xsilo align --private`; null: none).
    """

    mix: str = "movie-dialog:1"
    size: int | None = 4000
    pooling: str | None = ExtractionSettings.pooling
    layer: int = ExtractionSettings.layer
    target_layer: int | None = None
    standardize: bool = FitSettings.standardize
    estimator: str = FitSettings.estimator
    lam: float | None = None
    criterion: Criterion = FitSettings.criterion
    rank: int | None = FitSettings.rank
    whiten_target: bool = FitSettings.whiten_target
    recenter: bool = False
    finetune: str | None = None
    public_seed: int = 0
    adaptation: AdaptationSettings | None = None

    def describe(self, factor: str) -> str:
        if factor == "size":
            return "all eligible rows" if self.size is None else f"{self.size} rows"
        if factor == "mix":
            return self.mix
        if factor == "view":
            layers = self.layer if self.target_layer in (None, self.layer) else f"{self.layer}/{self.target_layer}"
            return f"{self.pooling or 'default'} pooling, layer {layers}"
        if factor == "standardize":
            return "standardised" if self.standardize else "centred only"
        if factor == "estimator":
            return self.estimator + (f" rank {self.rank}" if self.rank is not None else "") + (
                f" λ={self.lam:g}" if self.lam is not None else
                f" λ by {self.criterion}" if self.estimator in ("ridge", "reduced_rank", "cca") else "")
        if factor == "criterion":
            return f"λ by {self.criterion}"
        if factor == "whiten_target":
            return (self.estimator + (f" rank {self.rank}" if self.rank is not None else "")
                    + (", whitened target" if self.whiten_target else ", raw target"))
        if factor == "recenter":
            return "recentred on the target's task-train mean" if self.recenter else "not recentred"
        if factor == "finetune":
            return f"+ {self.finetune} fine-tuning" if self.finetune else "closed form"
        if factor == "seed":
            return f"public-set sample seed {self.public_seed}"
        if factor == "adaptation":
            a = self.adaptation
            if a is None:
                return "not adapted (leave-task-out map)"
            shrinkage = "Ledoit-Wolf" if a.shrinkage is None else f"{a.shrinkage:g}"
            space = "whole space" if a.rows_per_component == 0 else f"1 component per {a.rows_per_component} texts"
            anchors = "" if a.anchor_weight == AdaptationSettings.anchor_weight else f", anchors {a.anchor_weight:g}"
            priors = "" if a.match_priors else ", priors not matched"
            return (f"adapted: weight {a.weight:g}, {a.rounds} round{'s' * (a.rounds != 1)}, "
                    f"{a.em_iterations} EM steps ({space}), shrinkage {shrinkage}{anchors}{priors}")
        return "base"


GENERATION_PUBLIC = PublicSetSettings("movie-dialog", limit=2000)  # every token position is a pair: fewer texts suffice
GENERATION_MAX_LENGTH = 64  # tokens per public text of a generation fit: every position is a pair, none pooled


def build_trainer(device: DeviceSettings, max_epochs: int, callbacks: list | None = None,
                  root: str | None = None):
    """The one Trainer of every driver: quiet, no logger; checkpointing only with callbacks; its processes destroy
    their process group at exit (`datamodules.distributed`)."""
    import lightning as L

    from datamodules.distributed import ProcessGroupCleanup

    return L.Trainer(**device.trainer_kwargs(), max_epochs=max_epochs, logger=False,
                     callbacks=[*(callbacks or []), ProcessGroupCleanup()], enable_checkpointing=bool(callbacks),
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     default_root_dir=root)


def seed_all(seed: int) -> int:
    """Seed python, numpy and torch (Lightning's `seed_everything`); returns the seed, for metrics files."""
    import lightning as L

    return L.seed_everything(seed, workers=True, verbose=False)

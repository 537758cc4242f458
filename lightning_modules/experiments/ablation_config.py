"""The configuration of `xsilo ablate` (torch-free: the command line reads it to build its options): the pair, the
task, the base recipe and the values each factor takes, and the names of the factors, estimators, criteria and
fine-tuning losses. `lightning_modules.experiments.ablation` runs it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence, get_args

from datamodules.registry import AssetError
from lightning_modules.settings import (AdaptationSettings, Criterion, DeviceSettings, ExtractionSettings, FitSettings,
                                       HeadSettings, Recipe)

FACTORS = ("size", "mix", "view", "standardize", "estimator", "criterion", "whiten_target", "recenter", "finetune",
           "seed", "adaptation")
ESTIMATORS = ("lstsq", "procrustes", "scaled_procrustes", "reduced_rank", "cca")
RANKED = ("reduced_rank", "cca")  # estimators that take a rank
LAMBDA_ESTIMATORS = ("ridge", *RANKED)  # estimators whose λ is chosen on the path
CRITERIA: tuple[str, ...] = tuple(c for c in get_args(Criterion) if c != "auto")
FINETUNE_LOSSES = ("mse", "cosine", "task")
BROAD = "broad"  # the named mix: every unlabelled registry source but the task (leave-task-out)
CLASSES_MINUS_ONE = "k-1"  # a rank: the task's number of classes minus one


class AblationError(AssetError):
    """Bad ablation input; the message names the fix."""


def parse_view(text: str) -> tuple[str | None, int, int | None]:
    """`"mean@-1"` → ("mean", -1, None); `"last@15/9"` → ("last", 15, 9): source layer 15, target layer 9;
    `"@12"` → (None, 12, None): the models' default pooling."""
    pooling, _, layers = text.partition("@")
    first, _, second = layers.partition("/")
    try:
        return (pooling or None), (int(first) if first else -1), (int(second) if second else None)
    except ValueError:
        raise AblationError(f"a view is POOLING@LAYER or POOLING@SOURCE_LAYER/TARGET_LAYER, e.g. mean@-1 or "
                            f"last@15/9; got {text!r}") from None


@dataclass
class AblationConfig:
    """The pair, the task, the base recipe and the values each factor takes (`xsilo ablate` takes it whole: each
    field is a flag, --sizes '[1000,4000]', and configs/ablation/*.yaml sets them).

    `extraction` gives what every view shares (max_length, dtype, columns); its pooling and layer are the
    recipe's. `fit.lambdas` is the ridge λ path; the recipe chooses the estimator and standardisation.

    Args:
        source: client model.
        target: server model whose head reads the mapped states.
        task: labelled dataset.
        task_limit: keep N task rows (a seeded random sample).
        base: the base recipe: --base.mix movie-dialog:0.5,bbc:0.5 --base.size 4000 --base.standardize true ...
            (pooling/layer default to the extraction settings', estimator/standardize to the fit settings');
            --base.mix broad: every unlabelled registry source but the task (leave-task-out).
        factors: factors to vary: size, mix, view, standardize, estimator, criterion, whiten_target, recenter,
            finetune, seed.
        sizes: public-set sizes.
        mixes: public-set mixes, or broad (default: dialog, dialog + the task's training texts, the task's texts
            only, broad).
        views: POOLING@LAYER or POOLING@SOURCE_LAYER/TARGET_LAYER, e.g. '[mean@-1,last@15/9]'.
        view_task_limit: task rows for the view factor (new views need new forward passes).
        view_size: public rows for the view factor.
        view_ood: also score the OOD sets in every view.
        estimators: estimators besides the ridge λ path.
        ranks: ranks of reduced_rank and cca; k-1 is the task's classes minus one (a rank above min(d_x, d_y) is
            reported as skipped).
        criteria: λ criteria of the criterion factor.
        whiten_estimators: estimators the whiten_target factor fits with and without target whitening
            (reduced_rank at the first rank).
        finetune: fine-tuning losses to try (mse, cosine, task); --finetune_losses is its old spelling.
        public_seeds: public-set sampling seeds besides the base one.
        adaptations: the adaptation factor's variants besides no adaptation and the default AdaptationSettings
            (each a full setting: '[{weight: 0.1}, {rounds: 1}]'; ridge only).
        synthetic: a synthetic set's settings file (configs/synthetic/*.yaml): every adapted setting then takes its
            texts, extracted by both models, as anchors at the setting's anchor_weight, as `xsilo align` weighs a
            public set's anchors (written once; its forward passes are not counted against max_extract).
        finetune_epochs: epochs of fine-tuning.
        finetune_lr: learning rate of fine-tuning.
        finetune_batch_size: public rows per fine-tuning step.
        exclude_tasks: other tasks whose val/test texts stay out of every public set (NAME or NAME@LIMIT).
        ood: OOD datasets (excluded from every public set); AUROC of --ood_detector per setting.
        ood_limit: rows per OOD set.
        ood_detector: msp, max_logit, energy, mahalanobis or knn.
        max_extract: new forward passes allowed per (model, dataset); settings needing more are reported as
            skipped (states already cached for the same texts are reused for free).
        bootstrap: resamples for the 95% intervals.
        confidence: level of the bootstrap intervals.
        extraction: what every view shares (max_length, dtype, columns); pooling/layer are the recipe's.
        fit: the ridge λ path (fit.lambdas) of the estimator factor.
        head: the logistic-regression heads.
        device: where it runs (--accelerator, --devices, --precision, --threads).
        seed: split, training and bootstrap seed (recorded in ablation.json).
    """

    source: str = "smollm2"
    target: str = "gemma3"
    task: str = "bbc"
    task_limit: int | None = None
    base: Recipe = field(default_factory=Recipe)
    factors: Sequence[str] = FACTORS
    sizes: Sequence[int | None] = (1000, 4000, 16000, 64000)
    mixes: Sequence[str] = ()
    views: Sequence[str] = ("mean@-1",)
    view_task_limit: int | None = None
    view_size: int | None = None
    view_ood: bool = False
    estimators: Sequence[str] = ESTIMATORS
    ranks: Sequence[int | str] = (CLASSES_MINUS_ONE, 16, 64, 256)
    criteria: Sequence[str] = CRITERIA
    whiten_estimators: Sequence[str] = ("ridge", "reduced_rank", "procrustes")
    finetune: Sequence[str] = ("mse", "task")
    public_seeds: Sequence[int] = (1, 2)
    adaptations: Sequence[AdaptationSettings] = (AdaptationSettings(weight=0.1), AdaptationSettings(weight=0.5),
                                                 AdaptationSettings(rounds=1), AdaptationSettings(em_iterations=0),
                                                 AdaptationSettings(shrinkage=0.0))
    synthetic: str | None = None
    finetune_epochs: int = 30
    finetune_lr: float = 1e-3
    finetune_batch_size: int = 256
    exclude_tasks: Sequence[str] = ()
    ood: Sequence[str] = ()
    ood_limit: int | None = 500
    ood_detector: str = "mahalanobis"
    max_extract: int | None = 0
    bootstrap: int = 1000
    confidence: float = 0.95
    extraction: ExtractionSettings = field(default_factory=ExtractionSettings)
    fit: FitSettings = field(default_factory=FitSettings)
    head: HeadSettings = field(default_factory=HeadSettings)
    device: DeviceSettings = field(default_factory=DeviceSettings)
    seed: int = 0

    def validate(self) -> None:
        unknown = sorted(set(self.factors) - set(FACTORS))
        if unknown:
            raise AblationError(f"unknown factors {unknown}; choose from {list(FACTORS)}")
        for name, values in (("estimators", self.estimators), ("whiten_estimators", self.whiten_estimators)):
            bad = sorted(set(values) - set(ESTIMATORS) - {"ridge"})
            if bad:
                raise AblationError(f"unknown {name} {bad}; choose from ridge, {', '.join(ESTIMATORS)}")
        bad = [r for r in self.ranks if r != CLASSES_MINUS_ONE and (isinstance(r, bool) or not isinstance(r, int)
                                                                    or r < 1)]
        if bad or not self.ranks:
            raise AblationError(f"ranks must be positive integers or {CLASSES_MINUS_ONE!r} (the task's classes minus "
                                f"one), at least one; got {list(self.ranks)}")
        bad = sorted(set(self.criteria) - set(get_args(Criterion)))
        if bad:
            raise AblationError(f"unknown criteria {bad}; choose from {list(get_args(Criterion))}")
        bad = sorted(set(self.finetune) - set(FINETUNE_LOSSES))
        if bad:
            raise AblationError(f"unknown fine-tuning losses {bad}; choose from {list(FINETUNE_LOSSES)}")
        for view in self.views:
            parse_view(view)
        if "adaptation" in self.factors and (self.base.estimator != "ridge" or self.base.finetune is not None):
            raise AblationError("the adaptation factor refits the base recipe's ridge map at its chosen λ: use a ridge "
                                "base recipe without fine-tuning (--base.estimator ridge), or drop the factor")
        if self.synthetic is not None:
            from datamodules.synthetic import load_settings

            load_settings(self.synthetic)  # a bad file is one line, before anything is fitted
            if "view" in self.factors and "adaptation" in self.factors:
                raise AblationError("synthetic anchors are extracted in the base view only: vary the view or the "
                                    "adaptation with --synthetic, not both")
        for mix in (self.base.mix, *self.mixes):
            if mix != BROAD:
                from datamodules.public_set import parse_mix

                parse_mix(mix)

    def task_spec(self, limit: int | None) -> str:
        return self.task if limit is None else f"{self.task}@{limit}"

    def default_mixes(self) -> list[str]:
        """Dialog only, dialog with the task's own training texts (labels dropped), the task's texts only, and
        the broad leave-task-out mix."""
        return [self.base.mix, f"movie-dialog:0.7,{self.task}:0.3", f"{self.task}:1",
                f"movie-dialog:0.5,{self.task}:0.5", BROAD]

"""Model-pair convergence study: every ordered pair of N models, on several tasks, under public-set regimes.

A regime says which public set each map is fitted on: "given" (the study's `public`, every task),
"in-domain" (per task, half movie dialog, half the task's training texts: the paper's Table 1) or
"leave-task-out" (per task, every other unlabelled source, no text of the task: Table 2) or "two-party" (the
leave-task-out set, each map then adapted on the source's unlabelled task-train texts through the target's
published class statistics, as `xsilo align --private` does: `fitting.adaptation`). No public set
holds a validation or test text of any study task. For each regime, ordered pair (source, target) and task
it fits the source→target map, its λ chosen through the target's head (criterion auto = head), and reports
alignment on held-out public rows (R², cosine, linear CKA, mutual kNN, each beside its null), the mapped
accuracy and macro-F1 through the target's head, the drop from native, a null map, the majority-class rate
and the top-prediction share, the accuracy at every λ of the path with each criterion's choice, and a
collapse flag (predictions concentrated on one class, or macro-F1 < 0.8 × native); with OOD sets, the AUROC
of one detector on mapped states and its drop. Accuracy, macro-F1 and AUROC carry percentile bootstrap
intervals over test rows (drops: paired resamples; `lightning_modules.evaluation.bootstrap`, through torchmetrics).

Nothing is fitted twice: each model's task states are extracted once (the state cache; a regime's public
sets are filled from rows already cached), each (model, task) classifier and detector is fitted once and
read by every pair with that target; maps are per (regime, pair, task). Outputs: study.json, study.md (one
table per regime), a λ-path PNG per regime and one N×N heatmap PNG per metric (rows: source, columns:
target; the diagonal is the model itself: native accuracy/AUROC, identity map).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from datamodules.cache import atomic_write_bytes, atomic_write_json, slug
from datamodules.extraction import ExtractionConfig, resolve
from datamodules.recipes import (DIALOG, PublicRecipe, in_domain_recipe, leave_task_out_recipe,
                                 leave_task_out_sources, task_specs)
from datamodules.registry import AssetError
from datamodules.synthetic import SyntheticTextSettings
from lightning_modules.evaluation.bootstrap import auroc_ci, auroc_drop_ci, macro_f1_ci, mean_ci
from lightning_modules.evaluation.evaluate import (PairConfig, build_public, classification_scores, fit_aligner,
                                                   fit_classifier, lambda_path_report, null_map, path_accuracy,
                                                   prepare_states, public_datamodule, split_rows, task_datamodule)
from lightning_modules.evaluation.metrics import alignment_report, auroc
from lightning_modules.evaluation.ood import OODConfig, load_ood_sets
from lightning_modules.evaluation.ood_detectors import DETECTORS, Detector, make_detectors
from lightning_modules.experiments.anchors import disclosed_pairs, synthetic_pairs
from lightning_modules.experiments.study_report import (ceiling_summary, collapse, lambda_panels, markdown_report,
                                                        matrices)
from lightning_modules.fitting.adaptation import TaskStatistics
from lightning_modules.fitting.estimators import path_factors
from lightning_modules.fitting.prior_matching import adapt_to_priors
from lightning_modules.fitting.solvers import LAMBDA_ESTIMATORS
from lightning_modules.fitting.stats import SufficientStats
from lightning_modules.reporting.charts import heatmap, lambda_path_chart, short_name
from lightning_modules.reporting.report import DISCLOSED_PREFIX, regime_title
from lightning_modules.parties.heads import published_statistics
from lightning_modules.settings import (LEAVE_TASK_OUT, AdaptationSettings, DeviceSettings, ExtractionSettings,
                                        FitSettings, HeadSettings, PublicSetSettings, seed_all)

# "given": the recipe's public set (`public`; the default, leave-task-out, is built per task); "in-domain": per task, half dialog, half the task's own
# training texts (paper Table 1); "leave-task-out": per task, every other unlabelled source (paper Table 2);
# "two-party": the leave-task-out set, each map adapted to the source's unlabelled task-train texts (the product).
REGIMES = ("given", "in-domain", "leave-task-out", "two-party")
TWO_PARTY = "two-party"


class StudyError(AssetError):  # an AssetError, as GenerationError: the CLI prints it as a user error
    """Bad study input (too few models, an unknown model, a task without labels); the message names the fix."""


# --- configuration ----------------------------------------------------------------------------

@dataclass
class StudyConfig:
    """N models × tasks under public-set regimes, with the recipe's settings (as PairConfig's).

    `regimes`: a subset of REGIMES; `in_domain_size` / `leave_task_out_size`: rows of those regimes' public sets
    (None: every eligible row); `public_sources`: the leave-task-out sources (None: every registry dataset);
    `public_base`: the in-domain sets' other half (movie dialog). `public` is the given regime's set.
    `disclosures`: row counts N, each adding a regime `two-party-disclosed-N`: the two-party regime whose client
    also discloses N of its task-train texts (the same seeded N for every pair), paired with the target's states
    at `adaptation.anchor_weight` of the public weight (the paper's remedy, an opt-in; never a default).
    `synthetic`: per task, how the provider writes a synthetic set from its class descriptions: the two-party
    regime's anchors (at `adaptation.anchor_weight`, extracted by both models), as `xsilo align` takes a public
    set's (`public-set export --anchors`); a disclosure regime takes its disclosed texts as anchors instead."""

    models: Sequence[str]
    tasks: Sequence[str]
    task_limit: int | None = None
    ood: Sequence[str] = ()
    ood_limit: int | None = 500
    ood_detector: str = "energy"
    knn_k: int = 50
    mahalanobis_shrinkage: float = 1e-2
    bootstrap: int = 1000
    confidence: float = 0.95
    public: PublicSetSettings = field(default_factory=PublicSetSettings)
    extraction: ExtractionSettings = field(default_factory=ExtractionSettings)
    fit: FitSettings = field(default_factory=FitSettings)
    head: HeadSettings = field(default_factory=HeadSettings)
    device: DeviceSettings = field(default_factory=DeviceSettings)
    seed: int = 0
    regimes: Sequence[str] = ("given",)
    in_domain_size: int = 2000
    leave_task_out_size: int | None = 3500
    public_sources: Sequence[str] | None = None
    public_base: str = DIALOG
    adaptation: AdaptationSettings = field(default_factory=AdaptationSettings)
    disclosures: Sequence[int] = ()
    synthetic: dict[str, SyntheticTextSettings] | None = None

    @property
    def adapts(self) -> bool:
        """Whether any regime adapts maps to the client's texts (two-party or a disclosure)."""
        return TWO_PARTY in self.regimes or bool(self.disclosures)

    def validate(self) -> None:
        bad = [r for r in self.regimes if r not in REGIMES]
        if bad or not self.regimes or len(set(self.regimes)) != len(self.regimes):
            raise StudyError(f"regimes must name each of {list(REGIMES)} at most once (one at least), got "
                             f"{list(self.regimes)}")
        for name in ("in_domain_size", "leave_task_out_size"):
            value = getattr(self, name)
            if value is not None and value < 2:
                raise StudyError(f"{name} must be at least 2 rows, got {value}")
        if len(self.models) < 2:
            raise StudyError(f"a study needs at least 2 models, got {list(self.models)}: "
                             "pass --models '[A,B,...]'")
        repeated = sorted({m for m in self.models if list(self.models).count(m) > 1})
        if repeated:
            raise StudyError(f"--models lists {repeated} more than once; list each model once")
        if not self.tasks:
            raise StudyError("pass at least one labelled task: --tasks '[bbc,...]'")
        both = sorted(set(self.tasks) & set(self.ood))
        if both:
            raise StudyError(f"{both} is both a task and an OOD set; drop it from --ood or from --tasks")
        if self.ood_detector not in DETECTORS:
            raise StudyError(f"ood_detector must be one of {DETECTORS}, got {self.ood_detector!r}")
        if self.adapts and (self.fit.estimator != "ridge" or self.fit.whiten_target):
            raise StudyError(f"the two-party regime adapts a ridge map, but --fit.estimator is {self.fit.estimator}"
                             f"{' with --fit.whiten_target true' if self.fit.whiten_target else ''}; use --fit.estimator "
                             "ridge, or drop two-party from --regimes and --disclosures")
        if any(n < 1 for n in self.disclosures) or len(set(self.disclosures)) != len(self.disclosures):
            raise StudyError(f"disclosures must be distinct row counts >= 1, got {list(self.disclosures)}")
        if self.synthetic is not None and set(self.synthetic) != set(self.tasks):
            raise StudyError(f"synthetic must give settings for each task {sorted(self.tasks)} and no other, got "
                             f"{sorted(self.synthetic)}")
        if self.synthetic and TWO_PARTY not in self.regimes:
            raise StudyError("synthetic gives the two-party regime its anchors: add two-party to --regimes, or drop "
                             "synthetic")
        for settings in (self.synthetic or {}).values():
            settings.validate()
        if self.bootstrap < 1 or not 0 < self.confidence < 1:
            raise StudyError(f"need bootstrap >= 1 and 0 < confidence < 1, got {self.bootstrap} and {self.confidence}")

    def pair(self, source: str, target: str, task: str) -> PairConfig:
        return PairConfig(source, target, task, **self.recipe())

    def ood_config(self, model: str, task: str) -> OODConfig:
        return OODConfig(model, model, task, **self.recipe(), ood=list(self.ood), ood_limit=self.ood_limit,
                         knn_k=self.knn_k, mahalanobis_shrinkage=self.mahalanobis_shrinkage)

    def recipe(self) -> dict[str, Any]:
        """The settings every pair shares."""
        return dict(task_limit=self.task_limit, public=self.public, extraction=self.extraction, fit=self.fit,
                    head=self.head, device=self.device, seed=self.seed)


# --- the study --------------------------------------------------------------------------------

@dataclass
class Native:
    """One (model, task), fitted once: the head and detector, test and OOD states, and the native
    per-row results (correctness, detector scores) that every pair with this target compares against."""

    head: torch.nn.Module
    test: Tensor
    labels: Tensor
    correct: np.ndarray
    checkpoint: Path
    detector: Detector | None = None
    ood: dict[str, Tensor] = field(default_factory=dict)
    id_scores: np.ndarray | None = None
    ood_scores: dict[str, np.ndarray] = field(default_factory=dict)
    train: Tensor | None = None                 # train-split states (a two-party client's unlabelled texts)
    train_labels: Tensor | None = None          # only to check that two models' train rows are the same texts
    task_stats: TaskStatistics | None = None    # what the provider publishes of the task (`--publish_ood true`)


def _scores(detector: Detector, head: torch.nn.Module, h: Tensor) -> np.ndarray:
    return detector.score(head(h) if detector.input == "logits" else h).numpy()


def check_inputs(cfg: StudyConfig) -> None:
    """Every model and task resolves and every task is labelled, before anything is extracted."""
    cfg.validate()
    view = dict(pooling=cfg.extraction.pooling, layer=cfg.extraction.layer, max_length=cfg.extraction.max_length)
    for model in cfg.models:
        try:
            data = DIALOG if cfg.public.data == LEAVE_TASK_OUT else cfg.public.data  # built per task later
            resolve(ExtractionConfig(model=model, data=data, limit=cfg.public.limit, label_column=None,
                                     **view))
        except AssetError as e:
            raise StudyError(f"unknown model {model!r} in --models: {e}") from None
    for task in cfg.tasks:
        job = resolve(ExtractionConfig(model=cfg.models[0], data=task, limit=cfg.task_limit, **view,
                                       text_column=cfg.extraction.text_column,
                                       label_column=cfg.extraction.label_column))
        if job.labels is None:
            raise StudyError(f"task {task!r} has no labels; --tasks takes labelled datasets "
                             "(an unlabelled set can be an OOD set: --ood)")


class Study:
    """Runs the study; counts what it fits (`fits`) so reuse is visible."""

    def __init__(self, cfg: StudyConfig, work: Path):
        self.cfg, self.work = cfg, work
        self.fits = {"classifiers": 0, "detectors": 0, "aligners": 0, "public_sets": 0}
        self.publics: dict[tuple[str, str], tuple[PublicSetSettings, dict[str, Any]]] = {}
        self.ci = dict(n_resamples=cfg.bootstrap, seed=cfg.seed, confidence=cfg.confidence)
        self.specs: dict[str, dict[str, Any]] = {}  # each model's resolved extraction of each task

    def native(self, model: str, task: str) -> tuple[Native, dict[str, Any]]:
        """Fit the (model, task) head and detector once; native accuracy and AUROC with intervals."""
        cfg = self.cfg
        dm = task_datamodule(cfg.pair(model, model, task), model, task)
        prepare_states(cfg.device, dm)
        self.specs[f"{model} {task}"] = dm.job.spec()
        head, checkpoint = fit_classifier(dm, cfg.head, cfg.device, cfg.seed,
                                          self.work / f"head-{self.fits['classifiers']}")
        self.fits["classifiers"] += 1
        dm.setup("test")
        test, labels = split_rows(dm, "test")
        with torch.no_grad():
            logits = head(test)
        native = Native(head, test, labels, correct=(logits.argmax(1) == labels).numpy().astype(np.float64),
                        checkpoint=checkpoint)
        if cfg.adapts:
            native.train, y_train = split_rows(dm, "train")
            native.train_labels = y_train
            native.task_stats = TaskStatistics.from_arrays(
                *published_statistics(native.train, y_train, dm.num_classes, cfg.mahalanobis_shrinkage))
        result = {**classification_scores(logits, labels, dm.num_classes),
                  "accuracy_ci": mean_ci(native.correct, **self.ci),
                  "macro_f1_ci": macro_f1_ci(logits.argmax(1).numpy(), labels.numpy(), dm.num_classes, **self.ci)}
        if cfg.ood:
            sets, _ = load_ood_sets(cfg.ood_config(model, task), {"target": dm})
            native.ood = {name: roles["target"] for name, roles in sets.items()}
            native.detector = make_detectors(cfg.knn_k, cfg.mahalanobis_shrinkage)[cfg.ood_detector]
            h_train, y_train = split_rows(dm, "train")
            with torch.no_grad():
                native.detector.fit(head(h_train) if native.detector.input == "logits" else h_train, y_train)
                native.id_scores = _scores(native.detector, head, test)
                native.ood_scores = {name: _scores(native.detector, head, h) for name, h in native.ood.items()}
            self.fits["detectors"] += 1
            result["ood"] = {name: {"auroc": auroc(native.id_scores, scores),
                                    "auroc_ci": auroc_ci(native.id_scores, scores, **self.ci)}
                             for name, scores in native.ood_scores.items()}
        return native, result

    def unlabelled_sources(self, task: str) -> list[str]:
        """A leave-task-out set's sources: `public_sources`, or every registry dataset but the OOD sets."""
        return leave_task_out_sources(task, self.cfg.ood, self.cfg.public_sources)

    def public_set(self, regime: str, task: str) -> PublicSetSettings:
        """The public set a regime fits the maps of `task` on: built once (or found built under its name with
        the same arguments), its states filled from rows already cached for every model."""
        cfg = self.cfg
        if regime == "given" and cfg.public.data != LEAVE_TASK_OUT:
            return cfg.public
        regime = "leave-task-out" if regime.startswith(TWO_PARTY) else regime  # the same public set, adapted maps
        if (regime, task) in self.publics:
            return self.publics[regime, task][0]
        exclude = task_specs(cfg.tasks, cfg.task_limit)
        if regime == "in-domain":
            recipe: PublicRecipe = in_domain_recipe(task, exclude, cfg.in_domain_size, cfg.public_base)
        elif regime == "leave-task-out":
            recipe = leave_task_out_recipe(task, exclude, cfg.leave_task_out_size, self.unlabelled_sources(task))
        else:  # the given public set is the default, leave-task-out, of its own size
            recipe = leave_task_out_recipe(task, exclude, cfg.public.limit, self.unlabelled_sources(task),
                                           name=f"study-leave-out-{slug(task)}-{cfg.public.limit or 'all'}")
        public, info = build_public(recipe, cfg.models, cfg.extraction, cfg.device, cfg.seed)
        self.fits["public_sets"] += 1
        self.publics[regime, task] = (public, info)
        return self.publics[regime, task][0]

    def fit_map(self, source: str, target: str, task: str, public: PublicSetSettings,
                natives: dict[tuple[str, str], Native], native_results: dict[str, dict[str, Any]],
                fit: FitSettings, adapted: bool = False, anchors: tuple[Tensor, Tensor] | None = None
                ) -> dict[str, Any]:
        """source→target on a public set with `fit` (criterion auto: λ through the target's `task` head):
        alignment on held-out public rows, the mapped views, the accuracy along the λ path and the collapse flag.
        `adapted` (the two-party regime): the map is then adapted to the source's unlabelled task-train states
        through the target's task statistics, at the public fit's λ; the plain map's scores stay beside it.
        `anchors`: source and target states of texts both parties hold (`experiments.anchors`)."""
        cfg = self.cfg
        src, tgt = natives[source, task], natives[target, task]
        if not torch.equal(src.labels, tgt.labels):
            raise RuntimeError(f"{source} and {target} test rows of {task} differ; both must come from the same "
                               "task split")
        dm = public_datamodule(replace(cfg, public=public).pair(source, target, task), source, target)
        prepare_states(cfg.device, dm)
        aligner, _ = fit_aligner(dm, fit, cfg.device, head=tgt.head.affine_map)
        self.fits["aligners"] += 1
        takes_lambda = cfg.fit.estimator in LAMBDA_ESTIMATORS
        lam = float(aligner.chosen_lambda) if takes_lambda else 0.0
        plain, mapper = None, aligner
        with torch.no_grad():
            x_tr, y_tr = split_rows(dm, "train")
            train = SufficientStats.zeros(x_tr.shape[1], y_tr.shape[1], full_yty=False).update(x_tr, y_tr)
            if adapted:
                adaptation = adapt_to_priors(train, src.train, tgt.task_stats, lam, fit, cfg.adaptation,
                                             tgt.head.affine_map, anchors)
                plain = classification_scores(tgt.head(aligner(src.test)), tgt.labels, tgt.head.hparams.output_dim)
                mapper = AdaptedMap(adaptation.map)
            x_val, y_val = split_rows(dm, "val")
            out: dict[str, Any] = {
                "chosen_lambda": lam if takes_lambda else None,
                "criterion": aligner.lambda_path.criterion if takes_lambda else None,
                "alignment": alignment_report(mapper(x_val).double(), y_val.double(), source=x_val.double(), k=10,
                                              seed=cfg.seed),
                "rows": {"public_train": len(dm.splits["train"]), "public_heldout": len(x_val)},
                **self.mapped_views(mapper, null_map(dm, cfg.fit, cfg.seed, lam), src, tgt)}
            if plain is not None:
                out["adaptation"] = {**adaptation.record, "unadapted": plain}
            if takes_lambda:  # the path the criteria scored, re-solved from the same public train rows (one eigh)
                factors = path_factors(train, cfg.fit.center, cfg.fit.standardize)
                points = path_accuracy(factors, tgt.head.affine_map, src.test, tgt.labels,
                                       tgt.head.hparams.output_dim, aligner.lambda_path.lambdas)
                out["lambda_path"] = lambda_path_report(aligner.lambda_path, points)
        out["collapse"], out["collapse_reason"] = collapse(out["mapped"], native_results[target][task])
        return out

    def mapped_views(self, aligner: torch.nn.Module, shuffled: torch.nn.Module, src: Native, tgt: Native
                     ) -> dict[str, Any]:
        """The source's test (and OOD) states mapped through the target's head and detector."""
        k = tgt.head.hparams.output_dim
        mapped = aligner(src.test)
        logits = tgt.head(mapped)
        predicted = logits.argmax(1)
        correct = (predicted == tgt.labels).numpy().astype(np.float64)
        out = {"mapped": {**classification_scores(logits, tgt.labels, k), "accuracy_ci": mean_ci(correct, **self.ci),
                          "macro_f1_ci": macro_f1_ci(predicted.numpy(), tgt.labels.numpy(), k, **self.ci)},
               "mapped_drop": float(tgt.correct.mean() - correct.mean()),
               "mapped_drop_ci": mean_ci(tgt.correct - correct, **self.ci),
               "null_map": classification_scores(tgt.head(shuffled(src.test)), tgt.labels, k)}
        if tgt.detector is not None:
            mapped_id = _scores(tgt.detector, tgt.head, mapped)
            out["ood"] = {}
            for name, native_ood in tgt.ood_scores.items():
                mapped_ood = _scores(tgt.detector, tgt.head, aligner(src.ood[name]))
                value = auroc(mapped_id, mapped_ood)
                out["ood"][name] = {"auroc": value, "auroc_ci": auroc_ci(mapped_id, mapped_ood, **self.ci),
                                    "auroc_drop": auroc(tgt.id_scores, native_ood) - value,
                                    "auroc_drop_ci": auroc_drop_ci((tgt.id_scores, native_ood),
                                                                   (mapped_id, mapped_ood), **self.ci)}
        return out

    def regime(self, regime: str, natives: dict[tuple[str, str], Native],
               native_results: dict[str, dict[str, Any]], disclosed: int | None = None) -> dict[str, Any]:
        """Every ordered pair under one regime: a map per (pair, task), on the regime's public set of the task;
        two-party only, `disclosed`: N rows of the client's texts disclosed as anchors in place of the synthetic set
        (the task's synthetic set, when `cfg.synthetic` gives one, anchors the two-party regime)."""
        cfg = self.cfg
        ordered = [(s, t) for s in cfg.models for t in cfg.models if s != t]
        pairs: dict[str, Any] = {f"{s} -> {t}": {"source": s, "target": t, "tasks": {}} for s, t in ordered}
        for task in cfg.tasks:
            public = self.public_set(regime, task)
            fit = cfg.fit.for_public(regime in ("leave-task-out", TWO_PARTY)
                                     or (regime == "given" and cfg.public.data == LEAVE_TASK_OUT))
            for s, t in ordered:
                held = (disclosed_pairs(natives[s, task], natives[t, task], disclosed, cfg.seed) if disclosed else
                        synthetic_pairs(s, t, cfg.synthetic[task], cfg.extraction, cfg.device.threads)
                        if cfg.synthetic and regime == TWO_PARTY else None)
                pairs[f"{s} -> {t}"]["tasks"][task] = self.fit_map(s, t, task, public, natives, native_results, fit,
                                                                   adapted=regime == TWO_PARTY, anchors=held)
        info = ({"data": cfg.public.data, "limit": cfg.public.limit} if regime == "given"
                else {task: self.publics["leave-task-out" if regime == TWO_PARTY else regime, task][1]
                      for task in cfg.tasks})
        return {"public": info, "pairs": pairs}

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        natives, native_results = {}, {m: {} for m in cfg.models}
        for model in cfg.models:
            for task in cfg.tasks:
                natives[model, task], native_results[model][task] = self.native(model, task)
        for task in cfg.tasks if cfg.disclosures else ():  # before any map is fitted
            available = len(natives[cfg.models[0], task].train)
            if max(cfg.disclosures) > available:
                raise StudyError(f"cannot disclose {max(cfg.disclosures)} texts of {task}: it has {available} "
                                 "training texts; lower --disclosures")
        regimes = {regime: self.regime(regime, natives, native_results) for regime in cfg.regimes}
        for rows in cfg.disclosures:
            regimes[f"{DISCLOSED_PREFIX}{rows}"] = self.regime(TWO_PARTY, natives, native_results, disclosed=rows)
        return {"config": {**asdict(cfg), "models": list(cfg.models), "tasks": list(cfg.tasks), "ood": list(cfg.ood),
                           "regimes": list(cfg.regimes), "disclosures": list(cfg.disclosures)},
                "seed": cfg.seed, "extraction": self.specs,
                "models": list(cfg.models), "labels": {m: short_name(m) for m in cfg.models},
                "rows": {task: {"test": len(natives[cfg.models[0], task].labels),
                                "ood": {n: len(s) for n, s in natives[cfg.models[0], task].ood.items()},
                                **({"train": len(natives[cfg.models[0], task].train)}
                                   if natives[cfg.models[0], task].train is not None else {})}
                         for task in cfg.tasks},
                "fits": dict(self.fits), "native": native_results, "regimes": regimes}


class AdaptedMap(torch.nn.Module):
    """An adapted `AffineMap` where the study reads an aligner: float32 states in, float32 states out."""

    def __init__(self, amap) -> None:
        super().__init__()
        self.amap = amap

    def forward(self, x: Tensor) -> Tensor:
        return self.amap(x).float()


def run_study(cfg: StudyConfig, out: str | Path | None = None) -> dict[str, Any]:
    """The study; with `out`, writes study.json, study.md and heatmap-*.png there."""
    check_inputs(cfg)
    cfg.device.apply_threads()
    seed_all(cfg.seed)
    work = Path(tempfile.mkdtemp(prefix="xsilo-study-"))
    try:
        results = Study(cfg, work).run()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["heatmaps"] = {name: {**m, "file": f"heatmap-{name}.png"} for name, m in matrices(results).items()}
    for regime, view in results["regimes"].items():
        view["ceiling"] = ceiling_summary(results, regime)
    if cfg.fit.estimator in LAMBDA_ESTIMATORS:
        results["lambda_paths"] = {regime: f"lambda-path-{regime}.png" for regime in results["regimes"]}
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        names = [results["labels"][m] for m in results["models"]]
        for m in results["heatmaps"].values():
            heatmap(m["matrix"], names, m["title"], out / m["file"], diverging=m["diverging"])
        for regime, file in results.get("lambda_paths", {}).items():
            lambda_path_chart(lambda_panels(results, regime), f"Mapped test accuracy along the λ path, "
                              f"{regime_title(regime)}", out / file)
        atomic_write_json(out / "study.json", results)
        atomic_write_bytes(out / "study.md", markdown_report(results).encode())
    return results

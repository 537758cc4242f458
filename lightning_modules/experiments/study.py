"""Model-pair convergence study: every ordered pair of N models, on one public set and several tasks.

For each ordered pair (source, target) it fits the source→target map on the public set and reports
alignment on held-out public rows (R², cosine, linear CKA, mutual kNN, each beside its null), and per
task the mapped accuracy through the target's head, its drop from the target's native accuracy and a
null map; with OOD sets, the AUROC of one detector on mapped states and its drop from native. Accuracy
and AUROC carry percentile bootstrap confidence intervals over test rows (drops: paired resamples;
`lightning_modules.bootstrap`, through torchmetrics).

Nothing is fitted twice: each model's task states are extracted once (the state cache), each
(model, task) classifier and detector is fitted once and read by every pair with that target, and only
the N·(N−1) maps are per pair. Outputs: study.json, study.md and one N×N heatmap PNG per metric
(rows: source, columns: target; the diagonal is the model itself: native accuracy/AUROC, identity map).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from datamodules.assets import AssetError
from datamodules.cache import atomic_write_bytes, atomic_write_json, slug
from datamodules.extraction import ExtractionConfig, resolve
from lightning_modules.bootstrap import auroc_ci, auroc_drop_ci, mean_ci
from lightning_modules.evaluate import (PairConfig, classification_scores, fit_aligner, fit_classifier, null_map,
                                        prepare_states, public_datamodule, split_rows, task_datamodule)
from lightning_modules.metrics import alignment_report, auroc
from lightning_modules.ood import DETECTORS, Detector, OODConfig, load_ood_sets, make_detectors
from lightning_modules.report import heatmap, short_name
from lightning_modules.settings import (DeviceSettings, ExtractionSettings, FitSettings, HeadSettings,
                                        PublicSetSettings, seed_all)

ALIGNMENT = (("r2", "R²"), ("cosine", "cosine"), ("cosine_centered", "centred cosine"), ("cka", "linear CKA"),
             ("mutual_knn", "mutual kNN (k=10)"))


class StudyError(AssetError):  # an AssetError, as GenerationError: the CLI prints it as a user error
    """Bad study input (too few models, an unknown model, a task without labels); the message names the fix."""


# --- configuration ----------------------------------------------------------------------------

@dataclass
class StudyConfig:
    """N models × tasks on one public set, with the recipe's settings (as PairConfig's)."""

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

    def validate(self) -> None:
        if len(self.models) < 2:
            raise StudyError(f"a study needs at least 2 models, got {list(self.models)}: "
                             "pass --models A B [C ...]")
        repeated = sorted({m for m in self.models if list(self.models).count(m) > 1})
        if repeated:
            raise StudyError(f"--models lists {repeated} more than once; list each model once")
        if not self.tasks:
            raise StudyError("pass at least one labelled task: --tasks bbc [...]")
        both = sorted(set(self.tasks) & set(self.ood))
        if both:
            raise StudyError(f"{both} is both a task and an OOD set; drop it from --ood or from --tasks")
        if self.ood_detector not in DETECTORS:
            raise StudyError(f"ood_detector must be one of {DETECTORS}, got {self.ood_detector!r}")
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


def _scores(detector: Detector, head: torch.nn.Module, h: Tensor) -> np.ndarray:
    return detector.score(head(h) if detector.input == "logits" else h).numpy()


def check_inputs(cfg: StudyConfig) -> None:
    """Every model and task resolves and every task is labelled, before anything is extracted."""
    cfg.validate()
    view = dict(pooling=cfg.extraction.pooling, layer=cfg.extraction.layer, max_length=cfg.extraction.max_length)
    for model in cfg.models:
        try:
            resolve(ExtractionConfig(model=model, data=cfg.public.data, limit=cfg.public.limit, label_column=None,
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
        self.fits = {"classifiers": 0, "detectors": 0, "aligners": 0}
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
        result = {**classification_scores(logits, labels, dm.num_classes),
                  "accuracy_ci": mean_ci(native.correct, **self.ci)}
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

    def pair(self, source: str, target: str, natives: dict[tuple[str, str], Native]) -> dict[str, Any]:
        """Fit source→target on the public set; alignment, and per task the mapped views of the target's head."""
        cfg = self.cfg
        public = public_datamodule(cfg.pair(source, target, cfg.tasks[0]), source, target)
        prepare_states(cfg.device, public)
        aligner, _ = fit_aligner(public, cfg.fit, cfg.device)
        self.fits["aligners"] += 1
        ridge = cfg.fit.estimator == "ridge"
        lam = float(aligner.chosen_lambda) if ridge else 0.0
        shuffled = null_map(public, cfg.fit, cfg.seed, lam)
        result: dict[str, Any] = {"source": source, "target": target,
                                  "chosen_lambda": lam if ridge else None, "tasks": {}}
        with torch.no_grad():
            x_val, y_val = split_rows(public, "val")
            result["alignment"] = alignment_report(aligner(x_val).double(), y_val.double(), source=x_val.double(),
                                                   k=10, seed=cfg.seed)
            result["rows"] = {"public_train": len(public.splits["train"]), "public_heldout": len(x_val)}
            for task in cfg.tasks:
                src, tgt = natives[source, task], natives[target, task]
                if not torch.equal(src.labels, tgt.labels):
                    raise RuntimeError(f"{source} and {target} test rows of {task} differ; both must come from "
                                       "the same task split")
                result["tasks"][task] = self.mapped_views(aligner, shuffled, src, tgt)
        return result

    def mapped_views(self, aligner: torch.nn.Module, shuffled: torch.nn.Module, src: Native, tgt: Native
                ) -> dict[str, Any]:
        """The source's test (and OOD) states mapped through the target's head and detector."""
        k = tgt.head.hparams.output_dim
        mapped = aligner(src.test)
        logits = tgt.head(mapped)
        correct = (logits.argmax(1) == tgt.labels).numpy().astype(np.float64)
        out = {"mapped": {**classification_scores(logits, tgt.labels, k), "accuracy_ci": mean_ci(correct, **self.ci)},
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

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        natives, native_results = {}, {m: {} for m in cfg.models}
        for model in cfg.models:
            for task in cfg.tasks:
                natives[model, task], native_results[model][task] = self.native(model, task)
        pairs = {f"{s} -> {t}": self.pair(s, t, natives) for s in cfg.models for t in cfg.models if s != t}
        return {"config": {**asdict(cfg), "models": list(cfg.models), "tasks": list(cfg.tasks), "ood": list(cfg.ood)},
                "seed": cfg.seed, "extraction": self.specs,
                "models": list(cfg.models), "labels": {m: short_name(m) for m in cfg.models},
                "rows": {task: {"test": len(natives[cfg.models[0], task].labels),
                                "ood": {n: len(s) for n, s in natives[cfg.models[0], task].ood.items()}}
                         for task in cfg.tasks},
                "fits": dict(self.fits), "native": native_results, "pairs": pairs}


# --- heatmaps and the report ---------------------------------------------------------------------

Cell = tuple[float, Sequence[float] | None, float | None]  # value, interval, null
Add = Callable[[str, str, bool, Callable[[dict], Cell], Callable[[str], Cell]], None]


def matrices(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """One N×N matrix per metric (rows: source, columns: target), with its intervals and nulls."""
    models, native, pairs = results["models"], results["native"], results["pairs"]
    out: dict[str, dict[str, Any]] = {}

    def add(name: str, title: str, diverging: bool, off: Callable[[dict], Cell],
            diagonal: Callable[[str], Cell]) -> None:
        cells = [[diagonal(s) if s == t else off(pairs[f"{s} -> {t}"]) for t in models] for s in models]
        parts = {part: [[c[i] for c in row] for row in cells] for i, part in enumerate(("matrix", "ci", "null"))}
        out[name] = {"title": title, "diverging": diverging, **parts}

    for task in results["config"]["tasks"]:
        _task_matrices(add, native, task)
        for name in results["config"]["ood"]:
            _ood_matrices(add, native, task, name)
    for key, label in ALIGNMENT:
        _alignment_matrix(add, key, label)
    return out


def _task_matrices(add: Add, native: dict, task: str) -> None:
    def mapped(p: dict) -> dict:
        return p["tasks"][task]

    def accuracy(p: dict) -> Cell:
        return mapped(p)["mapped"]["accuracy"], mapped(p)["mapped"]["accuracy_ci"], mapped(p)["null_map"]["accuracy"]

    key = slug(task, suffix=False)
    add(f"accuracy-{key}", f"{short_name(task)}: test accuracy (diagonal native, else mapped)", False,
        accuracy, lambda m: (native[m][task]["accuracy"], native[m][task]["accuracy_ci"], None))
    add(f"drop-{key}", f"{short_name(task)}: accuracy drop (target native − mapped)", True,
        lambda p: (mapped(p)["mapped_drop"], mapped(p)["mapped_drop_ci"], None), lambda m: (0.0, None, None))


def _ood_matrices(add: Add, native: dict, task: str, name: str) -> None:
    def mapped(p: dict) -> dict:
        return p["tasks"][task]["ood"][name]

    title, key = f"{short_name(task)} vs {short_name(name)}", f"{slug(task, suffix=False)}-{slug(name, suffix=False)}"
    add(f"ood-auroc-{key}", f"{title}: AUROC (diagonal native, else mapped)", False,
        lambda p: (mapped(p)["auroc"], mapped(p)["auroc_ci"], None),
        lambda m: (native[m][task]["ood"][name]["auroc"], native[m][task]["ood"][name]["auroc_ci"], None))
    add(f"ood-drop-{key}", f"{title}: AUROC drop (target native − mapped)", True,
        lambda p: (mapped(p)["auroc_drop"], mapped(p)["auroc_drop_ci"], None), lambda m: (0.0, None, None))


def _alignment_matrix(add: Add, key: str, label: str) -> None:
    add(key, f"{label}, held-out public rows (diagonal: identity)", False,
        lambda p: (p["alignment"][key], None, p["alignment"][f"{key}_null"]), lambda m: (1.0, None, None))


def _cell(value: float, ci: Sequence[float] | None, null: float | None) -> str:
    text = f"{value:.3f}"
    if ci:
        text += f" [{ci[0]:.3f}, {ci[1]:.3f}]"
    if null is not None:
        text += f" (null {null:.3f})"
    return text


def markdown_report(results: dict[str, Any]) -> str:
    cfg, labels, models = results["config"], results["labels"], results["models"]
    fits = results["fits"]
    level = f"{cfg['confidence']:.0%}"
    lines = [
        f"# Convergence study: {len(models)} models, public set {cfg['public']['data']}",
        "",
        "Models: " + ", ".join(f"`{labels[m]}`" + (f" ({m})" if labels[m] != m else "") for m in models) + ".",
        f"Tasks: {', '.join(cfg['tasks'])}." + (f" OOD sets: {', '.join(cfg['ood'])} (detector "
                                                  f"{cfg['ood_detector']})." if cfg["ood"] else ""),
        f"Rows are the source, columns the target. Intervals: {level} percentile bootstrap over test rows "
        f"({cfg['bootstrap']} resamples; drops are paired). Fitted: {fits['classifiers']} classifiers, "
        f"{fits['detectors']} detectors, {fits['aligners']} maps.",
    ]
    for name, m in results["heatmaps"].items():
        lines += ["", f"## {m['title']}", "", f"![{name}]({m['file']})", "",
                  "| source ↓ target → | " + " | ".join(labels[t] for t in models) + " |",
                  "|---|" + "---|" * len(models)]
        for i, s in enumerate(models):
            cells = (_cell(m["matrix"][i][j], m["ci"][i][j], m["null"][i][j]) for j in range(len(models)))
            lines.append(f"| {labels[s]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


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
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        names = [results["labels"][m] for m in results["models"]]
        for m in results["heatmaps"].values():
            heatmap(m["matrix"], names, m["title"], out / m["file"], diverging=m["diverging"])
        atomic_write_json(out / "study.json", results)
        atomic_write_bytes(out / "study.md", markdown_report(results).encode())
    return results

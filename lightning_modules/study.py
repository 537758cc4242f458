"""Model-pair convergence study: every ordered pair of N models, on one public set and several tasks.

For each ordered pair (source, target) it fits the source→target map on the public set and reports
alignment on held-out public rows (R², cosine, linear CKA, mutual kNN, each beside its null), and per
task the mapped accuracy through the target's head, its drop from the target's native accuracy and a
null map; with OOD sets, the AUROC of one detector on mapped states and its drop from native. Accuracy
and AUROC carry percentile bootstrap confidence intervals over test rows (drops: paired resamples).

Nothing is fitted twice: each model's task states are extracted once (the state cache), each
(model, task) classifier and detector is fitted once and read by every pair with that target, and only
the N·(N−1) maps are per pair. Outputs: study.json, study.md and one N×N heatmap PNG per metric
(rows: source, columns: target; the diagonal is the model itself: native accuracy/AUROC, identity map).
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from datamodules.assets import AssetError
from datamodules.cache import atomic_write_bytes, atomic_write_json
from datamodules.extraction import ExtractionConfig, resolve
from datamodules.states import LabelledStatesDataModule, PairedStatesDataModule
from lightning_modules.evaluate import (PairConfig, classification_scores, fit_aligner, fit_classifier, null_map,
                                        split_rows)
from lightning_modules.metrics import alignment_report
from lightning_modules.ood import DETECTORS, Detector, OODConfig, load_ood_sets, make_detectors
from lightning_modules.report import heatmap, short_name
from lightning_modules.solvers import DEFAULT_LAMBDAS

ALIGNMENT = (("r2", "R²"), ("cosine", "cosine"), ("cosine_centered", "centred cosine"), ("cka", "linear CKA"),
             ("mutual_knn", "mutual kNN (k=10)"))


class StudyError(AssetError):  # an AssetError, as GenerationError: the CLI prints it as a user error
    """Bad study input (too few models, an unknown model, a task without labels); the message names the fix."""


# --- bootstrap (plain numpy) -----------------------------------------------------------------

def bootstrap_ci(statistic: Callable[..., float], sizes: Sequence[int], n_resamples: int = 1000, seed: int = 0,
                 confidence: float = 0.95) -> tuple[float, float]:
    """Percentile interval of `statistic(*indices)` over resamples.

    Each group of rows (sizes[i] of them) is resampled with replacement on its own; `statistic`
    gets one index array per group. Pass the same group to two views for a paired interval.
    """
    if n_resamples < 1 or not 0 < confidence < 1 or min(sizes, default=0) < 1:
        raise ValueError(f"bootstrap needs n_resamples >= 1, 0 < confidence < 1 and non-empty groups; "
                         f"got {n_resamples}, {confidence}, sizes {list(sizes)}")
    rng = np.random.default_rng(seed)
    values = [statistic(*(rng.integers(0, n, n) for n in sizes)) for _ in range(n_resamples)]
    tail = (1 - confidence) / 2
    lo, hi = np.quantile(values, [tail, 1 - tail])
    return float(lo), float(hi)


def mean_ci(values: np.ndarray, **kwargs) -> tuple[float, float]:
    """Interval of a mean: accuracy from 0/1 correctness, a paired drop from differences of them."""
    values = np.asarray(values, dtype=np.float64)
    return bootstrap_ci(lambda i: float(values[i].mean()), [len(values)], **kwargs)


def auroc(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    """P(OOD score > ID score) + ½ P(tie): the AUROC with OOD as the positive class."""
    ordered = np.sort(np.asarray(id_scores, dtype=np.float64))
    ood_scores = np.asarray(ood_scores, dtype=np.float64)
    below = np.searchsorted(ordered, ood_scores, "left")
    ties = np.searchsorted(ordered, ood_scores, "right") - below
    return float((below.sum() + 0.5 * ties.sum()) / (len(ordered) * len(ood_scores)))


def auroc_ci(id_scores: np.ndarray, ood_scores: np.ndarray, **kwargs) -> tuple[float, float]:
    return bootstrap_ci(lambda i, j: auroc(id_scores[i], ood_scores[j]), [len(id_scores), len(ood_scores)], **kwargs)


def auroc_drop_ci(native: tuple[np.ndarray, np.ndarray], mapped: tuple[np.ndarray, np.ndarray],
                  **kwargs) -> tuple[float, float]:
    """Paired interval of native AUROC − mapped AUROC: both views score the same ID and OOD rows."""
    return bootstrap_ci(lambda i, j: auroc(native[0][i], native[1][j]) - auroc(mapped[0][i], mapped[1][j]),
                        [len(native[0]), len(native[1])], **kwargs)


# --- configuration ----------------------------------------------------------------------------

@dataclass
class StudyConfig:
    """N models × tasks on one public set; the fit settings are PairConfig's."""

    models: Sequence[str]
    tasks: Sequence[str]
    public: str = "movie-dialog"
    public_limit: int | None = 4000
    task_limit: int | None = None
    ood: Sequence[str] = ()
    ood_limit: int | None = 500
    ood_detector: str = "energy"
    knn_k: int = 50
    mahalanobis_shrinkage: float = 1e-2
    bootstrap: int = 1000
    confidence: float = 0.95
    max_length: int = 128
    estimator: str = "ridge"
    lambdas: Sequence[float] = DEFAULT_LAMBDAS
    center: bool = True
    standardize: bool = False
    classifier_epochs: int = 200
    classifier_lr: float = 1e-2
    classifier_weight_decay: float = 1e-3
    seed: int = 0
    extract_batch_size: int = 16
    threads: int | None = None

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
        return self._as(PairConfig, source=source, target=target, task=task)

    def ood_config(self, model: str, task: str) -> OODConfig:
        return self._as(OODConfig, source=model, target=model, task=task, ood=list(self.ood))

    def _as(self, cls, **given):
        shared = {f.name: getattr(self, f.name) for f in fields(cls) if hasattr(self, f.name) and f.name not in given}
        return cls(**shared, **given)


# --- the study --------------------------------------------------------------------------------

@dataclass
class Native:
    """One (model, task), fitted once: the head and detector, test and OOD states, and the native
    per-row results (correctness, detector scores) that every pair with this target compares against."""

    head: torch.nn.Module
    test: Tensor
    labels: Tensor
    correct: np.ndarray
    detector: Detector | None = None
    ood: dict[str, Tensor] = field(default_factory=dict)
    id_scores: np.ndarray | None = None
    ood_scores: dict[str, np.ndarray] = field(default_factory=dict)


def _scores(detector: Detector, head: torch.nn.Module, h: Tensor) -> np.ndarray:
    return detector.score(head(h) if detector.input == "logits" else h).numpy()


def check_inputs(cfg: StudyConfig) -> None:
    """Every model and task resolves and every task is labelled, before anything is extracted."""
    cfg.validate()
    for model in cfg.models:
        try:
            resolve(ExtractionConfig(model=model, data=cfg.public, limit=cfg.public_limit, max_length=cfg.max_length))
        except AssetError as e:
            raise StudyError(f"unknown model {model!r} in --models: {e}") from None
    for task in cfg.tasks:
        job = resolve(ExtractionConfig(model=cfg.models[0], data=task, limit=cfg.task_limit, max_length=cfg.max_length))
        if job.labels is None:
            raise StudyError(f"task {task!r} has no labels; --tasks takes labelled datasets "
                             "(an unlabelled set can be an OOD set: --ood)")


class Study:
    """Runs the study; counts what it fits (`fits`) so reuse is visible."""

    def __init__(self, cfg: StudyConfig, work: Path):
        self.cfg, self.work = cfg, work
        self.fits = {"classifiers": 0, "detectors": 0, "aligners": 0}
        self.ci = dict(n_resamples=cfg.bootstrap, seed=cfg.seed, confidence=cfg.confidence)
        self.common = dict(max_length=cfg.max_length, seed=cfg.seed, extract_batch_size=cfg.extract_batch_size)

    def native(self, model: str, task: str) -> tuple[Native, dict[str, Any]]:
        """Fit the (model, task) head and detector once; native accuracy and AUROC with intervals."""
        cfg = self.cfg
        dm = LabelledStatesDataModule(model=model, data=task, limit=cfg.task_limit, **self.common)
        dm.prepare_data()
        head, _ = fit_classifier(dm, cfg.pair(model, model, task), self.work / f"head-{self.fits['classifiers']}")
        self.fits["classifiers"] += 1
        dm.setup("test")
        test, labels = split_rows(dm, "test")
        with torch.no_grad():
            logits = head(test)
        native = Native(head, test, labels, correct=(logits.argmax(1) == labels).numpy().astype(np.float64))
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
        public = PairedStatesDataModule(source=source, target=target, data=cfg.public, limit=cfg.public_limit,
                                        **self.common)
        public.prepare_data()
        pcfg = cfg.pair(source, target, cfg.tasks[0])
        aligner, _ = fit_aligner(public, pcfg)
        self.fits["aligners"] += 1
        lam = float(aligner.chosen_lambda) if cfg.estimator == "ridge" else 0.0
        shuffled = null_map(public, pcfg, lam)
        result: dict[str, Any] = {"source": source, "target": target,
                                  "chosen_lambda": lam if cfg.estimator == "ridge" else None, "tasks": {}}
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
                result["tasks"][task] = self._mapped(aligner, shuffled, src, tgt)
        return result

    def _mapped(self, aligner: torch.nn.Module, shuffled: torch.nn.Module, src: Native, tgt: Native
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
        return {"config": {**asdict(cfg), "models": list(cfg.models), "tasks": list(cfg.tasks), "ood": list(cfg.ood),
                           "lambdas": list(cfg.lambdas)},
                "models": list(cfg.models), "labels": {m: short_name(m) for m in cfg.models},
                "rows": {task: {"test": len(natives[cfg.models[0], task].labels),
                                "ood": {n: len(s) for n, s in natives[cfg.models[0], task].ood.items()}}
                         for task in cfg.tasks},
                "fits": dict(self.fits), "native": native_results, "pairs": pairs}


def slug(name: str) -> str:
    """A file-name part for a model or dataset: a path's stem, a registry name as is."""
    stem = Path(name).stem if short_name(name) != name else name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-") or "x"


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

    add(f"accuracy-{slug(task)}", f"{short_name(task)}: test accuracy (diagonal native, else mapped)", False,
        accuracy, lambda m: (native[m][task]["accuracy"], native[m][task]["accuracy_ci"], None))
    add(f"drop-{slug(task)}", f"{short_name(task)}: accuracy drop (target native − mapped)", True,
        lambda p: (mapped(p)["mapped_drop"], mapped(p)["mapped_drop_ci"], None), lambda m: (0.0, None, None))


def _ood_matrices(add: Add, native: dict, task: str, name: str) -> None:
    def mapped(p: dict) -> dict:
        return p["tasks"][task]["ood"][name]

    title = f"{short_name(task)} vs {short_name(name)}"
    add(f"ood-auroc-{slug(task)}-{slug(name)}", f"{title}: AUROC (diagonal native, else mapped)", False,
        lambda p: (mapped(p)["auroc"], mapped(p)["auroc_ci"], None),
        lambda m: (native[m][task]["ood"][name]["auroc"], native[m][task]["ood"][name]["auroc_ci"], None))
    add(f"ood-drop-{slug(task)}-{slug(name)}", f"{title}: AUROC drop (target native − mapped)", True,
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
        f"# Convergence study: {len(models)} models, public set {cfg['public']}",
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
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
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

"""Evaluate a model pair: native and mapped accuracy on a task, and alignment quality.

`evaluate_pair` fits (through Lightning) a classifier on the target's task states first, then the
source→target aligner on the shared public set with that head known (criterion auto = head: λ chosen by the
validation logit MSE through it), and a classifier on the source's states, then reports

* native target and native source accuracy / macro-F1 on the task's test split;
* mapped accuracy: source test states → aligner → the target's classifier, its drop from
  native, and a null map (fitted on shuffled public pairs);
* alignment on held-out public rows: R², cosine (raw and centred), linear CKA and mutual
  kNN, each beside its null value (shuffled pairing);
* the collapse flag (`collapse`, `collapse_reason`: the study's verdict, `study_report.collapse`);
* the λ path (`lambda_path`): every λ's score under each criterion (gcv, val_mse, head) and its mapped test
  accuracy / macro-F1 through the target head, and the λ each criterion chose with its accuracy.

Before any extraction or fit it refuses a public set that holds a validation or test text of the task's split as
evaluated (`check_no_heldout`). It saves the checkpoints it trained, the map as a map folder (`OUT/map`,
`AffineAligner.save_pretrained`) and writes `metrics.json` and `metrics.md`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score

from datamodules.cache import atomic_write_bytes, atomic_write_json, slug
from datamodules.dedupe import normalize_text
from datamodules.extraction import ExtractionConfig, ResolvedExtraction, cache_hit, extract
from datamodules.prefill import cached_texts, prefill_states
from datamodules.public_set import PublicSetError, read_manifest
from datamodules.recipes import PublicRecipe, leave_task_out_recipe, leave_task_out_sources, task_specs
from datamodules.states import LabelledStatesDataModule, PairedStatesDataModule
from lightning_modules.evaluation.metrics import alignment_report
from lightning_modules.experiments.study_report import COLLAPSE_F1_RATIO, collapse
from lightning_modules.fitting.affine_map import AffineMap
from lightning_modules.fitting.estimators import RidgeFactors, path_factors
from lightning_modules.fitting.solvers import LAMBDA_ESTIMATORS, LambdaPath, fit_affine
from lightning_modules.fitting.stats import SufficientStats
from lightning_modules.models.aligner import AffineAligner
from lightning_modules.models.classifier import LinearClassifier
from lightning_modules.settings import (DEFAULT_LAMBDAS, LEAVE_TASK_OUT, DeviceSettings, ExtractionSettings,
                                        FitSettings, HeadSettings, PublicSetSettings, build_trainer, seed_all)


@dataclass
class PairConfig:
    """One source→target evaluation on one task: the pair, the task and the recipe's settings."""

    source: str
    target: str
    task: str
    task_limit: int | None = None  # a seeded sample of the task's rows (None: all)
    public: PublicSetSettings = field(default_factory=PublicSetSettings)
    extraction: ExtractionSettings = field(default_factory=ExtractionSettings)
    fit: FitSettings = field(default_factory=FitSettings)
    head: HeadSettings = field(default_factory=HeadSettings)
    device: DeviceSettings = field(default_factory=DeviceSettings)
    seed: int = 0


def fit_aligner(dm: PairedStatesDataModule, fit: FitSettings, device: DeviceSettings,
                head: AffineMap | None = None):
    """The closed-form map (one pass over the public rows); returns it and its Trainer. `head`, the target's
    classifier as an affine map on raw target states, lets criterion auto/head choose λ through it."""
    model = AffineAligner(dm.input_dim, dm.output_dim, estimator=fit.estimator, lambdas=list(fit.lambdas),
                          criterion=fit.criterion, rank=fit.rank, center=fit.center, standardize=fit.standardize,
                          whiten_target=fit.whiten_target)
    if head is not None:
        model.set_head(head)
    trainer = build_trainer(device, max_epochs=1)
    trainer.fit(model, dm)
    return model, trainer


def fit_classifier(dm: LabelledStatesDataModule, head: HeadSettings, device: DeviceSettings, seed: int,
                   checkpoint_dir: Path) -> tuple[LinearClassifier, Path]:
    """Logistic regression from `head`: lbfgs solves its C path in one epoch (C chosen on val, the model's
    `chosen_c`), adamw trains with early stopping on val_loss. Returns the best epoch's model and its checkpoint."""
    seed_all(seed)
    model = LinearClassifier(dm.input_dim, dm.output_dim, label_names=dm.label_names, solver=head.solver,
                             cs=list(head.cs), max_iter=head.max_iter, lr=head.lr, weight_decay=head.weight_decay)
    best = ModelCheckpoint(dirpath=checkpoint_dir, monitor="val_loss", mode="min", save_top_k=1)
    callbacks = [best] if head.solver == "lbfgs" else [EarlyStopping("val_loss", patience=10), best]
    trainer = build_trainer(device, 1 if head.solver == "lbfgs" else head.epochs, callbacks, str(checkpoint_dir))
    trainer.fit(model, dm)
    path = Path(best.best_model_path)
    return LinearClassifier.load_from_checkpoint(path, map_location="cpu").eval(), path


def publish(src: Path, dst: Path) -> None:
    """Copy a finished file into place atomically."""
    tmp = dst.with_name(f".tmp-{dst.name}")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def split_rows(dm, split: str) -> list[torch.Tensor]:
    rows = dm.splits[split]
    return rows.__getitems__(list(range(len(rows))))


def classification_scores(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    """Accuracy and macro-F1, beside the majority-class rate (the accuracy of always answering the most
    common true label) and the share of predictions on the most-predicted class (1.0: a collapsed head)."""
    predicted = torch.bincount(logits.argmax(-1), minlength=num_classes)
    return {"accuracy": float(multiclass_accuracy(logits, labels, num_classes, average="micro")),
            "macro_f1": float(multiclass_f1_score(logits, labels, num_classes, average="macro")),
            "majority_rate": float(torch.bincount(labels, minlength=num_classes).max() / max(len(labels), 1)),
            "top_prediction_share": float(predicted.max() / max(len(labels), 1))}


def null_map(dm: PairedStatesDataModule, fit: FitSettings, seed: int, lam: float) -> torch.nn.Module:
    """The same estimator, at the real map's λ, fitted on shuffled public pairs: the chance level of a map."""
    x, y = split_rows(dm, "train")
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed + 1))
    full = fit.estimator == "cca" or fit.whiten_target
    stats = SufficientStats.zeros(x.shape[1], y.shape[1], full_yty=full).update(x, y[perm])
    amap = fit_affine(stats, fit.estimator, lam=lam, center=fit.center, standardize=fit.standardize, rank=fit.rank,
                      whiten_target=fit.whiten_target)
    layer = torch.nn.Linear(x.shape[1], y.shape[1])
    with torch.no_grad():
        layer.weight.copy_(amap.weight)
        layer.bias.copy_(amap.bias)
    return layer


def path_accuracy(factors: RidgeFactors, head: AffineMap, h_src: torch.Tensor, labels: torch.Tensor,
                  num_classes: int, lambdas: Sequence[float] = DEFAULT_LAMBDAS) -> list[dict[str, float]]:
    """Mapped test scores through the target head at every λ of the ridge path: one dict per λ, {"lambda",
    accuracy, macro_f1, majority_rate, top_prediction_share} (`classification_scores`). Cheap: head ∘ map_λ
    is k × d_x (`RidgeFactors.map(λ, head)`), never the d_y × d_x map."""
    x = h_src.to(torch.float64)
    return [{"lambda": float(lam), **classification_scores(factors.map(lam, head)(x), labels, num_classes)}
            for lam in lambdas]


def lambda_path_report(path: LambdaPath, points: list[dict[str, float]]) -> dict[str, Any]:
    """The metrics file's `lambda_path`: per λ each criterion's score (null: not finite) and the mapped test
    scores; the λ each criterion chose with its mapped accuracy and macro-F1; the deciding criterion."""
    finite = lambda v: float(v) if v == v and abs(v) != float("inf") else None  # noqa: E731
    by_lambda = {p["lambda"]: p for p in points}
    rows = [{**by_lambda[lam], "scores": {c: finite(v[i]) for c, v in path.scores.items()}}
            for i, lam in enumerate(path.lambdas)]
    chosen = {c: {"lambda": lam, "accuracy": by_lambda[lam]["accuracy"], "macro_f1": by_lambda[lam]["macro_f1"]}
              for c, lam in path.chosen.items()}
    return {"criterion": path.criterion, "chosen": chosen, "points": rows}


def build_public(recipe: PublicRecipe, models: Sequence[str], extraction: ExtractionSettings, device: DeviceSettings,
                 seed: int = 0) -> tuple[PublicSetSettings, dict[str, Any]]:
    """A recipe's public set (built once, or found built under its name with the same arguments, drawing rows
    already cached for every model first), its states filled from cached rows; returns it and what it holds."""
    dtype = device.forward_dtype(extraction.dtype)
    view = dict(pooling=extraction.pooling, layer=extraction.layer, max_length=extraction.max_length)
    prefer = None if recipe.built(seed) else cached_texts(models, **view, dtype=dtype)
    path = recipe.build(prefer=prefer, seed=seed)
    reused = extracted = 0
    for model in models:
        r = prefill_states(ExtractionConfig(model=model, data=str(path), **view, dtype=dtype,
                                            batch_size=extraction.batch_size, label_column=None),
                           **device.extraction_kwargs())
        reused, extracted = reused + r.reused, extracted + r.extracted
    m = read_manifest(path)
    info = {"recipe": asdict(recipe), "path": str(path), "rows": m["rows"], "fingerprint": m["fingerprint"],
            "selected": {src["name"]: src["selected"] for src in m["sources"]},
            "excluded_rows": m["excluded"]["rows_total"], "states_reused": reused, "states_extracted": extracted}
    return PublicSetSettings(str(path), limit=None), info


def task_public(cfg: PairConfig, models: Sequence[str], leave_out: Sequence[str] = ()) -> PublicSetSettings:
    """The pair's public set: `cfg.public`, except that `leave-task-out` (the default) is built for `cfg.task`
    from every other registry source but `leave_out` (e.g. the OOD sets)."""
    if cfg.public.data != LEAVE_TASK_OUT:
        return cfg.public
    sources = leave_task_out_sources(cfg.task, leave_out)
    tag = "".join(f"-{slug(s)}" for s in sorted(leave_out)) + (f"-{cfg.task_limit}" if cfg.task_limit else "")
    recipe = leave_task_out_recipe(cfg.task, task_specs([cfg.task], cfg.task_limit), cfg.public.limit, sources,
                                   name=f"leave-out-{slug(cfg.task)}{tag}-{cfg.public.limit or 'all'}",
                                   task_columns=(cfg.extraction.text_column, cfg.extraction.label_column))
    return build_public(recipe, models, cfg.extraction, cfg.device, cfg.seed)[0]


def public_datamodule(cfg: PairConfig, source: str, target: str,
                      leave_out: Sequence[str] = ()) -> PairedStatesDataModule:
    """The public set's paired states of (source, target), read with the recipe's extraction settings; a
    leave-task-out set also leaves out the datasets `leave_out` names."""
    public = task_public(cfg, (source, target), leave_out)
    return PairedStatesDataModule(source=source, target=target, data=public.data, limit=public.limit,
                                  seed=cfg.seed, **cfg.extraction.public_kwargs())


def check_no_heldout(cfg: PairConfig, public: PairedStatesDataModule, task: LabelledStatesDataModule) -> None:
    """Refuse (one line: the count and the fix) a public set that holds a validation or test text of the task's
    split as evaluated here (its task_limit, seed and columns), compared as the builder compares texts."""
    held = {normalize_text(task.job.texts[i]) for part in ("val", "test") for i in task.split_index[part]}
    overlap = {key for key in map(normalize_text, public.source_job.texts) if key in held}
    if overlap:
        spec = task_specs([cfg.task], cfg.task_limit)[0]
        columns = "".join(f" --{k} {v}" for k, v in (("text_column", cfg.extraction.text_column),
                                                     ("label_column", cfg.extraction.label_column))
                          if v not in (None, "text", "label"))
        raise PublicSetError(
            f"the public set {public.source_job.config.data!r} holds {len(overlap)} of the {len(held)} validation/test "
            f"texts of {cfg.task!r} as evaluated here (task_limit {cfg.task_limit or 'none'}): rebuild it for this "
            f"split (xsilo public-set build ... --exclude_tasks {spec}{columns}, the same --task_limit) or use the "
            f"default --public.data {LEAVE_TASK_OUT}, which leaves the task out")


def task_datamodule(cfg: PairConfig, model: str, task: str) -> LabelledStatesDataModule:
    """One model's states of a task (stratified, seeded split), read with the recipe's extraction settings."""
    return LabelledStatesDataModule(model=model, data=task, limit=cfg.task_limit, seed=cfg.seed,
                                    **cfg.extraction.task_kwargs())


def extraction_jobs(dm: PairedStatesDataModule | LabelledStatesDataModule) -> dict[str, ResolvedExtraction]:
    """A DataModule's resolved extractions: source and target of a public set, or the one of a task."""
    return {"source": dm.source_job, "target": dm.target_job} if hasattr(dm, "source_job") else {"": dm.job}


def prepare_states(device: DeviceSettings, *modules: PairedStatesDataModule | LabelledStatesDataModule) -> None:
    """Extract every state cache the DataModules miss on the chosen accelerator, then prepare them."""
    for dm in modules:
        for job in extraction_jobs(dm).values():
            if not cache_hit(job.directory):
                extract(job.config, cache_root=dm.cache_dir, **device.extraction_kwargs())
        dm.prepare_data()


def extraction_spec(**modules: PairedStatesDataModule | LabelledStatesDataModule) -> dict[str, Any]:
    """Each DataModule's resolved extraction spec (pooling, layer, max_length, ...), for metrics files
    (`resolve` has printed each one)."""
    return {f"{role}_{side}" if side else role: job.spec()
            for role, dm in modules.items() for side, job in extraction_jobs(dm).items()}


def evaluate_pair(cfg: PairConfig, out: str | Path | None = None) -> dict[str, Any]:
    cfg.device.apply_threads()
    seed_all(cfg.seed)
    public = public_datamodule(cfg, cfg.source, cfg.target)
    task_target = task_datamodule(cfg, cfg.target, cfg.task)
    task_source = task_datamodule(cfg, cfg.source, cfg.task)
    check_no_heldout(cfg, public, task_target)  # before any extraction or fit
    prepare_states(cfg.device, public, task_target, task_source)

    work = Path(tempfile.mkdtemp(prefix="xsilo-evaluate-"))
    # The target head first: the aligner's λ is then chosen through it (criterion auto = head).
    head_target, head_target_ckpt = fit_classifier(task_target, cfg.head, cfg.device, cfg.seed, work / "target")
    fit = cfg.fit.for_public(leave_task_out=cfg.public.data == LEAVE_TASK_OUT)
    aligner, aligner_trainer = fit_aligner(public, fit, cfg.device, head=head_target.affine_map)
    aligner_trainer.save_checkpoint(work / "aligner.ckpt")
    head_source, head_source_ckpt = fit_classifier(task_source, cfg.head, cfg.device, cfg.seed, work / "source")

    task_source.setup("test")
    task_target.setup("test")
    h_src, labels = split_rows(task_source, "test")
    h_tgt, labels_t = split_rows(task_target, "test")
    if not torch.equal(labels, labels_t):
        raise RuntimeError("source and target test rows differ; both must come from the same task split")
    k = task_target.num_classes
    takes_lambda = cfg.fit.estimator in LAMBDA_ESTIMATORS
    lam = float(aligner.chosen_lambda) if takes_lambda else 0.0
    lambda_path = None
    if takes_lambda:  # the ridge path the criteria scored, re-solved from the same public train rows
        x_tr, y_tr = split_rows(public, "train")
        train = SufficientStats.zeros(x_tr.shape[1], y_tr.shape[1], full_yty=False).update(x_tr, y_tr)
        factors = path_factors(train, cfg.fit.center, cfg.fit.standardize)
        points = path_accuracy(factors, head_target.affine_map, h_src, labels, k, aligner.lambda_path.lambdas)
        lambda_path = lambda_path_report(aligner.lambda_path, points)
    with torch.no_grad():
        native_target = classification_scores(head_target(h_tgt), labels, k)
        native_source = classification_scores(head_source(h_src), labels, k)
        mapped = classification_scores(head_target(aligner(h_src)), labels, k)
        collapsed, collapse_reason = collapse(mapped, native_target)
        null = classification_scores(head_target(null_map(public, cfg.fit, cfg.seed, lam)(h_src)), labels, k)
        x_val, y_val = split_rows(public, "val")
        alignment = alignment_report(aligner(x_val).double(), y_val.double(), source=x_val.double(),
                                     k=10, seed=cfg.seed)

    results = {
        "config": asdict(cfg),
        "seed": cfg.seed,
        "extraction": extraction_spec(public=public, task_target=task_target, task_source=task_source),
        "pair": f"{cfg.source} -> {cfg.target}",
        "task": cfg.task,
        "labels": task_target.label_names,
        "rows": {"public_train": len(public.splits["train"]), "public_heldout": len(x_val),
                 "task_train": len(task_target.split_index["train"]), "task_test": len(labels)},
        "chosen_lambda": lam if takes_lambda else None,
        "criterion": aligner.lambda_path.criterion if takes_lambda else None,
        "lambda_path": lambda_path,
        "classification": {
            "native_target": native_target,
            "native_source": native_source,
            "mapped": mapped,
            "mapped_drop": native_target["accuracy"] - mapped["accuracy"],
            "null_map": null,
        },
        "collapse": collapsed,  # the study's verdict: predictions on one class, or macro-F1 < 0.8 × native target's
        "collapse_reason": collapse_reason,
        "alignment": alignment,
    }
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        publish(work / "aligner.ckpt", out / "aligner.ckpt")
        aligner.cpu().save_pretrained(out / "map")  # the same map as a map folder: `xsilo export --aligner OUT/map`
        publish(head_target_ckpt, out / "classifier-target.ckpt")
        publish(head_source_ckpt, out / "classifier-source.ckpt")
        write_report(results, out)
    shutil.rmtree(work, ignore_errors=True)
    return results


def markdown_report(results: dict[str, Any]) -> str:
    c, a = results["classification"], results["alignment"]
    lam, criterion = results.get("chosen_lambda"), results.get("criterion")
    row = lambda name, s: (f"| {name} | {s['accuracy']:.3f} | {s['macro_f1']:.3f} | "  # noqa: E731
                           f"{s.get('majority_rate', float('nan')):.3f} | {s.get('top_prediction_share', float('nan')):.3f} |")
    lines = [
        f"## {results['pair']} on {results['task']}",
        "",
        f"Public rows: {results['rows']['public_train']} train, {results['rows']['public_heldout']} held out; "
        f"task test rows: {results['rows']['task_test']}."
        + (f" Ridge λ (relative): {lam:.2g}, chosen by {criterion or 'validation MSE'}." if lam is not None else ""),
        "",
        "| classification | accuracy | macro-F1 | majority-class rate | top-prediction share |",
        "|---|---|---|---|---|",
        row("native target", c["native_target"]),
        row("native source", c["native_source"]),
        row("mapped source → target head", c["mapped"]),
        f"| drop (native target − mapped) | {c['mapped_drop']:+.3f} | | | |",
        row("null map (shuffled public pairs)", c["null_map"]),
        "",
        (f"**Collapse**: {results['collapse_reason']}." if results.get("collapse") else
         f"Collapse: no (neither flag of the study: mapped predictions on one class, mapped macro-F1 < "
         f"{COLLAPSE_F1_RATIO} × native target's)."),
        "",
        "| alignment (held-out public rows) | mapped vs target | null (shuffled pairs) |",
        "|---|---|---|",
    ]
    for name, label in (("r2", "R²"), ("cosine", "cosine"), ("cosine_centered", "centred cosine"),
                        ("cka", "linear CKA"), ("mutual_knn", "mutual kNN (k=10)")):
        lines.append(f"| {label} | {a[name]:.3f} | {a[name + '_null']:.3f} |")
    if "cka_source_target" in a:
        lines.append(f"| linear CKA, source vs target (unmapped) | {a['cka_source_target']:.3f} | |")
    path = results.get("lambda_path")
    if path:
        lines += ["", f"λ path: {len(path['points'])} values; each criterion's choice and its mapped test scores "
                  f"({path['criterion']} chose the map):", "",
                  "| λ criterion | λ | mapped accuracy | mapped macro-F1 |", "|---|---|---|---|"]
        for name, pick in path["chosen"].items():
            mark = " (used)" if name == path["criterion"] else ""
            lines.append(f"| {name}{mark} | {pick['lambda']:.1e} | {pick['accuracy']:.3f} | {pick['macro_f1']:.3f} |")
        best = max(path["points"], key=lambda p: p["accuracy"])
        lines.append(f"| best on the path (test, for reference) | {best['lambda']:.1e} | {best['accuracy']:.3f} | "
                     f"{best['macro_f1']:.3f} |")
    return "\n".join(lines) + "\n"


def write_report(results: dict[str, Any], out: Path) -> None:
    atomic_write_json(out / "metrics.json", results)
    atomic_write_bytes(out / "metrics.md", markdown_report(results).encode())

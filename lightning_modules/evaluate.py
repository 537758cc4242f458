"""Evaluate a model pair: native and mapped accuracy on a task, and alignment quality.

`evaluate_pair` fits (through Lightning) the source→target aligner on the shared public set,
a classifier on the target's task states and one on the source's, then reports

* native target and native source accuracy / macro-F1 on the task's test split;
* mapped accuracy: source test states → aligner → the target's classifier, its drop from
  native, and a null map (fitted on shuffled public pairs);
* alignment on held-out public rows: R², cosine (raw and centred), linear CKA and mutual
  kNN, each beside its null value (shuffled pairing).

It saves the checkpoints it trained and writes `metrics.json` and `metrics.md`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score

from datamodules.cache import atomic_write_bytes, atomic_write_json
from datamodules.states import LabelledStatesDataModule, PairedStatesDataModule
from lightning_modules.aligner import AffineAligner
from lightning_modules.classifier import LinearClassifier
from lightning_modules.metrics import alignment_report
from lightning_modules.solvers import DEFAULT_LAMBDAS, SufficientStats, fit_affine


@dataclass
class PairConfig:
    """One source→target evaluation on one task."""

    source: str
    target: str
    task: str
    public: str = "movie-dialog"
    public_limit: int | None = 4000
    task_limit: int | None = None  # a seeded sample of the task's rows (None: all)
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


def _trainer(max_epochs: int, callbacks: list | None = None, root: str | None = None) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_epochs=max_epochs, logger=False,
                     callbacks=callbacks or [], enable_checkpointing=bool(callbacks),
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     default_root_dir=root)


def fit_aligner(dm: PairedStatesDataModule, cfg: PairConfig) -> tuple[AffineAligner, L.Trainer]:
    model = AffineAligner(dm.input_dim, dm.output_dim, estimator=cfg.estimator, lambdas=list(cfg.lambdas),
                          center=cfg.center, standardize=cfg.standardize)
    trainer = _trainer(max_epochs=1)
    trainer.fit(model, dm)
    return model, trainer


def fit_classifier(dm: LabelledStatesDataModule, cfg: PairConfig, checkpoint_dir: Path
                   ) -> tuple[LinearClassifier, Path]:
    """Logistic regression with early stopping on val_loss; returns the best epoch's model and
    its checkpoint."""
    L.seed_everything(cfg.seed, verbose=False)
    model = LinearClassifier(dm.input_dim, dm.output_dim, label_names=dm.label_names,
                             lr=cfg.classifier_lr, weight_decay=cfg.classifier_weight_decay)
    best = ModelCheckpoint(dirpath=checkpoint_dir, monitor="val_loss", mode="min", save_top_k=1)
    trainer = _trainer(cfg.classifier_epochs, [EarlyStopping("val_loss", patience=10), best], str(checkpoint_dir))
    trainer.fit(model, dm)
    path = Path(best.best_model_path)
    return LinearClassifier.load_from_checkpoint(path, map_location="cpu").eval(), path


def _publish(src: Path, dst: Path) -> None:
    """Copy a finished file into place atomically."""
    tmp = dst.with_name(f".tmp-{dst.name}")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def split_rows(dm, split: str) -> list[torch.Tensor]:
    rows = dm.splits[split]
    return rows.__getitems__(list(range(len(rows))))


def classification_scores(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    return {"accuracy": float(multiclass_accuracy(logits, labels, num_classes, average="micro")),
            "macro_f1": float(multiclass_f1_score(logits, labels, num_classes, average="macro"))}


def null_map(dm: PairedStatesDataModule, cfg: PairConfig, lam: float) -> torch.nn.Module:
    """The same estimator fitted on shuffled public pairs: the chance level of a map."""
    x, y = split_rows(dm, "train")
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(cfg.seed + 1))
    stats = SufficientStats.zeros(x.shape[1], y.shape[1], full_yty=False).update(x, y[perm])
    amap = fit_affine(stats, cfg.estimator, lam=lam, center=cfg.center, standardize=cfg.standardize)
    layer = torch.nn.Linear(x.shape[1], y.shape[1])
    with torch.no_grad():
        layer.weight.copy_(amap.weight)
        layer.bias.copy_(amap.bias)
    return layer


def evaluate_pair(cfg: PairConfig, out: str | Path | None = None) -> dict[str, Any]:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    common = dict(max_length=cfg.max_length, seed=cfg.seed, extract_batch_size=cfg.extract_batch_size)
    public = PairedStatesDataModule(source=cfg.source, target=cfg.target, data=cfg.public,
                                    limit=cfg.public_limit, **common)
    task_target = LabelledStatesDataModule(model=cfg.target, data=cfg.task, limit=cfg.task_limit, **common)
    task_source = LabelledStatesDataModule(model=cfg.source, data=cfg.task, limit=cfg.task_limit, **common)
    for dm in (public, task_target, task_source):
        dm.prepare_data()

    work = Path(tempfile.mkdtemp(prefix="xsilo-evaluate-"))
    aligner, aligner_trainer = fit_aligner(public, cfg)
    aligner_trainer.save_checkpoint(work / "aligner.ckpt")
    head_target, head_target_ckpt = fit_classifier(task_target, cfg, work / "target")
    head_source, head_source_ckpt = fit_classifier(task_source, cfg, work / "source")

    task_source.setup("test")
    task_target.setup("test")
    h_src, labels = split_rows(task_source, "test")
    h_tgt, labels_t = split_rows(task_target, "test")
    if not torch.equal(labels, labels_t):
        raise RuntimeError("source and target test rows differ; both must come from the same task split")
    k = task_target.num_classes
    lam = float(aligner.chosen_lambda) if cfg.estimator == "ridge" else 0.0
    with torch.no_grad():
        native_target = classification_scores(head_target(h_tgt), labels, k)
        native_source = classification_scores(head_source(h_src), labels, k)
        mapped = classification_scores(head_target(aligner(h_src)), labels, k)
        null = classification_scores(head_target(null_map(public, cfg, lam)(h_src)), labels, k)
        x_val, y_val = split_rows(public, "val")
        alignment = alignment_report(aligner(x_val).double(), y_val.double(), source=x_val.double(),
                                     k=10, seed=cfg.seed)

    results = {
        "config": {**asdict(cfg), "lambdas": list(cfg.lambdas)},
        "pair": f"{cfg.source} -> {cfg.target}",
        "task": cfg.task,
        "labels": task_target.label_names,
        "rows": {"public_train": len(public.splits["train"]), "public_heldout": len(x_val),
                 "task_train": len(task_target.split_index["train"]), "task_test": len(labels)},
        "chosen_lambda": lam if cfg.estimator == "ridge" else None,
        "classification": {
            "native_target": native_target,
            "native_source": native_source,
            "mapped": mapped,
            "mapped_drop": native_target["accuracy"] - mapped["accuracy"],
            "null_map": null,
        },
        "alignment": alignment,
    }
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        _publish(work / "aligner.ckpt", out / "aligner.ckpt")
        _publish(head_target_ckpt, out / "classifier-target.ckpt")
        _publish(head_source_ckpt, out / "classifier-source.ckpt")
        write_report(results, out)
    shutil.rmtree(work, ignore_errors=True)
    return results


def markdown_report(results: dict[str, Any]) -> str:
    c, a = results["classification"], results["alignment"]
    lines = [
        f"## {results['pair']} on {results['task']}",
        "",
        f"Public rows: {results['rows']['public_train']} train, {results['rows']['public_heldout']} held out; "
        f"task test rows: {results['rows']['task_test']}."
        + (f" Ridge λ (relative): {results['chosen_lambda']:.0e}." if results.get("chosen_lambda") else ""),
        "",
        "| classification | accuracy | macro-F1 |",
        "|---|---|---|",
        f"| native target | {c['native_target']['accuracy']:.3f} | {c['native_target']['macro_f1']:.3f} |",
        f"| native source | {c['native_source']['accuracy']:.3f} | {c['native_source']['macro_f1']:.3f} |",
        f"| mapped source → target head | {c['mapped']['accuracy']:.3f} | {c['mapped']['macro_f1']:.3f} |",
        f"| drop (native target − mapped) | {c['mapped_drop']:+.3f} | |",
        f"| null map (shuffled public pairs) | {c['null_map']['accuracy']:.3f} | {c['null_map']['macro_f1']:.3f} |",
        "",
        "| alignment (held-out public rows) | mapped vs target | null (shuffled pairs) |",
        "|---|---|---|",
    ]
    for name, label in (("r2", "R²"), ("cosine", "cosine"), ("cosine_centered", "centred cosine"),
                        ("cka", "linear CKA"), ("mutual_knn", "mutual kNN (k=10)")):
        lines.append(f"| {label} | {a[name]:.3f} | {a[name + '_null']:.3f} |")
    if "cka_source_target" in a:
        lines.append(f"| linear CKA, source vs target (unmapped) | {a['cka_source_target']:.3f} | |")
    return "\n".join(lines) + "\n"


def write_report(results: dict[str, Any], out: Path) -> None:
    atomic_write_json(out / "metrics.json", results)
    atomic_write_bytes(out / "metrics.md", markdown_report(results).encode())

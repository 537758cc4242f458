"""`xsilo evaluate` and `xsilo evaluate_ood`: typed functions whose signatures are their options (see
`lightning_modules.cli`); the drivers are imported when a command runs."""

from __future__ import annotations

import sys
from pathlib import Path

from datamodules.commands import quiet
from lightning_modules.settings import DeviceSettings, ExtractionSettings, FitSettings, HeadSettings, PublicSetSettings


def evaluate(
    *,
    source: str,
    target: str,
    task: str,
    task_limit: int | None = None,
    public: PublicSetSettings = PublicSetSettings(),
    extraction: ExtractionSettings = ExtractionSettings(),
    fit: FitSettings = FitSettings(),
    head: HeadSettings = HeadSettings(),
    seed: int = 0,
    device: DeviceSettings = DeviceSettings(),
    out: str = "runs/evaluate",
) -> None:
    """Fit source→target on the public set and heads on the task; write metrics.json/metrics.md.

    A recipe file sets any of these: --config configs/recipe/bbc.yaml (flags after it win).

    Args:
        source: client model (registry name, folder or hub id).
        target: server model whose classifier reads the mapped states.
        task: labelled dataset (stratified train/val/test split): a registry name, a CSV/TSV/JSONL/Parquet
            file, a saved datasets folder or a hub id.
        task_limit: keep N task rows (a seeded random sample; the split is stratified within it).
        public: the shared public set the map is fitted on.
        extraction: how states are read (pooling, layer, max_length, dtype, columns of a user's file).
        fit: how the map is fitted (estimator, λ path, centring, standardisation).
        head: the logistic-regression heads.
        seed: split, training and sampling seed (recorded in metrics.json).
        device: where it runs (--accelerator, --devices, --precision, --threads).
        out: output directory (checkpoints, metrics.json, metrics.md).
    """
    from datamodules.progress import StageTimes
    from lightning_modules.evaluation.evaluate import PairConfig, evaluate_pair, markdown_report

    quiet()
    cfg = PairConfig(source, target, task, task_limit=task_limit, public=public, extraction=extraction, fit=fit,
                     head=head, device=device, seed=seed)
    with StageTimes() as times:  # extraction reports its stages into it
        results = evaluate_pair(cfg, out=out)
    print(markdown_report(results))
    print(f"wrote {Path(out) / 'metrics.json'} and {Path(out) / 'metrics.md'}")
    print(times.summary(), file=sys.stderr)


def evaluate_ood(
    *,
    source: str,
    target: str,
    task: str,
    ood: list[str],
    task_limit: int | None = None,
    ood_limit: int | None = 500,
    knn_k: int = 50,
    mahalanobis_shrinkage: float = 1e-2,
    threshold_tpr: float = 0.95,
    export_detector: str = "auto",
    public: PublicSetSettings = PublicSetSettings(),
    extraction: ExtractionSettings = ExtractionSettings(),
    fit: FitSettings = FitSettings(),
    head: HeadSettings = HeadSettings(),
    seed: int = 0,
    device: DeviceSettings = DeviceSettings(),
    out: str = "runs/ood",
) -> None:
    """Out-of-distribution detection with native target states and mapped source states.

    Writes ood.json/ood.md, the checkpoints and ood-threshold.json (for `xsilo export --ood`). A recipe file
    sets any of these: --config configs/recipe/vader-movies.yaml.

    Args:
        source: client model (registry name, folder or hub id).
        target: server model whose classifier reads the mapped states.
        task: labelled in-distribution dataset (train fits detectors, val sets thresholds, test is scored).
        ood: out-of-distribution datasets, e.g. '[vader-tweets,trec]'; labels, if any, are ignored.
        task_limit: keep N task rows (a seeded random sample).
        ood_limit: keep N rows of each OOD set (a seeded random sample).
        knn_k: neighbours for the cosine kNN detector.
        mahalanobis_shrinkage: shrinkage of the shared covariance towards a scaled identity.
        threshold_tpr: share of ID validation inputs kept at or below each threshold.
        export_detector: the logit detector named in the export manifest: auto (best validation AUROC), msp,
            max_logit or energy. Whichever detector a fused-mode client can run scores best on validation
            (logits or its own states) is reported; a state detector is written to OUT/client-ood.npz.
        public: the shared public set the map is fitted on.
        extraction: how states are read (pooling, layer, max_length, dtype, columns of a user's file).
        fit: how the map is fitted.
        head: the target's logistic-regression head.
        seed: split and training seed (recorded in ood.json).
        device: where it runs (--accelerator, --devices, --precision, --threads).
        out: output directory.
    """
    from datamodules.progress import StageTimes
    from lightning_modules.evaluation.ood import OODConfig, evaluate_ood as run_evaluate_ood, markdown_report

    quiet()
    cfg = OODConfig(source, target, task, task_limit=task_limit, public=public, extraction=extraction, fit=fit,
                    head=head, device=device, seed=seed, ood=ood, ood_limit=ood_limit, knn_k=knn_k,
                    mahalanobis_shrinkage=mahalanobis_shrinkage, threshold_tpr=threshold_tpr,
                    export_detector=export_detector)
    with StageTimes() as times:  # extraction reports its stages into it
        results = run_evaluate_ood(cfg, out=out)
    print(markdown_report(results))
    print(f"wrote {', '.join(str(Path(out) / f) for f in ('ood.json', 'ood.md', 'ood-threshold.json'))}")
    print(times.summary(), file=sys.stderr)

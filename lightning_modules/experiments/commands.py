"""`xsilo study` and `xsilo ablate`: typed functions whose signatures are their options (see
`lightning_modules.cli`); the drivers are imported when a command runs."""

from __future__ import annotations

import sys
from pathlib import Path

from datamodules.commands import quiet
from datamodules.synthetic import load_settings
from lightning_modules.experiments.ablation_config import AblationConfig
from lightning_modules.settings import (AdaptationSettings, DeviceSettings, ExtractionSettings, FitSettings,
                                        HeadSettings, PublicSetSettings)


def study(
    *,
    models: list[str],
    tasks: list[str],
    task_limit: int | None = None,
    ood: list[str] | None = None,
    ood_limit: int | None = 500,
    ood_detector: str = "energy",
    bootstrap: int = 1000,
    regimes: list[str] | None = None,
    in_domain_size: int = 2000,
    leave_task_out_size: int | None = 3500,
    public_sources: list[str] | None = None,
    public: PublicSetSettings = PublicSetSettings(),
    extraction: ExtractionSettings = ExtractionSettings(),
    fit: FitSettings = FitSettings(),
    head: HeadSettings = HeadSettings(),
    adaptation: AdaptationSettings = AdaptationSettings(),
    disclosures: list[int] | None = None,
    synthetic: dict[str, str] | None = None,
    seed: int = 0,
    device: DeviceSettings = DeviceSettings(),
    out: str = "runs/study",
) -> None:
    """Every ordered pair of models: alignment, mapped accuracy and OOD drops per task, with bootstrap intervals.

    Writes study.json, study.md (one table per regime, collapses flagged), the λ-path plots and one N×N
    heatmap PNG per metric. Cached states are reused and each (model, task) classifier is fitted once, so
    adding a model costs that model's extraction. A recipe file sets the settings: --config
    configs/recipe/bbc.yaml; the paper's two tables: --config configs/study/paper-tables.yaml.

    Args:
        models: two or more models (registry names, folders or hub ids): --models '[smollm2,gemma3,minilm]'.
        tasks: labelled datasets: --tasks '[bbc,vader-movies]'.
        task_limit: keep N rows of each task (a seeded random sample).
        ood: out-of-distribution datasets; none skips OOD.
        ood_limit: keep N rows of each OOD set.
        ood_detector: msp, max_logit, energy, mahalanobis or knn: the detector whose AUROC is reported.
        bootstrap: resamples of the test rows for the 95% intervals.
        regimes: which public sets the maps are fitted on (default: given): given (--public, one for every task),
            in-domain (per task: half movie dialog, half the task's training texts; paper Table 1) and
            leave-task-out (per task: every other unlabelled source, no text of the task; paper Table 2) and
            two-party (the leave-task-out sets, each map adapted on the source's unlabelled task-train texts
            through the target's published class statistics: what `xsilo align --private` does).
        in_domain_size: rows of each in-domain public set.
        leave_task_out_size: rows of each leave-task-out public set (null: every eligible row of every source).
        public_sources: the unlabelled sources of the leave-task-out sets (default: every registry dataset).
        public: the shared public set of the given regime.
        extraction: how states are read (pooling, layer, max_length, dtype, columns of a user's file).
        fit: how each map is fitted.
        head: the logistic-regression heads.
        adaptation: the two-party regime's adaptation (weight of the client's texts, rounds, EM steps).
        disclosures: the opt-in that discloses texts, measured: each N adds a regime two-party-disclosed-N whose
            client also discloses N of its task-train texts (--disclosures '[16,64,128]').
        synthetic: per task, a file of how the provider's LM writes a synthetic set from its class descriptions
            (configs/synthetic/*.yaml); the two-party regime's maps then take those texts as anchors, as `xsilo
            align` does against a public set exported with them (configs/study/paper-tables.yaml).
        seed: split, training and bootstrap seed (recorded in study.json).
        device: where it runs (--accelerator, --devices, --precision, --threads).
        out: output directory.
    """
    from lightning_modules.experiments.study import StudyConfig, run_study

    quiet()
    cfg = StudyConfig(models=models, tasks=tasks, task_limit=task_limit, ood=ood or (), ood_limit=ood_limit,
                      ood_detector=ood_detector, bootstrap=bootstrap, public=public, extraction=extraction, fit=fit,
                      head=head, device=device, seed=seed, regimes=regimes or ("given",),
                      in_domain_size=in_domain_size, leave_task_out_size=leave_task_out_size,
                      public_sources=public_sources, adaptation=adaptation, disclosures=disclosures or (),
                      synthetic={task: load_settings(path) for task, path in synthetic.items()} if synthetic else None)
    results = run_study(cfg, out=out)
    flagged = sum(v["collapse"] for r in results["regimes"].values() for p in r["pairs"].values()
                  for v in p["tasks"].values())
    print(f"wrote {Path(out) / 'study.json'}, {Path(out) / 'study.md'}, {len(results.get('lambda_paths', {}))} "
          f"λ-path plots and {len(results['heatmaps'])} heatmaps; {flagged} (pair, task, regime) rows flagged as "
          "collapsed")


def ablate(*, config: AblationConfig = AblationConfig(), out: str = "runs/ablation") -> None:
    """Vary each factor of the alignment recipe alone from a base recipe; mapped accuracy, macro-F1, the
    majority-class rate, the top-prediction share and a collapse flag, drop from native, alignment and OOD AUROC
    per setting. Writes ablation.json, ablation.md and ablation.png.

    Its options are the fields of `AblationConfig` (--source, --task, --base.mix, --sizes '[1000,4000]', ...,
    --accelerator, --threads), as in configs/ablation/collapse.yaml.

    Args:
        config: the pair, the task, the base recipe and the values each factor takes.
        out: output directory.
    """
    from lightning_modules.experiments.ablation import run_ablation

    quiet()

    def progress(row: dict) -> None:
        text = (f"{row['mapped']['accuracy']:.3f} (drop {row['mapped_drop']:+.3f}, macro-F1 "
                f"{row['mapped']['macro_f1']:.3f}{', COLLAPSE' if row['collapse'] else ''})" if row["status"] == "ok"
                else f"skipped: {row['reason']}")
        print(f"{row['factor']:<12} {row['value']:<45} {text}", file=sys.stderr)

    results = run_ablation(config, out=out, progress=progress)
    print(f"wrote {', '.join(results['files'])}")

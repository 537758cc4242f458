"""Out-of-distribution detection on target states, native and mapped across models (`xsilo evaluate_ood`).

The detectors, their metrics and thresholds are `ood_detectors`'; the detector chosen for a deployment and the
state-detector file a client loads are `ood_select`'s.

`evaluate_ood` fits the source→target aligner on the public set and the target head on the
task, fits the detectors on the target's ID train states, and scores the task's test split
against each OOD set twice: with native target states and with mapped source states
(source → aligner → target space, logits through the target head). Metrics treat OOD as the
positive class. Thresholds are calibrated on ID validation states at 95% TPR; the logit ones
(computable by a client from decrypted logits) go into the export manifest.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from datamodules.cache import StateCache, atomic_write_bytes, atomic_write_json
from datamodules.encoder import clear_loaded_models
from datamodules.extraction import ResolvedExtraction, cache_hit, extract, resolve
from datamodules.states import LabelledStatesDataModule
from lightning_modules.evaluation.evaluate import (PairConfig, check_no_heldout, classification_scores, extraction_spec,
                                                   fit_aligner, fit_classifier, prepare_states, public_datamodule,
                                                   publish, split_rows, task_datamodule)
from lightning_modules.evaluation.ood_detectors import (DETECTORS, Detector, OODError,
                                                        calibrate_threshold, detection_metrics, flagged,
                                                        make_detectors, roc_points)
from lightning_modules.evaluation.ood_select import (FUSED_CANDIDATES, LOGIT_CANDIDATES, fit_source_detectors,
                                                     save_state_detector, select_detector)
from lightning_modules.settings import DeviceSettings, seed_all
from serve.formats.digests import sha256_file
from serve.ood_client import LOGIT_DETECTORS

VIEWS = ("native", "mapped")


# --- evaluation -------------------------------------------------------------------------

@dataclass
class OODConfig(PairConfig):
    """A PairConfig plus the OOD sets and detector settings."""

    ood: Sequence[str] = ()
    ood_limit: int | None = 500
    knn_k: int = 50
    mahalanobis_shrinkage: float = 1e-2
    threshold_tpr: float = 0.95
    export_detector: str = "auto"

    def validate(self) -> None:
        if not self.ood:
            raise OODError("pass at least one OOD dataset (--ood '[vader-tweets,trec]')")
        if self.task in self.ood:
            raise OODError(f"the OOD sets include the in-distribution task {self.task!r}; drop it from --ood")
        if self.export_detector not in ("auto", *LOGIT_DETECTORS):
            raise OODError(f"export_detector must be auto or a logit detector {LOGIT_DETECTORS} (a client computes "
                           f"it from decrypted logits), got {self.export_detector!r}")
        if not 0 < self.threshold_tpr < 1:
            raise OODError(f"threshold_tpr must be in (0, 1), got {self.threshold_tpr}")


def ood_job(task_job: ResolvedExtraction, data: str, limit: int | None) -> ResolvedExtraction:
    """An OOD set extracted like the task: same model, pooling, layer, length and dtype (its own text column)."""
    return resolve(dataclasses.replace(task_job.config, data=data, limit=limit, text_column=None))


def cached_states(job: ResolvedExtraction, device: DeviceSettings) -> Tensor:
    if not cache_hit(job.directory):
        extract(job.config, **device.extraction_kwargs())
    return torch.from_numpy(StateCache(job.directory).all())


def load_ood_sets(cfg: OODConfig, task: dict[str, LabelledStatesDataModule]
                  ) -> tuple[dict[str, dict[str, Tensor]], dict[str, int]]:
    """OOD states per set and role (target, source), without texts that also occur in the task.

    Every set is checked before any is extracted. The extractions share each model's one load
    (`datamodules.encoder.loaded_model`); the models are freed once every set is extracted.
    """
    id_texts = set(task["target"].job.texts)
    jobs, novel = {}, {}
    for name in cfg.ood:
        jobs[name] = {role: ood_job(dm.job, name, cfg.ood_limit) for role, dm in task.items()}
        novel[name] = torch.tensor([t not in id_texts for t in jobs[name]["target"].texts])
        if not novel[name].any():
            raise OODError(f"every text of OOD set {name!r} is also in the task {cfg.task!r}: it is not "
                           "out-of-distribution; choose a different OOD dataset")
    try:
        states = {name: {role: cached_states(job, cfg.device)[novel[name]] for role, job in roles.items()}
                  for name, roles in jobs.items()}
    finally:
        clear_loaded_models()
    return states, {name: int((~mask).sum()) for name, mask in novel.items()}


def split_ood(ood: dict[str, dict[str, Tensor]], seed: int
              ) -> tuple[dict[str, dict[str, Tensor]], dict[str, dict[str, Tensor]]]:
    """Seeded halves of every OOD set: validation (chooses the detector) and test (is reported)."""
    val, test = {}, {}
    for name, roles in ood.items():
        n = len(roles["target"])
        if n < 2:
            raise OODError(f"OOD set {name!r} has {n} new row(s); it needs at least 2 (one to choose a detector "
                           "on, one to test it): raise --ood_limit or choose a larger set")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        cut = n // 2
        val[name] = {role: h[order[:cut].sort().values] for role, h in roles.items()}
        test[name] = {role: h[order[cut:].sort().values] for role, h in roles.items()}
    return val, test


def task_states(task: dict[str, LabelledStatesDataModule], split: str) -> tuple[dict[str, Tensor], Tensor]:
    """{role: states} of one task split and its labels; source and target rows are the same texts."""
    rows = {}
    for role, dm in task.items():
        dm.setup("test")
        rows[role] = split_rows(dm, split)
    if not torch.equal(rows["source"][1], rows["target"][1]):
        raise RuntimeError("source and target task rows differ; both must come from the same task split")
    return {role: h for role, (h, _) in rows.items()}, rows["target"][1]


@dataclass
class ViewScores:
    """One view's (native or mapped) thresholds, ID accuracy and scores per detector."""

    thresholds: dict[str, float]
    accuracy: dict[str, float]
    id_test: dict[str, Tensor]
    ood: dict[str, dict[str, Tensor]]  # OOD set → detector → scores


def score_view(features: Callable[[dict[str, Tensor]], Tensor], detectors: dict[str, Detector],
               head: torch.nn.Module, val: dict[str, Tensor], test: dict[str, Tensor], labels: Tensor,
               ood: dict[str, dict[str, Tensor]], tpr: float) -> ViewScores:
    """Score ID validation (→ thresholds), ID test and the OOD sets through `features` (a view)."""
    def scores(h: Tensor) -> dict[str, Tensor]:
        logits = head(h)
        return {n: d.score(logits if d.input == "logits" else h) for n, d in detectors.items()}

    thresholds = {n: calibrate_threshold(s, tpr) for n, s in scores(features(val)).items()}
    h_test = features(test)
    accuracy = classification_scores(head(h_test), labels, head.hparams.output_dim)
    return ViewScores(thresholds, accuracy, scores(h_test), {n: scores(features(s)) for n, s in ood.items()})


def evaluate_ood(cfg: OODConfig, out: str | Path | None = None) -> dict[str, Any]:
    """Detector × {native, mapped} metrics for each OOD set; writes ood.json, ood.md, the
    checkpoints and ood-threshold.json (for `xsilo export --ood`) into `out`, and client-ood.npz when the
    detector chosen for a fused deployment runs on the client's own states."""
    cfg.validate()
    cfg.device.apply_threads()
    seed_all(cfg.seed)
    public = public_datamodule(cfg, cfg.source, cfg.target, leave_out=cfg.ood)  # no OOD text in the public set
    task = {role: task_datamodule(cfg, model, cfg.task) for role, model in (("target", cfg.target), ("source", cfg.source))}
    check_no_heldout(cfg, public, task["target"])
    prepare_states(cfg.device, public, *task.values())
    ood, dropped = load_ood_sets(cfg, task)
    ood_val, ood = split_ood(ood, cfg.seed)

    work = Path(tempfile.mkdtemp(prefix="xsilo-ood-"))
    try:
        aligner, aligner_trainer = fit_aligner(public, cfg.fit, cfg.device)
        aligner_trainer.save_checkpoint(work / "aligner.ckpt")
        head, head_ckpt = fit_classifier(task["target"], cfg.head, cfg.device, cfg.seed, work / "target")
        for dm in task.values():
            dm.setup("fit")
        h_train, y_train = split_rows(task["target"], "train")
        h_source_train, _ = split_rows(task["source"], "train")
        (val, _), (test, labels) = task_states(task, "val"), task_states(task, "test")
        views = {"native": lambda states: states["target"], "mapped": lambda states: aligner(states["source"])}
        with torch.no_grad():
            detectors = make_detectors(cfg.knn_k, cfg.mahalanobis_shrinkage)
            for d in detectors.values():
                d.fit(head(h_train) if d.input == "logits" else h_train, y_train)
            scored = {view: score_view(features, detectors, head, val, test, labels, ood, cfg.threshold_tpr)
                      for view, features in views.items()}
            # What a fused-mode client can run: its decrypted logits, or its own source states (class
            # means from the labels the service returns for its training texts).
            served_labels = head(aligner(h_source_train)).argmax(1)
            state_detectors = fit_source_detectors(h_source_train, served_labels, cfg.knn_k,
                                                   cfg.mahalanobis_shrinkage)

            def candidate(name: str, states: dict[str, Tensor]) -> Tensor:
                if name in state_detectors:
                    return state_detectors[name].score(states["source"])
                return detectors[name.split("@")[0]].score(head(aligner(states["source"])))

            selection = select_detector(
                {name: {"id_val": candidate(name, val), "id_test": candidate(name, test),
                        "ood_val": {o: candidate(name, s) for o, s in ood_val.items()},
                        "ood_test": {o: candidate(name, s) for o, s in ood.items()}}
                 for name in FUSED_CANDIDATES}, cfg.threshold_tpr)

        per_set = {name: {det: {view: {**detection_metrics(v.id_test[det], v.ood[name][det]),
                                       "ood_flagged": flagged(v.ood[name][det], v.thresholds[det])}
                                for view, v in scored.items()} for det in DETECTORS} for name in ood}
        for metrics in per_set.values():
            for m in metrics.values():
                m["auroc_drop"] = m["native"]["auroc"] - m["mapped"]["auroc"]
        mapped = scored["mapped"].thresholds
        logit_choice = cfg.export_detector
        if logit_choice == "auto":  # the best detector on decrypted logits, by validation AUROC
            logit_choice = max(LOGIT_CANDIDATES, key=lambda n: selection["candidates"][n]["val_auroc_mean"])
            logit_choice = logit_choice.split("@")[0]
        chosen = selection["chosen"]
        client_file = "client-ood.npz" if chosen in state_detectors else None
        export_ood = {"detector": logit_choice, "threshold": mapped[logit_choice],
                      "tpr": cfg.threshold_tpr, "all": {n: mapped[n] for n in LOGIT_DETECTORS},
                      "calibrated_on": f"{cfg.task} validation rows mapped {cfg.source} -> {cfg.target} head",
                      "selection": {"chosen": chosen, "reason": selection["reason"], "state_detector": client_file,
                                    "val_auroc_mean": {n: c["val_auroc_mean"]
                                                       for n, c in selection["candidates"].items()}},
                      "checkpoints": {"aligner": sha256_file(work / "aligner.ckpt"), "classifier": sha256_file(head_ckpt)}}
        results = {
            "config": {**asdict(cfg), "ood": list(cfg.ood)},
            "seed": cfg.seed,
            "extraction": extraction_spec(public=public, task_target=task["target"], task_source=task["source"]),
            "pair": f"{cfg.source} -> {cfg.target}",
            "task": cfg.task,
            "positive_class": "ood",
            "score_orientation": "higher = more out-of-distribution",
            "detectors_fitted_on": "native target states of the task's train split",
            "rows": {"task_train": len(y_train), "task_val": len(val["target"]),
                     "task_test": len(labels), "ood": {n: len(s["target"]) for n, s in ood.items()},
                     "ood_val": {n: len(s["target"]) for n, s in ood_val.items()},
                     "ood_dropped_as_task_texts": dropped},
            "accuracy": {view: v.accuracy for view, v in scored.items()},
            "thresholds": {view: v.thresholds for view, v in scored.items()},
            "id_test_flagged": {view: {det: flagged(v.id_test[det], v.thresholds[det]) for det in DETECTORS}
                                for view, v in scored.items()},
            "ood": per_set,
            "roc": {name: {det: {view: roc_points(v.id_test[det], v.ood[name][det]) for view, v in scored.items()}
                           for det in DETECTORS} for name in ood},
            "deployable": selection,
            "export_ood": export_ood,
        }
        if out is not None:
            out = Path(out)
            out.mkdir(parents=True, exist_ok=True)
            publish(work / "aligner.ckpt", out / "aligner.ckpt")
            publish(head_ckpt, out / "classifier-target.ckpt")
            atomic_write_json(out / "ood-threshold.json", export_ood)
            if client_file:
                save_state_detector(out / client_file, chosen, state_detectors[chosen],
                                    selection["candidates"][chosen]["threshold"], task["source"].job.spec())
            atomic_write_json(out / "ood.json", results)
            atomic_write_bytes(out / "ood.md", markdown_report(results).encode())
        return results
    finally:
        shutil.rmtree(work, ignore_errors=True)


def markdown_report(results: dict[str, Any]) -> str:
    r, acc, thr, flagged = results["rows"], results["accuracy"], results["thresholds"], results["id_test_flagged"]
    tpr = results["config"]["threshold_tpr"]
    lines = [
        f"## OOD detection: {results['pair']}, in-distribution {results['task']}",
        "",
        f"OOD is the positive class; scores are higher for more OOD inputs. Detectors are fitted on "
        f"{r['task_train']} native target train rows; ID is scored on {r['task_test']} test rows. Thresholds "
        f"keep {tpr:.0%} of {r['task_val']} ID validation rows at or below them. "
        f"Target head accuracy on ID test: native {acc['native']['accuracy']:.3f}, "
        f"mapped {acc['mapped']['accuracy']:.3f}.",
        "",
        "| detector | threshold native | threshold mapped | ID test flagged native | ID test flagged mapped |",
        "|---|---|---|---|---|",
        *(f"| {d} | {thr['native'][d]:.4g} | {thr['mapped'][d]:.4g} | {flagged['native'][d]:.3f} | "
          f"{flagged['mapped'][d]:.3f} |" for d in DETECTORS),
    ]
    if "deployable" in results:
        sel = results["deployable"]
        sets = list(results["ood"])
        lines += ["", "### The detector a fused-mode client can run (chosen by validation AUROC)", "",
                  f"Chosen: **{sel['chosen']}**. {sel['reason']}.", "",
                  "| candidate | val AUROC (mean) | " + " | ".join(f"test AUROC {n}" for n in sets)
                  + " | ID test flagged |", "|---|---|" + "---|" * len(sets) + "---|"]
        for cand, c in sorted(sel["candidates"].items(), key=lambda kv: -kv[1]["val_auroc_mean"]):
            lines.append(f"| {cand} | {c['val_auroc_mean']:.3f} | "
                         + " | ".join(f"{c['test'][n]['auroc']:.3f}" for n in sets) + f" | {c['id_test_flagged']:.3f} |")
    for name, metrics in results["ood"].items():
        dropped = r["ood_dropped_as_task_texts"][name]
        lines += [
            "",
            f"### {name}: {r['ood'][name]} rows" + (f" ({dropped} task texts dropped)" if dropped else ""),
            "",
            "| detector | AUROC native | AUROC mapped | AUROC drop | FPR@95TPR native | FPR@95TPR mapped "
            "| AUPR native | AUPR mapped | OOD flagged native | OOD flagged mapped |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for det, m in metrics.items():
            n, p = m["native"], m["mapped"]
            lines.append(f"| {det} | {n['auroc']:.3f} | {p['auroc']:.3f} | {m['auroc_drop']:+.3f} | "
                         f"{n['fpr_at_95tpr']:.3f} | {p['fpr_at_95tpr']:.3f} | {n['aupr']:.3f} | {p['aupr']:.3f} | "
                         f"{n['ood_flagged']:.3f} | {p['ood_flagged']:.3f} |")
    return "\n".join(lines) + "\n"

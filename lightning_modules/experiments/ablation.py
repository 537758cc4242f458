"""One-factor-at-a-time ablation of the alignment recipe on one model pair and one task.

From a base recipe (public-set mix and size, pooling and layer, standardisation, estimator and ridge λ, the
λ criterion, target whitening, gradient fine-tuning of the map) each factor is varied on its own; every setting
reports mapped accuracy through the target's head with its bootstrap interval, macro-F1, the majority-class
rate and the share of the most-predicted class, a collapse flag (`study_report.collapse`: predictions concentrated on
one class, or mapped macro-F1 < 0.8 × native), the drop from native (paired interval), a null map, alignment on
held-out public rows and on the task's test texts (source and target states of the same texts), and with OOD
sets the mapped AUROC of one detector and its drop from native.

The factors against collapse on an out-of-domain public set:
* `mix` takes the named mix "broad": every unlabelled registry source but the task (and the OOD sets) in equal
  weights, every text of the task removed (the leave-task-out regime).
* `estimator` adds reduced-rank ridge and CCA at `ranks` ("k-1": the task's classes minus one).
* `whiten_target` solves in whitened target coordinates. For unconstrained ridge/least squares this is a no-op
  (output equivariance: the same predictions), so the factor pairs it with the constrained estimators too.
* `criterion` chooses λ by gcv, val_mse or head (logit MSE through the target's head on held-out public rows).
* `recenter` tests the mean-shift hypothesis of collapse: the map's bias is shifted so the mapped task-train
  states have the target's own task-train mean (in a two-party deployment the provider must publish that mean).
* The head-aware map is criterion "head" plus `finetune` "task" (gradient steps from the closed form on the KL
  divergence of the frozen target head's softmax on mapped states from its softmax on the true target states:
  distillation on the public rows, no task labels). For an unconstrained affine map a head-weighted squared loss
  ||H(Wx + b) - Hy||² has the plain least-squares map among its minimisers (the same logits: least squares is
  equivariant under the output map H), and ridge fitted straight onto the logits Hy gives H times the plain
  ridge map; only the penalty's weighting of output directions can tell them apart. So head-awareness acts
  through λ (criterion head), a rank constraint, or a non-squared task loss, not through a weighted MSE.

Closed-form settings are solved from the public set's sufficient statistics with `solvers.solve` (λ path from
one eigh); settings with fine-tuning go through `AffineAligner` and Lightning.

Public sets come from `build_public_set` (the task's validation and test texts are always excluded, and
so are those of `exclude_tasks`; OOD sets are excluded entirely) and their states from `prefill_states`:
rows already cached for the same texts are reused, and a setting that needs more new forward passes than
`max_extract` per (model, dataset) is reported as skipped instead of run. The (model, task, view)
classifiers and detectors are fitted once (the study's `Study.native`) and read by every setting.
The base recipe's defaults are `FitSettings`' and `ExtractionSettings`' (lightning_modules/settings.py).
Outputs: ablation.json, ablation.md and ablation.png.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from datamodules.cache import atomic_write_bytes, atomic_write_json
from datamodules.extraction import ExtractionConfig, resolve
from datamodules.forward import extract_views
from datamodules.prefill import ExtractionBudgetError, cached_texts, prefill_states
from datamodules.public_set import build_public_set, read_manifest
from datamodules.registry import AssetError
from datamodules.states import PairedStatesDataModule
from datamodules.text import load_texts
from lightning_modules.evaluation.evaluate import lambda_path_report, path_accuracy, split_rows, task_datamodule
from lightning_modules.evaluation.metrics import alignment_report
from lightning_modules.experiments.ablation_adaptation import published_task, synthetic_anchors
from lightning_modules.experiments.ablation_config import BROAD, CLASSES_MINUS_ONE, LAMBDA_ESTIMATORS, AblationConfig
from lightning_modules.experiments.ablation_report import markdown_report, plot
from lightning_modules.experiments.ablation_settings import Setting, ablation_settings, broad_mix
from lightning_modules.experiments.study import Native, Study, StudyConfig
from lightning_modules.experiments.study_report import collapse
from lightning_modules.fitting.affine_map import AffineMap
from lightning_modules.fitting.estimators import path_factors
from lightning_modules.fitting.prior_matching import adapt_to_priors
from lightning_modules.fitting.solvers import fit_affine, solve
from lightning_modules.fitting.stats import SufficientStats
from lightning_modules.fitting.subspace import SubspaceError
from lightning_modules.models.aligner import AffineAligner
from lightning_modules.settings import ExtractionSettings, Recipe, build_trainer, seed_all

class Ablation:
    """Runs the settings; natives (head + detector per model, task and view) and public sets are reused."""

    def __init__(self, cfg: AblationConfig, work: Path):
        self.cfg, self.work = cfg, work
        self.studies: dict[tuple, Study] = {}
        self.natives: dict[tuple, tuple[Native, dict[str, Any], Path]] = {}
        self.public: dict[tuple, Path] = {}
        self.done: dict[tuple, dict[str, Any]] = {}
        self.train: dict[tuple, torch.Tensor] = {}
        self.fits = {"classifiers": 0, "aligners": 0, "public_sets": 0, "forward_passes": 0}
        self.ci = dict(n_resamples=cfg.bootstrap, seed=cfg.seed, confidence=cfg.confidence)

    # -- settings ------------------------------------------------------------------------------

    def settings(self) -> list[Setting]:
        return ablation_settings(self.cfg, self.ranks)

    def ranks(self) -> list[int]:
        """The rank factor's values, "k-1" resolved to the task's number of classes minus one (at least 1)."""
        if not hasattr(self, "_ranks"):
            cfg = self.cfg
            ranks = [r for r in cfg.ranks if r != CLASSES_MINUS_ONE]
            if CLASSES_MINUS_ONE in cfg.ranks:
                view = replace(cfg.extraction, pooling=cfg.base.pooling, layer=cfg.base.layer)
                labels = resolve(self.extraction_config(view, cfg.target, cfg.task, cfg.task_limit, "task")).labels
                k = len(set(labels or ()))
                ranks.insert(list(cfg.ranks).index(CLASSES_MINUS_ONE), max(k - 1, 1))
            self._ranks = list(dict.fromkeys(ranks))
        return self._ranks

    # -- reused pieces ---------------------------------------------------------------------------

    def public_set(self, recipe: Recipe, views: bool = False) -> Path:
        """The public set for a (mix, size, seed): the task's held-out texts and the OOD sets never in it; rows
        with cached states of the base view drawn first. For the view factor (`views`), texts of the task sample
        it uses (whose states every view needs anyway) are drawn first instead of the task's other cached texts."""
        cfg = self.cfg
        key = (recipe.mix, recipe.size, recipe.public_seed, views)
        mix, leave_out = recipe.mix, list(cfg.ood)
        if mix == BROAD:
            mix, leave_out = broad_mix(cfg.task, cfg.ood), [*leave_out, cfg.task]
        if key not in self.public:
            prefer = self._cached_texts()
            if views:
                limit = cfg.view_task_limit if cfg.view_task_limit is not None else cfg.task_limit
                task_texts = set(load_texts(cfg.task, limit=None)["text"])
                prefer = (prefer - task_texts) | set(load_texts(cfg.task, limit=limit)["text"])
            tasks = list(dict.fromkeys([cfg.task_spec(cfg.task_limit), *cfg.exclude_tasks]))
            if cfg.view_task_limit is not None:
                tasks.append(cfg.task_spec(cfg.view_task_limit))
            self.public[key] = build_public_set(
                mix=mix, size=recipe.size, exclude_tasks=tasks,
                exclude_datasets=leave_out,
                seed=recipe.public_seed, prefer=prefer, out=None)
            self.fits["public_sets"] += 1
        return self.public[key]

    def _cached_texts(self) -> set[str]:
        if not hasattr(self, "_cached"):
            base = self.cfg.base
            self._cached = cached_texts([self.cfg.source, self.cfg.target], base.pooling, base.layer,
                                        self.cfg.extraction.max_length)
        return self._cached

    def prefill(self, config: ExtractionConfig) -> None:
        result = prefill_states(config, max_extract=self.cfg.max_extract, threads=self.cfg.device.threads)
        self.fits["forward_passes"] += result.extracted

    def layer(self, model: str, recipe: Recipe, role: str) -> int:
        return recipe.target_layer if role == "target" and recipe.target_layer is not None else recipe.layer

    def native(self, role: str, recipe: Recipe, task_limit: int | None) -> tuple[Native, dict[str, Any], Path]:
        """The (model, task, view) head and detector, fitted once; also its checkpoint (for task fine-tuning)."""
        cfg = self.cfg
        model = cfg.source if role == "source" else cfg.target
        layer = self.layer(model, recipe, role)
        key = (model, recipe.pooling, layer, task_limit)
        if key in self.natives:
            return self.natives[key]
        base_view = (recipe.pooling, layer) == (cfg.base.pooling, self.layer(model, cfg.base, role))
        view = replace(cfg.extraction, pooling=recipe.pooling, layer=layer)
        self.prefill(self.extraction_config(view, model, cfg.task, task_limit, "task"))
        with_ood = base_view or cfg.view_ood
        for name in (cfg.ood if with_ood else ()):
            self.prefill(self.extraction_config(view, model, name, cfg.ood_limit, "ood"))
        skey = key[1:]
        if skey not in self.studies:
            scfg = StudyConfig(models=[cfg.source, cfg.target], tasks=[cfg.task], task_limit=task_limit,
                               ood=list(cfg.ood) if with_ood else [], ood_limit=cfg.ood_limit,
                               ood_detector=cfg.ood_detector, bootstrap=cfg.bootstrap, confidence=cfg.confidence,
                               extraction=view, head=cfg.head, device=cfg.device, seed=cfg.seed)
            self.studies[skey] = Study(scfg, self.work / f"view-{len(self.studies)}")
        native, result = self.studies[skey].native(model, cfg.task)
        self.fits["classifiers"] += 1
        self.natives[key] = (native, result, native.checkpoint)
        return self.natives[key]

    @staticmethod
    def extraction_config(view: ExtractionSettings, model: str, data: str, limit: int | None,
                          role: Literal["task", "ood", "public"]) -> ExtractionConfig:
        """One (model, dataset) extraction of a view: the settings' pooling, layer, length and dtype; the
        settings' columns for the task only (an OOD set keeps its own, a public set has no labels)."""
        columns = {"task": dict(text_column=view.text_column, label_column=view.label_column),
                   "ood": {}, "public": dict(label_column=None)}[role]
        return ExtractionConfig(model=model, data=data, limit=limit, pooling=view.pooling, layer=view.layer,
                                max_length=view.max_length, dtype=view.dtype, batch_size=view.batch_size, **columns)

    def extract_views(self, settings: list[Setting]) -> None:
        """Every view the settings need that no cache holds, for all views at once: one forward pass per text."""
        cfg = self.cfg
        task_columns = (cfg.extraction.text_column, cfg.extraction.label_column)
        wanted: dict[tuple, set] = {}
        for s in settings:
            for role, model in (("source", cfg.source), ("target", cfg.target)):
                view = (s.recipe.pooling, self.layer(model, s.recipe, role))
                wanted.setdefault((model, cfg.task, s.task_limit, task_columns), set()).add(view)
                for name in (cfg.ood if cfg.view_ood else ()):
                    wanted.setdefault((model, name, cfg.ood_limit, (None, "label")), set()).add(view)
                try:
                    path = self.public_set(s.recipe, views=True)
                except AssetError:
                    continue
                wanted.setdefault((model, str(path), None, (None, None)), set()).add(view)
        for (model, data, limit, (text_column, label_column)), views in wanted.items():
            if len(views) > 1:
                self.fits["forward_passes"] += extract_views(
                    model, data, sorted(views, key=str), limit=limit, text_column=text_column,
                    label_column=label_column,
                    max_length=cfg.extraction.max_length, dtype=cfg.extraction.dtype,
                    batch_size=cfg.extraction.batch_size, threads=cfg.device.threads, max_extract=cfg.max_extract)

    # -- one setting -----------------------------------------------------------------------------

    def fit(self, public: PairedStatesDataModule, recipe: Recipe, src: Native, tgt: Native, head_checkpoint: Path
            ) -> tuple[AffineMap, AffineMap, float | None, dict[str, Any], int | None]:
        """(map, null map, chosen λ or None, the λ path's criteria and scores, fine-tuning epochs run).

        Closed form: `solve` on the public set's train rows, λ chosen by the recipe's criterion (head: logit MSE
        through the target head on the held-out public rows); for ridge the path also records the mapped test
        scores at every λ (`path_accuracy`: whether any λ would have avoided collapse). Fine-tuning:
        `AffineAligner` through Lightning. The null map is the same estimator at the same λ (and rank) on
        shuffled train pairs."""
        cfg = self.cfg
        public.setup("fit")
        x, y = (t.double() for t in split_rows(public, "train"))
        lam, epochs = None, None
        if recipe.finetune is None:
            train = SufficientStats.zeros(x.shape[1], y.shape[1]).update(x, y)
            val = head = head_val = None
            if "val" in public.splits:
                x_val, y_val = (t.double() for t in split_rows(public, "val"))
                head = tgt.head.affine_map
                val = SufficientStats.zeros(x.shape[1], y.shape[1], full_yty=False).update(x_val, y_val)
                head_val = SufficientStats.zeros(x.shape[1], head.d_y, full_yty=False).update(x_val, head(y_val))
            lambdas = [recipe.lam] if recipe.lam is not None else list(cfg.fit.lambdas)
            amap, lam, path = solve(train, val, estimator=recipe.estimator, lambdas=lambdas, center=True,
                                    standardize=recipe.standardize, criterion=recipe.criterion, head=head,
                                    head_val=head_val, rank=recipe.rank, whiten_target=recipe.whiten_target)
            lambda_path = path.as_dict()
            if recipe.estimator == "ridge" and head is not None:
                points = path_accuracy(path_factors(train, True, recipe.standardize), head, src.test, tgt.labels,
                                       head.d_y, lambdas)
                lambda_path = lambda_path_report(path, points)
        else:
            aligner = self.fit_map(public, recipe, head_checkpoint)
            amap, epochs = aligner.affine_map, getattr(aligner, "epochs_run", None)
            if recipe.estimator in LAMBDA_ESTIMATORS and not math.isnan(float(aligner.chosen_lambda)):
                lam = float(aligner.chosen_lambda)
            lp = getattr(aligner, "lambda_path", {})
            lambda_path = lp.as_dict() if hasattr(lp, "as_dict") else {str(k): v for k, v in lp.items()}
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(cfg.seed + 1))
        shuffled = SufficientStats.zeros(x.shape[1], y.shape[1]).update(x, y[perm])
        null = fit_affine(shuffled, recipe.estimator, lam=0.0 if lam is None else lam, center=True,
                          standardize=recipe.standardize, rank=recipe.rank, whiten_target=recipe.whiten_target)
        return amap.to(dtype=torch.float64), null, lam, lambda_path, epochs

    def train_states(self, role: str, recipe: Recipe, task_limit: int | None) -> torch.Tensor:
        """A model's task-train states of a view (a cache read: the native head was fitted on them)."""
        cfg = self.cfg
        model = cfg.source if role == "source" else cfg.target
        layer = self.layer(model, recipe, role)
        key = (model, recipe.pooling, layer, task_limit)
        if key not in self.train:
            study = self.studies[(recipe.pooling, layer, task_limit)]
            dm = task_datamodule(study.cfg.pair(model, model, cfg.task), model, cfg.task)
            dm.prepare_data()
            dm.setup("fit")
            self.train[key] = split_rows(dm, "train")[0].double()
        return self.train[key]

    def adapted(self, public: PairedStatesDataModule, recipe: Recipe, task_limit: int | None,
                lam: float, head: AffineMap) -> tuple[AffineMap, dict[str, Any]]:
        """The ridge map adapted, as `xsilo align --private` adapts it, to the source's unlabelled task-train states
        (labels never read) through the target's task statistics, with `cfg.synthetic`'s anchors when set, and
        matched to the task's priors through the target's `head`; (the map, the adaptation record)."""
        cfg = self.cfg
        x, y = (t.double() for t in split_rows(public, "train"))
        train = SufficientStats.zeros(x.shape[1], y.shape[1], full_yty=False).update(x, y)
        fit = replace(cfg.fit, center=True, standardize=recipe.standardize)
        layers = (self.layer(cfg.source, recipe, "source"), self.layer(cfg.target, recipe, "target"))
        task = published_task(self.studies[(recipe.pooling, layers[1], task_limit)], cfg.target, cfg.task)
        result = adapt_to_priors(train, self.train_states("source", recipe, task_limit), task, lam, fit,
                                 recipe.adaptation, head, synthetic_anchors(cfg, recipe.pooling, layers))
        return result.map.to(dtype=torch.float64), result.record

    def recentred(self, amap: AffineMap, recipe: Recipe, task_limit: int | None) -> AffineMap:
        """The map with its bias shifted so the mapped source task-train states have the target's own
        task-train mean (the mean-shift diagnostic of collapse)."""
        shift = self.train_states("target", recipe, task_limit).mean(0) - amap(
            self.train_states("source", recipe, task_limit)).mean(0)
        return AffineMap(amap.weight, amap.bias + shift)

    def fit_map(self, public: PairedStatesDataModule, recipe: Recipe, head_checkpoint: Path) -> AffineAligner:
        cfg = self.cfg
        lambdas = [recipe.lam] if recipe.lam is not None else list(cfg.fit.lambdas)
        # The target head drives criterion auto/head (as in the closed form) and the task loss.
        model = AffineAligner(public.input_dim, public.output_dim, estimator=recipe.estimator, lambdas=lambdas,
                              criterion=recipe.criterion, rank=recipe.rank, center=True,
                              standardize=recipe.standardize, whiten_target=recipe.whiten_target,
                              finetune_loss=recipe.finetune or "mse", classifier=str(head_checkpoint),
                              lr=cfg.finetune_lr)
        seed_all(cfg.seed)
        if recipe.finetune is None:
            build_trainer(cfg.device, max_epochs=1).fit(model, public)
            return model
        root = self.work / f"finetune-{self.fits['aligners']}"
        best = ModelCheckpoint(dirpath=root, monitor="val_loss", mode="min", save_top_k=1)
        trainer = build_trainer(cfg.device, 1 + cfg.finetune_epochs, [EarlyStopping("val_loss", patience=5), best],
                                str(root))
        trainer.fit(model, public)
        tuned = AffineAligner.load_from_checkpoint(best.best_model_path, map_location="cpu").eval()
        tuned.lambda_path = model.lambda_path
        object.__setattr__(tuned, "epochs_run", trainer.current_epoch)
        return tuned

    def run_setting(self, setting: Setting) -> dict[str, Any]:
        cfg, recipe = self.cfg, setting.recipe
        key = (recipe, setting.task_limit, setting.factor == "view")
        if key in self.done:
            return self.done[key]
        t0 = time.perf_counter()
        try:
            path = self.public_set(recipe, views=setting.factor == "view")
            for role, model in (("source", cfg.source), ("target", cfg.target)):
                view = replace(cfg.extraction, pooling=recipe.pooling, layer=self.layer(model, recipe, role))
                self.prefill(self.extraction_config(view, model, str(path), None, "public"))
            src, src_result, _ = self.native("source", recipe, setting.task_limit)
            tgt, tgt_result, tgt_ckpt = self.native("target", recipe, setting.task_limit)
        except ExtractionBudgetError as e:
            result = {"status": "skipped", "reason": f"{e} (max_extract={cfg.max_extract})",
                      "missing_texts": e.missing}
            self.done[key] = result
            return result
        public = PairedStatesDataModule(source=cfg.source, target=cfg.target, data=str(path), limit=None,
                                        source_pooling=recipe.pooling, target_pooling=recipe.pooling,
                                        source_layer=self.layer(cfg.source, recipe, "source"),
                                        target_layer=self.layer(cfg.target, recipe, "target"),
                                        max_length=cfg.extraction.max_length, dtype=cfg.extraction.dtype,
                                        seed=cfg.seed, batch_size=cfg.finetune_batch_size if recipe.finetune else 1024,
                                        extract_batch_size=cfg.extraction.batch_size)
        public.prepare_data()
        try:
            aligner, shuffled, lam, lambda_path, epochs = self.fit(public, recipe, src, tgt, tgt_ckpt)
        except SubspaceError as e:  # e.g. a rank above min(d_x, d_y)
            result = {"status": "skipped", "reason": str(e)}
            self.done[key] = result
            return result
        self.fits["aligners"] += 1
        adaptation = None
        if recipe.adaptation is not None:  # a ridge recipe (AblationConfig.validate)
            aligner, adaptation = self.adapted(public, recipe, setting.task_limit, lam, tgt.head.affine_map)
            shuffled = shuffled.to(dtype=torch.float64)
        if recipe.recenter:
            aligner, shuffled = (self.recentred(m, recipe, setting.task_limit) for m in (aligner, shuffled))
        aligner, shuffled = aligner.to(dtype=src.test.dtype), shuffled.to(dtype=src.test.dtype)
        study = self.studies[(recipe.pooling, self.layer(cfg.target, recipe, "target"), setting.task_limit)]
        with torch.no_grad():
            mapped = study.mapped_views(aligner, shuffled, src, tgt)
            x_val, y_val = split_rows(public, "val")
            on_public = alignment_report(aligner(x_val).double(), y_val.double(), source=x_val.double(), k=10,
                                         seed=cfg.seed)
            on_task = alignment_report(aligner(src.test).double(), tgt.test.double(), source=src.test.double(),
                                       k=10, seed=cfg.seed)
        manifest = read_manifest(path)
        result = {
            "status": "ok",
            "public": {"file": str(path), "rows": manifest["rows"], "mix_actual": manifest["mix_actual"],
                       "train": len(public.splits["train"]), "heldout": len(x_val),
                       "fingerprint": manifest["fingerprint"]},
            "native_target": tgt_result["accuracy"],
            "native_target_ci": tgt_result["accuracy_ci"],
            "native_target_macro_f1": tgt_result["macro_f1"],
            "native_source": src_result["accuracy"],
            "chosen_lambda": lam,
            "lambda_path": lambda_path,
            **mapped,
            "alignment_public": on_public,
            "alignment_task_test": on_task,
            "seconds": time.perf_counter() - t0,
        }
        result["collapse"], result["collapse_reason"] = collapse(mapped["mapped"], tgt_result)
        if adaptation is not None:
            result["adaptation"] = adaptation
        if recipe.finetune:
            result["finetune_epochs_run"] = epochs
        if "ood" in tgt_result and "ood" in mapped:
            for name, values in mapped["ood"].items():
                values["native_auroc"] = tgt_result["ood"][name]["auroc"]
        self.done[key] = result
        return result

    def run(self, progress=None) -> dict[str, Any]:
        cfg = self.cfg
        rows = []
        settings = self.settings()
        try:
            self.extract_views([s for s in settings if s.factor == "view"])
        except ExtractionBudgetError:
            pass  # each view setting then reports itself as skipped
        for setting in settings:
            result = self.run_setting(setting)
            rows.append({"factor": setting.factor, "value": setting.value, "recipe": asdict(setting.recipe),
                         "task_limit": setting.task_limit, **result})
            if progress:
                progress(rows[-1])
        natives = {f"{m} {p or 'default'}@{layer} limit={lim}": {k: v for k, v in r.items()}
                   for (m, p, layer, lim), (_, r, _) in self.natives.items()}
        specs = {f"{key} view {i}": spec for i, study in enumerate(self.studies.values())
                 for key, spec in study.specs.items()}
        return {"config": _jsonable(asdict(cfg)), "seed": cfg.seed, "extraction": specs,
                "pair": f"{cfg.source} -> {cfg.target}", "task": cfg.task,
                "native": natives, "fits": dict(self.fits), "settings": rows}


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def run_ablation(cfg: AblationConfig, out: str | Path | None = None, progress=None) -> dict[str, Any]:
    """The ablation; with `out`, writes ablation.json, ablation.md and ablation.png there."""
    cfg.validate()
    cfg.device.apply_threads()
    seed_all(cfg.seed)
    work = Path(tempfile.mkdtemp(prefix="xsilo-ablation-"))
    try:
        results = Ablation(cfg, work).run(progress)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "ablation.json", results)
        atomic_write_bytes(out / "ablation.md", markdown_report(results).encode())
        plot(results, out / "ablation.png")
        results["files"] = [str(out / f) for f in ("ablation.json", "ablation.md", "ablation.png")]
    return results

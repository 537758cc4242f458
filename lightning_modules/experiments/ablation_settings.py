"""The ablation's settings: the base recipe, then each factor varied on its own (`ablation_settings`), and the
leave-task-out public mix the "broad" mix names (`broad_mix`)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Sequence

from lightning_modules.experiments.ablation_config import RANKED, AblationConfig, parse_view
from lightning_modules.settings import AdaptationSettings, Recipe


def broad_mix(task: str, leave_out: Sequence[str] = ()) -> str:
    """The leave-task-out mix: every registry dataset but `task` and `leave_out` (the OOD sets), equal weights."""
    from datamodules.recipes import leave_task_out_sources  # the study's regime builder's source list

    return ",".join(f"{s}:1" for s in leave_task_out_sources(task, leave_out))


@dataclass
class Setting:
    factor: str
    value: str
    recipe: Recipe
    task_limit: int | None


def ablation_settings(cfg: AblationConfig, ranks: Callable[[], list[int]]) -> list[Setting]:
    """Every setting of the ablation: the base recipe, then each factor of `cfg.factors` varied on its own
    (`ranks()` resolves the rank factor's values, "k-1" from the task's labels)."""
    base = cfg.base
    out = [Setting("base", "base recipe", base, cfg.task_limit)]
    for factor in cfg.factors:
        if factor == "size":
            out += [Setting(factor, "", replace(base, size=s), cfg.task_limit) for s in cfg.sizes]
        elif factor == "mix":
            out += [Setting(factor, "", replace(base, mix=m), cfg.task_limit)
                    for m in (cfg.mixes or cfg.default_mixes())]
        elif factor == "view":
            views = [(base.pooling, base.layer, base.target_layer), *map(parse_view, cfg.views)]
            size = cfg.view_size if cfg.view_size is not None else base.size
            for pooling, layer, target_layer in dict.fromkeys(views):
                out.append(Setting(factor, "", replace(base, pooling=pooling, layer=layer,
                                                       target_layer=target_layer, size=size),
                                   cfg.view_task_limit if cfg.view_task_limit is not None else cfg.task_limit))
        elif factor == "standardize":
            out += [Setting(factor, "", replace(base, standardize=s), cfg.task_limit) for s in (False, True)]
        elif factor == "estimator":
            rows = [replace(base, estimator="ridge", lam=None, rank=None)]
            rows += [replace(base, estimator="ridge", lam=lam, rank=None) for lam in cfg.fit.lambdas]
            for e in cfg.estimators:
                if e in RANKED:
                    rows += [replace(base, estimator=e, lam=None, rank=r) for r in ranks()]
                elif e != "ridge":
                    rows += [replace(base, estimator=e, lam=None, rank=None)]
            out += [Setting(factor, "", r, cfg.task_limit) for r in rows]
        elif factor == "criterion":
            out += [Setting(factor, "", replace(base, criterion=c), cfg.task_limit) for c in cfg.criteria]
        elif factor == "whiten_target":
            for e in cfg.whiten_estimators:
                rank = ranks()[0] if e in RANKED else None
                out += [Setting(factor, "", replace(base, estimator=e, rank=rank, whiten_target=w), cfg.task_limit)
                        for w in (False, True)]
        elif factor == "recenter":
            out += [Setting(factor, "", replace(base, recenter=r), cfg.task_limit) for r in (False, True)]
        elif factor == "finetune":
            out += [Setting(factor, "", replace(base, finetune=f), cfg.task_limit) for f in (None, *cfg.finetune)]
        elif factor == "seed":
            seeds = dict.fromkeys([base.public_seed, *cfg.public_seeds])
            out += [Setting(factor, "", replace(base, public_seed=s), cfg.task_limit) for s in seeds]
        elif factor == "adaptation":
            variants = dict.fromkeys([None, AdaptationSettings(), *cfg.adaptations])
            out += [Setting(factor, "", replace(base, adaptation=a), cfg.task_limit) for a in variants]
    for s in out:
        s.value = s.value or s.recipe.describe(s.factor)
    return out

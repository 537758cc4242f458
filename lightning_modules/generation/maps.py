"""The generation map: fitted on paired per-position states (`lightning_modules.fitting.paired_stats`) with the
aligner's estimators, and stored as a map folder (config.json + model.safetensors, `serve.formats.maps`) with
both causal LMs' specs, checked against both models when it is loaded back."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from datamodules.tokens import CausalLM
from lightning_modules.fitting.affine_map import AffineMap
from lightning_modules.fitting.paired_stats import PairedStats
from lightning_modules.fitting.solvers import fit_affine, solve
from lightning_modules.generation.sampling import GenerationError, check_map
from lightning_modules.settings import DEFAULT_LAMBDAS
from serve.formats.folders import MANIFEST, ExportError
from serve.formats.maps import MAP_CONFIG, MapConfig

MAP_DIR = "map"  # the map folder under `xsilo evaluate_generation --out DIR`


@dataclass(eq=False)
class FittedGenerationMap:
    amap: AffineMap
    null: AffineMap  # the same estimator on shuffled pairs
    lam: float | None
    val_mses: list[float] | None = None


def fit_generation_map(stats: PairedStats, estimator: str = "ridge", lambdas: Sequence[float] = DEFAULT_LAMBDAS,
                       center: bool = True, standardize: bool = False) -> FittedGenerationMap:
    """Ridge picks λ by validation MSE on held-out texts' positions (`solvers.solve`, criterion val_mse: the
    positions of one text are correlated, so GCV's row-wise view would be optimistic); other estimators fit
    train only."""
    if stats.train.count < 2:
        raise GenerationError(f"only {stats.train.count} paired positions to fit on; use more texts or check "
                              "that the two tokenizers share token boundaries (tokenizer_compatibility)")
    if estimator == "ridge":
        if stats.val.count == 0:
            raise GenerationError("ridge needs held-out texts to choose λ; set val_fraction > 0")
        amap, lam, path = solve(stats.train, stats.val, "ridge", lambdas, center, standardize, criterion="val_mse")
        null = fit_affine(stats.null, "ridge", lam=lam, center=center, standardize=standardize)
        return FittedGenerationMap(amap.to(torch.float32), null.to(torch.float32), lam, path.scores["val_mse"])
    amap = fit_affine(stats.train, estimator, center=center, standardize=standardize)
    null = fit_affine(stats.null, estimator, center=center, standardize=standardize)
    return FittedGenerationMap(amap.to(torch.float32), null.to(torch.float32), None)


def save_generation_map(out: str | Path, amap: AffineMap, source: CausalLM, target: CausalLM, max_length: int, *,
                        estimator: str = "ridge", lambdas: Sequence[float] = DEFAULT_LAMBDAS,
                        chosen_lambda: float | None = None, center: bool = True, standardize: bool = False,
                        metrics: dict[str, Any] | None = None) -> Path:
    """Save the map as a map folder (`AffineMap.save_pretrained`), with both models' specs."""
    spec = lambda lm: {**lm.spec(), "max_length": max_length, "pooling": "per-position"}  # noqa: E731
    config = MapConfig(estimator=estimator, lambdas=[float(v) for v in lambdas],
                       chosen_lambda=None if chosen_lambda is None else float(chosen_lambda), center=center,
                       standardize=standardize, source=spec(source), target=spec(target), metrics=metrics or {})
    return amap.save_pretrained(out, config)


def load_generation_map(directory: str | Path, source: CausalLM, target: CausalLM) -> AffineMap:
    """The map of a map folder (DIR, DIR/map or a hub id), checked against both models."""
    directory = Path(directory)
    if (directory / MAP_DIR / MAP_CONFIG).is_file():
        directory = directory / MAP_DIR
    elif (directory / "export" / MANIFEST).is_file() and not (directory / MAP_CONFIG).is_file():
        raise ExportError(f"{directory / 'export'} is a generation map saved by an older xsilo as an export with an "
                          f"identity head; re-run `xsilo evaluate_generation --out {directory}` to save it as a map "
                          "folder")
    amap = AffineMap.from_pretrained(directory)
    for role, lm, spec in (("source", source, amap.config.source), ("target", target, amap.config.target)):
        recorded = spec.get("model_identity")
        if recorded and lm.identity and recorded != lm.identity:
            raise ExportError(f"the map in {directory} was fitted for {role} {spec.get('model')!r}, not {lm.name!r} "
                              f"(model identities differ); fit one with "
                              f"`xsilo evaluate_generation --source {source.name} --target {target.name}`")
    check_map(amap, source, target, f"the map in {directory}")
    return amap

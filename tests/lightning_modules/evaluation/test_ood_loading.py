"""The OOD stage loads each model once per process, however many OOD sets it extracts."""

from __future__ import annotations

from transformers import AutoModel

from datamodules.encoder import clear_loaded_models, loaded_model_keys
from datamodules.cache import StateCache
from datamodules.extraction import ExtractionConfig, extract
from lightning_modules.evaluation.ood import OODConfig, evaluate_ood
from lightning_modules.settings import FitSettings, HeadSettings, PublicSetSettings

from tests.tiny import write_tiny_csv


def test_evaluate_ood_loads_each_model_once_and_frees_them(tiny_models, tmp_path, monkeypatch):
    loads = []
    original = AutoModel.from_pretrained

    def counting(path, *a, **k):
        loads.append(str(path))
        return original(path, *a, **k)

    monkeypatch.setattr(AutoModel, "from_pretrained", counting)
    clear_loaded_models()
    source, target = str(tiny_models["llama"]), str(tiny_models["gpt2"])
    sets = [str(write_tiny_csv(tmp_path / f"ood{i}.csv", n=30, seed=10 + i, n_classes=4)) for i in range(3)]
    cfg = OODConfig(source=source, target=target, task=str(write_tiny_csv(tmp_path / "task.csv", n=120, seed=3)),
                    public=PublicSetSettings(str(write_tiny_csv(tmp_path / "public.csv", n=200, seed=4)), limit=None),
                    head=HeadSettings(epochs=5), fit=FitSettings(lambdas=(1e-1,)), knn_k=5, ood=sets)
    results = evaluate_ood(cfg)
    # public set, task and three OOD sets, for two models: 10 extractions, 2 loads
    assert sorted(loads) == sorted([source, target])
    assert loaded_model_keys() == []  # freed once the OOD sets are extracted
    assert set(results["rows"]["ood"]) == set(sets)

    # The states equal those of a separate process's extraction (nothing kept between runs).
    clear_loaded_models()
    for data in sets:
        for model in (source, target):
            cfg_one = ExtractionConfig(model=model, data=data, limit=cfg.ood_limit, text_column=None)
            hit = extract(cfg_one, progress=False)
            assert hit.hit  # the states evaluate_ood extracted with the shared loads
            shared = StateCache(hit.path).all()
            alone = StateCache(extract(cfg_one, cache_root=tmp_path / "alone", progress=False).path).all()
            clear_loaded_models()
            assert (shared == alone).all()

"""Integration: two parties on real models. The provider (SmolLM2, its own home) exports its public states and a
BBC head and serves them; the client (real MiniLM, another home) runs `xsilo align`. The private map equals the
one-machine lab fit on the same rows, with the same λ and the same mapped accuracy, and neither home holds the
other party's states."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from lightning_modules.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.he, pytest.mark.network]

MAX_LENGTH = "32"


def test_private_fit_on_real_models_equals_the_lab_fit(prepared, tmp_path, monkeypatch):
    from datamodules.assets import model_dir
    from datamodules.cache import StateCache
    from datamodules.extraction import ExtractionConfig, extract, resolve
    from datamodules.states import PairedStatesDataModule
    from datamodules.text import label_names, load_texts
    from serve.formats.splits import stratified_split
    from lightning_modules.models.aligner import AffineAligner
    from lightning_modules.evaluation.evaluate import fit_aligner
    from lightning_modules.settings import DeviceSettings, FitSettings
    from lightning_modules.reporting.two_party_report import isolation
    from serve.formats.exports import load_export
    from serve.harness import ServerThread
    from serve.server import create_app

    # Assets and texts from the real home (prepared there on first use), written as plain files each party reads.
    prepared("minilm", "smollm2", "bbc")
    client_model, provider_model = str(model_dir("minilm")), str(model_dir("smollm2"))
    # One seeded BBC sample: 240 labelled rows are the provider's task, the other 300 (unlabelled) the public set.
    bbc = load_texts("bbc", limit=540)
    names = label_names(bbc)
    public = tmp_path / "public.jsonl"
    public.write_text("".join(json.dumps({"text": t}) + "\n" for t in bbc["text"][240:]))
    task = tmp_path / "bbc.csv"
    with task.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows([t, names[y]] for t, y in zip(bbc["text"][:240], bbc["label"][:240]))

    provider_home, client_home = tmp_path / "provider-home", tmp_path / "client-home"
    monkeypatch.setenv("XSILO_HOME", str(provider_home))
    main(["public-set", "export", "--model", provider_model, "--data", str(public), "--out", str(tmp_path / "pub"),
          "--extraction.max_length", MAX_LENGTH, "--accelerator", "cpu"])
    main(["head", "fit", "--model", provider_model, "--task", str(task), "--out", str(tmp_path / "heads" / "bbc"),
          "--extraction.max_length", MAX_LENGTH, "--head.epochs", "60", "--accelerator", "cpu"])
    monkeypatch.setenv("XSILO_HOME", str(client_home))
    with ServerThread(create_app(heads=[tmp_path / "heads" / "bbc"], public=tmp_path / "pub"),
                      max_lifetime_s=600) as srv:
        main(["align", "--server", srv.url, "--model", client_model, "--out", str(tmp_path / "map"),
              "--extraction.max_length", MAX_LENGTH, "--accelerator", "cpu"])
    assert isolation(provider_home, client_home)[1] == []
    private = AffineAligner.from_pretrained(tmp_path / "map")

    # The lab: one party with both models fits on the same public rows (the provider's home has its states cached).
    monkeypatch.setenv("XSILO_HOME", str(provider_home))
    dm = PairedStatesDataModule(source=client_model, target=provider_model, data=str(public), limit=None,
                                max_length=int(MAX_LENGTH))
    dm.prepare_data()
    lab, _ = fit_aligner(dm, FitSettings(), DeviceSettings("cpu"))
    w_private, w_lab = private.affine_map.weight.double(), lab.affine_map.weight.double()
    assert float((w_private - w_lab).norm() / w_lab.norm()) <= 1e-4
    b_private, b_lab = private.affine_map.bias.double(), lab.affine_map.bias.double()
    assert float((b_private - b_lab).norm() / b_lab.norm()) <= 1e-4
    assert float(private.chosen_lambda) == float(lab.chosen_lambda)
    assert isolation(provider_home, client_home)[1]  # the lab put the client's states in the provider's home

    # The same mapped accuracy through the provider's head on the client's BBC test states.
    job = resolve(ExtractionConfig(model=client_model, data=str(task), max_length=int(MAX_LENGTH)))
    extract(job.config)
    labels = np.asarray(load_texts(str(task))["label"])
    test = stratified_split(labels, 0.15, 0.15, 0)[2]
    h = StateCache(job.directory).rows(test)
    head = load_export(tmp_path / "heads" / "bbc", "head")
    accuracy = {}
    for name, aligner in (("private", private), ("lab", lab)):
        amap = aligner.affine_map
        mapped = h.astype(np.float64) @ amap.weight.double().numpy().T + amap.bias.double().numpy()
        accuracy[name] = float((head(mapped).argmax(1) == labels[test]).mean())
    assert accuracy["private"] == accuracy["lab"]
    assert accuracy["private"] > 1.5 / len(names)  # the map carries the classes, not chance

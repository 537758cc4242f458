"""Every YAML under configs/ parses, and `xsilo fit` runs the configs on tiny models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from datamodules.assets import load_registry
from lightning_modules.aligner import AffineAligner
from lightning_modules.lightning_cli import run_lightning_cli

from conftest import write_tiny_csv

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
BASE = {"trainer": CONFIGS / "trainer/cpu.yaml", "data": CONFIGS / "data/public.yaml",
        "model": CONFIGS / "model/aligner-ridge.yaml"}
FRAGMENTS = sorted(p for concern in ("trainer", "data", "model") for p in (CONFIGS / concern).glob("*.yaml"))


def test_there_are_configs_for_every_concern():
    assert {p.parent.name for p in FRAGMENTS} == {"trainer", "data", "model"}
    assert (CONFIGS / "trainer/ddp.yaml").is_file() and (CONFIGS / "trainer/cpu.yaml").is_file()


@pytest.mark.parametrize("fragment", FRAGMENTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_each_config_parses_with_lightning_cli(fragment, capsys):
    files = {**BASE, fragment.parent.name: fragment}
    if files["model"].name == "classifier.yaml" or files["data"].name.startswith("bbc"):
        files["model"], files["data"] = CONFIGS / "model/classifier.yaml", CONFIGS / "data/bbc-gemma3.yaml"
    args = ["fit"] + [a for f in files.values() for a in ("-c", str(f))] + ["--print_config"]
    with pytest.raises(SystemExit) as exit_info:
        run_lightning_cli(args)
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    own = yaml.safe_load(fragment.read_text())
    for section, values in own.items():
        if isinstance(values, dict) and "class_path" in values:
            assert printed[section]["class_path"] == values["class_path"]


def test_registry_parses():
    assert {a.kind for a in load_registry().values()} == {"model", "dataset"}


def test_fit_aligner_and_classifier_from_configs(tiny_models, tmp_path):
    public = write_tiny_csv(tmp_path / "public.csv", n=64)
    cli = run_lightning_cli([
        "fit", "-c", str(CONFIGS / "trainer/cpu.yaml"), "-c", str(CONFIGS / "data/public.yaml"),
        "-c", str(CONFIGS / "model/aligner-ridge.yaml"),
        "--data.init_args.source", str(tiny_models["llama"]), "--data.init_args.target", str(tiny_models["bert"]),
        "--data.init_args.data", str(public), "--data.init_args.limit", "null",
        "--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false",
    ])
    model = cli.model
    assert isinstance(model, AffineAligner) and bool(model.fitted)
    assert (model.hparams.input_dim, model.hparams.output_dim) == (32, 32)  # linked from the DataModule
    assert model.source_spec["pooling"] == "last" and model.target_spec["pooling"] == "mean"
    ckpt = next((tmp_path / "runs").rglob("*.ckpt"))
    reloaded = AffineAligner.load_from_checkpoint(ckpt)
    torch.testing.assert_close(reloaded.linear.weight, model.linear.weight)
    assert reloaded.source_spec == model.source_spec

    task = write_tiny_csv(tmp_path / "task.csv", n=90)
    cli = run_lightning_cli([
        "fit", "-c", str(CONFIGS / "trainer/cpu.yaml"), "-c", str(CONFIGS / "trainer/classifier.yaml"),
        "-c", str(CONFIGS / "data/bbc-gemma3.yaml"), "-c", str(CONFIGS / "model/classifier.yaml"),
        "--data.init_args.model", str(tiny_models["gpt2"]), "--data.init_args.data", str(task),
        "--trainer.max_epochs", "5", "--trainer.default_root_dir", str(tmp_path / "clf"),
        "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
    ])
    assert cli.model.hparams.output_dim == 3 and cli.model.hparams.label_names == ["c0", "c1", "c2"]
    assert cli.trainer.callback_metrics["val_acc"] >= 0


def test_cli_prints_bad_configuration_as_one_line(tiny_models, tmp_path, capsys):
    from lightning_modules.cli import main

    data = write_tiny_csv(tmp_path / "task.csv", n=60)
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--source", str(tiny_models["llama"]), "--target", str(tiny_models["gpt2"]),
              "--task", str(data), "--public", str(data), "--estimator", "pca", "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error: unknown estimator 'pca'" in err and "Traceback" not in err

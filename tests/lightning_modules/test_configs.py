"""Every YAML under configs/ is instantiated: the LightningCLI fragments (trainer/, data/, model/) each run
`xsilo fit` for a few steps on tiny data from tiny random models; every other config is parsed by the
command that reads it (configs/public/ by `public-set build`, configs/recipe/ by a recipe command)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from datamodules.registry import load_registry
from lightning_modules.models.aligner import AffineAligner
from lightning_modules.cli import main
from lightning_modules.lightning_cli import run_lightning_cli

from tests.tiny import write_tiny_csv

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
LIGHTNING_CONCERNS = ("trainer", "data", "model")
FRAGMENTS = sorted(p for concern in LIGHTNING_CONCERNS for p in (CONFIGS / concern).glob("*.yaml"))
COMMAND_CONFIGS = sorted(p for p in CONFIGS.rglob("*.yaml") if p.parent.name not in LIGHTNING_CONCERNS)
# The commands that read each folder's configs with --config (a recipe may suit only some of them).
CONFIG_COMMANDS = {"public": [["public-set", "build"]],
                   "recipe": [["evaluate"], ["evaluate_ood"], ["evaluate_generation"], ["study"], ["ablate"]],
                   "study": [["study"]], "ablation": [["ablate"]], "synthetic": [["public-set", "synthesize"]]}
# Keys each run overrides to use tiny data; every other key of a fragment must reach the instantiated objects.
TINY_KEYS = {"source", "target", "model", "data", "limit", "devices", "default_root_dir"}
MAX_EPOCHS = 2  # a few steps: the closed form, then one epoch of gradient steps where a config asks for more


def test_there_are_configs_for_every_concern():
    assert {p.parent.name for p in FRAGMENTS} == set(LIGHTNING_CONCERNS)
    assert (CONFIGS / "trainer/ddp.yaml").is_file() and (CONFIGS / "trainer/cpu.yaml").is_file()
    assert {p.relative_to(CONFIGS).parts[0] for p in CONFIGS.rglob("*.yaml")} <= {*LIGHTNING_CONCERNS, *CONFIG_COMMANDS}


def _composition(fragment: Path) -> list[Path]:
    """The fragment with the other concerns' configs it is meant to be composed with."""
    name = f"{fragment.parent.name}/{fragment.name}"
    if name in ("trainer/classifier.yaml", "model/classifier.yaml") or name.startswith("data/bbc"):
        trainer, data, model = ["cpu.yaml", "classifier.yaml"], "bbc-gemma3.yaml", "classifier.yaml"
    elif name in ("trainer/finetune.yaml", "model/aligner-finetune.yaml"):
        trainer, data, model = ["cpu.yaml", "finetune.yaml"], "public.yaml", "aligner-finetune.yaml"
    else:
        trainer, data, model = ["cpu.yaml"], "public.yaml", "aligner-ridge.yaml"
    files = {"trainer": [CONFIGS / "trainer" / t for t in trainer], "data": [CONFIGS / "data" / data],
             "model": [CONFIGS / "model" / model]}
    if fragment.parent.name == "trainer" and fragment.name == "ddp.yaml":
        files["trainer"] = [fragment]  # "on its own"
    elif fragment not in files[fragment.parent.name]:
        files[fragment.parent.name] = [fragment]
    return [p for concern in LIGHTNING_CONCERNS for p in files[concern]]


def _tiny_args(files: list[Path], tiny_models: dict[str, Path], tmp_path: Path) -> list[str]:
    data = yaml.safe_load((next(p for p in files if p.parent.name == "data")).read_text())["data"]
    if data["class_path"].endswith("PairedStatesDataModule"):
        tiny = ["--data.init_args.source", str(tiny_models["llama"]), "--data.init_args.target", str(tiny_models["bert"]),
                "--data.init_args.data", str(write_tiny_csv(tmp_path / "public.csv", n=64)),
                "--data.init_args.limit", "null"]
    else:
        tiny = ["--data.init_args.model", str(tiny_models["gpt2"]),
                "--data.init_args.data", str(write_tiny_csv(tmp_path / "task.csv", n=90))]
    epochs = [t["trainer"]["max_epochs"] for p in files if p.parent.name == "trainer"
              and "max_epochs" in (t := yaml.safe_load(p.read_text()))["trainer"]]
    if epochs and epochs[-1] > MAX_EPOCHS:
        tiny += ["--trainer.max_epochs", str(MAX_EPOCHS)]
    return [*tiny, "--trainer.devices", "1",
            "--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


@pytest.mark.parametrize("fragment", FRAGMENTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_each_lightning_config_runs_a_few_steps(fragment, tiny_models, tmp_path, no_leftover_process_group):
    files = _composition(fragment)
    cli = run_lightning_cli(["fit", *(a for f in files for a in ("-c", str(f))),
                             *_tiny_args(files, tiny_models, tmp_path)])
    own = yaml.safe_load(fragment.read_text())
    section = own[fragment.parent.name]
    if fragment.parent.name == "trainer":
        parsed = cli.config["fit"]["trainer"]
        for key, value in section.items():
            if key == "callbacks":
                kinds = {type(c).__name__ for c in cli.trainer.callbacks}
                assert {c["class_path"].rsplit(".", 1)[1] for c in value} <= kinds
            elif key == "max_epochs":
                assert parsed[key] == min(value, MAX_EPOCHS)
            elif key not in TINY_KEYS:
                assert parsed[key] == value, key
        if section.get("strategy") == "ddp":
            assert type(cli.trainer.strategy).__name__ == "DDPStrategy"
    else:
        built = cli.model if fragment.parent.name == "model" else cli.datamodule
        assert f"{type(built).__module__}.{type(built).__name__}" == section["class_path"]
        for key, value in section.get("init_args", {}).items():
            if key not in TINY_KEYS:
                got = built.hparams[key]
                assert (list(got) if isinstance(value, list) else got) == value, key
    # It ran: the aligner solved its closed form (then fine-tuned), the classifier took optimiser steps.
    model, metrics = cli.model, cli.trainer.callback_metrics
    assert cli.trainer.global_step > 0 and math.isfinite(float(metrics["val_loss"]))
    if isinstance(model, AffineAligner):
        assert bool(model.fitted) and torch.isfinite(model.linear.weight).all()
    else:
        assert 0 <= float(metrics["val_acc"]) <= 1
    assert any((tmp_path / "runs").rglob("*.ckpt"))


def _parsed_by(command: list[str], config: Path, capsys) -> dict | None:
    """The options `command --config CONFIG` parses to, or None when it refuses the file."""
    try:
        main([*command, "--config", str(config), "--print_config"])
    except SystemExit as e:
        if e.code not in (0, None):
            capsys.readouterr()
            return None
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("config", COMMAND_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_each_command_config_parses_with_its_command(config, capsys):
    own = yaml.safe_load(config.read_text())
    parsed = [p for command in CONFIG_COMMANDS[config.parent.name] if (p := _parsed_by(command, config, capsys))]
    assert parsed, f"no command of {CONFIG_COMMANDS[config.parent.name]} accepts {config}"
    for options in parsed:
        assert _holds(options, own)


def _holds(parsed, own) -> bool:
    """Every value written in the YAML (nested sections and list items included) is the parsed one."""
    if isinstance(own, dict):
        return isinstance(parsed, dict) and all(k in parsed and _holds(parsed[k], v) for k, v in own.items())
    if isinstance(own, list):
        return isinstance(parsed, (list, tuple)) and len(parsed) == len(own) and all(map(_holds, parsed, own))
    return parsed == own


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("config", sorted((CONFIGS / "public").glob("*.yaml")), ids=lambda p: p.name)
def test_public_set_configs_build_on_the_real_datasets(config, real_home, tmp_path, capsys):
    """The mix, sources and exclusions as written, on the prepared datasets (a small size, no state prefill)."""
    main(["public-set", "build", "--config", str(config), "--size", "40", "--models", "null",
          "--name", str(tmp_path / "public")])
    path = Path(capsys.readouterr().out.strip().splitlines()[-1])
    rows = path.read_text().splitlines()
    assert path.is_relative_to(tmp_path) and len(rows) == 40


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
    assert cli.config["fit"]["seed_everything"] == 0  # runs repeat unless a config sets another seed
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
    data = write_tiny_csv(tmp_path / "task.csv", n=60)
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--source", str(tiny_models["llama"]), "--target", str(tiny_models["gpt2"]),
              "--task", str(data), "--public.data", str(data), "--fit.estimator", "pca", "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error: " in err and "fit.estimator" in err and "pca" in err and "Traceback" not in err

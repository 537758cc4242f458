"""The recipe's settings: declared once, the same from flags or from a YAML under configs/, and every
command that runs a model or a Trainer takes the device flags."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lightning_modules.cli import build_parser, main
from lightning_modules.settings import (DeviceSettings, ExtractionSettings, FitSettings, HeadSettings,
                                        PublicSetSettings, SettingsError, build_trainer)

ROOT = Path(__file__).resolve().parents[2]
PAIR = ["--source", "a", "--target", "b", "--task", "t"]
RECIPE_COMMANDS = ("evaluate", "evaluate_ood", "evaluate_generation", "study", "ablate")
# every command that runs a model or Trainer (they take `device: DeviceSettings` whole)
DEVICE_COMMANDS = (*RECIPE_COMMANDS, "generate", "public-set build", "public-set export", "head fit", "align")


def parsed(*argv: str):
    parser = build_parser()
    cfg = parser.instantiate(parser.parse_args(list(argv)))
    return cfg[argv[0]]


def test_flags_and_yaml_give_the_same_settings(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("fit:\n  standardize: false\n  lambdas: [0.01, 1.0]\nextraction:\n  label_column: spam\n"
                      "public:\n  data: my-public.jsonl\n  limit: null\nseed: 3\n")
    from_yaml = parsed("evaluate", "--config", str(recipe), *PAIR)
    from_flags = parsed("evaluate", *PAIR, "--fit.standardize", "false", "--fit.lambdas", "[0.01, 1.0]",
                        "--extraction.label_column", "spam", "--public.data", "my-public.jsonl",
                        "--public.limit", "null", "--seed", "3")
    for name in ("fit", "extraction", "public", "head", "seed"):
        assert from_yaml[name] == from_flags[name]
    assert from_yaml.fit == FitSettings(standardize=False, lambdas=(0.01, 1.0))
    assert from_yaml.extraction == ExtractionSettings(label_column="spam")
    assert from_yaml.public == PublicSetSettings("my-public.jsonl", limit=None)
    # a flag after --config wins over the file
    assert parsed("evaluate", "--config", str(recipe), *PAIR, "--fit.standardize", "true").fit.standardize


def test_the_default_is_the_best_recipe_and_the_recipe_files_are_it():
    """What `xsilo evaluate` and `xsilo study` fit with no recipe flag is the README's recipe (centred, standardised
    ridge, λ chosen automatically, each model's own max_length), and configs/recipe/bbc.yaml spells out exactly it."""
    bbc = str(ROOT / "configs/recipe/bbc.yaml")
    for command, args in (("evaluate", PAIR), ("study", ["--models", "[a, b]", "--tasks", "[t]"])):
        defaults, from_file = parsed(command, *args), parsed(command, "--config", bbc, *args)
        fit = defaults.fit
        assert (fit.estimator, fit.center, fit.standardize, fit.criterion) == ("ridge", True, True, "auto")
        assert defaults.extraction.max_length is None  # each model's own limit (capped at 128)
        for name in ("public", "extraction", "fit", "head", "seed"):
            assert from_file[name] == defaults[name]
        assert isinstance(from_file.fit, FitSettings) and isinstance(from_file.head, HeadSettings)
    ood = parsed("evaluate_ood", "--config", str(ROOT / "configs/recipe/vader-movies.yaml"), *PAIR, "--ood", "[o]")
    assert ood.fit == FitSettings() and ood.task_limit == 3000
    generation = parsed("evaluate_generation", "--config", str(ROOT / "configs/recipe/generation.yaml"),
                        "--source", "a", "--target", "b")
    assert generation.fit == FitSettings(standardize=False) and generation.public.limit == 2000


@pytest.mark.parametrize("command", DEVICE_COMMANDS)
def test_every_model_command_lists_the_device_flags(command, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([*command.split(), "--help"])
    text = capsys.readouterr().out
    recipe = ("--seed", "--fit.standardize") if command in RECIPE_COMMANDS else ()
    for flag in ("--accelerator", "--devices", "--precision", "--threads", *recipe):
        assert flag in text, f"{command} --help lacks {flag}"


def test_precision_sets_the_forward_dtype_and_auto_the_device():
    import torch

    assert DeviceSettings().forward_dtype() == "float32" and DeviceSettings().forward_dtype("float16") == "float16"
    assert DeviceSettings(precision="bf16-true").forward_dtype() == "bfloat16"
    assert DeviceSettings(precision="16-mixed").forward_dtype() == "float16"
    assert DeviceSettings(accelerator="cpu").torch_device() == "cpu"
    assert DeviceSettings().torch_device() == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(SettingsError, match="precision 'bf16-true' runs the forward pass in bfloat16, but dtype"):
        DeviceSettings(precision="bf16-true").forward_dtype("float16")


def test_evaluate_generation_runs_on_the_device_and_in_the_precision_given(tiny_models, tmp_path, isolated_home):
    """`--precision bf16-true --accelerator cpu` reaches the models: both run their forward pass in bfloat16 on
    the CPU (recorded in metrics.json), and bf16 statistics never enter the float32 statistics cache."""
    import json

    from tests.tiny import write_tiny_csv

    public = write_tiny_csv(tmp_path / "public.csv", n=40, seed=5)
    llama = str(tiny_models["llama"])
    common = ["evaluate_generation", "--source", llama, "--target", llama, "--public.data", str(public),
              "--public.limit", "null", "--max_length", "16", "--eval_texts", "4", "--max_new_tokens", "2",
              "--prompts", "the cat", "--accelerator", "cpu"]
    main([*common, "--precision", "bf16-true", "--out", str(tmp_path / "bf16")])
    bf16 = json.loads((tmp_path / "bf16" / "metrics.json").read_text())
    assert bf16["forward"] == {"device": "cpu", "dtype": "bfloat16"}
    assert bf16["config"]["device"]["precision"] == "bf16-true" and not bf16["stats_cache_hit"]
    assert not (isolated_home / "paired-positions").exists()
    main([*common, "--out", str(tmp_path / "fp32")])
    fp32 = json.loads((tmp_path / "fp32" / "metrics.json").read_text())
    assert fp32["forward"] == {"device": "cpu", "dtype": "float32"} and (isolated_home / "paired-positions").is_dir()
    assert fp32["rows"]["mapped"]["kl"] != bf16["rows"]["mapped"]["kl"]  # the bf16 forward really ran


def test_generate_takes_the_precision_and_refuses_a_contradicting_dtype(tiny_models, tmp_path, capsys):
    import torch

    from datamodules.tokens import load_causal_lm
    from lightning_modules.generation.maps import save_generation_map
    from lightning_modules.generation.sampling import generate
    from lightning_modules.fitting.affine_map import AffineMap

    llama = str(tiny_models["llama"])
    lm = load_causal_lm(llama, "bfloat16")
    assert lm.model.dtype == torch.bfloat16 and lm.device.type == "cpu"
    save_generation_map(tmp_path / "map", AffineMap(torch.eye(lm.hidden_size), torch.zeros(lm.hidden_size)), lm, lm,
                        max_length=16)
    expected = generate(lm, "the cat", max_new_tokens=4).text
    args = ["generate", "--source", llama, "--target", llama, "--aligner", str(tmp_path / "map"),
            "--max_new_tokens", "4", "--accelerator", "cpu"]
    main([*args, "--precision", "bf16-true", "the cat"])
    assert capsys.readouterr().out == "the cat" + expected + "\n"  # the same tokens as the bfloat16 model's own
    with pytest.raises(SystemExit) as e:
        main([*args, "--precision", "bf16-true", "--dtype", "float16", "the cat"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: precision 'bf16-true'") and "\n" not in err


def test_device_flags_reach_the_settings():
    cfg = parsed("evaluate", *PAIR, "--accelerator", "cpu", "--devices", "1", "--precision", "bf16-mixed")
    assert DeviceSettings(cfg.accelerator, cfg.devices, cfg.precision) == DeviceSettings("cpu", 1, "bf16-mixed")
    assert parsed("study", "--models", "[a, b]", "--tasks", "[t]").accelerator == "auto"


def test_a_trainer_is_built_from_device_settings():
    from lightning.pytorch.accelerators import CPUAccelerator

    trainer = build_trainer(DeviceSettings(accelerator="cpu", devices=1), max_epochs=3)
    assert isinstance(trainer.accelerator, CPUAccelerator) and trainer.num_devices == 1
    assert trainer.precision == "32-true" and trainer.max_epochs == 3 and trainer.logger is None
    assert build_trainer(DeviceSettings("cpu", 1, "bf16-mixed"), max_epochs=1).precision == "bf16-mixed"


def test_bad_settings_get_one_line_errors(capsys):
    for make, match in ((lambda: DeviceSettings(devices=2), "devices must be 1 or auto"),
                        (lambda: FitSettings(lambdas=()), "fit.lambdas must be a non-empty list"),
                        (lambda: HeadSettings(epochs=0), "head needs epochs >= 1"),
                        (lambda: PublicSetSettings(limit=1), "public.limit must be at least 2"),
                        (lambda: ExtractionSettings(max_length=0), "extraction.max_length must be a positive number")):
        with pytest.raises(SettingsError, match=match):
            make()
    with pytest.raises(SystemExit) as e:
        main(["evaluate", *PAIR, "--devices", "0"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "devices" in err and "\n" not in err


def test_a_csv_with_other_columns_through_evaluate_with_flags_only(tiny_models, tmp_path, capsys):
    """The held-out-style check: a user's CSV whose columns are `sms`/`spam`, no registry entry; the seed, the
    device flags and each model's resolved extraction (columns, pooling, layer, max_length) are recorded."""
    import json

    from tests.tiny import write_tiny_csv

    task = write_tiny_csv(tmp_path / "sms.csv", n=90, seed=3)
    task.write_text("sms,spam\n" + task.read_text().split("\n", 1)[1])
    public = write_tiny_csv(tmp_path / "public.csv", n=120, seed=4)
    out = tmp_path / "run"
    main(["evaluate", "--source", str(tiny_models["llama"]), "--target", str(tiny_models["gpt2"]), "--task", str(task),
          "--extraction.text_column", "sms", "--extraction.label_column", "spam", "--extraction.max_length", "32",
          "--public.data", str(public), "--public.limit", "null", "--head.epochs", "5", "--seed", "7",
          "--accelerator", "cpu", "--devices", "1", "--out", str(out)])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["labels"] == ["c0", "c1", "c2"] and metrics["seed"] == 7
    assert metrics["config"]["device"] == {"accelerator": "cpu", "devices": 1, "precision": "auto", "threads": None}
    for role in ("task_source", "task_target"):
        spec = metrics["extraction"][role]
        assert (spec["text_column"], spec["label_column"], spec["max_length"], spec["layer"]) == ("sms", "spam", 32, -1)
    assert metrics["extraction"]["task_source"]["pooling"] == "last"  # a causal LM's own default
    err = capsys.readouterr().err
    assert "pooling last" in err and "max_length 32" in err  # the resolved extraction is printed
    # the map is also saved as a map folder, and `xsilo export --aligner OUT/map` fuses the same layer as the .ckpt
    from serve.formats.exports import load_export

    head = str(out / "classifier-target.ckpt")
    main(["export", "--aligner", str(out / "aligner.ckpt"), "--classifier", head, "--out", str(tmp_path / "from-ckpt")])
    main(["export", "--aligner", str(out / "map"), "--classifier", head, "--out", str(tmp_path / "from-map")])
    from_ckpt, from_map = load_export(tmp_path / "from-ckpt"), load_export(tmp_path / "from-map")
    assert np.allclose(from_map.weight, from_ckpt.weight, atol=1e-6) and np.allclose(from_map.bias, from_ckpt.bias,
                                                                                     atol=1e-6)

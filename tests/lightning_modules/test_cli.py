"""The root command: one parser lists every subcommand; LightningCLI validate/test/predict score a fitted
checkpoint; list options take jsonargparse's list syntax in every subcommand."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from argparse import ArgumentError
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_modules.models.aligner import AffineAligner
from lightning_modules.models.classifier import LinearClassifier
from lightning_modules.cli import COMMANDS, LIGHTNING_SUBCOMMANDS, build_parser, main

from tests.tiny import write_tiny_csv

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
QUIET = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary",
         "false"]


def _leaves(commands: dict, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    return [leaf for name, c in commands.items()
            for leaf in (_leaves(c, prefix + (name,)) if isinstance(c, dict) else [prefix + (name,)])]


def test_root_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in (*LIGHTNING_SUBCOMMANDS, *COMMANDS):
        assert f"\n    {name} " in out or f"\n    {name}\n" in out, name


def test_root_help_imports_no_training_code():
    code = ("import sys\nfrom lightning_modules.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n"
            "    pass\nprint('LOADED', sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'lightning', "
            "'transformers')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "LOADED []" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]


@pytest.mark.parametrize("words", [*([c] for c in LIGHTNING_SUBCOMMANDS), *_leaves(COMMANDS)], ids=" ".join)
def test_every_subcommand_has_help(words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*words, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and "--help" in out
    if words[0] == "predict":
        assert "--output" in out and "--ckpt_path" in out


def test_list_options_take_one_list_and_words_get_one_line(capsys):
    """A list option takes jsonargparse's list syntax, `--models '[a,b]'` or `--models+ a` per item (no argv is
    rewritten); words after it, the spelling of the old argv rewriting, get one line naming that syntax."""
    parser = build_parser()
    for argv in (["study", "--models", "[a,b]", "--tasks", "[t]", "--ood", "[o1, o2]"],
                 ["study", "--models+", "a", "--models+", "b", "--tasks", "[t]", "--ood+", "o1", "--ood+", "o2"]):
        cfg = parser.parse_args(argv)
        assert (cfg.study.models, cfg.study.tasks, cfg.study.ood) == (["a", "b"], ["t"], ["o1", "o2"])
    cfg = parser.parse_args(["ablate", "--sizes", "[100, 200]", "--public_seeds", "[3]", "--finetune_losses", "[mse]"])
    assert (cfg.ablate.sizes, cfg.ablate.public_seeds, cfg.ablate.finetune) == ([100, 200], [3], ["mse"])
    assert parser.parse_args(["assets", "prepare", "bbc", "trec"]).assets.prepare.names == ["bbc", "trec"]
    for argv, line in ((["study", "--models", "a", "b", "--tasks", "[t]"], "--models takes one list: --models '[a,b]'"),
                       (["evaluate_ood", "--source", "s", "--target", "t", "--task", "k", "--ood", "trec"],
                        "--ood takes one list: --ood '[trec]'"),
                       (["ablate", "--sizes", "100", "200"], "--sizes takes one list: --sizes '[100,200]'"),
                       (["serve", "--heads", "h/bbc", "h/vader"], "--heads takes one list: --heads '[h/bbc,h/vader]'"),
                       (["assets", "prepare", "--names", "bbc"], "`xsilo assets prepare` takes the names as words"),
                       (["fit", "-c", str(CONFIGS / "model/aligner-ridge.yaml"), "--model.init_args.lambdas", "0.1", "1"],
                        "--model.init_args.lambdas takes one list: --model.init_args.lambdas '[0.1,1]'")):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith(f"error: {line}") and err.count("\n") == 1, err


def test_settings_dataclasses_are_taken_whole(monkeypatch):
    """`device: DeviceSettings`, `settings: ServerSettings`, `config: AblationConfig` and `view: StateView` reach
    the command functions as dataclasses, from the flags users type (--threads, --port, --rows_per_client, ...)."""
    import dataclasses
    import functools
    import json

    from lightning_modules import cli
    from lightning_modules.experiments.ablation_config import AblationConfig
    from lightning_modules.settings import DeviceSettings, Recipe
    from serve.formats.views import StateView
    from serve.settings import ServerSettings

    called, real_command = {}, cli.command

    def recording(entry: str):  # the command itself, recording its arguments instead of running
        function = real_command(entry)
        return functools.wraps(function)(lambda *args, **options: called.update(args=list(args), **options))

    monkeypatch.setattr(cli, "command", recording)

    def parsed(*argv: str) -> dict:
        called.clear()
        parser = build_parser(list(argv))
        cli.run(parser.instantiate(parser.parse_args(list(argv))))
        return dict(called)

    got = parsed("evaluate", "--source", "a", "--target", "b", "--task", "t", "--threads", "2", "--accelerator", "cpu")
    assert got["device"] == DeviceSettings("cpu", "auto", "auto", 2)
    got = parsed("serve", "--heads", "[h/bbc]", "--port", "9", "--rows_per_client", "5", "--max_pending", "3")
    assert (got["heads"], got["port"]) == (["h/bbc"], 9)
    assert got["settings"] == ServerSettings(rows_per_client=5, max_pending=3)
    assert parsed("serve", "--heads", "h/bbc")["heads"] == "h/bbc"  # one head folder alone, as the demo serves it
    got = parsed("ablate", "--task", "trec", "--base.mix", "broad", "--sizes", "[1000]", "--threads", "1")
    as_json = lambda config: json.loads(json.dumps(dataclasses.asdict(config)))  # noqa: E731 (lists, not tuples)
    assert isinstance(got["config"], AblationConfig) and as_json(got["config"]) == as_json(AblationConfig(
        task="trec", base=Recipe(mix="broad"), sizes=[1000], device=DeviceSettings(threads=1)))
    got = parsed("extract", "--model", "m", "--data", "d", "--max_length", "32", "--pooling", "mean")
    assert got["view"] == StateView(pooling="mean", max_length=32)
    assert parsed("assets", "prepare", "bbc", "trec")["args"] == ["bbc", "trec"]
    assert real_command(COMMANDS["ablate"]).__module__ == "lightning_modules.experiments.commands"


@pytest.fixture
def fitted(tiny_models, tmp_path) -> dict[str, object]:
    """An aligner and a classifier fitted through `xsilo fit` on tiny data; their config args and checkpoints."""
    public = write_tiny_csv(tmp_path / "public.csv", n=64)
    aligner_args = ["-c", str(CONFIGS / "trainer/cpu.yaml"), "-c", str(CONFIGS / "data/public.yaml"),
                    "-c", str(CONFIGS / "model/aligner-ridge.yaml"),
                    "--data.init_args.source", str(tiny_models["llama"]),
                    "--data.init_args.target", str(tiny_models["bert"]),
                    "--data.init_args.data", str(public), "--data.init_args.limit", "null", *QUIET]
    main(["fit", *aligner_args, "--trainer.default_root_dir", str(tmp_path / "aligner")])
    task = write_tiny_csv(tmp_path / "task.csv", n=90)
    classifier_args = ["-c", str(CONFIGS / "trainer/cpu.yaml"), "-c", str(CONFIGS / "data/bbc-gemma3.yaml"),
                       "-c", str(CONFIGS / "model/classifier.yaml"),
                       "--data.init_args.model", str(tiny_models["gpt2"]), "--data.init_args.data", str(task), *QUIET]
    main(["fit", *classifier_args, "-c", str(CONFIGS / "trainer/classifier.yaml"), "--trainer.max_epochs", "5",
          "--trainer.default_root_dir", str(tmp_path / "classifier")])
    # Keep the config.yaml that fit saved (a later run in the same folder replaces it with its own).
    shutil.copy(next((tmp_path / "classifier").rglob("config.yaml")), tmp_path / "classifier-fit.yaml")
    return {"aligner": (aligner_args, next((tmp_path / "aligner").rglob("*.ckpt"))),
            "classifier": (classifier_args, next((tmp_path / "classifier").rglob("*.ckpt")))}


def test_validate_test_predict_on_fitted_checkpoints(fitted, tmp_path, capsys):
    args, ckpt = fitted["aligner"]
    for command in ("validate", "test"):
        main([command, *args, "--ckpt_path", str(ckpt)])
    printed = capsys.readouterr().out
    assert "val_mse" in printed and "test_mse" in printed and "test_cosine" in printed
    aligner = AffineAligner.load_from_checkpoint(ckpt)
    main(["predict", *args, "--ckpt_path", str(ckpt), "--output", str(tmp_path / "out/mapped.npz")])
    saved = np.load(tmp_path / "out/mapped.npz")
    assert str(saved["kind"]) == "mapped_states"
    assert saved["predictions"].shape == (8, 32)  # the 12.5% validation rows of 64, 32-d target states
    # The written rows are the aligner applied to those rows' cached source states.
    from lightning_modules.lightning_cli import run_lightning_cli

    dm = run_lightning_cli(list(args), run=False).datamodule  # the same config, not run
    dm.prepare_data()
    dm.setup("predict")
    x = torch.cat([b[0] for b in dm.predict_dataloader()])
    assert saved["rows"].tolist() == dm.splits["test"].index.tolist()
    np.testing.assert_allclose(saved["predictions"], aligner(x).detach().numpy(), rtol=1e-5, atol=1e-5)

    args, ckpt = fitted["classifier"]
    main(["test", *args, "--ckpt_path", str(ckpt)])
    assert "test_acc" in capsys.readouterr().out
    main(["predict", *args, "--ckpt_path", str(ckpt), "--output", str(tmp_path / "logits.npz")])
    saved = np.load(tmp_path / "logits.npz")
    assert str(saved["kind"]) == "logits" and saved["label_names"].tolist() == ["c0", "c1", "c2"]
    assert saved["predictions"].shape == (len(saved["rows"]), 3)
    classifier = LinearClassifier.load_from_checkpoint(ckpt)
    assert classifier.hparams.output_dim == 3

    # The config.yaml that `fit` saved is enough to score and predict again.
    saved_config = tmp_path / "classifier-fit.yaml"
    main(["validate", "-c", str(saved_config), "--ckpt_path", str(ckpt)])
    assert "val_acc" in capsys.readouterr().out
    main(["predict", "-c", str(saved_config), "--ckpt_path", str(ckpt), "--output", str(tmp_path / "again.npz")])
    np.testing.assert_array_equal(np.load(tmp_path / "again.npz")["predictions"], saved["predictions"])


@pytest.mark.slow
def test_predict_under_ddp_writes_every_row_once_in_order(fitted, tmp_path, no_leftover_process_group):
    """Two CPU processes (ddp_spawn): rank 0 writes one file equal to the one-process prediction."""
    from lightning_modules.lightning_cli import run_lightning_cli

    args, ckpt = fitted["classifier"]
    main(["predict", *args, "--ckpt_path", str(ckpt), "--output", str(tmp_path / "one.npz")])
    main(["predict", *args, "--ckpt_path", str(ckpt), "--output", str(tmp_path / "two.npz"),
          "--trainer.devices", "2", "--trainer.strategy", "ddp_spawn"])
    one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    np.testing.assert_array_equal(two["rows"], one["rows"])
    # float32 logits summed in another batch order: equal to a few ulps of the largest term, not of each entry
    scale = float(np.abs(one["predictions"]).max())
    np.testing.assert_allclose(two["predictions"], one["predictions"], rtol=1e-6, atol=1e-6 * scale)


def test_scoring_without_a_fitted_model_is_one_line(fitted, capsys):
    args, _ = fitted["aligner"]
    for command in ("validate", "test", "predict"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, *args])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert f"error: `xsilo {command}` needs a fitted model: pass --ckpt_path" in err
        assert "Traceback" not in err and "AttributeError" not in err


def test_a_bad_checkpoint_is_one_line(fitted, tmp_path, capsys):
    args, _ = fitted["aligner"]
    (tmp_path / "text.ckpt").write_text("not a checkpoint")
    _, classifier_ckpt = fitted["classifier"]
    for ckpt, message in ((tmp_path / "missing.ckpt", "no such file"),
                          (tmp_path / "text.ckpt", "is not a Lightning checkpoint"),
                          (classifier_ckpt, "does not fit the model that the config and data build")):
        with pytest.raises(SystemExit) as exit_info:
            main(["validate", *args, "--ckpt_path", str(ckpt)])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --ckpt_path {ckpt}") and message in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1


def test_trainer_validate_on_an_unfitted_aligner_names_the_fix(tiny_models, tmp_path):
    import lightning as L

    from datamodules.states import PairedStatesDataModule

    dm = PairedStatesDataModule(str(tiny_models["llama"]), str(tiny_models["bert"]),
                                data=str(write_tiny_csv(tmp_path / "p.csv", n=40)), limit=None)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    for run in (trainer.validate, trainer.test, trainer.predict):
        with pytest.raises(ValueError, match="never fitted.*pass --ckpt_path"):
            run(AffineAligner(32, 32), datamodule=dm)


def test_trainer_predict_output_names_one_file_per_call(tiny_models, tmp_path):
    from datamodules.states import PairedStatesDataModule
    from lightning_modules.lightning_cli import XsiloTrainer

    dm = PairedStatesDataModule(str(tiny_models["llama"]), str(tiny_models["bert"]),
                                data=str(write_tiny_csv(tmp_path / "p.csv", n=40)), limit=None)
    trainer = XsiloTrainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False,
                           enable_model_summary=False, enable_checkpointing=False)
    aligner = AffineAligner(32, 32)
    trainer.fit(aligner, datamodule=dm)
    returned = trainer.predict(aligner, datamodule=dm, output=str(tmp_path / "a.npz"))
    np.testing.assert_array_equal(np.load(tmp_path / "a.npz")["predictions"], torch.cat(returned).numpy())
    (tmp_path / "a.npz").unlink()
    trainer.predict(aligner, datamodule=dm, output=str(tmp_path / "b.npz"))
    assert (tmp_path / "b.npz").is_file() and not (tmp_path / "a.npz").exists()  # the first call's writer is gone


def test_predict_output_must_be_an_npz_file(fitted, tmp_path, capsys):
    args, ckpt = fitted["aligner"]
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", *args, "--ckpt_path", str(ckpt)])
    assert exit_info.value.code == 2
    assert "error: `xsilo predict` writes its predictions to a file: pass --output FILE.npz" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", *args, "--ckpt_path", str(ckpt), "--output", str(tmp_path / "mapped.csv")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error: --output" in err and ".npz" in err and "Traceback" not in err
    assert not (tmp_path / "mapped.csv").exists()


def test_the_registry_flag_uses_a_users_entries(tiny_models, tmp_path, monkeypatch, capsys):
    """`xsilo --registry FILE ...`: the user's model and dataset names work in the subcommand (and in DDP
    workers, through $XSILO_REGISTRY); a bad file is one line."""
    # the flag sets $XSILO_REGISTRY; setenv first so monkeypatch records (and restores) the variable even when unset
    monkeypatch.setenv("XSILO_REGISTRY", "")
    monkeypatch.delenv("XSILO_REGISTRY")
    sms = write_tiny_csv(tmp_path / "sms.csv", n=30, seed=1)
    registry = tmp_path / "my.yaml"
    registry.write_text(f"models:\n  my-llama:\n    folder: {tiny_models['llama']}\n"
                        f"datasets:\n  my-sms:\n    file: {sms.name}\n    text_column: text\n    label_column: label\n")
    main(["--registry", str(registry), "assets", "list"])
    listed = capsys.readouterr().out
    assert "my-llama" in listed and "my-sms" in listed
    main(["--registry", str(registry), "extract", "--model", "my-llama", "--data", "my-sms", "--max_length", "16",
          "--accelerator", "cpu", "--devices", "1"])
    cache = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert (cache / "manifest.json").is_file() and np.load(cache / "labels.npy").shape == (30,)
    assert os.environ["XSILO_REGISTRY"] == str(registry.resolve())

    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  broken:\n    folder: ./no-such-folder\n")
    with pytest.raises(SystemExit) as e:
        main(["--registry", str(bad), "assets", "list"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and "broken" in err and "\n" not in err


def test_the_two_party_commands_parse(tmp_path):
    """head fit, public-set export, align, and serve/query's new options parse into their functions' arguments."""
    parser = build_parser()

    def parsed(argv: list[str]):
        cfg = parser.instantiate(parser.parse_args(argv))
        for word in argv[:2] if isinstance(COMMANDS[argv[0]], dict) else argv[:1]:
            cfg = cfg[word]
        return cfg

    recipe = str(CONFIGS / "recipe" / "bbc.yaml")  # holds public/fit/head sections besides extraction
    cfg = parsed(["head", "fit", "--config", recipe, "--model", "gemma3", "--task", "bbc", "--out", "heads/bbc",
                  "--publish_ood", "true"])
    assert (cfg.model, cfg.task, cfg.out, cfg.publish_ood, cfg.head.epochs) == ("gemma3", "bbc", "heads/bbc", True, 200)
    cfg = parsed(["align", "--config", recipe, "--server", "http://127.0.0.1:9", "--model", "smollm2", "--out", "m",
                  "--fit.standardize", "false"])
    assert (cfg.server, cfg.fit.standardize, cfg.fit.estimator, cfg.extraction.layer) == ("http://127.0.0.1:9", False,
                                                                                          "ridge", -1)
    cfg = parsed(["public-set", "export", "--model", "gemma3", "--data", "p.jsonl", "--out", "pub", "--limit", "10"])
    assert (cfg.limit, cfg.val_fraction, cfg.seed) == (10, 0.125, 0)
    cfg = parsed(["serve", "--heads", "[h/bbc,h/vader]", "--public", "pub", "--fits_per_client", "3"])
    assert (cfg.export, cfg.heads, cfg.public, cfg.fits_per_client, cfg.max_fit_sessions) == (
        None, ["h/bbc", "h/vader"], "pub", 3, 2)
    cfg = parsed(["query", "--head", "bbc", "--aligner", "m", "--text", "hello"])
    assert (cfg.head, cfg.aligner) == ("bbc", "m")
    # a section no command takes is still an error, with or without the recipe's other sections
    bad = tmp_path / "bad.yaml"
    bad.write_text("extraction: {layer: -1}\nfitt: {center: true}\n")
    with pytest.raises(ArgumentError, match="fitt"):  # the parser raises; `main` prints it as one line
        parsed(["align", "--config", str(bad), "--server", "s", "--model", "m", "--out", "o"])


def test_serve_with_nothing_to_serve_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: nothing to serve") and err.count("\n") == 1


@pytest.mark.network
@pytest.mark.he
def test_align_through_a_provider_equals_the_plaintext_fit(tiny_models, tmp_path, monkeypatch, capsys):
    """Two homes, two models: the provider exports its public states and a head and serves them; the client runs
    `xsilo align` (encrypted fit) and gets the map and λ the lab's plaintext fit finds on the same rows, and
    `xsilo query --head --aligner` answers as the plaintext head on the mapped state."""
    import json

    from datamodules.states import PairedStatesDataModule
    from lightning_modules.evaluation.evaluate import fit_aligner
    from lightning_modules.settings import DeviceSettings, FitSettings
    from serve.formats.exports import load_export
    from serve.harness import ServerThread
    from serve.server import create_app

    provider, client = str(tiny_models["gpt2"]), str(tiny_models["llama"])
    public = write_tiny_csv(tmp_path / "public.csv", n=120, seed=8)
    task = write_tiny_csv(tmp_path / "task.csv", n=90, seed=9)
    monkeypatch.setenv("XSILO_HOME", str(tmp_path / "provider-home"))
    main(["public-set", "export", "--model", provider, "--data", str(public), "--out", str(tmp_path / "pub"),
          "--accelerator", "cpu"])
    main(["head", "fit", "--model", provider, "--task", str(task), "--out", str(tmp_path / "heads" / "topics"),
          "--head.epochs", "10", "--accelerator", "cpu"])
    lambdas = "[1.0e-4,1.0e-2,1.0,100.0]"
    monkeypatch.setenv("XSILO_HOME", str(tmp_path / "client-home"))  # the client never reads the provider's cache
    with ServerThread(create_app(heads=[tmp_path / "heads" / "topics"], public=tmp_path / "pub"),
                      max_lifetime_s=300) as srv:
        capsys.readouterr()
        main(["align", "--server", srv.url, "--model", client, "--out", str(tmp_path / "map"),
              "--fit.lambdas", lambdas, "--accelerator", "cpu"])
        err = capsys.readouterr().err
        assert "private fit on 105 + 15 public rows" in err and "val R²" in err
        main(["query", "--server", srv.url, "--head", "topics", "--aligner", str(tmp_path / "map"),
              "--text", "good film great actor"])
        answer = json.loads(capsys.readouterr().out.strip().splitlines()[0])
    private = AffineAligner.from_pretrained(tmp_path / "map")
    config = json.loads((tmp_path / "map" / "config.json").read_text())
    assert config["metrics"]["private_fit"]["bytes_sent"] > 0 and config["target"]["public_set_fingerprint"]

    from lightning_modules.reporting.two_party_report import isolation

    homes = tmp_path / "provider-home", tmp_path / "client-home"
    assert isolation(*homes)[1] == []  # neither home holds the other's states
    dm = PairedStatesDataModule(source=client, target=provider, data=str(public), limit=None)
    dm.prepare_data()
    assert isolation(*homes)[1]  # the lab's one-machine fit put the provider's states in the client's home
    plain, _ = fit_aligner(dm, FitSettings(lambdas=(1e-4, 1e-2, 1.0, 100.0)), DeviceSettings("cpu"))
    w_private, w_plain = private.affine_map.weight.double(), plain.affine_map.weight.double()
    assert float((w_private - w_plain).abs().max()) <= 1e-4 * float(w_plain.abs().max())
    b_private, b_plain = private.affine_map.bias.double(), plain.affine_map.bias.double()
    assert float((b_private - b_plain).abs().max()) <= 1e-4 * max(float(b_plain.abs().max()), 1.0)
    assert float(private.chosen_lambda) == float(plain.chosen_lambda)

    # split mode: the encrypted head on the client's mapped state equals the plaintext head on it
    from datamodules.extraction import ExtractionConfig, extract, resolve

    text_file = tmp_path / "q.csv"
    text_file.write_text('text\n"good film great actor"\n')
    job = resolve(ExtractionConfig(model=client, data=str(text_file), label_column=None))
    from datamodules.cache import StateCache

    extract(job.config)
    h = StateCache(job.directory).rows([0])
    head = load_export(tmp_path / "heads" / "topics", "head")
    logits = head(private(torch.from_numpy(h)).detach().numpy())
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    assert answer["label"] == head.manifest["label_names"][int(logits.argmax())]
    for name, p in zip(head.manifest["label_names"], probs[0]):
        assert answer["probabilities"][name] == pytest.approx(float(p), abs=1e-3)

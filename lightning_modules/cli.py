"""The `xsilo` console script: a table of commands and one jsonargparse parser over it.

`fit`, `validate`, `test` and `predict` are LightningCLI's, over the configs in configs/ (`lightning_cli` parses
their options when one runs). Every other command is a typed function that lives beside the code it drives
(COMMANDS names it); its signature is its options (`lightning_modules.signatures`): settings dataclasses are
taken whole (`--fit.standardize false`; `device: DeviceSettings` as `--accelerator --devices --precision
--threads`), and a list option takes jsonargparse's list syntax, `--models '[smollm2,gemma3]'`. Only the command
that runs is imported, so that `xsilo serve` loads no training code.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from argparse import ArgumentError

from jsonargparse import ArgumentParser

from lightning_modules.signatures import add_command, call, usage_error

LIGHTNING_SUBCOMMANDS = {
    "fit": "Fit the config's model on its DataModule (LightningCLI): -c configs/trainer/cpu.yaml -c configs/data/... "
           "-c configs/model/...",
    "validate": "Score a fitted checkpoint (--ckpt_path) on the DataModule's validation split (LightningCLI).",
    "test": "Score a fitted checkpoint (--ckpt_path) on the DataModule's test split (LightningCLI).",
    "predict": "Write a fitted checkpoint's (--ckpt_path) mapped states (aligner) or logits (classifier) of the test "
               "split to --output FILE.npz (LightningCLI).",
}
COMMANDS = {  # name: "module:function"
    "assets": {"list": "datamodules.commands:assets_list", "prepare": "datamodules.commands:assets_prepare"},
    "extract": "datamodules.commands:extract",
    "evaluate": "lightning_modules.evaluation.commands:evaluate",
    "evaluate_ood": "lightning_modules.evaluation.commands:evaluate_ood",
    "evaluate_generation": "lightning_modules.generation.commands:evaluate_generation",
    "generate": "lightning_modules.generation.commands:generate",
    "study": "lightning_modules.experiments.commands:study",
    "report": "lightning_modules.reporting.commands:report",
    "ablate": "lightning_modules.experiments.commands:ablate",
    "public-set": {"build": "lightning_modules.parties.commands:public_set_build",
                   "synthesize": "datamodules.commands:public_set_synthesize",
                   "export": "lightning_modules.parties.commands:public_set_export"},
    "export": "lightning_modules.parties.commands:export",
    "head": {"fit": "lightning_modules.parties.commands:head_fit"},
    "align": "lightning_modules.parties.commands:align",
    "serve": "serve.commands:serve",
    "keys": {"add": "serve.commands:keys_add", "revoke": "serve.commands:keys_revoke",
             "list": "serve.commands:keys_list"},
    "query": "serve.commands:query",
}
# One side of a two-party recipe (configs/recipe/*.yaml): its --config skips the recipe's sections it does not take
# (`head fit`: extraction and head; `align`: extraction and fit), so that one file serves both parties.
PARTY_COMMANDS = ("public-set export", "head fit", "align")
REGISTRY_FLAG = "--registry"


def command(entry: str):
    """The function a COMMANDS entry names."""
    module, _, name = entry.partition(":")
    return getattr(importlib.import_module(module), name)


def build_parser(argv: list[str] | tuple = ()) -> ArgumentParser:
    """The one `xsilo` parser: every subcommand with its --help (only the one `argv` names, when it names one)."""
    root = ArgumentParser(prog="xsilo", exit_on_error=False, description="Secure linear alignment of LLMs: extract, "
                          "fit, evaluate, export and serve under CKKS. Each subcommand has --help.")
    root.add_argument(REGISTRY_FLAG, type=str, help="a registry YAML of your own models and datasets, used before the "
                      "packaged one (sets $XSILO_REGISTRY), e.g. xsilo --registry my.yaml evaluate ...")
    subcommands = root.add_subcommands(required=True)
    for name, line in LIGHTNING_SUBCOMMANDS.items():
        subcommands.add_subcommand(name, ArgumentParser(description=f"{line} Options: xsilo {name} --help"), help=line)
    named = argv[:1] if argv and argv[0] in COMMANDS else list(COMMANDS)
    root.leaves = {}  # the function of each command, by its words
    _add_commands(root, subcommands, {k: COMMANDS[k] for k in named}, ())
    return root


def _add_commands(root, subcommands, entries: dict, words: tuple) -> None:
    for name, entry in entries.items():
        function = None if isinstance(entry, dict) else command(entry)
        doc = f"{name} subcommands: {', '.join(entry)}" if function is None else inspect.getdoc(function)
        line = " ".join(doc.split("\n\n")[0].split())
        sub = ArgumentParser(description=line)
        subcommands.add_subcommand(name, sub, help=line)  # a level is added before the levels under it
        if function is None:
            _add_commands(root, sub.add_subcommands(required=True), entry, (*words, name))
        else:
            root.leaves[(*words, name)] = function
            add_command(sub, function, party=" ".join((*words, name)) in PARTY_COMMANDS)


def run(cfg) -> None:
    """Call the function a `build_parser()` parse names, with its options."""
    entry, options = COMMANDS, cfg
    while isinstance(entry, dict):
        entry, options = entry[options.subcommand], options[options.subcommand]
    call(command(entry), options.as_dict())


def use_registry_flag(argv: list[str]) -> list[str]:
    """Apply a leading `--registry PATH` (or `--registry=PATH`) and return the rest of `argv`."""
    if argv[:1] == [REGISTRY_FLAG] and len(argv) > 1:
        path, rest = argv[1], argv[2:]
    elif argv and argv[0].startswith(REGISTRY_FLAG + "="):
        path, rest = argv[0].split("=", 1)[1], argv[1:]
    else:
        return argv
    from datamodules.assets import use_registry

    use_registry(path)
    return rest


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:  # the server handles its own signals (uvicorn's graceful shutdown)
        _main(argv)
        return
    from datamodules.signals import Stopped, stop_on_signals

    try:
        with stop_on_signals():
            _main(argv)
    except Stopped as e:
        # SIGTERM or Ctrl-C: every file is written atomically, so what finished is kept and a rerun resumes.
        print(str(e), file=sys.stderr)
        raise SystemExit(e.exit_code) from None


def _main(argv: list[str]) -> None:
    parser = None
    try:
        argv = use_registry_flag(argv)
        if argv and argv[0] in LIGHTNING_SUBCOMMANDS:
            from lightning_modules.lightning_cli import run_lightning_cli

            run_lightning_cli(argv)
            return
        parser = build_parser(argv)
        run(parser.instantiate(parser.parse_args(argv)))  # settings groups become their dataclasses
    except ArgumentError as e:  # a parse error (the parsers do not exit on one)
        words, leaves = tuple(w for w in argv if not w.startswith("-")), parser.leaves if parser else {}
        key = next((k for k in leaves if words[:len(k)] == k), () if parser else tuple(argv[:1]))  # the command's
        print(f"error: {usage_error(leaves.get(key), argv, e, ' '.join(('xsilo', *key)))}", file=sys.stderr)
        raise SystemExit(2) from None
    except ValueError as e:
        # Every xsilo check of user input (assets, caches, exports, configs, ciphertexts) raises a
        # ValueError whose message names the problem and the fix. XSILO_DEBUG=1 shows the traceback.
        if os.environ.get("XSILO_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("interrupted: finished shards and files are kept; rerun to resume", file=sys.stderr)
        raise SystemExit(130) from None
    except ModuleNotFoundError as e:
        # The base install serves only; models, fitting and evaluation need the `train` extra.
        if not e.name or e.name.split(".")[0] not in _train_modules():
            raise
        command = " ".join(argv[:2] if argv and isinstance(COMMANDS.get(argv[0]), dict) else argv[:1])
        print(f"error: `xsilo {command}` needs {e.name}, which is not installed; install the training extras: "
              "pip install 'xsilo[train]'", file=sys.stderr)
        raise SystemExit(2) from None


def _train_modules() -> set[str]:
    """Top-level modules of the `train` extra (each is named like its distribution)."""
    import re
    from importlib.metadata import PackageNotFoundError, requires

    try:
        requirements = requires("xsilo") or []
    except PackageNotFoundError:
        return set()
    return {re.split(r"[^A-Za-z0-9_.-]", r, maxsplit=1)[0].lower().replace("-", "_")
            for r in requirements if re.search(r"extra\s*==\s*['\"]train['\"]", r)}


if __name__ == "__main__":
    main()

"""How a typed command function becomes a subcommand's options (jsonargparse), and how a parse calls it back.

- A parameter is an option; a settings dataclass parameter is a group of options (`--fit.standardize false`).
- A dataclass parameter named in `FLAT` (`device`, `settings`, `config`, `view`) is taken whole but its fields are
  options of their own (`device: DeviceSettings` gives `--accelerator --devices --precision --threads`), also
  inside another FLAT dataclass (`AblationConfig.device`); `call` builds the dataclass back from them.
- `*names` takes words (`xsilo assets prepare smollm2 bbc`).
- A list option takes jsonargparse's list syntax: `--models '[a,b]'` or `--models+ a --models+ b`; words after a
  list option get one line naming it (`usage_error`).
Nothing here rewrites argv.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import json
import types
import typing
from argparse import ArgumentError
from pathlib import Path

from jsonargparse import ActionConfigFile, ArgumentParser

FLAT = ("device", "settings", "config", "view")  # dataclass parameters whose fields are top-level options
RECIPE_SECTIONS = ("public", "extraction", "fit", "head", "seed", "task_limit")  # of configs/recipe/*.yaml
RENAMED = {"finetune": "--finetune_losses"}  # a FLAT field's old spelling, still accepted
MOVED = {"--names": "`xsilo assets prepare` takes the names as words: xsilo assets prepare smollm2 bbc"}


def add_command(parser: ArgumentParser, function, party: bool = False) -> None:
    """`function`'s parameters as `parser`'s options, and --config FILE. `party`: the command is one side of a
    two-party recipe, whose --config skips the recipe sections it does not take (`RecipeFile`)."""
    hints = typing.get_type_hints(function)
    params = inspect.signature(function).parameters.values()
    parser.add_argument("--config", action=RecipeFile if party else ActionConfigFile,
                        help="a YAML file holding any of these options")
    for p in params:
        if p.kind is p.VAR_POSITIONAL:
            parser.add_argument(p.name, type=hints[p.name], nargs="*", default=[], help=_helps(function).get(p.name))
    flat = {p.name for p in params if p.name in FLAT and dataclasses.is_dataclass(hints[p.name])}
    parser.add_function_arguments(function, as_group=False, as_positional=True, fail_untyped=True,
                                  sub_configs=True, skip=flat)
    for name in flat:
        _add_fields(parser, hints[name])


def call(function, options: dict) -> None:
    """Call `function` with a parse's options (its FLAT dataclasses built from their fields, `*names` as words)."""
    options, args = dict(options), []
    options.pop("config", None)
    hints = typing.get_type_hints(function)
    for p in inspect.signature(function).parameters.values():
        if p.kind is p.VAR_POSITIONAL:
            args = options.pop(p.name) or []
        elif p.name in FLAT and dataclasses.is_dataclass(hints[p.name]):
            options[p.name] = _rebuild(hints[p.name], options)
    function(*args, **options)


def _helps(obj) -> dict[str, str]:
    from docstring_parser import parse

    return {d.arg_name: d.description for d in parse(obj.__doc__ or "").params}


def _flat(cls) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)
            if f.name in FLAT and dataclasses.is_dataclass(hints[f.name])}


def _add_fields(parser: ArgumentParser, cls) -> None:
    inner, hints = _flat(cls), typing.get_type_hints(cls)
    renamed = {f: RENAMED[f.name] for f in dataclasses.fields(cls) if f.name in RENAMED}
    parser.add_class_arguments(cls, None, as_group=False, instantiate=False, sub_configs=True,
                               skip={*inner, *(f.name for f in renamed)})
    for f, old in renamed.items():  # the field under both spellings
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        parser.add_argument(f"--{f.name}", old, type=hints[f.name], default=default, help=_helps(cls).get(f.name))
    for flat in inner.values():
        _add_fields(parser, flat)


def _rebuild(cls, options: dict):
    """A FLAT dataclass from its fields' options (taken out of `options`)."""
    inner = _flat(cls)
    return cls(**{f.name: _rebuild(inner[f.name], options) if f.name in inner else options.pop(f.name)
                  for f in dataclasses.fields(cls) if f.init})


def option_types(function) -> dict[str, type]:
    """Every option of `function` with its type: `--name`, `--group.field` and the FLAT dataclasses' fields."""
    def walk(hints: dict, prefix: str) -> dict[str, type]:
        found = {}
        for name, hint in hints.items():
            if dataclasses.is_dataclass(hint):
                flat = name in FLAT and prefix == "--"  # FLAT at the top level, or in a FLAT dataclass
                found |= walk(typing.get_type_hints(hint), prefix if flat else f"{prefix}{name}.")
            else:
                found[f"{prefix}{name}"] = hint
        return found

    params = [p.name for p in inspect.signature(function).parameters.values() if p.kind is not p.VAR_POSITIONAL]
    return walk({k: v for k, v in typing.get_type_hints(function).items() if k in params}, "--")


class RecipeFile(ActionConfigFile):
    """--config of one party's command: a recipe's sections it does not take are skipped, so that one recipe file
    serves both parties (any other unknown key is still an error)."""

    def __call__(self, parser, cfg, values, option_string=None):
        import yaml

        doc = yaml.safe_load(Path(values).read_text(encoding="utf-8")) if Path(str(values)).is_file() else None
        if isinstance(doc, dict):
            takes = parser.get_defaults()
            kept = {k: v for k, v in doc.items() if k not in RECIPE_SECTIONS
                    or (k in parser.groups if isinstance(v, dict) else k in takes)}
            values = values if kept == doc else json.dumps(kept)  # --config takes a YAML/JSON string too
        super().__call__(parser, cfg, values, option_string)


def _takes_list(hint) -> bool:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_takes_list(h) for h in typing.get_args(hint))
    return hint in (list, tuple) or typing.get_origin(hint) in (list, tuple, collections.abc.Sequence)


def usage_error(function, argv: list[str], error: ArgumentError, prog: str = "xsilo") -> str:
    """One line: for words given to a list option of `function` (None: LightningCLI's, whose types are not known
    here, so any option followed by several words), for a spelling that moved, else jsonargparse's message and
    where the options are listed (`prog --help`)."""
    message = " ".join(str(error).split())
    lists = {o for o, hint in (option_types(function) if function else {}).items() if _takes_list(hint)}
    lists |= {RENAMED[o[2:]] for o in lists if o[2:] in RENAMED}
    for i, option in enumerate(argv):
        rest = argv[i + 1:]
        given = rest[:next((j for j, w in enumerate(rest) if w.startswith("--")), len(rest))]
        listed = option in lists or (function is None and option.startswith("--") and len(given) > 1)
        if listed and given and not given[0].startswith("[") and (
                f'key "{option[2:]}"' in message or f'key "{option.rsplit(".", 1)[-1].lstrip("-")}"' in message
                or (len(given) > 1 and "unrecognized arguments" in message)):
            return (f"{option} takes one list: {option} '[{','.join(given)}]' (jsonargparse's list syntax; or "
                    f"{option}+ ITEM once per item)")
    moved = [MOVED[w] for w in argv if w in MOVED and f"unrecognized arguments: {w}" in message]
    return moved[0] if moved else f"{message} (options: {prog} --help)"

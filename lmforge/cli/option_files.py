"""Option files: a command's options written once in YAML (`--config run.yaml`), the command line on top.

The keys are the command's long option names, with dashes or underscores:

    method: lora
    lora-r: 16
    target_modules: q_proj,v_proj
    max-steps: 200
    packing: true
    out: runs/sft-lora

The file supplies defaults; any option also given on the command line wins. Values are checked
as the command line checks them (type, choices), and an unknown key fails with the nearest
option name.
"""

from __future__ import annotations

import argparse
import difflib
from pathlib import Path
from typing import Any

import yaml

from lmforge.errors import InputError

CONFIG_DEST = "option_file"


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    """Give a command's `parser` a `--config FILE.yaml` option (read by `apply_config_option`)."""
    parser.add_argument("--config", dest=CONFIG_DEST, metavar="RUN.yaml",
                        help="a YAML file of this command's options (e.g. `lora-r: 16`); the command line wins")


def apply_config_option(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """Before `parser` (the `lmforge` parser) parses `argv`: if the command takes `--config` and it is
    given, its file's options become the command's defaults, so the file may supply required options."""
    path = next((value for flag, value in zip(argv, argv[1:]) if flag == "--config"), None)
    path = path or next((arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")), None)
    commands = next((action.choices for action in parser._actions
                     if isinstance(action, argparse._SubParsersAction)), {})
    command = commands.get(argv[0]) if argv else None
    if path is None or command is None or not any(action.dest == CONFIG_DEST for action in command._actions):
        return
    apply_option_file(command, path)


def _read(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise InputError(f"--config {path}: no such file; give the path of a YAML file of options.")
    try:
        values = yaml.safe_load(file.read_text())
    except yaml.YAMLError as exc:
        raise InputError(f"--config {path}: not valid YAML ({exc}).") from None
    if not isinstance(values, dict):
        raise InputError(f"--config {path}: expected a mapping of option names to values (e.g. `lora-r: 16`), "
                         f"got {type(values).__name__}.")
    return values


def _checked(action: argparse.Action, key: str, value: Any, path: str) -> Any:
    where = f"--config {path}: {key}"
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise InputError(f"{where} is a switch; give true or false, not {value!r}.")
        return value
    if action.nargs not in (None, "?"):
        raise InputError(f"{where} takes several values and cannot come from a file; give it on the command line.")
    if isinstance(value, (dict, list)) or value is None:
        raise InputError(f"{where} needs one value, got {value!r}.")
    if action.type is not None:
        try:
            value = action.type(str(value))  # as if typed on the command line
        except (TypeError, ValueError) as exc:
            raise InputError(f"{where}: {value!r} is not a valid {getattr(action.type, '__name__', 'value')} "
                             f"({exc}).") from None
    elif not isinstance(value, str):
        value = str(value)
    if action.choices is not None and value not in action.choices:
        raise InputError(f"{where}: {value!r} is not one of {', '.join(map(str, action.choices))}.")
    return value


def apply_option_file(parser: argparse.ArgumentParser, path: str) -> None:
    """Make the options in YAML file `path` the defaults of `parser` (a command's parser)."""
    actions = {action.dest: action for action in parser._actions
               if action.option_strings and action.dest not in ("help", CONFIG_DEST)}
    actions.update({action.dest: action for action in parser._actions if not action.option_strings})
    defaults = {}
    for key, value in _read(path).items():
        dest = str(key).lstrip("-").replace("-", "_")
        if dest not in actions:
            names = [name.replace("_", "-") for name in actions]
            nearest = difflib.get_close_matches(str(key).replace("_", "-"), names, n=1)
            hint = f"; did you mean {nearest[0]!r}?" if nearest else f"; options are {', '.join(sorted(names))}"
            raise InputError(f"--config {path}: unknown option {key!r}{hint}")
        action = actions[dest]
        defaults[dest] = _checked(action, str(key), value, path)
        action.required = False  # the file gives it
    parser.set_defaults(**defaults)

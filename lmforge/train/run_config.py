"""Run configs: everything a pretraining run needs, in one typed tree read from YAML and the command line.

A run config has four sections, `model`, `tokenizer`, `data` and `training`, each a
dataclass whose fields are the keys of its YAML section. `load_run_config` starts from the
defaults, applies a YAML file, then `key=value` overrides with dotted keys
(`training.learning_rate=3e-4 model.layers=4`). Values are read as YAML reads them and
checked against the field's type, so a typo or a wrong type fails at once with the key,
the expected type and, for an unknown key, the nearest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.errors import ValidationError
from lmforge.train.tokenizer_trainer import OBJECTIVES
from lmforge.train.trainer import TrainingArguments

ARCHITECTURES = {"clm": "llama", "mlm": "bert"}  # the architecture each objective trains


@dataclass
class ModelSection:
    """The network built from scratch: a Llama-style decoder for clm, a BERT-style encoder for mlm."""

    architecture: str | None = None  # None: llama for objective clm, bert for mlm
    layers: int = 4
    hidden_size: int = 192
    heads: int = 4
    intermediate_size: int = 512
    context_length: int = 256  # most positions the model can attend over (max_position_embeddings)
    tie_embeddings: bool = True  # one matrix for the input embedding and the output head


@dataclass
class TokenizerSection:
    """The byte-level BPE tokenizer learned on the training split."""

    vocab_size: int = 4096
    min_frequency: int = 2


@dataclass
class DataSection:
    """Where the text comes from and how it is cut.

    `corpus` is a text/JSONL/CSV file or a folder (files matching `pattern`); None
    means the Python standard library's own .py files. `max_files` and
    `max_characters` keep a seeded random subset of the documents, for quick runs.
    """

    corpus: str | None = None
    pattern: str = "*.py"
    text_column: str = "text"  # the field holding the text in JSONL and CSV files
    validation: float = 0.02  # the fraction of documents held out
    block_size: int = 256  # tokens per training example
    max_files: int | None = None
    max_characters: int | None = None
    seed: int = 0  # the split and the subset


# Pretraining defaults that differ from TrainingArguments' own; every other field keeps its default.
TRAINING_DEFAULTS: dict[str, Any] = {
    "learning_rate": 2e-3, "weight_decay": 0.1, "warmup_ratio": 0.05, "lr_scheduler": "cosine",
    "max_steps": 1000, "per_device_batch_size": 16, "eval_steps": 100, "save_steps": 200,
}


def _training_section() -> type:
    """A dataclass with every field of TrainingArguments except output_dir (the run's folder gives it), so
    a field added to TrainingArguments is a config key at once; plus `max_minutes`, a wall-clock budget
    after which training stops at the end of the step."""
    hints = typing.get_type_hints(TrainingArguments)
    fields = []
    for f in dataclasses.fields(TrainingArguments):
        if f.name == "output_dir":
            continue
        if f.name in TRAINING_DEFAULTS:
            default = field(default=TRAINING_DEFAULTS[f.name])
        elif f.default is not dataclasses.MISSING:
            default = field(default=f.default)
        else:
            default = field(default_factory=f.default_factory)
        fields.append((f.name, hints[f.name], default))
    fields.append(("max_minutes", float | None, field(default=None)))

    def arguments(self, output_dir: str | Path) -> TrainingArguments:
        """The TrainingArguments these fields describe, writing checkpoints and logs to `output_dir`."""
        values = {name: value for name, value in dataclasses.asdict(self).items() if name != "max_minutes"}
        return TrainingArguments(output_dir=output_dir, **values)

    section = dataclasses.make_dataclass("TrainingSection", fields, namespace={"arguments": arguments})
    section.__module__, section.__doc__ = __name__, _training_section.__doc__
    return section


TrainingSection = _training_section()


@dataclass
class RunConfig:
    """A whole pretraining run. `objective` is clm (next-token prediction) or mlm (masked tokens)."""

    objective: str = "clm"
    model: ModelSection = field(default_factory=ModelSection)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    data: DataSection = field(default_factory=DataSection)
    training: TrainingSection = field(default_factory=TrainingSection)

    @property
    def architecture(self) -> str:
        return self.model.architecture or ARCHITECTURES.get(self.objective, "")

    def validate(self) -> None:
        """Check what the types alone cannot: choices and sizes that must agree with each other."""
        if self.objective not in OBJECTIVES:
            raise ValidationError(f"objective must be one of {', '.join(OBJECTIVES)}; got {self.objective!r}.")
        expected = ARCHITECTURES[self.objective]
        if self.architecture != expected:
            raise ValidationError(f"objective {self.objective} trains a {expected} model, not "
                                  f"model.architecture={self.architecture}; set model.architecture={expected} "
                                  "or leave it out.")
        if self.data.block_size > self.model.context_length:
            raise ValidationError(f"data.block_size={self.data.block_size} is longer than model.context_length="
                                  f"{self.model.context_length}; lower the block size or raise the context length.")
        if not 0 < self.data.validation < 1:
            raise ValidationError(f"data.validation is the fraction of documents held out and must be between 0 "
                                  f"and 1; got {self.data.validation}.")
        for key in ("data.block_size", "data.max_files", "data.max_characters"):
            value = get_value(self, key)
            if value is not None and value < 1:
                raise ValidationError(f"{key} must be >= 1, got {value}.")
        if self.training.max_minutes is not None and self.training.max_minutes <= 0:
            raise ValidationError(f"training.max_minutes must be > 0, got {self.training.max_minutes}.")
        self.training.arguments(".")  # TrainingArguments checks its own fields

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dicts, tuples as lists (YAML's safe dumper writes no tuples)."""
        return dataclasses.asdict(self, dict_factory=lambda items: {
            key: list(value) if isinstance(value, tuple) else value for key, value in items})

    def save(self, path: str | Path) -> Path:
        """Write the config as YAML: the complete record of a run, loadable with `load_run_config`."""
        yaml = _yaml()
        path = Path(path)
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        return path


# ----- keys and values ----------------------------------------------------------------------


def valid_keys(config: Any = None, prefix: str = "") -> list[str]:
    """Every dotted key of a run config, e.g. "training.learning_rate"."""
    config = RunConfig() if config is None else config
    keys = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            keys += valid_keys(value, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def get_value(config: RunConfig, key: str) -> Any:
    owner, name = _owner(config, key)
    return getattr(owner, name)


def set_value(config: RunConfig, key: str, value: Any) -> None:
    """Set a dotted key after checking (and, for floats, converting) the value against the field's type."""
    owner, name = _owner(config, key)
    hint = typing.get_type_hints(type(owner))[name]
    setattr(owner, name, _check(key, value, hint))


def _owner(config: RunConfig, key: str) -> tuple[Any, str]:
    """The section object holding `key` and the field's name in it; an unknown key suggests the nearest one."""
    keys = valid_keys()
    if key not in keys:
        by_name = [k for k in keys if k.endswith("." + key)]
        nearest = by_name or difflib.get_close_matches(key, keys, n=1)
        hint = f"did you mean {nearest[0]}?" if nearest else f"valid keys: {', '.join(keys)}."
        raise ValidationError(f"unknown config key {key!r}; {hint}")
    *sections, name = key.split(".")
    owner = config
    for section in sections:
        owner = getattr(owner, section)
    return owner, name


def _type_name(hint: Any) -> str:
    if hint is type(None):
        return "null"
    if isinstance(hint, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(hint))
    if typing.get_origin(hint) in (list, tuple):
        return f"a list of {_type_name(typing.get_args(hint)[0])}"
    return hint.__name__


def _check(key: str, value: Any, hint: Any) -> Any:
    """`value` if it fits the type `hint`: int, float, str, bool, a list or tuple of one of them (a single
    value becomes a list of one), or a union with None. Floats also accept ints and numeric text."""
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in allowed:
        return None
    for kind in allowed:
        if typing.get_origin(kind) in (list, tuple):
            items = value if isinstance(value, (list, tuple)) else [value]
            return typing.get_origin(kind)(_check(f"{key}[{i}]", item, typing.get_args(kind)[0])
                                           for i, item in enumerate(items))
        if kind is bool and isinstance(value, bool):
            return value
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind is float and isinstance(value, str):
            # YAML 1.1 reads 3e-4 (no dot) as a string; accept any text Python reads as a number.
            try:
                return float(value)
            except ValueError:
                pass
        if kind is str and isinstance(value, str):
            return value
    raise ValidationError(f"config key {key} must be {_type_name(hint)}, got {type(value).__name__} {value!r}.")


# ----- loading ----------------------------------------------------------------------------------


def _yaml():
    try:
        import yaml
    except ImportError as exc:
        raise ValidationError("run configs are YAML, which needs PyYAML: pip install pyyaml") from exc
    return yaml


def _flatten(data: Any, where: str, prefix: str = "") -> dict[str, Any]:
    """{"training": {"learning_rate": 1e-3}} → {"training.learning_rate": 1e-3}; sections must be mappings."""
    if not isinstance(data, dict):
        raise ValidationError(f"{where}: expected a mapping of keys to values at {prefix.rstrip('.') or 'the top'}, "
                              f"got {type(data).__name__}; write e.g. 'training:' then indented 'max_steps: 100'.")
    flat = {}
    sections = {key.rpartition(".")[0] for key in valid_keys()}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if dotted in sections:
            flat.update(_flatten(value if value is not None else {}, where, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def parse_override(text: str) -> tuple[str, Any]:
    """"training.learning_rate=3e-4" → ("training.learning_rate", 3e-4): the value read as YAML reads it,
    or as plain text when it is not valid YAML (data.pattern=*.py)."""
    key, sign, raw = text.partition("=")
    if not sign or not key.strip():
        raise ValidationError(f"override {text!r} is not key=value; write e.g. training.learning_rate=3e-4.")
    try:
        value = _yaml().safe_load(raw) if raw.strip() else None
    except _yaml().YAMLError:  # e.g. *.py, which YAML reads as an alias: plain text is what was meant
        value = raw
    return key.strip(), value


def load_run_config(path: str | Path | None = None, overrides: typing.Sequence[str] = (),
                    objective: str | None = None) -> RunConfig:
    """Defaults ← the YAML file at `path` ← `objective` ← `key=value` overrides, validated."""
    config = RunConfig()
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValidationError(f"config file {path} not found; pass the path of a YAML run config "
                                  "(see configs/pretrain-clm.yaml).")
        yaml = _yaml()
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ValidationError(f"{path}: not valid YAML ({exc}); fix the file.") from exc
        values.update(_flatten(data, str(path)))
    if objective is not None:
        values["objective"] = objective
    values.update(parse_override(text) for text in overrides)
    for key, value in values.items():
        set_value(config, key, value)
    config.validate()
    return config

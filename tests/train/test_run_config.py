"""Run configs: defaults, YAML, dotted overrides, type checks, nearest-key suggestions, cross-field checks."""

import dataclasses

import pytest

from lmforge.errors import ValidationError
from lmforge.train import TrainingArguments
from lmforge.train.run_config import (
    RunConfig,
    TrainingSection,
    _check,
    load_run_config,
    parse_override,
    valid_keys,
)


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_training_section_mirrors_training_arguments():
    """Every TrainingArguments field can be set from a run config (output_dir comes from --out), with
    pretraining defaults where they differ."""
    section = [f.name for f in dataclasses.fields(TrainingSection)]
    arguments = [f.name for f in dataclasses.fields(TrainingArguments)]
    assert section == [name for name in arguments if name != "output_dir"] + ["max_minutes"]
    args = TrainingSection(learning_rate=1e-3, max_steps=7).arguments("out")
    assert (args.output_dir, args.learning_rate, args.max_steps, args.lr_scheduler) == ("out", 1e-3, 7, "cosine")
    assert args.max_grad_norm == TrainingArguments("out", max_steps=1).max_grad_norm


def test_defaults_yaml_then_overrides(tmp_path):
    assert load_run_config() == RunConfig()
    path = write(tmp_path, "objective: mlm\nmodel:\n  layers: 6\ntraining:\n  learning_rate: 1e-3\n"
                           "  max_steps: 50\ndata:\n  corpus: notes/\n")
    config = load_run_config(path, ["training.learning_rate=3e-4", "model.hidden_size=256", "data.max_files=null"])
    assert config.objective == "mlm" and config.architecture == "bert"
    assert config.model.layers == 6 and config.model.hidden_size == 256  # from the file, from the override
    assert config.training.learning_rate == 3e-4 and isinstance(config.training.learning_rate, float)
    assert config.training.max_steps == 50 and config.data.corpus == "notes/" and config.data.max_files is None
    assert load_run_config(path, objective="clm").architecture == "llama"  # --objective beats the file


def test_values_are_parsed_as_yaml_and_converted_only_to_floats():
    config = load_run_config(overrides=["training.weight_decay=0", "training.max_grad_norm=null",
                                        "training.progress=false", "data.pattern=*.txt", "model.context_length=512"])
    assert config.training.weight_decay == 0.0 and isinstance(config.training.weight_decay, float)
    assert config.training.max_grad_norm is None and config.training.progress is False
    assert config.data.pattern == "*.txt" and config.model.context_length == 512
    assert parse_override("data.corpus=a=b.txt") == ("data.corpus", "a=b.txt")  # only the first = splits


def test_sequence_fields_take_lists_or_one_value():
    """TrainingArguments.report_to is a tuple of names: YAML gives a list, or a single name."""
    assert _check("training.report_to", ["a", "b"], tuple[str, ...]) == ("a", "b")
    assert _check("training.report_to", "a", tuple[str, ...]) == ("a",)
    with pytest.raises(ValidationError, match=r"config key training.report_to\[1\] must be str, got int 2"):
        _check("training.report_to", ["a", 2], tuple[str, ...])
    config = RunConfig()
    config.data.pattern = ("*.py", "*.txt")  # any tuple value
    assert config.to_dict()["data"]["pattern"] == ["*.py", "*.txt"]  # YAML's safe dumper writes lists, not tuples


@pytest.mark.parametrize("override,message", [
    ("model.layers=four", "config key model.layers must be int, got str 'four'"),
    ("model.layers=2.5", "config key model.layers must be int, got float 2.5"),
    ("model.layers=true", "config key model.layers must be int, got bool True"),
    ("training.bf16=1", "config key training.bf16 must be bool, got int 1"),
    ("training.learning_rate=fast", "config key training.learning_rate must be float, got str 'fast'"),
    ("training.max_steps=[1]", "config key training.max_steps must be int or null, got list [1]"),
    ("data.corpus=3", "config key data.corpus must be str or null, got int 3"),
])
def test_wrong_types_name_the_key_and_the_expected_type(override, message):
    with pytest.raises(ValidationError, match="^" + message.replace("[", r"\[").replace("]", r"\]")):
        load_run_config(overrides=[override])


@pytest.mark.parametrize("override,suggestion", [
    ("training.learning_rat=1.0", "training.learning_rate"),
    ("learning_rate=1.0", "training.learning_rate"),  # a field name without its section
    ("model.layer=2", "model.layers"),
    ("data.blocksize=64", "data.block_size"),
])
def test_unknown_keys_suggest_the_nearest(override, suggestion):
    with pytest.raises(ValidationError, match=f"unknown config key '{override.split('=')[0]}'; did you mean "
                                              f"{suggestion}\\?"):
        load_run_config(overrides=[override])


def test_unknown_keys_in_a_file_are_caught_too(tmp_path):
    with pytest.raises(ValidationError, match="unknown config key 'training.learnin_rate'; did you mean "
                                              "training.learning_rate"):
        load_run_config(write(tmp_path, "training:\n  learnin_rate: 0.1\n"))
    with pytest.raises(ValidationError, match="expected a mapping of keys to values at model"):
        load_run_config(write(tmp_path, "model: llama\n"))
    with pytest.raises(ValidationError, match="not valid YAML"):
        load_run_config(write(tmp_path, "model: [unclosed\n"))
    with pytest.raises(ValidationError, match="config file .*missing.yaml not found"):
        load_run_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("overrides,message", [
    (["objective=mlm", "model.architecture=llama"], "objective mlm trains a bert model, not model.architecture=llama"),
    (["objective=gan"], "objective must be one of clm, mlm; got 'gan'"),
    (["data.block_size=512"], "data.block_size=512 is longer than model.context_length=256"),
    (["data.validation=1.5"], "data.validation is the fraction of documents held out"),
    (["data.max_files=0"], "data.max_files must be >= 1, got 0"),
    (["training.max_minutes=0"], "training.max_minutes must be > 0"),
    (["training.max_steps=null"], "needs exactly one of max_steps and num_epochs"),  # TrainingArguments' own check
    (["training.learning_rate"], "override 'training.learning_rate' is not key=value"),
])
def test_inconsistent_settings_fail_with_a_fix(overrides, message):
    with pytest.raises(ValidationError, match=message):
        load_run_config(overrides=overrides)


def test_saved_config_loads_back_identically(tmp_path):
    config = load_run_config(overrides=["objective=mlm", "training.learning_rate=3e-4", "data.corpus=x",
                                        "training.max_minutes=2.5"])
    assert load_run_config(config.save(tmp_path / "saved.yaml")) == config
    assert "training.max_minutes" in valid_keys() and "model.layers" in valid_keys()

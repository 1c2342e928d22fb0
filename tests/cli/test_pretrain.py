"""`lmforge pretrain` on a tiny model and a small real corpus (the json package's source): the output folder
loads everywhere and generates, MLM trains an encoder, --resume continues exactly, errors are one line."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoTokenizer,
    SamplingParams,
)
from lmforge.cli import main
from lmforge.sources import resolve
from lmforge.train.corpus import load_corpus, stdlib_files, stdlib_folder

CORPUS = str(Path(json.__file__).parent)  # 5 files, ~48 kB of real Python
TINY = [f"data.corpus={CORPUS}", "data.validation=0.2", "data.block_size=32", "model.context_length=32",
        "model.layers=2", "model.hidden_size=32", "model.heads=2", "model.intermediate_size=64",
        "tokenizer.vocab_size=320", "training.per_device_batch_size=8", "training.eval_steps=10",
        "training.save_steps=10", "training.progress=false"]


def pretrain(out, *extra, objective="clm"):
    return main(["pretrain", "--objective", objective, *TINY, "training.max_steps=20", *extra, "--out", str(out)])


@pytest.fixture(scope="module")
def clm_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "clm"
    assert pretrain(out) == 0
    return out


def eval_losses(folder):
    records = [json.loads(line) for line in (folder / "checkpoints" / "log.jsonl").read_text().splitlines()]
    return [record["eval_loss"] for record in records if "eval_loss" in record]


def test_clm_run_saves_a_model_folder_that_loads_and_generates(clm_run, capsys):
    assert sorted(p.name for p in clm_run.iterdir()) == ["checkpoints", "config.json", "model.safetensors",
                                                          "run.yaml", "tokenizer.json", "tokenizer_config.json"]
    assert resolve(clm_run) == clm_run
    config = json.loads((clm_run / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(clm_run)
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert config["vocab_size"] == tokenizer.vocab_size == 320
    assert (config["eos_token_id"], config["pad_token_id"]) == (tokenizer.eos_token_id, tokenizer.pad_token_id)
    losses = eval_losses(clm_run)
    assert len(losses) == 2 and losses[1] < losses[0] < math.log(320)  # it learned something in 20 steps
    assert {"checkpoint-000010", "checkpoint-000020", "loss_curve.png"} <= {
        p.name for p in (clm_run / "checkpoints").iterdir()}

    model = AutoModelForCausalLM.from_pretrained(clm_run)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    expected = model.generate(tokenizer, "def ", params)[0].outputs[0].text
    assert main(["generate", "def ", "--model", str(clm_run), "--raw", "--temperature", "0", "--max-tokens", "6",
                 "--min-tokens", "6"]) == 0
    assert capsys.readouterr().out == expected


def test_clm_run_reports_loss_and_a_sample(tmp_path, capsys):
    assert pretrain(tmp_path / "run", "training.max_steps=4", "training.eval_steps=2") == 0
    stdout = capsys.readouterr().out
    assert "trained 4 steps; validation loss " in stdout and "perplexity" in stdout
    assert "sample (temperature 0.8):\ndef " in stdout


def test_resume_continues_exactly(clm_run, tmp_path, capsys):
    """Delete the last checkpoint and the final model of a 20-step run, resume from step 10: the same weights."""
    copy = tmp_path / "copy"
    shutil.copytree(clm_run, copy)
    shutil.rmtree(copy / "checkpoints" / "checkpoint-000020")
    (copy / "model.safetensors").unlink()
    (copy / "config.json").unlink()
    assert main(["pretrain", "--resume", "--out", str(copy)]) == 0
    assert "trained 20 steps" in capsys.readouterr().out
    logged = (copy / "checkpoints" / "log.jsonl").read_text().splitlines()
    before = len((clm_run / "checkpoints" / "log.jsonl").read_text().splitlines())
    assert {json.loads(line)["step"] for line in logged[before:]} == {20}  # steps 11-20 only were trained
    resumed, original = load_file(copy / "model.safetensors"), load_file(clm_run / "model.safetensors")
    assert resumed.keys() == original.keys()
    assert all(torch.equal(resumed[name], original[name]) for name in original)


def test_mlm_run_trains_an_encoder(tmp_path, capsys):
    out = tmp_path / "mlm"
    assert pretrain(out, "training.learning_rate=3e-3", objective="mlm") == 0
    assert "validation loss" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "bert" and config["architectures"] == ["BertForMaskedLM"]
    losses = eval_losses(out)
    assert losses[-1] < losses[0] < math.log(320) + 0.5

    model, tokenizer = AutoModelForMaskedLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    ids = tokenizer.encode("import json")
    assert ids[0] == tokenizer.token_to_id("[CLS]") and ids[-1] == tokenizer.token_to_id("[SEP]")
    with torch.no_grad():
        assert model(torch.tensor([ids])).logits.shape == (1, len(ids), 320)


@pytest.mark.parametrize("argv,message", [
    (["--out", "{tmp}/new", "--resume"], "holds no run to resume"),
    (["--out", "{tmp}/full", "--resume", "--config", "x.yaml"], "drop --config"),
    (["--out", "{tmp}/full", "--objective", "clm"], "already exists and is not empty; resume its run"),
    (["--out", "{tmp}/new", "training.learnng_rate=1"],
     "unknown config key 'training.learnng_rate'; did you mean training.learning_rate?"),
    (["--out", "{tmp}/new", "--objective", "mlm", "model.architecture=llama"], "objective mlm trains a bert model"),
    (["--out", "{tmp}/new", "model.hidden_size=30", "model.heads=4"], "hidden_size=30 must be a positive multiple"),
])
def test_errors_are_one_line_and_write_nothing(tmp_path, capsys, argv, message):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    assert main(["pretrain", *(a.format(tmp=tmp_path) for a in argv)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("lmforge: error: ") and message in error and error.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]


def test_stdlib_corpus_is_a_seeded_subset_without_installed_packages():
    files = stdlib_files()
    assert len(files) > 500 and not any("site-packages" in path.parts for path in files)
    assert all(path.is_relative_to(stdlib_folder()) for path in files)
    first, again, other = load_corpus(max_files=5), load_corpus(max_files=5), load_corpus(max_files=5, seed=1)
    assert [d.source for d in first] == [d.source for d in again] != [d.source for d in other]
    assert len(first) == 5 and all(d.source.endswith(".py") for d in first)
    budget = load_corpus(max_characters=20_000)
    assert sum(len(d.text) for d in budget[:-1]) < 20_000 <= sum(len(d.text) for d in budget)

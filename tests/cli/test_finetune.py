"""`lmforge finetune`: every method end to end on tiny models, the real all-MiniLM-L6-v2 on the stdlib demo, and
one-line errors for bad input."""

import csv
import json
import random

import pytest
import torch
from safetensors.torch import load_file

from lmforge import AutoModel, AutoModelForSequenceClassification
from lmforge.cli import main
from lmforge.peft import AdapterLinear
from tests.parity import id_tokenizer
from tests.peft.tiny import VOCAB, tiny


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    """Bare tiny BERT and Llama backbones saved with a tokenizer that reads ids written out ("5 17 3")."""
    folders = {}
    for model_type in ("bert", "llama"):
        folder = tmp_path_factory.mktemp(model_type)
        tiny(model_type, "base").save_pretrained(folder)
        id_tokenizer(VOCAB).save_pretrained(folder)
        folders[model_type] = folder
    return folders


def write_csv(path, rows, header=("text", "label")):
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture
def numbers_csv(tmp_path):
    """Learnable tiny data: a row of small ids is "low", a row of large ids is "high"."""
    rng = random.Random(0)
    rows = []
    for index in range(40):
        low = index % 2 == 0
        ids = [rng.randrange(3, 25) if low else rng.randrange(25, VOCAB) for _ in range(rng.randrange(3, 9))]
        rows.append((" ".join(map(str, ids)), "low" if low else "high"))
    return write_csv(tmp_path / "numbers.csv", rows)


def finetune(*args: str) -> int:
    return main(["finetune", *args, "--batch-size", "4"])


@pytest.mark.parametrize("method,trainable", [("full", None), ("frozen", 66), ("partial", None), ("adapter", None)])
def test_every_method_trains_and_saves_a_loadable_classifier(method, trainable, tiny_folders, numbers_csv, tmp_path,
                                                              capsys):
    out = tmp_path / "out"
    assert finetune(str(tiny_folders["bert"]), "--method", method, "--data", str(numbers_csv), "--epochs", "2",
                    "--lr", "1e-2", "--out", str(out)) == 0
    stdout = capsys.readouterr().out
    assert "-> BertForSequenceClassification, 2 labels: high, low" in stdout
    assert "32 training, 8 held-out examples" in stdout and "held-out    accuracy" in stdout
    record = json.loads((out / "finetune.json").read_text())
    assert record["method"] == method and record["steps"] == 16 and record["labels"] == ["high", "low"]
    assert {"accuracy", "macro_f1", "loss"} <= set(record["metrics"])
    if trainable is not None:  # the frozen method trains the 32 x 2 + 2 classifier only
        assert record["trainable_parameters"] == trainable and f"trainable params: {trainable} ||" in stdout
    defaults = {"partial": {"freeze_layers": 1}, "adapter": {"bottleneck": 64, "where": "both"}}  # 1: half of 2
    assert record["options"] == defaults.get(method, {})

    loaded = AutoModelForSequenceClassification.from_pretrained(out)
    assert loaded.config.extra["id2label"] == {"0": "high", "1": "low"}
    assert any(isinstance(m, AdapterLinear) for m in loaded.modules()) == (method == "adapter")
    original = AutoModel.from_pretrained(tiny_folders["bert"])
    same_embeddings = torch.equal(loaded.model.embed_tokens.weight, original.embed_tokens.weight)
    same_top_layer = torch.equal(loaded.model.layers[1].mlp.up_proj.weight, original.layers[1].mlp.up_proj.weight)
    assert same_embeddings == (method != "full")  # frozen, partial and adapter keep the embeddings as they were
    assert same_top_layer == (method in ("frozen", "adapter"))
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "finetune.json", "log.jsonl", "model.safetensors",
                                                     "tokenizer.json", "tokenizer_config.json"]


def test_the_seed_makes_a_run_reproducible(tiny_folders, numbers_csv, tmp_path):
    def weights(seed: str) -> dict:
        out = tmp_path / f"seed-{seed}-{len(list(tmp_path.iterdir()))}"
        assert finetune(str(tiny_folders["bert"]), "--method", "adapter", "--bottleneck", "4", "--data",
                        str(numbers_csv), "--max-steps", "3", "--seed", seed, "--out", str(out)) == 0
        return load_file(str(out / "model.safetensors"))

    first, again, other = weights("0"), weights("0"), weights("1")
    assert all(torch.equal(first[name], again[name]) for name in first)  # head and adapters start alike
    assert not torch.equal(first["classifier.weight"], other["classifier.weight"])


def test_a_decoder_fine_tunes_with_adapters(tiny_folders, numbers_csv, tmp_path, capsys):
    out = tmp_path / "llama"
    assert finetune(str(tiny_folders["llama"]), "--method", "adapter", "--bottleneck", "4", "--adapter-where", "ffn",
                    "--data", str(numbers_csv), "--max-steps", "3", "--out", str(out)) == 0
    assert "LlamaForSequenceClassification" in capsys.readouterr().out
    loaded = AutoModelForSequenceClassification.from_pretrained(out)
    assert loaded.config.extra["adapters"]["modules"] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]


def test_long_examples_need_truncate(tiny_folders, tmp_path, capsys):
    rows = [(" ".join(["7"] * (40 if index == 3 else 5)), str(index % 2)) for index in range(10)]
    data = write_csv(tmp_path / "long.csv", rows)
    args = [str(tiny_folders["bert"]), "--method", "frozen", "--data", str(data), "--max-steps", "1"]
    assert finetune(*args, "--out", str(tmp_path / "a")) == 2
    assert ("1 of 8 examples are longer than 32 tokens (the model's positions), e.g. " in capsys.readouterr().err)
    assert finetune(*args, "--max-length", "4", "--out", str(tmp_path / "a")) == 2
    assert "examples are longer than 4 tokens (--max-length)" in capsys.readouterr().err
    assert finetune(*args, "--truncate", "--out", str(tmp_path / "b")) == 0


@pytest.mark.parametrize("args,message", [
    (["--label-column", "category"], "no column 'category'; the columns are: text, label"),
    (["--method", "full", "--freeze-layers", "1"], "--freeze-layers applies to --method partial, not full"),
    (["--max-length", "100"], "--max-length must be from 1 to the model's 32 positions, got 100"),
    (["--epochs", "0"], "--epochs must be >= 1, got 0"),
])
def test_bad_arguments_are_one_line_errors(args, message, tiny_folders, numbers_csv, tmp_path, capsys):
    method = [] if "--method" in args else ["--method", "frozen"]
    assert finetune(str(tiny_folders["bert"]), *method, "--data", str(numbers_csv), *args,
                    "--out", str(tmp_path / "out")) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bad_data_are_one_line_errors(tiny_folders, tmp_path, capsys):
    def error(data) -> str:
        assert finetune(str(tiny_folders["bert"]), "--method", "frozen", "--data", str(data),
                        "--out", str(tmp_path / "out")) == 2
        return capsys.readouterr().err

    assert "it has a header but no rows" in error(write_csv(tmp_path / "empty.csv", []))
    assert "every example has the label 'a'; a classifier needs at least 2 classes" in \
        error(write_csv(tmp_path / "one.csv", [("1 2", "a"), ("3 4", "a")]))
    (tmp_path / "notes.txt").write_text("1 2 3\n")
    assert "expected a .csv or .jsonl file of labelled texts" in error(tmp_path / "notes.txt")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("keep")
    assert "already exists and is not empty" in error(tmp_path / "notes.txt")  # checked before reading anything


def test_unknown_method_and_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "--method", "lora", "--out", "x"])
    assert exit_info.value.code == 2 and "invalid choice: 'lora'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    assert "lmforge finetune --method adapter --out minilm-stdlib" in capsys.readouterr().out


def test_minilm_learns_the_stdlib_demo_with_adapters(tmp_path, capsys):
    """The real embedded model on the default data, a few steps: the frozen backbone is bit for bit MiniLM's."""
    out = tmp_path / "minilm"
    assert main(["finetune", "--method", "adapter", "--max-steps", "2", "--batch-size", "8", "--max-length", "24",
                 "--truncate", "--validation", "16", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "all-minilm-l6-v2 -> BertForSequenceClassification, 6 labels: asyncio, email, http, logging, unittest, xml" \
        in stdout
    assert "standard-library docstrings: 584 training, 16 held-out examples" in stdout
    loaded = AutoModelForSequenceClassification.from_pretrained(out)
    original = AutoModel.from_pretrained("all-minilm-l6-v2")
    for name in ("layers.5.mlp.down_proj.weight", "embed_tokens.weight", "pooler.dense.weight"):
        assert torch.equal(loaded.model.get_parameter(name), original.get_parameter(name))
    assert loaded.model.layers[5].mlp.down_proj.adapter.up.weight.any()  # trained away from its zero start

"""`lmforge sweep`: three tiny seeded trials write their table, plot and best config; the seed fixes the trials."""

import csv

import pytest

from lmforge import AutoTokenizer
from lmforge.cli import main
from lmforge.train.run_config import load_run_config
from lmforge.train.sweep import suggest
from tests.cli.test_pretrain import TINY

PARAMS = ["training.learning_rate", "training.warmup_ratio", "training.per_device_batch_size", "model.layers",
          "model.hidden_size"]


def sweep(out, *extra, trials=3, steps=8):
    return main(["sweep", "--objective", "clm", *TINY, *extra, "--trials", str(trials),
                 "--max-steps-per-trial", str(steps), "--out", str(out)])


def rows(out):
    with open(out / "sweep.csv", newline="") as file:
        return list(csv.DictReader(file))


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "out"
    assert sweep(out, "--seed", "3") == 0
    return out


def test_sweep_writes_table_plot_and_best_config(swept, capsys):
    assert {"sweep.csv", "sweep.md", "sweep.png", "best.yaml", "tokenizer", "trials"} <= {
        p.name for p in swept.iterdir()}
    assert AutoTokenizer.from_pretrained(swept / "tokenizer").vocab_size == 320  # a tokenizer-only folder resolves
    results = rows(swept)
    assert [row["trial"] for row in results] == ["0", "1", "2"]
    assert list(results[0]) == ["trial", "state", "eval_loss", "steps", "seconds", *PARAMS]
    assert {row["state"] for row in results} <= {"COMPLETE", "PRUNED"} and "COMPLETE" in {r["state"] for r in results}
    for row in results:
        assert float(row["eval_loss"]) > 0
        assert int(row["steps"]) == 8 if row["state"] == "COMPLETE" else 1 <= int(row["steps"]) < 8
        assert 0.2e-3 <= float(row["training.learning_rate"]) <= 20e-3  # a tenth to ten times the configured 2e-3
        assert row["model.layers"] in ("1", "2") and row["model.hidden_size"] in ("16", "32")

    table = (swept / "sweep.md").read_text().splitlines()
    assert table[0].startswith("| trial | state | eval_loss |") and len(table) == 5
    completed = [float(line.split("|")[3]) for line in table[2:] if "COMPLETE" in line]
    assert completed == sorted(completed)  # best first
    assert (swept / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    best = min((row for row in results if row["state"] == "COMPLETE"), key=lambda row: float(row["eval_loss"]))
    config = load_run_config(swept / "best.yaml")
    assert f"{config.training.learning_rate:.3g}" == best["training.learning_rate"]
    assert config.model.layers == int(best["model.layers"])
    assert config.training.max_steps == 1000  # the base config's, not the trial's 8
    assert config.model.intermediate_size == 2 * config.model.hidden_size  # the ratio of the base config


def test_the_seed_fixes_the_trials(swept, tmp_path):
    again, other = tmp_path / "again", tmp_path / "other"
    assert sweep(again, "--seed", "3", steps=1) == 0  # the first trials are sampled independently of the losses
    assert sweep(other, "--seed", "4", steps=1) == 0

    def params(out):
        return [[row[key] for key in PARAMS] for row in rows(out)]

    assert params(again) == params(swept) != params(other)


def test_search_space_stays_valid_for_the_heads():
    class Recorder:
        def suggest_float(self, name, low, high, log=False):
            return (low, high, log)

        def suggest_categorical(self, name, choices):
            return choices

    config = load_run_config(overrides=["model.hidden_size=36", "model.heads=6", "training.per_device_batch_size=1"])
    space = suggest(Recorder(), config)
    assert space["training.learning_rate"] == pytest.approx((2e-4, 2e-2, True))
    assert space["model.hidden_size"] == [36]  # 18 would give heads of width 3: rotary embeddings need it even
    assert space["training.per_device_batch_size"] == [1, 2] and space["model.layers"] == [2, 4]


def test_sweep_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("x")
    assert sweep(tmp_path / "used") == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert sweep(tmp_path / "new", trials=0) == 2
    assert "a sweep needs trials >= 1" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()

"""Hyperparameter search: many short pretraining runs, each judged by its validation loss.

Optuna's TPE sampler proposes a learning rate (log-uniform), a warmup ratio, a batch size
and a smaller or the configured architecture, around the run config; every trial is a
short pretraining run on the same tokenizer and token blocks, prepared once. Each trial
reports its validation loss several times; the median pruner stops a trial whose loss is
worse than the median of earlier trials at the same step, which spends the budget on
promising settings. Seeded: the same config and seed propose the same trials.
"""

from __future__ import annotations

import copy
import csv
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.errors import LMForgeError, ValidationError
from lmforge.train.pretrain import (
    PreparedData,
    build_model,
    build_trainer,
    model_config,
    prepare_data,
)
from lmforge.train.run_config import RunConfig, set_value
from lmforge.train.tokenizer_trainer import save_tokenizer
from lmforge.train.trainer import Trainer, TrainerCallback, TrainingDivergedError

logger = logging.getLogger(__name__)

RESULTS_CSV = "sweep.csv"
RESULTS_MD = "sweep.md"
PLOT = "sweep.png"
BEST_CONFIG = "best.yaml"
REPORTS_PER_TRIAL = 4  # evaluations (and pruning decisions) per trial


def _optuna():
    try:
        import optuna
    except ImportError as exc:
        raise LMForgeError("lmforge sweep needs Optuna: pip install lmforge[train]") from exc
    return optuna


def _halves(value: int, valid: Callable[[int], bool] = lambda v: v >= 1) -> list[int]:
    return sorted({v for v in (value // 2, value) if valid(v)})


def suggest(trial: Any, config: RunConfig) -> dict[str, Any]:
    """The trial's settings, keyed by run-config key, drawn from a space around `config`.

    learning rate: log-uniform from a tenth to ten times the configured one (a learning
    rate matters by its order of magnitude); warmup ratio: uniform in [0, 0.2]; batch size:
    half, the same or double; layers and hidden size: half or the configured value (the
    feed-forward width keeps its ratio to the hidden size, a head keeps an even width).
    """
    training, model = config.training, config.model
    heads = model.heads
    return {
        "training.learning_rate": trial.suggest_float("training.learning_rate", training.learning_rate / 10,
                                                      training.learning_rate * 10, log=True),
        "training.warmup_ratio": trial.suggest_float("training.warmup_ratio", 0.0, 0.2),
        "training.per_device_batch_size": trial.suggest_categorical(
            "training.per_device_batch_size", _halves(training.per_device_batch_size) +
            [training.per_device_batch_size * 2]),
        "model.layers": trial.suggest_categorical("model.layers", _halves(model.layers)),
        "model.hidden_size": trial.suggest_categorical(
            "model.hidden_size", _halves(model.hidden_size, lambda v: v > 0 and v % (2 * heads) == 0)),
    }


def apply_params(base: RunConfig, params: dict[str, Any]) -> RunConfig:
    """A copy of `base` with `params` (run-config keys); the feed-forward width keeps its ratio to the hidden size."""
    config = copy.deepcopy(base)
    for key, value in params.items():
        set_value(config, key, value)
    ratio = base.model.intermediate_size / base.model.hidden_size
    config.model.intermediate_size = max(1, round(config.model.hidden_size * ratio))
    return config


def trial_config(base: RunConfig, params: dict[str, Any], max_steps: int) -> RunConfig:
    """The run config of one trial: `base` with `params`, `max_steps` steps, evaluated REPORTS_PER_TRIAL times."""
    config = apply_params(base, params)
    config.training.max_steps, config.training.num_epochs = max_steps, None
    config.training.eval_steps = max(1, max_steps // REPORTS_PER_TRIAL)
    config.training.save_steps = 0
    config.training.max_minutes = None
    config.validate()
    return config


class PruningCallback(TrainerCallback):
    """Report each evaluation's loss to the Optuna trial; stop the run when the pruner says so."""

    def __init__(self, trial: Any):
        self.trial = trial
        self.pruned = False
        self.last: tuple[int, float] | None = None  # (step, loss) of the latest evaluation

    def on_evaluate(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        step = trainer.state.global_step
        self.last = (step, metrics["loss"])
        self.trial.report(metrics["loss"], step)
        if self.trial.should_prune():
            self.pruned = True
            trainer.state.should_stop = True


@dataclass
class TrialResult:
    number: int
    state: str  # COMPLETE, PRUNED or FAIL
    eval_loss: float | None  # final loss; for a pruned trial the last one it reported
    steps: int
    seconds: float
    params: dict[str, Any]


def _run_trial(trial: Any, base: RunConfig, data: PreparedData, out: Path, max_steps: int,
               log: Callable[[str], None]) -> float:
    optuna = _optuna()
    params = suggest(trial, base)
    config = trial_config(base, params, max_steps)
    folder = out / "trials" / f"trial-{trial.number:03d}"
    pruning = PruningCallback(trial)
    started = time.perf_counter()
    trainer = build_trainer(config, data, build_model(config, data.tokenizer), folder, [pruning])
    try:
        state = trainer.train()
    finally:
        trial.set_user_attr("seconds", time.perf_counter() - started)
        for checkpoint in folder.glob("checkpoint-*"):  # keep the logs; the settings are in best.yaml
            shutil.rmtree(checkpoint)
    trial.set_user_attr("steps", state.global_step)
    settings = ", ".join(f"{key.split('.')[-1]}={_format(value)}" for key, value in params.items())
    if pruning.pruned:
        log(f"trial {trial.number}: {settings}: pruned at step {state.global_step}, eval loss {pruning.last[1]:.4f}")
        raise optuna.TrialPruned()
    loss = pruning.last[1] if pruning.last and pruning.last[0] == state.global_step else trainer.evaluate()["loss"]
    log(f"trial {trial.number}: {settings}: eval loss {loss:.4f}")
    return loss


def run_sweep(config: RunConfig, out: str | Path, trials: int, max_steps_per_trial: int, seed: int | None = None,
              startup_trials: int = 2, log: Callable[[str], None] = logger.info) -> list[TrialResult]:
    """Search `trials` settings for `config`, each trained `max_steps_per_trial` steps; write the results to `out`.

    `out` gets the tokenizer (tokenizer/), each trial's log (trials/trial-NNN), sweep.csv,
    sweep.md (best first), sweep.png (validation loss against learning rate) and best.yaml
    (the run config of the best trial, to train fully with `lmforge pretrain --config`). The
    pruner only prunes once `startup_trials` trials have finished. `seed` (default: training.seed)
    seeds the sampler.
    """
    optuna = _optuna()
    if trials < 1 or max_steps_per_trial < 1:
        raise ValidationError(f"a sweep needs trials >= 1 and max_steps_per_trial >= 1; got {trials} and "
                              f"{max_steps_per_trial}.")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValidationError(f"{out} already exists and is not empty; choose another output folder.")
    config.validate()
    model_config(config)
    seed = config.training.seed if seed is None else seed
    data = prepare_data(config, progress=config.training.progress)
    save_tokenizer(data.tokenizer, out / "tokenizer")
    log(data.describe())

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=startup_trials))
    study.optimize(lambda trial: _run_trial(trial, config, data, out, max_steps_per_trial, log), n_trials=trials,
                   catch=(TrainingDivergedError,))
    results = [_result(trial) for trial in study.trials]
    write_results(results, out)
    best = min((r for r in results if r.state == "COMPLETE"), key=lambda r: r.eval_loss, default=None)
    if best is not None:
        apply_params(config, best.params).save(out / BEST_CONFIG)
    return results


def _result(trial: Any) -> TrialResult:
    state = trial.state.name
    if state == "COMPLETE":
        loss = trial.value
    elif trial.intermediate_values:
        loss = trial.intermediate_values[max(trial.intermediate_values)]
    else:
        loss = None
    return TrialResult(trial.number, state, loss, trial.user_attrs.get("steps", 0),
                       trial.user_attrs.get("seconds", 0.0), dict(trial.params))


def _format(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _sort_key(result: TrialResult) -> tuple[int, float]:
    """Completed trials by loss, then pruned ones by their last loss, then failures."""
    rank = {"COMPLETE": 0, "PRUNED": 1}.get(result.state, 2)
    loss = result.eval_loss if result.eval_loss is not None and math.isfinite(result.eval_loss) else math.inf
    return rank, loss


def write_results(results: list[TrialResult], out: Path) -> None:
    """sweep.csv (one row per trial, in trial order), sweep.md (best first) and sweep.png."""
    keys = list(dict.fromkeys(key for result in results for key in result.params))
    header = ["trial", "state", "eval_loss", "steps", "seconds", *keys]

    def row(result: TrialResult) -> list[Any]:
        loss = "" if result.eval_loss is None else f"{result.eval_loss:.4f}"
        return [result.number, result.state, loss, result.steps, f"{result.seconds:.1f}",
                *(_format(result.params[key]) if key in result.params else "" for key in keys)]

    with open(out / RESULTS_CSV, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows(row(result) for result in results)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, row(result))) + " |" for result in sorted(results, key=_sort_key)]
    (out / RESULTS_MD).write_text("\n".join(lines) + "\n")
    plot_results(results, out / PLOT)


def plot_results(results: list[TrialResult], path: Path) -> None:
    """Validation loss against learning rate, one marker per trial (pruned trials at their last report)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise LMForgeError("the sweep plot needs matplotlib: pip install lmforge[train]") from exc
    figure, axes = plt.subplots(figsize=(6, 4))
    for state, marker in (("COMPLETE", "o"), ("PRUNED", "x")):
        points = [(r.params["training.learning_rate"], r.eval_loss, r.number) for r in results
                  if r.state == state and r.eval_loss is not None and "training.learning_rate" in r.params]
        if points:
            axes.scatter([p[0] for p in points], [p[1] for p in points], marker=marker, label=state.lower())
            for lr, loss, number in points:
                axes.annotate(str(number), (lr, loss), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axes.set(xscale="log", xlabel="learning rate", ylabel="validation loss", title="sweep: loss vs learning rate")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)

"""The training loop: batches → forward → loss → backward → clip → AdamW → schedule, with evaluation,
checkpoints that resume exactly, early stopping, callbacks and logs.

One optimizer step may span several micro-batches (gradient accumulation), so a
large effective batch fits in a small memory. The loss of the step is the sum of
per-token losses over *all* its micro-batches divided by their total number of
target tokens: the gradient is then exactly that of one big batch, whatever the
sequence lengths. (Averaging per-micro-batch means would let a micro-batch of
short sequences weigh as much as one of long ones.)

Launched with `torchrun --nproc_per_node N`, the same Trainer trains data-parallel:
each process takes its share of every batch, DistributedDataParallel (or FSDP2's
`fully_shard`) averages the gradients, and the target-token count of the step is
summed over all processes, so N processes with batch B each compute exactly the
step one process computes with batch N×B.
"""

from __future__ import annotations

import csv
import inspect
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from lmforge.distributed.data_parallel import (
    DATA_PARALLEL,
    full_model_state,
    full_optimizer_state,
    gradient_sync,
    wrap_for_data_parallel,
)
from lmforge.distributed.process_group import all_reduce_sum, barrier, gather_objects, gather_tensors, init_distributed
from lmforge.errors import LMForgeError, ValidationError
from lmforge.registry import registered_task
from lmforge.train.checkpoint import (
    checkpoint_name,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from lmforge.train.collate import IGNORE_INDEX
from lmforge.train.metrics import (
    LOSS_TASKS,
    classification_metrics,
    count_targets,
    loss_sum,
)
from lmforge.train.optim import build_optimizer
from lmforge.train.schedules import build_scheduler

logger = logging.getLogger(__name__)

LOG_FILE = "log.jsonl"
LOG_TABLE = "log.csv"
LOSS_CURVE = "loss_curve.png"
TENSORBOARD_DIR = "tensorboard"
REPORT_TARGETS = ("tensorboard",)


class TrainingDivergedError(LMForgeError, FloatingPointError):
    """The loss or the gradient became NaN or infinite; training stopped before applying the update."""


@dataclass
class TrainingArguments:
    """How to train. Steps count optimizer updates; one update sees
    `per_device_batch_size × gradient_accumulation_steps` examples.

    Give `max_steps`, or `num_epochs` (the number of steps follows from the data).
    `warmup_ratio` is a fraction of the total steps, used when `warmup_steps` is 0.
    `eval_steps`, `save_steps` and `logging_steps` of 0 mean "never" (a checkpoint is
    still written at the end). `bf16` autocasts forward passes to bfloat16 on CUDA;
    on CPU training stays in float32. `gradient_checkpointing` recomputes each block's
    activations in the backward pass: less memory for about one more forward pass.

    Under torchrun, `per_device_batch_size` is per process (the global batch is N times
    larger) and `data_parallel` picks "ddp" (every process holds the whole model) or
    "fsdp" (parameters, gradients and optimizer state sharded over the processes).
    `find_unused_parameters` lets DDP train a model some of whose trainable weights get
    no gradient in a step (slower; DDP's error message says when it is needed).

    Logs go to `log.jsonl` as they happen and to `log.csv` at the end; `report_to=("tensorboard",)`
    also writes TensorBoard event files under `output_dir/tensorboard` (needs `tensorboard`).
    """

    output_dir: str | Path
    learning_rate: float = 5e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    lr_scheduler: str = "linear"
    max_steps: int | None = None
    num_epochs: int | None = None
    per_device_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = 1.0
    eval_steps: int = 0
    save_steps: int = 0
    logging_steps: int = 10
    seed: int = 0
    early_stopping_patience: int | None = None
    bf16: bool = True
    gradient_checkpointing: bool = False
    data_parallel: str = "ddp"
    find_unused_parameters: bool = False
    report_to: tuple[str, ...] = ()
    progress: bool = True

    def __post_init__(self) -> None:
        if (self.max_steps is None) == (self.num_epochs is None):
            raise ValidationError("TrainingArguments needs exactly one of max_steps and num_epochs; got "
                                  f"max_steps={self.max_steps}, num_epochs={self.num_epochs}.")
        for name in ("max_steps", "num_epochs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValidationError(f"TrainingArguments.{name} must be >= 1, got {value}.")
        if self.per_device_batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ValidationError("TrainingArguments.per_device_batch_size and gradient_accumulation_steps must be "
                                  f">= 1; got {self.per_device_batch_size} and {self.gradient_accumulation_steps}.")
        if not 0 <= self.warmup_ratio < 1:
            raise ValidationError(f"TrainingArguments.warmup_ratio must be in [0, 1), got {self.warmup_ratio}.")
        if self.learning_rate <= 0:
            raise ValidationError(f"TrainingArguments.learning_rate must be > 0, got {self.learning_rate}.")
        unknown = sorted(set(self.report_to) - set(REPORT_TARGETS))
        if unknown:
            raise ValidationError(f"TrainingArguments.report_to has unknown targets {unknown}; choose from "
                                  f"{', '.join(REPORT_TARGETS)} (JSONL and CSV logs are always written).")
        if self.data_parallel not in DATA_PARALLEL:
            raise ValidationError(f"TrainingArguments.data_parallel must be one of {', '.join(DATA_PARALLEL)}; "
                                  f"got {self.data_parallel!r}.")


@dataclass
class TrainerState:
    """Where the run is: `global_step` updates done, `epoch` and the micro-batches of it consumed."""

    global_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    best_eval_loss: float | None = None
    evals_without_improvement: int = 0
    last_checkpoint: str | None = None
    loss: float | None = None  # the loss of the latest step
    should_stop: bool = False  # set by a callback (or early stopping) to end training after this step
    history: list[dict[str, Any]] = field(default_factory=list)


class TrainerCallback:
    """Hooks the Trainer calls; subclass and override those you need. Set `trainer.state.should_stop`
    to end training early."""

    def on_step_end(self, trainer: Trainer) -> None:
        pass

    def on_evaluate(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        pass

    def on_save(self, trainer: Trainer, folder: Path) -> None:
        pass


def _tensorboard_writer(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValidationError("report_to=('tensorboard',) needs the tensorboard package: pip install tensorboard "
                              "(or lmforge[train]), or drop the option.") from None
    return SummaryWriter(str(folder))


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) at once."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def infer_task(model: torch.nn.Module) -> str:
    """The task a registered model class stands for (e.g. LlamaForCausalLM → "causal-lm")."""
    task = registered_task(model)
    if task in LOSS_TASKS:
        return task
    raise ValidationError(f"cannot tell which loss {type(model).__name__} trains with; pass task= one of "
                          f"{', '.join(LOSS_TASKS)}.")


class Trainer:
    """Train `model` on tokenized examples (dicts of lists, as `tokenize_documents` or `pack_sequences`
    make them) batched by `collator`. `train()` runs; `evaluate()` measures the eval set."""

    def __init__(self, model: torch.nn.Module, args: TrainingArguments, train_dataset: Sequence[dict],
                 collator: Callable[[Sequence[dict]], dict[str, torch.Tensor]],
                 eval_dataset: Sequence[dict] | None = None, task: str | None = None,
                 callbacks: Sequence[TrainerCallback] = ()):
        if len(train_dataset) == 0:
            raise ValidationError("train_dataset is empty; give the Trainer at least one example.")
        self.model, self.args, self.collator = model, args, collator
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.task = task or infer_task(model)
        if self.task not in LOSS_TASKS:
            raise ValidationError(f"task must be one of {', '.join(LOSS_TASKS)}; got {self.task!r}.")
        if args.gradient_checkpointing:
            if not hasattr(model, "set_gradient_checkpointing"):
                raise ValidationError(f"gradient_checkpointing needs an lmforge model; {type(model).__name__} has no "
                                      "set_gradient_checkpointing(); turn the option off.")
            model.set_gradient_checkpointing(True)
        self.callbacks = list(callbacks)
        self.output_dir = Path(args.output_dir)
        self.context = init_distributed()
        if self.context.device.type == "cuda":
            model.to(self.context.device)
        self.device = next(model.parameters()).device
        # `model` stays the user's module (evaluation, saving); `trained` runs the training forward.
        self.trained = wrap_for_data_parallel(model, self.context, args.data_parallel, args.find_unused_parameters)
        if self.context.is_distributed and self._collator_generator() is not None:
            # each process masks different examples: give each its own random stream, or all would mask alike
            self._collator_generator().manual_seed(self._collator_generator().initial_seed() + self.context.rank)
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if args.bf16 and self.device.type == "cuda"
                         else nullcontext())
        self._forward_names = set(inspect.signature(model.forward).parameters)
        self.global_batch_size = args.per_device_batch_size * self.context.world_size
        self.batches_per_epoch = math.ceil(len(train_dataset) / self.global_batch_size)
        steps_per_epoch = math.ceil(self.batches_per_epoch / args.gradient_accumulation_steps)
        self.total_steps = args.max_steps or args.num_epochs * steps_per_epoch
        warmup = args.warmup_steps or math.ceil(args.warmup_ratio * self.total_steps)
        self.optimizer = build_optimizer(model, args.learning_rate, args.weight_decay)
        self.scheduler = build_scheduler(self.optimizer, args.lr_scheduler, warmup, self.total_steps)
        self.state = TrainerState()
        self._tensorboard = None  # a SummaryWriter, opened by train() when report_to asks for it
        self._max_positions = getattr(getattr(model, "config", None), "context_length", None)
        self._order: tuple[int | None, list[int]] = (None, [])  # the current epoch's permutation, cached

    # ----- data -------------------------------------------------------------------------------

    def _epoch_order(self, epoch: int) -> list[int]:
        """The example order of `epoch`: a permutation seeded by (seed, epoch), so a resumed run replays it."""
        if self._order[0] != epoch:
            generator = torch.Generator().manual_seed(self.args.seed * 100_003 + epoch)
            self._order = (epoch, torch.randperm(len(self.train_dataset), generator=generator).tolist())
        return self._order[1]

    def _next_step_batches(self) -> list[dict[str, torch.Tensor]]:
        """This process's micro-batches of the next optimizer step (fewer at the end of an epoch);
        advances the position.

        Every process walks the same global order; of each global micro-batch, process r takes
        examples r, r+N, r+2N, ... Which process holds which example does not change the step,
        since losses are summed over tokens. A process left without an example (a last batch
        smaller than N) runs one with every label ignored: it adds nothing to loss or gradient
        but keeps the processes' collective operations in step.
        """
        if self.state.batches_in_epoch >= self.batches_per_epoch:
            self.state.epoch, self.state.batches_in_epoch = self.state.epoch + 1, 0
        order = self._epoch_order(self.state.epoch)
        size, rank, world = self.global_batch_size, self.context.rank, self.context.world_size
        first = self.state.batches_in_epoch
        last = min(first + self.args.gradient_accumulation_steps, self.batches_per_epoch)
        self.state.batches_in_epoch = last
        batches = []
        for b in range(first, last):
            chosen = order[b * size:(b + 1) * size]
            mine = chosen[rank::world]
            batch = self.collator([self.train_dataset[i] for i in mine or chosen[:1]])
            if not mine:
                batch["labels"] = torch.full_like(batch["labels"], IGNORE_INDEX)
            batches.append(batch)
        return batches

    def _forward(self, batch: dict[str, torch.Tensor], module: torch.nn.Module | None = None,
                 logits_from: int = 0) -> torch.Tensor:
        """The logits of `batch` (from position `logits_from` on; see `prediction_start`)."""
        length = batch["input_ids"].shape[-1]
        if self._max_positions is not None and length > self._max_positions:
            raise ValidationError(f"a batch holds sequences of {length} tokens but the model attends over at most "
                                  f"{self._max_positions} positions; tokenize with max_length={self._max_positions} "
                                  "and truncation=True, or pack into shorter blocks.")
        inputs = {k: v.to(self.device) for k, v in batch.items() if k != "labels" and k in self._forward_names}
        if logits_from:
            inputs["logits_to_keep"] = length - logits_from
        with self.autocast:
            return (module or self.model)(**inputs).logits

    # ----- one optimizer step -------------------------------------------------------------------

    def count_targets(self, batch: dict[str, torch.Tensor]) -> int:
        """How many units (target tokens, examples) the loss of `batch` sums over. Override with
        `loss_sum` for another objective (DPO counts preference pairs)."""
        return count_targets(self.task, batch["labels"])

    def prediction_start(self, labels: torch.Tensor) -> int:
        """The first position whose next-token logits any target needs, for a causal LM that can skip the
        others (`logits_to_keep`); 0 otherwise.

        SFT and preference data label only the answers: the vocabulary projection of every prompt
        position before the first answer would be computed for nothing (for SmolLM2 the head is a
        fifth of the forward pass, and its logits the largest activation).
        """
        if self.task != "causal-lm" or "logits_to_keep" not in self._forward_names:
            return 0
        targets = (labels != IGNORE_INDEX).any(0).nonzero()
        return max(int(targets[0]) - 1, 0) if len(targets) else 0

    def loss_sum(self, batch: dict[str, torch.Tensor], module: torch.nn.Module) -> torch.Tensor:
        """The summed (not averaged) loss of `batch`, computed with `module`."""
        labels = batch["labels"].to(self.device)
        start = self.prediction_start(labels)
        return loss_sum(self.task, self._forward(batch, module, start), labels[:, start:] if start else labels)

    def accumulate_gradients(self, batches: list[dict[str, torch.Tensor]]) -> float:
        """Backpropagate the loss of one optimizer step over its micro-batches; return that loss.

        Each micro-batch contributes (sum of its token losses) / (target tokens of the whole step),
        so the accumulated gradient equals that of the concatenated batch. With N processes the
        target count is summed over all of them and each loss is scaled by N, because data
        parallelism averages the N gradients; gradients are exchanged once, after the last micro-batch.
        """
        local = sum(self.count_targets(batch) for batch in batches)
        total = all_reduce_sum(local, self.context)
        if total == 0:
            raise ValidationError(f"step {self.state.global_step + 1}: no label in its batches is a target (all "
                                  "are -100); check the collator (causal_lm_labels=True?) and the data.")
        scale = self.context.world_size / total
        self.trained.train()
        loss = 0.0
        for index, batch in enumerate(batches):
            with gradient_sync(self.trained, enabled=index == len(batches) - 1):
                micro = self.loss_sum(batch, self.trained) * scale
                micro.backward()
            loss += micro.item()
        return all_reduce_sum(loss, self.context) / self.context.world_size

    def training_step(self, batches: list[dict[str, torch.Tensor]]) -> tuple[float, float]:
        """Accumulate gradients over `batches`, clip them, update; return (loss, gradient norm)."""
        loss = self.accumulate_gradients(batches)
        parameters = [p for group in self.optimizer.param_groups for p in group["params"]]
        norm = torch.nn.utils.clip_grad_norm_(parameters, self.args.max_grad_norm or float("inf"))
        norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()  # FSDP: a DTensor
        if not (math.isfinite(loss) and math.isfinite(norm)):
            self.optimizer.zero_grad(set_to_none=True)
            where = (f"the last good checkpoint is {self.state.last_checkpoint}" if self.state.last_checkpoint
                     else "no checkpoint was saved yet")
            raise TrainingDivergedError(
                f"step {self.state.global_step + 1}: loss {loss}, gradient norm {norm} is not finite, so the update "
                f"was not applied; {where}. Lower learning_rate, set max_grad_norm, add warmup, or check the "
                "data for empty or corrupt examples, then resume.")
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, norm

    def step_tokens(self, batches: list[dict[str, torch.Tensor]]) -> int:
        """The tokens this process's step ran through, for the logged tokens_per_second (an RL trainer
        counts the prompts and completions it generated)."""
        return sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
                   for b in batches)

    def step_metrics(self) -> dict[str, float]:
        """Quantities a subclass adds to each training log record (an RL trainer: mean reward, KL, ...)."""
        return {}

    # ----- the loop -------------------------------------------------------------------------------

    def train(self, resume_from: str | Path | None = None) -> TrainerState:
        """Run until `max_steps` (or `num_epochs`), early stopping, or a callback's `should_stop`.

        `resume_from` is a checkpoint folder or "latest" (the newest under `output_dir`): model,
        optimizer, schedule, RNGs and data position are restored, so the run continues as if it
        had never stopped.
        """
        self.output_dir.mkdir(parents=True, exist_ok=True)
        set_seed(self.args.seed)
        if resume_from is not None:
            self._resume(resume_from)
        if "tensorboard" in self.args.report_to and self.context.is_main:
            self._tensorboard = _tensorboard_writer(self.output_dir / TENSORBOARD_DIR)
        bar = tqdm(total=self.total_steps, initial=self.state.global_step,
                   disable=not (self.args.progress and self.context.is_main), desc="train")
        try:
            while self.state.global_step < self.total_steps and not self.state.should_stop:
                started = time.perf_counter()
                batches = self._next_step_batches()
                lr = self.scheduler.get_last_lr()[0]
                loss, norm = self.training_step(batches)
                self.state.global_step += 1
                self.state.loss = loss
                tokens = all_reduce_sum(self.step_tokens(batches), self.context)
                speed = tokens / max(time.perf_counter() - started, 1e-9)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{speed:.0f}")
                step = self.state.global_step
                if self.args.logging_steps and step % self.args.logging_steps == 0:
                    self._log({"step": step, "epoch": self.state.epoch, "loss": loss, "lr": lr, "grad_norm": norm,
                               "tokens_per_second": speed, **self.step_metrics()})
                for callback in self.callbacks:
                    callback.on_step_end(self)
                if self.eval_dataset is not None and self.args.eval_steps and step % self.args.eval_steps == 0:
                    self._evaluate_and_maybe_stop()
                if self.args.save_steps and step % self.args.save_steps == 0:
                    self.save()
        finally:
            bar.close()
            if self._tensorboard is not None:
                self._tensorboard.close()
                self._tensorboard = None
        if self.state.last_checkpoint != str(self.output_dir / checkpoint_name(self.state.global_step)):
            self.save()
        if self.context.is_main:
            self._write_log_table()
            self._plot_loss_curve()
        return self.state

    def _resume(self, resume_from: str | Path) -> None:
        folder = latest_checkpoint(self.output_dir) if resume_from == "latest" else Path(resume_from)
        if folder is None:
            raise ValidationError(f"resume_from='latest' but {self.output_dir} holds no checkpoint-NNNNNN folder; "
                                  "train without resume_from first, or pass a checkpoint folder.")
        saved = load_checkpoint(folder, self.model, self.optimizer, self.scheduler)
        self.state = TrainerState(**{**saved["trainer"], "history": []})
        if "collator_rng" in saved:
            states = saved["collator_rng"]  # one generator state per process
            if len(states) != self.context.world_size:
                raise ValidationError(f"{folder} was saved by {len(states)} process(es) drawing MLM masks, this run "
                                      f"has {self.context.world_size}; resume with the same number of processes.")
            self._collator_generator().set_state(torch.tensor(states[self.context.rank], dtype=torch.uint8))
        self.state.last_checkpoint = str(folder)
        if saved["seed"] != self.args.seed:
            logger.warning("resuming %s with seed %d, saved with %d: the data order will differ from the "
                           "original run.", folder, self.args.seed, saved["seed"])

    def _log(self, record: dict[str, Any]) -> None:
        self.state.history.append(record)
        if self.context.is_main:
            with open(self.output_dir / LOG_FILE, "a") as log:
                log.write(json.dumps(record) + "\n")
        if self._tensorboard is not None:
            for name, value in record.items():
                if name != "step" and isinstance(value, (int, float)):
                    self._tensorboard.add_scalar(name, value, record["step"])

    def _write_log_table(self) -> None:
        """`log.csv`: one row per log record of this run, one column per quantity ever logged."""
        if not self.state.history:
            return
        columns = list(dict.fromkeys(name for record in self.state.history for name in record))
        with open(self.output_dir / LOG_TABLE, "w", newline="") as table:
            writer = csv.DictWriter(table, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.state.history)

    def _evaluate_and_maybe_stop(self) -> None:
        metrics = self.evaluate()
        self._log({"step": self.state.global_step, **{f"eval_{k}": v for k, v in metrics.items()}})
        for callback in self.callbacks:
            callback.on_evaluate(self, metrics)
        if self.state.best_eval_loss is None or metrics["loss"] < self.state.best_eval_loss:
            self.state.best_eval_loss, self.state.evals_without_improvement = metrics["loss"], 0
        else:
            self.state.evals_without_improvement += 1
            patience = self.args.early_stopping_patience
            if patience is not None and self.state.evals_without_improvement >= patience:
                logger.info("early stopping at step %d: eval loss has not improved on %.4f for %d evaluations.",
                            self.state.global_step, self.state.best_eval_loss, patience)
                self.state.should_stop = True

    # ----- evaluation ----------------------------------------------------------------------------

    def evaluation_batches(self, dataset: Sequence[dict]) -> Iterator[tuple[dict[str, torch.Tensor], bool]]:
        """This process's batches of `dataset`, each with whether it counts.

        With N processes each evaluates every N-th batch; all run the same number of forward
        passes (a process out of batches repeats the last one, which does not count), since a
        sharded model gathers its weights collectively in every forward.
        """
        size, rank, world = self.args.per_device_batch_size, self.context.rank, self.context.world_size
        starts = range(0, len(dataset), size)
        for index in range(rank, world * math.ceil(len(starts) / world), world):
            start = starts[min(index, len(starts) - 1)]
            yield self.collator([dataset[i] for i in range(start, min(start + size, len(dataset)))]), \
                index < len(starts)

    @torch.no_grad()
    def evaluate(self, dataset: Sequence[dict] | None = None) -> dict[str, float]:
        """Per-token loss over the whole set (sum / count, not a mean of batch means), with perplexity
        for language models and accuracy + macro F1 for classification. With N processes the
        sums of all processes' batches are added up.
        """
        dataset = self.eval_dataset if dataset is None else dataset
        if not dataset:
            raise ValidationError("evaluate() needs a non-empty dataset; pass one or set eval_dataset.")
        self.model.eval()
        total_loss, total_count, predictions, labels = 0.0, 0, [], []
        for batch, counted in self.evaluation_batches(dataset):
            logits, target = self._forward(batch), batch["labels"].to(self.device)
            if not counted:
                continue
            total_loss += loss_sum(self.task, logits, target).item()
            total_count += count_targets(self.task, target)
            if self.task.endswith("classification"):
                predictions.append(logits.argmax(-1).flatten().cpu())
                labels.append(target.flatten().cpu())
        self.model.train()
        loss = all_reduce_sum(total_loss, self.context) / max(all_reduce_sum(total_count, self.context), 1)
        if self.task.endswith("classification"):
            predictions = gather_tensors(torch.cat(predictions) if predictions else torch.zeros(0, dtype=torch.long),
                                         self.context)
            labels = gather_tensors(torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long), self.context)
            return {"loss": loss, **classification_metrics(predictions, labels)}
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}

    # ----- checkpoints ------------------------------------------------------------------------------

    def save(self) -> Path:
        """Write `output_dir/checkpoint-NNNNNN` (step number) atomically; see lmforge.train.checkpoint."""
        trainer = {k: v for k, v in asdict(self.state).items() if k not in ("history", "should_stop")}
        saved = {"trainer": trainer, "seed": self.args.seed, "total_steps": self.total_steps}
        if self._collator_generator() is not None:  # MLMCollator draws its masks from its own generator
            saved["collator_rng"] = gather_objects(self._collator_generator().get_state().tolist(), self.context)
        folder = self.output_dir / checkpoint_name(self.state.global_step)
        model_state = full_model_state(self.model)  # collective under FSDP: every process takes part
        optimizer_state = full_optimizer_state(self.model, self.optimizer)
        if self.context.is_main:
            save_checkpoint(folder, self.model, self.optimizer, self.scheduler, saved, model_state, optimizer_state)
        barrier(self.context)  # nobody reads or prunes checkpoints before rank 0 has written this one
        self.state.last_checkpoint = str(folder)
        for callback in self.callbacks:
            callback.on_save(self, folder)
        return folder

    def _collator_generator(self) -> torch.Generator | None:
        generator = getattr(self.collator, "generator", None)
        return generator if isinstance(generator, torch.Generator) else None

    def _plot_loss_curve(self) -> None:
        """Draw loss against step to `loss_curve.png` when matplotlib is installed (it is optional)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        train = [(r["step"], r["loss"]) for r in self.state.history if "loss" in r]
        evals = [(r["step"], r["eval_loss"]) for r in self.state.history if "eval_loss" in r]
        if not train:
            return
        figure, axes = plt.subplots(figsize=(6, 4))
        axes.plot(*zip(*train), label="train")
        if evals:
            axes.plot(*zip(*evals), marker="o", label="eval")
        axes.set(xlabel="step", ylabel="loss", title="loss")
        axes.legend()
        figure.savefig(self.output_dir / LOSS_CURVE, dpi=100)
        plt.close(figure)

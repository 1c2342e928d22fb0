"""Pretraining from scratch: corpus → split → BPE tokenizer → token blocks → a new model → Trainer.

The validation documents are held out *before* the tokenizer is trained, so not even the
vocabulary has seen them. A causal LM (clm) reads packed blocks: documents joined with
EOS and cut into equal lengths. A masked LM (mlm) reads blocks too, each opened with
[CLS] and with [SEP] between documents (RoBERTa's "full sentences"), and the MLM collator
masks 15% of their tokens afresh in every batch. `prepare_data` is the whole data side, so
another model (a baseline, a benchmark) can train on exactly the same blocks.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from lmforge.errors import InputError
from lmforge.registry import AutoConfig, model_class
from lmforge.tokenizer import Tokenizer
from lmforge.train.callbacks import TimeBudget
from lmforge.train.checkpoint import latest_checkpoint
from lmforge.train.collate import MLMCollator, PaddingCollator, pack_sequences
from lmforge.train.corpus import load_corpus
from lmforge.train.data import Document, iter_texts, train_validation_split
from lmforge.train.run_config import RunConfig
from lmforge.train.tokenizer_trainer import save_tokenizer, train_bpe_tokenizer
from lmforge.train.trainer import Trainer, TrainerCallback, TrainerState

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"  # the Trainer's folder inside a run's output folder
RUN_CONFIG = "run.yaml"
TASKS = {"clm": "causal-lm", "mlm": "masked-lm"}


@dataclasses.dataclass
class PreparedData:
    """The tokenizer and the token blocks of both splits (dicts of lists, as the collators take them)."""

    tokenizer: Tokenizer
    train: list[dict[str, list[int]]]
    validation: list[dict[str, list[int]]]

    def describe(self) -> str:
        tokens = sum(len(block["input_ids"]) for block in self.train)
        return (f"{len(self.train)} training blocks ({tokens:,} tokens), {len(self.validation)} validation blocks, "
                f"vocabulary {self.tokenizer.vocab_size}")


def token_blocks(documents: Sequence[Document], tokenizer: Tokenizer, objective: str, block_size: int,
                 split: str = "training") -> list[dict[str, list[int]]]:
    """Tokenize `documents` and pack them into blocks of `block_size` tokens for `objective`."""
    encodings = tokenizer.backend.encode_batch([document.text for document in documents], add_special_tokens=False)
    sequences = [encoding.ids for encoding in encodings]
    available = sum(len(ids) + 1 for ids in sequences)
    if available < block_size:
        raise InputError(f"the {split} split has {available} tokens, fewer than one block of {block_size}; "
                         "lower data.block_size, raise data.validation, or use more data.")
    if objective == "clm":
        return pack_sequences(sequences, block_size, eos_token_id=tokenizer.eos_token_id)
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    blocks = pack_sequences(sequences, block_size - 1, eos_token_id=sep_id)
    return [{"input_ids": [cls_id, *block["input_ids"]], "attention_mask": [1] * (len(block["input_ids"]) + 1)}
            for block in blocks]


def prepare_data(config: RunConfig, tokenizer: Tokenizer | None = None, progress: bool = False) -> PreparedData:
    """Read the corpus, hold out the validation documents, train a tokenizer on the rest (unless one is
    given, e.g. when resuming) and cut both splits into token blocks. Same config, same blocks."""
    data = config.data
    documents = load_corpus(data.corpus, data.pattern, data.text_column, data.max_files, data.max_characters,
                            data.seed)
    split = train_validation_split(documents, data.validation, seed=data.seed)
    if tokenizer is None:
        tokenizer = train_bpe_tokenizer(iter_texts(split.train), config.tokenizer.vocab_size,
                                        config.tokenizer.min_frequency, config.objective,
                                        model_max_length=config.model.context_length, progress=progress)
    return PreparedData(tokenizer,
                        token_blocks(split.train, tokenizer, config.objective, data.block_size),
                        token_blocks(split.validation, tokenizer, config.objective, data.block_size, "validation"))


def model_config(config: RunConfig, tokenizer: Tokenizer | None = None):
    """The architecture's own config (LlamaConfig, BertConfig) for the run; its special token ids come from
    `tokenizer`. Without one, the vocabulary size is the configured one: enough to check the shapes early."""
    model = config.model
    vocab_size = config.tokenizer.vocab_size if tokenizer is None else tokenizer.vocab_size
    fields: dict[str, Any] = {
        "vocab_size": vocab_size, "hidden_size": model.hidden_size, "intermediate_size": model.intermediate_size,
        "num_hidden_layers": model.layers, "num_attention_heads": model.heads,
        "max_position_embeddings": model.context_length, "tie_word_embeddings": model.tie_embeddings,
    }
    if tokenizer is not None:
        fields["pad_token_id"] = tokenizer.pad_token_id
        if config.objective == "clm":
            fields.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return AutoConfig.for_model(config.architecture, **fields)


def build_model(config: RunConfig, tokenizer: Tokenizer) -> torch.nn.Module:
    """A new, randomly initialised model (seeded by training.seed) for the objective: decoder or encoder."""
    torch.manual_seed(config.training.seed)
    architecture = model_config(config, tokenizer)
    return model_class(config.architecture, TASKS[config.objective]).from_config(architecture)


def build_trainer(config: RunConfig, data: PreparedData, model: torch.nn.Module, output_dir: str | Path,
                  callbacks: Sequence[TrainerCallback] = ()) -> Trainer:
    """A Trainer over the training blocks that evaluates on the validation blocks, with the objective's
    collator and, when training.max_minutes is set, a TimeBudget."""
    tokenizer = data.tokenizer
    if config.objective == "clm":
        collator = PaddingCollator(pad_token_id=tokenizer.pad_token_id, causal_lm_labels=True)
    else:
        collator = MLMCollator.from_tokenizer(tokenizer, seed=config.training.seed)
    callbacks = list(callbacks)
    if config.training.max_minutes is not None:
        callbacks.append(TimeBudget(config.training.max_minutes))
    return Trainer(model, config.training.arguments(output_dir), data.train, collator,
                   eval_dataset=data.validation, callbacks=callbacks)


@dataclasses.dataclass
class PretrainResult:
    model: torch.nn.Module
    tokenizer: Tokenizer
    state: TrainerState
    metrics: dict[str, float]  # the final evaluation on the validation blocks
    folder: Path


def check_run_folder(out: Path, resume: bool) -> None:
    """A new run needs an absent or empty folder; a resumed one needs the folder of an earlier run."""
    if resume:
        if latest_checkpoint(out / CHECKPOINTS) is None or not (out / RUN_CONFIG).is_file():
            raise InputError(f"{out} holds no run to resume (no {RUN_CONFIG} and {CHECKPOINTS}/checkpoint-NNNNNN); "
                             "start the run without resuming.")
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out} already exists and is not empty; resume its run, or choose another output folder.")


def pretrain(config: RunConfig, out: str | Path, resume: bool = False,
             log: Callable[[str], None] = logger.info) -> PretrainResult:
    """Pretrain a model from scratch into `out`, or continue the run there (`resume`).

    `out` gets the tokenizer and the run config at the start, the Trainer's checkpoints
    and logs in `out/checkpoints`, and at the end the model (config.json +
    model.safetensors): a folder every lmforge loader accepts. A resumed run reuses the
    saved tokenizer, so its token blocks are the same.
    """
    out = Path(out)
    config.validate()
    model_config(config)  # shapes that cannot work fail now, not after the data is prepared
    check_run_folder(out, resume)
    tokenizer = Tokenizer.from_folder(out) if resume else None
    log("preparing the data" + ("" if resume else " and training the tokenizer"))
    data = prepare_data(config, tokenizer, progress=config.training.progress)
    log(data.describe())
    out.mkdir(parents=True, exist_ok=True)  # only now: a run whose data fails leaves no folder behind
    config.save(out / RUN_CONFIG)
    if not resume:
        save_tokenizer(data.tokenizer, out)
    model = build_model(config, data.tokenizer)
    log(f"{type(model).__name__}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    trainer = build_trainer(config, data, model, out / CHECKPOINTS)
    state = trainer.train(resume_from="latest" if resume else None)
    metrics = trainer.evaluate()
    model.save_pretrained(out)
    return PretrainResult(model, data.tokenizer, state, metrics, out)

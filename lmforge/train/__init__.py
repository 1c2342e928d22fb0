"""Training: data → collate (pad, pack, mask) → forward → loss → backward → optimizer.

`data` reads, splits and tokenizes documents (`stdlib_data` makes a classification
set that needs no download); `collate` turns tokenized examples into batches;
`tokenizer_trainer` learns a BPE vocabulary for a model trained from scratch;
`trainer` runs the loop with `optim` (AdamW), `schedules` (warmup + decay),
`metrics` (token-summed losses) and `checkpoint` (exact resume). `run_config`,
`corpus` and `pretrain` train a model from scratch (`lmforge pretrain`), `sweep` searches
its hyperparameters. See docs/training.md.
"""

from lmforge.train.callbacks import TimeBudget
from lmforge.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from lmforge.train.collate import (
    IGNORE_INDEX,
    MLMCollator,
    PaddingCollator,
    pack_sequences,
)
from lmforge.train.corpus import load_corpus
from lmforge.train.data import (
    Document,
    Split,
    from_hf_dataset,
    iter_texts,
    label_vocabulary,
    load_documents,
    read_csv,
    read_jsonl,
    read_text,
    shuffled,
    tokenize_documents,
    train_validation_split,
)
from lmforge.train.metrics import classification_metrics
from lmforge.train.optim import build_optimizer
from lmforge.train.pretrain import PreparedData, prepare_data
from lmforge.train.run_config import RunConfig, load_run_config
from lmforge.train.schedules import build_scheduler, lr_multiplier
from lmforge.train.stdlib_data import stdlib_docstrings
from lmforge.train.tokenizer_trainer import save_tokenizer, train_bpe_tokenizer
from lmforge.train.trainer import (
    Trainer,
    TrainerCallback,
    TrainerState,
    TrainingArguments,
    TrainingDivergedError,
    set_seed,
)

__all__ = [
    "IGNORE_INDEX",
    "Document",
    "MLMCollator",
    "PaddingCollator",
    "PreparedData",
    "RunConfig",
    "Split",
    "TimeBudget",
    "Trainer",
    "TrainerCallback",
    "TrainerState",
    "TrainingArguments",
    "TrainingDivergedError",
    "build_optimizer",
    "build_scheduler",
    "classification_metrics",
    "from_hf_dataset",
    "iter_texts",
    "label_vocabulary",
    "latest_checkpoint",
    "load_checkpoint",
    "load_corpus",
    "load_documents",
    "load_run_config",
    "lr_multiplier",
    "pack_sequences",
    "prepare_data",
    "read_csv",
    "read_jsonl",
    "read_text",
    "save_checkpoint",
    "save_tokenizer",
    "set_seed",
    "shuffled",
    "stdlib_docstrings",
    "tokenize_documents",
    "train_bpe_tokenizer",
    "train_validation_split",
]

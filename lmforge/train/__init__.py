"""Training: data → collate (pad, pack, mask) → forward → loss → backward → optimizer.

`data` reads, splits and tokenizes documents; `collate` turns tokenized
examples into batches; `tokenizer_trainer` learns a BPE vocabulary for a model
trained from scratch. See docs/training.md.
"""

from lmforge.train.collate import (
    IGNORE_INDEX,
    MLMCollator,
    PaddingCollator,
    pack_sequences,
)
from lmforge.train.data import (
    Document,
    Split,
    from_hf_dataset,
    iter_texts,
    load_documents,
    read_csv,
    read_jsonl,
    read_text,
    shuffled,
    tokenize_documents,
    train_validation_split,
)
from lmforge.train.tokenizer_trainer import save_tokenizer, train_bpe_tokenizer

__all__ = [
    "IGNORE_INDEX",
    "Document",
    "MLMCollator",
    "PaddingCollator",
    "Split",
    "from_hf_dataset",
    "iter_texts",
    "load_documents",
    "pack_sequences",
    "read_csv",
    "read_jsonl",
    "read_text",
    "save_tokenizer",
    "shuffled",
    "tokenize_documents",
    "train_bpe_tokenizer",
    "train_validation_split",
]

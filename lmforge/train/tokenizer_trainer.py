"""Train a byte-level BPE tokenizer (GPT-2 / SmolLM2 style) on your own text.

Byte-level BPE starts from the 256 byte values, so any text, in any script,
has a tokenization and decodes back exactly; training then merges the most
frequent adjacent pair of symbols, again and again, until the vocabulary
reaches its size. The result is saved in HF's layout (tokenizer.json +
tokenizer_config.json) and loads back with `Tokenizer.from_pretrained`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers
from tqdm.auto import tqdm

from lmforge.errors import InputError
from lmforge.tokenizer import Tokenizer

# Special tokens get the first ids, in this order.
CLM_SPECIAL_TOKENS = ("<|endoftext|>", "<pad>")
MLM_SPECIAL_TOKENS = ("<pad>", "[CLS]", "[SEP]", "[MASK]")
OBJECTIVES = ("clm", "mlm")


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2,
                        objective: str = "clm", special_tokens: Sequence[str] | None = None,
                        model_max_length: int | None = None, output_dir: str | Path | None = None,
                        progress: bool = False) -> Tokenizer:
    """Learn a byte-level BPE vocabulary of at most `vocab_size` tokens from `texts`.

    `vocab_size` counts the 256 byte tokens, the special tokens and the learned
    merges; a pair seen fewer than `min_frequency` times is never merged, so a
    small corpus may stop short of `vocab_size`. Special tokens are never split
    and take ids 0, 1, ... in the order given; `<pad>` (or `[PAD]`) is the
    padding token.

    `objective="clm"` (a decoder like GPT-2 or SmolLM2): the first special token
    (`<|endoftext|>` by default) is the BOS/EOS token that separates documents;
    nothing is added around the text when encoding. `objective="mlm"` (an encoder like
    BERT): encoding wraps the text as `[CLS] text [SEP]` (a pair as `[CLS] a
    [SEP] b [SEP]`, with token type ids 0 then 1), and `[MASK]` is the token
    the MLM collator substitutes. With `output_dir`, the tokenizer is also
    saved there (see `save_tokenizer`). `progress=True` shows a tqdm bar over
    the texts read and the library's bars for counting and merging.
    """
    if objective not in OBJECTIVES:
        raise InputError(f"objective must be one of {', '.join(OBJECTIVES)}; got {objective!r}.")
    special_tokens = list(special_tokens or (CLM_SPECIAL_TOKENS if objective == "clm" else MLM_SPECIAL_TOKENS))
    required = ("[CLS]", "[SEP]", "[MASK]") if objective == "mlm" else ()
    missing = [token for token in required if token not in special_tokens]
    if missing:
        raise InputError(f"objective='mlm' needs the special tokens {', '.join(missing)}; add them.")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    base_size = len(alphabet) + len(special_tokens)
    if vocab_size <= base_size:
        raise InputError(f"vocab_size={vocab_size} leaves no room for merges: the {len(alphabet)} byte tokens and "
                         f"{len(special_tokens)} special tokens alone take {base_size}; raise it.")

    backend = BackendTokenizer(models.BPE())
    # Split on spaces/punctuation first (GPT-2's regex) so merges never cross word boundaries, and map
    # every byte to a printable character, which makes the 256-symbol base alphabet.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=special_tokens,
                                  initial_alphabet=alphabet, show_progress=progress)
    texts = tqdm(texts, desc="reading texts", unit="text", disable=not progress)
    backend.train_from_iterator(texts, trainer)
    if backend.get_vocab_size() <= base_size:
        raise InputError(f"no pair of symbols occurs {min_frequency} times in the texts, so nothing was learned; "
                         "train on more text or lower min_frequency.")

    if objective == "mlm":
        cls_id, sep_id = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
        backend.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
        roles = {}
    else:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
        roles = {"bos": special_tokens[0], "eos": special_tokens[0]}
    roles["pad"] = next((token for token in ("<pad>", "[PAD]") if token in special_tokens), None)
    tokenizer = Tokenizer(backend, roles, model_max_length=model_max_length)
    if output_dir is not None:
        save_tokenizer(tokenizer, output_dir)
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, folder: str | Path) -> Path:
    """Save in HF's layout, loadable by `Tokenizer.from_pretrained(folder)` and by transformers.

    Writes tokenizer.json (the whole pipeline: pre-tokenizer, BPE merges,
    post-processor, decoder) and tokenizer_config.json (which token plays which
    role, including `[CLS]`/`[SEP]`/`[MASK]` when present). It also writes a
    minimal config.json with `vocab_size` and the special token ids: a model
    trained with this tokenizer needs those values, and lmforge resolves a
    folder through its config.json.
    """
    folder = Path(folder)
    tokenizer.save_pretrained(folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    config.update({role: token for role, token in
                   (("cls_token", "[CLS]"), ("sep_token", "[SEP]"), ("mask_token", "[MASK]")) if token in vocab})
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    model_config = {"vocab_size": tokenizer.vocab_size}
    model_config.update({f"{role}_token_id": tokenizer.token_to_id(token)
                         for role, token in tokenizer.special_tokens.items() if token and role != "unk"})
    existing = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    if "model_type" not in existing:  # never overwrite a model's own config
        (folder / "config.json").write_text(json.dumps(model_config, indent=2) + "\n")
    return folder

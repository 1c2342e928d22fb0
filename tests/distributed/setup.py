"""The run that the data-parallel test makes once alone and once under torchrun."""

import torch

from lmforge.config import BertConfig, LlamaConfig
from lmforge.models.bert import BertForMaskedLM
from lmforge.models.llama import LlamaForCausalLM
from lmforge.train import (
    MLMCollator,
    PaddingCollator,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

WORLD = 2
TINY = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64, "pad_token_id": 0}


def sequences(count, seed):
    """`count` random token sequences of 2 to 15 tokens: padding differs from batch to batch."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 16, (count,), generator=generator).tolist()
    return [{"input_ids": torch.randint(1, 64, (n,), generator=generator).tolist()} for n in lengths]


class LossRecorder(TrainerCallback):
    def __init__(self):
        self.losses = []

    def on_step_end(self, trainer):
        self.losses.append(trainer.state.loss)


def run(output_dir, per_device_batch_size, data_parallel="ddp", resume_from=None):
    """Train 4 steps of 2 micro-batches on 13 examples (the last global micro-batch of each epoch holds
    one example, so with 2 processes one of them has none), saving at step 2; evaluate on 5 examples."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY))
    arguments = TrainingArguments(output_dir=output_dir, max_steps=4, per_device_batch_size=per_device_batch_size,
                                  gradient_accumulation_steps=2, learning_rate=1e-2, save_steps=2,
                                  logging_steps=1, progress=False, data_parallel=data_parallel)
    recorder = LossRecorder()
    trainer = Trainer(model, arguments, sequences(13, seed=1), PaddingCollator(pad_token_id=0, causal_lm_labels=True),
                      eval_dataset=sequences(5, seed=2), callbacks=[recorder])
    trainer.train(resume_from=resume_from)
    return recorder.losses, trainer.evaluate(), trainer


def run_mlm(output_dir, resume_from=None):
    """A tiny BERT trained 4 steps with MLM masking (saving at step 2); returns the losses and the
    collator's first random draw after setup, which must differ between processes."""
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=4, max_position_embeddings=64, pad_token_id=0,
                                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    collator = MLMCollator(mask_token_id=3, pad_token_id=0, vocab_size=64, seed=7)
    arguments = TrainingArguments(output_dir=output_dir, max_steps=4, per_device_batch_size=2, save_steps=2,
                                  learning_rate=1e-2, logging_steps=1, progress=False)
    recorder = LossRecorder()
    trainer = Trainer(model, arguments, sequences(16, seed=3), collator, callbacks=[recorder])
    first_draw = torch.rand(1, generator=torch.Generator().set_state(collator.generator.get_state())).item()
    trainer.train(resume_from=resume_from)
    return recorder.losses, first_draw

"""Reward sources for online RL: what says how good a sampled completion is.

GRPO and PPO ask one question of a reward, through one interface:

    score(prompts, completions, rows) -> one float (or None) per completion

- `RewardModel`: a learned scorer, a sequence-classification model with one label (what
  `lmforge reward-model` writes). It reads the prompt and the completion rendered exactly as in
  its training (the chat template when the tokenizer has one) and returns the score of the last token.
- `RewardFunction`: a program, given as a callable or as "module:function". It follows TRL's
  signature, `reward(prompts, completions, **columns)`: `prompts` as the rows hold them (text, or
  chat messages), `completions` the generated texts, and every other column of the rows as a keyword
  list (`response=[...]`); it returns one number per completion, or None for "no reward here".
  `lmforge.align.tasks:iso_date_reward` is the built-in one for the dates task.

A program can fail. A reward function that raises, returns the wrong count or something that is
not a finite number does not stop training: the warning says what happened on which prompt, those
completions score None, the trainer leaves them out of the update (and counts them in the logs as
`skipped_samples`), and a step where nothing scored is skipped. When the whole batch raises, each
completion is scored alone to find the ones that fail.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import math
import numbers
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from lmforge.align.dpo import answer_row
from lmforge.align.sft import tokenize_row
from lmforge.errors import InputError, ValidationError
from lmforge.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

PROMPT_FIELDS = ("prompt", "messages")  # where a row holds its prompt; the other columns go to reward functions


class RewardSource(Protocol):
    def score(self, prompts: Sequence[Any], completions: Sequence[str],
              rows: Sequence[dict[str, Any]]) -> list[float | None]:
        """One reward per completion; None where there is none (the sample is skipped)."""


def _excerpt(value: Any, width: int = 60) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return repr(text if len(text) <= width else text[:width] + "…")


def _checked(value: Any) -> tuple[float | None, str | None]:
    """(reward, None), (None, None) for an intended None, or (None, what is wrong)."""
    if value is None:
        return None, None
    if isinstance(value, numbers.Real) and math.isfinite(value):
        return float(value), None
    return None, f"returned {value!r}, not a finite number"


class RewardFunction:
    """A programmatic reward `function(prompts, completions, **columns) -> list of numbers`.

    Keyword arguments are the rows' columns other than the prompt (each a list, one entry per
    completion); a function without `**kwargs` receives only the columns it names.
    """

    def __init__(self, function: Callable[..., Any], name: str | None = None):
        if not callable(function):
            raise ValidationError(f"a reward function must be callable; got {type(function).__name__}.")
        self.function = function
        self.name = name or getattr(function, "__qualname__", repr(function))
        parameters = list(inspect.signature(function).parameters.values())
        self._all_columns = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
        named = [p for p in parameters[2:] if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                         inspect.Parameter.KEYWORD_ONLY)]
        self._columns = [p.name for p in named]
        self.required_columns = [p.name for p in named if p.default is inspect.Parameter.empty]

    @classmethod
    def from_string(cls, spec: str) -> RewardFunction:
        """The function `spec` names as "module:function" (e.g. "lmforge.align.tasks:iso_date_reward")."""
        module_name, _, function_name = spec.partition(":")
        if not module_name or not function_name:
            raise InputError(f"reward {spec!r} is not 'module:function'; name a Python module and a function in it, "
                             "e.g. my_rewards:length_reward (my_rewards.py in the current folder or on PYTHONPATH).")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise InputError(f"reward {spec!r}: cannot import module {module_name!r} ({exc}); put {module_name}.py "
                             "in the current folder or on PYTHONPATH, or install the package that provides it.") from None
        function = getattr(module, function_name, None)
        if function is None:
            defined = sorted(name for name, value in vars(module).items()
                             if callable(value) and not name.startswith("_"))
            raise InputError(f"reward {spec!r}: module {module_name!r} has no {function_name!r}; it defines "
                             f"{', '.join(defined) or 'no public functions'}.")
        if not callable(function):
            raise InputError(f"reward {spec!r}: {function_name} is a {type(function).__name__}, not a function.")
        return cls(function, spec)

    def check_columns(self, rows: Sequence[dict[str, Any]]) -> None:
        """Fail now, not at every step, when a row lacks a column the function requires."""
        for number, row in enumerate(rows, 1):
            missing = [column for column in self.required_columns if column not in row]
            if missing:
                raise InputError(f"row {number}: the reward {self.name} needs the column(s) {', '.join(missing)}, "
                                 f"which the row lacks (it has {', '.join(sorted(row))}); add them to every row or "
                                 "choose another reward.")

    def _call(self, prompts: Sequence[Any], completions: Sequence[str], rows: Sequence[dict[str, Any]]) -> Any:
        names = {key for row in rows for key in row} - set(PROMPT_FIELDS)
        if not self._all_columns:
            names &= set(self._columns)
        columns = {name: [row.get(name) for row in rows] for name in sorted(names)}
        return self.function(list(prompts), list(completions), **columns)

    def score(self, prompts: Sequence[Any], completions: Sequence[str],
              rows: Sequence[dict[str, Any]]) -> list[float | None]:
        """The function's rewards; None for each completion it failed on (with one warning per call)."""
        try:
            values = self._call(prompts, completions, rows)
        except Exception as exc:  # the user's code: report it and keep training
            if len(completions) > 1:
                return self._score_one_by_one(prompts, completions, rows)
            self._report([(None, f"raised {exc!r}")], prompts, completions)
            return [None]
        if not isinstance(values, (list, tuple)) or len(values) != len(completions):
            got = f"{len(values)} values" if isinstance(values, (list, tuple)) else f"a {type(values).__name__}"
            logger.warning("reward %s returned %s for %d completions; it must return a list with one number per "
                           "completion (None to skip one). These samples are skipped; the first prompt was %s.",
                           self.name, got, len(completions), _excerpt(prompts[0]))
            return [None] * len(completions)
        checked = [_checked(value) for value in values]
        self._report(checked, prompts, completions)
        return [reward for reward, _ in checked]

    def _score_one_by_one(self, prompts, completions, rows) -> list[float | None]:
        """After the batch raised: each completion alone, so only the ones that fail are skipped."""
        checked = []
        for index in range(len(completions)):
            try:
                values = self._call(prompts[index:index + 1], completions[index:index + 1], rows[index:index + 1])
            except Exception as exc:  # the user's code again
                checked.append((None, f"raised {exc!r}"))
                continue
            if isinstance(values, (list, tuple)) and len(values) == 1:
                checked.append(_checked(values[0]))
            else:
                checked.append((None, f"returned {values!r} for one completion"))
        self._report(checked, prompts, completions)
        return [reward for reward, _ in checked]

    def _report(self, checked: list[tuple[float | None, str | None]], prompts, completions) -> None:
        failures = [index for index, (_, problem) in enumerate(checked) if problem]
        if failures:
            first = failures[0]
            logger.warning("reward %s failed on %d of %d completions, which are skipped; e.g. on prompt %s, "
                           "completion %s it %s.", self.name, len(failures), len(checked), _excerpt(prompts[first]),
                           _excerpt(completions[first]), checked[first][1])


class RewardModel:
    """A sequence-classification model with one label that scores prompt + completion (no gradients)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, batch_size: int = 16):
        labels = getattr(getattr(model, "config", None), "num_labels", None)
        if labels != 1:
            raise ValidationError(f"a reward model gives one score per text, but {type(model).__name__} has "
                                  f"num_labels={labels}; train one with `lmforge reward-model` or RewardTrainer.")
        self.model, self.tokenizer, self.batch_size = model.eval(), tokenizer, batch_size

    @classmethod
    def from_pretrained(cls, folder: str | Path, batch_size: int = 16) -> RewardModel:
        """A reward model folder (a full model, or a LoRA adapter folder with its score head, as
        `lmforge reward-model` writes them); an adapter is merged into its base for speed."""
        from lmforge import AutoModelForSequenceClassification, AutoTokenizer
        from lmforge.peft import load_lora, merge_and_unload

        folder = Path(folder)
        if not folder.is_dir():
            raise InputError(f"{folder}: no such folder; give the folder `lmforge reward-model` wrote.")
        adapter = folder / "adapter_config.json"
        tokenizer_source: str | Path = folder
        if adapter.is_file():  # its tokenizer is the base model's
            config = json.loads(adapter.read_text())
            base = config.get("base_model_name_or_path")
            if config.get("task_type") != "SEQ_CLS" or not base:
                raise InputError(f"{folder} is a {config.get('task_type')} adapter (base {base!r}), not a reward "
                                 "model's (SEQ_CLS, with its base named); train one with `lmforge reward-model`.")
            model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
            load_lora(model, folder)
            merge_and_unload(model)
            tokenizer_source = base
        else:
            config_file = folder / "config.json"
            architectures = json.loads(config_file.read_text()).get("architectures") if config_file.is_file() else None
            if not architectures or not architectures[0].endswith("ForSequenceClassification"):
                raise InputError(f"{folder} holds {architectures or 'no config.json'}, not a reward model (a "
                                 "...ForSequenceClassification with one label); train one with `lmforge reward-model`.")
            model = AutoModelForSequenceClassification.from_pretrained(folder)
        return cls(model, AutoTokenizer.from_pretrained(tokenizer_source), batch_size)

    @torch.no_grad()
    def score(self, prompts: Sequence[Any], completions: Sequence[str],
              rows: Sequence[dict[str, Any]] | None = None) -> list[float | None]:
        chat = bool(self.tokenizer.chat_template)
        texts = [tokenize_row(answer_row({"prompt": prompt}, completion, number, chat), number, self.tokenizer)[0]
                 for number, (prompt, completion) in enumerate(zip(prompts, completions), 1)]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        device = next(self.model.parameters()).device
        scores: list[float | None] = []
        for start in range(0, len(texts), self.batch_size):
            chunk = texts[start:start + self.batch_size]
            width = max(len(ids) for ids in chunk)  # right padding: the head reads the last real token
            ids = torch.tensor([row + [pad] * (width - len(row)) for row in chunk], device=device)
            mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in chunk], device=device)
            scores += self.model(input_ids=ids, attention_mask=mask).logits[:, 0].float().tolist()
        return scores


def as_reward(reward: RewardSource | Callable[..., Any] | str) -> RewardSource:
    """A reward source from what the trainers accept: a source, a function, "module:function" or a
    reward model folder."""
    if hasattr(reward, "score"):
        return reward
    if isinstance(reward, (str, Path)):
        if ":" not in str(reward) or Path(reward).is_dir():
            return RewardModel.from_pretrained(reward)
        return RewardFunction.from_string(str(reward))
    return RewardFunction(reward)

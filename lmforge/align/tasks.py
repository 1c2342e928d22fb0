"""A task the project generates, checkable by exact match: dates written in words → ISO 8601.

"the twenty-first of March, nineteen eighty-four" → "1984-03-21". Small instruction-tuned
models read such dates poorly, the answer is one short string, and any number of
examples can be made from a seed — enough to measure what prompting, SFT, LoRA and the
rest each buy, with a held-out split the training never sees. `iso_date_reward` scores answers
for online RL, with partial credit for the right format and for each right field.
"""

from __future__ import annotations

import datetime
import random
import re
from collections.abc import Callable, Sequence
from typing import Any

ONES = ["", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
        "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
ORDINAL_ONES = ["", "first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth",
                "eleventh", "twelfth", "thirteenth", "fourteenth", "fifteenth", "sixteenth", "seventeenth",
                "eighteenth", "nineteenth"]
INSTRUCTION = "Write this date in ISO format (YYYY-MM-DD). Answer with the date only."
ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
FORMAT_REWARD = 0.1  # iso_date_reward for a well-formed YYYY-MM-DD with every field wrong
FIELD_REWARD = 0.3  # and for each of year, month and day it gets right (all three: 1.0)


def below_hundred(number: int) -> str:
    """0 < number < 100 in words: 7 → "seven", 42 → "forty-two"."""
    if number < 20:
        return ONES[number]
    tens, ones = divmod(number, 10)
    return TENS[tens] + (f"-{ONES[ones]}" if ones else "")


def ordinal(day: int) -> str:
    """1 → "first", 22 → "twenty-second", 30 → "thirtieth"."""
    if day < 20:
        return ORDINAL_ONES[day]
    tens, ones = divmod(day, 10)
    return f"{TENS[tens]}-{ORDINAL_ONES[ones]}" if ones else TENS[tens][:-1] + "ieth"


def year_words(year: int) -> str:
    """How a year is said: 1984 → "nineteen eighty-four", 1905 → "nineteen oh five", 2000 → "two thousand",
    2007 → "two thousand seven", 2023 → "twenty twenty-three"."""
    century, rest = divmod(year, 100)
    if century == 20 and rest < 10:
        return "two thousand" + (f" {ONES[rest]}" if rest else "")
    if rest == 0:
        return f"{below_hundred(century)} hundred"
    return f"{below_hundred(century)} {'oh ' + ONES[rest] if rest < 10 else below_hundred(rest)}"


def date_in_words(date: datetime.date) -> str:
    return f"the {ordinal(date.day)} of {date.strftime('%B')}, {year_words(date.year)}"


def date_rows(count: int, seed: int = 0) -> list[dict[str, str]]:
    """`count` distinct instruction/response rows for dates between 1900 and 2099."""
    generator, first = random.Random(seed), datetime.date(1900, 1, 1)
    span = (datetime.date(2099, 12, 31) - first).days
    days = generator.sample(range(span + 1), count)
    rows = []
    for offset in days:
        date = first + datetime.timedelta(days=offset)
        rows.append({"instruction": f"{INSTRUCTION}\n\n{date_in_words(date)}", "response": date.isoformat()})
    return rows


def date_splits(train: int = 400, held_out: int = 100, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Disjoint train and held-out rows (distinct dates)."""
    rows = date_rows(train + held_out, seed)
    return rows[:train], rows[train:]


def exact_match(predictions: Sequence[str], rows: Sequence[dict[str, Any]],
                normalize: Callable[[str], str] = str.strip) -> float:
    """The fraction of predictions equal to their row's response (after `normalize`)."""
    if len(predictions) != len(rows):
        raise ValueError(f"{len(predictions)} predictions for {len(rows)} rows.")
    hits = sum(normalize(prediction) == normalize(row["response"]) for prediction, row in zip(predictions, rows))
    return hits / max(len(rows), 1)


def date_preferences(count: int, seed: int = 0, near_misses: float = 0.0) -> list[dict[str, str]]:
    """Preference rows for the dates task: the bare ISO date (chosen) over a chatty answer in another
    format (rejected) — the "required answer format" that preference tuning should instil.

    With `near_misses` > 0, that share of the rows rejects a near miss instead: a valid ISO date with
    one field wrong (the day and month swapped, or the year, month or day off by a little), or, in a
    quarter of them, the right date almost in ISO form (a field unpadded, a digit dropped). A reward
    model trained on those must read the date in words and check the shape, not only the answer's look.
    """
    generator = random.Random(seed + 1)
    rows = []
    for row in date_rows(count, seed):
        date = datetime.date.fromisoformat(row["response"])
        if near_misses and generator.random() < near_misses:
            rejected = _near_miss(date, generator)
        else:
            rejected = generator.choice([f"Sure! The date is {date.strftime('%B')} {date.day}, {date.year}.",
                                         f"That would be {date.day:02d}/{date.month:02d}/{date.year}.",
                                         f"In ISO format, I believe the date is {date.year}/{date.month}/{date.day}."])
        rows.append({"prompt": row["instruction"], "chosen": row["response"], "rejected": rejected})
    return rows


def _near_miss(date: datetime.date, generator: random.Random) -> str:
    """An answer close to `date`'s ISO form but wrong: another valid date one plausible step away, or
    (a quarter of the time) this date malformed."""
    if generator.random() < 0.25:
        year, month, day = date.isoformat().split("-")
        malformed = {f"{year}-{int(month)}-{day}", f"{year}-{month}-{int(day)}", f"{year[:3]}-{month}-{day}",
                     f"{year}{month}{day}"} - {date.isoformat()}  # unpadding 10-12 or 10-31 changes nothing
        return generator.choice(sorted(malformed))
    while True:
        kind, shift = generator.choice(["swap", "year", "month", "day"]), generator.choice([-10, -1, 1, 10])
        try:
            if kind == "swap":
                other = date.replace(month=date.day, day=date.month)
            elif kind == "year":
                other = date.replace(year=date.year + shift)
            elif kind == "month":
                other = date.replace(month=date.month + (shift > 0) - (shift < 0))
            else:
                other = date.replace(day=date.day + shift)
        except ValueError:  # no such date (month 13, day 31 of a 30-day month, ...): draw again
            continue
        if other != date:
            return other.isoformat()


def date_prompts(count: int, seed: int = 0) -> list[dict[str, str]]:
    """Prompt rows for online RL (GRPO, PPO): {"prompt": the instruction, "response": the ISO answer}; the
    policy sees the prompt only, `iso_date_reward` reads the response column."""
    return [{"prompt": row["instruction"], "response": row["response"]} for row in date_rows(count, seed)]


def iso_date_reward(prompts: Sequence[Any], completions: Sequence[str], response: Sequence[str],
                    **columns: Any) -> list[float]:
    """The dates task as a reward function (TRL's signature: the rows' columns arrive as keyword lists).

    Partial credit makes the reward dense enough for RL to climb: an answer that is exactly a valid
    YYYY-MM-DD earns 0.1 plus 0.3 for each of year, month and day that match the expected date (so the
    exact date earns 1.0, the right year and month 0.7); anything else (extra words, another format, an
    impossible date) earns 0.0.
    """
    rewards = []
    for completion, answer in zip(completions, response):
        text = completion.strip()
        if not _is_iso_date(text):
            rewards.append(0.0)
            continue
        right = sum(got == want for got, want in zip(text.split("-"), answer.strip().split("-")))
        rewards.append(round(FORMAT_REWARD + FIELD_REWARD * right, 6))
    return rewards


def _is_iso_date(text: str) -> bool:
    if not ISO_DATE.fullmatch(text):
        return False
    try:
        datetime.date.fromisoformat(text)
    except ValueError:
        return False
    return True

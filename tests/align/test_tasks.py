"""The generated dates task: the words are right, rows are seeded and distinct, exact match counts hits."""

import datetime

import pytest

from lmforge.align.tasks import (
    date_in_words,
    date_rows,
    date_splits,
    exact_match,
    ordinal,
    year_words,
)


@pytest.mark.parametrize("year,words", [(1984, "nineteen eighty-four"), (1905, "nineteen oh five"),
                                        (1900, "nineteen hundred"), (2000, "two thousand"),
                                        (2007, "two thousand seven"), (2023, "twenty twenty-three"),
                                        (2099, "twenty ninety-nine"), (1911, "nineteen eleven")])
def test_years_read_as_people_say_them(year, words):
    assert year_words(year) == words


@pytest.mark.parametrize("day,words", [(1, "first"), (2, "second"), (12, "twelfth"), (20, "twentieth"),
                                       (21, "twenty-first"), (30, "thirtieth"), (31, "thirty-first")])
def test_ordinals(day, words):
    assert ordinal(day) == words


def test_rows_are_seeded_distinct_and_answer_in_iso():
    assert date_in_words(datetime.date(1984, 3, 21)) == "the twenty-first of March, nineteen eighty-four"
    train, held_out = date_splits(train=50, held_out=20, seed=3)
    assert (train, held_out) == date_splits(train=50, held_out=20, seed=3)
    assert train != date_splits(train=50, held_out=20, seed=4)[0]
    answers = [row["response"] for row in train + held_out]
    assert len(set(answers)) == 70
    for row in train:
        date = datetime.date.fromisoformat(row["response"])
        assert row["instruction"].endswith(date_in_words(date))
    assert len(date_rows(5, seed=1)) == 5


def test_exact_match():
    rows = [{"response": "2001-01-01"}, {"response": "1999-12-31"}]
    assert exact_match([" 2001-01-01\n", "1999-12-30"], rows) == 0.5
    with pytest.raises(ValueError):
        exact_match(["x"], rows)


def test_format_preferences_choose_the_bare_iso_date():
    from lmforge.align.tasks import date_preferences

    rows = date_preferences(30, seed=2)
    assert rows == date_preferences(30, seed=2)
    for row, plain in zip(rows, date_rows(30, seed=2)):
        assert (row["prompt"], row["chosen"]) == (plain["instruction"], plain["response"])
        assert row["rejected"] != row["chosen"] and len(row["rejected"]) > len(row["chosen"])


def test_near_miss_preferences_reject_a_date_one_field_away_or_the_date_malformed():
    import datetime

    from lmforge.align.tasks import _is_iso_date, date_preferences

    rows = date_preferences(300, seed=3, near_misses=0.5)
    near = [row for row in rows if row["rejected"][:1].isdigit()]
    assert 110 < len(near) < 190  # about half
    malformed = [row for row in near if not _is_iso_date(row["rejected"])]
    assert 0.1 < len(malformed) / len(near) < 0.4  # about a quarter
    for row in near:
        chosen = datetime.date.fromisoformat(row["chosen"])
        if row in malformed:  # the right date, badly written
            y, m, d = row["chosen"].split("-")
            assert row["rejected"] in {f"{y}-{int(m)}-{d}", f"{y}-{m}-{int(d)}", f"{y[:3]}-{m}-{d}", f"{y}{m}{d}"}
            continue
        rejected = datetime.date.fromisoformat(row["rejected"])
        differing = [f for f in ("year", "month", "day") if getattr(chosen, f) != getattr(rejected, f)]
        swapped = (rejected.month, rejected.day) == (chosen.day, chosen.month)
        assert rejected != chosen and (len(differing) == 1 or swapped), (row["chosen"], row["rejected"])
    assert [row["chosen"] for row in rows] == [row["chosen"] for row in date_preferences(300, seed=3)]

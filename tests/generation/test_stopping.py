"""OutputStream: finish reasons, stop strings across tokens, and streams that never leak a stop string."""

import pytest

from lmforge.errors import InputError
from lmforge.generation.sampling_params import SamplingParams
from lmforge.generation.stopping import OutputStream, StepResult


def make_stream(tokenizer, prompt_length: int = 0, max_model_len: int | None = None, **params) -> OutputStream:
    params.setdefault("max_tokens", None)
    return OutputStream(tokenizer, SamplingParams(**params), [tokenizer.eos_token_id], prompt_length, max_model_len)


def feed(stream: OutputStream, ids: list[int]) -> list[StepResult]:
    """Append ids until the output finishes, as a generation loop would."""
    results = []
    for token_id in ids:
        results.append(stream.append(token_id))
        if results[-1].finished:
            break
    return results


def reference_cut(text: str, stops: list[str], include: bool) -> tuple[str, str | None]:
    """Scan character by character: the first stop string to complete wins (the longest on a tie)."""
    for end in range(1, len(text) + 1):
        for stop in sorted(stops, key=len, reverse=True):
            if text[:end].endswith(stop):
                return (text[:end] if include else text[:end - len(stop)]), stop
    return text, None


CASES = [
    ("Hello world, goodbye world", ["ld, good"]),  # spans 3 tokens, cuts inside two of them
    ("Hello world, goodbye world", ["ld, bad"]),  # a false alarm: held back, then released
    ("Hello world, goodbye world", ["world", "wor"]),  # one stop string is a prefix of another
    ("Hello world, goodbye world", ["lo w", "o w"]),  # both complete on the same character
    ("Hello world", ["Hel"]),  # inside the very first token
    ("Hello 👋🏽 world! 🎉🚀 done", ["🏽 w"]),  # across the byte tokens of an emoji
    ("日本語のテキスト、中文字符", ["テキ", "文字"]),
    ("def f(x):\n    return x\n\ndef g(y):", ["\n\n", "\ndef"]),
    ("abcabcabcabd and more", ["abd"]),  # repeated partial matches
    ("Hello world", ["xyz"]),  # never matches
]


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize(("text", "stops"), CASES)
def test_streamed_text_equals_the_cut_text(smollm2_tokenizer, text, stops, include):
    ids = smollm2_tokenizer.encode(text, add_special_tokens=False)
    stream = make_stream(smollm2_tokenizer, stop=stops, include_stop_str_in_output=include)
    results = feed(stream, ids + [smollm2_tokenizer.eos_token_id])
    expected, stop = reference_cut(text, stops, include)

    deltas = [r.delta for r in results]
    assert "".join(deltas) == stream.text == expected
    assert results[-1].finished and stream.finish_reason == "stop"
    assert stream.stop_reason == results[-1].stop_reason == stop
    assert not any(r.finished for r in results[:-1])
    # No prefix of the stream ever reached into the stop string, not even for one step.
    stop_start = len(expected) - (len(stop) if include and stop else 0)
    emitted = ""
    for delta in deltas:
        emitted += delta
        assert len(emitted) <= stop_start or emitted == expected


def test_partial_stop_string_is_held_then_cut(smollm2_tokenizer):
    ids = smollm2_tokenizer.encode("Hello world, goodbye world", add_special_tokens=False)
    assert smollm2_tokenizer.tokenize("Hello world, goodbye") == ["Hello", "Ġworld", ",", "Ġgoodbye"]
    results = feed(make_stream(smollm2_tokenizer, stop=["ld, good"]), ids)
    assert [r.delta for r in results] == ["Hello", " wor", "", ""]
    assert [r.finished for r in results] == [False, False, False, True]


def test_partial_stop_string_is_released_when_it_cannot_match(smollm2_tokenizer):
    ids = smollm2_tokenizer.encode("Hello world, goodbye", add_special_tokens=False)
    stream = make_stream(smollm2_tokenizer, stop=["ld, bad"])
    assert [r.delta for r in feed(stream, ids)] == ["Hello", " wor", "", "ld, goodbye"]
    assert not stream.finished


def test_include_stop_str_drops_the_rest_of_the_token(smollm2_tokenizer):
    ids = smollm2_tokenizer.encode("Hello world, goodbye world", add_special_tokens=False)
    stream = make_stream(smollm2_tokenizer, stop=["ld, good"], include_stop_str_in_output=True)
    feed(stream, ids)
    assert stream.text == "Hello world, good"
    assert stream.token_ids == ids[:4]  # every generated token, including the one completing the stop string


def test_stop_string_in_the_first_token(smollm2_tokenizer):
    ids = smollm2_tokenizer.encode("Hello world", add_special_tokens=False)
    result = make_stream(smollm2_tokenizer, stop=["Hel"]).append(ids[0])
    assert result == StepResult("", True, "stop", "Hel")


def test_shorter_stop_string_completes_first(smollm2_tokenizer):
    ids = smollm2_tokenizer.encode("Hello world", add_special_tokens=False)
    stream = make_stream(smollm2_tokenizer, stop=["world", "wor"])
    feed(stream, ids)
    assert (stream.text, stream.stop_reason) == ("Hello ", "wor")


def test_eos_finishes_and_releases_held_text(smollm2_tokenizer):
    eos = smollm2_tokenizer.eos_token_id
    ids = smollm2_tokenizer.encode("Hello world", add_special_tokens=False)
    stream = make_stream(smollm2_tokenizer, stop=["ld, bad"], skip_special_tokens=False)
    results = feed(stream, ids + [eos] + ids)
    assert [r.delta for r in results] == ["Hello", " wor", "ld"]
    assert (results[-1].finish_reason, results[-1].stop_reason) == ("stop", None)
    assert stream.text == "Hello world"  # no "<|im_end|>", even with skip_special_tokens=False
    assert stream.token_ids == ids + [eos]


def test_eos_flushes_an_incomplete_character(smollm2_tokenizer):
    ids = smollm2_tokenizer.encode("Hi 👋", add_special_tokens=False)[:3]
    stream = make_stream(smollm2_tokenizer)
    feed(stream, ids + [smollm2_tokenizer.eos_token_id])
    assert stream.text == smollm2_tokenizer.decode(ids)  # ends in U+FFFD, exactly as a full decode


def test_ignore_eos_keeps_going(smollm2_tokenizer):
    eos = smollm2_tokenizer.eos_token_id
    ids = smollm2_tokenizer.encode("Hello world", add_special_tokens=False)
    stream = make_stream(smollm2_tokenizer, ignore_eos=True, max_tokens=4)
    results = feed(stream, [ids[0], eos, eos, ids[1], eos])
    assert [r.finished for r in results] == [False, False, False, True]
    assert (stream.finish_reason, stream.text) == ("length", "Hello world")


def test_eos_before_min_tokens_does_not_stop(smollm2_tokenizer):
    eos = smollm2_tokenizer.eos_token_id
    ids = smollm2_tokenizer.encode("Hello world", add_special_tokens=False)
    stream = make_stream(smollm2_tokenizer, min_tokens=2)
    results = feed(stream, [ids[0], eos, ids[1], eos])
    assert [r.finished for r in results] == [False, False, False, True]
    assert (stream.text, stream.finish_reason) == ("Hello world", "stop")


def test_stop_string_before_min_tokens_does_not_stop(smollm2_tokenizer):
    ids = smollm2_tokenizer.encode("Hello world, goodbye world", add_special_tokens=False)
    stream = make_stream(smollm2_tokenizer, stop=["world"], min_tokens=2)
    feed(stream, ids)
    assert (stream.text, stream.stop_reason) == ("Hello world, goodbye ", "world")


@pytest.mark.parametrize(("include", "expected"), [(False, "Hello world"), (True, "Hello world,")])
def test_stop_token_ids(smollm2_tokenizer, include, expected):
    ids = smollm2_tokenizer.encode("Hello world, goodbye", add_special_tokens=False)
    comma = ids[2]
    stream = make_stream(smollm2_tokenizer, stop_token_ids=[comma], include_stop_str_in_output=include)
    results = feed(stream, ids)
    assert len(results) == 3
    assert (stream.text, stream.finish_reason, stream.stop_reason) == (expected, "stop", comma)
    assert stream.token_ids == ids[:3]


def test_max_tokens(smollm2_tokenizer):
    ids = smollm2_tokenizer.encode("Hello world, goodbye world", add_special_tokens=False)
    stream = make_stream(smollm2_tokenizer, max_tokens=3, stop=["ld, bad"])
    results = feed(stream, ids)
    assert len(results) == 3
    assert (stream.finish_reason, stream.stop_reason) == ("length", None)
    assert stream.text == "Hello world,"  # the held "ld," is released at the end


def test_max_model_len(smollm2_tokenizer):
    ids = smollm2_tokenizer.encode("Hello world, goodbye world", add_special_tokens=False)
    stream = make_stream(smollm2_tokenizer, prompt_length=10, max_model_len=12, max_tokens=100)
    results = feed(stream, ids)
    assert len(results) == 2
    assert (stream.finish_reason, stream.text) == ("length", "Hello world")


def test_stop_wins_over_length_on_the_same_token(smollm2_tokenizer):
    eos = smollm2_tokenizer.eos_token_id
    ids = smollm2_tokenizer.encode("Hello world", add_special_tokens=False)
    stream = make_stream(smollm2_tokenizer, max_tokens=2)
    feed(stream, [ids[0], eos])
    assert stream.finish_reason == "stop"
    stream = make_stream(smollm2_tokenizer, max_tokens=2, stop=["wor"])
    feed(stream, ids)
    assert (stream.finish_reason, stream.stop_reason, stream.text) == ("stop", "wor", "Hello ")


def test_length_cuts_an_emoji_as_decode_does(smollm2_tokenizer):
    ids = smollm2_tokenizer.encode("Hi 👋", add_special_tokens=False)
    stream = make_stream(smollm2_tokenizer, max_tokens=3)
    feed(stream, ids)
    assert stream.text == smollm2_tokenizer.decode(ids[:3])


def test_append_after_finish_is_an_error(smollm2_tokenizer):
    stream = make_stream(smollm2_tokenizer, max_tokens=1)
    stream.append(42)
    with pytest.raises(InputError, match="already finished"):
        stream.append(42)

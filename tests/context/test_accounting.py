"""Token accounting: counts equal the tokenizer's, a chat's per-message parts add up to the rendered prompt
exactly (template overhead and the assistant cue included), and prices turn tokens into cost."""

import pytest

from lmforge.context import Prices, count_chat, count_text
from lmforge.errors import ValidationError
from lmforge.generation.chat import ChatHistory


def test_text_counts_are_the_tokenizers(smollm2_tokenizer):
    for text in ("", "How many tokens is this sentence?", "naïve café 🙂 数据"):
        assert count_text(smollm2_tokenizer, text) == len(smollm2_tokenizer.encode(text))


def test_a_chat_is_counted_as_rendered_and_its_parts_add_up(smollm2_tokenizer):
    history = ChatHistory("Be brief.", [{"role": "user", "content": "What is 2+2?"},
                                        {"role": "assistant", "content": "4"},
                                        {"role": "user", "content": "And 3+3?"}])
    counted = count_chat(smollm2_tokenizer, history)
    rendered = smollm2_tokenizer.encode(history.to_prompt(smollm2_tokenizer), add_special_tokens=False)
    assert counted.total == len(rendered)
    assert sum(m.turn_tokens for m in counted.messages) + counted.generation_prompt_tokens == counted.total
    assert [m.role for m in counted.messages] == ["system", "user", "assistant", "user"]
    for message, (role, text) in zip(counted.messages, [("system", "Be brief."), ("user", "What is 2+2?"),
                                                         ("assistant", "4"), ("user", "And 3+3?")]):
        assert message.content_tokens == len(smollm2_tokenizer.encode(text, add_special_tokens=False))
        assert message.overhead > 0  # <|im_start|>role\n ... <|im_end|>\n
    assert counted.template_tokens == counted.total - counted.content_tokens > 0
    assert counted.generation_prompt_tokens > 0


def test_a_default_system_prompt_the_template_adds_is_charged_to_the_first_turn(smollm2_tokenizer):
    alone = count_chat(smollm2_tokenizer, ChatHistory(None, [{"role": "user", "content": "Hi"}]))
    with_system = count_chat(smollm2_tokenizer, ChatHistory("x", [{"role": "user", "content": "Hi"}]))
    assert alone.messages[0].overhead > with_system.messages[1].overhead + 10  # SmolLM2's default system prompt
    with pytest.raises(ValidationError, match="no messages"):
        count_chat(smollm2_tokenizer, ChatHistory())


def test_prices_are_per_million_tokens():
    assert Prices(0.15, 0.60).cost(1_000_000, 500_000) == pytest.approx(0.45)
    assert Prices(2.0).cost(250) == pytest.approx(0.0005)
    with pytest.raises(ValidationError, match="prices must be >= 0"):
        Prices(-1.0)

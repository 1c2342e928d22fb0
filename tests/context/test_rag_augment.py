"""RAG prompts and answers: retrieved passages go into the latest user message as numbered sources (the system
prompt and earlier messages as they were); the lowest-scoring passages are dropped first when the prompt does not
fit the generator's budget; [n] markers in the answer name its sources."""

import pytest

from lmforge.context.rag import (
    ChunkingSettings,
    RetrievedContext,
    Retriever,
    answer_question,
    build_index,
    cited_numbers,
    load_documents,
)
from lmforge.context.rag.augment import INSTRUCTION, CitedAnswer
from lmforge.context.strategies import ContextPolicy, prompt_tokens, select_context
from lmforge.errors import InputError, ValidationError
from lmforge.generation.chat import ChatHistory
from tests.context.rag_corpus import QUESTION, write_corpus


@pytest.fixture(scope="module")
def retriever(tmp_path_factory, minilm_encoder):
    documents = load_documents(write_corpus(tmp_path_factory.mktemp("corpus"))).documents
    return Retriever(build_index(documents, minilm_encoder, ChunkingSettings(32, 4)), minilm_encoder)


def fitting(tokenizer, window: int, strategy: str = "full"):
    """A context strategy bound to SmolLM2's tokenizer and a `window`-token window (no reserve)."""
    return lambda history: select_context(history, tokenizer, window, ContextPolicy(strategy, reserve_output=0))


def conversation() -> ChatHistory:
    history = ChatHistory("You are a helpful librarian.")
    history.add_user("Hello! I have a question about customs.")
    history.add_assistant("Of course, ask away.")
    history.add_user(QUESTION)
    return history


def test_passages_are_numbered_into_the_latest_message(retriever, smollm2_tokenizer):
    history = conversation()
    selected = RetrievedContext(retriever, fitting(smollm2_tokenizer, 8192), top_k=3).select(history)
    assert [p.chunk for p in selected.passages] == [p.chunk for p in retriever.retrieve(QUESTION, 3)]
    sent = selected.history
    assert sent.system == history.system and sent.messages[:-1] == history.messages[:-1]
    sources = "\n\n".join(f"[{n}] ({p.chunk.source}) {p.chunk.text}" for n, p in enumerate(selected.passages, 1))
    assert sent.messages[-1] == {"role": "user",
                                 "content": f"{INSTRUCTION}\n\nSources:\n{sources}\n\nQuestion: {QUESTION}"}
    assert sources.startswith("[1] (notes/village.txt) Every March")
    assert selected.tokens == prompt_tokens(smollm2_tokenizer, sent) and selected.dropped_messages == 0
    assert history.messages[-1]["content"] == QUESTION  # the caller's conversation is unchanged


def test_the_lowest_scoring_passages_go_first_when_the_prompt_does_not_fit(retriever, smollm2_tokenizer):
    history = conversation()
    everything = RetrievedContext(retriever, fitting(smollm2_tokenizer, 8192), top_k=4).select(history)
    two = RetrievedContext(retriever, fitting(smollm2_tokenizer, 8192), top_k=2).select(history)
    assert two.tokens < everything.tokens
    for window, kept in ((two.tokens, 2), (two.tokens - 1, 1)):
        selected = RetrievedContext(retriever, fitting(smollm2_tokenizer, window), top_k=4).select(history)
        assert selected.passages == everything.passages[:kept] and selected.tokens <= window
    # truncate gives up old exchanges before passages: only the system prompt and the question remain
    truncated = RetrievedContext(retriever, fitting(smollm2_tokenizer, two.tokens - 8, "truncate"), 2).select(history)
    assert truncated.passages == two.passages and truncated.dropped_messages == 2
    question_only = prompt_tokens(smollm2_tokenizer, ChatHistory(history.system, history.messages[-1:]))
    with pytest.raises(InputError, match="choose the truncate or window strategy"):
        RetrievedContext(retriever, fitting(smollm2_tokenizer, question_only - 1), 2).select(history)
    with pytest.raises(ValidationError, match="top_k .* must be >= 1"):
        RetrievedContext(retriever, fitting(smollm2_tokenizer, 8192), top_k=0)
    with pytest.raises(InputError, match="needs a user message last"):
        RetrievedContext(retriever, fitting(smollm2_tokenizer, 8192)).select(ChatHistory("system only"))


def test_citations_are_parsed_from_the_answer(retriever):
    assert cited_numbers("March [2], roofs [1, 3]; see [9] and [2] again, [x] and [0].", 3) == [2, 1, 3]
    passages = retriever.retrieve(QUESTION, 3)
    assert CitedAnswer("It is March [2].", passages, [2]).sources == [passages[1]]
    assert CitedAnswer("It is March.", passages, []).sources == passages  # none cited: all that were sent


def test_a_real_model_answers_from_the_planted_passage_and_cites_it(retriever, smollm2, smollm2_tokenizer):
    answer = answer_question(smollm2, smollm2_tokenizer, retriever, QUESTION, top_k=3, max_tokens=16)
    assert answer.passages[0].chunk.source == "notes/village.txt" and len(answer.passages) == 3
    assert "March" in answer.text and answer.cited == [1]
    assert [p.chunk.source for p in answer.sources] == ["notes/village.txt"]

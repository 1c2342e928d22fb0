"""`lmforge rag`: answer questions from your own documents (retrieval-augmented generation).

`index`: read a folder of documents (.txt, .md, .json, .csv, .html; other files are skipped), cut
them into chunks of at most --chunk-tokens tokens of the embedding model, neighbours sharing
--overlap tokens, embed every chunk, and write the index (vectors.safetensors and index.json) to --out.

`query`: embed a question with the index's own embedding model and print the -k closest chunks, best
first, with their cosine similarity and source. With --answer, a chat model (--model) answers from
those chunks, given to it as numbered sources, and the sources its answer cites as [n] are listed
(all of them when it cites none). `lmforge chat --rag INDEX` does this on every turn of a conversation.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import time

from lmforge.cli.common import (
    CLI_MAX_TOKENS,
    add_model_argument,
    load_generator,
    note,
    write_answer,
)
from lmforge.context.rag.chunking import ChunkingSettings
from lmforge.context.rag.embeddings import DEFAULT_EMBEDDING_MODEL
from lmforge.errors import ValidationError

INDEX_EXAMPLES = """examples:
  lmforge rag index docs/ --out docs.index
  lmforge rag index notes/ --out notes.index --chunk-tokens 200 --overlap 40 --batch-size 64
"""
QUERY_EXAMPLES = """examples:
  lmforge rag query docs.index "How do I quantize a model to int4?"
  lmforge rag query docs.index "How do I quantize a model to int4?" -k 3 --json
  lmforge rag query docs.index "How do I quantize a model to int4?" --answer
  lmforge chat --rag docs.index                       # retrieval on every turn of a conversation
"""
DEFAULTS = ChunkingSettings()


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("rag", help="index documents and answer questions from them, citing sources",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="rag_command", required=True, metavar="COMMAND")
    index = commands.add_parser("index", help="chunk and embed a folder of documents into an index",
                                description=__doc__, epilog=INDEX_EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    index.add_argument("documents", metavar="DIR", help="folder of documents (searched recursively), or one file")
    index.add_argument("--out", required=True, metavar="INDEX", help="folder to write the index to")
    index.add_argument("--chunk-tokens", type=int, default=DEFAULTS.chunk_tokens, metavar="N",
                       help=f"most tokens per chunk, of the embedding model's tokenizer (default: "
                            f"{DEFAULTS.chunk_tokens})")
    index.add_argument("--overlap", type=int, default=DEFAULTS.overlap_tokens, metavar="M",
                       help=f"tokens shared by neighbouring chunks (default: {DEFAULTS.overlap_tokens})")
    index.add_argument("--embedding-model", default=DEFAULT_EMBEDDING_MODEL, metavar="REF",
                       help=f"encoder that embeds the chunks: embedded short name or HF folder (default: "
                            f"{DEFAULT_EMBEDDING_MODEL})")
    index.add_argument("--batch-size", type=int, default=32, metavar="B", help="chunks embedded at once (default: 32)")
    index.set_defaults(handler=run_index)

    query = commands.add_parser("query", help="the chunks closest to a question (or an answer citing them)",
                                description=__doc__, epilog=QUERY_EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    query.add_argument("index", metavar="INDEX", help="an index folder written by `lmforge rag index`")
    query.add_argument("question", help="the question, or - to read it from stdin")
    query.add_argument("-k", type=int, default=5, metavar="K", help="chunks to retrieve (default: 5)")
    query.add_argument("--json", action="store_true", help="print the results (and answer) as JSON")
    query.add_argument("--approximate", action="store_true",
                       help="search an HNSW graph (faiss-cpu) instead of every vector: for very large indexes")
    query.add_argument("--embedding-model", metavar="REF",
                       help="encoder for the question; it must be the index's own (default: the index's)")
    answer = query.add_argument_group("answer (a chat model answers from the retrieved chunks)")
    answer.add_argument("--answer", action="store_true", help="generate an answer that cites the chunks as [n]")
    add_model_argument(answer)
    answer.add_argument("--max-tokens", type=int, default=CLI_MAX_TOKENS, metavar="N",
                        help=f"most tokens of the answer (default: {CLI_MAX_TOKENS})")
    query.set_defaults(handler=run_query)


def run_index(args: argparse.Namespace) -> int:
    from lmforge.context.rag import SentenceEncoder, build_index, load_documents

    settings = ChunkingSettings(args.chunk_tokens, args.overlap)  # bad values fail before anything loads
    start = time.perf_counter()
    corpus = load_documents(args.documents)
    if corpus.skipped:
        note(f"skipped {len(corpus.skipped)} file(s) of unsupported types: {', '.join(corpus.skipped[:5])}"
             + (", ..." if len(corpus.skipped) > 5 else ""))
    encoder = SentenceEncoder.from_pretrained(args.embedding_model)
    index = build_index(corpus.documents, encoder, settings, args.batch_size, progress=sys.stderr.isatty())
    index.save(args.out)
    print(f"files:   {len(corpus.documents)}")
    print(f"chunks:  {len(index.chunks)} (at most {settings.chunk_tokens} tokens, {settings.overlap_tokens} overlap)")
    print(f"tokens:  {sum(chunk.tokens for chunk in index.chunks)}")
    print(f"seconds: {time.perf_counter() - start:.2f}")
    print(f"index:   {args.out} ({index.embedding_model}, {index.dim} dimensions)")
    return 0


def run_query(args: argparse.Namespace) -> int:
    from lmforge.context.rag import Retriever, answer_question

    question = sys.stdin.read().strip() if args.question == "-" else args.question
    if args.k < 1:
        raise ValidationError(f"-k (chunks to retrieve) must be >= 1, got {args.k}.")
    retriever = Retriever.load(args.index, args.embedding_model, args.approximate)
    if not args.answer:
        hits = retriever.retrieve(question, args.k)
        if args.json:
            print(json.dumps({"question": question, "results": _passages(hits)}, ensure_ascii=False))
        else:
            _print_passages(hits)
        return 0
    model, tokenizer = load_generator(args.model)
    if args.json:
        result = answer_question(model, tokenizer, retriever, question, args.k, args.max_tokens)
        print(json.dumps({"question": question, "answer": result.text, "cited": result.cited,
                          "sources": _passages(result.passages)}, ensure_ascii=False))
        return 0
    result = _stream_answer(model, tokenizer, retriever, question, args.k, args.max_tokens)
    print("\nsources" + (" cited:" if result.cited else " given (the answer cites none):"))
    for number, passage in enumerate(result.passages, 1):
        if number in result.cited or not result.cited:
            print(f"[{number}] {passage.chunk.source} (characters {passage.chunk.start}-{passage.chunk.end}, "
                  f"score {passage.score:.3f})")
    return 0


def _stream_answer(model, tokenizer, retriever, question: str, top_k: int, max_tokens: int):
    """`answer_question`, with the answer written to stdout as it is generated."""
    from lmforge.context.rag import CitedAnswer, cited_numbers, question_context
    from lmforge.generation.sampling_params import SamplingParams

    selected = question_context(retriever, tokenizer, model.config.context_length, question, top_k, max_tokens)
    prompt_ids = tokenizer.encode(selected.history.to_prompt(tokenizer), add_special_tokens=False)
    answer = write_answer(model, tokenizer, prompt_ids, SamplingParams(temperature=0.0, max_tokens=max_tokens))
    print(flush=True)
    return CitedAnswer(answer.text, selected.passages, cited_numbers(answer.text, len(selected.passages)))


def _passages(hits) -> list[dict]:
    return [{"rank": rank, "score": hit.score, "source": hit.chunk.source, "start": hit.chunk.start,
             "end": hit.chunk.end, "tokens": hit.chunk.tokens, "text": hit.chunk.text}
            for rank, hit in enumerate(hits, 1)]


def _print_passages(hits) -> None:
    for rank, hit in enumerate(hits, 1):
        print(f"{rank}. {hit.score:.3f}  {hit.chunk.source} (characters {hit.chunk.start}-{hit.chunk.end}, "
              f"{hit.chunk.tokens} tokens)")
        print(textwrap.fill(" ".join(hit.chunk.text.split()), width=100, initial_indent="   ",
                            subsequent_indent="   "))

"""Retrieval quality and speed of lmforge's RAG index over Python standard-library docstrings.

Corpus: one document per module of MODULES (the first --modules), made of its public functions, classes and
their methods, each as a heading (`name(signature)`) followed by its docstring.
Questions: for each function or method whose docstring's first sentence starts with a verb of VERBS, that
sentence turned into a question by a template ("Which function returns <the rest>?") with articles dropped and
some words swapped for synonyms (SYNONYMS). Questions that name their function, or whose rephrased text is in a
document verbatim, are left out, so exact string matching answers none. The words a question still shares with
its answer are the docstring's own, so a word-overlap retriever (BM25 over the same chunks) is reported beside
the embeddings as the lexical baseline.
Answer: a chunk that holds the function's heading and that whole sentence; recall@k = the share of questions
with such a chunk among the top k.
Speed: the index build (chunking + embedding every chunk), the query latency (embedding the question + exact
search, median over the questions), and embedding throughput (chunks/s) of lmforge's SentenceEncoder vs HF
transformers AutoModel + mean pooling (the same all-MiniLM-L6-v2 folder) on the same --throughput-chunks
chunks in the same length-sorted batches, alternated --repeats times (median).
Writes the table to docs/benchmarks.md (section "rag").
Usage: python -m benchmarks.rag [--modules 30] [--questions 200] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import math
import os
import platform
import random
import re
import statistics
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from benchmarks.report import machine_line, markdown_table, write_section

MODULES = ["base64", "calendar", "configparser", "contextlib", "difflib", "email.utils", "filecmp", "fnmatch",
           "functools", "glob", "gzip", "ipaddress", "json", "mimetypes", "os", "pathlib", "platform", "posixpath",
           "queue", "random", "shlex", "shutil", "statistics", "tarfile", "tempfile", "textwrap", "traceback",
           "urllib.parse", "uuid", "zipfile"]
VERBS = {"return": "returns", "returns": "returns", "create": "creates", "convert": "converts", "compute": "computes",
         "get": "gets", "make": "makes", "remove": "removes", "read": "reads", "write": "writes", "split": "splits",
         "find": "finds", "open": "opens", "set": "sets", "add": "adds", "parse": "parses", "decode": "decodes",
         "encode": "encodes", "copy": "copies", "format": "formats", "generate": "generates", "test": "tests",
         "check": "checks", "calculate": "calculates", "construct": "constructs", "change": "changes",
         "extract": "extracts", "close": "closes", "print": "prints", "join": "joins", "wrap": "wraps"}
SYNONYMS = {"string": "text", "strings": "texts", "list": "sequence", "object": "instance", "given": "supplied",
            "specified": "requested", "number": "count", "file": "document", "files": "documents", "directory":
            "folder", "true": "yes", "false": "no", "if": "when", "new": "fresh", "value": "result"}


@dataclass(frozen=True)
class Question:
    text: str
    source: str
    heading_start: int
    summary_end: int


def module_document(name: str) -> tuple[str, list[tuple[str, str, int, int]]]:
    """The module's text, and (name, summary, heading start, summary end) for each function and method."""
    module = importlib.import_module(name)
    parts, entries, length = [f"# {name}\n\n"], [], len(name) + 4

    def add(heading: str, obj) -> None:
        nonlocal length
        doc = inspect.getdoc(obj)
        try:
            signature = re.sub(r" at 0x[0-9a-f]+", "", str(inspect.signature(obj)))  # no addresses: the same every run
        except (TypeError, ValueError):
            signature = "(...)"
        block = f"## {heading}{signature}\n{doc}\n\n"
        if inspect.isfunction(obj):  # the summary: the docstring's first sentence (it may wrap)
            sentence = re.match(r".+?(?:\.(?=\s)|\n\n|$)", doc, re.S).group(0)
            start = length + len(f"## {heading}{signature}\n")
            entries.append((obj.__name__, " ".join(sentence.split()), length, start + len(sentence)))
        parts.append(block)
        length += len(block)

    for attr, obj in sorted(vars(module).items()):
        defined_here = getattr(obj, "__module__", None) == module.__name__
        if attr.startswith("_") or not defined_here or not inspect.getdoc(obj):
            continue
        if inspect.isfunction(obj):
            add(f"{name}.{attr}", obj)
        elif inspect.isclass(obj):
            add(f"class {name}.{attr}", obj)
            for method_name, method in sorted(vars(obj).items()):
                if not method_name.startswith("_") and inspect.isfunction(method) and inspect.getdoc(method):
                    add(f"{name}.{attr}.{method_name}", method)
    return "".join(parts), entries


def rephrase(summary: str) -> str | None:
    """"Which function <verb>s <rest>?" with articles dropped and SYNONYMS swapped, or None (no known verb)."""
    match = re.match(r"(\w+)\s+(.+?)[.\s]*$", summary)
    if not match or match.group(1).lower() not in VERBS or len(match.group(2).split()) < 3:
        return None
    rest = re.sub(r"\b(?:a|an|the)\s+", "", match.group(2), flags=re.I)
    rest = re.sub(r"\b\w+\b", lambda word: SYNONYMS.get(word.group(0).lower(), word.group(0)), rest)
    return f"Which function {VERBS[match.group(1).lower()]} {rest[:1].lower()}{rest[1:]}?"


def build_corpus(modules: list[str]):
    from lmforge.context.rag import Document

    documents, questions, summaries = [], [], Counter()
    entries = {}
    for name in modules:
        text, found = module_document(name)
        documents.append(Document(f"{name}.md", text))
        entries[f"{name}.md"] = found
        summaries.update(summary for _, summary, _, _ in found)
    corpus = "\n".join(d.text.lower() for d in documents)
    for source, found in entries.items():
        for function, summary, heading_start, summary_end in found:
            question = rephrase(summary)
            if question is None or summaries[summary] > 1:  # ambiguous: the same line documents several functions
                continue
            if re.search(rf"\b{re.escape(function.lower())}\b", question.lower()):  # it would give the name away
                continue
            phrase = question.lower().removeprefix("which function ").removesuffix("?")
            if phrase.split(" ", 1)[1] not in corpus:  # nothing but the verb left verbatim
                questions.append(Question(question, source, heading_start, summary_end))
    return documents, questions


def answers(chunks, question: Question) -> set[int]:
    return {i for i, c in enumerate(chunks) if c.source == question.source and c.start <= question.heading_start
            and c.end >= question.summary_end}


class BM25:
    """The lexical baseline: Okapi BM25 (k1 1.2, b 0.75) over lowercased words."""

    def __init__(self, texts: list[str], k1: float = 1.2, b: float = 0.75):
        self.docs = [Counter(re.findall(r"\w+", t.lower())) for t in texts]
        self.lengths = np.array([sum(d.values()) for d in self.docs], dtype=np.float64)
        frequency = Counter(word for d in self.docs for word in d)
        n = len(texts)
        self.idf = {w: math.log(1 + (n - f + 0.5) / (f + 0.5)) for w, f in frequency.items()}
        self.k1, self.b, self.mean_length = k1, b, self.lengths.mean()

    def top(self, query: str, k: int) -> list[int]:
        scores = np.zeros(len(self.docs))
        norm = self.k1 * (1 - self.b + self.b * self.lengths / self.mean_length)
        for word in set(re.findall(r"\w+", query.lower())):
            if word in self.idf:
                tf = np.array([d.get(word, 0) for d in self.docs], dtype=np.float64)
                scores += self.idf[word] * tf * (self.k1 + 1) / (tf + norm)
        return list(np.argsort(-scores, kind="stable")[:k])


def cpu_busy_cores(seconds: float = 2.0) -> float:
    """How many cores other processes kept busy over `seconds` (from /proc/stat; 0 where it does not exist)."""
    def busy_and_total() -> tuple[int, int]:
        fields = [int(x) for x in open("/proc/stat").readline().split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields) - idle, sum(fields)

    if not os.path.exists("/proc/stat"):
        return 0.0
    busy, total = busy_and_total()
    time.sleep(seconds)
    busy_after, total_after = busy_and_total()
    return (busy_after - busy) / max(total_after - total, 1) * os.cpu_count()


def hf_encoder():
    """transformers' AutoModel + mean pooling over the attention mask, unit length: the peer."""
    import transformers

    from lmforge.sources import resolve

    folder = resolve("all-minilm-l6-v2")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModel.from_pretrained(folder).eval()

    def encode(batches: list[list[str]]) -> np.ndarray:
        out = []
        with torch.inference_mode():
            for texts in batches:
                batch = tokenizer(texts, padding=True, return_tensors="pt")
                hidden = model(**batch).last_hidden_state
                mask = batch["attention_mask"][..., None].float()
                out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy())
        return np.concatenate(out)

    return encode


def search_comparison(count: int, dim: int, seed: int, queries: int = 200, k: int = 10) -> str:
    """Exact search vs an HNSW graph (faiss) over `count` clustered random unit vectors: build time, query
    time (median) and recall@k of HNSW against exact search."""
    from lmforge.context.rag import ChunkingSettings, VectorIndex
    from lmforge.context.rag.approximate import HNSWSearch

    generator = np.random.default_rng(seed)
    centres = generator.normal(size=(max(count // 200, 1), dim))
    vectors = centres[generator.integers(0, len(centres), count)] + 0.5 * generator.normal(size=(count, dim))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    index = VectorIndex(vectors, [], "synthetic", ChunkingSettings())
    clock = time.perf_counter()
    graph = HNSWSearch(vectors)
    build_s = time.perf_counter() - clock
    exact_s, hnsw_s, found = [], [], 0
    for query in vectors[generator.integers(0, count, queries)]:
        query = query + 0.3 * generator.normal(size=dim).astype(np.float32) / math.sqrt(dim)
        query = (query / np.linalg.norm(query)).astype(np.float32)
        clock = time.perf_counter()
        scores = index.vectors @ query
        exact = np.argpartition(-scores, k - 1)[:k]
        exact_s.append(time.perf_counter() - clock)
        clock = time.perf_counter()
        ids, _ = graph.search(query, k)
        hnsw_s.append(time.perf_counter() - clock)
        found += len(set(exact) & set(ids))
    exact_ms, hnsw_ms = statistics.median(exact_s) * 1e3, statistics.median(hnsw_s) * 1e3
    return f"""Exact vs approximate search over {count:,} synthetic unit vectors of {dim} dimensions (clustered), top {k},
{queries} queries near stored vectors: `rag query --approximate` / `Retriever.load(..., approximate=True)`.

{markdown_table(["search", "build", "query (median)", f"recall@{k} vs exact"],
                [["exact (numpy)", "none", f"{exact_ms:.2f} ms", "100%"],
                 ["HNSW (faiss, M=32, efSearch=64)", f"{build_s:.1f} s", f"{hnsw_ms:.3f} ms",
                  f"{found / (queries * k):.1%}"]])}"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modules", type=int, default=30,
                        help=f"stdlib modules in the corpus (at most {len(MODULES)})")
    parser.add_argument("--questions", type=int, default=200, help="questions asked (a seeded sample)")
    parser.add_argument("--chunk-tokens", type=int, default=128, help="most tokens per chunk")
    parser.add_argument("--overlap", type=int, default=24, help="tokens shared by neighbouring chunks")
    parser.add_argument("--batch-size", type=int, default=32, help="chunks embedded at once (both systems)")
    parser.add_argument("--throughput-chunks", type=int, default=256, help="chunks embedded per throughput run")
    parser.add_argument("--repeats", type=int, default=5, help="alternated throughput runs per system")
    parser.add_argument("--seed", type=int, default=0, help="seed of the question and chunk samples")
    parser.add_argument("--ann-vectors", type=int, default=100_000,
                        help="synthetic unit vectors for exact vs approximate (HNSW) search; 0 skips it")
    parser.add_argument("--threads", type=int, help="torch threads for both systems (default: torch's own; on a "
                                                     "machine shared with other work, fewer threads avoid contention)")
    args = parser.parse_args()
    if not 1 <= args.modules <= len(MODULES):
        parser.error(f"--modules must be between 1 and {len(MODULES)}.")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    from lmforge.context.rag import (
        ChunkingSettings,
        Retriever,
        SentenceEncoder,
        build_index,
    )

    busy_cores = cpu_busy_cores()  # other work on the machine, before this run adds its own
    documents, candidates = build_corpus(MODULES[:args.modules])
    rng = random.Random(args.seed)
    encoder = SentenceEncoder.from_pretrained("all-minilm-l6-v2")
    start = time.perf_counter()
    index = build_index(documents, encoder, ChunkingSettings(args.chunk_tokens, args.overlap), args.batch_size)
    build_s = time.perf_counter() - start
    chunks = index.chunks
    answerable = [q for q in candidates if answers(chunks, q)]
    questions = rng.sample(answerable, min(args.questions, len(answerable)))
    retriever, lexical = Retriever(index, encoder), BM25([c.text for c in chunks])
    position = {id(chunk): i for i, chunk in enumerate(chunks)}
    hits = {"embeddings": [0, 0], "BM25": [0, 0]}
    latencies, search_latencies = [], []
    for question in questions:
        right = answers(chunks, question)
        clock = time.perf_counter()
        found = retriever.retrieve(question.text, 5)
        latencies.append(time.perf_counter() - clock)
        vector = encoder.encode([question.text])[0]
        clock = time.perf_counter()
        index.search(vector, 5)
        search_latencies.append(time.perf_counter() - clock)
        ranked = [position[id(hit.chunk)] for hit in found]
        for name, top in (("embeddings", ranked), ("BM25", lexical.top(question.text, 5))):
            hits[name][0] += top[0] in right
            hits[name][1] += bool(right & set(top))

    # Embedding throughput: the same chunks in the same length-sorted batches for both systems.
    sample = [c.text for c in rng.sample(chunks, min(args.throughput_chunks, len(chunks)))]
    lengths = [len(ids) for ids in (e.ids for e in encoder.tokenizer.backend.encode_batch(sample))]
    ordered = [sample[i] for i in sorted(range(len(sample)), key=lambda i: lengths[i], reverse=True)]
    batches = [ordered[i:i + args.batch_size] for i in range(0, len(ordered), args.batch_size)]
    hf = hf_encoder()
    systems = {"lmforge": lambda: encoder.encode(sample, args.batch_size), "transformers": lambda: hf(batches)}
    difference = float(np.abs(encoder.encode(ordered, args.batch_size) - hf(batches)).max())
    times: dict[str, list[float]] = {name: [] for name in systems}
    for repeat in range(args.repeats):
        for name in (list(systems) if repeat % 2 == 0 else list(systems)[::-1]):
            clock = time.perf_counter()
            systems[name]()
            times[name].append(time.perf_counter() - clock)
    speed = {name: len(sample) / statistics.median(t) for name, t in times.items()}

    n = len(questions)
    quality = markdown_table(["retriever", "recall@1", "recall@5"],
                             [[name, f"{h1 / n:.0%}", f"{h5 / n:.0%}"] for name, (h1, h5) in hits.items()])
    table = markdown_table(
        ["measure", "value"],
        [["documents / chunks / tokens", f"{len(documents)} / {len(chunks):,} / {sum(c.tokens for c in chunks):,}"],
         ["index build (chunking + embedding)", f"{build_s:.1f} s ({len(chunks) / build_s:.0f} chunks/s)"],
         ["query latency (embed + exact search), median", f"{statistics.median(latencies) * 1e3:.1f} ms"],
         ["exact search alone, median", f"{statistics.median(search_latencies) * 1e6:.0f} µs"],
         ["embedding throughput, lmforge", f"{speed['lmforge']:.1f} chunks/s"],
         ["embedding throughput, transformers", f"{speed['transformers']:.1f} chunks/s"],
         ["lmforge / transformers", f"{speed['lmforge'] / speed['transformers']:.2f}x"],
         ["largest difference between their vectors", f"{difference:.1e}"]])
    search = search_comparison(args.ann_vectors, index.dim, args.seed) if args.ann_vectors else ""
    print(quality)
    print(table)
    print(search)
    busy = (f"Other work kept {busy_cores:.1f} of the {os.cpu_count()} cores busy when this run started, so absolute "
            "times are noisy; the two systems ran alternately under the same load, so read their ratio."
            if busy_cores > 0.25 else "The machine was idle when this run started, but it is shared with other work, "
                                      "so absolute times may be noisy; read the ratio.")
    threads = (f" Both systems ran with {args.threads} torch thread(s) (--threads): on a small machine shared with "
               "other work, more threads than free cores make every process wait." if args.threads else "")
    asked = "all are asked" if n == len(answerable) else f"a seeded sample of {n} is asked"
    write_section("rag", f"""
## RAG: retrieval over standard-library docstrings (`benchmarks/rag.py`)

{machine_line()}.

The corpus is one document per module for {len(documents)} standard-library modules of Python
{platform.python_version()}: each public function, class and method as a heading with its signature, then its
docstring. Chunks of at most {args.chunk_tokens} tokens with {args.overlap} overlap, embedded by all-MiniLM-L6-v2.
Questions are first sentences of function docstrings turned into "Which function returns ...?" with articles
dropped and some words swapped for synonyms: none names the function or is in a document verbatim, so exact
string matching answers none. Of the {len(candidates)} questions, the {len(answerable)} whose function's heading
and first sentence fall in one chunk can be answered, and {asked}. A question counts as answered at k when such
a chunk is among the top k. BM25 over the same chunks is the word-overlap baseline; the questions keep most of
their docstring's words, which is why it does so well.

{quality}

{table}

Throughput: {len(sample)} chunks in the same length-sorted batches of {args.batch_size}, the two systems alternated
{args.repeats} times (median); transformers is AutoModel + mean pooling over the same model folder.{threads} {busy}

{search}
""")


if __name__ == "__main__":
    main()

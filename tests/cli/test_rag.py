"""`lmforge rag index` / `rag query` end to end on a tiny corpus, `--answer` with citations, `lmforge chat --rag`,
and one-line errors (unsupported file, missing index, another embedding model)."""

import io
import json

import pytest

from lmforge.cli import main
from lmforge.context.rag import SentenceEncoder
from lmforge.context.rag.embeddings import DEFAULT_EMBEDDING_MODEL
from lmforge.generation.chat import ChatHistory
from tests.cli.conftest import run_lmforge
from tests.context.rag_corpus import QUESTION, write_corpus


@pytest.fixture
def session_encoder(monkeypatch, minilm_encoder):
    """In-process commands reuse the session's all-MiniLM-L6-v2 instead of loading it again."""
    load = SentenceEncoder.from_pretrained.__func__

    def from_pretrained(cls, ref=DEFAULT_EMBEDDING_MODEL):
        return minilm_encoder if ref == DEFAULT_EMBEDDING_MODEL else load(cls, ref)

    monkeypatch.setattr(SentenceEncoder, "from_pretrained", classmethod(from_pretrained))


@pytest.fixture(scope="module")
def index(tmp_path_factory, minilm_encoder):
    """An index written by the command (module-wide: the other tests only read it)."""
    folder = write_corpus(tmp_path_factory.mktemp("corpus"))
    (folder / "slides.pptx").write_bytes(b"PK")
    out = tmp_path_factory.mktemp("index") / "corpus.index"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SentenceEncoder, "from_pretrained", classmethod(lambda cls, ref: minilm_encoder))
        result = run_in_process(["rag", "index", str(folder), "--out", str(out), "--chunk-tokens", "32",
                                 "--overlap", "4"])
    return out, result


def run_in_process(argv: list[str]) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("sys.stdout", stdout)
        patch.setattr("sys.stderr", stderr)
        status = main(argv)
    return status, stdout.getvalue(), stderr.getvalue()


def test_index_reports_files_chunks_tokens_and_seconds(index):
    out, (status, stdout, stderr) = index
    assert status == 0, stderr
    lines = dict(line.split(":", 1) for line in stdout.splitlines())
    assert lines["files"].strip() == "7" and int(lines["chunks"].split()[0]) >= 7
    assert "at most 32 tokens, 4 overlap" in lines["chunks"] and int(lines["tokens"]) > 100
    assert float(lines["seconds"]) >= 0 and "(all-minilm-l6-v2, 384 dimensions)" in lines["index"]  # 0.00 on a fast run
    assert "skipped 1 file(s) of unsupported types: slides.pptx" in stderr
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "vectors.safetensors"]


def test_query_prints_ranked_chunks_with_scores_and_sources(index, session_encoder, capsys):
    out, _ = index
    assert main(["rag", "query", str(out), QUESTION, "-k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    headers = [line for line in lines if not line.startswith("   ")]  # each chunk's text is indented below it
    assert len(headers) == 2 and headers[0].startswith("1. 0.") and headers[1].startswith("2. 0.")
    assert "notes/village.txt (characters 0-" in headers[0] and lines[1].startswith("   Every March the villagers")
    assert main(["rag", "query", str(out), QUESTION, "-k", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["rank"] for r in report["results"]] == [1, 2, 3] and report["question"] == QUESTION
    assert report["results"][0]["source"] == "notes/village.txt" and report["results"][0]["start"] == 0
    assert report["results"][0]["score"] > report["results"][1]["score"]
    assert main(["rag", "query", str(out), QUESTION, "-k", "3", "--json", "--approximate"]) == 0
    approximate = json.loads(capsys.readouterr().out)["results"]  # HNSW agrees on a tiny index
    assert [(r["source"], r["start"]) for r in approximate] == [(r["source"], r["start"]) for r in report["results"]]
    assert [r["score"] for r in approximate] == pytest.approx([r["score"] for r in report["results"]], abs=1e-5)


def test_query_through_the_entry_point(index):
    out, _ = index
    result = run_lmforge("rag", "query", str(out), QUESTION, "-k", "1", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["results"][0]["source"] == "notes/village.txt"


def test_answer_cites_its_sources(index, session_encoder, loaded_smollm2, monkeypatch, capsys):
    from lmforge.cli import chat, rag

    monkeypatch.setattr(rag, "load_generator", chat.load_generator)  # the session's SmolLM2
    out, _ = index
    assert main(["rag", "query", str(out), QUESTION, "-k", "3", "--answer", "--max-tokens", "12"]) == 0
    answer, sources = capsys.readouterr().out.split("\nsources cited:\n")
    assert "March" in answer and "[1]" in answer
    assert sources.startswith("[1] notes/village.txt (characters 0-") and sources.count("\n") == 1


def test_chat_retrieves_sources_for_each_turn(index, session_encoder, loaded_smollm2, monkeypatch, capsys, tmp_path):
    out, _ = index
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{QUESTION}\n/save {tmp_path / 'chat.json'}\n"))
    assert main(["chat", "--rag", str(out), "--rag-top-k", "2", "--temperature", "0", "--max-tokens", "8"]) == 0
    stdout, stderr = capsys.readouterr()
    assert "lmforge: sources: [1] notes/village.txt (0." in stderr and ", [2] " in stderr
    assert stdout.strip() and stdout.count("\n") == 1  # one answer
    saved = ChatHistory.load(tmp_path / "chat.json").messages  # the conversation as typed, without the sources
    assert saved[0] == {"role": "user", "content": QUESTION} and saved[1]["content"] == stdout.rstrip("\n")


def test_bad_input_is_one_line(index, session_encoder, tmp_path, minilm_encoder):
    import torch

    from lmforge.config import BertConfig
    from lmforge.models.bert import BertModel

    other = tmp_path / "tiny-bert"
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=minilm_encoder.tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2)).save_pretrained(other)
    minilm_encoder.tokenizer.save_pretrained(other)
    (tmp_path / "slides.pptx").write_bytes(b"PK")
    out, _ = index
    for argv, message in (
            (["rag", "index", str(tmp_path / "slides.pptx"), "--out", "x"],
             "no converter for '.pptx' files; supported:"),
            (["rag", "index", str(tmp_path), "--out", "x", "--overlap", "80"], "overlap_tokens must be >= 0 and less"),
            (["rag", "query", str(tmp_path / "none"), "q"], "none: no such folder; build one with: lmforge rag index"),
            (["rag", "query", str(out), QUESTION, "--embedding-model", str(other)],
             f"built with the embedding model 'all-minilm-l6-v2' (384 dimensions), but the query is embedded with "
             f"'{other}' (32 dimensions)"),
            (["rag", "query", str(out), QUESTION, "-k", "0"], "-k (chunks to retrieve) must be >= 1"),
            (["chat", "--rag", str(tmp_path / "none")], "none: no such folder"),
            (["chat", "--rag", str(out), "--rag-top-k", "0"], "--rag-top-k must be >= 1")):
        status, stdout, stderr = run_in_process(argv)
        assert status == 2 and stdout == "", argv
        assert stderr.startswith("lmforge: error: ") and message in stderr and stderr.count("\n") == 1, stderr


def test_help_shows_examples(capsys):
    for command in ("index", "query"):
        with pytest.raises(SystemExit) as exit_:
            main(["rag", command, "--help"])
        assert exit_.value.code == 0 and "examples:\n  lmforge rag" in capsys.readouterr().out

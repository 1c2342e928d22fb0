"""Documents: the files a retrieval index is built from, read as compact text.

A document is one file's text, named by its path relative to the folder it came from (the name
every chunk and citation carries). Each file goes through the structured-input converter of its
type (lmforge/context/converters.py), so markup, JSON indentation or CSV quoting are not embedded
and not sent to the model; character spans refer to this converted text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lmforge.context.converters import CONVERTERS, convert_file
from lmforge.errors import InputError


@dataclass(frozen=True)
class Document:
    """A file's converted text and the name it is cited by."""

    source: str
    text: str


@dataclass(frozen=True)
class Corpus:
    """The documents of a folder (or one file), and the files left out because no converter reads their type."""

    documents: list[Document]
    skipped: list[str]


def load_documents(path: str | Path) -> Corpus:
    """Every supported file under `path` (recursively, hidden files and folders left out), in name order.

    A single file of an unsupported type is refused with the list of supported types; in a folder such
    files are skipped and listed in `Corpus.skipped`.
    """
    path = Path(path)
    if path.is_file():
        return Corpus([Document(path.name, convert_file(path)[1])], [])
    if not path.is_dir():
        raise InputError(f"{path}: no such file or folder; pass the folder of documents to index.")
    files = sorted(p for p in path.rglob("*")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
    supported = [p for p in files if p.suffix.lower() in CONVERTERS]
    if not supported:
        found = f"{len(files)} file(s) of other types" if files else "no files"
        raise InputError(f"{path}: no documents to index ({found}); supported types: "
                         f"{', '.join(sorted(CONVERTERS))}.")
    documents = [Document(p.relative_to(path).as_posix(), convert_file(p)[1]) for p in supported]
    return Corpus(documents, [p.relative_to(path).as_posix() for p in files if p.suffix.lower() not in CONVERTERS])

"""The pretraining corpus: your own files, or by default the Python standard library's source code.

Every Python installation carries some 30 MB of real, varied, carefully written code (the
standard library and its test suite), so a small code model can be pretrained on any machine
without downloading a data set. Installed packages (site-packages) are left out: they differ
from machine to machine, and the corpus should not. A seeded subset (`max_files`,
`max_characters`) makes quick runs on the same kind of text.
"""

from __future__ import annotations

import fnmatch
import os
import sysconfig
from collections.abc import Iterable
from pathlib import Path

from lmforge.errors import InputError
from lmforge.train.data import Document, load_documents, shuffled

_INSTALLED_PACKAGES = {"site-packages", "dist-packages"}


def stdlib_folder() -> Path:
    """The folder of the running Python's standard-library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(pattern: str = "*.py") -> list[Path]:
    """The standard library's files whose names match `pattern`, in sorted order, without installed packages."""
    paths = []
    for root, folders, files in os.walk(stdlib_folder()):
        folders[:] = [name for name in folders if name not in _INSTALLED_PACKAGES]  # do not descend into them
        paths += [Path(root, name) for name in fnmatch.filter(files, pattern)]
    return sorted(paths)


def _read_stdlib(paths: Iterable[Path]) -> Iterable[Document]:
    """One document per file; the few test files deliberately written in other encodings are skipped."""
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            yield Document(text, str(path))


def _take(documents: Iterable[Document], max_files: int | None, max_characters: int | None) -> list[Document]:
    """Documents in order until `max_files` are taken or `max_characters` are reached (the last one may cross it)."""
    taken, characters = [], 0
    for document in documents:
        if (max_files is not None and len(taken) >= max_files) or \
                (max_characters is not None and characters >= max_characters):
            break
        taken.append(document)
        characters += len(document.text)
    return taken


def load_corpus(corpus: str | Path | None = None, pattern: str = "*.py", text_column: str = "text",
                max_files: int | None = None, max_characters: int | None = None, seed: int = 0) -> list[Document]:
    """The documents of `corpus` (a text/JSONL/CSV file or a folder of files matching `pattern`), or of the
    standard library when it is None, in a seeded random order, cut to `max_files` / `max_characters`.

    Shuffling before cutting makes a subset a sample of the whole corpus rather than its
    alphabetically first files; the same seed gives the same subset on every machine.
    """
    if corpus is None:
        paths = stdlib_files(pattern)
        if not paths:
            raise InputError(f"{stdlib_folder()}: no standard-library file matches {pattern!r}; set data.corpus to "
                             "a folder or file of your own text.")
        # Shuffle the paths, not the texts, so a small subset reads only the files it keeps.
        documents = _take(_read_stdlib(shuffled(paths, seed)), max_files, max_characters)
    else:
        path = Path(corpus).expanduser()
        table = path.is_file() and path.suffix.lower() in (".jsonl", ".csv")
        options = {"text_column": text_column} if table else {"pattern": pattern}
        documents = _take(shuffled(load_documents(path, **options), seed), max_files, max_characters)
    if not documents:
        raise InputError(f"the corpus {corpus or stdlib_folder()} has no readable document; check data.corpus "
                         "and data.pattern.")
    return documents

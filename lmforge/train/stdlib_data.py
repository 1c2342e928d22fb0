"""A text-classification dataset that needs no download: Python standard-library docstrings.

Each example is the first paragraph of the docstring of a public function, class or method in the
standard library's source files, labelled by its package ("asyncio", "email", …): guess which
part of the library a sentence such as "Return True if the future was cancelled." documents.
The files are parsed with `ast`, never imported, so nothing runs. The same Python version gives
the same examples everywhere; another version's library may differ slightly.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

from lmforge.errors import InputError
from lmforge.train.corpus import stdlib_folder
from lmforge.train.data import Document, shuffled

STDLIB_PACKAGES = ("asyncio", "email", "http", "logging", "unittest", "xml")
_SKIPPED_FOLDERS = {"test", "tests", "idle_test"}


def first_paragraph(docstring: str) -> str:
    """The docstring up to its first blank line, on one line (its summary)."""
    return " ".join(re.split(r"\n\s*\n", docstring.strip(), maxsplit=1)[0].split())


def _source_files(package: str, root: Path) -> list[Path]:
    """The public source files of a package (its folder, recursively) or module (name.py), sorted."""
    folder, module = root / package, root / f"{package}.py"
    if folder.is_dir():
        files = sorted(folder.rglob("*.py"))
    elif module.is_file():
        files = [module]
    else:
        raise InputError(f"{package!r} is not a standard-library package or module in {root}; pass names such "
                         f"as {', '.join(STDLIB_PACKAGES)}.")
    return [file for file in files
            if not _SKIPPED_FOLDERS & set(file.relative_to(root).parts)
            and not (file.name.startswith("_") and file.name != "__init__.py")]  # private modules


def _documented(body: list[ast.stmt], owner: str = "") -> Iterator[tuple[str, int, str]]:
    """(qualified name, line, docstring) of the public functions, classes and their public methods."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            docstring = ast.get_docstring(node)
            if docstring:
                yield f"{owner}{node.name}", node.lineno, docstring
            if isinstance(node, ast.ClassDef) and not owner:
                yield from _documented(node.body, f"{node.name}.")


def stdlib_docstrings(packages: Sequence[str] = STDLIB_PACKAGES, per_package: int | None = 100, seed: int = 0,
                      min_words: int = 3) -> list[Document]:
    """Docstring summaries labelled by package: `Document(text, source="email/message.py:120 Message.get",
    label="email")`.

    Summaries shorter than `min_words` words ("Deprecated.") are dropped, a summary repeated within a
    package is kept once, and one found in two packages is dropped (it cannot be told apart). With
    `per_package`, each package keeps that many, drawn with `seed`, so the classes are balanced.
    """
    if len(set(packages)) < 2:
        raise InputError(f"a classification dataset needs at least 2 distinct packages; got {list(packages)}.")
    root = stdlib_folder()
    found: dict[str, dict[str, str]] = {}  # package → summary → source of its first occurrence
    for package in packages:
        found[package] = {}
        for file in _source_files(package, root):
            tree = ast.parse(file.read_text(encoding="utf-8"), filename=str(file))
            for name, line, docstring in _documented(tree.body):
                summary = first_paragraph(docstring)
                if len(summary.split()) >= min_words:
                    found[package].setdefault(summary, f"{file.relative_to(root)}:{line} {name}")
    owners: dict[str, set[str]] = {}
    for package, summaries in found.items():
        for summary in summaries:
            owners.setdefault(summary, set()).add(package)
    documents = []
    for package, summaries in found.items():
        kept = [Document(summary, source, label=package) for summary, source in summaries.items()
                if len(owners[summary]) == 1]
        if per_package is not None:
            if len(kept) < per_package:
                raise InputError(f"package {package!r} has only {len(kept)} usable docstrings, fewer than "
                                 f"per_package={per_package}; lower per_package or pick a larger package.")
            chosen = {document.source for document in shuffled(kept, seed)[:per_package]}
            kept = [document for document in kept if document.source in chosen]
        documents.extend(kept)
    return documents

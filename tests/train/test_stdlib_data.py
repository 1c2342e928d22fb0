"""The standard-library docstring dataset: deterministic, balanced, labelled by package, traceable to source."""

import ast
from collections import Counter

import pytest

from lmforge.errors import InputError
from lmforge.train import stdlib_docstrings
from lmforge.train.corpus import stdlib_folder
from lmforge.train.stdlib_data import STDLIB_PACKAGES, first_paragraph


@pytest.fixture(scope="module")
def default_set():
    return stdlib_docstrings()


def test_the_same_call_gives_the_same_examples(default_set):
    assert stdlib_docstrings() == default_set
    assert Counter(document.label for document in default_set) == {package: 100 for package in STDLIB_PACKAGES}
    assert stdlib_docstrings(seed=1) != default_set  # the seed draws which 100 per package


def test_every_example_comes_from_its_package_and_is_unambiguous(default_set):
    texts = Counter(document.text for document in default_set)
    assert max(texts.values()) == 1
    for document in default_set:
        assert document.source.startswith(f"{document.label}/")
        assert len(document.text.split()) >= 3 and "\n" not in document.text


def test_sources_point_at_the_documented_definition():
    documents = stdlib_docstrings(("json", "csv"), per_package=None)
    by_source = {document.source.split(" ")[1]: document for document in documents}
    assert by_source["dumps"].text == "Serialize ``obj`` to a JSON formatted ``str``."
    assert by_source["dumps"].label == "json" and by_source["Sniffer"].label == "csv"  # csv is a module
    path, line = by_source["dumps"].source.split(" ")[0].split(":")
    node = next(node for node in ast.parse((stdlib_folder() / path).read_text()).body
                if getattr(node, "lineno", None) == int(line))
    assert node.name == "dumps"
    assert "Sniffer.sniff" in by_source  # methods too
    assert not any(document.source.split(" ")[1].split(".")[-1].startswith("_") for document in documents)


def test_first_paragraph_is_the_summary():
    assert first_paragraph("  Return the\n    sum.\n\n    More text.\n") == "Return the sum."


def test_bad_requests_are_clear_errors():
    with pytest.raises(InputError, match="'nosuchpackage' is not a standard-library package"):
        stdlib_docstrings(("json", "nosuchpackage"))
    with pytest.raises(InputError, match="at least 2 distinct packages"):
        stdlib_docstrings(("json", "json"))
    with pytest.raises(InputError, match="package 'json' has only .* fewer than per_package=1000"):
        stdlib_docstrings(("json", "csv"), per_package=1000)

"""Structured input: each converter keeps the content and drops what a model need not read; token counts
before and after; clear errors for unknown types and malformed JSON."""

import json

import pytest

from lmforge.context.converters import (
    compact_csv,
    compact_file,
    compact_html,
    compact_json,
    compact_markdown,
    compact_whitespace,
)
from lmforge.errors import InputError


def test_each_format_keeps_its_content_and_drops_the_rest():
    assert compact_whitespace("a  \t b   \n\n\n\nc  \n") == "a b\n\nc\n"
    markdown = ("# Title\n\nSome **bold** and *em* text, a [link](http://x.org) and ![pic](a.png).\n<!-- note -->\n"
                "| a | b |\n|---|:-:|\n| 1 | 2 |\n\n---\n2 * 3 * 4\n```python\ndef f(x):\n    return  x * 2\n```\n")
    assert compact_markdown(markdown) == ("# Title\n\nSome bold and em text, a link and pic.\n\n| a | b |\n| 1 | 2 |\n\n"
                                          "2 * 3 * 4\n```python\ndef f(x):\n    return  x * 2\n```\n")
    value = {"a": [1, 2, {"b": "café"}], "c": None}
    assert compact_json(json.dumps(value, indent=4)) == '{"a":[1,2,{"b":"café"}],"c":null}\n'
    assert compact_csv('name, age\n"Smith, John", 42\n\n"Ada",  36\n') == "name | age\nSmith, John | 42\nAda | 36\n"
    html = ("<html><head><title>T</title><style>p{color:red}</style></head><body><h1>Hello</h1>"
            "<p>First   para &amp; more.</p><script>var x = 1;</script><table><tr><td>a</td><td>b</td></tr>"
            "</table><ul><li>one</li><li>two</li></ul></body></html>")
    assert compact_html(html) == "Hello\nFirst para & more.\na | b\none\ntwo\n"


def test_a_file_is_compacted_by_type_with_tokens_before_and_after(tmp_path, smollm2_tokenizer):
    path = tmp_path / "data.json"
    path.write_text(json.dumps({"items": [{"id": i, "name": f"item {i}"} for i in range(20)]}, indent=4))
    result = compact_file(path, smollm2_tokenizer)
    assert json.loads(result.text) == json.loads(path.read_text())
    assert result.tokens_before == len(smollm2_tokenizer.encode(path.read_text(), add_special_tokens=False))
    assert result.tokens_after == len(smollm2_tokenizer.encode(result.text, add_special_tokens=False))
    assert result.saved > 0.3


def test_unknown_types_missing_files_and_bad_json_are_clear(tmp_path, smollm2_tokenizer):
    with pytest.raises(InputError, match=r"no converter for '.pdf' files; supported: .csv, .htm, .html, .json"):
        compact_file(tmp_path / "paper.pdf", smollm2_tokenizer)
    with pytest.raises(InputError, match="no such file"):
        compact_file(tmp_path / "missing.txt", smollm2_tokenizer)
    (tmp_path / "bad.json").write_text("{'single': 'quotes'}")
    with pytest.raises(InputError, match=r"bad.json: not valid JSON"):
        compact_file(tmp_path / "bad.json", smollm2_tokenizer)

"""Structured input: common files turned into compact text before they go into a prompt.

Files carry much that a model does not need to read: indentation and quotes in JSON, markup and
scripts in HTML, link targets and emphasis markers in Markdown, quoting and padding in CSV, runs
of blank lines everywhere. Each converter keeps the content and drops the rest; `compact_file`
picks one by file type and reports the tokens before and after.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from lmforge.errors import InputError
from lmforge.tokenizer import Tokenizer


def compact_whitespace(text: str) -> str:
    """Trailing spaces removed, runs of spaces and tabs made one space, at most one blank line in a row."""
    lines = [re.sub(r"[ \t]+", " ", line).strip() for line in text.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


FENCED_CODE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)


def compact_markdown(text: str) -> str:
    """Links keep their text, images their description; emphasis markers, HTML comments, table rules
    and horizontal rules go. Fenced code blocks are kept exactly (their spaces may be meaning)."""
    pieces, start = [], 0
    for code in FENCED_CODE.finditer(text):
        pieces.append(_compact_prose(text[start:code.start()]))
        pieces.append(code.group(0) + "\n")
        start = code.end()
    pieces.append(_compact_prose(text[start:]))
    return re.sub(r"\n{3,}", "\n\n", "".join(piece for piece in pieces if piece.strip())).strip() + "\n"


def _compact_prose(text: str) -> str:
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"!\[([^\]]*)\]\([^)]*\)", r"\1", text)  # ![alt](src) -> alt
    text = re.sub(r"\[([^\]]+)\]\([^)]*\)", r"\1", text)  # [text](url) -> text
    text = re.sub(r"(\*\*|__)(.+?)\1", r"\2", text)
    text = re.sub(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])", r"\1", text)
    rule = r"^[ \t]*\|?[ \t]*:?-+:?[ \t]*(\|[ \t]*:?-+:?[ \t]*)*\|?[ \t]*(\n|$)"  # |---|:-:| or ---
    text = re.sub(rule, "", text, flags=re.M)
    return compact_whitespace(text) if text.strip() else ""


def compact_json(text: str) -> str:
    """The same value with no indentation or spaces after separators (non-ASCII kept as is)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}).") from None
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")) + "\n"


def compact_csv(text: str) -> str:
    """Rows as values separated by " | " with no quotes or padding: a table a model reads as well."""
    rows = [[cell.strip() for cell in row] for row in csv.reader(io.StringIO(text)) if any(c.strip() for c in row)]
    return "".join(" | ".join(row) + "\n" for row in rows)


class _VisibleText(HTMLParser):
    """The text a browser shows: no scripts, styles or head; block elements start new lines."""

    HIDDEN = {"script", "style", "head", "template", "noscript", "svg"}
    BLOCKS = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "section", "article", "table",
              "ul", "ol", "pre", "blockquote", "header", "footer", "nav", "main", "hr"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.hidden = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.HIDDEN:
            self.hidden += 1
        elif tag in self.BLOCKS:
            self.parts.append("\n")
        elif tag in ("td", "th"):
            self.parts.append(" | ")

    def handle_endtag(self, tag):
        if tag in self.HIDDEN:
            self.hidden = max(0, self.hidden - 1)
        elif tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.hidden:
            self.parts.append(data)


def compact_html(text: str) -> str:
    """The page's visible text, one block per line."""
    parser = _VisibleText()
    parser.feed(text)
    parser.close()
    lines = [re.sub(r"\s+", " ", line).strip(" |") for line in "".join(parser.parts).split("\n")]
    return compact_whitespace("\n".join(line for line in lines if line))


CONVERTERS: dict[str, Callable[[str], str]] = {
    ".txt": compact_whitespace, ".text": compact_whitespace, ".md": compact_markdown, ".markdown": compact_markdown,
    ".json": compact_json, ".csv": compact_csv, ".html": compact_html, ".htm": compact_html,
}


@dataclass(frozen=True)
class CompactText:
    """A file's compact text and what it saved."""

    text: str
    tokens_before: int
    tokens_after: int

    @property
    def saved(self) -> float:
        """The share of tokens the conversion removed (0.25 = a quarter fewer)."""
        return 1 - self.tokens_after / self.tokens_before if self.tokens_before else 0.0


def compact_file(path: str | Path, tokenizer: Tokenizer) -> CompactText:
    """`path`'s content as compact text (converter chosen by extension), with token counts before and after."""
    text, compact = convert_file(path)
    return CompactText(compact, len(tokenizer.encode(text, add_special_tokens=False)),
                       len(tokenizer.encode(compact, add_special_tokens=False)))


def convert_file(path: str | Path) -> tuple[str, str]:
    """`path`'s text as read and as its converter (chosen by extension) compacts it."""
    path = Path(path)
    converter = CONVERTERS.get(path.suffix.lower())
    if converter is None:
        raise InputError(f"{path}: no converter for {path.suffix or 'files without an extension'!r} files; "
                         f"supported: {', '.join(sorted(CONVERTERS))}.")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: no such file.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read it as UTF-8 text ({exc}).") from exc
    try:
        compact = converter(text)
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from None
    return text, compact

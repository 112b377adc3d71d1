"""The spec examples of README.md and docs/: each parses and is already what `nestc fmt` writes,
so a reader who copies one copies canonical text. Every fenced block names its language; `nest`
blocks are checked, a block of fields alone as the body of a level."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from nestc.lang.diagnostics import NestError
from nestc.lang.formatter import INDENT, format_module
from nestc.lang.source import SourceFile
from nestc.lang.syntax import parse

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^( *)```(\S*)\s*$")


def fenced_blocks(path: Path):
    """(line of the opening fence, language, text) of each fenced block, its indentation removed."""
    lines = path.read_text(encoding="utf-8").split("\n")
    opening = None
    for number, line in enumerate(lines, start=1):
        found = FENCE.match(line)
        if found is None:
            continue
        if opening is None:
            opening = (number, found.group(1), found.group(2))
        else:
            start, indent, language = opening
            body = "\n".join(text[len(indent):] for text in lines[start:number - 1]) + "\n"
            yield start, language, body
            opening = None
    assert opening is None, f"{path}:{opening[0]}: a fenced block is never closed"


BLOCKS = [(path, line, language, body) for path in DOCUMENTS for line, language, body in fenced_blocks(path)]
EXAMPLES = [pytest.param(body, id=f"{path.relative_to(ROOT)}:{line}")
            for path, line, language, body in BLOCKS if language == "nest"]


def test_every_fenced_block_names_its_language():
    unnamed = [f"{path.relative_to(ROOT)}:{line}" for path, line, language, _ in BLOCKS if not language]
    assert not unnamed, f"fenced blocks without a language (nest, text, bash, python ...): {unnamed}"
    assert len(EXAMPLES) >= 15  # the language reference is mostly examples


def _canonical(text: str) -> str:
    try:
        return format_module(parse(SourceFile("example.nest", text)))
    except NestError:
        # fields alone: format them as the body of a level, then take the body back out
        wrapped = "level example : matrix {\n" + textwrap.indent(text, INDENT) + "}\n"
        formatted = format_module(parse(SourceFile("example.nest", wrapped)))
        return textwrap.dedent(formatted.split("\n", 1)[1].rsplit("}", 1)[0])


@pytest.mark.parametrize("text", EXAMPLES)
def test_spec_examples_are_what_fmt_writes(text):
    assert _canonical(text) == text

"""The spec zoo: every spec checks clean, and the formatter round-trips every one of them.

Warnings are not allowed either: the zoo is the reference for how specs should be written, so an
unused level there would be a mistake in the zoo.
"""

from __future__ import annotations

from collections import Counter

import pytest

from nestc.lang import ir
from nestc.lang.formatter import format_module
from nestc.lang.sema import analyze_file, analyze_source
from nestc.lang.source import SourceFile
from nestc.lang.syntax import parse
from nesttest import LIBRARY, REPO, ZOO, render

ALL = ZOO + LIBRARY
IDS = [p.relative_to(REPO / "specs").as_posix() for p in ALL]


def test_zoo_is_not_empty():
    assert len(ZOO) >= 15
    names = {p.name for p in ZOO}
    assert {"deltanet.nest", "hope.nest", "hope_space.nest", "deltanet_space.nest"} <= names


@pytest.mark.parametrize("path", ALL, ids=IDS)
def test_spec_checks_clean(path, at_repo_root):
    result = analyze_file(str(path.relative_to(REPO)))
    assert result.ok, render(result)
    assert result.diagnostics == [], render(result)
    assert len(result.program.levels) >= 1
    if path in ZOO:
        assert result.program.model is not None


def _comments(module):
    return Counter(c.text for c in module.comments)


@pytest.mark.parametrize("path", ALL, ids=IDS)
def test_formatter_round_trip(path, at_repo_root):
    relative = str(path.relative_to(REPO))
    source = SourceFile(relative, path.read_text(encoding="utf-8"))
    module = parse(source)
    formatted = format_module(module)

    again = parse(SourceFile(relative, formatted))
    assert again.items == module.items
    assert _comments(again) == _comments(module), "the formatter lost or changed a comment"
    assert format_module(again) == formatted, "formatting is not idempotent"

    # the formatted text compiles to the same program (same relative name, so imports resolve)
    before = analyze_source(source)
    after = analyze_source(SourceFile(relative, formatted))
    assert after.ok, render(after)
    assert ir.dump(after.program) == ir.dump(before.program)
    assert ir.variant_id(after.program) == ir.variant_id(before.program)


@pytest.mark.parametrize("path", ZOO, ids=[p.name for p in ZOO])
def test_formatted_zoo_has_canonical_shape(path):
    formatted = format_module(parse(SourceFile(path.name, path.read_text(encoding="utf-8"))))
    assert formatted.endswith("\n") and not formatted.endswith("\n\n")
    assert "\t" not in formatted
    assert "\n\n\n" not in formatted  # at most one blank line anywhere
    for line in formatted.splitlines():
        assert line == line.rstrip(), f"trailing whitespace: {line!r}"
        indent = len(line) - len(line.lstrip(" "))
        assert indent % 4 == 0, f"indent not a multiple of four: {line!r}"


def test_variant_id_ignores_file_name_and_formatting(at_repo_root):
    path = "specs/deltanet.nest"
    text = (REPO / path).read_text(encoding="utf-8")
    first = analyze_source(SourceFile(path, text)).program
    squeezed = analyze_source(SourceFile(path, format_module(parse(SourceFile(path, text))))).program
    assert ir.variant_id(first) == ir.variant_id(squeezed)
    assert len(ir.variant_id(first)) == 12
    # and a change of meaning changes it
    changed = analyze_source(SourceFile(path, text.replace("steps 600", "steps 601"))).program
    assert ir.variant_id(changed) != ir.variant_id(first)

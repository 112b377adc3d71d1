"""Syntax errors: the code, line and column of each, derived by hand from the text.

Columns are 1-based; the comment above each case spells out the counting. Every case must raise
exactly one diagnostic, never a lark exception.
"""

from __future__ import annotations

import pytest

from nestc.lang.diagnostics import NestError, render_all
from nestc.lang.sema import analyze_source
from nestc.lang.source import SourceFile
from nestc.lang.syntax import parse
from nesttest import caret

CASES = [
    # --- generic ---------------------------------------------------------------------------------
    # "    vocab 16 16": 4 spaces, vocab 5-9, 16 at 11-12, the second 16 at 14
    pytest.param("model {\n    vocab 16 16\n}\n", "N0001", 2, 14, id="N0001-two-values"),
    # "const a = 3 @ 4": `@` is the 13th character
    pytest.param("const a = 3 @ 4\n", "N0001", 1, 13, id="N0001-bad-character"),
    # "const = 3": `=` at 7 where the constant's name belongs
    pytest.param("level m : matrix\nconst = 3\n", "N0001", 2, 7, id="N0001-missing-name"),
    # "const a =" is 9 characters: the end of input is column 10
    pytest.param("const a =", "N0002", 1, 10, id="N0002-eof-after-equals"),
    # "const a = f(1,": the file ends inside the call, reported at its `(` (the 12th character)
    pytest.param("const a = f(1,\n", "N0014", 1, 12, id="N0014-eof-in-call"),
    # --- tailored --------------------------------------------------------------------------------
    # 'import "lib/x.nest': the quote is the 8th character
    pytest.param('import "lib/x.nest\n', "N0003", 1, 8, id="N0003-import"),
    # '    name "abc': name 5-8, the quote at 10
    pytest.param('model {\n    name "abc\n}\n', "N0003", 2, 10, id="N0003-field"),
    # "    key = x -> proj": key 5-7, = 9, x 11, `->` at 13-14
    pytest.param("level m : matrix {\n    key = x -> proj\n}\n", "N0004", 2, 13, id="N0004-arrow"),
    # "    key = x >> proj": `>>` at 13
    pytest.param("level m : matrix {\n    key = x >> proj\n}\n", "N0004", 2, 13, id="N0004-shift"),
    # "    key = x | proj": `|` at 13
    pytest.param("level m : matrix {\n    key = x | proj\n}\n", "N0004", 2, 13, id="N0004-bar"),
    # "level m : mlp(depth: 2)": mlp 11-13, ( 14, depth 15-19, `:` at 20
    pytest.param("level m : mlp(depth: 2)\n", "N0005", 1, 20, id="N0005-argument"),
    # "    dim: 128": dim 5-7, `:` at 8
    pytest.param("model {\n    dim: 128\n}\n", "N0005", 2, 8, id="N0005-field"),
    # "level mem {": mem 7-9, `{` at 11
    pytest.param("level mem {\n    every 16\n}\n", "N0006", 1, 11, id="N0006"),
    # "    dim 128 // width": 128 at 9-11, `//` at 13
    pytest.param("model {\n    dim 128 // width\n}\n", "N0007", 2, 13, id="N0007-after-value"),
    # "    // width" on a line of its own inside a body: `//` at 5
    pytest.param("model {\n    // width\n    dim 128\n}\n", "N0007", 2, 5, id="N0007-own-line"),
    # "// a comment" as the first line of the file: `//` at 1
    pytest.param("// a comment\nconst a = 1\n", "N0007", 1, 1, id="N0007-first-line"),
    pytest.param("let x = 3\n", "N0008", 1, 1, id="N0008-let"),
    pytest.param("layer foo : matrix\n", "N0008", 1, 1, id="N0008-layer"),
    pytest.param('include "lib.nest"\n', "N0008", 1, 1, id="N0008-include"),
    pytest.param("levle m : matrix\n", "N0008", 1, 1, id="N0008-typo-level"),
    pytest.param('improt "lib.nest"\n', "N0008", 1, 1, id="N0008-typo-import"),
    # "level b extnds a": `extnds` at 9
    pytest.param("level a : matrix\nlevel b extnds a\n", "N0008", 2, 9, id="N0008-typo-extends"),
    # "import lib/titans.nest": the path starts at 8
    pytest.param("import lib/titans.nest\n", "N0009", 1, 8, id="N0009"),
    # "model { vocab 256, dim 128 }": vocab 9-13, 256 15-17, `,` at 18
    pytest.param("model { vocab 256, dim 128 }\n", "N0010", 1, 18, id="N0010-comma"),
    # "    vocab 256 dim 128": 256 at 11-13, `dim` (the run-on field) at 15
    pytest.param("model {\n    vocab 256 dim 128\n}\n", "N0010", 2, 15, id="N0010-run-on"),
    # "    block == x": block 5-9, `=` 11, the second `=` at 12
    pytest.param("model {\n    block == x\n}\n", "N0011", 2, 12, id="N0011-double-equals"),
    # "level a := matrix": `:` 9, `=` at 10
    pytest.param("level a := matrix\n", "N0011", 1, 10, id="N0011-colon-equals"),
    # the file ends inside the body: reported at its `{`, the 7th character of "model {"
    pytest.param("model {\n    vocab 256\n", "N0012", 1, 7, id="N0012"),
    # a `}` missing mid-file: the parser stops at the `:` of line 3; reported at line 1's `{` (col 18)
    pytest.param("level m : matrix {\n    every 1\nlevel n : matrix\nmodel {\n    dim 8\n}\n", "N0012", 1, 18,
                 id="N0012-mid-file"),
    pytest.param("const a = 1\n}\n", "N0013", 2, 1, id="N0013"),
    # a call left open: reported at its `(`, "    key = x |> conv(" has it at 20
    pytest.param("level m : matrix {\n    key = x |> conv(4\n    every 1\n}\n", "N0014", 2, 20, id="N0014"),
    # a list left open: "    block = [" has the `[` at 13
    pytest.param("model {\n    block = [mixer, ffn\n    dim 8\n}\n", "N0014", 2, 13, id="N0014-list"),
    # "model { dim = }": dim 9-11, = 13, `}` at 15 where the value belongs
    pytest.param("model { dim = }\n", "N0015", 1, 15, id="N0015"),
]


@pytest.mark.parametrize("text, code, line, column", CASES)
def test_syntax_error_position(text, code, line, column):
    source = SourceFile("t.nest", text)
    with pytest.raises(NestError) as raised:
        parse(source)
    diagnostics = raised.value.diagnostics
    assert len(diagnostics) == 1
    found = diagnostics[0]
    assert (found.code, found.span.line, found.span.column) == (code, line, column), found
    assert found.span.file == "t.nest"
    assert found.is_error


@pytest.mark.parametrize("text, code, line, column", CASES)
def test_syntax_error_through_sema_and_caret(text, code, line, column):
    """analyze_source reports the same single diagnostic; the caret sits under the column."""
    result = analyze_source(SourceFile("t.nest", text))
    assert not result.ok and result.program is None
    assert [d.code for d in result.diagnostics] == [code]
    rendered = render_all(result.diagnostics, result.sources)
    assert rendered.startswith(f"error[{code}]")
    assert f"--> t.nest:{line}:{column}" in rendered
    assert caret(rendered, line)[0] == column


def test_unclosed_body_points_at_its_opening_and_where_the_parser_noticed():
    """A `}` missing in the middle of a file: the parser stops ten lines later, at the first line
    that is no field; the error stands at the `{` and names that place too."""
    fields = "".join(f"    f{i} = x |> proj\n" for i in range(8))
    text = "level mixer : matrix {\n" + fields + "\nlevel ff : mlp(expansion=4) {\n    every 0\n}\n"
    with pytest.raises(NestError) as raised:
        parse(SourceFile("t.nest", text))
    (found,) = raised.value.diagnostics
    assert (found.code, found.span.line, found.span.column) == ("N0012", 1, 22)
    (noticed,) = found.secondary
    # "level ff : mlp(...)" is line 11; its `:` (column 10) is where a field's value was expected
    assert (noticed.span.line, noticed.span.column) == (11, 10) and "unexpected `:`" in noticed.message
    assert "before line 11" in found.help
    rendered = render_all([found], analyze_source(SourceFile("t.nest", text)).sources)
    assert "--> t.nest:1:22" in rendered and "11 | level ff" in rendered


def test_unclosed_is_only_said_when_closing_repairs_the_file():
    """A body written without indentation whose field is broken: closing the body at the dedented
    line would not get the parser further, so the field's own error stands."""
    with pytest.raises(NestError) as raised:
        parse(SourceFile("t.nest", "model {\ndim: 128\n}\n"))
    assert raised.value.diagnostics[0].code == "N0005"


def test_keyword_typo_suggests_the_keyword():
    with pytest.raises(NestError) as raised:
        parse(SourceFile("t.nest", "levle mixer : matrix {\n    every 1\n}\n"))
    found = raised.value.diagnostics[0]
    assert "did you mean `level`?" == found.label and (found.span.column, found.span.end_column) == (1, 6)


def test_misplaced_keyword_suggests_the_real_one():
    with pytest.raises(NestError) as raised:
        parse(SourceFile("t.nest", "let x = 3\n"))
    found = raised.value.diagnostics[0]
    assert "`const`" in found.label
    assert (found.span.column, found.span.end_column) == (1, 4)  # exactly `let`


def test_syntax_errors_are_never_lark_exceptions():
    """A broken file of each shape raises NestError, nothing else (lark never escapes)."""
    for text in ("{", "}", "(", ")", "[", "]", "=", ":", ",", "|>", '"', "#", ";", "level", "level a",
                 "level a :", "level a extends", "import", "const", "block b =", "model {", "model { dim",
                 "x |> y", "level a : matrix { key = x |> }", "model { block = [1, }", "\t\f\\\n"):
        try:
            parse(SourceFile("t.nest", text))
        except NestError as error:
            assert error.diagnostics and error.diagnostics[0].span is not None


@pytest.mark.parametrize("block", [
    "residual(" * 300 + "mixer" + ")" * 300,           # calls inside calls
    " |> ".join(["rmsnorm"] * 600 + ["mixer"]),         # a chain of operators
])
def test_nesting_past_the_limit_is_a_diagnostic_not_a_recursion_error(block):
    """Both once raised RecursionError (an internal error); just inside the limit still compiles."""
    from nestc.lang import syntax

    text = "level mixer : matrix\nmodel {\n    vocab 256\n    dim 8\n    block = " + block + "\n}\n"
    result = analyze_source(SourceFile("deep.nest", text))
    (diagnostic,) = result.diagnostics
    assert diagnostic.code == "N0016" and f"more than {syntax.MAX_DEPTH} levels" in diagnostic.message
    assert diagnostic.span.line == 5 and diagnostic.span.column > 12  # inside the block, where it gets too deep
    inside = "level mixer : matrix\nmodel {\n    vocab 256\n    dim 8\n    block = " + \
        "residual(" * 96 + "mixer" + ")" * 96 + "\n}\n"
    assert analyze_source(SourceFile("inside.nest", inside)).ok

"""Source files, spans and the rendering of snippets."""

from __future__ import annotations

from nestc.lang.diagnostics import Diagnostic, Label, render, to_json
from nestc.lang.sema import analyze_source
from nestc.lang.source import SourceFile, SourceMap, Span
from nesttest import caret


def test_span_text_and_join():
    a = Span("f.nest", 2, 5, 2, 9)
    b = Span("f.nest", 3, 1, 3, 4)
    assert str(a) == "f.nest:2:5"
    assert a.to(b) == Span("f.nest", 2, 5, 3, 4)


def test_end_span():
    assert SourceFile("f", "").end_span() == Span("f", 1, 1, 1, 1)
    assert SourceFile("f", "ab\ncde\n").end_span() == Span("f", 2, 4, 2, 4)


def test_snippet_and_labels():
    source = SourceFile("f.nest", "const A = 1\nconst B = A + oops\n")
    sources = SourceMap()
    sources.add(source)
    diagnostic = Diagnostic(code="N0101", message="unknown name `oops`", span=Span("f.nest", 2, 15, 2, 19),
                            label="not defined", help="did you mean `A`?",
                            secondary=(Label(span=Span("f.nest", 1, 7, 1, 8), message="A is here"),))
    text = render(diagnostic, sources)
    assert text.splitlines()[0] == "error[N0101]: unknown name `oops`"
    assert " --> f.nest:2:15" in text
    assert caret(text, 2) == (15, 4)
    assert "  |       - A is here" in text
    assert text.endswith("= help: did you mean `A`?")
    assert to_json([diagnostic]).count('"code": "N0101"') == 1


def test_form_feed_does_not_shift_the_snippet_lines():
    """A form feed is whitespace to the lexer (and lark counts lines by \\n only), but
    SourceFile.lines used str.splitlines(), which also breaks at \\f: the snippet then showed
    the wrong line and the message named `?` instead of the offending character."""
    result = analyze_source(SourceFile("t.nest", "const a = 1\f\nconst b = 2 @\n"))
    (diagnostic,) = result.diagnostics
    assert (diagnostic.code, diagnostic.span.line, diagnostic.span.column) == ("N0001", 2, 13)
    assert diagnostic.message == "unexpected character `@`"
    assert SourceFile("t.nest", "const a = 1\f\nconst b = 2 @\n").line(2) == "const b = 2 @"


def test_crlf_files_work():
    text = "level mixer : matrix {\r\n    every 1\r\n}\r\nmodel {\r\n    vocab 256\r\n    dim 128\r\n    block = mixr\r\n}\r\n"
    result = analyze_source(SourceFile("t.nest", text))
    (diagnostic,) = result.diagnostics
    assert (diagnostic.code, diagnostic.span.line, diagnostic.span.column) == ("N0101", 7, 13)

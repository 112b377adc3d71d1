"""One spec, several semantic mistakes on different lines: every one is reported, in source
order, with the right code, and the rendered caret starts at the right column with the right width.
"""

from __future__ import annotations

from nesttest import analyze, caret, render

# Columns, by hand:
#   line 2 "    key = x |> proj |> sigmod"        sigmod at 24-29 (key 5-7, = 9, x 11, |> 13, proj 16-19, |> 21)
#   line 3 "    evry 16"                          evry at 5-8
#   line 8 "    heads 0"                          0 at 11
#   line 9 "    block = residual(rmsnorm |> mixr)" mixr at 33-36 (block 5-9, = 11, residual 13-20, ( 21,
#                                                  rmsnorm 22-28, |> 30-31)
SPEC = """\
level mixer : matrix {
    key = x |> proj |> sigmod
    evry 16
}
model {
    vocab 256
    dim 128
    heads 0
    block = residual(rmsnorm |> mixr)
}
"""

EXPECTED = [
    # code, line, column, caret length, a word of the help
    ("N0101", 2, 24, 6, "`sigmoid`"),
    ("N0103", 3, 5, 4, "`every`"),
    ("N0106", 8, 11, 1, None),
    ("N0101", 9, 33, 4, "`mixer`"),
]


def test_all_mistakes_are_reported_in_order():
    result = analyze(SPEC)
    assert not result.ok
    found = [(d.code, d.span.line, d.span.column) for d in result.diagnostics]
    assert found == [(code, line, column) for code, line, column, _, _ in EXPECTED]


def test_each_caret_is_under_its_mistake():
    result = analyze(SPEC)
    for diagnostic, (code, line, column, length, _) in zip(result.diagnostics, EXPECTED):
        one = render(type(result)(None, [diagnostic], result.sources))
        assert one.startswith(f"error[{code}]")
        assert caret(one, line) == (column, length), one
        # the snippet shows the right source line
        assert SPEC.splitlines()[line - 1] in one


def test_help_lines_suggest_the_intended_names():
    result = analyze(SPEC)
    for diagnostic, (_, _, _, _, word) in zip(result.diagnostics, EXPECTED):
        if word is not None:
            assert diagnostic.help is not None and word in diagnostic.help, diagnostic


def test_summary_counts_every_error():
    rendered = render(analyze(SPEC))
    assert rendered.endswith("error: could not compile: 4 errors")
    assert rendered.count("error[") == 4


def test_errors_in_three_sections_at_once():
    """Mistakes in a level, the model and train are all found in one run."""
    text = """\
level mixer : mlp(depth=0) {
    every 1
}
model {
    vocab 1
    dim 128
    block = mixer
}
train {
    batch 0
}
"""
    # depth=0: `0` at column 25 ("level mixer : mlp(" is 18 characters, depth 19-23, = 24)
    # vocab 1: `1` at column 11; batch 0: `0` at column 11
    result = analyze(text)
    assert [(d.code, d.span.line, d.span.column) for d in result.diagnostics] == [
        ("N0106", 1, 25), ("N0106", 5, 11), ("N0106", 10, 11)]
    rendered = render(result)
    assert caret(rendered, 1) == (25, 1)
    assert caret(rendered, 5) == (11, 1)
    assert caret(rendered, 10) == (11, 1)

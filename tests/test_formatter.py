"""Targeted formatter tests: canonical layout, comments, and the cases where formatting must not
change what a spec says."""

from __future__ import annotations

import re

from nestc.lang import ast
from nestc.lang.formatter import format_module
from nestc.lang.sema import analyze_source
from nestc.lang.source import SourceFile
from nestc.lang.syntax import parse
from nesttest import codes


def fmt(text: str) -> str:
    return format_module(parse(SourceFile("t.nest", text)))


def test_canonical_layout():
    text = "level mixer:matrix{key=x|>proj|>silu;objective l2\nevery 1}\nmodel{vocab 256;dim 128;block=mixer}\n"
    assert fmt(text) == (
        "level mixer : matrix {\n"
        "    key = x |> proj |> silu\n"
        "    objective l2\n"
        "    every 1\n"
        "}\n"
        "\n"
        "model {\n"
        "    vocab 256\n"
        "    dim 128\n"
        "    block = mixer\n"
        "}\n"
    )


def test_single_line_items_stay_together_and_bodies_get_a_blank_line():
    text = 'import "a.nest"\nconst A = 1\nconst B = 2\nlevel l : matrix\nmodel { dim 1 }\nconst C = 3\n'
    assert fmt(text) == 'import "a.nest"\nconst A = 1\nconst B = 2\nlevel l : matrix\n\nmodel {\n    dim 1\n}\n\nconst C = 3\n'


def test_at_most_one_blank_line():
    assert fmt("const A = 1\n\n\n\nconst B = 2\n") == "const A = 1\n\nconst B = 2\n"


def test_parentheses_only_where_needed():
    assert fmt("const A = ((1 + 2)) * (3) - (4 - 5) - -x\n") == "const A = (1 + 2) * 3 - (4 - 5) - -x\n"
    assert fmt("const A = (a |> b) |> (c |> d)\n") == "const A = a |> b |> (c |> d)\n"


def test_long_pipelines_break_before_each_stage():
    stages = " |> ".join(f"stage_number_{i}" for i in range(8))
    out = fmt(f"model {{\n    block = {stages}\n}}\n")
    lines = out.splitlines()
    assert lines[1] == "    block = stage_number_0"
    assert lines[2] == "        |> stage_number_1"
    assert all(len(line) <= 100 for line in lines)
    assert fmt(out) == out


def test_strings_are_escaped():
    assert fmt('import "a\\\\b\\"c.nest"\n') == 'import "a\\\\b\\"c.nest"\n'


def test_comments_stay_where_they_were():
    text = "# head\nmodel {  # opens\n    # about dim\n    dim 1  # one\n}  # closes\n# tail\n"
    out = fmt(text)
    # (end-of-line comments may be aligned into a column: compare with the padding squeezed)
    assert [re.sub(r" +#", " #", line) for line in out.splitlines()] == \
        [re.sub(r" +#", " #", line) for line in text.splitlines()]
    assert fmt(out) == out
    assert [c.text for c in parse(SourceFile("t.nest", out)).comments] == [
        "# head", "# opens", "# about dim", "# one", "# closes", "# tail"]


def test_comment_inside_a_multi_line_expression_moves_above_its_field():
    text = "level m : matrix {\n    key = x\n        |> proj  # inside\n        |> silu\n}\n"
    out = fmt(text)
    assert out == "level m : matrix {\n    # inside\n    key = x |> proj |> silu\n}\n"


def test_hash_inside_a_string_is_not_a_comment():
    module = parse(SourceFile("t.nest", 'const S = "a # b"  # real\n'))
    assert [c.text for c in module.comments] == ["# real"]
    assert format_module(module) == 'const S = "a # b"  # real\n'


# --- formatting must not change what a spec says --------------------------------------------------

def test_fmt_keeps_a_unit_it_cannot_place():
    """`key x |> proj tokens` is wrong (N0125: only `every` takes a unit), but fmt rewrote it to
    `key = x |> proj`, silently deleting `tokens` and with it the error."""
    text = "level m : matrix {\n    key x |> proj tokens\n}\n"
    out = fmt(text)
    assert "tokens" in out
    assert codes(analyze_source(SourceFile("t.nest", out + "model {\n    vocab 2\n    dim 4\n    block = m\n}\n"))) \
        == ["N0125"]


def test_fmt_result_parses_to_the_same_ast_for_normalised_fields():
    """formatter.py promises "the result parses to the same AST"; `dim = 128` is written `dim 128`
    and `key x |> proj` is written `key = x |> proj`, which differ in `Field.assign`."""
    for text in ("model {\n    dim = 128\n}\n", "level m : matrix {\n    key x |> proj\n}\n"):
        module = parse(SourceFile("t.nest", text))
        assert parse(SourceFile("t.nest", format_module(module))).items == module.items, text


def test_format_module_accepts_an_ast_without_spans():
    """Spans are optional in the AST (they default to None), so a program-built AST must format."""
    module = ast.Module(file="t.nest", items=(
        ast.ConstDef(name="D", value=ast.Number(value=64, text="64")),
        ast.Section(name="model", fields=(ast.Field(key="dim", value=ast.Name(id="D")),)),
    ))
    assert format_module(module) == "const D = 64\n\nmodel {\n    dim D\n}\n"


def test_string_with_a_unicode_line_separator_is_not_split_into_a_comment():
    """str.splitlines() breaks at U+2028, \\r, \\f ...; the lexer does not. A `#` after such a
    character inside a string became a phantom comment, which fmt then printed as a new line."""
    text = 'const S = "a\u2028# b"\n'
    module = parse(SourceFile("t.nest", text))
    assert module.comments == ()
    assert format_module(module) == text


def test_updates_written_with_optimizer_levels_are_dataflow():
    """A level's `update` and the train section's `update` and `matrix_update` are expressions of
    the gradient stream, written `key = expr` as gates are (a setting form would read as a rule)."""
    text = ("level m:moment{value=-grad;retain=0.9}\nlevel mixer:matrix{optimizer dgd;update=m}\n"
            "train{optimizer gd(lr=1e-3);update=-lr*m;matrix_update=-lr*newton_schulz(m)}\n")
    formatted = fmt(text)
    assert "    update = m\n" in formatted and "    update = -lr * m\n" in formatted
    assert "    matrix_update = -lr * newton_schulz(m)\n" in formatted
    assert "    value = -grad\n" in formatted
    assert fmt(formatted) == formatted

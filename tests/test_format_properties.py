"""Property tests for the formatter: random ASTs print to text that parses back to the same AST,
and formatting is idempotent. Then comments sprinkled over formatted text survive formatting.

The formatter places comments and blank lines by the spans of items and fields, so generated
items and fields get synthetic spans (one line each); spans take no part in AST equality.
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from nestc.lang import ast, schema
from nestc.lang.formatter import format_module
from nestc.lang.source import SourceFile, Span
from nestc.lang.syntax import parse

FILE = "prop.nest"
KEYWORDS = ("import", "const", "level", "block")  # cannot name a section (they start items)
ASSIGNED = ("source", "gate", "block")  # field types the formatter writes as `key = value`

identifiers = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,6}", fullmatch=True)
names = st.one_of(identifiers, st.sampled_from(["x", "self", "true", "tokens", "extends", *KEYWORDS]))

number_texts = st.from_regex(r"(\d{1,3}\.\d{0,2}|\.\d{1,2}|\d{1,4})([eE][+-]?\d{1,2})?", fullmatch=True)


def _number_value(text: str):
    return float(text) if any(c in text for c in ".eE") else int(text)


@st.composite
def numbers(draw):
    text = draw(number_texts)
    value = _number_value(text)
    if draw(st.booleans()):
        return ast.Number(value=value, text=text)
    return ast.Number(value=-value, text="-" + text)  # what the parser makes of `-3`


strings = st.text(alphabet=list('ab #"\\\n\t{}()|>,=;é'), max_size=8).map(lambda s: ast.String(value=s))
leaves = st.one_of(numbers(), strings, names.map(lambda n: ast.Name(id=n)))


def _extend(children):
    args = st.lists(st.tuples(st.none() | names, children), max_size=3).map(
        lambda pairs: tuple(ast.Arg(name=n, value=v) for n, v in pairs))
    return st.one_of(
        st.builds(lambda f, a: ast.Call(func=f, args=a), names, args),
        st.lists(children, max_size=3).map(lambda items: ast.ListExpr(items=tuple(items))),
        # the parser flattens `(a |> b) |> c`, so a pipe never starts with a pipe
        st.builds(lambda first, rest: ast.Pipe(stages=(first, *rest)),
                  children.filter(lambda e: not isinstance(e, ast.Pipe)), st.lists(children, min_size=1, max_size=3)),
        st.builds(lambda op, left, right: ast.BinOp(op=op, left=left, right=right),
                  st.sampled_from("+-*/"), children, children),
        # `-3` is a number, not a negation: the parser folds it
        children.filter(lambda e: not isinstance(e, ast.Number)).map(lambda e: ast.Neg(operand=e)),
    )


expressions = st.recursive(leaves, _extend, max_leaves=10)


@st.composite
def fields(draw, table: dict):
    key = draw(st.one_of(names, st.sampled_from(sorted(table) or ["dim"])))
    if draw(st.integers(0, 5)) == 0:
        return ast.Field(key=key, value=None)  # a flag
    value = draw(expressions)
    param = table.get(key)
    assign = param.type in ASSIGNED if param is not None else draw(st.booleans())
    unit = None if assign else draw(st.none() | names)
    return ast.Field(key=key, value=value, unit=unit, assign=assign)


@st.composite
def items(draw):
    kind = draw(st.sampled_from(["import", "const", "block", "level", "extends", "section"]))
    if kind == "import":
        return ast.Import(path=draw(strings).value)
    if kind == "const":
        return ast.ConstDef(name=draw(names), value=draw(expressions))
    if kind == "block":
        return ast.BlockDef(name=draw(names), value=draw(expressions))
    if kind == "section":
        name = draw(st.one_of(st.sampled_from(["model", "train"]), names.filter(lambda n: n not in KEYWORDS)))
        table = schema.SECTIONS.get(name, {})
        return ast.Section(name=name, fields=tuple(draw(st.lists(fields(table), max_size=4))))
    has_body = draw(st.booleans())
    body = tuple(draw(st.lists(fields(schema.LEVEL_FIELDS), max_size=4))) if has_body else ()
    if kind == "level":
        return ast.LevelDef(name=draw(names), state=draw(expressions), base=None, fields=body, has_body=has_body)
    return ast.LevelDef(name=draw(names), state=None, base=draw(names), fields=body, has_body=has_body)


modules = st.lists(items(), max_size=5).map(lambda xs: ast.Module(file=FILE, items=tuple(xs)))


def with_spans(module: ast.Module) -> ast.Module:
    """Give items and fields one line each (the formatter reads their line numbers)."""
    def span(line: int, end: int | None = None) -> Span:
        return Span(FILE, line, 1, end or line, 2)

    out, line = [], 1
    for item in module.items:
        changes = {}
        if isinstance(item, (ast.LevelDef, ast.Section)) and item.fields:
            changes["fields"] = tuple(dataclasses.replace(f, span=span(line + 1 + i)) for i, f in enumerate(item.fields))
            end = line + len(item.fields) + 1
        else:
            end = line
        if isinstance(item, ast.LevelDef) and item.state is not None:
            changes["state"] = dataclasses.replace(item.state, span=span(line))
        out.append(dataclasses.replace(item, span=span(line, end), **changes))
        line = end + 2
    return ast.Module(file=module.file, items=tuple(out))


def reparse(text: str) -> ast.Module:
    return parse(SourceFile(FILE, text))


@settings(max_examples=150, deadline=None)
@given(modules)
def test_format_then_parse_gives_the_same_ast(module):
    text = format_module(with_spans(module))
    again = reparse(text)
    assert again.items == module.items, text
    assert again.comments == ()


@settings(max_examples=150, deadline=None)
@given(modules)
def test_format_is_idempotent(module):
    text = format_module(with_spans(module))
    assert format_module(reparse(text)) == text


@settings(max_examples=100, deadline=None)
@given(modules, st.randoms(use_true_random=False))
def test_comments_survive_formatting(module, rng: random.Random):
    """Comments at line ends and on lines of their own are kept, the AST is unchanged, and
    formatting the result again changes nothing."""
    lines = format_module(with_spans(module)).split("\n")
    commented, number = [], 0
    for line in lines:
        if rng.random() < 0.3:
            number += 1
            commented.append(f"# own {number}")
        if line.strip() and rng.random() < 0.3:
            number += 1
            line += f"  # end {number}"
        commented.append(line)
    text = "\n".join(commented)
    original = reparse(text)
    assert original.items == module.items
    assert len(original.comments) == number

    formatted = format_module(original)
    again = reparse(formatted)
    assert again.items == module.items, formatted
    assert Counter(c.text for c in again.comments) == Counter(c.text for c in original.comments), formatted
    assert format_module(again) == formatted

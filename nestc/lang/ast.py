"""The abstract syntax tree: what the user wrote, frozen, each node with its source span.

Spans are excluded from equality, so two parses of differently formatted but equivalent text
compare equal (the formatter's round-trip tests rely on this).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from nestc.lang.source import Span

def _span_field():
    """A span attribute: defaults to None and takes no part in equality or repr."""
    return field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class Number:
    value: int | float
    text: str
    span: Span | None = _span_field()


@dataclass(frozen=True, slots=True, kw_only=True)
class String:
    value: str
    span: Span | None = _span_field()


@dataclass(frozen=True, slots=True, kw_only=True)
class Name:
    id: str
    span: Span | None = _span_field()


@dataclass(frozen=True, slots=True, kw_only=True)
class Arg:
    """A call argument: positional when `name` is None, else `name=value`."""

    name: str | None
    value: "Expr"
    name_span: Span | None = _span_field()
    span: Span | None = _span_field()


@dataclass(frozen=True, slots=True, kw_only=True)
class Call:
    func: str
    args: tuple[Arg, ...]
    func_span: Span | None = _span_field()
    span: Span | None = _span_field()

    def positional(self) -> tuple["Expr", ...]:
        return tuple(a.value for a in self.args if a.name is None)

    def keyword(self, name: str) -> "Expr | None":
        return next((a.value for a in self.args if a.name == name), None)


@dataclass(frozen=True, slots=True, kw_only=True)
class ListExpr:
    items: tuple["Expr", ...]
    span: Span | None = _span_field()


@dataclass(frozen=True, slots=True, kw_only=True)
class Pipe:
    """`a |> b |> c`: stages applied left to right."""

    stages: tuple["Expr", ...]
    span: Span | None = _span_field()


@dataclass(frozen=True, slots=True, kw_only=True)
class BinOp:
    op: str  # one of + - * /
    left: "Expr"
    right: "Expr"
    span: Span | None = _span_field()


@dataclass(frozen=True, slots=True, kw_only=True)
class Neg:
    operand: "Expr"
    span: Span | None = _span_field()


Expr = Union[Number, String, Name, Call, ListExpr, Pipe, BinOp, Neg]


@dataclass(frozen=True, slots=True, kw_only=True)
class Field:
    """One line of a body: `key = expr` (assign), `key expr [unit]` (setting), `key` (flag) or
    `let key = expr` (a binding: a level's named value, `binding` set)."""

    key: str
    value: Expr | None
    unit: str | None = None
    assign: bool = field(default=False, compare=False)  # `key = v` and `key v` mean the same
    binding: bool = False
    key_span: Span | None = _span_field()
    unit_span: Span | None = _span_field()
    span: Span | None = _span_field()


@dataclass(frozen=True, slots=True, kw_only=True)
class Import:
    path: str
    path_span: Span | None = _span_field()
    span: Span | None = _span_field()


@dataclass(frozen=True, slots=True, kw_only=True)
class ConstDef:
    name: str
    value: Expr
    name_span: Span | None = _span_field()
    span: Span | None = _span_field()


@dataclass(frozen=True, slots=True, kw_only=True)
class LevelDef:
    """`level NAME : STATE { fields }` or `level NAME extends BASE { overrides }`."""

    name: str
    state: Expr | None
    base: str | None
    fields: tuple[Field, ...]
    has_body: bool = True
    name_span: Span | None = _span_field()
    base_span: Span | None = _span_field()
    span: Span | None = _span_field()


@dataclass(frozen=True, slots=True, kw_only=True)
class BlockDef:
    name: str
    value: Expr
    name_span: Span | None = _span_field()
    span: Span | None = _span_field()


@dataclass(frozen=True, slots=True, kw_only=True)
class Section:
    """A top-level `NAME { fields }`: `model` or `train`."""

    name: str
    fields: tuple[Field, ...]
    name_span: Span | None = _span_field()
    span: Span | None = _span_field()


Item = Union[Import, ConstDef, LevelDef, BlockDef, Section]


@dataclass(frozen=True, slots=True, kw_only=True)
class Comment:
    text: str
    line: int
    column: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Module:
    """One parsed file. Comments are kept aside (with positions) for the formatter."""

    file: str
    items: tuple[Item, ...]
    comments: tuple[Comment, ...] = field(default=(), compare=False, repr=False)


def walk(expr: Expr):
    """Yield `expr` and every expression nested inside it, depth first."""
    yield expr
    if isinstance(expr, Call):
        for arg in expr.args:
            yield from walk(arg.value)
    elif isinstance(expr, (ListExpr, Pipe)):
        for item in expr.items if isinstance(expr, ListExpr) else expr.stages:
            yield from walk(item)
    elif isinstance(expr, BinOp):
        yield from walk(expr.left)
        yield from walk(expr.right)
    elif isinstance(expr, Neg):
        yield from walk(expr.operand)

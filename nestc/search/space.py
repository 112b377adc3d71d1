"""Search spaces: the `choice`, `range` and `loguniform` values of a spec, enumerated and frozen.

Every search call in the spec file is a dimension, labelled by where it stands (`level mk /
optimizer`) or by its explicit `name=`, which ties all calls with that name to one value. A call
inside an option of another choice is a conditional dimension: it exists only when that option
is chosen. Freezing replaces each call by its chosen option *in the source text*, so a frozen
variant keeps its comments and layout and is checked again like any spec. Torch-free.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field
from typing import Iterator

from nestc.lang import ast, schema
from nestc.lang.diagnostics import Diagnostic, NestError
from nestc.lang.formatter import format_expr
from nestc.lang.source import SourceFile, Span


@dataclass
class Dimension:
    label: str
    kind: str  # choice | range | loguniform
    options: tuple  # choice: option expressions; range: the numbers; loguniform: (low, high)
    sites: list[ast.Call] = field(default_factory=list)
    condition: tuple[str, int] | None = None  # (parent label, option index) it depends on

    @property
    def size(self) -> float:
        return math.inf if self.kind == "loguniform" else len(self.options)

    def describe(self, choice) -> str:
        if self.kind == "choice":
            return format_expr(self.options[choice])
        return format_expr(ast.Number(value=choice, text=_number_text(choice)))


def _keys(options: tuple) -> list:
    return [o if isinstance(o, (int, float)) else format_expr(o) for o in options]


def _number_text(value) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)


class Space:
    """The dimensions of one spec file, in source order."""

    def __init__(self, source: SourceFile, module: ast.Module):
        self.source = source
        self.module = module
        self.dimensions: dict[str, Dimension] = {}
        self._offsets = _line_offsets(source.text)
        for item in module.items:
            for where, expr in _item_exprs(item):
                self._collect(expr, where, None)

    # --- discovery -------------------------------------------------------------------------------

    def _collect(self, expr: ast.Expr, where: str, condition: tuple[str, int] | None) -> None:
        if isinstance(expr, ast.Call) and expr.func in schema.SEARCH:
            dimension = self._dimension(expr, where, condition)
            if dimension.kind == "choice":
                for index, option in enumerate(dimension_options(expr)):
                    self._collect(option, where, (dimension.label, index))
            return
        for suffix, child in _children(expr):
            self._collect(child, f"{where} / {suffix}" if suffix else where, condition)

    def _dimension(self, call: ast.Call, where: str, condition) -> Dimension:
        name = call.keyword("name")
        label = name.value if isinstance(name, ast.String) else self._unique(where)
        if call.func == "choice":
            kind, options = "choice", dimension_options(call)
        elif call.func == "range":
            low, high, step = (_literal(call, key, i, default) for i, (key, default)
                               in enumerate((("low", None), ("high", None), ("step", 1))))
            kind, options = "range", _range_values(low, high, step, call)
        else:
            low, high = _literal(call, "low", 0, None), _literal(call, "high", 1, None)
            kind, options = "loguniform", (low, high)
        dimension = self.dimensions.get(label)
        if dimension is None:
            dimension = self.dimensions[label] = Dimension(label, kind, options, condition=condition)
        elif dimension.kind != kind or _keys(dimension.options) != _keys(options):
            raise NestError([Diagnostic(code="N0119", message=f"the search dimension `{label}` is given different "
                                        "options", span=call.span)])
        dimension.sites.append(call)
        return dimension

    def _unique(self, where: str) -> str:
        if where not in self.dimensions:
            return where
        for index in itertools.count(2):
            if f"{where} #{index}" not in self.dimensions:
                return f"{where} #{index}"
        raise AssertionError

    # --- enumeration -----------------------------------------------------------------------------

    def active(self, assignment: dict) -> list[Dimension]:
        """The dimensions that exist under a (partial) assignment, in source order."""
        return [d for d in self.dimensions.values()
                if d.condition is None or assignment.get(d.condition[0]) == d.condition[1]
                and self._is_active(self.dimensions[d.condition[0]], assignment)]

    def _is_active(self, dimension: Dimension, assignment: dict) -> bool:
        return dimension.condition is None or (assignment.get(dimension.condition[0]) == dimension.condition[1]
                                               and self._is_active(self.dimensions[dimension.condition[0]], assignment))

    @property
    def size(self) -> float:
        """The number of distinct variants (infinite with a loguniform dimension)."""
        return sum(1 for _ in self.grid()) if all(d.kind != "loguniform" for d in self.dimensions.values()) \
            else math.inf

    def grid(self) -> Iterator[dict]:
        """Every variant, depth first: the first dimension varies slowest."""
        if any(d.kind == "loguniform" for d in self.dimensions.values()):
            raise ValueError("a space with a loguniform dimension has no grid; sample it instead")
        yield from self._grid({}, list(self.dimensions.values()))

    def _grid(self, assignment: dict, remaining: list[Dimension]) -> Iterator[dict]:
        remaining = [d for d in remaining if d.label not in assignment]
        pending = [d for d in remaining if d in self.active(assignment)]
        if not pending:
            yield dict(assignment)
            return
        first = pending[0]
        for value in (range(len(first.options)) if first.kind == "choice" else first.options):
            yield from self._grid({**assignment, first.label: value}, remaining)

    def sample(self, rng: random.Random) -> dict:
        """One variant drawn uniformly per dimension (log-uniformly for loguniform)."""
        def draw(dimension: Dimension):
            if dimension.kind == "choice":
                return rng.randrange(len(dimension.options))
            if dimension.kind == "range":
                return rng.choice(dimension.options)
            low, high = dimension.options
            return math.exp(rng.uniform(math.log(low), math.log(high)))

        return self.assign(draw)

    def assign(self, choose) -> dict:
        """An assignment built one dimension at a time in source order, `choose(dimension)` giving
        each value (an option's index for a choice): a conditional dimension is asked for only
        once the option containing it has been chosen."""
        assignment: dict = {}
        while True:
            pending = [d for d in self.active(assignment) if d.label not in assignment]
            if not pending:
                return assignment
            assignment[pending[0].label] = choose(pending[0])

    def describe(self, assignment: dict) -> dict[str, str]:
        return {label: self.dimensions[label].describe(value) for label, value in assignment.items()}

    # --- freezing --------------------------------------------------------------------------------

    def freeze(self, assignment: dict) -> str:
        """The spec text with every active search call replaced by its assigned value."""
        missing = [d.label for d in self.active(assignment) if d.label not in assignment]
        if missing:
            raise KeyError(f"no value for the dimension(s): {', '.join(missing)}")
        text = self.source.text
        whole = (0, len(text))
        return self._splice(whole, assignment)

    def _splice(self, region: tuple[int, int], assignment: dict) -> str:
        text = self.source.text
        sites = sorted((self._range_of(site), site, dimension) for dimension in self.dimensions.values()
                       for site in dimension.sites)
        inside = [(r, s, d) for r, s, d in sites if region[0] <= r[0] and r[1] <= region[1] and r != region]
        outermost = [(r, s, d) for r, s, d in inside
                     if not any(o[0] <= r[0] and r[1] <= o[1] and o != r for o, _, _ in inside)]
        pieces, cursor = [], region[0]
        for (start, end), site, dimension in outermost:
            pieces.append(text[cursor:start])
            value = assignment.get(dimension.label)
            if dimension.kind == "choice":
                option = dimension_options(site)[value]
                pieces.append(self._splice(self._range_of(option), assignment))
            else:
                pieces.append(_number_text(value))
            cursor = end
        pieces.append(text[cursor:region[1]])
        return "".join(pieces)

    def _range_of(self, node) -> tuple[int, int]:
        span: Span = node.span
        return (self._offsets[span.line - 1] + span.column - 1, self._offsets[span.end_line - 1] + span.end_column - 1)


def dimension_options(call: ast.Call) -> tuple[ast.Expr, ...]:
    return call.positional()


def _line_offsets(text: str) -> list[int]:
    offsets, total = [], 0
    for line in text.split("\n"):
        offsets.append(total)
        total += len(line) + 1
    return offsets


def _literal(call: ast.Call, name: str, index: int, default):
    expr = call.keyword(name)
    if expr is None:
        positional = call.positional()
        expr = positional[index] if index < len(positional) else None
    if expr is None:
        return default
    if isinstance(expr, ast.Number):
        return expr.value
    raise NestError([Diagnostic(code="N0114", message=f"the bounds of `{call.func}` must be numbers",
                                span=expr.span)])


def _range_values(low, high, step, call: ast.Call) -> tuple:
    if step <= 0 or low > high:
        raise NestError([Diagnostic(code="N0119", message="empty range", span=call.span)])
    count = int(math.floor((high - low) / step + 1e-9)) + 1
    values = [low + i * step for i in range(count)]
    if all(isinstance(v, int) for v in (low, high, step)):
        return tuple(int(v) for v in values)
    return tuple(round(v, 12) for v in values)


def _item_exprs(item: ast.Item):
    """(label prefix, expression) for every expression of a top-level item."""
    if isinstance(item, ast.ConstDef):
        yield f"const {item.name}", item.value
    elif isinstance(item, ast.BlockDef):
        yield f"block {item.name}", item.value
    elif isinstance(item, ast.LevelDef):
        if item.state is not None:
            yield f"level {item.name} / state", item.state
        for f in item.fields:
            if f.value is not None:
                yield f"level {item.name} / {f.key}", f.value
    elif isinstance(item, ast.Section):
        for f in item.fields:
            if f.value is not None:
                yield f"{item.name} / {f.key}", f.value


def _children(expr: ast.Expr) -> list[tuple[str | None, ast.Expr]]:
    """Nested expressions, each with the label suffix it adds (a keyword argument's name)."""
    if isinstance(expr, ast.Call):
        return [(a.name, a.value) for a in expr.args]
    if isinstance(expr, ast.ListExpr):
        return [(None, i) for i in expr.items]
    if isinstance(expr, ast.Pipe):
        return [(None, s) for s in expr.stages]
    if isinstance(expr, ast.BinOp):
        return [(None, expr.left), (None, expr.right)]
    if isinstance(expr, ast.Neg):
        return [(None, expr.operand)]
    return []


def load(path: str) -> Space:
    """The search space of a spec file (its own search values; imported files must be fixed)."""
    from nestc.lang import syntax
    from nestc.lang.sema import read_source

    source = read_source(path)
    return Space(source, syntax.parse(source))

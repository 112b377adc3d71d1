"""Semantic analysis: AST -> IR.

Resolves imports, constants, names and defaults against the schema, and reports every problem
it finds in one pass (a value that fails a check becomes `INVALID` and analysis continues).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from nestc.lang import ast, ir, schema
from nestc.lang.diagnostics import Diagnostic, Label, NestError, did_you_mean
from nestc.lang.queries import block_levels, first_use, generators, level_uses, search_values
from nestc.lang.schema import Param
from nestc.lang.source import SourceFile, SourceMap, Span


class _Invalid:
    """A value that failed a check; its diagnostic has already been reported."""

    def __repr__(self) -> str:
        return "INVALID"


INVALID = _Invalid()

RESERVED = (
    {schema.INPUT_NAME, schema.SELF_NAME, *schema.BOOLEANS}
    | set(schema.STAGES) | set(schema.BLOCKS) | set(schema.SEARCH) | set(schema.GATE_SOURCES)
)


@dataclass
class Result:
    """What one compilation produced: the program (None when errors stop it) and diagnostics."""

    program: ir.Program | None
    diagnostics: list[Diagnostic]
    sources: SourceMap
    modules: dict[str, ast.Module] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.program is not None and not any(d.is_error for d in self.diagnostics)


@dataclass
class _Definition:
    kind: str  # "const" | "level" | "block"
    node: object
    span: Span | None


def read_source(path: str) -> SourceFile:
    with open(path, encoding="utf-8") as handle:
        return SourceFile(path, handle.read())


def analyze_file(path: str, sources: SourceMap | None = None) -> Result:
    """Read, parse and check one spec file and everything it imports."""
    sources = sources or SourceMap()
    try:
        source = read_source(path)
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        return Result(None, [Diagnostic(code="N0100", message=f"cannot read `{path}`: {reason}", span=None)], sources)
    return analyze_source(source, sources)


def analyze_source(source: SourceFile, sources: SourceMap | None = None) -> Result:
    sources = sources or SourceMap()
    analyzer = _Analyzer(sources)
    program = analyzer.run(source)
    return Result(program, analyzer.diagnostics, sources, analyzer.modules)


class _Analyzer:
    def __init__(self, sources: SourceMap):
        self.sources = sources
        self.diagnostics: list[Diagnostic] = []
        self.modules: dict[str, ast.Module] = {}
        self.definitions: dict[str, _Definition] = {}
        self.sections: dict[str, ast.Section] = {}
        self.main_file = ""
        self._levels: dict[str, ir.Level | _Invalid] = {}
        self._chunked_levels: list[tuple] = []  # (level, every, context, field) checked once usage is known
        self._level_stack: list[str] = []
        self._current_level: str | None = None
        self._context: int | None = None
        self._extended: set[str] = set()

    # --- reporting -------------------------------------------------------------------------------

    def error(self, code: str, message: str, span: Span | None, label: str = "", help: str | None = None,
              notes: tuple[str, ...] = (), secondary: tuple[Label, ...] = ()) -> _Invalid:
        self.diagnostics.append(Diagnostic(code=code, message=message, span=span, label=label, help=help,
                                           notes=notes, secondary=secondary))
        return INVALID

    def warning(self, code: str, message: str, span: Span | None, label: str = "", help: str | None = None):
        self.diagnostics.append(Diagnostic(code=code, message=message, span=span, label=label, help=help,
                                           severity="warning"))

    # --- loading ---------------------------------------------------------------------------------

    def run(self, source: SourceFile) -> ir.Program | None:
        self.main_file = source.name
        module = self._load(source, import_stack=())
        if module is None:
            return None
        for section in module.items:
            if isinstance(section, ast.Section):
                self._add_section(section)
        program = self._build_program()
        # A level extended several times re-reports its own mistakes once per child: keep one.
        self.diagnostics = sorted(dict.fromkeys(self.diagnostics), key=self._position)
        if any(d.is_error for d in self.diagnostics):
            return None
        return program

    def _position(self, diagnostic: Diagnostic):
        """Source order: the main file first, then imported files; diagnostics without a span last."""
        span = diagnostic.span
        if span is None:
            return (2, "", 0, 0)
        return (0 if span.file == self.main_file else 1, span.file, span.line, span.column)

    def _load(self, source: SourceFile, import_stack: tuple[str, ...]) -> ast.Module | None:
        from nestc.lang import syntax  # lark is only needed once there is text to parse

        self.sources.add(source)
        try:
            module = syntax.parse(source)
        except NestError as error:
            self.diagnostics.extend(error.diagnostics)
            return None
        self.modules[source.name] = module
        for item in module.items:
            if isinstance(item, ast.Import):
                self._import(item, source.name, import_stack + (source.name,))
            elif isinstance(item, ast.ConstDef):
                self._define(item.name, "const", item, item.name_span)
            elif isinstance(item, ast.LevelDef):
                self._define(item.name, "level", item, item.name_span)
            elif isinstance(item, ast.BlockDef):
                self._define(item.name, "block", item, item.name_span)
        return module

    def _import(self, item: ast.Import, importer: str, import_stack: tuple[str, ...]) -> None:
        if not item.path.endswith(".nest"):
            self.error("N0115", f"cannot import `{item.path}`: imports name `.nest` files", item.path_span,
                       label="not a .nest file")
            return
        path = os.path.normpath(os.path.join(os.path.dirname(importer), item.path))
        if path in import_stack:
            chain = " -> ".join(import_stack[import_stack.index(path):] + (path,))
            self.error("N0115", "import cycle", item.path_span, label="imports a file that imports this one",
                       notes=(f"the cycle: {chain}",))
            return
        if path in self.modules:
            return
        try:
            source = read_source(path)
        except (OSError, UnicodeDecodeError) as error:
            reason = error.strerror if isinstance(error, OSError) and error.strerror else "not UTF-8 text"
            self.error("N0115", f"cannot import `{item.path}`: {reason.lower()}", item.path_span,
                       label=f"looked for {path}", help="import paths are relative to the importing file")
            return
        self._load(source, import_stack)

    def _define(self, name: str, kind: str, node, span: Span | None) -> None:
        if name in RESERVED or name in schema.OP_TABLES["state"]:
            what = "a built-in name" if name in RESERVED else "a state"
            self.error("N0123", f"`{name}` is {what} and cannot name a {kind}", span,
                       label="reserved", help=f"choose another name, e.g. `{name}_{kind}`")
            return
        if name in self.definitions:
            previous = self.definitions[name]
            self.error("N0102", f"`{name}` is defined twice", span, label=f"second definition ({kind})",
                       secondary=(Label(span=previous.span, message=f"first defined here ({previous.kind})"),)
                       if previous.span else ())
            return
        self.definitions[name] = _Definition(kind, node, span)

    def _add_section(self, section: ast.Section) -> None:
        if section.name not in schema.SECTIONS:
            self.error("N0103", f"unknown section `{section.name}`", section.name_span, label="not a section",
                       help=did_you_mean(section.name, schema.SECTIONS))
            return
        if section.name in self.sections:
            self.error("N0102", f"section `{section.name}` is given twice", section.name_span,
                       secondary=(Label(span=self.sections[section.name].name_span, message="first given here"),))
            return
        self.sections[section.name] = section

    # --- names and constants ---------------------------------------------------------------------

    def _deref(self, expr: ast.Expr, seen: tuple[str, ...] = ()) -> ast.Expr | _Invalid:
        """Replace a name that refers to a constant with the constant's expression."""
        while isinstance(expr, ast.Name):
            definition = self.definitions.get(expr.id)
            if definition is None or definition.kind != "const":
                return expr
            if expr.id in seen:
                chain = " -> ".join(seen[seen.index(expr.id):] + (expr.id,))
                return self.error("N0121", f"constant `{expr.id}` is defined in terms of itself", expr.span,
                                  notes=(f"the chain: {chain}",))
            seen = seen + (expr.id,)
            expr = definition.node.value
        return expr

    # --- values ----------------------------------------------------------------------------------

    def value(self, expr: ast.Expr, param: Param, what: str):
        """Evaluate `expr` as a value of `param`'s type; `what` names it in messages."""
        expr = self._deref(expr)
        if expr is INVALID:
            return INVALID
        if isinstance(expr, ast.Call) and expr.func in schema.SEARCH:
            return self.search(expr, param, what)
        kind = param.type
        if kind in ("int", "number"):
            return self.number(expr, param, what)
        if kind == "bool":
            return self.boolean(expr, what)
        if kind == "string":
            if isinstance(expr, ast.String):
                return expr.value
            return self.error("N0105", f"{what} must be a string", expr.span, label="expected \"...\"")
        if kind == "enum":
            return self.enum(expr, param, what)
        if kind == "level":
            return self.level_name(expr, what)
        if kind == "list":
            if not isinstance(expr, ast.ListExpr):
                return self.error("N0105", f"{what} must be a list", expr.span, label="expected [a, b, ...]")
            return tuple(self.number(i, Param("item", "number"), f"an item of {what}") for i in expr.items)
        if kind == "source":
            return self.pipeline(expr, what, gate=False)
        if kind == "gate":
            return self.gate(expr, what)
        if kind == "block":
            return self.block(expr, what)
        if kind in schema.OP_TABLES:
            return self.op(expr, kind, what)
        raise AssertionError(f"no evaluator for parameter type {kind}")

    def search(self, call: ast.Call, param: Param, what: str):
        if param.fixed:
            return self.error("N0114", f"{what} cannot be a search-space value", call.span,
                              label=f"`{call.func}` is not allowed here",
                              help=f"give {what} one fixed value; search over other fields instead")
        spec = schema.SEARCH[call.func]
        args = self._bind(call, spec, f"`{call.func}`")
        if args is INVALID:
            return INVALID
        name = args.get("name")
        if call.func == "choice":
            options = args["*"]
            if not options:
                return self.error("N0119", "a choice needs at least one option", call.span, label="empty choice")
            # Each option is checked against the field's type, so options of the wrong kind are
            # reported one by one, each at its own span.
            values = [self.value(option, param, what) for option in options]
            if INVALID in values:
                return INVALID
            return ir.Choice(options=tuple(values), name=name, span=call.span)
        if param.type not in ("int", "number"):
            return self.error("N0119", f"`{call.func}` gives numbers, but {what} is not a number", call.span,
                              help="use `choice(...)` to choose between names or structures")
        low, high = args["low"], args["high"]
        if INVALID in (low, high, args.get("step")):
            return INVALID
        if not low < high:
            return self.error("N0119", f"empty {call.func}: low ({low}) must be below high ({high})", call.span)
        if call.func == "loguniform":
            if low <= 0:
                return self.error("N0119", "loguniform needs a positive lower bound", call.span,
                                  label=f"low is {low}")
            if param.type == "int":
                return self.error("N0119", f"{what} is an integer; loguniform draws real numbers", call.span,
                                  help="use `range(low, high, step)` or `choice(...)`")
            self._check_range(low, param, what, call.span)
            self._check_range(high, param, what, call.span)
            return ir.LogUniform(low=low, high=high, name=name, span=call.span)
        step = args["step"]
        if step <= 0:
            return self.error("N0119", "range step must be positive", call.span, label=f"step is {step}")
        if param.type == "int" and not all(isinstance(v, int) for v in (low, high, step)):
            return self.error("N0119", f"{what} is an integer; this range has fractional bounds or step", call.span)
        self._check_range(low, param, what, call.span)
        self._check_range(high, param, what, call.span)
        return ir.Range(low=low, high=high, step=step, name=name, span=call.span)

    def number(self, expr: ast.Expr, param: Param, what: str):
        value = self._arith(expr, what)
        if value is INVALID:
            return INVALID
        if isinstance(value, ir.Choice):
            for option in value.options:
                self._check_number(option, param, what, expr.span)
            return value
        return self._check_number(value, param, what, expr.span)

    def _check_number(self, value, param: Param, what: str, span: Span | None):
        if param.type == "int" and not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return self.error("N0105", f"{what} must be an integer", span, label=f"`{value}` is a real number",
                                  help=f"write `{int(value)}`")
            return self.error("N0105", f"{what} must be an integer", span, label=f"got {value}")
        return self._check_range(value, param, what, span)

    def _check_range(self, value, param: Param, what: str, span: Span | None):
        low, high = param.minimum, param.maximum
        too_low = low is not None and (value <= low if param.exclusive_minimum else value < low)
        too_high = high is not None and value > high
        if too_low or too_high:
            if low is not None and high is not None:
                bounds = f"between {low} and {high}"
            elif low is not None:
                bounds = f"greater than {low}" if param.exclusive_minimum else f"at least {low}"
            else:
                bounds = f"at most {high}"
            return self.error("N0106", f"{what} must be {bounds}", span, label=f"got {value}")
        return value

    def _arith(self, expr: ast.Expr, what: str):
        """A number from a literal, a constant or arithmetic; a choice maps through arithmetic."""
        expr = self._deref(expr)
        if expr is INVALID:
            return INVALID
        if isinstance(expr, ast.Number):
            return expr.value
        if isinstance(expr, ast.Neg):
            inner = self._arith(expr.operand, what)
            if inner is INVALID or self._not_arithmetic(inner, expr):
                return INVALID
            return _map_choice(inner, lambda v: -v)
        if isinstance(expr, ast.BinOp):
            left, right = self._arith(expr.left, what), self._arith(expr.right, what)
            if INVALID in (left, right):
                return INVALID
            if isinstance(left, ir.Choice) and isinstance(right, ir.Choice):
                return self.error("N0119", "arithmetic between two search-space values", expr.span,
                                  help="combine them in one `choice(...)` instead")
            if self._not_arithmetic(left, expr) or self._not_arithmetic(right, expr):
                return INVALID
            if expr.op == "/" and (0 in _options(right)):
                return self.error("N0106", "division by zero", expr.span)
            return _combine(left, right, expr.op)
        if isinstance(expr, ast.Call) and expr.func in schema.SEARCH:
            return self.search(expr, Param("value", "number"), what)
        if isinstance(expr, ast.Name):
            return self._unknown_name(expr, what, "a number")
        return self.error("N0105", f"{what} must be a number", expr.span, label=f"found {_describe(expr)}")

    def _not_arithmetic(self, value, expr: ast.Expr) -> bool:
        """Ranges (also inside a choice) have no arithmetic; report it and say so."""
        options = value.options if isinstance(value, ir.Choice) else (value,)
        if any(isinstance(v, ir.SEARCH_TYPES) for v in options):
            self.error("N0119", "arithmetic on a range is not supported", expr.span,
                       help="write the range over the final value, e.g. `range(2, 8, 2)` instead of `range(1, 4) * 2`")
            return True
        return False

    def boolean(self, expr: ast.Expr, what: str):
        if isinstance(expr, ast.Name) and expr.id in schema.BOOLEANS:
            return schema.BOOLEANS[expr.id]
        guess = did_you_mean(expr.id, schema.BOOLEANS) if isinstance(expr, ast.Name) else None
        return self.error("N0105", f"{what} must be `true` or `false`", expr.span, label=f"found {_describe(expr)}",
                          help=guess)

    def enum(self, expr: ast.Expr, param: Param, what: str):
        if isinstance(expr, ast.Name) and expr.id in param.choices:
            return expr.id
        if isinstance(expr, ast.Name):
            return self.error("N0101", f"unknown value `{expr.id}` for {what}", expr.span, label="not one of the values",
                              help=did_you_mean(expr.id, param.choices))
        return self.error("N0105", f"{what} must be one of: {', '.join(param.choices)}", expr.span,
                          label=f"found {_describe(expr)}")

    def level_name(self, expr: ast.Expr, what: str):
        if isinstance(expr, ast.Name):
            definition = self.definitions.get(expr.id)
            if definition is not None and definition.kind == "level":
                return expr.id
            return self._unknown_name(expr, what, "a level", self._names("level"))
        return self.error("N0105", f"{what} must name a level", expr.span, label=f"found {_describe(expr)}")

    def _names(self, kind: str) -> list[str]:
        return [name for name, d in self.definitions.items() if d.kind == kind]

    def _unknown_name(self, expr: ast.Name, what: str, expected: str, candidates=()):
        definition = self.definitions.get(expr.id)
        if definition is not None:
            return self.error("N0105", f"`{expr.id}` is a {definition.kind}, but {what} must be {expected}",
                              expr.span, label=f"a {definition.kind}",
                              secondary=(Label(span=definition.span, message="defined here"),) if definition.span else ())
        candidates = list(candidates) + self._names("const")
        return self.error("N0101", f"unknown name `{expr.id}`", expr.span, label="not defined",
                          help=did_you_mean(expr.id, candidates) if candidates else None)

    # --- operators -------------------------------------------------------------------------------

    def _bind(self, call: ast.Call, spec: schema.OpSpec, where: str):
        """Match a call's arguments to the operator's parameters; defaults not filled in."""
        bound: dict[str, object] = {}
        positional = [p for p in spec.params if spec.variadic is None]
        extra: list[ast.Expr] = []
        ok = True
        index = 0
        for arg in call.args:
            if arg.name is None:
                if spec.variadic is not None:
                    extra.append(arg.value)
                    continue
                while index < len(positional) and positional[index].name in bound:
                    index += 1
                if index >= len(positional):
                    count = len(spec.params)
                    self.error("N0108", f"too many arguments for {where}", arg.span, label="unexpected argument",
                               help=f"{where} takes {count} argument{'s' if count != 1 else ''}"
                               + (": " + ", ".join(p.name for p in spec.params) if count else ""))
                    ok = False
                    continue
                param = positional[index]
                index += 1
            else:
                param = spec.param(arg.name)
                if param is None:
                    names = [p.name for p in spec.params]
                    self.error("N0104", f"unknown argument `{arg.name}` for {where}", arg.name_span,
                               label="no such argument",
                               help=did_you_mean(arg.name, names) if names else f"{where} takes no arguments")
                    ok = False
                    continue
                if param.name in bound:
                    self.error("N0116", f"argument `{arg.name}` is given twice", arg.name_span)
                    ok = False
                    continue
            if param.type in ("block", "level", "source", "gate") and spec.kind == "block":
                bound[param.name] = arg.value  # evaluated by the block builder, in block context
                continue
            value = self.value(arg.value, param, f"`{param.name}` of {where}")
            ok = ok and value is not INVALID
            bound[param.name] = value
        if spec.variadic is not None:
            bound["*"] = extra
        for param in spec.params:
            if param.name not in bound and param.required:
                self.error("N0107", f"{where} needs the argument `{param.name}`", call.span,
                           label=f"`{param.name}` missing", help=f"write `{spec.name}({param.name}=...)`")
                ok = False
        if not ok:
            return INVALID
        for param in spec.params:
            bound.setdefault(param.name, None if param.required else param.default)
        return bound

    def op(self, expr: ast.Expr, kind: str, what: str):
        table = schema.OP_TABLES[kind]
        word = schema.KIND_WORDS[kind]
        if isinstance(expr, ast.Name):
            name, call = expr.id, ast.Call(func=expr.id, args=(), func_span=expr.span, span=expr.span)
            name_span = expr.span
        elif isinstance(expr, ast.Call):
            name, call, name_span = expr.func, expr, expr.func_span
        else:
            return self.error("N0105", f"{what} must be a {word}", expr.span, label=f"found {_describe(expr)}",
                              help="one of: " + ", ".join(f"`{n}`" for n in table))
        spec = table.get(name)
        if spec is None:
            return self.error("N0101", f"unknown {word} `{name}`", name_span, label=f"unknown {word}",
                              help=did_you_mean(name, table))
        args = self._bind(call, spec, f"`{name}`")
        if args is INVALID:
            return INVALID
        return ir.Op(name=name, args=tuple((p.name, args[p.name]) for p in spec.params), span=expr.span)

    # --- pipelines and gates ---------------------------------------------------------------------

    def pipeline(self, expr: ast.Expr, what: str, gate: bool):
        stages = list(expr.stages) if isinstance(expr, ast.Pipe) else [expr]
        first = self._deref(stages[0])
        if first is INVALID:
            return INVALID
        if not (isinstance(first, ast.Name) and first.id == schema.INPUT_NAME):
            return self.error("N0120", f"{what} must be a pipeline that starts with `x`", stages[0].span,
                              label="expected `x`, the level's input",
                              help=f"for example `x |> {_describe_as_stage(first)}`"
                              if isinstance(first, (ast.Name, ast.Call)) else "for example `x |> proj`")
        resolved = [self.stage(s, what) for s in stages[1:]]
        if INVALID in resolved:
            return INVALID
        return ir.Pipeline(stages=tuple(resolved), span=expr.span)

    def stage(self, expr: ast.Expr, what: str):
        expr = self._deref(expr)
        if expr is INVALID:
            return INVALID
        if isinstance(expr, ast.Call) and expr.func in schema.SEARCH:
            return self._stage_choice(expr, what)
        name = expr.id if isinstance(expr, ast.Name) else expr.func if isinstance(expr, ast.Call) else None
        if name is None:
            return self.error("N0105", f"a stage of {what} must be a name or a call", expr.span,
                              label=f"found {_describe(expr)}")
        if name == schema.SELF_NAME or name == self._current_level:
            if isinstance(expr, ast.Call):
                return self.error("N0105", "a level stage takes no arguments", expr.span)
            return ir.LevelRef(level=self._current_level, span=expr.span)
        definition = self.definitions.get(name)
        if definition is not None and definition.kind == "level":
            if isinstance(expr, ast.Call):
                return self.error("N0105", f"level `{name}` is used as a stage and takes no arguments", expr.span,
                                  help=f"write `|> {name}`; configure the level in its definition")
            return ir.LevelRef(level=name, span=expr.span)
        if name in schema.STAGES:
            return self.op(expr, "stage", what)
        if name == schema.INPUT_NAME:
            return self.error("N0105", "`x` may only start a pipeline", expr.span, label="`x` inside a pipeline")
        return self.error("N0101", f"unknown stage `{name}` in {what}", _name_span(expr),
                          label="not a stage or a level",
                          help=did_you_mean(name, list(schema.STAGES) + self._names("level")))

    def _stage_choice(self, call: ast.Call, what: str):
        if call.func != "choice":
            return self.error("N0119", f"`{call.func}` gives numbers; a stage needs `choice(...)`", call.span)
        bound = self._bind(call, schema.SEARCH["choice"], "`choice`")
        if bound is INVALID:
            return INVALID
        if not bound["*"]:
            return self.error("N0119", "a choice needs at least one option", call.span, label="empty choice")
        options = [self.stage(o, what) for o in bound["*"]]
        if INVALID in options:
            return INVALID
        return ir.Choice(options=tuple(options), name=bound["name"], span=call.span)

    def gate(self, expr: ast.Expr, what: str):
        expr = self._deref(expr)
        if expr is INVALID:
            return INVALID
        if isinstance(expr, (ast.Number, ast.Neg, ast.BinOp)):
            value = self.number(expr, Param("gate", "number"), what)
            return INVALID if value is INVALID else ir.Constant(value=value, span=expr.span)
        if isinstance(expr, ast.Call) and expr.func in schema.GATE_SOURCES:
            spec = schema.GATE_SOURCES[expr.func]
            args = self._bind(expr, spec, f"`{expr.func}`")
            if args is INVALID:
                return INVALID
            return ir.Op(name=expr.func, args=tuple((p.name, args[p.name]) for p in spec.params), span=expr.span)
        if isinstance(expr, ast.Name) and expr.id in schema.GATE_SOURCES:
            return ir.Op(name=expr.id, args=tuple((p.name, p.default) for p in schema.GATE_SOURCES[expr.id].params),
                         span=expr.span)
        if isinstance(expr, ast.Pipe) or (isinstance(expr, ast.Name) and expr.id == schema.INPUT_NAME):
            return self.pipeline(expr, what, gate=True)
        if isinstance(expr, ast.Name):
            return self.error("N0101", f"unknown name `{expr.id}` in {what}", expr.span, label="not defined",
                              help=did_you_mean(expr.id, ["learned", "x"] + self._names("const"))
                              or "a gate is a number, `learned(...)` or a pipeline such as `x |> proj |> sigmoid`")
        return self.error("N0105", f"{what} must be a number, `learned(...)` or a pipeline from `x`", expr.span,
                          label=f"found {_describe(expr)}")

    # --- blocks ----------------------------------------------------------------------------------

    def block(self, expr: ast.Expr, what: str, stack: tuple[str, ...] = ()):
        expr = self._deref(expr)
        if expr is INVALID:
            return INVALID
        if isinstance(expr, ast.Pipe):
            items = [self.block(s, what, stack) for s in expr.stages]
            return INVALID if INVALID in items else ir.Sequence(items=tuple(items), span=expr.span)
        if isinstance(expr, ast.Name):
            definition = self.definitions.get(expr.id)
            if definition is not None and definition.kind == "level":
                return ir.UseLevel(level=expr.id, span=expr.span)
            if definition is not None and definition.kind == "block":
                if expr.id in stack:
                    chain = " -> ".join(stack[stack.index(expr.id):] + (expr.id,))
                    return self.error("N0121", f"block `{expr.id}` contains itself", expr.span,
                                      notes=(f"the chain: {chain}",))
                return self.block(definition.node.value, what, stack + (expr.id,))
            if expr.id in ("rmsnorm", "layernorm", "identity"):
                return ir.Norm(kind=expr.id, span=expr.span)
            if expr.id in schema.BLOCKS:
                return self.error("N0107", f"`{expr.id}` needs arguments", expr.span,
                                  help=f"for example `{expr.id}(...)`")
            return self._unknown_name(expr, what, "a level or a block",
                                      self._names("level") + self._names("block") + list(schema.BLOCKS))
        if isinstance(expr, ast.Call):
            if expr.func == "choice":
                bound = self._bind(expr, schema.SEARCH["choice"], "`choice`")
                if bound is INVALID:
                    return INVALID
                if not bound["*"]:
                    return self.error("N0119", "a choice needs at least one option", expr.span)
                options = [self.block(o, what, stack) for o in bound["*"]]
                return INVALID if INVALID in options else ir.Choice(options=tuple(options), name=bound["name"],
                                                                    span=expr.span)
            spec = schema.BLOCKS.get(expr.func)
            if spec is None:
                definition = self.definitions.get(expr.func)
                if definition is not None and definition.kind == "level":
                    return self.error("N0105", f"level `{expr.func}` takes no arguments here", expr.span,
                                      help=f"write `{expr.func}`")
                return self.error("N0101", f"unknown block `{expr.func}`", expr.func_span, label="not a block",
                                  help=did_you_mean(expr.func, list(schema.BLOCKS) + self._names("block")))
            if spec.params == ():
                return self.error("N0108", f"`{expr.func}` takes no arguments", expr.span,
                                  help=f"write `{expr.func}`")
            bound = self._bind(expr, spec, f"`{expr.func}`")
            if bound is INVALID:
                return INVALID
            if expr.func == "residual":
                body = self.block(bound["body"], what, stack)
                return INVALID if body is INVALID else ir.Residual(body=body, span=expr.span)
            if expr.func == "parallel":
                if len(bound["*"]) < 2:
                    return self.error("N0107", "`parallel` needs at least two branches", expr.span)
                branches = [self.block(b, what, stack) for b in bound["*"]]
                return INVALID if INVALID in branches else ir.Parallel(branches=tuple(branches),
                                                                       combine=bound["combine"], span=expr.span)
            if expr.func == "gated":
                main, gate = self.block(bound["main"], what, stack), self.block(bound["gate"], what, stack)
                return INVALID if INVALID in (main, gate) else ir.Gated(main=main, gate=gate, span=expr.span)
            if expr.func == "mac":
                memory = self.level_name(self._deref(bound["memory"]), "`memory` of `mac`")
                attention = self.level_name(self._deref(bound["attention"]), "`attention` of `mac`")
                if INVALID in (memory, attention):
                    return INVALID
                return ir.MemoryAsContext(memory=memory, attention=attention, segment=bound["segment"],
                                          persistent=bound["persistent"], span=expr.span)
        return self.error("N0105", f"{what} must be a block expression", expr.span, label=f"found {_describe(expr)}",
                          help="for example `residual(rmsnorm |> mixer) |> residual(rmsnorm |> ffn)`")

    # --- sections --------------------------------------------------------------------------------

    def _fields(self, fields: tuple[ast.Field, ...], table: dict[str, Param], where: str) -> dict[str, ast.Field]:
        """Index a body's fields by key, reporting unknown and repeated ones."""
        seen: dict[str, ast.Field] = {}
        for f in fields:
            if f.key not in table:
                self.error("N0103", f"unknown field `{f.key}` in {where}", f.key_span, label="no such field",
                           help=did_you_mean(f.key, table))
                continue
            if f.key in seen:
                self.error("N0116", f"field `{f.key}` is given twice in {where}", f.key_span,
                           secondary=(Label(span=seen[f.key].key_span, message="first given here"),))
                continue
            seen[f.key] = f
        return seen

    def _field_value(self, f: ast.Field, param: Param, where: str):
        if f.unit is not None and param.type != "frequency":
            return self.error("N0125", f"unexpected `{f.unit}` after the value of `{f.key}`", f.unit_span,
                              label="only `every N tokens|steps` takes a unit")
        if f.value is None:
            if param.type == "bool":
                return True
            return self.error("N0015", f"`{f.key}` needs a value", f.key_span, label="missing value",
                              help=_example(f.key))
        return self.value(f.value, param, f"`{f.key}`")

    def _section_values(self, name: str) -> dict[str, object]:
        table = schema.SECTIONS[name]
        section = self.sections.get(name)
        given = self._fields(section.fields, table, f"`{name}`") if section else {}
        values: dict[str, object] = {}
        for key, param in table.items():
            if key in given:
                values[key] = self._field_value(given[key], param, f"`{name}`")
            elif param.required:
                values[key] = self.error("N0107", f"`{name}` needs the field `{key}`",
                                         section.name_span if section else None, label=f"`{key}` missing",
                                         help=_example(key))
            else:
                values[key] = self._default(param)
        return values

    def _default(self, param: Param):
        if param.type in schema.OP_TABLES and isinstance(param.default, str):
            spec = schema.OP_TABLES[param.type][param.default]
            return ir.Op(name=spec.name, args=tuple((p.name, p.default) for p in spec.params))
        return param.default

    # --- levels ----------------------------------------------------------------------------------

    def _level_fields(self, name: str) -> tuple[ast.Expr | None, dict[str, ast.Field]] | _Invalid:
        """The state and fields of a level, following `extends` chains."""
        node: ast.LevelDef = self.definitions[name].node
        if node.base is None:
            return node.state, self._fields(node.fields, schema.LEVEL_FIELDS, f"level `{name}`")
        base = self.definitions.get(node.base)
        if base is None or base.kind != "level":
            if base is None:
                return self.error("N0101", f"unknown level `{node.base}`", node.base_span, label="not defined",
                                  help=did_you_mean(node.base, self._names("level")))
            return self.error("N0105", f"`{node.base}` is a {base.kind}; a level can only extend a level",
                              node.base_span)
        if node.base in self._level_stack:
            chain = " -> ".join(self._level_stack[self._level_stack.index(node.base):] + [node.base])
            return self.error("N0121", f"level `{name}` extends itself", node.base_span, notes=(f"the chain: {chain}",))
        self._extended.add(node.base)
        self._level_stack.append(name)
        try:
            inherited = self._level_fields(node.base)
        finally:
            self._level_stack.pop()
        if inherited is INVALID:
            return INVALID
        state, fields = inherited
        own = self._fields(node.fields, schema.LEVEL_FIELDS, f"level `{name}`")
        return state, {**fields, **own}

    def level(self, name: str):
        if name in self._levels:
            return self._levels[name]
        self._levels[name] = INVALID  # guards against re-entry while this level is built
        resolved = self._level_fields(name)
        if resolved is INVALID:
            return INVALID
        state_expr, fields = resolved
        node: ast.LevelDef = self.definitions[name].node
        enclosing, self._current_level = self._current_level, name
        try:
            level = self._build_level(name, node, state_expr, fields, self._context)
        finally:
            self._current_level = enclosing
        self._levels[name] = level
        return level

    def _build_level(self, name, node, state_expr, fields, context):
        state = self.op(state_expr, "state", f"the state of level `{name}`")
        values = {key: self._field_value(f, schema.LEVEL_FIELDS[key], f"level `{name}`")
                  for key, f in fields.items() if key != "every"}
        every = self._frequency(fields.get("every"), values.pop("frozen", False), fields.get("frozen"), name)
        if every not in (None, INVALID) and every.tokens not in (0, 1) and context is not None:
            self._chunked_levels.append((name, every, context, fields.get("every")))
        if state is INVALID or INVALID in values.values() or every is INVALID:
            return INVALID
        kinds = _option_names(state)
        kind = next(iter(kinds)) if len(kinds) == 1 else None
        span = node.name_span

        if kind == "cache":
            allowed = {"key", "value", "query", "heads", "read"}
            for key in sorted(set(fields) - allowed - {"every"}):
                self.error("N0117", f"`{key}` has no meaning for a `cache` level", fields[key].key_span,
                           label="not a field of attention",
                           notes=("a cache level is softmax attention: its update is the closed form "
                                  "'append (k, v)', with no objective, optimizer or gates",))
            if "every" in fields:
                self.error("N0117", "`every` has no meaning for a `cache` level", fields["every"].key_span,
                           label="attention appends every token")
        has_io = any(k in fields for k in ("key", "value", "query"))
        objective = values.get("objective")
        if objective is None and kind != "cache":
            objective = ir.Op(name="task" if (kind == "mlp" and not has_io) else "l2",
                              args=()) if kind is not None else None
        objectives = _option_names(objective)
        optimizer = values.get("optimizer") or (None if kind == "cache" else ir.Op(name="gd"))
        optimizers = _option_names(optimizer)
        task = bool(objectives) and objectives == {"task"}

        if every is None:
            every = ir.Frequency(tokens=0 if kind == "mlp" else 1, steps=1)
        if every.tokens == 0 and kind == "cache":
            every = ir.Frequency(tokens=1, steps=1)

        if "task" in objectives:
            for key in ("key", "value", "query"):
                if key in fields:
                    self.error("N0117", f"`{key}` has no meaning for a level trained on the task loss",
                               fields[key].key_span, label="the level reads its input directly",
                               notes=("with `objective task` the level is a continuum-memory block: y = M(x), "
                                      "updated with the gradient of the model's own loss",))
        for state_kind in kinds:
            for objective_name in objectives:
                self._check_objective(state_kind, objective_name, fields, state_expr)
            for optimizer_name in optimizers:
                self._check_optimizer(state_kind, optimizer_name, objectives, fields)
        read = values.get("read", "after")
        if "task" in objectives and "after" in _options(read) and "read" in fields:
            self.error("N0113", "`read after` has no form for a level trained on the task loss",
                       fields["read"].value.span, label="cannot read after this update",
                       notes=("the update at token t needs the gradient of the loss at t, which needs the output "
                              "at t: the output must be read before the update",),
                       help="remove `read after` (these levels always read before their update)")
        if task and "read" not in fields:
            read = "before"

        momentum = values.get("momentum")
        if optimizers & {"momentum", "muon"}:
            momentum = momentum or ir.Constant(value=0.9)
        elif momentum is not None and optimizers:
            self.error("N0117", f"a momentum gate has no effect with optimizer `{' or '.join(sorted(optimizers))}`",
                       fields["momentum"].key_span, label="unused gate",
                       help="use `optimizer momentum` (or `muon`), or remove the gate")
        gamma = values.get("gamma")
        if "omega" in objectives:
            gamma = gamma or ir.Constant(value=1.0)
        elif gamma is not None and objectives:
            self.error("N0117", "a gamma gate only weights the pairs of an `omega` objective",
                       fields["gamma"].key_span, label="unused gate", help="use `objective omega(window=...)`")
        order = values.get("order", "grad_first")

        default_source = ir.Pipeline(stages=(self._default_op("stage", "proj"),))
        init = values.get("init") or ir.Op(name="meta" if kind == "mlp" else "zero", args=())
        if isinstance(init, ir.Op) and init.name == "pretrained":
            self._check_pretrained(name, state, init, fields["init"])
        meta = values.get("meta") or ("first_order" if task else "full")
        is_parametric = kind != "cache"
        return ir.Level(
            name=name,
            state=state,
            key=None if task else values.get("key") or default_source,
            value=None if task else values.get("value") or default_source,
            query=None if task else values.get("query") or default_source,
            lr=values.get("lr") or (ir.Constant(value=1.0) if is_parametric else None),
            retain=values.get("retain") or (ir.Constant(value=1.0) if is_parametric else None),
            momentum=momentum,
            gamma=gamma,
            objective=objective,
            optimizer=optimizer,
            order=order if is_parametric else None,
            output=values.get("output") or ir.Op(name="none"),
            every=every,
            read=read,
            init=init,
            meta=meta if is_parametric else None,
            heads=values.get("heads"),
            span=span,
        )

    def _default_op(self, kind: str, name: str) -> ir.Op:
        spec = schema.OP_TABLES[kind][name]
        return ir.Op(name=name, args=tuple((p.name, p.default) for p in spec.params))

    def _frequency(self, f: ast.Field | None, frozen, frozen_field: ast.Field | None, level: str):
        if frozen and f is not None:
            self.error("N0116", f"level `{level}` is both `frozen` and updated `every ...`", f.key_span,
                       secondary=(Label(span=frozen_field.key_span, message="frozen here"),))
            return INVALID
        if frozen:
            return ir.Frequency(tokens=0, steps=1, span=frozen_field.span)
        if f is None:
            return None
        if f.value is None:
            return self.error("N0015", "`every` needs a period", f.key_span, label="missing value",
                              help="write `every 16` (tokens) or `every 4 steps` (outer optimizer steps)")
        unit = f.unit or "tokens"
        if unit not in schema.FREQUENCY_UNITS:
            return self.error("N0101", f"unknown unit `{unit}`", f.unit_span, label="not a unit",
                              help=did_you_mean(unit, schema.FREQUENCY_UNITS))
        period = self.value(f.value, Param("every", "int", minimum=0 if unit == "tokens" else 1), "the period")
        if period is INVALID:
            return INVALID
        if unit == "steps":
            return ir.Frequency(tokens=0, steps=period, span=f.span)
        return ir.Frequency(tokens=period, steps=1, span=f.span)

    def _check_divides(self, every: ir.Frequency, context, f: ast.Field | None) -> None:
        context_field = self.sections.get("train")
        context_span = None
        if context_field is not None:
            context_span = next((x.value.span for x in context_field.fields if x.key == "context" and x.value), None)
        for chunk in _options(every.tokens):
            for length in _options(context):
                if isinstance(chunk, int) and isinstance(length, int) and chunk > 0 and length % chunk:
                    self.error("N0110", f"chunk size {chunk} does not divide the training context {length}",
                               f.value.span if f else None, label=f"every {chunk} tokens",
                               secondary=(Label(span=context_span, message=f"context {length}"),) if context_span else (),
                               help=f"choose a period that divides {length} (e.g. "
                               f"{_nearest_divisor(length, chunk)}), or change the context")

    def _check_objective(self, kind: str, objective: str, fields, state_expr) -> None:
        allowed = {"matrix": set(schema.OBJECTIVES), "mlp": set(schema.OBJECTIVES),
                   "vector": set(schema.OBJECTIVES) - {"omega"}}
        if kind in allowed and objective not in allowed[kind]:
            self.error("N0111", f"objective `{objective}` is not defined for a `{kind}` state",
                       fields["objective"].value.span if "objective" in fields else state_expr.span,
                       label="no such objective for this state",
                       help="use one of: " + ", ".join(sorted(allowed[kind])))

    def _check_optimizer(self, kind: str, optimizer: str, objectives: set[str], fields) -> None:
        span = fields["optimizer"].value.span if "optimizer" in fields else None
        if optimizer in ("dgd", "muon") and kind not in ("matrix", "mlp"):
            self.error("N0112", f"optimizer `{optimizer}` is not defined for a `{kind}` state", span,
                       label="needs weight matrices",
                       help="dgd and muon act on the linear maps of a matrix or mlp state; use gd or momentum")
        if "task" in objectives and optimizer in ("dgd", "muon"):
            self.error("N0112", f"optimizer `{optimizer}` is not defined for the task objective", span,
                       label="continuum-memory levels use gd or momentum",
                       help="dgd needs the level's (key, value) pairs, which task-loss levels do not have")

    def _check_pretrained(self, name, state, init, init_field) -> None:
        source = init.arg("source")
        if source == name:
            self.error("N0124", f"level `{name}` cannot be initialised from itself", init_field.value.span)
            return
        other = self.level(source)
        if other is not INVALID and isinstance(state, ir.Op) and other.state != state:
            self.error("N0124", f"level `{name}` is initialised from `{source}`, whose state differs",
                       init_field.value.span, label=f"{ir.format_value(other.state)} vs {ir.format_value(state)}",
                       help="pretrained initial states copy parameters: both levels need the same state")

    # --- program ---------------------------------------------------------------------------------

    def _build_program(self) -> ir.Program | None:
        train_values = self._section_values("train")
        context = train_values.get("context")
        self._context = None if context is INVALID else context
        model = None
        if "model" in self.sections:
            values = self._section_values("model")
            self._check_model_heads(values.get("dim"), values.get("heads"))
            if INVALID not in values.values():
                model = ir.Model(span=self.sections["model"].name_span, **values)
                self._check_model_uses(model)
        for name, definition in self.definitions.items():
            if definition.kind == "const":
                self._check_const(name, definition)
            elif definition.kind == "block":
                self.block(definition.node.value, f"block `{name}`", (name,))
        level_names = [n for n, d in self.definitions.items() if d.kind == "level"]
        levels = {n: self.level(n) for n in level_names}
        train = ir.Train(span=self.sections["train"].name_span if "train" in self.sections else None,
                         **train_values) if INVALID not in train_values.values() else None
        if model is None and "model" in self.sections:
            return None
        used = self._reachable(model, levels) if model is not None else set(level_names)
        # Only the levels the model runs must fit its context: a library may define others.
        for name, every, context, field in self._chunked_levels:
            if name in used:
                self._check_divides(every, context, field)
        self._check_generation_cycles({n: levels[n] for n in used if levels.get(n) not in (None, INVALID)})
        if model is not None:
            self._check_heads(model, [levels[n] for n in used if levels[n] is not INVALID])
            for name in level_names:
                definition = self.definitions[name]
                if name not in used and name not in self._extended and definition.span \
                        and definition.span.file == self.main_file:
                    self.warning("N0201", f"level `{name}` is never used", definition.span, label="unused level",
                                 help="use it in the model's block, or remove it")
        if train is None or any(levels[n] is INVALID for n in used):
            return None
        ordered = tuple(levels[n] for n in level_names if n in used)
        program = ir.Program(file=self.main_file, levels=ordered, model=model, train=train)
        self._check_named_dimensions(program)
        return program

    def _check_named_dimensions(self, program: ir.Program) -> None:
        """Search values that share a `name` are one dimension: their options must be the same."""
        first: dict[str, object] = {}
        for value in search_values(program):
            if value.name is None:
                continue
            seen = first.setdefault(value.name, value)
            if seen is not value and ir.format_value(seen) != ir.format_value(value):
                self.error("N0119", f"the search dimension `{value.name}` is given different options",
                           value.span, label=ir.format_value(value),
                           secondary=(Label(span=seen.span, message=ir.format_value(seen)),) if seen.span else (),
                           help="values that share a name are one dimension: give them the same options, "
                                "or different names")

    def _check_const(self, name: str, definition: _Definition) -> None:
        expr = self._deref(ast.Name(id=name, span=definition.span))
        if expr is INVALID or not isinstance(expr, (ast.Number, ast.Neg, ast.BinOp)):
            return
        self._arith(expr, f"constant `{name}`")

    def _check_model_heads(self, dim, heads) -> None:
        for width in _options(dim):
            for count in _options(heads):
                if isinstance(width, int) and isinstance(count, int) and width % count:
                    section = self.sections["model"]
                    span = next((f.value.span for f in section.fields if f.key == "heads"), section.name_span)
                    self.error("N0118", f"{count} heads do not divide the model width {width}", span,
                               label=f"{width} / {count} is not whole",
                               help=f"use a number of heads that divides {width}")

    def _check_model_uses(self, model: ir.Model) -> None:
        counts = level_uses(model.block)
        for level, count in counts.items():
            if count > 1:
                first = first_use(model.block, level)
                self.error("N0122", f"level `{level}` is used {count} times in the model's block",
                           first.span if first else model.span, label="each use would share one state",
                           help=f"define a copy: `level {level}_2 extends {level}`")

    def _check_heads(self, model: ir.Model, levels) -> None:
        for level in levels:
            if level.heads is None:
                continue
            for dim in _options(model.dim):
                for heads in _options(level.heads):
                    if isinstance(dim, int) and isinstance(heads, int) and dim % heads:
                        node = self.definitions[level.name].node
                        span = next((f.value.span for f in node.fields if f.key == "heads"), level.span)
                        self.error("N0118", f"{heads} heads do not divide the model width {dim}", span,
                                   label=f"in level `{level.name}`")

    def _reachable(self, model: ir.Model, levels: dict) -> set[str]:
        used: set[str] = set()
        pending = list(block_levels(model.block))
        while pending:
            name = pending.pop()
            if name in used or name not in levels:
                continue
            used.add(name)
            level = levels[name]
            if level is INVALID:
                continue
            pending.extend(generators(level))
            if isinstance(level.init, ir.Op) and level.init.name == "pretrained":
                pending.append(level.init.arg("source"))
        return used

    def _check_generation_cycles(self, levels: dict[str, ir.Level]) -> None:
        import networkx as nx

        graph = nx.DiGraph()
        graph.add_nodes_from(levels)
        for name, level in levels.items():
            for generator in generators(level):
                if generator in levels:
                    graph.add_edge(generator, name)
        for component in nx.strongly_connected_components(graph):
            cyclic = len(component) > 1 or any(graph.has_edge(n, n) for n in component)
            if not cyclic:
                continue
            for name in sorted(component):
                if levels[name].read == "after":
                    members = ", ".join(f"`{n}`" for n in sorted(component))
                    self.error("N0109", f"generation cycle through {members} cannot be executed",
                               levels[name].span, label=f"`{name}` reads after its update",
                               notes=("inside a cycle each level's input at token t is generated by a level that "
                                      "must already be read at t; that is only possible when every level of the "
                                      "cycle reads its state from before the update",),
                               help=f"add `read before` to level `{name}`")


# --- helpers -------------------------------------------------------------------------------------

def _options(value) -> tuple:
    if isinstance(value, ir.Choice):
        return value.options
    return (value,)


def _map_choice(value, function):
    if value is INVALID:
        return INVALID
    if isinstance(value, ir.Choice):
        return ir.Choice(options=tuple(function(v) for v in value.options), name=value.name, span=value.span)
    return function(value)


def _combine(left, right, op: str):
    def apply(a, b):
        if op == "+":
            return a + b
        if op == "-":
            return a - b
        if op == "*":
            return a * b
        result = a / b
        return int(result) if isinstance(a, int) and isinstance(b, int) and result.is_integer() else result

    if isinstance(left, ir.Choice):
        return _map_choice(left, lambda v: apply(v, right))
    if isinstance(right, ir.Choice):
        return _map_choice(right, lambda v: apply(left, v))
    return apply(left, right)


def _option_names(value) -> set[str]:
    """The operator names a value may take: one for an operator, each option's for a choice."""
    return {option.name for option in _options(value) if isinstance(option, ir.Op)}


def _describe(expr) -> str:
    if isinstance(expr, ast.Number):
        return f"the number {expr.text}"
    if isinstance(expr, ast.String):
        return f"the string \"{expr.value}\""
    if isinstance(expr, ast.Name):
        return f"the name `{expr.id}`"
    if isinstance(expr, ast.Call):
        return f"a call of `{expr.func}`"
    if isinstance(expr, ast.ListExpr):
        return "a list"
    if isinstance(expr, ast.Pipe):
        return "a pipeline"
    return "an expression"


def _describe_as_stage(expr) -> str:
    return expr.id if isinstance(expr, ast.Name) else f"{expr.func}(...)"


def _name_span(expr) -> Span | None:
    return expr.func_span if isinstance(expr, ast.Call) else expr.span


def _nearest_divisor(length: int, chunk: int) -> int:
    divisors = [d for d in range(1, length + 1) if length % d == 0]
    return min(divisors, key=lambda d: (abs(d - chunk), d))


def _example(key: str) -> str | None:
    examples = {
        "vocab": "write `vocab 256`", "dim": "write `dim 128`", "block": "write `block = residual(rmsnorm |> mixer)`",
        "every": "write `every 16`", "objective": "write `objective l2`", "optimizer": "write `optimizer gd`",
        "read": "write `read before` or `read after`", "init": "write `init meta`",
    }
    return examples.get(key)

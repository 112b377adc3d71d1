"""Values: numbers, names, search-space values, operators, pipelines, gates and the fields of a
body, each checked against its schema parameter."""

from __future__ import annotations

import dataclasses

from nestc.lang import ast, ir, schema
from nestc.lang.diagnostics import Label, did_you_mean
from nestc.lang.schema import Param
from nestc.lang.sema.blocks import Blocks
from nestc.lang.sema.context import INVALID, Analysis, Part, describe, options
from nestc.lang.source import Span


# The one matrix function of an `update` (its first argument is an expression, bound unevaluated).
NEWTON_SCHULZ = schema.op_spec("update", "newton_schulz", Param("u", "expression"),
                               Param("steps", "int", 5, minimum=1, fixed=True, doc="Newton-Schulz iterations"),
                               doc="the quintic Newton-Schulz orthogonalisation of each weight (Muon, NL eq. 52)")


class Values(Part):
    """Evaluates expressions as values of schema parameters, reporting each mistake at its span."""

    def __init__(self, analysis: Analysis):
        super().__init__(analysis)
        self.blocks = Blocks(analysis, self)  # a block is the value of a `block` field

    def value(self, expr: ast.Expr, param: Param, what: str):
        """Evaluate `expr` as a value of `param`'s type; `what` names it in messages."""
        expr = self.analysis.deref(expr)
        if expr is INVALID:
            return INVALID
        if param.type == "layers":  # a list of the layers' blocks, or else their number
            if _holds_list(self.analysis, expr):
                return self.layer_list(expr, what)
            param = dataclasses.replace(param, type="int")
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
        if kind == "numbers":  # a number, or a list of them (one per head)
            return self.numbers(expr, what) if isinstance(expr, ast.ListExpr) else self.number(expr, param, what)
        if kind == "bias":  # `false`, `true`, or the bias's initial value(s)
            if isinstance(expr, ast.Name) and expr.id in schema.BOOLEANS:
                return schema.BOOLEANS[expr.id]
            return self.numbers(expr, what) if isinstance(expr, ast.ListExpr) else self.number(expr, param, what)
        if kind == "list":
            if not isinstance(expr, ast.ListExpr):
                return self.error("N0105", f"{what} must be a list", expr.span, label="expected [a, b, ...]")
            return tuple(self.number(i, Param("item", "number"), f"an item of {what}") for i in expr.items)
        if kind == "source":
            if param.name in SOURCE_ROLES and _is_gate_arithmetic(self.analysis, expr):
                return self.gate(expr, what)  # an input made from gates: HGRN's key = 1 - forget
            return self.pipeline(expr, what)
        if kind == "gate":
            return self.gate(expr, what)
        if kind == "update":
            return self.analysis.update_value(expr)
        if kind == "outer_update":  # the train section's
            return self.analysis.outer_update_value(expr, param.name)
        if kind == "block":
            return self.blocks.block(expr, what)
        if kind in schema.OP_TABLES:
            return self.op(expr, kind, what)
        raise AssertionError(f"no evaluator for parameter type {kind}")

    def search(self, call: ast.Call, param: Param, what: str):
        if param.fixed:
            return self.error("N0114", f"{what} cannot be a search-space value", call.span,
                              label=f"`{call.func}` is not allowed here",
                              help=f"give {what} one fixed value; search over other fields instead")
        spec = schema.SEARCH[call.func]
        args = self.bind(call, spec, f"`{call.func}`")
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

    def layer_list(self, expr: ast.Expr, what: str):
        """Each layer's block, from a list of blocks, repeated (`* N`) and joined (`+`)."""
        expr = self.analysis.deref(expr)
        if expr is INVALID:
            return INVALID
        if isinstance(expr, ast.ListExpr):
            if not expr.items:
                return self.error("N0107", f"{what} lists no layer", expr.span, label="empty list",
                                  help="give each layer's block: `[mixer_block, ffn_block]`")
            blocks = [self.blocks.block(item, f"a layer of {what}") for item in expr.items]
            return INVALID if INVALID in blocks else tuple(blocks)
        if isinstance(expr, ast.BinOp) and expr.op == "+":
            parts = [self.layer_list(side, what) if _holds_list(self.analysis, side) else
                     self.error("N0105", f"`+` in {what} joins lists of layers", side.span,
                                label=f"found {describe(self.analysis.deref(side))}", help="write `[a] * 3 + [b]`")
                     for side in (expr.left, expr.right)]
            return INVALID if INVALID in parts else parts[0] + parts[1]
        if isinstance(expr, ast.BinOp) and expr.op == "*":
            listed, count = (expr.left, expr.right) if _holds_list(self.analysis, expr.left) else (expr.right, expr.left)
            if _holds_list(self.analysis, count):
                return self.error("N0105", f"`*` in {what} repeats a list of layers a number of times", expr.span,
                                  help="write `[a, b] * 3`")
            times = self.arith(count, f"the repetitions in {what}")
            if isinstance(times, ir.Choice):
                return self.error("N0119", f"the repetitions in {what} cannot be a search-space value yet", count.span,
                                  help="search inside the layers' blocks, or write one spec per number of layers")
            blocks = self.layer_list(listed, what)
            if INVALID in (times, blocks):
                return INVALID
            if not isinstance(times, int) or times < 1:
                return self.error("N0106", f"the repetitions in {what} must be a whole number of at least 1",
                                  count.span, label=f"got {times}")
            return blocks * times
        if isinstance(expr, ast.Call) and expr.func in schema.SEARCH:
            return self.error("N0119", f"a list of layers cannot be a search-space value yet", expr.span,
                              help="search inside the layers' blocks: `[choice(a, b), c]`")
        return self.error("N0105", f"{what} must be a number or a list of blocks", expr.span,
                          label=f"found {describe(expr)}", help="write `layers 4` or `layers = [a, a, b] * 2`")

    def number(self, expr: ast.Expr, param: Param, what: str):
        value = self.arith(expr, what)
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

    def arith(self, expr: ast.Expr, what: str):
        """A number from a literal, a constant or arithmetic; a choice maps through arithmetic."""
        expr = self.analysis.deref(expr)
        if expr is INVALID:
            return INVALID
        if isinstance(expr, ast.Number):
            return expr.value
        if isinstance(expr, ast.Neg):
            inner = self.arith(expr.operand, what)
            if inner is INVALID or self._not_arithmetic(inner, expr):
                return INVALID
            return _map_choice(inner, lambda v: -v)
        if isinstance(expr, ast.BinOp):
            left, right = self.arith(expr.left, what), self.arith(expr.right, what)
            if INVALID in (left, right):
                return INVALID
            if isinstance(left, ir.Choice) and isinstance(right, ir.Choice):
                return self.error("N0119", "arithmetic between two search-space values", expr.span,
                                  help="combine them in one `choice(...)` instead")
            if self._not_arithmetic(left, expr) or self._not_arithmetic(right, expr):
                return INVALID
            if expr.op == "/" and (0 in options(right)):
                return self.error("N0106", "division by zero", expr.span)
            return _combine(left, right, expr.op)
        if isinstance(expr, ast.Call) and expr.func in schema.SEARCH:
            return self.search(expr, Param("value", "number"), what)
        if isinstance(expr, ast.Name):
            return self.unknown_name(expr, what, "a number")
        return self.error("N0105", f"{what} must be a number", expr.span, label=f"found {describe(expr)}")

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
        return self.error("N0105", f"{what} must be `true` or `false`", expr.span, label=f"found {describe(expr)}",
                          help=guess)

    def enum(self, expr: ast.Expr, param: Param, what: str):
        if isinstance(expr, ast.Name) and expr.id in param.choices:
            return expr.id
        if isinstance(expr, ast.Name):
            return self.error("N0101", f"unknown value `{expr.id}` for {what}", expr.span, label="not one of the values",
                              help=did_you_mean(expr.id, param.choices))
        return self.error("N0105", f"{what} must be one of: {', '.join(param.choices)}", expr.span,
                          label=f"found {describe(expr)}")

    def level_name(self, expr: ast.Expr, what: str):
        if isinstance(expr, ast.Name):
            definition = self.definitions.get(expr.id)
            if definition is not None and definition.kind == "level":
                return expr.id
            return self.unknown_name(expr, what, "a level", self.analysis.names("level"))
        return self.error("N0105", f"{what} must name a level", expr.span, label=f"found {describe(expr)}")

    def unknown_name(self, expr: ast.Name, what: str, expected: str, candidates=()):
        definition = self.definitions.get(expr.id)
        if definition is not None:
            return self.error("N0105", f"`{expr.id}` is a {definition.kind}, but {what} must be {expected}",
                              expr.span, label=f"a {definition.kind}",
                              secondary=(Label(span=definition.span, message="defined here"),) if definition.span else ())
        candidates = list(candidates) + self.analysis.names("const")
        return self.error("N0101", f"unknown name `{expr.id}`", expr.span, label="not defined",
                          help=did_you_mean(expr.id, candidates) if candidates else None)

    # --- operators -------------------------------------------------------------------------------

    def bind(self, call: ast.Call, spec: schema.OpSpec, where: str):
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
            if param.type == "expression" or param.type in ("block", "level", "source", "gate") and spec.kind == "block":
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
            return self.error("N0105", f"{what} must be a {word}", expr.span, label=f"found {describe(expr)}",
                              help="one of: " + ", ".join(f"`{n}`" for n in table))
        spec = table.get(name)
        if spec is None:
            return self.error("N0101", f"unknown {word} `{name}`", name_span, label=f"unknown {word}",
                              help=did_you_mean(name, table))
        args = self.bind(call, spec, f"`{name}`")
        if args is INVALID:
            return INVALID
        return ir.Op(name=name, args=tuple((p.name, args[p.name]) for p in spec.params), span=expr.span)

    # --- pipelines and gates ---------------------------------------------------------------------

    def pipeline(self, expr: ast.Expr, what: str):
        stages = list(expr.stages) if isinstance(expr, ast.Pipe) else [expr]
        first = self.analysis.deref(stages[0])
        if first is INVALID:
            return INVALID
        if not (isinstance(first, ast.Name) and first.id == schema.INPUT_NAME):
            if isinstance(first, (ast.BinOp, ast.Neg)):  # `1 - x |> proj` is `(1 - x) |> proj`
                return self.error("N0120", f"{what} must be a pipeline that starts with `x`", stages[0].span,
                                  label="`|>` binds loosest: this arithmetic is the pipeline's start",
                                  help="put the pipeline in parentheses: `1 - (x |> proj |> sigmoid)`")
            return self.error("N0120", f"{what} must be a pipeline that starts with `x`", stages[0].span,
                              label="expected `x`, the level's input",
                              help=f"for example `x |> {_describe_as_stage(first)}`"
                              if isinstance(first, (ast.Name, ast.Call)) else "for example `x |> proj`")
        resolved = [self.stage(s, what) for s in stages[1:]]
        if INVALID in resolved:
            return INVALID
        return ir.Pipeline(stages=tuple(resolved), span=expr.span)

    def stage(self, expr: ast.Expr, what: str):
        expr = self.analysis.deref(expr)
        if expr is INVALID:
            return INVALID
        if isinstance(expr, ast.Call) and expr.func in schema.SEARCH:
            return self._stage_choice(expr, what)
        name = expr.id if isinstance(expr, ast.Name) else expr.func if isinstance(expr, ast.Call) else None
        if name is None:
            return self.error("N0105", f"a stage of {what} must be a name or a call", expr.span,
                              label=f"found {describe(expr)}")
        if name == schema.SELF_NAME or name == self.analysis.current_level:
            if isinstance(expr, ast.Call):
                return self.error("N0105", "a level stage takes no arguments", expr.span)
            return ir.LevelRef(level=self.analysis.current_level, span=expr.span)
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
                          help=did_you_mean(name, list(schema.STAGES) + self.analysis.names("level")))

    def _stage_choice(self, call: ast.Call, what: str):
        if call.func != "choice":
            return self.error("N0119", f"`{call.func}` gives numbers; a stage needs `choice(...)`", call.span)
        bound = self.bind(call, schema.SEARCH["choice"], "`choice`")
        if bound is INVALID:
            return INVALID
        if not bound["*"]:
            return self.error("N0119", "a choice needs at least one option", call.span, label="empty choice")
        options = [self.stage(o, what) for o in bound["*"]]
        if INVALID in options:
            return INVALID
        return ir.Choice(options=tuple(options), name=bound["name"], span=call.span)

    def gate(self, expr: ast.Expr, what: str):
        """A gate: a number (or one per head, `[0.9, 0.99]`), `learned(...)`, a pipeline from `x`,
        a `let` binding of the level, or arithmetic and functions of gates (`1 - g`,
        `exp(-a * b)`)."""
        expr = self.analysis.deref(expr)
        if expr is INVALID:
            return INVALID
        if _numeric_only(self.analysis, expr):
            value = self.number(expr, Param("gate", "number"), what)
            return INVALID if value is INVALID else ir.Constant(value=value, span=expr.span)
        if isinstance(expr, ast.ListExpr):
            values = self.numbers(expr, what)
            return INVALID if values is INVALID else ir.Constant(value=values, span=expr.span)
        if isinstance(expr, ast.BinOp):
            operands = (self.gate(expr.left, what), self.gate(expr.right, what))
            return INVALID if INVALID in operands else ir.GateExpr(op=expr.op, operands=operands, span=expr.span)
        if isinstance(expr, ast.Neg):
            operand = self.gate(expr.operand, what)
            return INVALID if operand is INVALID else ir.GateExpr(op="neg", operands=(operand,), span=expr.span)
        if isinstance(expr, ast.Call) and expr.func in ir.GATE_FUNCTIONS and expr.func != "neg":
            if len(expr.args) != 1 or expr.args[0].name is not None:
                return self.error("N0108", f"`{expr.func}(...)` in {what} takes one gate", expr.span,
                                  help=f"write `{expr.func}(x |> proj)`, or use `|> {expr.func}` as a stage")
            operand = self.gate(expr.args[0].value, what)
            return INVALID if operand is INVALID else ir.GateExpr(op=expr.func, operands=(operand,), span=expr.span)
        if isinstance(expr, ast.Call) and expr.func in schema.GATE_SOURCES:
            spec = schema.GATE_SOURCES[expr.func]
            args = self.bind(expr, spec, f"`{expr.func}`")
            if args is INVALID:
                return INVALID
            return ir.Op(name=expr.func, args=tuple((p.name, args[p.name]) for p in spec.params), span=expr.span)
        if isinstance(expr, ast.Name) and expr.id in schema.GATE_SOURCES:
            return ir.Op(name=expr.id, args=tuple((p.name, p.default) for p in schema.GATE_SOURCES[expr.id].params),
                         span=expr.span)
        if isinstance(expr, ast.Name) and expr.id in self.analysis.bindings:
            return ir.LetRef(name=expr.id, span=expr.span)
        if isinstance(expr, ast.Name) and expr.id in self.analysis.stream_names:
            return ir.StreamRef(name=expr.id, span=expr.span)
        if self.analysis.optimizer_level is not None:
            if isinstance(expr, ast.Name) and expr.id in self.analysis.names("level"):
                return self.analysis.optimizer_level(expr)
            if isinstance(expr, ast.Call) and expr.func == "newton_schulz":
                return self.newton_schulz(expr, what)
            if isinstance(expr, ast.Call) and expr.func in ir.STREAM_FUNCTIONS:
                return self.stream_function(expr, what)
        if isinstance(expr, ast.Pipe) or (isinstance(expr, ast.Name) and expr.id == schema.INPUT_NAME):
            return self.pipeline(expr, what)
        if isinstance(expr, ast.Name):
            return self.error("N0101", f"unknown name `{expr.id}` in {what}", expr.span, label="not defined",
                              help=did_you_mean(expr.id, ["learned", "x"] + list(self.analysis.bindings)
                                                + self.analysis.names("const"))
                              or "a gate is a number, `learned(...)` or a pipeline such as `x |> proj |> sigmoid`")
        return self.error("N0105", f"{what} must be a number, `learned(...)`, a pipeline from `x` or arithmetic "
                          "on gates", expr.span, label=f"found {describe(expr)}")

    def stream_function(self, call: ast.Call, what: str):
        """`max(a, b)` or `pow(a, b)` in an `update` or an optimizer level's input."""
        if len(call.args) != 2 or any(arg.name is not None for arg in call.args):
            return self.error("N0108", f"`{call.func}(...)` in {what} takes two values", call.span,
                              help=f"for example `{call.func}(1, rows / cols)`" if call.func == "max"
                              else "for example `pow(0.9, step)`")
        operands = tuple(self.gate(arg.value, what) for arg in call.args)
        return INVALID if INVALID in operands else ir.GateExpr(op=call.func, operands=operands, span=call.span)

    def newton_schulz(self, call: ast.Call, what: str):
        """`newton_schulz(u, steps=5)` in an `update`: Muon's orthogonalisation of u."""
        args = self.bind(call, NEWTON_SCHULZ, "`newton_schulz`")
        if args is INVALID:
            return INVALID
        operand = self.gate(args["u"], what)
        return INVALID if operand is INVALID else ir.NewtonSchulz(operand=operand, steps=args["steps"],
                                                                  span=call.span)

    def numbers(self, expr: ast.ListExpr, what: str):
        """A list of numbers (one per head): at least one."""
        if not expr.items:
            return self.error("N0107", f"{what} lists no number", expr.span, label="empty list")
        values = tuple(self.number(item, Param("item", "number"), f"an item of {what}") for item in expr.items)
        if INVALID in values:
            return INVALID
        if any(isinstance(value, ir.SEARCH_TYPES) for value in values):
            return self.error("N0119", f"the items of {what} cannot be search-space values yet", expr.span,
                              help="search over the whole gate instead: `choice(0.9, [0.9, 0.99])`")
        return values

    # --- sections --------------------------------------------------------------------------------

    def fields(self, fields: tuple[ast.Field, ...], table: dict[str, Param], where: str) -> dict[str, ast.Field]:
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

    def field_value(self, f: ast.Field, param: Param, where: str):
        if f.unit is not None and param.type != "frequency":
            return self.error("N0125", f"unexpected `{f.unit}` after the value of `{f.key}`", f.unit_span,
                              label="only `every N tokens|steps` takes a unit")
        if f.value is None:
            if param.type == "bool":
                return True
            return self.error("N0015", f"`{f.key}` needs a value", f.key_span, label="missing value",
                              help=_example(f.key))
        return self.value(f.value, param, f"`{f.key}`")

    def section_values(self, name: str) -> dict[str, object]:
        table = schema.SECTIONS[name]
        section = self.sections.get(name)
        given = self.fields(section.fields, table, f"`{name}`") if section else {}
        values: dict[str, object] = {}
        for key, param in table.items():
            if key in given:
                values[key] = self.field_value(given[key], param, f"`{name}`")
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

    def default_op(self, kind: str, name: str) -> ir.Op:
        spec = schema.OP_TABLES[kind][name]
        return ir.Op(name=name, args=tuple((p.name, p.default) for p in spec.params))


# --- helpers -------------------------------------------------------------------------------------

def _map_choice(value, function):
    if value is INVALID:
        return INVALID
    if isinstance(value, ir.Choice):
        return ir.Choice(options=tuple(function(v) for v in value.options), name=value.name, span=value.span)
    return function(value)


def _combine(left, right, op: str):
    def apply(a, b):
        result = ir.ARITHMETIC[op](a, b)
        # a whole quotient of integers stays an integer (`dim / 4` is a width)
        return int(result) if op == "/" and isinstance(a, int) and isinstance(b, int) and result.is_integer() else result

    if isinstance(left, ir.Choice):
        return _map_choice(left, lambda v: apply(v, right))
    if isinstance(right, ir.Choice):
        return _map_choice(right, lambda v: apply(left, v))
    return apply(left, right)


SOURCE_ROLES = ("key", "value", "query")  # inputs that may also be gate arithmetic


def _is_gate_arithmetic(analysis: Analysis, expr: ast.Expr) -> bool:
    """Whether an input is written as gate arithmetic (a number, a list, an operator, a gate
    function, `learned(...)` or a `let` binding) rather than as a pipeline from `x`."""
    if isinstance(expr, (ast.Number, ast.ListExpr, ast.BinOp, ast.Neg)):
        return True
    if isinstance(expr, ast.Call):  # `exp(g)` with one positional gate, not a stage call
        return (expr.func in ir.GATE_FUNCTIONS and len(expr.args) == 1 and expr.args[0].name is None) \
            or expr.func in schema.GATE_SOURCES
    return isinstance(expr, ast.Name) and expr.id in analysis.bindings


def _numeric_only(analysis: Analysis, expr: ast.Expr) -> bool:
    """Whether an expression is arithmetic on numbers, constants and search values only (a
    plain number, folded to one value), rather than on gates."""
    seen: set[str] = set()
    while isinstance(expr, ast.Name) and expr.id not in seen:
        definition = analysis.definitions.get(expr.id)
        if definition is None or definition.kind != "const" or expr.id in analysis.bindings:
            break
        seen.add(expr.id)
        expr = definition.node.value
    if isinstance(expr, ast.Number):
        return True
    if isinstance(expr, ast.Neg):
        return _numeric_only(analysis, expr.operand)
    if isinstance(expr, ast.BinOp):
        return _numeric_only(analysis, expr.left) and _numeric_only(analysis, expr.right)
    return isinstance(expr, ast.Call) and expr.func in schema.SEARCH and expr.func != "choice" or (
        isinstance(expr, ast.Call) and expr.func == "choice"
        and all(_numeric_only(analysis, arg.value) for arg in expr.args if arg.name is None))


def _holds_list(analysis: Analysis, expr: ast.Expr) -> bool:
    """Whether an expression is made of lists (a list, or lists repeated and joined). Constants
    are looked through without reporting (their own checks report a cycle once)."""
    seen: set[str] = set()
    while isinstance(expr, ast.Name) and expr.id not in seen:
        definition = analysis.definitions.get(expr.id)
        if definition is None or definition.kind != "const":
            break
        seen.add(expr.id)
        expr = definition.node.value
    if isinstance(expr, ast.ListExpr):
        return True
    if isinstance(expr, ast.BinOp) and expr.op in "+*":
        return _holds_list(analysis, expr.left) or _holds_list(analysis, expr.right)
    if isinstance(expr, ast.Call) and expr.func in schema.SEARCH:
        return any(_holds_list(analysis, arg.value) for arg in expr.args)
    return False


def _describe_as_stage(expr) -> str:
    return expr.id if isinstance(expr, ast.Name) else f"{expr.func}(...)"


def _name_span(expr) -> Span | None:
    return expr.func_span if isinstance(expr, ast.Call) else expr.span


def _example(key: str) -> str | None:
    examples = {
        "vocab": "write `vocab 256`", "dim": "write `dim 128`", "block": "write `block = residual(rmsnorm |> mixer)`",
        "every": "write `every 16`", "objective": "write `objective l2`", "optimizer": "write `optimizer gd`",
        "read": "write `read before` or `read after`", "init": "write `init meta`",
    }
    return examples.get(key)

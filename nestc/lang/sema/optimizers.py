"""Optimizers written as levels (SEMANTICS §3, "Optimizers are levels"; NL §4): an optimizer
level (state `moment`) is a memory of the gradient stream of the level that names it, and a
level's `update` is the expression its retained weight gains each token.

    level mom : moment { value = -grad; retain = 0.9 }     # m_t = 0.9 m_{t-1} - lr_t g_t
    level lmm : mlp { optimizer gd; update = mom }          # W_t = retain_t W_{t-1} + m_t

The train section's `update` (and `matrix_update`) is the outer optimizer's step written the
same way (SEMANTICS §8): `optimizer gd(lr=...)` and `update = EXPR` on each parameter's gradient
stream, whose optimizer levels may move `every N steps`.

This module checks both and builds them into the IR: an optimizer level becomes an `ir.Level`
(state `moment`, or a memory state for a memory of the gradient's rows), embedded in the
`ir.Update` of each level (or train field) that names it."""

from __future__ import annotations

import contextlib

from nestc import rules
from nestc.lang import ast, ir, schema
from nestc.lang.diagnostics import Label
from nestc.lang.queries import delta_extras, per_channel
from nestc.lang.sema.context import INVALID, Part

# The fields of an optimizer level whose state is a memory of rows, and its initial states.
DEEP_FIELDS = frozenset({"key", "value", "query", "lr", "retain", "objective", "init"})
MEMORY_INITS = ("zero", "meta")
# What an expression of the gradient stream may hold (a level's gates are pipelines of x instead).
_STREAM_NODES = (ir.Constant, ir.GateExpr, ir.StreamRef, ir.OptimizerRef, ir.NewtonSchulz)
EVERY_STEP = ir.Frequency(tokens=1, steps=1)  # an optimizer level moves with each step of its stream


def is_optimizer_state(state) -> bool:
    return isinstance(state, ir.Op) and rules.STATES[state.name].optimizer_state


def is_optimizer_level(level: ir.Level) -> bool:
    """A buffer of the gradient stream (state `moment`), or a memory whose inputs read it."""
    return is_optimizer_state(level.state) or any(
        isinstance(node, ir.StreamRef) for role in ("key", "value", "query") if getattr(level, role) is not None
        for node in ir.walk(getattr(level, role)))


def reads_stream(analysis, fields: dict[str, ast.Field]) -> bool:
    """Whether a level's key, value or query names the gradient stream (`grad`, `param`): then it
    is an optimizer level, whatever its state (a deep momentum's MLP, NL eq. 50)."""
    def names(expr) -> bool:
        expr = analysis.deref(expr)
        if isinstance(expr, ast.Name):
            return expr.id in ir.STREAM_NAMES
        return any(names(child) for child in _ast_children(expr))

    return any(names(fields[role].value) for role in ("key", "value", "query")
               if role in fields and fields[role].value is not None)


def _ast_children(expr) -> list:
    if isinstance(expr, ast.Call):
        return [arg.value for arg in expr.args]
    if isinstance(expr, ast.Pipe):
        return list(expr.stages)
    if isinstance(expr, ast.BinOp):
        return [expr.left, expr.right]
    if isinstance(expr, ast.Neg):
        return [expr.operand]
    if isinstance(expr, ast.ListExpr):
        return list(expr.items)
    return []


def reads_key(objective: ir.Op) -> bool:
    """Whether an optimizer level's objective reads a key: the delta rule's (l2), m key^T = value I."""
    return rules.OBJECTIVES[objective.name].delta_rule


class OptimizerLevels(Part):
    """Builds optimizer levels and `update` fields; `levels` is the Levels part (a level named in
    an `update` is built, once, as any other level is)."""

    def __init__(self, analysis, values, levels):
        super().__init__(analysis)
        self.values = values
        self.levels = levels
        self.named: set[str] = set()  # optimizer levels some `update` names (so they count as used)
        self._building: list[str] = []  # optimizer levels being built, innermost last (a cycle check)

    # --- an optimizer level ---------------------------------------------------------------------

    def optimizer_level(self, name: str, node: ast.LevelDef, state: ir.Op, fields: dict[str, ast.Field]):
        self._building.append(name)
        try:
            return self._optimizer_level(name, node, state, fields)
        finally:
            self._building.pop()

    def _optimizer_level(self, name: str, node: ast.LevelDef, state: ir.Op, fields: dict[str, ast.Field]):
        where = f"optimizer level `{name}`"
        buffer = is_optimizer_state(state)
        allowed = rules.STATES[state.name].fields if buffer else DEEP_FIELDS
        for key in sorted(set(fields) - allowed):
            self.error("N0117", f"`{key}` has no meaning for an optimizer level", fields[key].key_span,
                       label="not a field of an optimizer level",
                       notes=("an optimizer level is a memory of the gradients of the level whose `update` names it: "
                              "a buffer (state `moment`) takes `value`, `key`, `objective`, `lr` and `retain` (and, "
                              "on the outer stream, `every N steps`), a memory of another state also `query` and "
                              "`init`; each steps with each gradient by gradient descent on its objective",))
        if not buffer:
            return self._deep_level(name, node, state, fields, where)
        if "let " in " ".join(fields):
            binding = next(f for key, f in fields.items() if key.startswith("let "))
            self.error("N0117", "`let` has no meaning for an optimizer level", binding.key_span,
                       label="not a field of an optimizer level", help="write the gates out without the binding")
        objective = self.values.field_value(fields["objective"], schema.LEVEL_FIELDS["objective"], where) \
            if "objective" in fields else ir.Op(name="dot", args=())
        if objective is not INVALID and (not isinstance(objective, ir.Op)
                                         or state.name not in rules.OBJECTIVES[objective.name].states):
            self.error("N0117", "an optimizer level learns by `dot` or `l2`", fields["objective"].value.span,
                       label="not an objective of an optimizer level",
                       notes=("`dot`: l = -<m, value>, so m_t = retain m_{t-1} + lr value (momentum, NL eq. 33); "
                              "`l2`: l = 1/2 ||m key^T - value I||^2 (delta momentum, NL eqs. 48-49)",))
            objective = INVALID
        gates = self._gates(fields, where)
        # an objective with a key (l2) learns m key^T = value I; one without (dot), m = value
        delta = objective is not INVALID and reads_key(objective)
        value = self._stream_input(fields.get("value"), where, "value", number_only=delta)
        key = self._stream_input(fields.get("key"), where, "key") if "key" in fields else None
        if key is not None and not delta and objective is not INVALID:
            self.error("N0117", "a `dot` optimizer level reads no key", fields["key"].key_span,
                       label="no key here", help="remove the key, or write `objective l2`")
        every = self._every(fields.get("every"), name)
        if INVALID in (objective, value, key, every) or INVALID in gates.values():
            return INVALID
        return ir.Level(
            name=name, state=state,
            key=(key or ir.StreamRef(name="grad")) if delta else None,
            value=value or ir.GateExpr(op="neg", operands=(ir.StreamRef(name="grad"),)),
            query=None, lr=gates.get("lr"), retain=gates.get("retain") or ir.Constant(value=1.0), momentum=None,
            erase=None, write=None, gamma=None, threshold=None, objective=objective,
            optimizer=ir.Op(name="gd", args=(("implicit", False),)), order=None, output=ir.Op(name="none"),
            every=every, read="after", init=ir.Op(name="zero"), meta=None, heads=None, span=node.name_span)

    def _every(self, f: ast.Field | None, name: str):
        """`every N steps`: the level moves once every N of the outer optimizer's steps, by the
        sum of their steps; only the train section's update may read such a level (`update`
        refuses it)."""
        if f is None:
            return EVERY_STEP
        every = self.levels.frequency(f, False, None, name)
        if every is INVALID:
            return INVALID
        if every.tokens != 0:
            return self.error("N0117", f"optimizer level `{name}` moves with the gradient stream it serves",
                              f.span, label="a period in tokens",
                              notes=("an optimizer level steps with each gradient of the level it serves; on the "
                                     "outer stream (the train section's update) it may move `every N steps`, "
                                     "with the sum of their gradients (M3's slow momentum, NL Alg. 1)",),
                              help="write `every N steps` and name the level in the train section's update")
        return EVERY_STEP if every.steps == 1 else every

    def _deep_level(self, name: str, node: ast.LevelDef, state: ir.Op, fields: dict[str, ast.Field], where: str):
        """An optimizer level whose state is a memory (matrix, mlp, ...): each row of its key, value
        and query, expressions of the gradient stream shaped like the served weight, is one pair
        and one read; it maps a row of the weight (its input side) to another (NL eq. 50)."""
        rule = rules.STATES[state.name]
        if not rule.memory or rule.diagonal:
            return self.error("N0117", f"an optimizer level's state is `moment` or a memory of rows, not `{state.name}`",
                              node.state.span, label="not a state of an optimizer level",
                              help="use `moment`, `matrix` or `mlp(...)`")
        objective = self.values.field_value(fields["objective"], schema.LEVEL_FIELDS["objective"], where) \
            if "objective" in fields else ir.Op(name="dot", args=())
        if objective is not INVALID and (not isinstance(objective, ir.Op)
                                         or state.name not in rules.OBJECTIVES[objective.name].states
                                         or rules.OBJECTIVES[objective.name].continuum
                                         or rules.OBJECTIVES[objective.name].windowed
                                         or rules.OBJECTIVES[objective.name].gates):
            self.error("N0117", "this objective has no meaning for an optimizer level", fields["objective"].value.span,
                       label="not an objective of a memory of gradients",
                       help="use `dot`, `l2`, `lp`, `huber` or `cosine`")
            objective = INVALID
        gates = self._gates(fields, where)
        inputs = {role: self._stream_input(fields.get(role), where, role) for role in ("key", "value", "query")}
        init = self.values.field_value(fields["init"], schema.LEVEL_FIELDS["init"], where) if "init" in fields \
            else ir.Op(name=rule.default_init, args=())
        if init is not INVALID and (not isinstance(init, ir.Op) or init.name not in MEMORY_INITS):
            self.error("N0117", "an optimizer level starts at zero or at a learned state (`init meta`)",
                       fields["init"].value.span, label="not an initial state of an optimizer level")
            init = INVALID
        if INVALID in (objective, init) or INVALID in gates.values() or INVALID in inputs.values():
            return INVALID
        grad = ir.StreamRef(name="grad")
        return ir.Level(
            name=name, state=state, key=inputs["key"] or grad,
            value=inputs["value"] or ir.GateExpr(op="neg", operands=(grad,)), query=inputs["query"] or grad,
            lr=gates.get("lr"), retain=gates.get("retain") or ir.Constant(value=1.0), momentum=None,
            erase=None, write=None, gamma=None, threshold=None, objective=objective,
            optimizer=ir.Op(name="gd", args=(("implicit", False),)), order=None, output=ir.Op(name="none"),
            every=ir.Frequency(tokens=1, steps=1), read="after", init=init, meta=None, heads=None,
            span=node.name_span)

    def _gates(self, fields: dict[str, ast.Field], where: str) -> dict:
        """An optimizer level's lr and retain: gates of x, one value per head."""
        gates = {}
        for role in ("lr", "retain"):
            if role not in fields:
                continue
            gate = self.values.field_value(fields[role], schema.LEVEL_FIELDS[role], where)
            if gate is not INVALID and per_channel(gate):
                self.error("N0117", f"the {role} of an optimizer level is one value per head",
                           fields[role].value.span, label="per channel here", help="drop `per=channel` from this gate")
                gate = INVALID
            gates[role] = gate
        return gates

    def _stream_input(self, f: ast.Field | None, where: str, role: str, number_only: bool = False):
        """An optimizer level's key or value: arithmetic on `grad`, `param` and numbers (`l2`'s
        value: a number, the P of m key^T = P I)."""
        if f is None:
            return None
        with self._reading(ir.STREAM_NAMES, self._read):
            value = self.values.gate(f.value, f"the {role} of {where}")
        if value is INVALID:
            return INVALID
        allowed = (ir.Constant, ir.GateExpr) if number_only else _STREAM_NODES
        stray = next((n for n in ir.walk(value) if not isinstance(n, allowed)), None)
        if stray is not None:
            if number_only:
                return self.error("N0105", f"with `objective l2` the value of {where} is a number", f.value.span,
                                  label="not a number", notes=("m learns m key^T = value * I: the value is the P of "
                                                               "NL eq. 48, one number",))
            return self.error("N0105", f"the {role} of {where} is arithmetic on `grad`, `param` and numbers",
                              stray.span or f.value.span, label=f"found {ir.format_value(stray)}",
                              notes=("an optimizer level learns from the gradient stream of the level it serves: "
                                     "`grad` is that level's gradient, `param` its weight",),
                              help="for example `value = -grad`")
        return value

    @contextlib.contextmanager
    def _reading(self, names: tuple[str, ...], reader):
        """Expressions read inside see the stream `names` and read level names with `reader`
        (None: as gates do); what was there before is back after (a level named in an update may
        be built while the update is read)."""
        analysis = self.analysis
        before = analysis.stream_names, analysis.optimizer_level
        analysis.stream_names, analysis.optimizer_level = names, reader
        try:
            yield
        finally:
            analysis.stream_names, analysis.optimizer_level = before

    # --- a level's update -----------------------------------------------------------------------

    def _read(self, name_expr: ast.Name):
        """A level named in an `update` or in an optimizer level's input: another optimizer level."""
        if name_expr.id in self._building:
            chain = " -> ".join(self._building[self._building.index(name_expr.id):] + [name_expr.id])
            return self.error("N0121", f"optimizer level `{name_expr.id}` reads itself", name_expr.span,
                              label="read here", notes=(f"the chain: {chain}",
                                                        "each optimizer level steps after the ones it reads"))
        with self._reading((), None):  # the level's own fields are read in its own context
            level = self.levels.level(name_expr.id)
        if level is INVALID:
            return INVALID
        if not is_optimizer_level(level):
            return self.error("N0105", f"level `{name_expr.id}` is not an optimizer level", name_expr.span,
                              label=f"a `{level.state.name}` level of x",
                              notes=("an `update` reads optimizer levels: memories of the level's gradients (state "
                                     "`moment`, or a memory whose key, value and query read `grad`)",))
        return ir.OptimizerRef(level=name_expr.id, span=name_expr.span)

    def update(self, expr: ast.Expr):
        """The `update` of the level being built: its expression, with the optimizer levels it
        reads (and those they read), each after the ones it reads."""
        served = self.analysis.current_level
        update = self._update(expr, f"the update of level `{served}`", ir.UPDATE_NAMES)
        if update is INVALID:
            return INVALID
        slow = next((level for level in update.levels if level.every != EVERY_STEP), None)
        if slow is not None:
            return self.error("N0117", f"optimizer level `{slow.name}` moves `every "
                              f"{ir.format_value(slow.every.steps)} steps`, but level `{served}` updates in-sequence",
                              slow.every.span, label="a period of the outer optimizer",
                              secondary=(Label(span=expr.span, message=f"named in the update of `{served}`"),),
                              notes=("`every N steps` counts the outer optimizer's steps: an optimizer level of a "
                                     "level's update steps with each of its gradients, token by token",),
                              help="remove `every`, or name the level in the train section's update")
        return update

    def outer_update(self, expr: ast.Expr, key: str):
        """The train section's `update` or `matrix_update` (`key`): an update of each parameter
        (of each weight matrix) from its gradient stream (SEMANTICS §8)."""
        matrices = key == "matrix_update"
        # `update` reads a matrix's names too, so that a misplaced one is told where it belongs
        update = self._update(expr, f"the train section's `{key}`", ir.MATRIX_UPDATE_NAMES,
                              ir.MATRIX_UPDATE_NAMES if matrices else ir.OUTER_UPDATE_NAMES)
        if update is INVALID:
            return INVALID
        rows = next((level for level in update.levels if not is_optimizer_state(level.state)), None)
        if rows is not None:
            return self.error("N0105", f"optimizer level `{rows.name}` of the train section's `{key}` is a "
                              f"`{rows.state.name}` memory of rows", rows.span or expr.span,
                              label="not a buffer", secondary=(Label(span=expr.span, message=f"the {key}"),),
                              notes=("the outer optimizer's levels are buffers shaped like each parameter (state "
                                     "`moment`); memories of a weight's rows serve the in-sequence updates",),
                              help="use a `moment` level here")
        parts = [(f"the train section's `{key}`", update.expression)] + [
            (f"optimizer level `{level.name}` of the train section's `{key}`", part) for level in update.levels
            for part in (level.key, level.value, level.lr, level.retain) if part is not None]
        for where, part in parts:
            for node in ir.walk(part):
                problem = self._outer_problem(node, matrices)
                if problem is not None:
                    label, note, help = problem
                    return self.error("N0105", f"{where} cannot hold {label}",
                                      node.span or expr.span, label=label,
                                      secondary=(Label(span=expr.span, message=f"the {key}"),)
                                      if node.span is not None and node.span != expr.span else (),
                                      notes=(note,), help=help)
        return update

    @staticmethod
    def _outer_problem(node: ir.Node, matrices: bool) -> tuple[str, str, str] | None:
        """What an expression of the outer stream cannot hold: (label, note, help), or None."""
        if isinstance(node, (ir.Pipeline, ir.Op, ir.LetRef)):
            return ("a gate of x",
                    "the outer optimizer steps once per batch: no token's x reaches it",
                    "give the optimizer level's lr and retain as numbers")
        if isinstance(node, ir.Constant) and isinstance(node.value, tuple):
            return ("one value per head", "the outer optimizer updates whole parameters, which have no heads",
                    "give one number")
        if not matrices and isinstance(node, ir.NewtonSchulz):
            return ("newton_schulz(...)", "Newton-Schulz orthogonalises a weight matrix, and `update` also steps "
                    "the embeddings, gains and biases", "write it in `matrix_update`, which steps the weight "
                    "matrices (2-D parameters but the embeddings)")
        if not matrices and isinstance(node, ir.StreamRef) and node.name in ("rows", "cols"):
            return (f"`{node.name}`", "`rows` and `cols` are a weight matrix's shape",
                    "write it in `matrix_update`, which steps the weight matrices")
        return None

    def check_outer(self, optimizer, fields: dict[str, ast.Field]) -> None:
        """An outer `update` replaces the step of `optimizer gd`, which has no other."""
        given = [fields[key] for key in ir.OUTER_UPDATES if key in fields]
        takes_update = isinstance(optimizer, ir.Op) and optimizer.name == schema.OUTER_TAKES_UPDATE
        if not given or optimizer is INVALID or takes_update:
            return
        where = fields["optimizer"].value.span if "optimizer" in fields else given[0].key_span
        name = f"optimizer `{ir.format_value(optimizer)}`" if isinstance(optimizer, ir.Op) else "a choice of optimizers"
        self.error("N0117", f"`{given[0].key}` has no meaning with {name}", where,
                   label="keeps its own step", secondary=(Label(span=given[0].key_span, message="the update"),),
                   notes=("the train section's update replaces the step -lr * grad of `optimizer gd`; AdamW, "
                          "Muon and M3 written as levels are in specs/lib/outer_optimizers.nest",),
                   help="write `optimizer gd(lr=...)`" + (" (the default optimizer is adamw)"
                                                         if "optimizer" not in fields else ""))

    def _update(self, expr: ast.Expr, what: str, names: tuple[str, ...], meant: tuple[str, ...] | None = None):
        """An update expression reading `names` (of which `meant` are its own, where it reads more)
        and optimizer levels, with the optimizer levels it reads (and those they read), each after
        the ones it reads."""
        with self._reading(names, self._read):
            expression = self.values.gate(expr, what)
        if expression is INVALID:
            return INVALID
        stray = next((n for n in ir.walk(expression) if not isinstance(n, _STREAM_NODES)), None)
        if stray is not None:
            listed = ", ".join(f"`{name}`" for name in meant or names)
            return self.error("N0105", f"{what} is arithmetic on {listed}, numbers and optimizer levels",
                              stray.span or expr.span, label=f"found {ir.format_value(stray)}",
                              notes=("a gate of x belongs in an optimizer level's `lr` or `retain`",))
        ordered: list[str] = []

        def visit(node: ir.Node) -> None:  # depth first: the levels a level reads come before it
            for ref in (n for n in ir.walk(node) if isinstance(n, ir.OptimizerRef)):
                if ref.level not in ordered:
                    level = self.levels.level(ref.level)
                    for part in (level.key, level.value, level.query):
                        if part is not None:
                            visit(part)
                    if ref.level not in ordered:
                        ordered.append(ref.level)

        visit(expression)
        self.named.update(ordered)
        return ir.Update(expression=expression, levels=tuple(self.levels.level(n) for n in ordered), span=expr.span)

    def check_served(self, level: ir.Level, fields: dict[str, ast.Field], parametric: bool, task: bool) -> None:
        """The level an `update` belongs to: a memory stepping by gd or dgd, nothing else that
        replaces its step."""
        span = fields["update"].key_span
        if not parametric or task:
            self.error("N0117", "`update` has no meaning for " + ("a level trained on the task loss" if task
                                                                  else f"a `{level.state.name}` level"), span,
                       label="no inner step here",
                       notes=("an `update` replaces the step -lr * grad of a memory level's inner optimizer",))
            return
        optimizer = level.optimizer
        if isinstance(optimizer, ir.Op) and not rules.OPTIMIZERS[optimizer.name].takes_update:
            self.error("N0117", f"`update` has no meaning with optimizer `{optimizer.name}`",
                       fields.get("optimizer", fields["update"]).key_span, label="keeps its own step",
                       notes=("the update replaces the step of `gd` (W = retain W + update) or of `dgd` "
                              "(W = W (retain I - lr u u^T) + update); momentum and Muon are optimizer levels "
                              "in that update (specs/lib/optimizers.nest)",),
                       help="write `optimizer gd` (or `dgd`) and the momentum as a level")
        if per_channel(level.lr, level.lets):
            self.error("N0117", "with `update` the lr is one value per head", fields["lr"].value.span,
                       label="per channel here",
                       notes=("the lr reaches the optimizer levels and the update, which broadcast it over each "
                              "weight of a head",), help="drop `per=channel` from this gate")
        extras = delta_extras(level)
        if extras:
            self.error("N0117", f"`update` has no meaning with {', '.join(extras)}", span,
                       label="the generalised delta rule has its own step",
                       notes=("erase, write, write_key, substeps and gd(implicit=true) are parts of the online delta "
                              "rule",))

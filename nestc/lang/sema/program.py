"""The program: the model and train sections, and the checks that need the whole program (which
levels the model uses, heads, chunk sizes, generation cycles, search dimensions)."""

from __future__ import annotations

import math

from nestc import rules
from nestc.lang import ast, ir
from nestc.lang.diagnostics import Label
from nestc.lang.queries import (GATE_ROLES, first_use, generators, is_memory, level_uses, model_levels, model_nodes,
                                reachable_levels, search_values)
from nestc.lang.sema.context import INVALID, Analysis, Definition, Part, options
from nestc.lang.sema.levels import Levels
from nestc.lang.sema.optimizers import is_optimizer_level
from nestc.lang.sema.values import Values


class ProgramBuilder(Part):
    """Builds the program from the sections and definitions, then checks it as a whole."""

    def __init__(self, analysis: Analysis):
        super().__init__(analysis)
        self.values = Values(analysis)
        self.blocks = self.values.blocks
        self.levels = Levels(analysis, self.values)

    def build(self) -> ir.Program | None:
        train_values = self.values.section_values("train")
        if "train" in self.sections:
            self.levels.optimizers.check_outer(train_values["optimizer"],
                                               {f.key: f for f in self.sections["train"].fields})
        context = train_values.get("context")
        self.analysis.train_context = None if context is INVALID else context
        model = None
        if "model" in self.sections:
            values = self.values.section_values("model")
            self._check_model_heads(values.get("dim"), values.get("heads"))
            values = self._layer_blocks(values)
            if INVALID not in values.values():
                model = ir.Model(span=self.sections["model"].name_span, **values)
                self._check_model_uses(model)
        for name, definition in self.definitions.items():
            if definition.kind == "const":
                self._check_const(name, definition)
            elif definition.kind == "block":
                self.blocks.block(definition.node.value, f"block `{name}`", (name,))
        level_names = [n for n, d in self.definitions.items() if d.kind == "level"]
        levels = {n: self.levels.level(n) for n in level_names}
        self.levels.check_pretrained()
        train = ir.Train(span=self.sections["train"].name_span if "train" in self.sections else None,
                         **train_values) if INVALID not in train_values.values() else None
        if model is None and "model" in self.sections:
            return None
        used = reachable_levels(levels, model_levels(model)) if model is not None else set(level_names)
        if model is not None:
            self._check_no_optimizer_blocks(model, levels)
        # Only the levels the model runs must fit its context: a library may define others.
        for name, every, context, field in self.levels.chunked:
            if name in used:
                self._check_divides(every, context, field)
        self._check_generation_cycles({n: levels[n] for n in used if levels.get(n) not in (None, INVALID)})
        if model is not None:
            self._check_heads(model, [levels[n] for n in used if levels[n] is not INVALID])
            self._check_memory_as_context(model, levels)
            for name in level_names:
                definition = self.definitions[name]
                if name not in used and name not in self.levels.extended and name not in self.levels.optimizers.named \
                        and definition.span \
                        and definition.span.file == self.analysis.main_file:
                    self.warning("N0201", f"level `{name}` is never used", definition.span, label="unused level",
                                 help="use it in the model's block, or remove it")
        if train is None or any(levels[n] is INVALID for n in used):
            return None
        ordered = tuple(levels[n] for n in level_names if n in used)
        program = ir.Program(file=self.analysis.main_file, levels=ordered, model=model, train=train)
        self._check_named_dimensions(program)
        return program

    def _check_no_optimizer_blocks(self, model: ir.Model, levels: dict) -> None:
        """An optimizer level is stepped by the level whose `update` names it, never as a block."""
        for name in dict.fromkeys(model_levels(model)):
            level = levels.get(name)
            if isinstance(level, ir.Level) and is_optimizer_level(level):
                use = next(first_use(block, name) for block in model.blocks() if first_use(block, name) is not None)
                self.error("N0105", f"optimizer level `{name}` is not a block", use.span,
                           label="an optimizer level here",
                           notes=("an optimizer level learns from another level's gradients",),
                           help=f"name it in a memory level's update: `update = {name}`")

    def _layer_blocks(self, values: dict) -> dict:
        """Either one block that every layer repeats (`layers N`, `block = ...`) or a list with
        each layer's block (`layers = [a, a, b] * 2`, no `block`)."""
        fields = {f.key: f for f in self.sections["model"].fields}
        if isinstance(values["layers"], tuple):
            if "block" in fields:
                return {**values, "block": self.error(
                    "N0116", "the layers' blocks are given twice: by `block` and by the list in `layers`",
                    fields["block"].key_span, secondary=(Label(span=fields["layers"].value.span,
                                                              message="each layer's block"),),
                    help="remove `block`, or write `layers N` to repeat it")}
            pattern = values["layers"]
            if len(set(pattern)) == 1:  # one block repeated: the same program as `layers N`
                return {**values, "layers": len(pattern), "block": pattern[0]}
            return {**values, "layers": len(pattern), "block": None, "pattern": pattern}
        if "block" not in fields and values["layers"] is not INVALID:
            return {**values, "block": self.error(
                "N0107", "`model` needs the field `block`", self.sections["model"].name_span,
                label="`block` missing",
                help="write `block = residual(rmsnorm |> mixer)`, or list each layer's block: `layers = [a, a, b] * 2`")}
        return values

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

    def _check_const(self, name: str, definition: Definition) -> None:
        expr = self.analysis.deref(ast.Name(id=name, span=definition.span))
        if expr is INVALID or not isinstance(expr, (ast.Number, ast.Neg, ast.BinOp)):
            return
        if _names_the_gradient_stream(expr):  # an update written once (a library's): checked where it is used
            return
        self.values.arith(expr, f"constant `{name}`")

    def _check_model_heads(self, dim, heads) -> None:
        for width in options(dim):
            for count in options(heads):
                if isinstance(width, int) and isinstance(count, int) and width % count:
                    section = self.sections["model"]
                    span = next((f.value.span for f in section.fields if f.key == "heads"), section.name_span)
                    self.error("N0118", f"{count} heads do not divide the model width {width}", span,
                               label=f"{width} / {count} is not whole",
                               help=f"use a number of heads that divides {width}")

    def _check_model_uses(self, model: ir.Model) -> None:
        """Within one layer a level has one state, so a block may use it once (each layer has its
        own copy of every level its block uses)."""
        for block in model.blocks():
            for level, count in level_uses(block).items():
                if count > 1:
                    first = first_use(block, level)
                    where = "the model's block" if model.pattern is None else "one layer's block"
                    self.error("N0122", f"level `{level}` is used {count} times in {where}",
                               first.span if first else model.span, label="each use would share one state",
                               help=f"define a copy: `level {level}_2 extends {level}`")

    def _check_heads(self, model: ir.Model, levels) -> None:
        for level in levels:
            self._check_per_head_lists(model, level)
            if level.heads is None:
                continue
            for dim in options(model.dim):
                for heads in options(level.heads):
                    if isinstance(dim, int) and isinstance(heads, int) and dim % heads:
                        node = self.definitions[level.name].node
                        span = next((f.value.span for f in node.fields if f.key == "heads"), level.span)
                        self.error("N0118", f"{heads} heads do not divide the model width {dim}", span,
                                   label=f"in level `{level.name}`")

    def _check_per_head_lists(self, model: ir.Model, level: ir.Level) -> None:
        """A list in a gate (a constant, `learned(init=...)`) gives one value per head."""
        heads = level.heads if level.heads is not None else model.heads
        if not isinstance(heads, int):
            return
        gates = [(role, getattr(level, role)) for role in GATE_ROLES] + [(f"let {n}", v) for n, v in level.lets]
        for role, gate in gates:
            if gate is None:
                continue
            for node in ir.walk(gate):
                values = node.value if isinstance(node, ir.Constant) else \
                    node.arg("init") if isinstance(node, ir.Op) and node.name == "learned" else None
                if isinstance(values, tuple) and len(values) != heads:
                    self.error("N0105", f"`{role}` gives {len(values)} values, one per head, but level "
                               f"`{level.name}` has {heads} heads", node.span, label=f"{len(values)} values",
                               help=f"give {heads} values, or one number for every head")

    def _check_memory_as_context(self, model: ir.Model, levels: dict) -> None:
        """A `mac` block retrieves from a memory (keys and values, an inner rule) and attends with a
        cache: other levels in those places have nothing the block could call."""
        for node in model_nodes(model):
            if not isinstance(node, ir.MemoryAsContext):
                continue
            memory, attention = levels.get(node.memory), levels.get(node.attention)
            if memory not in (None, INVALID) and any(not isinstance(getattr(memory, role), (ir.Pipeline, type(None)))
                                                     for role in ("key", "value", "query")):
                self.error("N0117", f"the memory of `mac` reads its inputs through pipelines from `x`, but "
                           f"`{node.memory}` makes one from gates", node.span, label="gate arithmetic in an input")
            if memory not in (None, INVALID) and isinstance(memory.state, ir.Op) and not is_memory(memory):
                self.error("N0105", f"the memory of `mac` must be a memory level, but `{node.memory}` is not",
                           node.span, label="not a memory with keys and values",
                           help="give it a matrix, vector or mlp state with key, value and query")
            if attention not in (None, INVALID) and isinstance(attention.state, ir.Op) \
                    and rules.STATES[attention.state.name].memory:
                self.error("N0105", f"the attention of `mac` must be a cache level, but `{node.attention}` is not",
                           node.span, label="not softmax attention", help="give it the state `cache`")
            # The block reads both levels its own way (the memory's retrieval, an interleaved cache):
            # neither backend has a read-out gate or a forget gate for them there.
            for role, level in (("memory", memory), ("attention", attention)):
                if level in (None, INVALID):
                    continue
                given = [key for key in ("output_norm", "output_gate") if getattr(level, key) not in (None, "none")]
                if role == "attention" and level.retain is not None and isinstance(level.state, ir.Op) \
                        and not rules.STATES[level.state.name].memory:
                    given.append("retain")
                if given:
                    self.error("N0117", f"the {role} of `mac` cannot have `{'`, `'.join(given)}`", node.span,
                               label=f"`{level.name}` has {'them' if len(given) > 1 else 'it'}",
                               help=f"remove {'them' if len(given) > 1 else 'it'} from level `{level.name}`, "
                                    "or use the levels in a block such as `residual(rmsnorm |> ...)`")

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

    def _check_divides(self, every: ir.Frequency, context, f: ast.Field | None) -> None:
        context_field = self.sections.get("train")
        context_span = None
        if context_field is not None:
            context_span = next((x.value.span for x in context_field.fields if x.key == "context" and x.value), None)
        for chunk in options(every.tokens):
            for length in options(context):
                if isinstance(chunk, int) and isinstance(length, int) and chunk > 0 and length % chunk:
                    self.error("N0110", f"chunk size {chunk} does not divide the training context {length}",
                               f.value.span if f else None, label=f"every {chunk} tokens",
                               secondary=(Label(span=context_span, message=f"context {length}"),) if context_span else (),
                               help=f"choose a period that divides {length} (e.g. "
                               f"{_nearest_divisor(length, chunk)}), or change the context")


def _names_the_gradient_stream(expr: ast.Expr) -> bool:
    """Whether an expression names `grad`, `param`, `lr`, `step`, `rows` or `cols`: an update,
    not a number."""
    if isinstance(expr, ast.Name):
        return expr.id in ir.MATRIX_UPDATE_NAMES
    if isinstance(expr, ast.Neg):
        return _names_the_gradient_stream(expr.operand)
    if isinstance(expr, ast.BinOp):
        return _names_the_gradient_stream(expr.left) or _names_the_gradient_stream(expr.right)
    if isinstance(expr, ast.Call):
        return any(_names_the_gradient_stream(arg.value) for arg in expr.args)
    return False


def _nearest_divisor(length: int, chunk: int) -> int:
    """The divisor of `length` nearest `chunk`, from the pairs (d, length / d) with d up to the
    square root: a long context is not walked number by number."""
    small = [d for d in range(1, math.isqrt(length) + 1) if length % d == 0]
    return min(small + [length // d for d in small], key=lambda d: (abs(d - chunk), d))

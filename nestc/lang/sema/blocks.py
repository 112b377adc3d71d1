"""Blocks: the model's block expression, with named blocks inlined and levels resolved."""

from __future__ import annotations

from typing import TYPE_CHECKING

from nestc.lang import ast, ir, schema
from nestc.lang.diagnostics import did_you_mean
from nestc.lang.sema.context import INVALID, Analysis, Part, describe

if TYPE_CHECKING:
    from nestc.lang.sema.values import Values


class Blocks(Part):
    """Evaluates block expressions into IR blocks."""

    def __init__(self, analysis: Analysis, values: Values):
        super().__init__(analysis)
        self.values = values  # block arguments are bound, and levels named, as values

    def block(self, expr: ast.Expr, what: str, stack: tuple[str, ...] = ()):
        expr = self.analysis.deref(expr)
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
            return self.values.unknown_name(expr, what, "a level or a block",
                                      self.analysis.names("level") + self.analysis.names("block") + list(schema.BLOCKS))
        if isinstance(expr, ast.Call):
            if expr.func == "choice":
                bound = self.values.bind(expr, schema.SEARCH["choice"], "`choice`")
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
                                  help=did_you_mean(expr.func, list(schema.BLOCKS) + self.analysis.names("block")))
            if spec.params == ():
                return self.error("N0108", f"`{expr.func}` takes no arguments", expr.span,
                                  help=f"write `{expr.func}`")
            bound = self.values.bind(expr, spec, f"`{expr.func}`")
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
                memory = self.values.level_name(self.analysis.deref(bound["memory"]), "`memory` of `mac`")
                attention = self.values.level_name(self.analysis.deref(bound["attention"]), "`attention` of `mac`")
                if INVALID in (memory, attention):
                    return INVALID
                return ir.MemoryAsContext(memory=memory, attention=attention, segment=bound["segment"],
                                          persistent=bound["persistent"], span=expr.span)
        return self.error("N0105", f"{what} must be a block expression", expr.span, label=f"found {describe(expr)}",
                          help="for example `residual(rmsnorm |> mixer) |> residual(rmsnorm |> ffn)`")

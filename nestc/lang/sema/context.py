"""What the parts of one analysis share: the diagnostics it reports, the definitions and sections
it has read, and where it stands (the level being built, the training context)."""

from __future__ import annotations

from dataclasses import dataclass

from nestc.lang import ast, ir
from nestc.lang.diagnostics import Diagnostic, Label
from nestc.lang.source import SourceFile, SourceMap, Span


class Invalid:
    """A value that failed a check; its diagnostic has already been reported."""

    def __repr__(self) -> str:
        return "INVALID"


INVALID = Invalid()


@dataclass
class Definition:
    kind: str  # "const" | "level" | "block"
    node: ast.ConstDef | ast.LevelDef | ast.BlockDef
    span: Span | None


class Analysis:
    """The state of one analysis, shared by its parts (imports, values, blocks, levels, program)."""

    def __init__(self, sources: SourceMap, replaced_imports: dict[str, SourceFile] | None = None):
        self.sources = sources
        self.replaced_imports = replaced_imports or {}  # imported path -> the text to check instead
        self.diagnostics: list[Diagnostic] = []
        self.modules: dict[str, ast.Module] = {}
        self.definitions: dict[str, Definition] = {}
        self.sections: dict[str, ast.Section] = {}
        self.main_file = ""
        self.current_level: str | None = None  # the level being built: `self` and its own name refer to it
        self.bindings: tuple[str, ...] = ()  # the `let` names a gate of that level may name here
        # Inside an optimizer level's inputs or a level's `update`: the stream names a gate may name
        # (ir.STREAM_NAMES, ir.UPDATE_NAMES), and, in an `update`, how a level name is read
        # (nestc/lang/sema/optimizers.py), which also allows `newton_schulz(...)`.
        self.stream_names: tuple[str, ...] = ()
        self.optimizer_level = None
        self.update_value = None  # evaluates a level's `update` (nestc/lang/sema/optimizers.py)
        self.outer_update_value = None  # and the train section's `update` and `matrix_update`
        self.train_context: int | ir.SearchValue | None = None  # chunked levels must divide it

    def error(self, code: str, message: str, span: Span | None, label: str = "", help: str | None = None,
              notes: tuple[str, ...] = (), secondary: tuple[Label, ...] = ()) -> Invalid:
        self.diagnostics.append(Diagnostic(code=code, message=message, span=span, label=label, help=help,
                                           notes=notes, secondary=secondary))
        return INVALID

    def warning(self, code: str, message: str, span: Span | None, label: str = "", help: str | None = None):
        self.diagnostics.append(Diagnostic(code=code, message=message, span=span, label=label, help=help,
                                           severity="warning"))

    def deref(self, expr: ast.Expr, seen: tuple[str, ...] = ()) -> ast.Expr | Invalid:
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

    def names(self, kind: str) -> list[str]:
        return [name for name, d in self.definitions.items() if d.kind == kind]


class Part:
    """One concern of the analysis. Every part reports into, and reads the tables of, one `Analysis`."""

    def __init__(self, analysis: Analysis):
        self.analysis = analysis
        self.error = analysis.error
        self.warning = analysis.warning
        self.definitions = analysis.definitions
        self.sections = analysis.sections


# --- helpers every part uses ----------------------------------------------------------------------

def options(value) -> tuple:
    """The values a setting may take: the options of a choice, or the one value."""
    if isinstance(value, ir.Choice):
        return value.options
    return (value,)


def describe(expr) -> str:
    """How a message names an expression that has the wrong kind."""
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

"""Semantic analysis: AST -> IR.

Resolves imports, constants, names and defaults against the schema, and reports every problem
it finds in one pass (a value that fails a check becomes `INVALID` and analysis continues).

The parts, each a class over one shared `Analysis` (context.py): loading and definitions
(imports.py), values (values.py), blocks (blocks.py), levels (levels.py) and the whole-program
checks (program.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nestc.lang import ast, ir
from nestc.lang.diagnostics import Diagnostic
from nestc.lang.sema.context import Analysis
from nestc.lang.sema.imports import Loader, read_source
from nestc.lang.sema.program import ProgramBuilder
from nestc.lang.source import SourceFile, SourceMap

__all__ = ["Result", "analyze_file", "analyze_source", "read_source"]


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


def analyze_file(path: str, sources: SourceMap | None = None) -> Result:
    """Read, parse and check one spec file and everything it imports."""
    sources = sources or SourceMap()
    try:
        source = read_source(path)
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        return Result(None, [Diagnostic(code="N0100", message=f"cannot read `{path}`: {reason}", span=None)], sources)
    return analyze_source(source, sources)


def analyze_source(source: SourceFile, sources: SourceMap | None = None,
                   replaced_imports: dict[str, SourceFile] | None = None) -> Result:
    """Check `source`; an imported file whose path (as the import resolves it) is a key of
    `replaced_imports` is checked from that text instead of the file's (what `--set` changed)."""
    sources = sources or SourceMap()
    analysis = Analysis(sources, replaced_imports)
    program = _run(analysis, source)
    return Result(program, analysis.diagnostics, sources, analysis.modules)


def _run(analysis: Analysis, source: SourceFile) -> ir.Program | None:
    analysis.main_file = source.name
    loader = Loader(analysis)
    module = loader.load(source, import_stack=())
    if module is None:
        return None
    for section in module.items:
        if isinstance(section, ast.Section):
            loader.add_section(section)
    program = ProgramBuilder(analysis).build()
    # A level extended several times re-reports its own mistakes once per child: keep one.
    analysis.diagnostics = sorted(dict.fromkeys(analysis.diagnostics), key=lambda d: _position(analysis, d))
    if any(d.is_error for d in analysis.diagnostics):
        return None
    return program


def _position(analysis: Analysis, diagnostic: Diagnostic):
    """Source order: the main file first, then imported files; diagnostics without a span last."""
    span = diagnostic.span
    if span is None:
        return (2, "", 0, 0)
    return (0 if span.file == analysis.main_file else 1, span.file, span.line, span.column)

"""Source text and positions: every AST node, IR node and diagnostic points back into a file."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Span:
    """A half-open region of one source file; lines and columns are 1-based, end_column exclusive."""

    file: str
    line: int
    column: int
    end_line: int
    end_column: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"

    def to(self, other: "Span") -> "Span":
        """The span from the start of this one to the end of `other` (same file)."""
        return Span(self.file, self.line, self.column, other.end_line, other.end_column)


@dataclass(frozen=True, slots=True)
class SourceFile:
    """A file's name as shown to the user and its full text."""

    name: str
    text: str
    lines: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Lines end at "\n" only, as for the lexer (str.splitlines also splits at \f, \v, U+2028 ...).
        lines = self.text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        object.__setattr__(self, "lines", tuple(line.removesuffix("\r") for line in lines))

    def line(self, number: int) -> str:
        return self.lines[number - 1] if 0 < number <= len(self.lines) else ""

    def end_span(self) -> Span:
        """A zero-width span at the very end of the file (for "unexpected end of input")."""
        if not self.lines:
            return Span(self.name, 1, 1, 1, 1)
        last = len(self.lines)
        column = len(self.lines[-1]) + 1
        return Span(self.name, last, column, last, column)


class SourceMap:
    """All files read in one compilation, so diagnostics can show lines of imported files too."""

    def __init__(self) -> None:
        self._files: dict[str, SourceFile] = {}

    def add(self, source: SourceFile) -> None:
        self._files[source.name] = source

    def get(self, name: str) -> SourceFile | None:
        return self._files.get(name)

    def __contains__(self, name: str) -> bool:
        return name in self._files

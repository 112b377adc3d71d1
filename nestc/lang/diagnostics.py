"""Compiler diagnostics in the rustc layout, and their JSON form.

    error[N0101]: unknown level `mixr`
      --> specs/x.nest:12:33
       |
    12 |     block = residual(rmsnorm |> mixr)
       |                                 ^^^^ not defined
       |
       = help: did you mean `mixer`?
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from nestc.lang.source import SourceMap, Span


@dataclass(frozen=True, slots=True, kw_only=True)
class Label:
    """A secondary span with its own short message (drawn with `-` instead of `^`)."""

    span: Span
    message: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Diagnostic:
    code: str
    message: str
    span: Span | None
    label: str = ""
    severity: str = "error"  # "error" or "warning"
    help: str | None = None
    notes: tuple[str, ...] = ()
    secondary: tuple[Label, ...] = field(default=())

    @property
    def is_error(self) -> bool:
        return self.severity == "error"

    def to_json(self) -> dict:
        out: dict = {"code": self.code, "severity": self.severity, "message": self.message}
        if self.span is not None:
            out.update(
                file=self.span.file,
                line=self.span.line,
                column=self.span.column,
                end_line=self.span.end_line,
                end_column=self.span.end_column,
            )
        if self.label:
            out["label"] = self.label
        if self.help:
            out["help"] = self.help
        if self.notes:
            out["notes"] = list(self.notes)
        if self.secondary:
            out["secondary"] = [
                {"file": s.span.file, "line": s.span.line, "column": s.span.column, "message": s.message}
                for s in self.secondary
            ]
        return out


class NestError(Exception):
    """Raised when compilation cannot continue; carries every diagnostic found so far."""

    def __init__(self, diagnostics: Sequence[Diagnostic]):
        self.diagnostics = tuple(diagnostics)
        super().__init__("\n".join(f"{d.span}: {d.message}" if d.span else d.message for d in diagnostics))


def closest(word: str, candidates: Iterable[str]) -> str | None:
    """The most likely intended spelling of `word`, or None when nothing is close."""
    matches = difflib.get_close_matches(word, sorted(set(candidates)), n=1, cutoff=0.6)
    if matches:
        return matches[0]
    lowered = {c.lower(): c for c in candidates}
    return lowered.get(word.lower())


def did_you_mean(word: str, candidates: Iterable[str]) -> str | None:
    candidates = list(candidates)
    guess = closest(word, candidates)
    if guess is not None and guess != word:
        return f"did you mean `{guess}`?"
    if candidates and len(candidates) <= 12:
        return "expected one of " + ", ".join(f"`{c}`" for c in sorted(candidates))
    return None


class _Style:
    def __init__(self, color: bool):
        self.color = color

    def __call__(self, text: str, code: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.color else text


def render(diagnostic: Diagnostic, sources: SourceMap, color: bool = False) -> str:
    """Render one diagnostic as text in the rustc layout."""
    style = _Style(color)
    severity_color = "1;31" if diagnostic.is_error else "1;33"
    head = style(f"{diagnostic.severity}[{diagnostic.code}]", severity_color) + style(f": {diagnostic.message}", "1")
    lines = [head]
    spans = [s.span for s in diagnostic.secondary] + ([diagnostic.span] if diagnostic.span else [])
    gutter = max((len(str(s.line)) for s in spans), default=1)
    pad = " " * gutter
    if diagnostic.span is not None:
        lines.append(f"{pad}{style('-->', '1;34')} {diagnostic.span}")
        lines.append(f"{pad} {style('|', '1;34')}")
        lines += _snippet(diagnostic.span, diagnostic.label, "^", severity_color, sources, gutter, style)
    for extra in diagnostic.secondary:
        if diagnostic.span is None or extra.span.file != diagnostic.span.file:
            lines.append(f"{pad}{style('::>', '1;34')} {extra.span}")
        lines += _snippet(extra.span, extra.message, "-", "1;34", sources, gutter, style)
    if diagnostic.help or diagnostic.notes:
        lines.append(f"{pad} {style('|', '1;34')}")
    for note in diagnostic.notes:
        lines.append(f"{pad} {style('=', '1;34')} {style('note', '1')}: {note}")
    if diagnostic.help:
        lines.append(f"{pad} {style('=', '1;34')} {style('help', '1')}: {diagnostic.help}")
    return "\n".join(lines)


def _snippet(span: Span, label: str, mark: str, color: str, sources: SourceMap, gutter: int, style) -> list[str]:
    source = sources.get(span.file)
    if source is None:
        return []
    text = source.line(span.line).replace("\t", " ")
    start = max(span.column, 1)
    if span.end_line == span.line:
        end = max(span.end_column, start + 1)
    else:
        end = max(len(text.rstrip()) + 1, start + 1)
    underline = " " * (start - 1) + mark * (end - start)
    if label:
        underline += " " + label
    bar = style("|", "1;34")
    return [
        f"{style(str(span.line).rjust(gutter), '1;34')} {bar} {text}",
        f"{' ' * gutter} {bar} {style(underline, color)}",
    ]


def render_all(diagnostics: Sequence[Diagnostic], sources: SourceMap, color: bool = False) -> str:
    parts = [render(d, sources, color) for d in diagnostics]
    errors = sum(d.is_error for d in diagnostics)
    warnings = len(diagnostics) - errors
    if errors:
        parts.append(f"error: could not compile: {errors} error{'s' if errors != 1 else ''}"
                     + (f", {warnings} warning{'s' if warnings != 1 else ''}" if warnings else ""))
    return "\n\n".join(parts)


def to_json(diagnostics: Sequence[Diagnostic]) -> str:
    return json.dumps([d.to_json() for d in diagnostics], indent=2)

"""`--set PATH=VALUE`: change one field of a spec from the command line.

PATH is `train.FIELD`, `model.FIELD` or `level.NAME.FIELD`. The value is spliced into the spec's
text in place of the old one (or added to the body), so the result is checked like any spec; a
diagnostic about a spliced value is then moved onto the `--set` that gave it (`relocate`). A level may be defined in a file the spec imports: the value is
then spliced into that file's text, which the checker reads instead of the file (so every use of
the level, from any file, sees it), and the run's saved spec, which bundles the imported levels,
keeps it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from nestc.lang import ast, schema, syntax
from nestc.lang.diagnostics import Diagnostic, NestError, did_you_mean
from nestc.lang.sema.imports import import_path, read_source
from nestc.lang.source import SourceFile, SourceMap, Span

# The source diagnostics point into when an assignment's value is at fault: one line per `--set`.
COMMAND_LINE = "--set"


class OverrideError(ValueError):
    """A --set that names no field or gives no value: a usage error, reported before any checking."""


@dataclass(frozen=True)
class Spliced:
    """Where one assignment's value stands in the text it was spliced into (`span`), and where it
    stands on the command line (line `index + 1` of the `--set` source, from `column`)."""
    span: Span
    index: int
    column: int
    note: str


@dataclass(frozen=True)
class Overridden:
    """The spec after its assignments: the main file, and the imported files they changed (by the
    path the checker resolves their import to; pass them to `analyze_source(replaced_imports=)`).
    `relocate` moves the diagnostics about a spliced value onto the assignment that gave it."""
    main: SourceFile
    imported: dict[str, SourceFile] = field(default_factory=dict)
    assignments: tuple[str, ...] = ()
    spliced: tuple[Spliced, ...] = ()

    def command_line(self) -> SourceFile:
        return SourceFile(COMMAND_LINE, "".join(f"--set {a}\n" for a in self.assignments))

    def relocate(self, diagnostics, sources: SourceMap) -> list[Diagnostic]:
        """The diagnostics with every span inside a spliced value moved onto its `--set`, which
        `sources` then holds (so the assignment is what the error shows, not a line the file
        never had); the note says which field of which file it changed."""
        sources.add(self.command_line())
        changed_items = self._changed_items()
        moved = []
        for diagnostic in diagnostics:
            span, notes = self._on_command_line(diagnostic.span)
            if span is diagnostic.span and span is not None:
                # not a spliced value, but inside a level or section that an assignment changed
                notes = tuple(f"`--set {self.assignments[index]}` changed this {what}"
                              for index, (item, what) in changed_items if _within(span, item))
            secondary = tuple(dataclasses.replace(label, span=self._on_command_line(label.span)[0])
                              for label in diagnostic.secondary)
            moved.append(dataclasses.replace(diagnostic, span=span, secondary=secondary,
                                             notes=diagnostic.notes + notes))
        return moved

    def _changed_items(self) -> list[tuple[int, tuple[Span, str]]]:
        """(assignment index, (span, "level `x`" or "section")) of each item a value was spliced into."""
        texts = {self.main.name: self.main, **self.imported}
        found = []
        for spliced in self.spliced:
            try:
                module = syntax.parse(texts[spliced.span.file])
            except NestError:  # a value that breaks the syntax: its error is on the command line
                continue
            for item in module.items:
                if isinstance(item, (ast.LevelDef, ast.Section)) and _within(spliced.span, item.span):
                    what = f"level `{item.name}`" if isinstance(item, ast.LevelDef) else f"`{item.name}` section"
                    found.append((spliced.index, (item.span, what)))
        return found

    def _on_command_line(self, span: Span | None) -> tuple[Span | None, tuple[str, ...]]:
        for spliced in self.spliced if span is not None else ():
            inside = spliced.span
            if _within(span, inside):
                line = spliced.index + 1
                if span.line == inside.line == span.end_line:
                    start = spliced.column + span.column - inside.column
                    end = spliced.column + span.end_column - inside.column
                else:  # a value over several lines: point at all of it
                    start, end = spliced.column, len(self.command_line().line(line)) + 1
                return Span(COMMAND_LINE, line, start, line, end), (spliced.note,)
        return span, ()


def _within(span: Span, outer: Span) -> bool:
    return span.file == outer.file and (outer.line, outer.column) <= (span.line, span.column) \
        and (span.end_line, span.end_column) <= (outer.end_line, outer.end_column)


def parse_assignment(text: str) -> tuple[list[str], str]:
    if "=" not in text:
        raise OverrideError(f"--set {text}: expected PATH=VALUE, e.g. --set train.steps=200")
    path, value = text.split("=", 1)
    parts = path.strip().split(".")
    if parts[0] in schema.SECTIONS and len(parts) == 2:
        table = schema.SECTIONS[parts[0]]
    elif parts[0] == "level" and len(parts) == 3:
        table = schema.LEVEL_FIELDS
    else:
        raise OverrideError(f"--set {text}: PATH is `train.FIELD`, `model.FIELD` or `level.NAME.FIELD`")
    if parts[-1] not in table:
        hint = did_you_mean(parts[-1], table)
        raise OverrideError(f"--set {text}: no field `{parts[-1]}` in {'.'.join(parts[:-1])}"
                            + (f"; {hint}" if hint else ""))
    try:
        syntax.parse(SourceFile("--set", f"const value = {value.strip()}\n"))
    except NestError:
        raise OverrideError(f"--set {text}: `{value.strip()}` is not a value of the language") from None
    return parts, value.strip()


def apply(source: SourceFile, assignments: list[str]) -> Overridden:
    """The spec's files with every assignment applied, in order. A spec, or a file it imports,
    that cannot be read or parsed is left as it is: checking it will say where."""
    changed = {source.name: source}  # the main file and each file an assignment changed
    regions: list[list] = []  # [file, start offset, end offset, index, column, note] of each value
    for index, assignment in enumerate(assignments):
        parts, value = parse_assignment(assignment)
        files = _files(source.name, changed)
        if files is None:
            return Overridden(source)
        if parts[0] == "level":
            target = next((name for name, (_, module) in files.items() if _level(module, parts[1])), None)
            if target is None:
                names = [i.name for _, module in files.values() for i in module.items if isinstance(i, ast.LevelDef)]
                hint = did_you_mean(parts[1], names) if names else None
                raise OverrideError(f"--set {assignment}: neither `{source.name}` nor a file it imports defines a "
                                    f"level `{parts[1]}`" + (f"; {hint}" if hint else ""))
        else:
            target = source.name
        text, module = files[target]
        start, end, replacement, note = _splice(text, module, parts, value, target)
        changed[target] = SourceFile(target, text[:start] + replacement + text[end:])
        # The values spliced before move with the text after them; one this splice replaced is gone.
        regions = [r for r in regions if r[0] != target or r[2] <= start or r[1] >= end]
        for region in regions:
            if region[0] == target and region[1] >= end:
                region[1] += len(replacement) - (end - start)
                region[2] += len(replacement) - (end - start)
        at = start + replacement.rfind(value)  # the replacement ends with the value and closing blanks
        written = assignment.split("=", 1)[1]
        column = len(f"--set {assignment}") - len(written.lstrip()) + 1  # of the value, as written
        regions.append([target, at, at + len(value), index, column, note])
    spliced = tuple(Spliced(span=_span(changed[file].text, file, start, end), index=index, column=column, note=note)
                    for file, start, end, index, column, note in regions)
    main = changed.pop(source.name)
    return Overridden(main, changed, tuple(assignments), spliced)


def _span(text: str, file: str, start: int, end: int) -> Span:
    def position(offset: int) -> tuple[int, int]:
        line = text.count("\n", 0, offset) + 1
        return line, offset - (text.rfind("\n", 0, offset) + 1) + 1

    return Span(file, *position(start), *position(end))


def _files(main: str, changed: dict[str, SourceFile]) -> dict[str, tuple[str, ast.Module]] | None:
    """The text and syntax tree of the main file and of every file it imports, directly or not,
    in the checker's order (a file before the files it imports); None if one of them cannot be
    read or parsed."""
    files: dict[str, tuple[str, ast.Module]] = {}

    def visit(name: str) -> bool:
        try:
            source = changed.get(name) or read_source(name)
            module = syntax.parse(source)
        except (OSError, UnicodeDecodeError, NestError):
            return False
        files[name] = (source.text, module)
        imported = [import_path(name, i.path) for i in module.items if isinstance(i, ast.Import)]
        return all(path in files or not path.endswith(".nest") or visit(path) for path in imported)

    return files if visit(main) else None


def _level(module: ast.Module, name: str) -> ast.LevelDef | None:
    return next((i for i in module.items if isinstance(i, ast.LevelDef) and i.name == name), None)


def _splice(text: str, module: ast.Module, parts: list[str], value: str, file: str) -> tuple[int, int, str, str]:
    """Where the assignment goes: text[start:end] becomes the replacement; and a note on what it
    changed there."""
    offsets = [0]
    for line in text.split("\n"):
        offsets.append(offsets[-1] + len(line) + 1)

    def offset(line: int, column: int) -> int:
        return offsets[line - 1] + column - 1

    if parts[0] == "level":
        body = _level(module, parts[1])
        where = f"level `{parts[1]}` of {file}"
    else:
        body = next((i for i in module.items if isinstance(i, ast.Section) and i.name == parts[0]), None)
        where = f"the `{parts[0]}` section of {file}"
        if body is None:
            end = len(text.rstrip("\n"))
            return end, len(text), f"\n\n{parts[0]} {{\n    {_line(parts[-1], value)}\n}}\n", \
                f"--set adds `{parts[-1]}` to a new `{parts[0]}` section of {file}"
    found = next((f for f in body.fields if f.key == parts[-1]), None)
    if found is not None and found.value is not None:
        start = offset(found.value.span.line, found.value.span.column)
        end = offset(found.value.span.end_line, found.value.span.end_column)
        return start, end, value, f"--set replaces `{text[start:end]}` in {found.value.span}"
    if found is not None:  # a flag such as `frozen`
        start = offset(found.key_span.line, found.key_span.column)
        end = offset(found.key_span.end_line, found.key_span.end_column)
        return start, end, _line(parts[-1], value), f"--set replaces the flag `{parts[-1]}` at {found.key_span}"
    note = f"--set adds `{parts[-1]}` to {where}"
    if isinstance(body, ast.LevelDef) and not body.has_body:
        end = offset(body.span.end_line, body.span.end_column)
        return end, end, f" {{\n    {_line(parts[-1], value)}\n}}", note
    closing = offset(body.span.end_line, body.span.end_column) - 1  # the `}`
    kept = len(text[:closing].rstrip())
    return kept, closing, f"\n    {_line(parts[-1], value)}\n", note


def _line(key: str, value: str) -> str:
    param = schema.LEVEL_FIELDS.get(key) or schema.MODEL_FIELDS.get(key) or schema.TRAIN_FIELDS.get(key)
    assigned = param is not None and (param.type in ("source", "gate", "block")
                                      or (param.type == "layers" and value.lstrip().startswith("[")))
    return f"{key} = {value}" if assigned else f"{key} {value}"

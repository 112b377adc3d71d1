"""`--set PATH=VALUE`: change one field of a spec from the command line.

PATH is `train.FIELD`, `model.FIELD` or `level.NAME.FIELD`. The value is spliced into the spec's
text in place of the old one (or added to the body), so the result is checked like any spec and its
diagnostics point at real lines. A level may be defined in a file the spec imports: the value is
then spliced into that file's text, which the checker reads instead of the file (so every use of
the level, from any file, sees it), and the run's saved spec, which bundles the imported levels,
keeps it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nestc.lang import ast, schema, syntax
from nestc.lang.diagnostics import NestError, did_you_mean
from nestc.lang.sema.imports import import_path, read_source
from nestc.lang.source import SourceFile


class OverrideError(ValueError):
    """A --set that names no field or gives no value: a usage error, reported before any checking."""


@dataclass(frozen=True)
class Overridden:
    """The spec after its assignments: the main file, and the imported files they changed (by the
    path the checker resolves their import to; pass them to `analyze_source(replaced_imports=)`)."""
    main: SourceFile
    imported: dict[str, SourceFile] = field(default_factory=dict)


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
    for assignment in assignments:
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
        changed[target] = SourceFile(target, _splice(text, module, parts, value))
    main = changed.pop(source.name)
    return Overridden(main, changed)


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


def _splice(text: str, module: ast.Module, parts: list[str], value: str) -> str:
    offsets = [0]
    for line in text.split("\n"):
        offsets.append(offsets[-1] + len(line) + 1)

    def offset(line: int, column: int) -> int:
        return offsets[line - 1] + column - 1

    if parts[0] == "level":
        body = _level(module, parts[1])
    else:
        body = next((i for i in module.items if isinstance(i, ast.Section) and i.name == parts[0]), None)
        if body is None:
            return text.rstrip("\n") + f"\n\n{parts[0]} {{\n    {_line(parts[-1], value)}\n}}\n"
    found = next((f for f in body.fields if f.key == parts[-1]), None)
    if found is not None and found.value is not None:
        start = offset(found.value.span.line, found.value.span.column)
        end = offset(found.value.span.end_line, found.value.span.end_column)
        return text[:start] + value + text[end:]
    if found is not None:  # a flag such as `frozen`
        start = offset(found.key_span.line, found.key_span.column)
        end = offset(found.key_span.end_line, found.key_span.end_column)
        return text[:start] + _line(parts[-1], value) + text[end:]
    if isinstance(body, ast.LevelDef) and not body.has_body:
        end = offset(body.span.end_line, body.span.end_column)
        return text[:end] + f" {{\n    {_line(parts[-1], value)}\n}}" + text[end:]
    closing = offset(body.span.end_line, body.span.end_column) - 1  # the `}`
    return text[:closing].rstrip() + f"\n    {_line(parts[-1], value)}\n" + text[closing:]


def _line(key: str, value: str) -> str:
    param = schema.LEVEL_FIELDS.get(key) or schema.MODEL_FIELDS.get(key) or schema.TRAIN_FIELDS.get(key)
    assigned = param is not None and (param.type in ("source", "gate", "block")
                                      or (param.type == "layers" and value.lstrip().startswith("[")))
    return f"{key} = {value}" if assigned else f"{key} {value}"

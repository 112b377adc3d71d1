"""`--set PATH=VALUE`: change one field of a spec from the command line.

PATH is `train.FIELD`, `model.FIELD` or `level.NAME.FIELD`. The value is spliced into the spec's
text in place of the old one (or added to the body), so the result is checked like any spec and its
diagnostics point at real lines.
"""

from __future__ import annotations

from nestc.lang import ast, schema, syntax
from nestc.lang.diagnostics import NestError, did_you_mean
from nestc.lang.source import SourceFile


class OverrideError(ValueError):
    """A --set that names no field or gives no value: a usage error, reported before any checking."""


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


def apply(source: SourceFile, assignments: list[str]) -> SourceFile:
    """The spec text with every assignment applied, in order."""
    text = source.text
    for assignment in assignments:
        parts, value = parse_assignment(assignment)
        try:
            module = syntax.parse(SourceFile(source.name, text))
        except NestError:  # the spec itself does not parse: checking it will say where
            return source
        text = _splice(text, module, parts, value, assignment)
    return SourceFile(source.name, text)


def _splice(text: str, module: ast.Module, parts: list[str], value: str, assignment: str) -> str:
    offsets = [0]
    for line in text.split("\n"):
        offsets.append(offsets[-1] + len(line) + 1)

    def offset(line: int, column: int) -> int:
        return offsets[line - 1] + column - 1

    if parts[0] == "level":
        body = next((i for i in module.items if isinstance(i, ast.LevelDef) and i.name == parts[1]), None)
        if body is None:
            names = [i.name for i in module.items if isinstance(i, ast.LevelDef)]
            hint = did_you_mean(parts[1], names) if names else None
            raise OverrideError(f"--set {assignment}: this file defines no level `{parts[1]}`"
                                + (f"; {hint}" if hint else ""))
    else:
        body = next((i for i in module.items if isinstance(i, ast.Section) and i.name == parts[0]), None)
        if body is None:
            return text.rstrip("\n") + f"\n\n{parts[0]} {{\n    {_line(parts[-1], value)}\n}}\n"
    field = next((f for f in body.fields if f.key == parts[-1]), None)
    if field is not None and field.value is not None:
        start = offset(field.value.span.line, field.value.span.column)
        end = offset(field.value.span.end_line, field.value.span.end_column)
        return text[:start] + value + text[end:]
    if field is not None:  # a flag such as `frozen`
        start = offset(field.key_span.line, field.key_span.column)
        end = offset(field.key_span.end_line, field.key_span.end_column)
        return text[:start] + _line(parts[-1], value) + text[end:]
    if isinstance(body, ast.LevelDef) and not body.has_body:
        end = offset(body.span.end_line, body.span.end_column)
        return text[:end] + f" {{\n    {_line(parts[-1], value)}\n}}" + text[end:]
    closing = offset(body.span.end_line, body.span.end_column) - 1  # the `}`
    return text[:closing].rstrip() + f"\n    {_line(parts[-1], value)}\n" + text[closing:]


def _line(key: str, value: str) -> str:
    param = schema.LEVEL_FIELDS.get(key) or schema.MODEL_FIELDS.get(key) or schema.TRAIN_FIELDS.get(key)
    assigned = param is not None and param.type in ("source", "gate", "block")
    return f"{key} = {value}" if assigned else f"{key} {value}"

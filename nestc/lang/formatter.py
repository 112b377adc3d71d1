"""`nestc fmt`: AST -> canonical text.

Canonical means: one field per line, four-space indents, `key = expr` for dataflow fields and
`key expr` for settings, `name=value` arguments, ` |> ` between stages, one blank line around every
item with a body, at most one blank line anywhere. Comments are kept: a comment on its own line
stays before the field or item that follows it, a comment at the end of a line stays there, and a
comment inside a multi-line expression moves just above that field. Formatting is idempotent and
the result parses to the same AST.
"""

from __future__ import annotations

from nestc.lang import ast, schema

INDENT = "    "
MAX_WIDTH = 100
_PRECEDENCE = {"|>": 1, "+": 2, "-": 2, "*": 3, "/": 3}
_ASSIGNED_TYPES = ("source", "gate", "block", "update", "outer_update")


def format_expr(expr: ast.Expr) -> str:
    return _expr(expr, 0)


def _expr(expr: ast.Expr, context: int) -> str:
    """Render `expr`; parenthesise when it binds looser than `context` requires."""
    if isinstance(expr, ast.Number):
        return expr.text
    if isinstance(expr, ast.String):
        return '"' + expr.value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t") + '"'
    if isinstance(expr, ast.Name):
        return expr.id
    if isinstance(expr, ast.Call):
        return f"{expr.func}(" + ", ".join(_arg(a) for a in expr.args) + ")"
    if isinstance(expr, ast.ListExpr):
        return "[" + ", ".join(_expr(i, 0) for i in expr.items) + "]"
    if isinstance(expr, ast.Pipe):
        text = " |> ".join(_expr(s, 2) for s in expr.stages)
        return f"({text})" if context > 1 else text
    if isinstance(expr, ast.BinOp):
        precedence = _PRECEDENCE[expr.op]
        text = f"{_expr(expr.left, precedence)} {expr.op} {_expr(expr.right, precedence + 1)}"
        return f"({text})" if context > precedence else text
    if isinstance(expr, ast.Neg):
        return "-" + _expr(expr.operand, 4)
    raise TypeError(f"cannot format {type(expr).__name__}")


def _arg(arg: ast.Arg) -> str:
    value = _expr(arg.value, 0)
    return value if arg.name is None else f"{arg.name}={value}"


class _Printer:
    def __init__(self, comments: tuple[ast.Comment, ...]):
        self.comments = sorted(comments, key=lambda c: (c.line, c.column))
        self.next_comment = 0
        self.lines: list[str] = []
        self.trailing_comments: dict[int, str] = {}  # output line index -> its end-of-line comment
        self.last_source_line = 0

    def _gap(self, source_line: int) -> None:
        """One blank line where the source had one, never at the start of a body or doubled."""
        if source_line > self.last_source_line + 1:
            self.blank_line()

    def blank_line(self) -> None:
        if self.lines and self.lines[-1] != "" and not self.lines[-1].endswith("{"):
            self.lines.append("")

    def leading(self, before_line: int, indent: str, unit_start: int | None = None) -> None:
        """Emit the comments above `before_line`; those from inside the unit (hoisted) get no gap."""
        while self.next_comment < len(self.comments) and self.comments[self.next_comment].line < before_line:
            comment = self.comments[self.next_comment]
            if unit_start is None or comment.line < unit_start:
                self._gap(comment.line)
            self.lines.append(indent + comment.text)
            self.last_source_line = comment.line
            self.next_comment += 1

    def take_trailing(self, line: int) -> None:
        """Attach the comment at the end of source `line`, if any, to the last output line."""
        if self.next_comment < len(self.comments) and self.comments[self.next_comment].line == line:
            self.trailing_comments[len(self.lines) - 1] = self.comments[self.next_comment].text
            self.next_comment += 1

    def emit(self, text: str, start_line: int, end_line: int) -> None:
        self._gap(start_line)
        self.lines.extend(text.split("\n"))
        self.take_trailing(end_line)
        self.last_source_line = end_line

    def render(self) -> str:
        """The output, end-of-line comments aligned one column apart within each run of lines."""
        lines = list(self.lines)
        run: list[int] = []
        for index in range(len(lines) + 1):
            if index < len(lines) and index in self.trailing_comments:
                run.append(index)
                continue
            if run:
                column = max(len(lines[i]) for i in run) + 2
                for i in run:
                    lines[i] = lines[i].ljust(column) + self.trailing_comments[i]
                run = []
        return "\n".join(lines).rstrip("\n") + "\n" if lines else ""


def format_module(module: ast.Module) -> str:
    printer = _Printer(module.comments)
    previous_had_body = False
    for item in module.items:
        has_body = _has_body(item)
        if printer.lines and (has_body or previous_had_body):
            printer.blank_line()  # before the item's leading comments, which stay attached to it
        if isinstance(item, (ast.LevelDef, ast.Section)) and has_body:
            _body_item(printer, item)
        else:
            printer.leading(_end(item, printer), "", _start(item, printer))
            printer.emit(_single_line_item(item), _start(item, printer), _end(item, printer))
        previous_had_body = has_body
    printer.leading(10**9, "")
    return printer.render()


def _start(node, printer: _Printer) -> int:
    """The node's first source line; a node built without spans sits where printing has got to."""
    return node.span.line if node.span is not None else printer.last_source_line


def _end(node, printer: _Printer) -> int:
    return node.span.end_line if node.span is not None else printer.last_source_line


def _has_body(item: ast.Item) -> bool:
    return isinstance(item, ast.Section) or (isinstance(item, ast.LevelDef) and item.has_body)


def _level_header(item: ast.LevelDef) -> str:
    if item.base is not None:
        return f"level {item.name} extends {item.base}"
    return f"level {item.name} : {format_expr(item.state)}"


def _single_line_item(item: ast.Item) -> str:
    if isinstance(item, ast.Import):
        return "import " + format_expr(ast.String(value=item.path))
    if isinstance(item, ast.ConstDef):
        return f"const {item.name} = {format_expr(item.value)}"
    if isinstance(item, ast.BlockDef):
        return _wrap(f"block {item.name} = ", item.value, "")
    if isinstance(item, ast.LevelDef):
        return _level_header(item)
    raise TypeError(type(item).__name__)


def _body_item(printer: _Printer, item: ast.LevelDef | ast.Section) -> None:
    header = _level_header(item) if isinstance(item, ast.LevelDef) else item.name
    header_end = _start(item, printer)
    if isinstance(item, ast.LevelDef) and item.state is not None:
        header_end = _end(item.state, printer)
    printer.leading(_start(item, printer), "")
    if not item.fields:
        printer.leading(_end(item, printer), "")
        printer.emit(header + " {}", _start(item, printer), _end(item, printer))
        return
    printer.emit(header + " {", _start(item, printer), header_end)
    table = schema.LEVEL_FIELDS if isinstance(item, ast.LevelDef) else schema.SECTIONS.get(item.name, {})
    for f in item.fields:
        printer.leading(_end(f, printer), INDENT, _start(f, printer))
        printer.emit(_field(f, table), _start(f, printer), _end(f, printer))
    printer.leading(_end(item, printer), INDENT)
    printer.lines.append("}")
    printer.take_trailing(_end(item, printer))
    printer.last_source_line = _end(item, printer)


def _field(f: ast.Field, table: dict) -> str:
    if f.binding:
        return _wrap(f"{INDENT}let {f.key} = ", f.value, INDENT)
    if f.value is None:
        return INDENT + f.key
    param = table.get(f.key)
    assign = _is_assigned(param, f.value) if param is not None else f.assign
    if assign and f.unit is None:  # a unit only exists in the setting form: keep it there
        return _wrap(f"{INDENT}{f.key} = ", f.value, INDENT)
    text = f"{INDENT}{f.key} {format_expr(f.value)}"
    return text + (f" {f.unit}" if f.unit else "")


def _is_assigned(param, value: ast.Expr) -> bool:
    """Dataflow fields are written `key = expr`, settings `key expr`; `layers` is a setting when
    it is a number and dataflow when it lists the layers' blocks."""
    if param.type == "layers":
        return _lists_blocks(value)
    return param.type in _ASSIGNED_TYPES


def _lists_blocks(value: ast.Expr) -> bool:
    if isinstance(value, ast.ListExpr):
        return True
    return isinstance(value, ast.BinOp) and (_lists_blocks(value.left) or _lists_blocks(value.right))


def _wrap(prefix: str, value: ast.Expr, indent: str) -> str:
    """`prefix + value`, breaking a long pipeline before each `|>`."""
    text = prefix + format_expr(value)
    if len(text) <= MAX_WIDTH or not isinstance(value, ast.Pipe):
        return text
    stages = [_expr(s, 2) for s in value.stages]
    continuation = "\n" + indent + INDENT + "|> "
    return prefix + stages[0] + "".join(continuation + s for s in stages[1:])

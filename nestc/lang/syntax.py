"""Text -> AST. The only module that imports lark.

Lark's exceptions never escape: every syntax error becomes a `Diagnostic` with the expected
tokens named in words, and the most common mistakes get a message of their own.
"""

from __future__ import annotations

import difflib
import re
from functools import lru_cache
from importlib import resources
from typing import Iterator

import lark
from lark import Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError

from nestc.lang import ast
from nestc.lang.diagnostics import Diagnostic, Label, NestError
from nestc.lang.source import SourceFile, Span

# Tokens after which a newline never ends a field, and the brackets inside which newlines vanish.
_CONTINUES_LINE = {"_PIPE", "COMMA", "EQUAL", "LBRACE", "PLUS", "MINUS", "STAR", "SLASH", "COLON"}
_OPENERS = {"LPAR", "LSQB"}
_CLOSERS = {"RPAR", "RSQB"}
_CLOSER_OF = {"LBRACE": "}", "LPAR": ")", "LSQB": "]"}


def grammar_text() -> str:
    return resources.files("nestc.grammars").joinpath("nest.lark").read_text(encoding="utf-8")


class _NewlinePostLexer:
    """Makes newlines significant only where they can end a field or an item.

    It never holds a token back: lark's contextual lexer lexes each token in the parser state the
    previous one left, so a buffering post-lexer would lex in the wrong state.
    """

    always_accept = ("_NL",)

    def __init__(self) -> None:
        # The last two tokens handed to the parser, and the brackets they leave open, innermost
        # last; error messages look back at them.
        self.previous: Token | None = None
        self.last: Token | None = None
        self.open: list[Token] = []

    def process(self, stream: Iterator[Token]) -> Iterator[Token]:
        depth = 0
        previous: Token | None = None
        self.previous = self.last = None
        self.open = []
        for token in stream:
            if token.type == "_NL" and (
                depth > 0 or previous is None or previous.type in _CONTINUES_LINE or previous.type == "_NL"
            ):
                continue
            if token.type in _OPENERS:
                depth += 1
            elif token.type in _CLOSERS:
                depth = max(depth - 1, 0)
            if token.type in _CLOSER_OF:
                self.open.append(token)
            elif token.type in ("RBRACE", "RPAR", "RSQB") and self.open:
                self.open.pop()
            self.previous, self.last = previous, token
            previous = token
            yield token


@lru_cache(maxsize=1)
def _parser() -> lark.Lark:
    return lark.Lark(
        grammar_text(),
        parser="lalr",
        lexer="contextual",
        strict=True,
        propagate_positions=True,
        maybe_placeholders=True,
        postlex=_NewlinePostLexer(),
    )


def _span(file: str, meta_or_token) -> Span:
    return Span(file, meta_or_token.line, meta_or_token.column, meta_or_token.end_line, meta_or_token.end_column)


def _number(text: str) -> int | float:
    if any(c in text for c in ".eE"):
        return float(text)
    return int(text)


_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\", '"': '"'}


def _unquote(token: Token) -> str:
    """The value of a string literal; `\\n`, `\\t`, `\\\\` and `\\"` are its only escapes."""
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(0)), token[1:-1])


class _Builder(Transformer):
    """Lark parse tree -> frozen AST nodes with spans."""

    def __init__(self, file: str):
        super().__init__()
        self.file = file

    def _s(self, meta_or_token) -> Span:
        return _span(self.file, meta_or_token)

    @v_args(meta=True)
    def start(self, meta, items):
        return tuple(i for i in items if i is not None)

    @v_args(meta=True)
    def import_stmt(self, meta, children):
        (path,) = children
        return ast.Import(path=_unquote(path), path_span=self._s(path), span=self._s(meta))

    @v_args(meta=True)
    def const_def(self, meta, children):
        name, value = children
        return ast.ConstDef(name=str(name), value=value, name_span=self._s(name), span=self._s(meta))

    @v_args(meta=True)
    def level_def(self, meta, children):
        name, state, body = children
        return ast.LevelDef(
            name=str(name), state=state, base=None, fields=body or (), has_body=body is not None,
            name_span=self._s(name), span=self._s(meta),
        )

    @v_args(meta=True)
    def level_extends(self, meta, children):
        name, base, body = children
        return ast.LevelDef(
            name=str(name), state=None, base=str(base), fields=body or (), has_body=body is not None,
            name_span=self._s(name), base_span=self._s(base), span=self._s(meta),
        )

    @v_args(meta=True)
    def block_def(self, meta, children):
        name, value = children
        return ast.BlockDef(name=str(name), value=value, name_span=self._s(name), span=self._s(meta))

    @v_args(meta=True)
    def section(self, meta, children):
        name, body = children
        return ast.Section(name=str(name), fields=body, name_span=self._s(name), span=self._s(meta))

    def body(self, children):
        return tuple(c for c in children if c is not None)

    @v_args(meta=True)
    def assign(self, meta, children):
        key, value = children
        return ast.Field(key=str(key), value=value, assign=True, key_span=self._s(key), span=self._s(meta))

    @v_args(meta=True)
    def binding(self, meta, children):
        key, value = children
        return ast.Field(key=str(key), value=value, assign=True, binding=True, key_span=self._s(key),
                         span=self._s(meta))

    @v_args(meta=True)
    def setting(self, meta, children):
        key, value, unit = children
        return ast.Field(
            key=str(key), value=value, unit=str(unit) if unit is not None else None,
            key_span=self._s(key), unit_span=self._s(unit) if unit is not None else None, span=self._s(meta),
        )

    @v_args(meta=True)
    def flag(self, meta, children):
        (key,) = children
        return ast.Field(key=str(key), value=None, key_span=self._s(key), span=self._s(meta))

    @v_args(meta=True)
    def pipe(self, meta, children):
        left, right = children
        stages = left.stages if isinstance(left, ast.Pipe) else (left,)
        return ast.Pipe(stages=stages + (right,), span=self._s(meta))

    def _binop(op):  # noqa: N805 - a small factory used only while the class body runs
        @v_args(meta=True)
        def build(self, meta, children):
            left, right = children
            return ast.BinOp(op=op, left=left, right=right, span=self._s(meta))

        return build

    add, sub, mul, div = _binop("+"), _binop("-"), _binop("*"), _binop("/")

    @v_args(meta=True)
    def neg(self, meta, children):
        (operand,) = children
        if isinstance(operand, ast.Number):
            return ast.Number(value=-operand.value, text="-" + operand.text, span=self._s(meta))
        return ast.Neg(operand=operand, span=self._s(meta))

    def number(self, children):
        (token,) = children
        return ast.Number(value=_number(token), text=str(token), span=self._s(token))

    def string(self, children):
        (token,) = children
        return ast.String(value=_unquote(token), span=self._s(token))

    def name(self, children):
        (token,) = children
        return ast.Name(id=str(token), span=self._s(token))

    @v_args(meta=True)
    def call(self, meta, children):
        func, args = children
        return ast.Call(func=str(func), args=args or (), func_span=self._s(func), span=self._s(meta))

    def args(self, children):
        return tuple(
            c if isinstance(c, ast.Arg) else ast.Arg(name=None, value=c, span=c.span)
            for c in children
            if c is not None
        )

    @v_args(meta=True)
    def kwarg(self, meta, children):
        name, value = children
        return ast.Arg(name=str(name), value=value, name_span=self._s(name), span=self._s(meta))

    @v_args(meta=True)
    def list(self, meta, children):
        return ast.ListExpr(items=tuple(c for c in children if c is not None), span=self._s(meta))


# The deepest syntax tree a spec may have: about 100 calls inside each other, or 200 chained
# operators (docs/language.md §1). Every later stage walks the tree recursively, so a deeper one
# is refused here, with the place where it gets too deep.
MAX_DEPTH = 200


def _too_deep(tree) -> lark.Tree | None:
    """The first node (in source order) at depth MAX_DEPTH, found without recursion, or None."""
    stack = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        if not isinstance(node, lark.Tree):
            continue
        if depth >= MAX_DEPTH:
            return node
        stack.extend((child, depth + 1) for child in reversed(node.children))
    return None


def parse(source: SourceFile) -> ast.Module:
    """Parse one file. Raises `NestError` with a single syntax diagnostic on bad input."""
    try:
        tree = _parser().parse(source.text)
        deep = _too_deep(tree)
        if deep is not None:
            span = None if deep.meta.empty else _span(source.name, deep.meta)
            raise NestError([Diagnostic(code="N0016", message=f"this expression nests more than {MAX_DEPTH} levels "
                                        "deep", span=span, label="too deep",
                                        help="define the inner part as a `block` or `const` of its own")])
        items = _Builder(source.name).transform(tree)
    except UnexpectedInput as error:
        raise NestError([syntax_diagnostic(error, source)]) from None
    except VisitError as error:  # a bug in the builder, not in the user's input
        raise error.orig_exc from None
    return ast.Module(file=source.name, items=items, comments=tuple(_scan_comments(source.text)))


def _scan_comments(text: str) -> list[ast.Comment]:
    """Comments the tree drops but the formatter must keep; a `#` inside a string is not one."""
    found = []
    for number, line in enumerate(text.split("\n"), start=1):
        in_string = False
        escaped = False
        for index, char in enumerate(line):
            if in_string:
                if escaped:
                    escaped = False
                elif char == "\\":
                    escaped = True
                elif char == '"':
                    in_string = False
            elif char == '"':
                in_string = True
            elif char == "#":
                found.append(ast.Comment(text=line[index:].rstrip(), line=number, column=index + 1))
                break
    return found


# --- syntax errors -------------------------------------------------------------------------------

_TOKEN_WORDS = {
    "NAME": "a name",
    "NUMBER": "a number",
    "STRING": "a string",
    "_NL": "a new line",
    "$END": "end of input",
    "_PIPE": "`|>`",
    "LPAR": "`(`",
    "RPAR": "`)`",
    "LSQB": "`[`",
    "RSQB": "`]`",
    "LBRACE": "`{`",
    "RBRACE": "`}`",
    "COMMA": "`,`",
    "COLON": "`:`",
    "EQUAL": "`=`",
    "PLUS": "`+`",
    "MINUS": "`-`",
    "STAR": "`*`",
    "SLASH": "`/`",
    "IMPORT": "`import`",
    "CONST": "`const`",
    "LEVEL": "`level`",
    "BLOCK": "`block`",
    "EXTENDS": "`extends`",
}

_EXPRESSION_STARTS = {"NAME", "NUMBER", "STRING", "LPAR", "LSQB", "MINUS"}


def _describe_expected(expected: set[str]) -> str:
    expected = set(expected)
    words = []
    if _EXPRESSION_STARTS <= expected:
        words.append("a value")
        expected -= _EXPRESSION_STARTS
    operators = {"PLUS", "MINUS", "STAR", "SLASH"}
    if operators & expected and "_PIPE" in expected:
        expected -= operators
        words.append("an operator")
    for name in sorted(expected, key=lambda n: (n not in _TOKEN_WORDS, _TOKEN_WORDS.get(n, n))):
        words.append(_TOKEN_WORDS.get(name, name))
    if len(words) > 6:
        words = words[:6] + ["..."]
    if len(words) == 1:
        return words[0]
    return ", ".join(words[:-1]) + " or " + words[-1]


def _describe_token(token: Token) -> str:
    if token.type == "$END":
        return "end of input"
    if token.type == "_NL":
        return "end of line" if token.value != ";" else "`;`"
    if token.type in ("NAME", "NUMBER", "STRING"):
        return f"{_TOKEN_WORDS[token.type][2:] if token.type != 'NAME' else 'name'} `{token.value}`"
    return f"`{token.value}`"


def _token_span(file: str, token: Token, source: SourceFile) -> Span:
    if token.type == "$END" or getattr(token, "line", None) is None:
        return source.end_span()
    if token.type == "_NL":
        if token.value == ";":
            return Span(file, token.line, token.column, token.line, token.column + 1)
        # Point at the end of the line the newline terminates, where the missing piece belongs.
        column = len(source.line(token.line)) + 1
        return Span(file, token.line, column, token.line, column + 1)
    end_line = token.end_line or token.line
    end_column = token.end_column or token.column + len(token.value)
    return Span(file, token.line, token.column, end_line, end_column)


def syntax_diagnostic(error: UnexpectedInput, source: SourceFile) -> Diagnostic:
    """Turn a lark error into a diagnostic; tailored messages for the usual mistakes."""
    file = source.name
    if isinstance(error, UnexpectedCharacters):
        line_text = source.line(error.line)
        char = line_text[error.column - 1] if 0 < error.column <= len(line_text) else "?"
        span = Span(file, error.line, error.column, error.line, error.column + 1)
        rest = line_text[error.column - 1:]
        if rest.startswith("//"):
            return Diagnostic(code="N0007", message="comments start with `#`", span=span,
                              label="not a comment", help="write `# ...` instead of `// ...`")
        if char == '"':
            return Diagnostic(code="N0003", message="unterminated string", span=span,
                              label="string starts here", help='close the string with `"` on the same line')
        if rest.startswith(">") and line_text[:error.column - 1].endswith(("-", ">")):
            span = Span(file, error.line, error.column - 1, error.line, error.column + 1)  # the whole `->`
        if rest.startswith(("->", ">>", "|")) or span.end_column - span.column == 2:
            return Diagnostic(code="N0004", message="pipelines are written with `|>`", span=span,
                              label="not an operator of the language", help="write `x |> proj |> silu`")
        if char in ":" and error.allowed and "EQUAL" in error.allowed:
            return _colon_for_equals(span)
        expected = _describe_expected(error.allowed or set())
        return Diagnostic(code="N0001", message=f"unexpected character `{char}`", span=span,
                          label=f"expected {expected}" if error.allowed else "not part of the language")
    if isinstance(error, UnexpectedEOF):
        span = source.end_span()
        unclosed = _unclosed(source, _still_open(None), span, None)
        if unclosed is not None:
            return unclosed
        return Diagnostic(code="N0002", message="unexpected end of input", span=span,
                          label=f"expected {_describe_expected(set(error.expected))}",
                          help=_unclosed_help(source))
    assert isinstance(error, UnexpectedToken)
    token = error.token
    span = _token_span(file, token, source)
    expected = _acceptable(error)
    # Read the parser's history before `_unclosed` parses again (which starts a new one).
    previous, opened = _token_before(token), _still_open(token)
    unclosed = _unclosed(source, opened, span, None if token.type == "$END" else _describe_token(token))
    if unclosed is not None:
        return unclosed
    tailored = _tailored(token, previous, expected, source, span)
    if tailored is not None:
        return tailored
    if token.type == "$END":
        return Diagnostic(code="N0002", message="unexpected end of input", span=span,
                          label=f"expected {_describe_expected(expected)}", help=_unclosed_help(source))
    return Diagnostic(code="N0001", message=f"unexpected {_describe_token(token)}", span=span,
                      label=f"expected {_describe_expected(expected)}")


def _colon_for_equals(span: Span) -> Diagnostic:
    return Diagnostic(code="N0005", message="named arguments are written `name=value`", span=span,
                      label="`:` is not used here", help="write `mlp(depth=2)`, not `mlp(depth: 2)`")


def _unclosed_help(source: SourceFile) -> str | None:
    stripped = _strip_strings_and_comments(source.text)
    for opener, closer, word in (("{", "}", "brace"), ("(", ")", "parenthesis"), ("[", "]", "bracket")):
        if stripped.count(opener) > stripped.count(closer):
            return f"a `{opener}` is never closed: add the matching `{closer}` ({word})"
    return None


def _still_open(offender: Token | None) -> list[Token]:
    """The brackets left open before the offending token, innermost last."""
    return [t for t in _parser().options.postlex.open if t is not offender]


def _unclosed(source: SourceFile, opened: list[Token], noticed: Span, unexpected: str | None) -> Diagnostic | None:
    """A `{`, `(` or `[` never closed, reported at its opening, when closing it is what repairs
    the file: the parser notices a missing `}` only where the next item fails to parse as a
    field, often lines later. The innermost bracket is closed where the text suggests (a body
    before the first line indented no deeper than its opening line, a call at the end of its last
    line), and the guess counts only if the parser then gets past the place it stopped before.
    `unexpected` describes what the parser stopped at; None: the end of the file."""
    if not opened:
        return None
    opener = opened[-1]
    closer = _CLOSER_OF[opener.type]
    lines = list(source.lines)
    if opener.type == "LBRACE":
        indent = _indent(source.line(opener.line))
        ends = next((n for n in range(opener.line + 1, len(lines) + 1) if _code(source, n)
                     and _indent(source.line(n)) <= indent and not _code(source, n).startswith("}")), None)
        if ends is not None and ends <= noticed.line:
            repaired = lines[:ends - 1] + ["}"] + lines[ends - 1:]
            where = f"before line {ends}, where the next item starts"
        elif ends is None:
            repaired, where, ends = lines + ["}"], "at the end of its body", len(lines) + 1
        else:
            return None
        shift = 1
    else:
        last = next((n for n in range(noticed.line - (unexpected is not None), opener.line - 1, -1)
                     if _code(source, n)), opener.line)
        code = _code(source, last)
        repaired = list(lines)
        repaired[last - 1] = code + closer + source.line(last)[len(code):]
        where, shift, ends = f"at the end of line {last}", 0, len(lines) + 1
    stopped = _error_position("\n".join(repaired) + "\n")
    if stopped is not None:
        line, column = stopped
        if line <= ends and shift:
            return None  # still stuck before the inserted `}`
        if (line - shift, column) <= (noticed.line, noticed.column):
            return None
    word = {"LBRACE": "body", "LPAR": "parenthesis", "LSQB": "list"}[opener.type]
    code = "N0012" if opener.type == "LBRACE" else "N0014"
    return Diagnostic(code=code, message=f"unclosed {word}: this `{opener.value}` is never closed",
                      span=_token_span(source.name, opener, source), label="opened here",
                      secondary=(Label(span=noticed, message="the file ends here" if unexpected is None
                                       else f"noticed here: unexpected {unexpected}"),),
                      help=f"add the matching `{closer}` {where}")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" \t"))


def _code(source: SourceFile, number: int) -> str:
    """Line `number` without its comment and trailing blanks ("" for a blank or comment line)."""
    line = source.line(number)
    comment = next((c.column for c in _scan_comments(line)), None)
    return (line if comment is None else line[:comment - 1]).rstrip()


def _error_position(text: str) -> tuple[int, int] | None:
    """Where the parser first fails on `text` (line, column), or None if it parses."""
    try:
        _parser().parse(text)
    except UnexpectedEOF:
        return (len(text.split("\n")) + 1, 0)
    except UnexpectedInput as error:
        return (error.line, error.column) if error.line > 0 else (len(text.split("\n")) + 1, 0)
    return None


def _closes_nothing(source: SourceFile, token: Token) -> bool:
    """Whether this `}` has no `{` left open before it."""
    before = "\n".join(source.lines[:token.line - 1] + (source.line(token.line)[:token.column - 1],))
    stripped = _strip_strings_and_comments(before)
    return stripped.count("}") >= stripped.count("{")


def _strip_strings_and_comments(text: str) -> str:
    out = []
    for line in text.split("\n"):
        in_string = False
        for char in line:
            if char == '"':
                in_string = not in_string
            elif char == "#" and not in_string:
                break
            elif not in_string:
                out.append(char)
        out.append("\n")
    return "".join(out)


_TOP_LEVEL_KEYWORDS = ("import", "const", "level", "block")
# Words other languages use for them; a misspelling of the keyword itself is `_misspelt_keyword`'s.
_MISPLACED_KEYWORDS = {
    "let": "const", "var": "const", "def": "const", "val": "const",
    "layer": "level", "memory": "level", "lvl": "level",
    "include": "import", "from": "import", "using": "import",
}


def _tailored(token: Token, previous: Token | None, expected: set[str], source: SourceFile,
              span: Span) -> Diagnostic | None:
    # 1. `mlp(depth: 2)` or `lr: 0.1` (YAML habits)
    if token.type == "COLON":
        if "RPAR" in expected or "COMMA" in expected:
            return _colon_for_equals(span)
        return Diagnostic(code="N0005", message="fields are written `name value` or `name = value`", span=span,
                          label="`:` is not used here", help="write `dim 128` or `key = x |> proj`")
    # 2. `level mem { ... }` without a state
    if token.type == "LBRACE" and "COLON" in expected and previous is not None:
        return Diagnostic(code="N0006", message="a level needs a state", span=span,
                          label="expected `: STATE` before the body",
                          help="write `level mem : matrix { ... }` (states: matrix, vector, mlp(...), cache(...))")
    # 3. `let x = 3`, `layer foo : matrix`, `levle foo : matrix`, `improt "x.nest"` at the top
    # level: the parser took the word for a section name and stumbles on what follows it
    keyword = None if previous is None or previous.type != "NAME" or "LBRACE" not in expected \
        else _MISPLACED_KEYWORDS.get(previous.value) or _misspelt_keyword(previous.value, _TOP_LEVEL_KEYWORDS)
    if keyword is not None:
        return Diagnostic(code="N0008", message=f"`{previous.value}` is not a keyword of the language",
                          span=_token_span(source.name, previous, source), label=f"did you mean `{keyword}`?",
                          help="top-level items start with `import`, `const`, `level`, `block`, or a section name")
    # `// comment`: the first `/` parsed as division
    if token.type == "SLASH":
        line = source.line(token.line)
        start = token.column if line[token.column - 1:token.column + 1] == "//" else token.column - 1
        if line[start - 1:start + 1] == "//":
            return Diagnostic(code="N0007", message="comments start with `#`",
                              span=Span(source.name, token.line, start, token.line, start + 2),
                              label="not a comment", help="write `# ...` instead of `// ...`")
    # `level a extnds b`
    if token.type == "NAME" and "EXTENDS" in expected and _misspelt_keyword(token.value, ["extends"]):
        return Diagnostic(code="N0008", message=f"`{token.value}` is not a keyword of the language", span=span,
                          label="did you mean `extends`?",
                          help="a level is `level NAME : STATE { ... }` or `level NAME extends BASE { ... }`")
    # 4. `import lib/titans.nest` without quotes
    if "STRING" in expected and previous is not None and previous.type == "IMPORT":
        return Diagnostic(code="N0009", message="import paths are strings", span=span,
                          label="expected a quoted path", help='write `import "lib/titans.nest"`')
    # 5. `vocab 256, dim 128` inside a body
    if token.type == "COMMA" and "_NL" in expected:
        return Diagnostic(code="N0010", message="fields are separated by new lines or `;`, not `,`", span=span,
                          label="unexpected `,`", help="put each field on its own line, or write `vocab 256; dim 128`")
    # 6. `==` or `:=`
    if token.type == "EQUAL" and previous is not None and previous.type in ("EQUAL", "COLON"):
        return Diagnostic(code="N0011", message="assignment is a single `=`", span=span,
                          label="unexpected `=`", help="write `key = x |> proj`")
    # 7. a field that ran onto the next one: in `vocab 256 dim 128` the parser read `dim` as the
    # unit of `vocab 256` and stumbles on `128`
    if expected <= {"_NL", "RBRACE"} and previous is not None and previous.type == "NAME" \
            and token.type not in ("_NL", "RBRACE", "$END"):
        return Diagnostic(code="N0010", message="fields are separated by new lines or `;`",
                          span=_token_span(source.name, previous, source),
                          label="this looks like the start of another field",
                          help=f"put `{previous.value}` on a new line, or separate the fields with `;`")
    # 8. a `}` too many (a `{` or `(` never closed is `_unclosed`'s)
    if token.type == "RBRACE" and "RBRACE" not in expected and _closes_nothing(source, token):
        return Diagnostic(code="N0013", message="unmatched `}`", span=span, label="no body is open here",
                          help="remove this `}` or add the `{` it closes")
    # 9. a missing value: `key =` or `every` at the end of a line
    if token.type in ("_NL", "RBRACE") and _EXPRESSION_STARTS <= expected:
        return Diagnostic(code="N0015", message="missing value", span=span, label="expected a value here",
                          help="every field needs a value, e.g. `every 16` or `key = x |> proj`")
    return None


def _misspelt_keyword(word: str, keywords) -> str | None:
    """The keyword `word` misspells: closer than `closest`'s names (a field such as `every`
    written at the top level is no misspelt `level`)."""
    found = difflib.get_close_matches(word.lower(), keywords, n=1, cutoff=0.75)
    return found[0] if found else None


def _acceptable(error: UnexpectedToken) -> set[str]:
    """The tokens the parser could really take here. LALR merges states, so the table's expected
    set can list tokens that would fail one step later; the interactive parser tries each one."""
    parser = getattr(error, "interactive_parser", None)
    if parser is None:
        return set(error.expected)
    try:
        return set(parser.accepts()) or set(error.expected)
    except UnexpectedInput:
        return set(error.expected)


def _token_before(token: Token) -> Token | None:
    """The token before the offending one. The contextual lexer rejects a token before the
    post-lexer hands it on, so the offender may or may not be the last token handed on."""
    history = _parser().options.postlex
    if history.last is not None and history.last is token:
        return history.previous
    return history.last

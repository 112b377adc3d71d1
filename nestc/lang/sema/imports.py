"""Loading: parse a file and the files it imports, and collect its definitions and sections."""

from __future__ import annotations

import errno
import os
import stat

from nestc.lang import ast, ir, schema
from nestc.lang.diagnostics import Label, NestError, did_you_mean
from nestc.lang.sema.context import Definition, Part
from nestc.lang.source import SourceFile, Span

# (the outer update's `step`, `rows` and `cols` too: a constant of that name would stand for them there)
RESERVED = (
    {schema.INPUT_NAME, schema.SELF_NAME, *schema.BOOLEANS, *ir.STREAM_NAMES, "step", "rows", "cols"}
    | set(schema.STAGES) | set(schema.BLOCKS) | set(schema.SEARCH) | set(schema.GATE_SOURCES)
)


MAX_SOURCE_BYTES = 1 << 20  # a spec is a page or two of text; this bounds a hostile one


def read_source(path: str) -> SourceFile:
    """A spec's text, read only from a regular file of at most MAX_SOURCE_BYTES: a FIFO would
    block the read forever and a link to /dev/zero never ends. A UTF-8 byte-order mark is
    dropped. Raises OSError (its strerror says why) or UnicodeDecodeError."""
    if "\0" in path:
        raise OSError(errno.EINVAL, "the path contains a NUL byte")
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise OSError(errno.EINVAL, "not a regular file")
    with open(path, "rb") as handle:
        data = handle.read(MAX_SOURCE_BYTES + 1)
    if len(data) > MAX_SOURCE_BYTES:
        raise OSError(errno.EFBIG, f"larger than {MAX_SOURCE_BYTES} bytes, more than any spec needs")
    return SourceFile(path, data.decode("utf-8").removeprefix("\ufeff"))


def import_path(importer: str, path: str) -> str:
    """Where `import "PATH"` in the file `importer` reads from: relative to the importing file."""
    return os.path.normpath(os.path.join(os.path.dirname(importer), path))


class Loader(Part):
    """Parses the main file and its imports, recording their definitions and sections."""

    def load(self, source: SourceFile, import_stack: tuple[str, ...]) -> ast.Module | None:
        from nestc.lang import syntax  # lark is only needed once there is text to parse

        self.analysis.sources.add(source)
        try:
            module = syntax.parse(source)
        except NestError as error:
            self.analysis.diagnostics.extend(error.diagnostics)
            return None
        self.analysis.modules[source.name] = module
        for item in module.items:
            if isinstance(item, ast.Import):
                self._import(item, source.name, import_stack + (source.name,))
            elif isinstance(item, ast.ConstDef):
                self._define(item.name, "const", item, item.name_span)
            elif isinstance(item, ast.LevelDef):
                self._define(item.name, "level", item, item.name_span)
            elif isinstance(item, ast.BlockDef):
                self._define(item.name, "block", item, item.name_span)
        return module

    def _import(self, item: ast.Import, importer: str, import_stack: tuple[str, ...]) -> None:
        if not item.path.endswith(".nest"):
            self.error("N0115", f"cannot import `{item.path}`: imports name `.nest` files", item.path_span,
                       label="not a .nest file")
            return
        path = import_path(importer, item.path)
        if path in import_stack:
            chain = " -> ".join(import_stack[import_stack.index(path):] + (path,))
            self.error("N0115", "import cycle", item.path_span, label="imports a file that imports this one",
                       notes=(f"the cycle: {chain}",))
            return
        if path in self.analysis.modules:
            return
        try:
            # An imported file that `--set` changed is read from its changed text (lang/overrides.py).
            source = self.analysis.replaced_imports.get(path) or read_source(path)
        except (OSError, UnicodeDecodeError) as error:
            reason = error.strerror if isinstance(error, OSError) and error.strerror else "not UTF-8 text"
            self.error("N0115", f"cannot import `{item.path}`: {reason.lower()}", item.path_span,
                       label=f"looked for {path}", help="import paths are relative to the importing file")
            return
        self.load(source, import_stack)

    def _define(self, name: str, kind: str, node, span: Span | None) -> None:
        if name in RESERVED or name in schema.OP_TABLES["state"]:
            what = "a built-in name" if name in RESERVED else "a state"
            self.error("N0123", f"`{name}` is {what} and cannot name a {kind}", span,
                       label="reserved", help=f"choose another name, e.g. `{name}_{kind}`")
            return
        if name in self.definitions:
            previous = self.definitions[name]
            self.error("N0102", f"`{name}` is defined twice", span, label=f"second definition ({kind})",
                       secondary=(Label(span=previous.span, message=f"first defined here ({previous.kind})"),)
                       if previous.span else ())
            return
        self.definitions[name] = Definition(kind, node, span)

    def add_section(self, section: ast.Section) -> None:
        if section.name not in schema.SECTIONS:
            self.error("N0103", f"unknown section `{section.name}`", section.name_span, label="not a section",
                       help=did_you_mean(section.name, schema.SECTIONS))
            return
        if section.name in self.sections:
            self.error("N0102", f"section `{section.name}` is given twice", section.name_span,
                       secondary=(Label(span=self.sections[section.name].name_span, message="first given here"),))
            return
        self.sections[section.name] = section

"""The intermediate representation: a checked spec with every name resolved and every default
filled in. Frozen; spans excluded from equality; the canonical dump of a choice-free program is
hashed into its variant id.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import Union

from nestc.lang.source import Span

def _span_field():
    """A span attribute: defaults to None and takes no part in equality or repr."""
    return field(default=None, compare=False, repr=False)


# --- search-space values (kept in place; enumeration is nestc.search.space's job) -----------------------

@dataclass(frozen=True, slots=True, kw_only=True)
class Choice:
    options: tuple
    name: str | None = None
    span: Span | None = _span_field()


@dataclass(frozen=True, slots=True, kw_only=True)
class Range:
    low: float
    high: float
    step: float = 1
    name: str | None = None
    span: Span | None = _span_field()


@dataclass(frozen=True, slots=True, kw_only=True)
class LogUniform:
    low: float
    high: float
    name: str | None = None
    span: Span | None = _span_field()


SEARCH_TYPES = (Choice, Range, LogUniform)


# --- operators and pipelines ---------------------------------------------------------------------

@dataclass(frozen=True, slots=True, kw_only=True)
class Op:
    """A schema operator with every argument present, in schema order."""

    name: str
    args: tuple[tuple[str, object], ...] = ()
    span: Span | None = _span_field()

    def arg(self, name: str):
        return dict(self.args)[name]


@dataclass(frozen=True, slots=True, kw_only=True)
class LevelRef:
    """A pipeline stage that reads another level (generation edge), or the level itself."""

    level: str
    span: Span | None = _span_field()


@dataclass(frozen=True, slots=True, kw_only=True)
class Pipeline:
    """Stages applied to the level's input x, left to right."""

    stages: tuple  # of Op | LevelRef | Choice
    span: Span | None = _span_field()


@dataclass(frozen=True, slots=True, kw_only=True)
class Constant:
    value: object  # a number or a search value
    span: Span | None = _span_field()


Gate = Union[Constant, Op, Pipeline]  # Op is `learned(...)`


@dataclass(frozen=True, slots=True, kw_only=True)
class Frequency:
    """`tokens`: in-sequence update period (0 = frozen in sequence); `steps`: outer update period."""

    tokens: object = 0
    steps: object = 1
    span: Span | None = _span_field()


@dataclass(frozen=True, slots=True, kw_only=True)
class Level:
    name: str
    state: Op
    key: Pipeline | None
    value: Pipeline | None
    query: Pipeline | None
    lr: Gate | None
    retain: Gate | None
    momentum: Gate | None
    gamma: Gate | None
    objective: Op | Choice | None
    optimizer: Op | Choice | None
    order: object
    output: Op | Choice
    every: Frequency
    read: object
    init: Op | Choice
    meta: object
    heads: object
    span: Span | None = _span_field()


# --- blocks --------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True, kw_only=True)
class UseLevel:
    level: str
    span: Span | None = _span_field()


@dataclass(frozen=True, slots=True, kw_only=True)
class Norm:
    kind: str  # rmsnorm | layernorm | identity
    span: Span | None = _span_field()


@dataclass(frozen=True, slots=True, kw_only=True)
class Sequence:
    items: tuple
    span: Span | None = _span_field()


@dataclass(frozen=True, slots=True, kw_only=True)
class Residual:
    body: object
    span: Span | None = _span_field()


@dataclass(frozen=True, slots=True, kw_only=True)
class Parallel:
    branches: tuple
    combine: object
    span: Span | None = _span_field()


@dataclass(frozen=True, slots=True, kw_only=True)
class Gated:
    main: object
    gate: object
    span: Span | None = _span_field()


@dataclass(frozen=True, slots=True, kw_only=True)
class MemoryAsContext:
    memory: str
    attention: str
    segment: object
    persistent: object
    span: Span | None = _span_field()


Block = Union[UseLevel, Norm, Sequence, Residual, Parallel, Gated, MemoryAsContext, Choice]


@dataclass(frozen=True, slots=True, kw_only=True)
class Model:
    vocab: int
    dim: object
    heads: object
    layers: object
    block: Block
    norm: object
    tie_embeddings: object
    span: Span | None = _span_field()


@dataclass(frozen=True, slots=True, kw_only=True)
class Train:
    optimizer: Op | Choice
    schedule: Op | Choice
    context: object
    batch: object
    steps: object
    clip: object
    seed: object
    span: Span | None = _span_field()


@dataclass(frozen=True, slots=True, kw_only=True)
class Program:
    """A checked spec: the levels its model uses (plus library levels), the model, the outer level."""

    file: str
    levels: tuple[Level, ...]
    model: Model | None
    train: Train
    span: Span | None = _span_field()

    def level(self, name: str) -> Level:
        return next(level for level in self.levels if level.name == name)

    @property
    def level_names(self) -> tuple[str, ...]:
        return tuple(level.name for level in self.levels)


# --- printing and hashing ------------------------------------------------------------------------

def _format_scalar(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return value
    if value is None:
        return "-"
    return str(value)


def format_value(value) -> str:
    """One-line rendering of an IR value, in the spec's own notation."""
    if isinstance(value, Op):
        if not value.args:
            return value.name
        return f"{value.name}(" + ", ".join(f"{k}={format_value(v)}" for k, v in value.args) + ")"
    if isinstance(value, LevelRef):
        return value.level
    if isinstance(value, Pipeline):
        return " |> ".join(["x"] + [format_value(s) for s in value.stages])
    if isinstance(value, Constant):
        return format_value(value.value)
    if isinstance(value, Frequency):
        if value.tokens == 0:
            return "frozen" if value.steps == 1 else f"{format_value(value.steps)} steps"
        return f"{format_value(value.tokens)} tokens" + ("" if value.steps == 1 else f", {format_value(value.steps)} steps")
    if isinstance(value, Choice):
        body = ", ".join(format_value(o) for o in value.options)
        return f"choice({body}" + (f", name={value.name!r}" if value.name else "") + ")"
    if isinstance(value, Range):
        return f"range({format_value(value.low)}, {format_value(value.high)}, {format_value(value.step)})"
    if isinstance(value, LogUniform):
        return f"loguniform({format_value(value.low)}, {format_value(value.high)})"
    if isinstance(value, UseLevel):
        return value.level
    if isinstance(value, Norm):
        return value.kind
    if isinstance(value, Sequence):
        return " |> ".join(format_value(i) for i in value.items)
    if isinstance(value, Residual):
        return f"residual({format_value(value.body)})"
    if isinstance(value, Parallel):
        return "parallel(" + ", ".join(format_value(b) for b in value.branches) + f", combine={format_value(value.combine)})"
    if isinstance(value, Gated):
        return f"gated({format_value(value.main)}, {format_value(value.gate)})"
    if isinstance(value, MemoryAsContext):
        return (f"mac(memory={value.memory}, attention={value.attention}, "
                f"segment={format_value(value.segment)}, persistent={format_value(value.persistent)})")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    return _format_scalar(value)


def dump(program: Program) -> str:
    """The canonical text of a program: stable across formatting, used for goldens and hashing."""
    lines = [f"program {program.file}"]
    for level in program.levels:
        lines.append(f"  level {level.name}")
        for f in dataclasses.fields(level):
            if f.name in ("name", "span"):
                continue
            value = getattr(level, f.name)
            if value is None:
                continue
            lines.append(f"    {f.name:<10} {format_value(value)}")
    if program.model is not None:
        lines.append("  model")
        for f in dataclasses.fields(program.model):
            if f.name != "span":
                lines.append(f"    {f.name:<10} {format_value(getattr(program.model, f.name))}")
    lines.append("  train")
    for f in dataclasses.fields(program.train):
        if f.name != "span":
            lines.append(f"    {f.name:<10} {format_value(getattr(program.train, f.name))}")
    return "\n".join(lines) + "\n"


def variant_id(program: Program) -> str:
    """A short content hash of the program, independent of file name and formatting."""
    body = dump(program).split("\n", 1)[1]
    return hashlib.sha256(body.encode()).hexdigest()[:12]


def contains_search(value) -> bool:
    """Whether a search-space value stands anywhere inside `value`."""
    if isinstance(value, SEARCH_TYPES):
        return True
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return any(contains_search(getattr(value, f.name)) for f in dataclasses.fields(value) if f.name != "span")
    if isinstance(value, (tuple, list)):
        return any(contains_search(v) for v in value)
    return False

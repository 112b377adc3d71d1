"""The intermediate representation: a checked spec with every name resolved and every default
filled in. Frozen; spans excluded from equality; the canonical dump of a choice-free program is
hashed into its variant id.

Every node lists the nodes inside it with `children()`; `walk` visits a whole subtree. Blocks also
name their sub-blocks (`sub_blocks()`), and `walk_blocks` joins the names into paths. A path names
the block's parameters in state dicts (`layers.0.parts.b_0_r_1.tokens`): the names are part of the
checkpoint format.
"""

from __future__ import annotations

import dataclasses
import hashlib
import operator
from dataclasses import dataclass, field
from typing import Iterator, Union

from nestc.lang.source import Span

def _span_field():
    """A span attribute: defaults to None and takes no part in equality or repr."""
    return field(default=None, compare=False, repr=False)


class Node:
    """A node of the IR. Fields hold nodes, plain values, or tuples of either."""

    __slots__ = ()

    def children(self) -> tuple[Node, ...]:
        """The nodes directly inside this one, in field order (tuples are looked into)."""
        found: list[Node] = []
        for f in dataclasses.fields(self):
            if f.name != "span":
                _collect_nodes(getattr(self, f.name), found)
        return tuple(found)


def _collect_nodes(value, found: list[Node]) -> None:
    if isinstance(value, Node):
        found.append(value)
    elif isinstance(value, tuple):
        for item in value:
            _collect_nodes(item, found)


def walk(node: Node) -> Iterator[Node]:
    """`node` and every node inside it, depth first, each before its children."""
    yield node
    for child in node.children():
        yield from walk(child)


# --- search-space values (kept in place; enumeration is nestc.search.space's job) -----------------------

@dataclass(frozen=True, slots=True, kw_only=True)
class Choice(Node):
    options: tuple[Option, ...]
    name: str | None = None
    span: Span | None = _span_field()


@dataclass(frozen=True, slots=True, kw_only=True)
class Range(Node):
    low: Number
    high: Number
    step: Number = 1
    name: str | None = None
    span: Span | None = _span_field()


@dataclass(frozen=True, slots=True, kw_only=True)
class LogUniform(Node):
    low: Number
    high: Number
    name: str | None = None
    span: Span | None = _span_field()


SEARCH_TYPES = (Choice, Range, LogUniform)
SearchValue = Union[Choice, Range, LogUniform]
Number = Union[int, float]
Value = Union[int, float, bool, str, SearchValue]  # a setting: a plain value, or one to search over


# --- operators and pipelines ---------------------------------------------------------------------

@dataclass(frozen=True, slots=True, kw_only=True)
class Op(Node):
    """A schema operator with every argument present, in schema order."""

    name: str
    args: tuple[tuple[str, Value], ...] = ()
    span: Span | None = _span_field()

    def arg(self, name: str):
        return dict(self.args)[name]


@dataclass(frozen=True, slots=True, kw_only=True)
class LevelRef(Node):
    """A pipeline stage that reads another level (generation edge), or the level itself."""

    level: str
    span: Span | None = _span_field()


@dataclass(frozen=True, slots=True, kw_only=True)
class Pipeline(Node):
    """Stages applied to the level's input x, left to right."""

    stages: tuple[Stage, ...]
    span: Span | None = _span_field()


@dataclass(frozen=True, slots=True, kw_only=True)
class Constant(Node):
    """A number, or one number per head (`[0.9, 0.99]`)."""

    value: Number | SearchValue | tuple[Number, ...]
    span: Span | None = _span_field()


@dataclass(frozen=True, slots=True, kw_only=True)
class GateExpr(Node):
    """Arithmetic on gates, elementwise per token (a per-head value broadcasts over a head's
    channels): `op` is one of GATE_OPERATORS (two operands) or GATE_FUNCTIONS (one)."""

    op: str
    operands: tuple[Gate, ...]
    span: Span | None = _span_field()


@dataclass(frozen=True, slots=True, kw_only=True)
class LetRef(Node):
    """The value of one of the level's `let` bindings: computed once per token, its parameters
    shared by every field that names it."""

    name: str
    span: Span | None = _span_field()


ARITHMETIC = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}
GATE_OPERATORS = tuple(ARITHMETIC)
GATE_FUNCTIONS = ("neg", "exp", "log", "sigmoid", "softplus", "sqrt", "abs", "sign")
# Functions of two values, in an `update` and an optimizer level's inputs only: max(a, b), and
# pow(a, b) = a ** b (AdamW's bias correction 1 - pow(beta1, step)).
STREAM_FUNCTIONS = ("max", "pow")


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamRef(Node):
    """In an optimizer level's inputs and a level's `update` (SEMANTICS §3, optimizers as levels):
    `grad`, the served weight's gradient at the anchor; `param`, the weight before this token's
    update; `lr`, the served level's lr gate (in `update` only). In the train section's update
    (SEMANTICS §8) they are a parameter's, `lr` the scheduled one, and `step` counts the
    parameter's optimizer steps (1 at its first); `rows` and `cols` are a weight matrix's shape
    (in `matrix_update` only)."""

    name: str
    span: Span | None = _span_field()


@dataclass(frozen=True, slots=True, kw_only=True)
class OptimizerRef(Node):
    """In a level's `update`: the state of one of its optimizer levels after this token's step."""

    level: str
    span: Span | None = _span_field()


@dataclass(frozen=True, slots=True, kw_only=True)
class NewtonSchulz(Node):
    """`newton_schulz(u, steps)` in an `update`: the quintic Newton-Schulz orthogonalisation of
    each weight matrix (Muon's output map, NL eq. 52)."""

    operand: Gate
    steps: int
    span: Span | None = _span_field()


STREAM_NAMES = ("grad", "param")  # what an optimizer level's inputs read
UPDATE_NAMES = ("grad", "param", "lr")  # and what a level's `update` reads besides its optimizer levels
OUTER_UPDATE_NAMES = (*UPDATE_NAMES, "step")  # what the train section's `update` reads
MATRIX_UPDATE_NAMES = (*OUTER_UPDATE_NAMES, "rows", "cols")  # and its `matrix_update`
Stage = Union[Op, LevelRef, Choice]  # a choice of stages
Gate = Union[Constant, Op, Pipeline, GateExpr, LetRef, StreamRef, OptimizerRef, NewtonSchulz]  # Op is `learned(...)`


@dataclass(frozen=True, slots=True, kw_only=True)
class Frequency(Node):
    """`tokens`: in-sequence update period (0 = frozen in sequence); `steps`: outer update period."""

    tokens: int | SearchValue = 0
    steps: int | SearchValue = 1
    span: Span | None = _span_field()


@dataclass(frozen=True, slots=True, kw_only=True)
class Level(Node):
    name: str
    state: Op
    key: Pipeline | None
    value: Pipeline | None
    query: Pipeline | None
    lr: Gate | None
    retain: Gate | None
    momentum: Gate | None
    erase: Gate | None  # the generalised delta rule's gates (SEMANTICS §3); None: 1
    write: Gate | None
    gamma: Gate | None
    threshold: Gate | None
    objective: Op | Choice | None
    optimizer: Op | Choice | None
    order: str | Choice | None
    output: Op | Choice
    every: Frequency
    read: str | Choice
    init: Op | Choice
    meta: str | Choice | None
    heads: int | SearchValue | None
    lets: tuple[tuple[str, Gate], ...] = ()  # `let NAME = ...`, each after the bindings it names
    # True: reads divided by the normaliser's read (SEMANTICS §3); None when not normalised, so
    # that the IR (and each variant's id) of a level without it is what it was before the field.
    normalize: bool | Choice | None = None
    output_norm: str | Choice | None = None  # none: the read-out as it is
    output_gate: Pipeline | None = None
    # the generalised delta rule's write key (SEMANTICS §3); None: the value is written along lr * key
    write_key: Pipeline | None = None
    substeps: int | SearchValue = 1
    # optimizer `solve`'s ridge penalty (per head or key channel); None for every other optimizer,
    # so that the IR (and each variant's id) of other levels is what it was before the field
    ridge: Gate | None = None
    # `update = ...`: the step written with optimizer levels (SEMANTICS §3); None: -lr * grad
    update: Update | None = None
    span: Span | None = _span_field()


@dataclass(frozen=True, slots=True, kw_only=True)
class Update(Node):
    """A level's `update`: the expression added to its retained weight, and the optimizer levels
    (state `moment`) it names, each a memory of the level's gradient stream, in the order they step."""

    expression: Gate
    levels: tuple[Level, ...]
    span: Span | None = _span_field()

    def level(self, name: str) -> Level:
        return next(level for level in self.levels if level.name == name)


# --- blocks --------------------------------------------------------------------------------------

class BlockNode(Node):
    """A block of the model."""

    __slots__ = ()

    def sub_blocks(self) -> tuple[tuple[str, Block], ...]:
        """The blocks directly inside this one, each with the name that extends this block's path."""
        return ()


@dataclass(frozen=True, slots=True, kw_only=True)
class UseLevel(BlockNode):
    level: str
    span: Span | None = _span_field()


@dataclass(frozen=True, slots=True, kw_only=True)
class Norm(BlockNode):
    kind: str  # rmsnorm | layernorm | identity
    span: Span | None = _span_field()


@dataclass(frozen=True, slots=True, kw_only=True)
class Sequence(BlockNode):
    items: tuple[Block, ...]
    span: Span | None = _span_field()

    def sub_blocks(self) -> tuple[tuple[str, Block], ...]:
        return tuple((str(index), item) for index, item in enumerate(self.items))


@dataclass(frozen=True, slots=True, kw_only=True)
class Residual(BlockNode):
    body: Block
    span: Span | None = _span_field()

    def sub_blocks(self) -> tuple[tuple[str, Block], ...]:
        return (("r", self.body),)


@dataclass(frozen=True, slots=True, kw_only=True)
class Parallel(BlockNode):
    branches: tuple[Block, ...]
    combine: str | Choice  # learned | sum | mean
    span: Span | None = _span_field()

    def sub_blocks(self) -> tuple[tuple[str, Block], ...]:
        return tuple((str(index), branch) for index, branch in enumerate(self.branches))


@dataclass(frozen=True, slots=True, kw_only=True)
class Gated(BlockNode):
    main: Block
    gate: Block
    span: Span | None = _span_field()

    def sub_blocks(self) -> tuple[tuple[str, Block], ...]:
        return (("m", self.main), ("g", self.gate))


@dataclass(frozen=True, slots=True, kw_only=True)
class MemoryAsContext(BlockNode):
    memory: str
    attention: str
    segment: int | SearchValue
    persistent: int | SearchValue
    span: Span | None = _span_field()


Block = Union[UseLevel, Norm, Sequence, Residual, Parallel, Gated, MemoryAsContext, Choice]
# A choice's options have the type of the field it stands in (a list field's option is a tuple).
Option = Union[Value, tuple[Value, ...], Stage, Gate, Block]

ROOT_PATH = "b"  # the path of the model's block


def sub_block_paths(block: Block, path: str) -> tuple[tuple[str, Block], ...]:
    """The blocks directly inside `block`, each with its path (`b_0_r` is the body of the
    residual that is the first item of the model's block). A choice's options have no paths: a
    search space is frozen before parameters are named."""
    if not isinstance(block, BlockNode):
        return ()
    return tuple((f"{path}_{name}", child) for name, child in block.sub_blocks())


def walk_blocks(block: Block, path: str = ROOT_PATH) -> Iterator[tuple[str, Block]]:
    """Each block inside `block` (itself first) with its path, each before its sub-blocks."""
    yield path, block
    for child_path, child in sub_block_paths(block, path):
        yield from walk_blocks(child, child_path)


@dataclass(frozen=True, slots=True, kw_only=True)
class Model(Node):
    """The network: `layers` copies of `block`, or, when the layers differ, one block per layer in
    `pattern` (then `block` is None and `layers` is the pattern's length)."""

    vocab: int
    dim: int | SearchValue
    heads: int | SearchValue
    layers: int | SearchValue
    block: Block | None
    norm: str | Choice
    tie_embeddings: bool | Choice
    pattern: tuple[Block, ...] | None = None
    span: Span | None = _span_field()

    def layer_blocks(self) -> tuple[Block, ...]:
        """The block of each layer, first layer first (a repeated block needs a fixed `layers`)."""
        return self.pattern if self.pattern is not None else (self.block,) * self.layers

    def blocks(self) -> tuple[Block, ...]:
        """The distinct blocks of the layers, in the order they first appear."""
        return tuple(dict.fromkeys(self.pattern)) if self.pattern is not None else (self.block,)


@dataclass(frozen=True, slots=True, kw_only=True)
class Train(Node):
    optimizer: Op | Choice
    schedule: Op | Choice
    context: int | SearchValue
    batch: int | SearchValue
    steps: int | SearchValue
    clip: Number | SearchValue
    seed: int | SearchValue
    checkpoint_every: int | SearchValue
    checkpoint_minutes: Number | SearchValue
    processes: int | SearchValue
    # `optimizer gd` with its step written with optimizer levels (SEMANTICS §8): `update` for
    # every parameter, or for those that are not weight matrices where `matrix_update` is given
    update: Update | None = None
    matrix_update: Update | None = None
    span: Span | None = _span_field()


# How often a run saves itself and how many processes share its batch: train fields that leave the
# trained model unchanged, so they are left out of the variant id (a resumed run may checkpoint at
# another cadence, or run on another number of processes).
RUN_ONLY_TRAIN_FIELDS = ("checkpoint_every", "checkpoint_minutes", "processes")
OUTER_UPDATES = ("update", "matrix_update")  # the train fields that write the outer step with levels


@dataclass(frozen=True, slots=True, kw_only=True)
class Program(Node):
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


def format_value(value: Option | Frequency | None) -> str:
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
    if isinstance(value, GateExpr):
        operands = [format_value(operand) for operand in value.operands]
        if value.op in GATE_OPERATORS:  # a pipeline binds looser than arithmetic
            operands = [f"({text})" if isinstance(operand, Pipeline) else text
                        for operand, text in zip(value.operands, operands)]
        if value.op == "neg":
            return f"-({operands[0]})"
        if value.op in GATE_FUNCTIONS:
            return f"{value.op}({operands[0]})"
        if value.op in STREAM_FUNCTIONS:
            return f"{value.op}({operands[0]}, {operands[1]})"
        return f"({operands[0]} {value.op} {operands[1]})"
    if isinstance(value, (LetRef, StreamRef)):
        return value.name
    if isinstance(value, OptimizerRef):
        return value.level
    if isinstance(value, NewtonSchulz):
        return f"newton_schulz({format_value(value.operand)}, steps={value.steps})"
    if isinstance(value, Update):
        return format_value(value.expression)
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
    if isinstance(value, (Sequence, Residual, Parallel, Gated)):
        inner = [format_value(block) for _, block in value.sub_blocks()]
        if isinstance(value, Sequence):
            return " |> ".join(inner)
        if isinstance(value, Parallel):
            return "parallel(" + ", ".join(inner) + f", combine={format_value(value.combine)})"
        if isinstance(value, Residual):
            return f"residual({inner[0]})"
        return f"gated({', '.join(inner)})"
    if isinstance(value, MemoryAsContext):
        return (f"mac(memory={value.memory}, attention={value.attention}, "
                f"segment={format_value(value.segment)}, persistent={format_value(value.persistent)})")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    return _format_scalar(value)


def dump(program: Program, *, identity: bool = False) -> str:
    """The canonical text of a program: stable across formatting, used for goldens and hashing
    (`identity`: without the train fields that do not change what is trained)."""
    lines = [f"program {program.file}"]
    for level in program.levels:
        lines.extend(_level_lines(level, "  "))
    if program.model is not None:
        lines.append("  model")
        for f in dataclasses.fields(program.model):
            value = getattr(program.model, f.name)
            if f.name == "pattern" and value is not None:
                lines.extend(f"    layer {index:<4} {format_value(block)}" for index, block in enumerate(value))
            elif f.name != "span" and value is not None:  # `block` is None when `pattern` gives the layers
                lines.append(f"    {f.name:<10} {format_value(value)}")
    lines.append("  train")
    skipped = ("span", *RUN_ONLY_TRAIN_FIELDS) if identity else ("span",)
    for f in dataclasses.fields(program.train):
        value = getattr(program.train, f.name)
        if f.name in skipped or (value is None and f.name in OUTER_UPDATES):  # no update: gd's own step
            continue
        lines.append(f"    {f.name:<10} {format_value(value)}")
        if isinstance(value, Update):
            for inner in value.levels:
                lines.extend(_level_lines(inner, "        "))
    return "\n".join(lines) + "\n"


def _level_lines(level: Level, indent: str) -> list[str]:
    """A level's dump lines; its optimizer levels follow its `update`, one indent deeper."""
    lines = [f"{indent}level {level.name}"]
    for f in dataclasses.fields(level):
        if f.name in ("name", "span"):
            continue
        value = getattr(level, f.name)
        if f.name == "lets":
            lines.extend(f"{indent}  let {name:<6} {format_value(bound)}" for name, bound in value)
        elif value is not None:
            lines.append(f"{indent}  {f.name:<10} {format_value(value)}")
            if isinstance(value, Update):
                for inner in value.levels:
                    lines.extend(_level_lines(inner, indent + "    "))
    return lines


def variant_id(program: Program) -> str:
    """A short content hash of the program, independent of file name and formatting."""
    body = dump(program, identity=True).split("\n", 1)[1]
    return hashlib.sha256(body.encode()).hexdigest()[:12]


def contains_search(nodes: Node | tuple[Node, ...]) -> bool:
    """Whether a search-space value stands anywhere inside a node (or a tuple of them)."""
    roots = nodes if isinstance(nodes, tuple) else (nodes,)
    return any(isinstance(inner, SEARCH_TYPES) for root in roots for inner in walk(root))

"""Questions asked of a checked program: which levels a block uses, which levels generate another
level's inputs, where the search-space values stand. Shared by the checks, the level graph and
the backends."""

from __future__ import annotations

from collections import Counter
from typing import Iterator

from nestc import rules
from nestc.lang import ir

# The generalised delta rule's own gates (SEMANTICS §3): `erase` scales the key at which the memory
# is read for the residual (per head or per key channel), `write` the value (per head or per value
# channel).
DELTA_GATES = ("erase", "write")
# A memory level's gates: those of its optimizer, the delta rule's, then those its objective reads,
# then those only one optimizer reads (solve's ridge).
GATE_ROLES = ("lr", "retain", "momentum", *DELTA_GATES, *rules.OBJECTIVE_GATES, *rules.OPTIMIZER_GATES)
GENERATED_ROLES = ("key", "value", "query", "write_key", *GATE_ROLES)
# What a token gives once per step under `substeps N` (N of them side by side in each head); the
# retain gate decays the state once per token.
STEP_ROLES = frozenset({"key", "value", "lr", "erase", "write"})


def step_copies(level: ir.Level, role: str):
    """How many of this input or gate a token gives per head: `substeps` for a per-step role, else 1."""
    return level.substeps if role in STEP_ROLES else 1


def gate_side(role: str) -> str:
    """The side whose channels a per-channel gate has: the value's for `write`, else the key's."""
    return "value" if role == "write" else "key"


def delta_extras(level: ir.Level) -> list[str]:
    """The generalised delta rule's fields this level gives: erase, write, write_key, substeps,
    gd(implicit)."""
    extras = [role for role in (*DELTA_GATES, "write_key") if getattr(level, role) is not None]
    if level.substeps != 1:
        extras.append("substeps")
    optimizer = level.optimizer
    if isinstance(optimizer, ir.Op) and dict(optimizer.args).get("implicit"):
        extras.append("gd(implicit=true)")
    return extras


def per_channel(gate: ir.Gate | None, lets: tuple[tuple[str, ir.Gate], ...] = ()) -> bool:
    """Whether a gate gives one value per channel (`proj(per=channel)`, `learned(per=channel)`,
    or arithmetic with such a gate); `lets`: the level's bindings, which a gate may name."""
    if isinstance(gate, ir.Op) and gate.name == "learned":
        return dict(gate.args)["per"] == "channel"
    if isinstance(gate, ir.Pipeline):
        return any(isinstance(s, ir.Op) and s.name == "proj" and dict(s.args)["per"] == "channel"
                   for s in gate.stages)
    if isinstance(gate, ir.GateExpr):
        return any(per_channel(operand, lets) for operand in gate.operands)
    if isinstance(gate, ir.LetRef):
        return per_channel(dict(lets).get(gate.name), lets)
    return False


def _level_refs(value: ir.Node | None) -> set[str]:
    """Levels read as pipeline stages inside one key/value/query/gate value."""
    if value is None:
        return set()
    return {node.level for node in ir.walk(value) if isinstance(node, ir.LevelRef)}


def generators(level: ir.Level) -> set[str]:
    """Levels whose output this level reads through its key/value/query/gate pipelines."""
    return set().union(*(_level_refs(getattr(level, role)) for role in GENERATED_ROLES),
                       *(_level_refs(value) for _, value in level.lets))


def generated_roles(level: ir.Level) -> dict[str, set[str]]:
    """For each generating level, the roles (key, value, lr, ...) it generates for `level`."""
    roles: dict[str, set[str]] = {}
    for role in GENERATED_ROLES:
        for name in _level_refs(getattr(level, role)):
            roles.setdefault(name, set()).add(role)
    for binding, value in level.lets:
        for name in _level_refs(value):
            roles.setdefault(name, set()).add(f"let {binding}")
    return roles


def _levels_of(node: ir.Node) -> tuple[str, ...]:
    """The levels one block node uses itself (not those of the blocks inside it)."""
    if isinstance(node, ir.UseLevel):
        return (node.level,)
    if isinstance(node, ir.MemoryAsContext):
        return (node.memory, node.attention)
    return ()


def block_levels(block: ir.Block) -> list[str]:
    """The levels a block uses, in order, once per use; every option of a choice counts."""
    return [name for node in ir.walk(block) for name in _levels_of(node)]


def model_levels(model: ir.Model) -> list[str]:
    """The levels the layers' blocks use, in order, once per use in each distinct block."""
    return [name for block in model.blocks() for name in block_levels(block)]


def model_nodes(model: ir.Model) -> Iterator[ir.Node]:
    """Every node of every distinct layer block."""
    return (node for block in model.blocks() for node in ir.walk(block))


def reachable_levels(levels: dict[str, ir.Level | object], roots) -> set[str]:
    """The levels a model runs from `roots` (the levels its blocks use): with them, those that
    generate their inputs and those whose parameters their initial states copy, transitively.
    Entries of `levels` that are not `ir.Level`s (levels that did not check) end the search."""
    used: set[str] = set()
    pending = list(roots)
    while pending:
        name = pending.pop()
        if name in used or name not in levels:
            continue
        used.add(name)
        level = levels[name]
        if not isinstance(level, ir.Level):
            continue
        pending.extend(generators(level))
        if isinstance(level.init, ir.Op) and level.init.name == "pretrained":
            pending.append(level.init.arg("source"))
    return used


def level_uses(block: ir.Block) -> Counter:
    """How often each level is used; alternatives of a choice count once (the most of any option)."""
    if isinstance(block, ir.Choice):
        total: Counter = Counter()
        for option in block.children():
            total |= level_uses(option)
        return total
    return sum((level_uses(child) for child in block.children()), Counter(_levels_of(block)))


def first_use(block: ir.Block, level: str) -> ir.Block | None:
    """The first block node (in source order) that uses `level`."""
    return next((node for node in ir.walk(block) if level in _levels_of(node)), None)


def search_values(node: ir.Node) -> Iterator[ir.SearchValue]:
    """Every search-space value inside `node`, outermost first."""
    return (inner for inner in ir.walk(node) if isinstance(inner, ir.SEARCH_TYPES))


def is_memory(level: ir.Level) -> bool:
    """A level that a memory kernel steps: a parametric state with keys and values (the others are
    attention caches, feed-forward blocks and continuum levels, which run as whole modules)."""
    return rules.STATES[level.state.name].memory and level.key is not None

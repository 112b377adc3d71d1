"""Horizontal fusion: memory levels that run one rule on inputs of one shape are stacked along the
head axis and stepped as a single call of their segment form.

Two levels fuse when they are planned to the same segment form, are read before their update,
and agree on everything that form computes with: state (with its arguments), objective,
optimizer, output map, order, meta, heads, and the structure of their key, value and gate pipelines (the same stages with the same
arguments, reading the same other levels, or each its own state through `self`). Their weights,
gate constants and update periods may differ: parameters are stacked, and each level's anchor
moves at its own chunk ends after the call. So may their read-outs (`output_norm`,
`output_gate`): the read of a level stepped in a group is its anchor's, computed for that level
alone, and its own read-out follows, elementwise in time. The backend fuses the members of a group that it
steps together (a level and the generators it steps first, on one input), so Hope's five
self-modifying memories run as one call per segment: one convolution per pipeline position, one
read of each generator, one batched solve.

A pass over the IR and the rule registries only: it needs no torch and no built model."""

from __future__ import annotations

from dataclasses import dataclass

from nestc import rules
from nestc.lang import ir
from nestc.lang.queries import GATE_ROLES, is_memory
from nestc.passes.optimizers import closed_form

# The segment forms whose math is per (batch, head) slice, so that levels stacked along the head
# axis compute exactly what each would alone.
FUSABLE_FORMS = ("anchored", "delta", "layered", "trajectory")
# Stages that carry no parameters of their own and act on each channel or head alone, so that one
# call on stacked levels is each level's call; `proj` and `conv` stack their parameters instead.
# `rope` (position-dependent across the stacked axis) and `poly` (learned coefficients) do not fuse;
# nor do the widening feature maps `tensor_poly`, `taylor` and `square`: a level read as another's stage
# takes keys of its input's width, so the generators a level is stacked with never widen theirs.
_SHARED_STAGES = frozenset({"identity", "silu", "gelu", "relu", "tanh", "softplus", "exp", "sigmoid", "scale",
                            "elu1", "l2norm", "layernorm", "rmsnorm"})
_STACKED_STAGES = frozenset({"proj", "conv"})


@dataclass(frozen=True)
class FusionGroup:
    form: str
    levels: tuple[str, ...]

    def __str__(self) -> str:
        return f"{', '.join(self.levels)}: one {self.form} call, {len(self.levels)} levels stacked along the heads"


def fusion_groups(program: ir.Program, plans: dict) -> tuple[FusionGroup, ...]:
    """The groups of two or more levels that may run as one call, in program order."""
    by_signature: dict[tuple, list[ir.Level]] = {}
    for level in program.levels:
        signature = fusion_signature(program, level, plans[level.name].kernel)
        if signature is not None:
            by_signature.setdefault(signature, []).append(level)
    return tuple(FusionGroup(plans[members[0].name].kernel, tuple(level.name for level in members))
                 for members in by_signature.values() if len(members) > 1 and _reads_agree(members))


def fusion_signature(program: ir.Program, level: ir.Level, form: str) -> tuple | None:
    """What must be equal for levels to fuse (besides `_reads_agree`), or None when this level
    cannot fuse at all."""
    if form not in FUSABLE_FORMS or not is_memory(level):
        return None
    if rules.OBJECTIVES[level.objective.name].windowed:
        return None  # an omega window is a list of pairs per level, not a tensor to stack
    if level.lets:
        return None  # a level's bindings have no stacked form yet
    if level.normalize:
        return None  # its reads are divided after the form (forms.run_form), which a stacked call skips
    if level.write_key is not None:
        return None  # a stacked call (backends/fused.py) runs the key and value pipelines only
    if level.read != "before":
        # Levels stepped together are a level and the generators it steps first, which are read
        # before their update (the compiled backend runs read-after generators token by token).
        return None
    pipelines = []
    if not all(isinstance(getattr(level, role), ir.Pipeline) for role in ("key", "value", "query")
               if getattr(level, role) is not None):
        return None  # an input made from gates has no stacked form yet
    for role in INPUT_ROLES:
        part = _input_signature(getattr(level, role))
        if part is _UNFUSABLE:
            return None
        pipelines.append(part)
    # An update written with optimizer levels stacks as the built-in it equals (nestc/passes/optimizers.py):
    # the same built-in, on gates of the same structure.
    closed = closed_form(level)[0] if level.update is not None else None
    for moment in level.update.levels if level.update is not None else ():
        for gate in (moment.lr, moment.retain):
            part = _input_signature(gate)
            if part is _UNFUSABLE:
                return None
            pipelines.append(part)
    heads = level.heads if level.heads is not None else program.model.heads
    return (form, level.state, level.objective, level.optimizer, closed, level.output, level.order, level.meta, heads,
            tuple(pipelines))


INPUT_ROLES = ("key", "value", *GATE_ROLES)
_UNFUSABLE = object()


def _input_signature(part):
    if part is None:
        return None
    if isinstance(part, (ir.GateExpr, ir.LetRef)) or (isinstance(part, ir.Constant) and isinstance(part.value, tuple)):
        return _UNFUSABLE  # arithmetic, bindings and per-head constants have no stacked form yet
    if isinstance(part, ir.Constant):
        return "constant"  # the values may differ: the backend stacks them
    if isinstance(part, ir.Op):  # learned(...): a parameter per level, stacked (its initial value may differ)
        return ("learned", part.arg("per"))
    stages = []
    for stage in part.stages:
        if isinstance(stage, ir.LevelRef):
            stages.append("level")  # which level: `_reads_agree`
        elif isinstance(stage, ir.Op) and stage.name in _SHARED_STAGES | _STACKED_STAGES:
            stages.append(stage)
        else:
            return _UNFUSABLE
    return tuple(stages)


def _reads_agree(members: list[ir.Level]) -> bool:
    """At each pipeline position that reads a level, either every member reads the same level
    (one read, shared) or every member reads itself (`self`: one read of the stacked states)."""
    for role in INPUT_ROLES:
        pipelines = [getattr(level, role) for level in members]
        if not isinstance(pipelines[0], ir.Pipeline):
            continue
        for position, stage in enumerate(pipelines[0].stages):
            if not isinstance(stage, ir.LevelRef):
                continue
            targets = [pipeline.stages[position].level for pipeline in pipelines]
            if len(set(targets)) > 1 and targets != [level.name for level in members]:
                return False
    return True


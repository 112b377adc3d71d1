"""Planning: which segment form computes each memory level of a program, and how long a segment
may be. A pass over the IR alone (the rules' capability flags, nestc/rules/), so it needs no torch
and no built model; the compiled backend runs what it decides."""

from __future__ import annotations

import math
from dataclasses import dataclass

from nestc import rules
from nestc.lang import ir
from nestc.lang.queries import delta_extras, generators, is_memory, model_nodes, per_channel
from nestc.backends.common import concrete
from nestc.passes.fusion import FusionGroup, fusion_groups
from nestc.passes.optimizers import closed_form

MAX_SEGMENT = 64


@dataclass(frozen=True)
class LevelPlan:
    kernel: str  # frozen | anchored | delta | layered | trajectory | scan | gram | sequential | module
    reason: str = ""


@dataclass(frozen=True)
class MemoryRule:
    """What the planner reads of a memory level: its rules and its schedule (the reference's
    MemoryKernel has the same attributes, so `plan_kernel` plans a built kernel as well)."""

    state: rules.State
    objective: rules.Objective
    optimizer: rules.Optimizer
    output: rules.OutputMap
    every: int
    read: str
    order: str
    delta_extras: tuple[str, ...]  # the generalised delta rule's fields it gives (queries.delta_extras)
    # An `update` written with optimizer levels: `optimizer` is the built-in it equals, or, where
    # none does, this says why (nestc/passes/optimizers.py)
    update_obstacle: str = ""

    @classmethod
    def of(cls, level: ir.Level) -> "MemoryRule":
        optimizer, obstacle = level.optimizer, ""
        if level.update is not None:
            closed, obstacle = closed_form(level)
            optimizer = closed.optimizer if closed is not None else optimizer
        return cls(state=rules.STATES[level.state.name], objective=rules.OBJECTIVES[level.objective.name],
                   optimizer=rules.OPTIMIZERS[optimizer.name], output=rules.OUTPUTS[level.output.name],
                   every=concrete(level.every.tokens), read=level.read, order=level.order,
                   delta_extras=tuple(delta_extras(level)), update_obstacle=obstacle)


def plan_level(level: ir.Level) -> LevelPlan:
    if not is_memory(level):
        return LevelPlan("module")
    gates = [getattr(level, role) for role in ("lr", "retain", "momentum") if getattr(level, role) is not None]
    gates += [gate for moment in (level.update.levels if level.update is not None else ())
              for gate in (moment.lr, moment.retain) if gate is not None]
    return plan_kernel(MemoryRule.of(level), any(per_channel(g, level.lets) for g in gates))


def plan_kernel(kernel: MemoryRule, per_channel: bool) -> LevelPlan:
    """The first segment form (in `rules.FORMS` order) that computes this memory rule exactly.
    A form is a candidate when the level's state, objective, optimizer and output map all list it
    (nestc/rules/); `_form_obstacle` holds the conditions of each form beyond its rules. Where no
    form fits, the rule steps token by token and the plan says why: never another rule. An
    `update` that no built-in optimizer equals runs only in the scan form, which steps it literally."""
    if kernel.every == 0:
        return LevelPlan("frozen")
    parts = (kernel.state, kernel.objective, kernel.optimizer, kernel.output)
    described = ", ".join(f"{part.spec.kind} `{part.name}`" for part in parts[1:])
    if kernel.update_obstacle:
        # No built-in optimizer equals the update: only the scan form, which steps its optimizer
        # levels literally, computes it.
        if not all("scan" in part.forms for part in parts):
            return LevelPlan("sequential", f"{kernel.update_obstacle}; the scan form does not compute state "
                                           f"`{kernel.state.name}` with {described}")
        obstacle = _form_obstacle("scan", kernel, per_channel)
        return LevelPlan("sequential", f"{kernel.update_obstacle}; the scan form {obstacle}") if obstacle \
            else LevelPlan("scan")
    candidates = [form for form in rules.FORMS if form != "scan" and all(form in part.forms for part in parts)]
    if not candidates:
        return LevelPlan("sequential", f"no segment form computes state `{kernel.state.name}` with {described} "
                                       "together")
    obstacles = []
    for form in candidates:
        obstacle = _form_obstacle(form, kernel, per_channel)
        if not obstacle:
            return LevelPlan(form)
        obstacles.append(f"the {form} form {obstacle}")
    return LevelPlan("sequential", "; ".join(obstacles))


def _form_obstacle(form: str, kernel: MemoryRule, per_channel: bool) -> str:
    """Why `form` cannot compute this rule although its rules list the form, or ""."""
    if form == "gram":
        # optimizer `solve`'s only form; the checker holds it to `every 1`, read after, per-head lr and retain
        return ""
    if form == "scan":
        # It takes every token's gradient at the anchor, fixed inside a segment, from the layered
        # form's backpropagation, then steps the optimizer levels token by token.
        if kernel.every == 1:
            return "needs `every C > 1` (every token's gradient is at the previous token's state)"
        if kernel.order == "decay_first":
            return "has no `order decay_first`"
    if kernel.delta_extras and form != "delta":
        return f"does not compute the generalised delta rule ({', '.join(kernel.delta_extras)})"
    # a diagonal state with an elementwise objective is one memory per channel (forms/anchored.py)
    channels_apart = form == "anchored" and kernel.state.diagonal and kernel.objective.elementwise \
        and kernel.order == "grad_first"
    if per_channel and form not in ("delta", "trajectory") and not channels_apart:
        return "takes per-head gates only"
    if kernel.every == 1:
        if kernel.read == "before":
            return "has no `read before` for a memory updated every token"
        # Every token's gradient is taken at the previous state, which the segment forms know
        # only at the segment's start: they need gradients that do not depend on the state.
        state_free = kernel.objective.state_free_error and kernel.state.linear
        if form == "delta":
            return ""  # the UT solve is the delta rule's online form
        if not state_free:
            return (f"needs `every C > 1` (with objective `{kernel.objective.name}` on state `{kernel.state.name}` "
                    "the gradient depends on the state)")
        if form == "trajectory" and not kernel.output.identity:
            return f"needs `every C > 1` with output map `{kernel.output.name}`"
    if form == "delta" and kernel.every != 1:
        return "is the online (`every 1`) rule"
    if form == "trajectory" and kernel.order == "decay_first":
        return "has no `order decay_first`"
    return ""


@dataclass(frozen=True)
class ProgramPlan:
    """What planning decides for a program: each level's plan, the segment length, and the
    levels that run stacked as one call (`fusion.py`; none when fusion is switched off)."""

    levels: dict[str, LevelPlan]
    segment: int
    fused: tuple[FusionGroup, ...] = ()

    def __str__(self) -> str:
        lines = [f"segment length {self.segment} tokens"]
        lines += [f"  {name:12s} {plan.kernel}" + (f" ({plan.reason})" if plan.reason else "")
                  for name, plan in self.levels.items()]
        lines += [f"  fused: {group}" for group in self.fused]
        return "\n".join(lines)


def plan_program(program: ir.Program, fuse: bool = True) -> ProgramPlan:
    levels = {level.name: plan_level(level) for level in program.levels}
    return ProgramPlan(levels=levels, segment=segment_length(program, levels),
                       fused=fusion_groups(program, levels) if fuse else ())


def segment_length(program: ir.Program, plans: dict[str, LevelPlan]) -> int:
    """The longest segment (up to MAX_SEGMENT) inside which no anchor and no continuum level moves."""
    length = MAX_SEGMENT
    for level in program.levels:
        every = concrete(level.every.tokens)
        plan = plans[level.name]
        # anchored forms need the anchor fixed inside a segment, and the state keeps the anchor
        constrained = plan.kernel in ("anchored", "layered", "trajectory", "scan")
        if plan.kernel == "module" and isinstance(level.objective, ir.Op) \
                and rules.OBJECTIVES[level.objective.name].continuum:
            constrained = every > 0
        if (every > 1 and constrained) or (every > 0 and anchor_reader(program, level.name)):
            length = math.gcd(length, every)
    for node in model_nodes(program.model):
        if isinstance(node, ir.MemoryAsContext):  # a segment never straddles two MAC windows
            length = math.gcd(length, concrete(node.segment))
    return max(length, 1)


def anchor_reader(program: ir.Program, name: str) -> str:
    """What reads this level's anchor for a whole segment at once ("" when nothing does), so that the
    anchor must not move inside a segment: the levels it generates for, or its `mac` block's
    retrieval (each token's M*(q_t) at the anchor, `mac_segment`)."""
    if is_generator(program, name):
        return "the levels it generates for"
    if any(isinstance(node, ir.MemoryAsContext) and node.memory == name for node in model_nodes(program.model)):
        return "its `mac` block's retrieval"
    return ""


def is_generator(program: ir.Program, name: str) -> bool:
    """Whether any level (itself included, through `self`) reads this level as a pipeline stage."""
    return any(name in generators(level) for level in program.levels)

"""Passes over the checked IR, between the front end and the backends. Each is a `Pass`: a name,
what it decides, and a function from the program to that decision, whose text `nestc compile
--print-after NAME` prints. Passes read the IR and the rule registries only, never torch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from nestc.passes import estimate, plan


@dataclass(frozen=True)
class Pass:
    name: str
    doc: str
    run: Callable


PASSES = {p.name: p for p in (
    Pass("plan", "the segment form of each memory level and the segment length (plan.py)", plan.plan_program),
    Pass("estimate", "the parameter count and the memory the model needs (estimate.py)", estimate.estimate),
)}

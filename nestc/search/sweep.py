"""`nestc sweep`: the variants of a search space, checked, identified and sized.

Training and ranking variants needs `nestc run` (not built yet); `--dry-run` lists them.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from nestc.lang import ir
from nestc.search import space
from nestc.lang.diagnostics import Diagnostic
from nestc.lang.sema import analyze_source
from nestc.lang.source import SourceFile, SourceMap


@dataclass
class Variant:
    choices: dict[str, str]
    text: str
    diagnostics: list[Diagnostic] = field(default_factory=list)
    sources: SourceMap | None = None
    id: str | None = None
    parameters: int | None = None
    flops_per_token: float | None = None

    @property
    def ok(self) -> bool:
        return self.id is not None


def variants(path: str, sample: int | None = None, seed: int = 0) -> list[Variant]:
    """Every variant of the space (a seeded sample when it is infinite or larger than `sample`).
    Variants whose frozen spec has errors are returned with their diagnostics, never raised."""
    search = space.load(path)
    finite = search.size != math.inf
    if finite and (sample is None or search.size <= sample):
        assignments = list(search.grid())
    else:
        rng = random.Random(seed)
        assignments, seen = [], set()
        for _ in range(20 * (sample or 16)):
            assignment = search.sample(rng)
            key = tuple(sorted(assignment.items()))
            if key not in seen:
                seen.add(key)
                assignments.append(assignment)
            if len(assignments) == (sample or 16):
                break
    found = []
    for assignment in assignments:
        text = search.freeze(assignment)
        result = analyze_source(SourceFile(path, text))
        variant = Variant(choices=search.describe(assignment), text=text, sources=result.sources,
                          diagnostics=[d for d in result.diagnostics if d.is_error])
        if result.ok:
            variant.id = ir.variant_id(result.program)
            variant.parameters, variant.flops_per_token = measure(result.program)
        found.append(variant)
    return found


def measure(program: ir.Program) -> tuple[int, float]:
    """Parameter count, and an estimate of forward FLOPs per token: two per parameter used in a
    matmul, plus each memory's read, inner gradient and update (about six per state entry), plus
    attention's scores and mix over an average context of half the training length."""
    from nestc.backends.reference import CacheLevel, MemoryLevel, build

    model = build(program)
    parameters = sum(p.numel() for p in model.parameters())
    flops = 2.0 * parameters
    if model.head is None:  # the tied LM head multiplies by the embedding once more
        flops += 2.0 * model.embedding.weight.numel()
    context = program.train.context
    for layer in model.layers:
        for level in layer.levels.values():
            if isinstance(level, MemoryLevel):
                flops += 6.0 * sum(math.prod(shape) for shape in level.kernel._shapes)
            elif isinstance(level, CacheLevel):
                window = level.window or context
                flops += 4.0 * model.dim * min(window, context / 2)
    return parameters, flops

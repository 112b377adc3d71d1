"""The compiled backend's segment forms: each computes one family of memory rules over a whole
segment exactly as the reference does token by token. `KERNELS` maps a plan's form to its
function (`run_form` runs one and closes the chunk); which rules a form computes is listed by the
rules themselves (nestc/rules/, `forms`) and chosen by nestc/passes/plan.py."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from nestc.backends.forms.anchored import anchored_segment
from nestc.backends.forms.common import finish_segment
from nestc.backends.forms.delta import delta_segment
from nestc.backends.forms.gram import gram_segment
from nestc.backends.forms.layered import layered_segment
from nestc.backends.forms.scan import scan_segment
from nestc.backends.forms.trajectory import trajectory_segment
from nestc.backends.optimizers import lowered
from nestc.backends.state import LevelState


def sequential_segment(kernel, state: LevelState, k, v, q, gates, start: int) -> Tensor:
    outputs = []
    for t in range(k.shape[2]):
        at_t = {role: gate[:, :, t] for role, gate in gates.items()}
        outputs.append(kernel.step(state, k[:, :, t], v[:, :, t], q[:, :, t] if q is not None else None,
                                   at_t, start + t))
    return torch.stack(outputs, dim=2) if q is not None else None


KERNELS = {"anchored": anchored_segment, "delta": delta_segment, "layered": layered_segment,
           "trajectory": trajectory_segment, "scan": scan_segment, "gram": gram_segment,
           "sequential": sequential_segment}


def run_form(form: str, kernel, state: LevelState, k, v, q, gates, start) -> Tensor | None:
    """One segment of a memory rule in `form`: the form advances the weights (and returns the
    reads of q, None for q None: nobody reads the memory), then the anchor moves where a chunk
    closes. Stacked levels (backends/fused.py) call the form once and close each level's chunks
    themselves. The sequential form steps the reference kernel, which moves its own anchor and
    normalises its own reads; the other forms see a normalised memory's unit value channel as one
    more value channel (`MemoryKernel.with_unit_value`)."""
    if form == "sequential":
        return sequential_segment(kernel, state, k, v, q, gates, start)
    if kernel.closed_form is not None:  # optimizer levels, run as the built-in they equal
        return lowered(functools.partial(_segment_form, form), kernel.closed_form, kernel, state, k, v, q, gates,
                       start)
    return _segment_form(form, kernel, state, k, v, q, gates, start)


def _segment_form(form: str, kernel, state: LevelState, k, v, q, gates, start) -> Tensor | None:
    y = KERNELS[form](kernel, state, k, kernel.with_unit_value(v), q, gates, start)
    finish_segment(kernel, state, start, k.shape[2], gates["retain"])
    return kernel.normalized_read(y)

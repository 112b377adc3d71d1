"""The compiled backend's segment forms: each computes one family of memory rules over a whole
segment exactly as the reference does token by token. `KERNELS` maps a plan's form to its
function; which rules a form computes is listed by the rules themselves (nestc/rules/, `forms`)
and chosen by backends/planning.py."""

from __future__ import annotations

import torch
from torch import Tensor

from nestc.backends.forms.anchored import anchored_segment, delta_segment
from nestc.backends.forms.layered import layered_segment
from nestc.backends.forms.trajectory import trajectory_segment
from nestc.backends.state import LevelState


def sequential_segment(kernel, state: LevelState, k, v, q, gates, start: int) -> Tensor:
    outputs = []
    for t in range(k.shape[2]):
        at_t = {role: gate[:, :, t] for role, gate in gates.items()}
        outputs.append(kernel.step(state, k[:, :, t], v[:, :, t], q[:, :, t] if q is not None else None,
                                   at_t, start + t))
    return torch.stack(outputs, dim=2) if q is not None else None



KERNELS = {"anchored": anchored_segment, "delta": delta_segment, "layered": layered_segment,
           "trajectory": trajectory_segment, "sequential": sequential_segment}

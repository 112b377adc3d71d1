"""The `scan` form: a level whose `update` names optimizer levels that no built-in optimizer equals
(Adam-like, sign or preconditioned momentum, delta or deep momentum, sums of levels), on matrix and
MLP memories updated `every C > 1` tokens.

Inside a segment the anchor is fixed, so every token's gradient is known at once: the layered
form's backpropagation written out by hand gives each linear map's inputs u_t and output errors
d_t at the anchor, and g_t = d_t u_t^T. What is left runs token by token, and it is cheap: the
optimizer levels step on g_t and the update is evaluated (`LevelOptimizer.step`, the rule the
reference runs, with the buffers' gradients from their objectives' closed-form errors rather
than autograd), W_t = retained(W_{t-1}) + update_t, and a read after the update applies W_t. The
reference instead runs the memory forward and autograd for every token."""

from __future__ import annotations

import torch
from torch import Tensor

from nestc.backends.forms.common import apply_sequence, objective_gates
from nestc.backends.forms.layered import errors_closed_form
from nestc.backends.state import LevelState


def scan_segment(kernel, state: LevelState, k, v, q, gates, start: int) -> Tensor | None:
    """k, q [B, H, S, dk], v [B, H, S, dv], gates [B, H, S] (per head, the planner's condition).
    Returns the reads [B, H, S, dv] (None for q None) and advances `state`: its weights and its
    optimizer levels' `moments`. Under `order grad_first` (the planner's condition) the gradient is
    at the anchor itself, undecayed."""
    inputs, errors = errors_closed_form(kernel, state.anchor, k, v, None, objective_gates(kernel, gates))
    optimizer = kernel.level_optimizer
    reads = []
    for t in range(k.shape[2]):
        at_t = {role: gate[:, :, t] for role, gate in gates.items()}
        new = []
        for index, (weight, u, d) in enumerate(zip(state.weights, inputs, errors)):
            map_input = u[:, :, t]
            grad = d[:, :, t, :, None] * map_input[:, :, None, :]
            update = optimizer.step(state.moments, index, weight, grad, at_t, by_hand=True)
            new.append(kernel.retention.retained(kernel.retention_args, weight, map_input, at_t, kernel._scale)
                       + update)
        if kernel.meta == "stop":
            new = [w.detach() for w in new]
        state.weights = new
        if q is not None and kernel.read == "after":
            reads.append(kernel.evaluate(new, q[:, :, t]))
    if q is None:
        return None
    if kernel.read == "before":  # every read of the segment is at the anchor
        return apply_sequence(kernel, state.anchor, q.transpose(1, 2)).transpose(1, 2)
    return torch.stack(reads, dim=2)

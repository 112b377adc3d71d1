"""The `anchored` form: matrix and vector memories whose every gradient in the segment sits at one
state."""

from __future__ import annotations

import torch
from torch import Tensor

from nestc.backends.forms.common import decay_matrix, objective_gates
from nestc.backends.state import LevelState


def anchored_segment(kernel, state: LevelState, k, v, q, gates, start: int) -> Tensor:
    """Matrix/vector memory with every gradient of the segment at one state. k, q [B, H, S, dk],
    v [B, H, S, dv], gates [B, H, S] (or per channel [B, H, S, d] on a diagonal state with an
    elementwise objective, the planner's condition). Returns reads [B, H, S, dv] and advances
    `state`."""
    if any(gate.dim() == 4 for gate in gates.values()):
        return _channels_as_heads(kernel, state, k, v, q, gates, start)
    return _anchored(kernel, state, k, v, q, gates, start)


def _channels_as_heads(kernel, state: LevelState, k, v, q, gates, start: int) -> Tensor:
    """A diagonal memory with per-channel gates: each of its d channels per head is a one-channel
    memory of its own (its error is elementwise), so the segment runs as H * d heads of width 1."""
    batch, heads, size, width = k.shape

    def apart(x: Tensor) -> Tensor:  # [B, H, S, d] -> [B, H * d, S, 1]
        return x.permute(0, 1, 3, 2).reshape(batch, heads * width, size, 1)

    def gate_apart(gate: Tensor) -> Tensor:  # [B, H, S] or [B, H, S, d] -> [B, H * d, S]
        gate = gate if gate.dim() == 4 else gate[..., None].expand(batch, heads, size, width)
        return apart(gate)[..., 0]

    def states_apart(tensors: list[Tensor]) -> list[Tensor]:  # [B, H, d] -> [B, H * d, 1]
        return [t.reshape(batch, heads * width, 1) for t in tensors]

    inner = LevelState(weights=states_apart(state.weights), anchor=states_apart(state.anchor),
                       momentum=states_apart(state.momentum))
    y = _anchored(kernel, inner, apart(k), apart(v), None if q is None else apart(q),
                  {role: gate_apart(gate) for role, gate in gates.items()}, start)
    state.weights, state.momentum = ([t.reshape(batch, heads, width) for t in tensors]
                                     for tensors in (inner.weights, inner.momentum))
    return None if y is None else y[..., 0].reshape(batch, heads, width, size).permute(0, 1, 3, 2)


def _anchored(kernel, state: LevelState, k, v, q, gates, start: int) -> Tensor:
    lr, retain = gates["lr"], gates["retain"]
    matrix = not kernel.state.diagonal
    anchor = state.anchor[0]
    if kernel.order == "decay_first":
        previous = state.retain_product if state.retain_product is not None else torch.ones_like(retain[..., 0])
        decayed = previous[..., None] * torch.cumprod(retain, dim=-1)  # [B, H, S]
    if matrix:
        at_anchor = torch.einsum("bhvk,bhsk->bhsv", anchor, k)
    else:
        at_anchor = anchor[:, :, None, :] * k
    prediction = decayed[..., None] * at_anchor if kernel.order == "decay_first" else at_anchor
    error = kernel.objective.pair_error(kernel.objective_args, prediction, v, objective_gates(kernel, gates))
    key = k
    if kernel.meta != "full":
        error, key = error.detach(), k.detach()
    step = -lr[..., None] * error  # u_i = step_i key_i^T
    decay = decay_matrix(retain)  # D[t, i]
    start_decay = torch.cumprod(retain, dim=-1)  # b_t
    weights0 = state.weights[0]
    if kernel.optimizer.momentum_of_steps:
        momentum = gates["momentum"]
        inner = decay_matrix(momentum)  # M[t, i]
        kernel_matrix = decay @ inner  # K = D M
        momentum_start = torch.cumprod(momentum, dim=-1)
        carry = decay @ momentum_start[..., None]  # c_t = sum_s D[t, s] m_s
        momentum0 = state.momentum[0]
    else:
        kernel_matrix = decay
    # Reads after the update at t. With `meta stop` the written state is cut from the graph, so
    # only the query stays differentiable.
    cut = (lambda t: t.detach()) if kernel.meta == "stop" else (lambda t: t)
    if q is None or kernel.read == "before":
        y = None  # no read, or each token's read is at the anchor (below)
    elif matrix:
        scores = torch.einsum("bhtk,bhik->bhti", q, cut(key)) * cut(kernel_matrix)
        y = cut(start_decay)[..., None] * torch.einsum("bhvk,bhtk->bhtv", cut(weights0), q) + scores @ cut(step)
        if kernel.optimizer.momentum_of_steps:
            y = y + cut(carry) * torch.einsum("bhvk,bhtk->bhtv", cut(momentum0), q)
    else:
        y = cut(start_decay)[..., None] * cut(weights0)[:, :, None, :] * q + torch.einsum(
            "bhti,bhid,bhtd->bhtd", cut(kernel_matrix), cut(step * key), q)
        if kernel.optimizer.momentum_of_steps:
            y = y + cut(carry) * cut(momentum0)[:, :, None, :] * q
    # the state after the segment
    last = kernel_matrix[..., -1, :]  # [B, H, S]
    if matrix:
        new = start_decay[..., -1, None, None] * weights0 + torch.einsum("bhi,bhiv,bhik->bhvk", last, step, key)
    else:
        new = start_decay[..., -1, None] * weights0 + torch.einsum("bhi,bhid->bhd", last, step * key)
    if kernel.optimizer.momentum_of_steps:
        momentum_last = inner[..., -1, :]
        if matrix:
            new = new + carry[..., -1, :, None] * momentum0
            state.momentum = [momentum_start[..., -1, None, None] * momentum0
                              + torch.einsum("bhi,bhiv,bhik->bhvk", momentum_last, step, key)]
        else:
            new = new + carry[..., -1, :] * momentum0
            state.momentum = [momentum_start[..., -1, None] * momentum0
                              + torch.einsum("bhi,bhid->bhd", momentum_last, step * key)]
    if kernel.meta == "stop":
        new = new.detach()
        state.momentum = [m.detach() for m in state.momentum]
    state.weights = [new]
    if kernel.read == "before" and q is not None:
        before = torch.einsum("bhvk,bhtk->bhtv", anchor, q) if matrix else anchor[:, :, None, :] * q
        return before
    return y

"""The `delta` form: the online delta rule (`every 1`, l2, gd, matrix) solved exactly by the UT
transform (`common.delta_solve`), with per-head or per-key-channel gates."""

from __future__ import annotations

import torch
from torch import Tensor

from nestc.backends.forms.common import decayed_scores, delta_solve
from nestc.backends.state import LevelState


def delta_segment(kernel, state: LevelState, k, v, q, gates, start: int) -> Tensor:
    """k, q [B, H, S, dk], v [B, H, S, dv]; gates [B, H, S] or per key channel [B, H, S, dk].
    Returns the reads [B, H, S, dv] and advances `state`."""
    erase, lr, keys, targets, retain = delta_inputs(kernel, k, v, gates)
    weights0 = state.weights[0]
    write = lr * keys
    residual, decay = delta_solve(weights0, erase, write, targets, retain, kernel.order)
    start_decay = torch.cumprod(retain, dim=2)  # [B, H, S, C]
    if kernel.meta != "full":  # the inner gradient -R k^T is a constant of the outer level; lr is not
        residual, write = residual.detach(), lr * keys.detach()
    cut = (lambda t: t.detach()) if kernel.meta == "stop" else (lambda t: t)
    y = None
    if q is not None:
        scores = decayed_scores(q, cut(write), cut(decay))
        y = torch.einsum("bhvk,bhtk->bhtv", cut(weights0), cut(start_decay) * q) + scores @ cut(residual)
    final_decay = decay[:, :, :, -1, :].transpose(-1, -2)  # [B, H, S, C]
    new = weights0 * start_decay[:, :, -1, None, :] + torch.einsum("bhiv,bhik->bhvk", residual, final_decay * write)
    state.weights = [new.detach() if kernel.meta == "stop" else new]
    return y


def delta_inputs(kernel, k: Tensor, v: Tensor, gates: dict[str, Tensor]):
    """The erase keys e, the lr [B, H, S, 1 or dk], the keys, the targets u [B, H, S, dv] and the
    retain gate [B, H, S, C] of the segment (a per-head gate [B, H, S] gets a channel axis of 1)."""
    def channels(gate: Tensor) -> Tensor:
        return gate[..., None] if gate.dim() == 3 else gate

    return k, channels(gates["lr"]), k, v, channels(gates["retain"])

"""The `delta` form: the online generalised delta rule (`every 1`, l2, gd, matrix) solved exactly by
the UT transform (`common.delta_solve`): lr and retain per head or per key channel, the erase and
write gates, a write key, the implicit step and several steps per token (docs/design/SEMANTICS.md §3)."""

from __future__ import annotations

import torch
from torch import Tensor

from nestc.backends.forms.common import decayed_scores, delta_solve
from nestc.backends.state import LevelState


def delta_segment(kernel, state: LevelState, k, v, q, gates, start: int) -> Tensor:
    """k [B, H, S, N * dk], v [B, H, S, N * dv] (N = kernel.substeps, each token's N steps side by
    side), q [B, H, S, dk]; gates as `delta_inputs` reads them. Returns the reads [B, H, S, dv]
    after each token's last step and advances `state`."""
    steps = kernel.substeps
    erase, lr, keys, targets, retain = delta_inputs(kernel, k, v, gates)
    weights0 = state.weights[0]
    write = lr * keys
    # A write key (RWKV-7; one step per token, meta full: sema's conditions) writes the targets
    # along itself: the solve gives the erased part R alone, and the targets add their own terms.
    written = gates.get("write_key")
    residual, decay = delta_solve(weights0, erase, write, targets, retain, kernel.order, written)
    start_decay = torch.cumprod(retain, dim=2)  # [B, H, S * N, C]
    if kernel.meta != "full":  # the inner gradient -R k^T is a constant of the outer level; lr is not
        residual, write = residual.detach(), lr * keys.detach()
    cut = (lambda t: t.detach()) if kernel.meta == "stop" else (lambda t: t)
    y = None
    if q is not None:
        # each token reads after its last step: the flat positions N - 1, 2N - 1, ...
        last = slice(steps - 1, None, steps)
        scores = decayed_scores(q, cut(write), cut(decay[:, :, :, last]))
        y = torch.einsum("bhvk,bhtk->bhtv", cut(weights0), cut(start_decay[:, :, last]) * q) + scores @ cut(residual)
        if written is not None:
            y = y + decayed_scores(q, written, decay) @ targets
    final_decay = decay[:, :, :, -1, :].transpose(-1, -2)  # [B, H, S * N, C]
    new = weights0 * start_decay[:, :, -1, None, :] + torch.einsum("bhiv,bhik->bhvk", residual, final_decay * write)
    if written is not None:
        new = new + torch.einsum("bhiv,bhik->bhvk", targets, final_decay * written)
    state.weights = [new.detach() if kernel.meta == "stop" else new]
    return y


def delta_inputs(kernel, k: Tensor, v: Tensor, gates: dict[str, Tensor]):
    """The segment's steps in order, each token's N steps one after another (S * N of them): the
    erase keys e = erase * k [B, H, S * N, dk], the lr (lr / (1 + (lr k).e) for the implicit step)
    [B, H, S * N, 1 or dk], the keys, the targets u = write * v [B, H, S * N, dv] and the retain
    gate [B, H, S * N, 1 or dk], which decays the state once per token, before its first step (1 at
    the others). A per-step gate is [B, H, S] (one value for every step: a constant), [B, H, S, N]
    or [B, H, S, N * d]; retain is [B, H, S] or [B, H, S, dk]."""
    batch, heads, size = k.shape[:3]
    steps = kernel.substeps

    def per_step(x: Tensor) -> Tensor:  # -> [B, H, S * N, 1 or d]
        if x.dim() == 3:
            x = x[..., None].expand(batch, heads, size, steps)
        return x.reshape(batch, heads, size * steps, -1)

    keys, values, lr = per_step(k), per_step(v), per_step(gates["lr"])
    erase = per_step(gates["erase"]) * keys if "erase" in gates else keys
    targets = per_step(gates["write"]) * values if "write" in gates else values
    if kernel.implicit:  # the residual at the updated memory
        lr = lr / (1.0 + (lr * keys * erase).sum(-1, keepdim=True))
    retain = gates["retain"] if gates["retain"].dim() == 4 else gates["retain"][..., None]
    if steps > 1:
        later = torch.ones_like(retain)[:, :, :, None].expand(-1, -1, -1, steps - 1, -1)
        retain = torch.cat([retain[:, :, :, None], later], dim=3).reshape(batch, heads, size * steps, -1)
    return erase, lr, keys, targets, retain

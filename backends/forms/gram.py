"""The `gram` form: optimizer `solve` (MesaNet) over a segment, every token's Gram matrix H_t in
closed form and one batched exact solve for all of them."""

from __future__ import annotations

import torch
from torch import Tensor

from nestc.backends.forms.common import decay_matrix
from nestc.backends.state import LevelState
from nestc.rules.optimizers import ridge_solve


def gram_segment(kernel, state: LevelState, k, v, q, gates, start: int) -> Tensor | None:
    """k, q [B, H, S, dk], v [B, H, S, dv]; lr and retain [B, H, S], ridge [B, H, S] or
    [B, H, S, dk]. With D[t, i] = prod_{j=i+1..t} retain_j and b_t = prod_{j<=t} retain_j,

        H_t = b_t H_0 + sum_{i<=t} D[t, i] lr_i k_i k_i^T,   G_t = b_t G_0 + sum_{i<=t} D[t, i] lr_i v_i k_i^T,

    so every H_t is one einsum, x_t = (H_t + diag(ridge_t))^-1 q_t one batched solve, and the read
    G_t x_t = b_t G_0 x_t + sum_i D[t, i] lr_i (k_i . x_t) v_i needs no G_t but the last. Returns
    the reads [B, H, S, dv] (None for q None) and advances `state`."""
    lr, retain = gates["lr"], gates["retain"]
    weighted = decay_matrix(retain) * lr[..., None, :]  # D[t, i] lr_i
    start_decay = torch.cumprod(retain, dim=-1)  # b_t
    values0, gram0 = state.weights[0], state.gram
    cut = (lambda t: t.detach()) if kernel.meta == "stop" else (lambda t: t)
    # every token's H_t (needed for its solve), and the segment's last G
    grams = start_decay[..., None, None] * gram0[:, :, None] + torch.einsum("bhti,bhia,bhic->bhtac", weighted, k, k)
    last = weighted[..., -1, :]
    state.gram = cut(grams[:, :, -1])
    state.weights = [cut(start_decay[..., -1, None, None] * values0 + torch.einsum("bhi,bhiv,bhik->bhvk", last, v, k))]
    if q is None:
        return None
    solved = ridge_solve(cut(grams), gates["ridge"], q)  # x_t [B, H, S, dk]
    scores = (solved @ cut(k).transpose(-1, -2)) * cut(weighted)  # [t, i] = D[t, i] lr_i (k_i . x_t)
    return cut(start_decay)[..., None] * torch.einsum("bhvk,bhtk->bhtv", cut(values0), solved) + scores @ cut(v)

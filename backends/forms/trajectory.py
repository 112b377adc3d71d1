"""The `trajectory` form: per-channel gates, output maps, omega windows and Muon, by writing out the
state of every position of the segment."""

from __future__ import annotations

import torch
from torch import Tensor

from nestc.backends.forms.common import apply_sequence, gate_on_map, linear_scan, objective_gates
from nestc.backends.forms.layered import errors_closed_form, per_token_read
from nestc.backends.state import LevelState


def trajectory_segment(kernel, state: LevelState, k, v, q, gates, start: int) -> Tensor:
    """Matrix or MLP memories whose optimizer is elementwise in the state, with what the other
    forms leave out: per-channel gates, an output map, an omega window, Muon. Every token's
    gradient is still taken at the anchor (the segment lies in one chunk), so all of them are
    known at once; the states of every position of the segment then follow from linear
    recurrences with per-entry decays (`linear_scan`), Muon's Newton-Schulz runs on all the
    momenta at once, and each token reads its own (mapped) state. Memory grows with the segment
    times the state, so this form is for the small memories these rules are used with."""
    band = None
    keys, values = k, v
    if kernel.objective.windowed:
        keys, values, band = _omega_pairs(kernel, state, k, v, gates["gamma"])
    # the gradients with respect to the mapped anchor, pulled back to the stored one where the
    # output map says so (`gradient=stored`)
    inputs, errors = errors_closed_form(kernel, kernel.mapped(state.anchor), keys, values, None,
                                        objective_gates(kernel, gates))
    through_map = kernel.output.gradient_through_map(kernel.output_args)
    grads = []
    for anchor, u, d in zip(state.anchor, inputs, errors):
        if band is None:
            grad = torch.einsum("bhso,bhsi->bhsoi", d, u)
        else:  # each token's objective sums the weighted pairs of its window
            grad = torch.einsum("bhtj,bhjo,bhji->bhtoi", band, d, u)
        grads.append(kernel.output.pullback(kernel.output_args, anchor, grad) if through_map else grad)
    if kernel.meta != "full":
        grads = [g.detach() for g in grads]
    dk = k.shape[-1]
    positions, momenta = [], []
    for index, (weight0, grad) in enumerate(zip(state.weights, grads)):
        shape = weight0.shape[-2:]
        lr = gate_on_map(gates["lr"], shape, dk)
        retain = gate_on_map(gates["retain"], shape, dk)
        steps = kernel.optimizer.momentum_of_steps
        if not kernel.optimizer.keeps_momentum:
            drive = -lr * grad
        else:
            momentum = linear_scan(gate_on_map(gates["momentum"], shape, dk), -lr * grad if steps else grad,
                                    state.momentum[index])
            momenta.append(momentum[:, :, -1])
            drive = momentum if steps else -lr * kernel.optimizer.direction(kernel.optimizer_args, momentum)
        positions.append(linear_scan(retain, drive, weight0))
    cut = (lambda t: t.detach()) if kernel.meta == "stop" else (lambda t: t)
    if q is None:
        y = None
    elif kernel.read == "after":
        y = per_token_read(kernel, _mapped_positions(kernel, [cut(w) for w in positions]), q)
    else:
        y = apply_sequence(kernel, state.anchor, q.transpose(1, 2)).transpose(1, 2)
    state.weights = [cut(w[:, :, -1]) for w in positions]
    if momenta:
        state.momentum = [cut(m) for m in momenta]
    return y


def _mapped_positions(kernel, positions: list[Tensor]) -> list[Tensor]:
    """The output map on each position's weights [B, H, S, o, i] (positions taken as heads)."""
    if kernel.output.identity:
        return positions
    flat = [w.reshape(w.shape[0], -1, *w.shape[-2:]) for w in positions]
    return [m.reshape(w.shape) for m, w in zip(kernel.mapped(flat), positions)]


def _omega_pairs(kernel, state: LevelState, k: Tensor, v: Tensor, gamma: Tensor):
    """The omega objective's pairs: the window carried from before the segment, then the
    segment's own, with band[t, j] = gamma_j for the pairs j in token t's window. Stores the
    last `window` pairs back in the state, as the reference keeps them."""
    width = kernel.objective_args["window"]
    carried = state.window[max(0, len(state.window) - (width - 1)):] if width > 1 else []
    size = k.shape[2]

    def with_carried(earlier: list[Tensor], segment: Tensor) -> Tensor:
        return torch.cat([torch.stack(earlier, dim=2), segment], dim=2) if earlier else segment

    keys = with_carried([key for key, _, _ in carried], k)
    values = with_carried([value for _, value, _ in carried], v)
    # a per-channel gamma weighs a pair by its channels' mean, as the reference does
    weights = with_carried([g if g.dim() == 2 else g.mean(-1) for _, _, g in carried],
                           gamma if gamma.dim() == 3 else gamma.mean(-1))  # [B, H, P + S]
    recent = [(k[:, :, t], v[:, :, t], gamma[:, :, t]) for t in range(max(0, size - width), size)]
    state.window = (carried + recent)[-width:]
    newest = torch.arange(size, device=k.device)[:, None] + len(carried)
    index = torch.arange(keys.shape[2], device=k.device)[None, :]
    inside = (index <= newest) & (index > newest - width)
    return keys, values, weights[:, :, None, :] * inside.to(weights.dtype)

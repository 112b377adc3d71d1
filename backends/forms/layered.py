"""The `layered` form: matrix and MLP memories as chains of linear maps (and a gated MLP's two
branches into its last map), every token's error at the anchor found by backpropagation written
out by hand; and those hand-written backward pieces, which the trajectory form shares."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from nestc.backends.common import BackendError
from nestc.backends.forms.common import (apply_sequence, decay_matrix, decay_row, objective_gates, ut_solve,
                                         weighted_outer)
from nestc.backends.state import LevelState
from nestc.rules.states import activation


def layered_segment(kernel, state: LevelState, k, v, q, gates, start: int) -> Tensor:
    """Matrix or MLP memories as linear maps W_l with inputs u_l: every token's gradient at the
    anchor is d_l u_l^T (d_l the error at the map's output), found for the whole segment by
    backpropagation written out by hand. gd and momentum then follow the decay matrices; dgd,
    whose decay term W (retain I - lr u u^T) makes each map a delta rule with keys u and values
    -d, the UT solve; dgd_momentum the UT solve for the decay term beside the momentum's decay
    matrices (`_solve_with_momentum`). Each map's state at a position t of the segment is

        W_t = b_t W_0 + c_t S_0 + sum over the terms of sum_{i<=t} coefficient[t, i] vector_i u_i^T

    (b the cumulative retain, c the momentum S_0 carried into W, zero without momentum). A memory
    read before its update needs only the segment's last state, so only the last rows of the
    decay matrices: vector-matrix products where reads after need matrix products (dgd_momentum's
    solve needs every row)."""
    lr, retain = gates["lr"], gates["retain"]
    optimizer = kernel.optimizer
    inputs, errors = _errors_at_anchor(kernel, state, k, v, gates)
    every_position = kernel.read == "after" and q is not None
    every_row = every_position or (optimizer.decays_along_input and optimizer.momentum_of_steps)
    decay = decay_matrix(retain) if every_row else decay_row(retain)[..., None, :]  # [B, H, S or 1, S]
    start_decay = torch.cumprod(retain, dim=-1)
    if optimizer.momentum_of_steps:
        # S_s = M_s S_0 + sum_{i<=s} P_m[s, i] step_i (M the cumulative momentum gate), and W gains
        # sum_{s<=t} P_r[t, s] S_s: the steps decayed by P_r P_m, S_0 carried by P_r M
        inner = decay_matrix(gates["momentum"])
        momentum_start = torch.cumprod(gates["momentum"], dim=-1)
        coefficients = decay @ inner
        carried = (decay @ momentum_start[..., None])[..., 0]
    else:
        coefficients, carried = decay, None
    positions, finals, momenta = [], [], []
    for index, (weight0, u, d) in enumerate(zip(state.weights, inputs, errors)):
        steps = -lr[..., None] * d  # the gradient steps -lr_i d_i (u_i^T)
        if optimizer.decays_along_input and optimizer.momentum_of_steps:
            residual, retain_decay = _solve_with_momentum(weight0, state.momentum[index], u, d, lr, retain,
                                                          coefficients, carried)
            terms = [(retain_decay, lr[..., None] * residual), (coefficients, steps)]
        elif optimizer.decays_along_input:
            residual, retain_decay = ut_solve(weight0, u, -d, lr, retain, "grad_first")
            terms = [(retain_decay, lr[..., None] * residual)]
        else:
            terms = [(coefficients, steps)]
        if optimizer.momentum_of_steps:
            momenta.append(momentum_start[..., -1, None, None] * state.momentum[index]
                           + weighted_outer(inner[..., -1, :], steps, u))
        final = start_decay[..., -1, None, None] * weight0
        for decays, vectors in terms:
            final = final + weighted_outer(decays[..., -1, :], vectors, u)
        if carried is not None:
            final = final + carried[..., -1, None, None] * state.momentum[index]
        finals.append(final)
        if every_position:
            at = start_decay[..., None, None] * weight0[:, :, None]
            for decays, vectors in terms:
                at = at + torch.einsum("bhti,bhio,bhij->bhtoj", decays, vectors, u)
            if carried is not None:
                at = at + carried[..., None, None] * state.momentum[index][:, :, None]
            positions.append(at)
    cut = (lambda t: t.detach()) if kernel.meta == "stop" else (lambda t: t)
    if q is None:
        y = None
    elif kernel.read == "after":
        y = per_token_read(kernel, [cut(w) for w in positions], q)
    else:
        y = apply_sequence(kernel, state.anchor, q.transpose(1, 2)).transpose(1, 2)
    state.weights = [cut(w) for w in finals]
    if momenta:
        state.momentum = [cut(m) for m in momenta]
    return y


def _solve_with_momentum(weight0: Tensor, momentum0: Tensor, u: Tensor, d: Tensor, lr: Tensor, retain: Tensor,
                         through_momentum: Tensor, carried: Tensor) -> tuple[Tensor, Tensor]:
    """dgd_momentum on one map over a segment: S_t = m_t S_{t-1} - lr_t d_t u_t^T and
    W_t = W_{t-1} (r_t I - lr_t u_t u_t^T) + S_t, with W_0, S_0 the segment's start, u_t and d_t the
    map's input and output error at the anchor (known for the whole segment). Returns the
    residuals R_t = -W_{t-1} u_t and the retain decay matrix P_r.

    Tokens t = 1..S (rows 0..S-1 of the tensors). Write b_t = prod_{j<=t} r_j (the cumulative
    retain), P_r[t, s] = b_t / b_s = prod_{j=s+1..t} r_j, and M_t, P_m likewise for the momentum
    gates m. The buffer unrolls to S_s = M_s S_0 + sum_{i<=s} P_m[s, i] (-lr_i d_i) u_i^T, and with
    e_s = W_{s-1} u_s the state to W_t = b_t W_0 + sum_{s<=t} P_r[t, s] ((-lr_s e_s) u_s^T + S_s), so

        W_t = b_t W_0 + c_t S_0 + sum_{s<=t} P_r[t, s] (-lr_s e_s) u_s^T + sum_{i<=t} C[t, i] (-lr_i d_i) u_i^T

    with c = P_r M and C = P_r P_m (`through_momentum`, and `carried` = c, from the caller). Only
    e is unknown; multiplying W_{t-1} by u_t gives, for every t at once,

        e_t + sum_{s<t} P_r[t-1, s] lr_s (u_t . u_s) e_s
            = b_{t-1} W_0 u_t + c_{t-1} S_0 u_t - sum_{i<t} C[t-1, i] lr_i (u_t . u_i) d_i

    (b_0 = 1, c_0 = 0 at the segment's first token): a unit lower-triangular system. It is
    the delta rule's UT solve (`ut_solve`: M_t = r_t M_{t-1} + lr_t R_t u_t^T with
    R_t = target_t - M_{t-1} u_t, whose system has the same matrix and the right side
    target_t - b_{t-1} W_0 u_t) for R = -e and the targets
    target_t = -c_{t-1} S_0 u_t + sum_{i<t} C[t-1, i] lr_i (u_t . u_i) d_i. With m = 0, C = P_r
    and c = 0, and the two sums over i join dgd's single residual -d_t - W_{t-1} u_t."""
    def at_previous_token(rows: Tensor) -> Tensor:  # row t of the result is row t - 1, zeros at 0
        return torch.cat([torch.zeros_like(rows[..., :1, :]), rows[..., :-1, :]], dim=-2)

    previous_through = at_previous_token(through_momentum)  # C[t-1, i], zero for i >= t
    previous_carried = at_previous_token(carried[..., None])  # c_{t-1}
    from_steps = (previous_through * (u @ u.transpose(-1, -2))) @ (lr[..., None] * d)
    from_start = previous_carried * torch.einsum("bhoi,bhti->bhto", momentum0, u)
    return ut_solve(weight0, u, from_steps - from_start, lr, retain, "grad_first")


def _errors_at_anchor(kernel, state: LevelState, k: Tensor, v: Tensor, gates: dict[str, Tensor]):
    """Inputs u_l and output errors d_l of each linear map, for every token, at the anchor (the
    anchor times the retain gates since it under `order decay_first`)."""
    retain = gates["retain"]
    if kernel.order == "decay_first":
        previous = state.retain_product if state.retain_product is not None else torch.ones_like(retain[..., 0])
        scale = previous[..., None] * torch.cumprod(retain, dim=-1)  # [B, H, S]
    else:
        scale = None
    return errors_closed_form(kernel, state.anchor, k, v, scale, objective_gates(kernel, gates))


def _forward_maps(kernel, anchor: list[Tensor], k: Tensor, scale: Tensor | None):
    """The memory's forward on every token's key: each map's input and pre-activation, and M(k)."""
    act = kernel.state.map_activation(kernel.state_args)
    inputs, pre_activations = [], []
    h = k
    for index, weight in enumerate(anchor):
        inputs.append(h)
        z = h @ weight.transpose(-1, -2)
        if scale is not None:
            z = scale[..., None] * z
        pre_activations.append(z)
        h = activation(act, z) if index < len(anchor) - 1 else z
    return inputs, pre_activations, kernel.state.finish(kernel.state_args, h, k)


def errors_closed_form(kernel, anchor: list[Tensor], k: Tensor, v: Tensor, scale: Tensor | None,
                       own_gates: dict[str, Tensor]):
    """Backpropagation through the memory written out by hand (as TTT-MLP does): no autograd
    call, so the outer level differentiates plain tensor operations. `own_gates` are the gates
    the objective reads, one value per pair."""
    if kernel.state.gated:
        return _gated_errors(kernel, anchor, k, v, scale, own_gates)
    act = kernel.state.map_activation(kernel.state_args)
    inputs, pre_activations, prediction = _forward_maps(kernel, anchor, k, scale)
    error = kernel.objective.pair_error(kernel.objective_args, prediction, v, own_gates)
    error = through_norm(kernel.state.output_norm(kernel.state_args), error, pre_activations[-1])
    errors = [error]
    for index in range(len(anchor) - 1, 0, -1):
        back = errors[0] @ anchor[index]
        if scale is not None:
            back = scale[..., None] * back
        errors.insert(0, _through_activation(act, back, pre_activations[index - 1]))
    if kernel.meta != "full":
        errors = [e.detach() for e in errors]
        inputs = [u.detach() for u in inputs]
    return inputs, errors


def _gated_errors(kernel, anchor: list[Tensor], k: Tensor, v: Tensor, scale: Tensor | None,
                  own_gates: dict[str, Tensor]):
    """`errors_closed_form` for a gated MLP, W2 (act(W1 k) * (W3 k)): W1 and W3 both read k, and
    each branch's error is the hidden error times the other branch (through act' for W1)."""
    act = kernel.state.map_activation(kernel.state_args)
    first, linear, last = anchor

    def through(weight: Tensor, x: Tensor) -> Tensor:
        z = x @ weight.transpose(-1, -2)
        return z if scale is None else scale[..., None] * z

    activated, gate = through(first, k), through(linear, k)
    hidden = activation(act, activated) * gate
    out = through(last, hidden)
    error = kernel.objective.pair_error(kernel.objective_args, kernel.state.finish(kernel.state_args, out, k), v,
                                        own_gates)
    error = through_norm(kernel.state.output_norm(kernel.state_args), error, out)
    back = error @ last
    if scale is not None:
        back = scale[..., None] * back
    inputs = [k, k, hidden]
    errors = [_through_activation(act, back * gate, activated), back * activation(act, activated), error]
    if kernel.meta != "full":
        errors = [e.detach() for e in errors]
        inputs = [u.detach() for u in inputs]
    return inputs, errors


def through_norm(name: str, error: Tensor, h: Tensor) -> Tensor:
    """dL/dh from dL/dy for y = norm(h) over the last dim, without affine parameters, with the
    epsilons F.layer_norm (1e-5) and F.rms_norm (the dtype's machine epsilon) use."""
    if name == "layernorm":
        centred = h - h.mean(-1, keepdim=True)
        inverse = torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + 1e-5)
        y = centred * inverse
        return inverse * (error - error.mean(-1, keepdim=True) - y * (error * y).mean(-1, keepdim=True))
    if name == "rmsnorm":
        inverse = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + torch.finfo(h.dtype).eps)
        return inverse * (error - h * inverse * (error * h * inverse).mean(-1, keepdim=True))
    return error


def _through_activation(name: str, error: Tensor, x: Tensor) -> Tensor:
    """error * act'(x). For gelu, ATen's fused gelu_backward: one pass instead of ten, and it has
    its own derivative, so the outer level differentiates it as cheaply."""
    if name == "gelu":
        return torch.ops.aten.gelu_backward(error, x)
    return error * activation_derivative(name, x)


def activation_derivative(name: str, x: Tensor) -> Tensor:
    if name == "identity":
        return torch.ones_like(x)
    if name == "relu":
        return (x > 0).to(x.dtype)
    if name == "tanh":
        return 1 - torch.tanh(x) ** 2
    if name == "silu":
        sigmoid = torch.sigmoid(x)
        return sigmoid * (1 + x * (1 - sigmoid))
    if name == "gelu":
        return 0.5 * (1 + torch.erf(x / math.sqrt(2))) + x * torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    raise BackendError(f"no derivative for activation `{name}`")


def per_token_read(kernel, weights: list[Tensor], x: Tensor) -> Tensor:
    """M_t(x_t) with one set of weights per position: weights [B, H, S, o, i], x [B, H, S, d]."""
    act = kernel.state.map_activation(kernel.state_args)
    if kernel.state.gated:
        first, linear, last = weights
        hidden = activation(act, torch.einsum("bhsoi,bhsi->bhso", first, x)) \
            * torch.einsum("bhsoi,bhsi->bhso", linear, x)
        return kernel.state.finish(kernel.state_args, torch.einsum("bhsoi,bhsi->bhso", last, hidden), x)
    h = x
    for index, weight in enumerate(weights):
        h = torch.einsum("bhsoi,bhsi->bhso", weight, h)
        if index < len(weights) - 1:
            h = activation(act, h)
    return kernel.state.finish(kernel.state_args, h, x)

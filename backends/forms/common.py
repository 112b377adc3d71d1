"""What the segment forms share: the read of a whole segment, decay matrices and linear scans
(the closed forms of the linear recurrences that retain and momentum gates define), and the end of
a segment (the anchor moves where a chunk closes)."""

from __future__ import annotations

import torch
from torch import Tensor

from nestc.backends.state import LevelState


def apply_sequence(kernel, weights: list[Tensor], x: Tensor) -> Tensor:
    """M(x) for weights [B, H, ...] (one memory per sample) and x [B, S, H, d]."""
    return kernel.state.apply_sequence(kernel.state_args, kernel.mapped(weights), x)


def objective_gates(kernel, gates: dict[str, Tensor]) -> dict[str, Tensor]:
    """The gates the level's objective reads itself ([B, H, S] each), from all of its gates."""
    return {role: gates[role] for role in kernel.objective.gates}


def decay_matrix(gates: Tensor) -> Tensor:
    """P[..., t, i] = prod_{j=i+1..t} gate_j for i <= t, else 0; gates [..., S] (exact for zeros)."""
    size = gates.shape[-1]
    logs = torch.log(gates)
    repeated = logs[..., None, :].expand(*logs.shape, size).transpose(-1, -2)  # [.., t, i] = log g_t
    strict = torch.ones(size, size, dtype=torch.bool, device=gates.device).tril(-1)
    summed = torch.cumsum(repeated.masked_fill(~strict, 0.0), dim=-2)
    lower = torch.ones(size, size, dtype=torch.bool, device=gates.device).tril()
    return torch.where(lower, torch.exp(summed), torch.zeros((), dtype=gates.dtype, device=gates.device))


def weighted_outer(weights: Tensor, vectors: Tensor, inputs: Tensor) -> Tensor:
    """sum_i weights_i vectors_i inputs_i^T: weights [B, H, S], vectors [B, H, S, o], inputs
    [B, H, S, j] -> [B, H, o, j], as one batched matmul."""
    return (weights[..., None] * vectors).transpose(-1, -2) @ inputs


def decay_row(gates: Tensor) -> Tensor:
    """decay_matrix(gates)[..., -1, :], prod_{j=i+1..S} gate_j, without the matrix."""
    suffix = torch.flip(torch.cumprod(torch.flip(gates, [-1]), dim=-1), [-1])  # prod_{j=i..S}
    return torch.cat([suffix[..., 1:], torch.ones_like(suffix[..., :1])], dim=-1)


def finish_segment(kernel, state: LevelState, start: int | Tensor, size: int, retain: Tensor) -> None:
    if kernel.order == "decay_first":
        # over the segment's tokens: retain is [B, H, S] or, per key channel, [B, H, S, dk]
        product = torch.prod(retain, dim=2)
        state.retain_product = product if state.retain_product is None else state.retain_product * product
    if isinstance(start, Tensor):
        # The torch.compile step sees the position as a tensor: whether the segment closes a chunk
        # is a select, not a Python branch, so every segment shares one graph. The retain product
        # restarts from ones, which is what None stands for.
        closes = (start + size) % kernel.every == 0
        state.anchor = [torch.where(closes, new, old) for new, old in zip(state.weights, state.anchor)]
        if state.retain_product is not None:
            state.retain_product = torch.where(closes, torch.ones_like(state.retain_product), state.retain_product)
    elif (start + size) % kernel.every == 0:
        state.anchor = list(state.weights)
        state.retain_product = None


def ut_solve(weights0: Tensor, keys: Tensor, values: Tensor, lr: Tensor, retain: Tensor, order: str):
    """The delta rule M_t = retain_t M_{t-1} + lr_t R_t k_t^T, R_t = v_t - M' k_t (M' = M_{t-1}, or
    retain_t M_{t-1} under decay_first), over a segment, gates per head [B, H, S]: returns R_t
    and the decay matrix D[t, i] (`delta_solve` with the key as the erase key)."""
    residual, decay = delta_solve(weights0, keys, lr[..., None] * keys, values, retain[..., None], order)
    return residual, decay[:, :, 0]


def delta_solve(weights0: Tensor, erase: Tensor, write: Tensor, targets: Tensor, retain: Tensor, order: str,
                written: Tensor | None = None):
    """The generalised delta rule over a segment: M_t = M'_t + R_t w_t^T with R_t = u_t - M'_t e_t,
    where M'_t = M_{t-1} diag(retain_t) under decay_first (R_t is read at the decayed state) and
    R_t is read at M_{t-1} under grad_first (then M_t = M_{t-1} diag(retain_t) + R_t w_t^T).
    erase e, write w [B, H, S, dk], targets u [B, H, S, dv], retain [B, H, S, C]: C = 1 (per head)
    or dk (per key channel). Returns R [B, H, S, dv] and the decay matrices D [B, H, C, S, S],
    D[c, t, i] = prod_{j=i+1..t} retain_j[c].

    Unrolled, M_t = M_0 diag(b_t) + sum_{i<=t} R_i (w_i * D[:, t, i])^T (b_t the decay since the
    segment start), so the R_t solve one unit lower-triangular system (I + A) R = U - M_0 (c_t * e_t),
    A[t, i] = sum_c e_t[c] w_i[c] E[c, t, i] for i < t, where E and c are the decay from i (or from
    the segment start) to t (decay_first) or to t - 1 (grad_first). This is the UT transform of
    DeltaNet's chunkwise algorithm, with KDA's per-channel decay inside the sum over channels.

    With a write key `written` (W [B, H, S, dk], RWKV-7) the value is written along it instead:
    M_t = M'_t + R_t w_t^T + u_t W_t^T with R_t = -M'_t e_t, the erased part alone. The targets
    then enter the same system through their own scores: (I + A) R = -M_0 (c_t * e_t) - A_W U, A_W
    as A with W for w. With W = w it is the system above for R + U."""
    size = erase.shape[2]
    decay = decay_matrix(retain.transpose(-1, -2))  # [B, H, C, S, S]
    start_decay = torch.cumprod(retain, dim=2)  # [B, H, S, C]
    if order == "decay_first":
        error_decay, error_start = decay, start_decay
    else:
        error_decay = torch.cat([torch.zeros_like(decay[..., :1, :]), decay[..., :-1, :]], dim=-2)
        error_start = torch.cat([torch.ones_like(start_decay[:, :, :1]), start_decay[:, :, :-1]], dim=2)
    strict = torch.ones(size, size, dtype=erase.dtype, device=erase.device).tril(-1)
    system = decayed_scores(erase, write, error_decay) * strict
    identity = torch.eye(size, dtype=erase.dtype, device=erase.device)
    right = -torch.einsum("bhvk,bhtk->bhtv", weights0, error_start * erase)
    right = right + (targets if written is None else -(decayed_scores(erase, written, error_decay) * strict) @ targets)
    # torch has no triangular solve in bfloat16 (on CPU or CUDA): under `--bf16` autocast the
    # system is solved in float32, and the result handed on in the dtype the arithmetic gave.
    dtype = torch.promote_types(system.dtype, right.dtype)
    solve_dtype = torch.promote_types(dtype, torch.float32)
    residual = torch.linalg.solve_triangular((identity + system).to(solve_dtype), right.to(solve_dtype), upper=False,
                                             unitriangular=True).to(dtype)
    return residual, decay


def decayed_scores(left: Tensor, right: Tensor, decay: Tensor) -> Tensor:
    """S[t, i] = sum_c left_t[c] right_i[c] decay[c, t, i] for left, right [B, H, S, d] and decay
    [B, H, C, S, S]: one matmul when the decay is per head (C = 1), a sum over channels otherwise."""
    if decay.shape[2] == 1:
        return (left @ right.transpose(-1, -2)) * decay[:, :, 0]
    return torch.einsum("bhtc,bhic,bhcti->bhti", left, right, decay)


def gate_on_map(gate: Tensor, shape: tuple[int, int], channels: int) -> Tensor:
    """A gate [B, H, S] or per channel [B, H, S, channels] as factors [B, H, S, rows, cols] that
    broadcast against a map of `shape`: the reference's `_scale` rule (the key side first, then
    the output side, else the channels' mean)."""
    if gate.dim() == 3:
        return gate[..., None, None]
    rows, cols = shape
    if cols == channels:
        return gate[..., None, :]
    if rows == channels:
        return gate[..., :, None]
    return gate.mean(-1)[..., None, None]


def linear_scan(gate: Tensor, drive: Tensor, start: Tensor) -> Tensor:
    """x_t = gate_t * x_{t-1} + drive_t at every position of the segment, x_0 = `start` [B, H, o, i]:
    x_t = (prod_{j<=t} gate_j) x_0 + sum_{i<=t} (prod_{j=i+1..t} gate_j) drive_i, with the products
    taken per entry of the gate's broadcast shape [B, H, S, 1 or o, 1 or i]."""
    carried = torch.cumprod(gate, dim=2) * start[:, :, None]
    rows, cols = gate.shape[-2:]
    if rows == 1 and cols == 1:
        return carried + torch.einsum("bhts,bhsoi->bhtoi", decay_matrix(gate[..., 0, 0]), drive)
    if rows == 1:
        return carried + torch.einsum("bhits,bhsoi->bhtoi", decay_matrix(gate[..., 0, :].transpose(-1, -2)), drive)
    return carried + torch.einsum("bhots,bhsoi->bhtoi", decay_matrix(gate[..., :, 0].transpose(-1, -2)), drive)

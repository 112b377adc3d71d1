"""The compiled backend: the reference's model, evaluated a segment of tokens at a time.

Same parameters and the same `ModelState` as the reference (a state dict and a state move freely
between the two); what changes is the schedule. The sequence is cut into segments aligned to
absolute positions and short enough that no level's anchor changes inside one (the segment length
divides every chunk size that matters). Inside a segment every layer runs on the whole
`[batch, segment, width]` tensor: projections, convolutions, attention and feed-forward blocks
as single calls, and each memory level through a closed form of its rule:

- `anchored`: matrix or vector memories whose gradient inside the segment is taken at one state
  (every C with the segment inside a chunk, or a `dot` objective, whose gradient ignores the
  state). Every token's gradient is `e_i k_i^T` at that state; retain and momentum are linear
  recurrences, solved with decay matrices (SEMANTICS section 4, the TTT/Titans dual form).
- `delta`: the online delta rule (`every 1`, `l2`, `gd`, matrix) with per-head gates in either
  order: the chunkwise UT transform, a triangular solve per segment (DeltaNet, Gated DeltaNet).
- `layered`: MLP memories (and DGD on a matrix) under `every C`: each map's gradient is d u^T,
  with every token's error d found at the anchor at once by backpropagation written out by hand;
  gd and momentum then use the same decay matrices, DGD the UT solve per map.
- `trajectory`: matrix or MLP memories with per-channel gates, an output map (Moneta, Memora), an
  omega window or Muon (ATLAS): the anchor's gradients (pulled back through the output map by
  hand) give every position's state through per-entry linear recurrences; each token reads its
  own state.
- `sequential`: anything else steps token by token with the reference kernel, and says so.

Continuum-memory levels update between segments (the segment length divides their periods).
Where nothing couples the layers inside a segment, the eager schedule is layer by layer instead:
each layer reads the whole call, and only the memory rules step through it segment by segment.

With `torch_compile` (`nestc.load(..., compile=True)`) the memory rules' segment steps
(`_kernel_from_tensors`, layer by layer) or else the whole segment step (`_segment_from_tensors`)
run through torch.compile as graphs, pure functions of the state's tensors (docs/backends.md says
how they avoid graph breaks and recompiles).
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from nestc.lang import ir
from nestc.backends.common import BackendError, concrete
from nestc.backends.fx import level_provenance as fx_provenance
from nestc.backends.reference import (CacheLevel, FeedForwardLevel, MemoryLevel, ReferenceModel, Stage, activation,
                                      rotate)
from nestc.backends.state import LevelState, ModelState, flatten_levels, tensors_at, unflatten_levels
from nestc.backends.updates import newton_schulz

MAX_SEGMENT = 64
ATTENTION_BLOCK = 256  # queries per softmax when a layer reads a whole call at once


class CompileWarning(UserWarning):
    """A construct without a parallel form: it runs token by token."""


@dataclass(frozen=True)
class LevelPlan:
    kernel: str  # frozen | anchored | delta | layered | trajectory | sequential | module
    reason: str = ""


def plan_level(level: ir.Level, module) -> LevelPlan:
    if not isinstance(module, MemoryLevel):
        return LevelPlan("module")
    gates = [getattr(level, role) for role in ("lr", "retain", "momentum") if getattr(level, role) is not None]
    return plan_kernel(module.kernel, any(_per_channel(g) for g in gates))


def plan_kernel(kernel, per_channel: bool) -> LevelPlan:
    """Which segment form computes this memory rule exactly (or why none does yet)."""
    every = kernel.every
    if every == 0:
        return LevelPlan("frozen")
    objective = kernel.objective_args["base"] if kernel.objective == "omega" else kernel.objective
    if objective not in ("dot", "l2", "lp", "huber"):
        return LevelPlan("sequential", f"no parallel form yet for objective `{kernel.objective}`")
    features = _trajectory_features(kernel, per_channel)
    if features:
        return _trajectory_plan(kernel, features)
    if every == 1 and kernel.read == "before":
        return LevelPlan("sequential", "`read before` with `every 1` has no parallel form yet")
    if kernel.state_kind == "mlp" or kernel.optimizer == "dgd":
        if every == 1 and kernel.objective != "dot":
            return LevelPlan("sequential", f"a {kernel.state_kind} memory with `{kernel.optimizer}` updated every "
                                           "token has no parallel form")
        return LevelPlan("layered")
    if every == 1 and kernel.objective != "dot":
        if kernel.objective == "l2" and kernel.optimizer == "gd" and kernel.state_kind == "matrix":
            return LevelPlan("delta")
        return LevelPlan("sequential", "this online rule has no parallel form yet")
    return LevelPlan("anchored")


def _trajectory_features(kernel, per_channel: bool) -> str:
    """What, in this rule, only the `trajectory` form computes (empty when the others do)."""
    features = []
    if per_channel:
        features.append("per-channel gates")
    if kernel.output != "none":
        features.append(f"output map `{kernel.output}`")
    if kernel.objective == "omega":
        features.append("objective `omega`")
    if kernel.optimizer == "muon":
        features.append("optimizer `muon`")
    return " and ".join(features)


def _trajectory_plan(kernel, features: str) -> LevelPlan:
    """The `trajectory` form keeps the anchor's gradients and writes every position's state out;
    it needs gradients fixed over the segment and an elementwise optimizer on linear maps."""
    if kernel.state_kind not in ("matrix", "mlp"):
        return LevelPlan("sequential", f"no parallel form yet for a {kernel.state_kind} memory with {features}")
    if kernel.optimizer == "dgd":
        return LevelPlan("sequential", f"no parallel form yet for `dgd` with {features}")
    if kernel.order == "decay_first":
        return LevelPlan("sequential", f"no parallel form yet for `order decay_first` with {features}")
    if kernel.every == 1 and not (kernel.state_kind == "matrix" and kernel.objective == "dot"
                                  and kernel.output == "none" and kernel.read == "after"):
        return LevelPlan("sequential", f"a memory updated every token with {features} has no parallel form")
    return LevelPlan("trajectory")


def _per_channel(gate) -> bool:
    if isinstance(gate, ir.Op) and gate.name == "learned":
        return dict(gate.args)["per"] == "channel"
    if isinstance(gate, ir.Pipeline):
        return any(isinstance(s, ir.Op) and s.name == "proj" and dict(s.args)["per"] == "channel"
                   for s in gate.stages)
    return False


def segment_length(program: ir.Program, plans: dict[str, LevelPlan]) -> int:
    """The longest segment (up to MAX_SEGMENT) inside which no anchor and no continuum level moves."""
    length = MAX_SEGMENT
    for level in program.levels:
        every = concrete(level.every.tokens)
        plan = plans[level.name]
        # anchored forms need the anchor fixed inside a segment, and the state keeps the anchor
        constrained = plan.kernel in ("anchored", "layered", "trajectory")
        if plan.kernel == "module" and isinstance(level.objective, ir.Op) and level.objective.name == "task":
            constrained = every > 0
        if every > 1 and (constrained or _is_generator(program, level.name)):
            length = math.gcd(length, every)
        elif every == 1 and _is_generator(program, level.name):
            length = 1
    for node in _block_nodes(program.model.block):
        if isinstance(node, ir.MemoryAsContext):  # a segment never straddles two MAC windows
            length = math.gcd(length, concrete(node.segment))
    return max(length, 1)


def _is_generator(program: ir.Program, name: str) -> bool:
    """Whether any level (itself included, through `self`) reads this level as a pipeline stage."""
    from nestc.lang.sema import generators

    return any(name in generators(level) for level in program.levels)


# --- sequence versions of the building blocks -------------------------------------------------


def stage_sequence(stage: Stage, x: Tensor, start: int, state: LevelState) -> Tensor:
    """One pipeline stage on [B, S, width], positions start .. start + S - 1 (or `start`'s own)."""
    kind, args = stage.kind, stage.args
    if kind == "conv":
        window = args["window"]
        history = state.buffers.get(stage.buffer_name)
        if history is None:
            history = x.new_zeros(x.shape[0], window - 1, x.shape[2])
        frames = torch.cat([history, x], dim=1)  # oldest first
        state.buffers[stage.buffer_name] = frames[:, -(window - 1):, :] if window > 1 else frames[:, :0, :]
        size = x.shape[1]
        # a sum of shifted slices: faster than unfold + einsum forward and backward (no copies)
        out = frames[:, :size] * stage.weight[:, 0]
        for offset in range(1, window):
            out = out + frames[:, offset:offset + size] * stage.weight[:, offset]
        return out
    if kind == "rope":
        heads = x.reshape(x.shape[0], x.shape[1], stage.heads, -1)
        # start is an int, a 0-dim tensor in the torch.compile step (one graph for all positions),
        # or every element's own position (a memory-as-context block's cache entries)
        if isinstance(start, Tensor) and start.dim() == 1:
            positions = start[:, None]
        else:
            positions = (start + torch.arange(x.shape[1], device=x.device))[:, None]  # [S, 1]: over heads
        return rotate(heads, positions, args["base"]).reshape(x.shape)
    if kind in ("l2norm", "layernorm", "rmsnorm"):
        heads = x.reshape(x.shape[0], x.shape[1], stage.heads, -1)
        if kind == "l2norm":
            out = F.normalize(heads, dim=-1)
        elif kind == "layernorm":
            out = F.layer_norm(heads, heads.shape[-1:])
        else:
            out = F.rms_norm(heads, heads.shape[-1:])
        return out.reshape(x.shape)
    return stage(x, start, state)  # position-free stages work on any leading shape


def apply_sequence(kernel, weights: list[Tensor], x: Tensor) -> Tensor:
    """M(x) for weights [B, H, ...] (one memory per sample) and x [B, S, H, d]."""
    weights = kernel.mapped(weights)
    if kernel.state_kind == "matrix":
        return torch.einsum("bhvk,bshk->bshv", weights[0], x)
    if kernel.state_kind == "vector":
        return weights[0][:, None] * x
    args = kernel.state_args
    per_head = x.transpose(1, 2)  # [B, H, S, d]: every map one batched matmul
    h = per_head
    for index, weight in enumerate(weights):
        h = h @ weight.transpose(-1, -2)
        if index < len(weights) - 1:
            h = activation(args["act"], h)
    return _finish_mlp(h, per_head, args).transpose(1, 2)


def _finish_mlp(h: Tensor, x: Tensor, args: dict) -> Tensor:
    if args["norm"] == "layernorm":
        h = F.layer_norm(h, h.shape[-1:])
    elif args["norm"] == "rmsnorm":
        h = F.rms_norm(h, h.shape[-1:])
    return x + h if args["residual"] and h.shape == x.shape else h


def decay_matrix(gates: Tensor) -> Tensor:
    """P[..., t, i] = prod_{j=i+1..t} gate_j for i <= t, else 0; gates [..., S] (exact for zeros)."""
    size = gates.shape[-1]
    logs = torch.log(gates)
    repeated = logs[..., None, :].expand(*logs.shape, size).transpose(-1, -2)  # [.., t, i] = log g_t
    strict = torch.ones(size, size, dtype=torch.bool, device=gates.device).tril(-1)
    summed = torch.cumsum(repeated.masked_fill(~strict, 0.0), dim=-2)
    lower = torch.ones(size, size, dtype=torch.bool, device=gates.device).tril()
    return torch.where(lower, torch.exp(summed), torch.zeros((), dtype=gates.dtype, device=gates.device))


def _weighted_outer(weights: Tensor, vectors: Tensor, inputs: Tensor) -> Tensor:
    """sum_i weights_i vectors_i inputs_i^T: weights [B, H, S], vectors [B, H, S, o], inputs
    [B, H, S, j] -> [B, H, o, j], as one batched matmul."""
    return (weights[..., None] * vectors).transpose(-1, -2) @ inputs


def decay_row(gates: Tensor) -> Tensor:
    """decay_matrix(gates)[..., -1, :], prod_{j=i+1..S} gate_j, without the matrix."""
    suffix = torch.flip(torch.cumprod(torch.flip(gates, [-1]), dim=-1), [-1])  # prod_{j=i..S}
    return torch.cat([suffix[..., 1:], torch.ones_like(suffix[..., :1])], dim=-1)


def pair_error(objective: str, args: dict, prediction: Tensor, v: Tensor) -> Tensor:
    """d loss / d prediction for one pair, elementwise."""
    if objective == "dot":
        return -v
    residual = prediction - v
    if objective == "l2":
        return residual
    if objective == "lp":
        p = args["p"]
        return p * residual.abs().pow(p - 1) * torch.sign(residual)
    if objective == "huber":
        delta = args["delta"]
        return residual.clamp(-delta, delta)
    raise BackendError(f"no closed-form gradient for objective `{objective}`")


# --- memory kernels on a segment --------------------------------------------------------------


def anchored_segment(kernel, state: LevelState, k, v, q, gates, start: int) -> Tensor:
    """Matrix/vector memory with every gradient of the segment at one state. k, q [B, H, S, dk],
    v [B, H, S, dv], gates [B, H, S]. Returns reads [B, H, S, dv] and advances `state`."""
    lr, retain = gates["lr"], gates["retain"]
    size = k.shape[2]
    matrix = kernel.state_kind == "matrix"
    anchor = state.anchor[0]
    if kernel.order == "decay_first":
        previous = state.retain_product if state.retain_product is not None else torch.ones_like(retain[..., 0])
        decayed = previous[..., None] * torch.cumprod(retain, dim=-1)  # [B, H, S]
    if matrix:
        at_anchor = torch.einsum("bhvk,bhsk->bhsv", anchor, k)
    else:
        at_anchor = anchor[:, :, None, :] * k
    prediction = decayed[..., None] * at_anchor if kernel.order == "decay_first" else at_anchor
    error = pair_error(kernel.objective, kernel.objective_args, prediction, v)
    key = k
    if kernel.meta != "full":
        error, key = error.detach(), k.detach()
    step = -lr[..., None] * error  # u_i = step_i key_i^T
    decay = decay_matrix(retain)  # D[t, i]
    start_decay = torch.cumprod(retain, dim=-1)  # b_t
    weights0 = state.weights[0]
    if kernel.optimizer == "momentum":
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
    if matrix:
        scores = torch.einsum("bhtk,bhik->bhti", q, cut(key)) * cut(kernel_matrix)
        y = cut(start_decay)[..., None] * torch.einsum("bhvk,bhtk->bhtv", cut(weights0), q) + scores @ cut(step)
        if kernel.optimizer == "momentum":
            y = y + cut(carry) * torch.einsum("bhvk,bhtk->bhtv", cut(momentum0), q)
    else:
        y = cut(start_decay)[..., None] * cut(weights0)[:, :, None, :] * q + torch.einsum(
            "bhti,bhid,bhtd->bhtd", cut(kernel_matrix), cut(step * key), q)
        if kernel.optimizer == "momentum":
            y = y + cut(carry) * cut(momentum0)[:, :, None, :] * q
    # the state after the segment
    last = kernel_matrix[..., -1, :]  # [B, H, S]
    if matrix:
        new = start_decay[..., -1, None, None] * weights0 + torch.einsum("bhi,bhiv,bhik->bhvk", last, step, key)
    else:
        new = start_decay[..., -1, None] * weights0 + torch.einsum("bhi,bhid->bhd", last, step * key)
    if kernel.optimizer == "momentum":
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
    _finish_segment(kernel, state, start, size, retain)
    if kernel.read == "before":
        before = torch.einsum("bhvk,bhtk->bhtv", anchor, q) if matrix else anchor[:, :, None, :] * q
        return before
    return y


def _finish_segment(kernel, state: LevelState, start: int | Tensor, size: int, retain: Tensor) -> None:
    if kernel.order == "decay_first":
        previous = state.retain_product if state.retain_product is not None else torch.ones_like(retain[..., 0])
        state.retain_product = previous * torch.prod(retain, dim=-1)
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


def _ut_solve(weights0: Tensor, keys: Tensor, values: Tensor, lr: Tensor, retain: Tensor, order: str):
    """The delta rule M_t = retain_t M_{t-1} + lr_t R_t k_t^T, R_t = v_t - M' k_t (M' = M_{t-1}, or
    retain_t M_{t-1} under decay_first), over a segment: returns delta_t = lr_t R_t.

    Unrolled, M_t = b_t M_0 + sum_{i<=t} D[t, i] delta_i k_i^T, so the R_t solve one unit
    lower-triangular system (I + A) R = V - c * (K M_0^T), A[t, i] = E[t, i] (k_t . k_i) lr_i for
    i < t, where E and c are the decay from i (or from the segment start) to t (decay_first) or
    to t - 1 (grad_first). This is the UT transform of DeltaNet's chunkwise algorithm."""
    size = keys.shape[2]
    decay = decay_matrix(retain)
    start_decay = torch.cumprod(retain, dim=-1)
    if order == "decay_first":
        error_decay, error_start = decay, start_decay
    else:
        error_decay = torch.cat([torch.zeros_like(decay[..., :1, :]), decay[..., :-1, :]], dim=-2)
        error_start = torch.cat([torch.ones_like(start_decay[..., :1]), start_decay[..., :-1]], dim=-1)
    strict = torch.ones(size, size, dtype=torch.bool, device=keys.device).tril(-1)
    system = torch.where(strict, error_decay * torch.einsum("bhtk,bhik->bhti", keys, keys) * lr[..., None, :],
                         torch.zeros((), dtype=keys.dtype, device=keys.device))
    identity = torch.eye(size, dtype=keys.dtype, device=keys.device)
    right = values - error_start[..., None] * torch.einsum("bhvk,bhtk->bhtv", weights0, keys)
    residual = torch.linalg.solve_triangular(identity + system, right, upper=False, unitriangular=True)
    return residual, decay


def delta_segment(kernel, state: LevelState, k, v, q, gates, start: int) -> Tensor:
    """The online delta rule (`every 1`, l2, gd, matrix) exactly, by the UT transform."""
    lr, retain = gates["lr"], gates["retain"]
    size = k.shape[2]
    weights0 = state.weights[0]
    residual, decay = _ut_solve(weights0, k, v, lr, retain, kernel.order)
    start_decay = torch.cumprod(retain, dim=-1)
    key = k
    if kernel.meta != "full":  # the inner gradient -R k^T is a constant of the outer level
        residual, key = residual.detach(), k.detach()
    delta = lr[..., None] * residual
    cut = (lambda t: t.detach()) if kernel.meta == "stop" else (lambda t: t)
    scores = torch.einsum("bhtk,bhik->bhti", q, cut(key)) * cut(decay)
    y = cut(start_decay)[..., None] * torch.einsum("bhvk,bhtk->bhtv", cut(weights0), q) + scores @ cut(delta)
    new = start_decay[..., -1, None, None] * weights0 + torch.einsum("bhi,bhiv,bhik->bhvk", decay[..., -1, :], delta, key)
    state.weights = [new.detach() if kernel.meta == "stop" else new]
    _finish_segment(kernel, state, start, size, retain)
    return y


def layered_segment(kernel, state: LevelState, k, v, q, gates, start: int) -> Tensor:
    """Matrix or MLP memories as linear maps W_l with inputs u_l: every token's gradient at the
    anchor is d_l u_l^T (d_l the error at the map's output), found for the whole segment by
    backpropagation written out by hand. gd and momentum then follow the decay matrices; dgd,
    whose decay term W (retain I - lr u u^T) makes each map a delta rule with keys u and values
    -d, the UT solve. A memory read before its update needs only the segment's last state, so
    only the last row of the retain decay matrix: a vector-matrix product where reads after need
    a matrix product."""
    lr, retain = gates["lr"], gates["retain"]
    size = k.shape[2]
    inputs, errors = _errors_at_anchor(kernel, state, k, v, retain)
    every_position = kernel.read == "after"
    decay = decay_matrix(retain) if every_position else decay_row(retain)[..., None, :]  # [B, H, S or 1, S]
    start_decay = torch.cumprod(retain, dim=-1)
    if kernel.optimizer == "momentum":
        inner = decay_matrix(gates["momentum"])
        momentum_start = torch.cumprod(gates["momentum"], dim=-1)
        coefficients = decay @ inner
        carried = (decay @ momentum_start[..., None])[..., 0]
    else:
        coefficients, carried = decay, None
    positions, finals, momenta = [], [], []
    for index, (weight0, u, d) in enumerate(zip(state.weights, inputs, errors)):
        if kernel.optimizer == "dgd":
            residual, coefficients = _ut_solve(weight0, u, -d, lr, retain, "grad_first")
            vectors = lr[..., None] * residual
        else:
            vectors = -lr[..., None] * d  # u_i = step_i u_i^T
            if kernel.optimizer == "momentum":
                momenta.append(momentum_start[..., -1, None, None] * state.momentum[index]
                               + _weighted_outer(inner[..., -1, :], vectors, u))
        final = start_decay[..., -1, None, None] * weight0 + _weighted_outer(coefficients[..., -1, :], vectors, u)
        if carried is not None:
            final = final + carried[..., -1, None, None] * state.momentum[index]
        finals.append(final)
        if every_position:
            at = start_decay[..., None, None] * weight0[:, :, None] + torch.einsum(
                "bhti,bhio,bhij->bhtoj", coefficients, vectors, u)
            if carried is not None:
                at = at + carried[..., None, None] * state.momentum[index][:, :, None]
            positions.append(at)
    cut = (lambda t: t.detach()) if kernel.meta == "stop" else (lambda t: t)
    if kernel.read == "after":
        y = _per_token_read(kernel, [cut(w) for w in positions], q)
    else:
        y = apply_sequence(kernel, state.anchor, q.transpose(1, 2)).transpose(1, 2)
    state.weights = [cut(w) for w in finals]
    if momenta:
        state.momentum = [cut(m) for m in momenta]
    _finish_segment(kernel, state, start, size, retain)
    return y


def _errors_at_anchor(kernel, state: LevelState, k: Tensor, v: Tensor, retain: Tensor):
    """Inputs u_l and output errors d_l of each linear map, for every token, at the anchor (the
    anchor times the retain gates since it under `order decay_first`)."""
    if kernel.order == "decay_first":
        previous = state.retain_product if state.retain_product is not None else torch.ones_like(retain[..., 0])
        scale = previous[..., None] * torch.cumprod(retain, dim=-1)  # [B, H, S]
    else:
        scale = None
    return _errors_closed_form(kernel, state.anchor, k, v, scale)


def _base_objective(kernel) -> str:
    """The per-pair objective (omega weighs a window of pairs of its base objective)."""
    return kernel.objective_args["base"] if kernel.objective == "omega" else kernel.objective


def _forward_maps(kernel, anchor: list[Tensor], k: Tensor, scale: Tensor | None):
    """The memory's forward on every token's key: each map's input and pre-activation, and M(k)."""
    mlp = kernel.state_kind == "mlp"
    inputs, pre_activations = [], []
    h = k
    for index, weight in enumerate(anchor):
        inputs.append(h)
        z = h @ weight.transpose(-1, -2)
        if scale is not None:
            z = scale[..., None] * z
        pre_activations.append(z)
        h = activation(kernel.state_args["act"], z) if (mlp and index < len(anchor) - 1) else z
    return inputs, pre_activations, (_finish_mlp(h, k, kernel.state_args) if mlp else h)


def _errors_closed_form(kernel, anchor: list[Tensor], k: Tensor, v: Tensor, scale: Tensor | None):
    """Backpropagation through the memory written out by hand (as TTT-MLP does): no autograd
    call, so the outer level differentiates plain tensor operations."""
    act = kernel.state_args["act"] if kernel.state_kind == "mlp" else "identity"
    inputs, pre_activations, prediction = _forward_maps(kernel, anchor, k, scale)
    error = pair_error(_base_objective(kernel), kernel.objective_args, prediction, v)
    if kernel.state_kind == "mlp":
        error = _through_norm(kernel.state_args["norm"], error, pre_activations[-1])
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


def _through_norm(name: str, error: Tensor, h: Tensor) -> Tensor:
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


def _per_token_read(kernel, weights: list[Tensor], x: Tensor) -> Tensor:
    """M_t(x_t) with one set of weights per position: weights [B, H, S, o, i], x [B, H, S, d]."""
    h = x
    for index, weight in enumerate(weights):
        h = torch.einsum("bhsoi,bhsi->bhso", weight, h)
        if kernel.state_kind == "mlp" and index < len(weights) - 1:
            h = activation(kernel.state_args["act"], h)
    return _finish_mlp(h, x, kernel.state_args) if kernel.state_kind == "mlp" else h


def trajectory_segment(kernel, state: LevelState, k, v, q, gates, start: int) -> Tensor:
    """Matrix or MLP memories whose optimizer is elementwise in the state, with what the other
    forms leave out: per-channel gates, an output map, an omega window, Muon. Every token's
    gradient is still taken at the anchor (the segment lies in one chunk), so all of them are
    known at once; the states of every position of the segment then follow from linear
    recurrences with per-entry decays (`_linear_scan`), Muon's Newton-Schulz runs on all the
    momenta at once, and each token reads its own (mapped) state. Memory grows with the segment
    times the state, so this form is for the small memories these rules are used with."""
    band = None
    keys, values = k, v
    if kernel.objective == "omega":
        keys, values, band = _omega_pairs(kernel, state, k, v, gates["gamma"])
    inputs, errors = _errors_closed_form(kernel, kernel.mapped(state.anchor), keys, values, None)
    grads = []
    for anchor, u, d in zip(state.anchor, inputs, errors):
        if band is None:
            grad = torch.einsum("bhso,bhsi->bhsoi", d, u)
        else:  # each token's objective sums the weighted pairs of its window
            grad = torch.einsum("bhtj,bhjo,bhji->bhtoi", band, d, u)
        grads.append(_output_map_vjp(kernel, anchor, grad))
    if kernel.meta != "full":
        grads = [g.detach() for g in grads]
    dk = k.shape[-1]
    positions, momenta = [], []
    for index, (weight0, grad) in enumerate(zip(state.weights, grads)):
        shape = weight0.shape[-2:]
        lr = _gate_on_map(gates["lr"], shape, dk)
        retain = _gate_on_map(gates["retain"], shape, dk)
        if kernel.optimizer == "gd":
            drive = -lr * grad
        else:
            momentum = _linear_scan(_gate_on_map(gates["momentum"], shape, dk),
                                    -lr * grad if kernel.optimizer == "momentum" else grad,
                                    state.momentum[index])
            momenta.append(momentum[:, :, -1])
            drive = (momentum if kernel.optimizer == "momentum"
                     else -lr * newton_schulz(momentum, kernel.optimizer_args["steps"]))
        positions.append(_linear_scan(retain, drive, weight0))
    cut = (lambda t: t.detach()) if kernel.meta == "stop" else (lambda t: t)
    if kernel.read == "after":
        y = _per_token_read(kernel, _mapped_positions(kernel, [cut(w) for w in positions]), q)
    else:
        y = apply_sequence(kernel, state.anchor, q.transpose(1, 2)).transpose(1, 2)
    state.weights = [cut(w[:, :, -1]) for w in positions]
    if momenta:
        state.momentum = [cut(m) for m in momenta]
    _finish_segment(kernel, state, start, k.shape[2], gates["retain"])
    return y


def _gate_on_map(gate: Tensor, shape: tuple[int, int], channels: int) -> Tensor:
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


def _linear_scan(gate: Tensor, drive: Tensor, start: Tensor) -> Tensor:
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


def _output_map_vjp(kernel, weight: Tensor, grad: Tensor) -> Tensor:
    """Gradients with respect to the mapped weights [B, H, S, o, i] pulled back through the output
    map at the stored `weight` [B, H, o, i] (the reference lets autograd do this, token by token)."""
    if kernel.output == "softmax":  # rows of W = softmax(A): dA = W * (dW - rowsum(dW * W))
        mapped = torch.softmax(weight, dim=-1)[:, :, None]
        return mapped * (grad - (grad * mapped).sum(-1, keepdim=True))
    if kernel.output == "normalize":
        # W = A / n^(q-2), n = ||A||_q over the whole map (clamped at 1e-6, where it is constant):
        # dA = dW / n^(q-2) - (q-2) n^(2-2q) <dW, A> sign(A) |A|^(q-1)
        power = kernel.output_args["q"]
        raw = weight.abs().pow(power).flatten(2).sum(-1).pow(1.0 / power)[..., None, None]
        norm = raw.clamp_min(1e-6)
        inner = torch.einsum("bhsoi,bhoi->bhs", grad, weight)[..., None, None]
        tangent = torch.where(raw > 1e-6, (power - 2) * norm.pow(2 - 2 * power), torch.zeros_like(norm))
        pull = (torch.sign(weight) * weight.abs().pow(power - 1))[:, :, None]
        return grad / norm.pow(power - 2)[:, :, None] - tangent[:, :, None] * inner * pull
    return grad


def _mapped_positions(kernel, positions: list[Tensor]) -> list[Tensor]:
    """The output map on each position's weights [B, H, S, o, i] (positions taken as heads)."""
    if kernel.output == "none":
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


def sequential_segment(kernel, state: LevelState, k, v, q, gates, start: int) -> Tensor:
    outputs = []
    for t in range(k.shape[2]):
        at_t = {role: gate[:, :, t] for role, gate in gates.items()}
        outputs.append(kernel.step(state, k[:, :, t], v[:, :, t], q[:, :, t] if q is not None else None,
                                   at_t, start + t))
    return torch.stack(outputs, dim=2) if q is not None else None


KERNELS = {"anchored": anchored_segment, "delta": delta_segment, "layered": layered_segment,
           "trajectory": trajectory_segment, "sequential": sequential_segment}


# --- the model ---------------------------------------------------------------------------------


class CompiledModel(ReferenceModel):
    """`model(tokens, state=None) -> (logits, state)`, equal to the reference, a segment at a time."""

    prunes_history = True

    def __init__(self, program: ir.Program, torch_compile: bool | str = False, graph_passes=None):
        super().__init__(program)
        self.level_spans = {level.name: level.span for level in program.levels}
        self.plans: dict[str, LevelPlan] = {}
        layer = self.layers[0]
        for name, module in layer.levels.items():
            self.plans[name] = plan_level(program.level(name), module)
        self.fallback = self._whole_model_fallback(program)
        for name, plan in self.plans.items():
            if plan.kernel == "sequential":
                level = program.level(name)
                warnings.warn(f"{level.span}: level `{name}` runs token by token: {plan.reason}",
                              CompileWarning, stacklevel=2)
        if self.fallback:
            warnings.warn(f"{program.file}: the whole model runs token by token: {self.fallback}",
                          CompileWarning, stacklevel=2)
        self.segment = segment_length(program, self.plans)
        self.layer_by_layer = self._layer_by_layer(program)
        # torch.compile's backend for the segment step (True: the default, inductor), or None
        self.compile_backend = ("inductor" if torch_compile is True else torch_compile) or None
        self._compiled_step = None  # made on first use
        self._compiled_kernel_step = None  # the same, for memory rules under the layer-by-layer schedule
        # With graph passes (a list, maybe empty), each segment runs as a traced fx graph
        # (backends/fx.py), one per batch size and segment length, traced on first use.
        self.graph_passes = None if graph_passes is None else list(graph_passes)
        self._graphs: dict[tuple[int, int], object] = {}
        if self.compile_backend:
            obstacle = self._torch_compile_obstacle()
            if obstacle:
                warnings.warn(f"{program.file}: torch.compile is not used: {obstacle}", CompileWarning, stacklevel=2)
                self.compile_backend = None

    def _torch_compile_obstacle(self) -> str:
        """Why torch.compile has nothing to compile, or "" when it has. Under the layer-by-layer
        schedule it compiles each memory rule's segment step (the rest already runs on whole
        calls); otherwise the whole segment step, which must then be one graph."""
        if self.layer_by_layer and not self.fallback:
            if any(_compiles_alone(module, self.plans[name]) for name, module in self.layers[0].levels.items()):
                return ""
            return "no memory rule has a segment form to compile (the layers already run on whole calls)"
        return self._segment_obstacle()

    def _segment_obstacle(self) -> str:
        """Why the whole segment step cannot be traced as one graph, or "" when it can."""
        if self.fallback:
            return self.fallback
        for name, module in self.layers[0].levels.items():
            plan = self.plans[name]
            if plan.kernel == "sequential":
                return f"level `{name}` runs token by token"
            if isinstance(module, CacheLevel):
                return f"the attention cache of `{name}` changes length from segment to segment"
            if module.kernel.objective == "omega":
                return f"the omega window of `{name}` is a list of pairs that grows over the first tokens"
            if isinstance(module, FeedForwardLevel) and module.every and module.meta == "full":
                return (f"differentiating through the updates of continuum level `{name}` (`meta full`) needs "
                        "double backward through compiled graphs, which torch.compile does not support")
        return ""

    def _whole_model_fallback(self, program: ir.Program) -> str:
        from nestc.lang.sema import generators

        for level in program.levels:
            for generator in generators(level):
                if program.level(generator).read == "after" and generator != level.name:
                    return f"level `{generator}` is read after its update by the levels it generates for"
        return ""

    def advance(self, tokens: Tensor, state: ModelState, outer_grad: bool) -> list[Tensor]:
        """Read `tokens` a segment at a time (token by token where the model has no segment form)."""
        if self.fallback:
            return super().advance(tokens, state, outer_grad)
        if self.layer_by_layer and self.graph_passes is None:
            logits = self._sequence(tokens, state)
            state.position += tokens.shape[1]
            return [logits]
        outputs, t = [], 0
        while t < tokens.shape[1]:
            size = min(tokens.shape[1] - t, self.segment - state.position % self.segment)
            chunk = tokens[:, t:t + size]
            if self.task_levels:
                self._learn_from_task_loss(state, chunk[:, 0], outer_grad)
                self._make_fast_weights_leaves(state)
            if self.compile_backend:
                logits = self._compiled_segment(chunk, state)
            elif self.graph_passes is not None:
                logits = self._graph_segment(chunk, state)
            else:
                logits = self._segment(chunk, state)
            outputs.append(logits)
            if self.task_levels:
                self._add_segment_loss(state, logits, chunk)
                state.last_logits = logits[:, -1]
            state.position += size
            t += size
        return outputs

    def _layer_by_layer(self, program: ir.Program) -> bool:
        """Whether each layer may read the whole call before the next one starts: nothing couples
        the layers within a segment (continuum levels learn from the last layer's logits) and no
        level's pipelines read another level's anchor or a MAC window's cache."""
        if self.task_levels:
            return False
        if any(isinstance(node, ir.MemoryAsContext) for node in _block_nodes(program.model.block)):
            return False
        return not any(_is_generator(program, level.name) for level in program.levels)

    def _sequence(self, tokens: Tensor, state: ModelState) -> Tensor:
        """The logits of a whole call, layer by layer: projections, convolutions, gates and
        feed-forward blocks run once on the whole [batch, time, width]; only the memory rules
        (and attention, in blocks) step through it segment by segment."""
        x = self.embedding(tokens)
        for layer, level_states, segment in zip(self.layers, state.levels, state.segments):
            x = run_layer(self, layer, x, state.position, level_states, segment)
        return self.logits(x)

    def _segment(self, chunk: Tensor, state: ModelState) -> Tensor:
        """The logits of one segment, advancing every level's state in place."""
        x = self.embedding(chunk)
        for layer, level_states, segment in zip(self.layers, state.levels, state.segments):
            x = run_layer(self, layer, x, state.position, level_states, segment)
        return self.logits(x)

    def _make_fast_weights_leaves(self, state: ModelState) -> None:
        """Continuum levels differentiate their chunk's loss with respect to their fast weights,
        so weights cut from any graph (inference, a detached state) become leaves."""
        for level_states in state.levels:
            for name in self.task_levels:
                level_state = level_states[name]
                if not all(w.requires_grad for w in level_state.weights):
                    level_state.weights = [w.detach().requires_grad_() for w in level_state.weights]

    def _compiled_segment(self, chunk: Tensor, state: ModelState) -> Tensor:
        """`_segment` through torch.compile: the state's tensors go in with the same structure,
        strides and requires_grad at every segment, and the position as a tensor, so that one
        graph serves every segment of a given length."""
        if self._compiled_step is None:
            self._compiled_step = torch.compile(self._segment_from_tensors, backend=self.compile_backend,
                                                fullgraph=True, dynamic=False)
        return self._segment_on_tensors(chunk, state, lambda layout, position, tensors: self._compiled_step(
            layout, _as_step_input(chunk), position, [_as_step_input(t) for t in tensors]))

    def _compiled_kernel(self, plan: str, kernel, state: LevelState, k: Tensor, v: Tensor, q: Tensor,
                         gates: dict[str, Tensor], start: int) -> Tensor:
        """A memory rule's segment through torch.compile, as a pure function of tensors like
        `_compiled_segment`: the same structure, strides and requires_grad at every segment and
        the position as a tensor, so one graph serves every segment of a given length."""
        if self._compiled_kernel_step is None:
            self._compiled_kernel_step = torch.compile(_kernel_from_tensors, backend=self.compile_backend,
                                                       fullgraph=True, dynamic=False)
        if kernel.order == "decay_first" and state.retain_product is None:
            state.retain_product = torch.ones_like(gates["retain"][..., 0])
        layout, tensors = flatten_levels([{"": state}])
        roles = tuple(sorted(gates))
        y, tensors = self._compiled_kernel_step(
            plan, kernel, layout, roles, _as_step_input(k), _as_step_input(v), _as_step_input(q),
            [_as_step_input(gates[role]) for role in roles], torch.tensor(start, device=k.device),
            [_as_step_input(t) for t in tensors])
        unflatten_levels([{"": state}], layout, tensors)
        if (start + k.shape[2]) % kernel.every == 0:
            state.retain_product = None  # the reference's form where a chunk has just closed
        return y

    def _graph_segment(self, chunk: Tensor, state: ModelState) -> Tensor:
        """`_segment` through the traced fx graph for this batch size and segment length."""
        from nestc.backends import fx

        key = tuple(chunk.shape)
        if key not in self._graphs:
            graph = fx.trace_segment(self, *key)
            fx.run_passes(graph, self.graph_passes)
            self._graphs[key] = graph
        parameters = [parameter for _, parameter in self.named_parameters()]
        return self._segment_on_tensors(chunk, state, lambda layout, position, tensors: self._graphs[key](
            parameters, chunk, position, tensors))

    def _segment_on_tensors(self, chunk: Tensor, state: ModelState, step) -> Tensor:
        """Run `step(layout, position, state tensors) -> (logits, state tensors)` on the state
        made complete and flat, and write its result back in the reference's form."""
        _complete_state(self, state, chunk.shape[0])
        layout, tensors = flatten_levels(state.levels)
        logits, tensors = step(layout, torch.tensor(state.position, device=chunk.device), tensors)
        _write_back_state(self, state, layout, tensors, state.position + chunk.shape[1])
        return logits

    def _segment_from_tensors(self, layout: tuple, chunk: Tensor, position: Tensor,
                              tensors: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """The segment step as a pure function of tensors (what torch.compile traces): the state
        rebuilt from `tensors` by `layout`, advanced by `_segment`'s code, flattened again."""
        levels = [{name: LevelState() for name in layer.levels} for layer in self.layers]
        unflatten_levels(levels, layout, tensors)
        x = self.embedding(chunk)
        for layer, level_states in zip(self.layers, levels):
            x = run_layer(self, layer, x, position, level_states)
        return self.logits(x), tensors_at(levels, layout)

    def _add_segment_loss(self, state: ModelState, logits: Tensor, chunk: Tensor) -> None:
        """The predictions inside the segment whose targets are inside it too."""
        if chunk.shape[1] < 2:
            return
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1),
                               reduction="sum")
        for level_states in state.levels:
            for name in self.task_levels:
                level_state = level_states[name]
                level_state.pending = loss if level_state.pending is None else level_state.pending + loss


# --- the state as the torch.compile step's inputs --------------------------------------------


def _compiles_alone(module, plan: LevelPlan) -> bool:
    """Whether this level's memory rule runs through torch.compile on its own (layer by layer):
    a segment form whose state is fixed tensors (an omega window is a list that grows)."""
    return (isinstance(module, MemoryLevel) and plan.kernel in ("anchored", "delta", "layered", "trajectory")
            and module.kernel.objective != "omega" and "query" in module.pipelines)


def _kernel_from_tensors(plan: str, kernel, layout: tuple, roles: tuple, k: Tensor, v: Tensor, q: Tensor,
                         gates: list[Tensor], start: Tensor, tensors: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """A memory rule's segment as a pure function of tensors (what torch.compile traces)."""
    levels = [{"": LevelState()}]
    unflatten_levels(levels, layout, tensors)
    y = KERNELS[plan](kernel, levels[0][""], k, v, q, dict(zip(roles, gates)), start)
    return y, tensors_at(levels, layout)


def _complete_state(model: CompiledModel, state: ModelState, batch: int) -> None:
    """Fill in what a stream's first segment creates on the fly (zero convolution histories, a
    retain product of ones), so the state has the same tensors before every segment."""
    like = model.embedding.weight
    for layer, level_states in zip(model.layers, state.levels):
        for name, module in layer.levels.items():
            level_state = level_states[name]
            if not isinstance(module, MemoryLevel):
                continue
            pipelines = list(module.pipelines.values()) + [g.pipeline for g in module.gates.values() if g.pipeline]
            for stage in (stage for pipeline in pipelines for stage in pipeline.stages):
                if stage.kind == "conv" and stage.buffer_name not in level_state.buffers:
                    level_state.buffers[stage.buffer_name] = like.new_zeros(batch, stage.args["window"] - 1,
                                                                            stage.width)
            if module.kernel.every and module.kernel.order == "decay_first" and level_state.retain_product is None:
                level_state.retain_product = like.new_ones(batch, module.heads)


def _as_step_input(tensor: Tensor) -> Tensor:
    """Dynamo guards on strides and requires_grad: give every input the contiguous strides, and
    make it require grad exactly when grad mode is on (a zero initial state becomes a leaf), so
    the first segment of a stream and the ones after it pass the same guards."""
    strides, step = [], 1
    for size in reversed(tensor.shape):
        strides.insert(0, step)
        step *= size
    if tensor.stride() != tuple(strides):
        tensor = tensor.clone(memory_format=torch.contiguous_format)
    if torch.is_grad_enabled() and not tensor.requires_grad and tensor.is_floating_point():
        return tensor.detach().requires_grad_()
    return tensor if torch.is_grad_enabled() else tensor.detach()


def _write_back_state(model: CompiledModel, state: ModelState, layout: tuple, tensors: list[Tensor],
                      position: int) -> None:
    """Store the step's outputs in the caller's state, in the reference's form: no retain product
    (None) where a chunk has just closed."""
    unflatten_levels(state.levels, layout, tensors)
    for layer, level_states in zip(model.layers, state.levels):
        for name, module in layer.levels.items():
            if isinstance(module, MemoryLevel) and module.kernel.every and position % module.kernel.every == 0:
                level_states[name].retain_product = None


def _block_nodes(block):
    yield block
    for child in (getattr(block, "items", None) or getattr(block, "branches", None) or getattr(block, "options", None)
                  or ()):
        yield from _block_nodes(child)
    for attribute in ("body", "main", "gate"):
        if hasattr(block, attribute):
            yield from _block_nodes(getattr(block, attribute))


def run_layer(model: CompiledModel, layer, x: Tensor, start: int, states: dict[str, LevelState],
              segment: dict | None = None) -> Tensor:
    """One layer's block on a segment x [B, S, D]; `segment` holds the layer's MAC caches."""
    snapshot = {name: states[name].anchor for name, level in layer.levels.items() if isinstance(level, MemoryLevel)}
    stepped: dict[str, Tensor] = {}

    def read_level(name: str, value: Tensor) -> Tensor:
        level = layer.levels[name]
        heads = value.reshape(value.shape[0], value.shape[1], level.heads, -1)
        return apply_sequence(level.kernel, snapshot[name], heads).reshape(value.shape[0], value.shape[1], -1)

    def run_level(name: str, value: Tensor) -> Tensor:
        for member in layer.order[name]:
            if member not in stepped:
                with fx_provenance(member, model.level_spans.get(member)):
                    stepped[member] = run_module(model, layer.levels[member], model.plans[member], value, start,
                                                 states[member], read_level)
        return stepped[name]

    def memory_as_context(node, value: Tensor) -> Tensor:
        if segment is None:
            raise BackendError("memory-as-context blocks need the stream's segment caches")
        return mac_segment(model, layer, node, value, start, states, segment, snapshot, read_level)

    return layer.run_block(layer.block, x, run_level, memory_as_context)


def mac_segment(model, layer, node, x: Tensor, start: int, states: dict[str, LevelState], segment: dict,
                snapshot: dict[str, list[Tensor]], read_level) -> Tensor:
    """Titans MAC on a segment that lies in one MAC window and one chunk of the memory. Every
    token's retrieval M*(q_t) is read at the memory's anchor at once; the cache entries (the
    persistent tokens at a window's start, then each token's retrieval followed by the token)
    form one interleaved sequence through the attention's key and value pipelines; one masked
    softmax gives every y_t; the memory then learns from the y's with its own segment form."""
    _, memory_name, attention_name, window_length, path = node
    memory, attention = layer.levels[memory_name], layer.levels[attention_name]
    batch, size = x.shape[:2]
    cache = segment.setdefault(path, LevelState())
    retrieval = segment.setdefault(f"{path}:retrieval", LevelState())
    positions = start + torch.arange(size, device=x.device)
    entries, entry_positions = [], []
    if start % window_length == 0:
        cache.keys = cache.values = None
        persistent = layer.parts[path].tokens
        entries.append(persistent.expand(batch, -1, -1))
        entry_positions.append(torch.zeros(persistent.shape[0], dtype=torch.long, device=x.device) + start)
    query = run_pipeline(memory.pipelines["query"], x, start, retrieval, read_level)
    query = query.reshape(batch, size, memory.heads, -1)
    retrieved = memory.out(apply_sequence(memory.kernel, snapshot[memory_name], query).reshape(batch, size, -1))
    entries.append(torch.stack([retrieved, x], dim=2).reshape(batch, 2 * size, -1))
    entry_positions.append(positions.repeat_interleave(2))
    entries, entry_positions = torch.cat(entries, dim=1), torch.cat(entry_positions)
    k, v = (run_pipeline(attention.pipelines[role], entries, entry_positions, cache, read_level)
            .reshape(batch, entries.shape[1], attention.heads, -1).transpose(1, 2) for role in ("key", "value"))
    q = run_pipeline(attention.pipelines["query"], x, start, cache, read_level)
    q = q.reshape(batch, size, attention.heads, -1).transpose(1, 2)
    # token t's own entry (the token itself) closes its view of the cache
    own = entries.shape[1] - 2 * size + 2 * torch.arange(size, device=x.device)[:, None] + 1
    y = attend_cached(attention, cache, k, v, q, own)
    y = attention.out(y.transpose(1, 2).reshape(batch, size, -1))
    with fx_provenance(memory_name, model.level_spans.get(memory_name)):
        read = run_module(model, memory, model.plans[memory_name], y, start, states[memory_name], read_level)
    return y * read


def run_pipeline(pipeline, x: Tensor, start: int, state: LevelState, read_level) -> Tensor:
    for kind, target in pipeline.steps:
        x = read_level(target, x) if kind == "level" else stage_sequence(pipeline.stages[target], x, start, state)
    return x


def run_module(model, module, plan: LevelPlan, x: Tensor, start: int, state: LevelState, read_level):
    batch, size = x.shape[:2]
    if isinstance(module, FeedForwardLevel):
        weights = state.weights if module.every else [w.unsqueeze(0).expand(batch, *w.shape) for w in module.kernel.initial]
        return apply_sequence(module.kernel, weights, x[:, :, None, :]).reshape(x.shape)
    if isinstance(module, CacheLevel):
        # a whole sequence (layer by layer) attends in blocks: the scores stay linear in its length
        spans = _spans(start, size, ATTENTION_BLOCK)
        blocks = torch.split(x, [length for _, length in spans], dim=1) if len(spans) > 1 else [x]
        return torch.cat([attend_segment(module, block, start + offset, state, read_level)
                          for (offset, _), block in zip(spans, blocks)], dim=1)
    heads = module.heads
    inputs = {role: run_pipeline(p, x, start, state, read_level).reshape(batch, size, heads, -1).transpose(1, 2)
              for role, p in module.pipelines.items()}
    gates = {role: _gate_sequence(gate, x, start, state, read_level, heads) for role, gate in module.gates.items()}
    query = inputs.get("query")
    if plan.kernel == "frozen":
        if query is None:
            return None
        y = apply_sequence(module.kernel, state.weights, query.transpose(1, 2)).transpose(1, 2)
    else:
        gates.setdefault("lr", x.new_ones(batch, heads, size))
        gates.setdefault("retain", x.new_ones(batch, heads, size))
        kernel = KERNELS[plan.kernel]
        read = query if (query is not None or plan.kernel == "sequential") else inputs["key"]
        spans = _spans(start, size, model.segment)
        lengths = [length for _, length in spans]

        def pieces(tensor: Tensor | None) -> list:
            # one split, not a slice per span: a slice's backward writes into zeros of the whole length
            if tensor is None or len(spans) == 1:
                return [tensor] * len(spans)
            return list(torch.split(tensor, lengths, dim=2))

        gate_pieces = {role: pieces(gate) for role, gate in gates.items()}
        if model.compile_backend and model.layer_by_layer and _compiles_alone(module, plan):
            kernel = functools.partial(model._compiled_kernel, plan.kernel)
        outputs = [kernel(module.kernel, state, k, v, q, {role: gate_pieces[role][index] for role in gates},
                          start + offset)
                   for index, ((offset, _), k, v, q) in enumerate(zip(spans, pieces(inputs["key"]),
                                                                     pieces(inputs["value"]), pieces(read)))]
        if query is None:
            return None
        y = torch.cat(outputs, dim=2)
    return module.out(y.transpose(1, 2).reshape(batch, size, -1))


def _spans(start: int | Tensor, size: int, period: int) -> list[tuple[int, int]]:
    """(offset, length) pieces of positions start .. start + size - 1 that never cross a multiple
    of `period`. The torch.compile step's start is a tensor; its segment is one piece already."""
    if isinstance(start, Tensor):
        return [(0, size)]
    spans, offset = [], 0
    while offset < size:
        length = min(size - offset, period - (start + offset) % period)
        spans.append((offset, length))
        offset += length
    return spans


def _gate_sequence(gate, x: Tensor, start: int, state: LevelState, read_level, heads: int) -> Tensor:
    """A gate over the segment as [B, H, S] (or [B, H, S, d] per channel)."""
    batch, size = x.shape[:2]
    if gate.constant is not None:
        return x.new_full((batch, heads, size), gate.constant)
    if gate.learned is not None:
        values = gate.learned.expand(batch, size, *gate.learned.shape)
    else:
        values = run_pipeline(gate.pipeline, x, start, state, read_level)
        if values.shape[-1] != heads:
            values = values.reshape(batch, size, heads, -1)
    return values.transpose(1, 2) if values.dim() == 3 else values.permute(0, 2, 1, 3)


def attend_segment(module: CacheLevel, x: Tensor, start: int, state: LevelState, read_level) -> Tensor:
    batch, size = x.shape[:2]
    k, v, q = (run_pipeline(module.pipelines[r], x, start, state, read_level)
               .reshape(batch, size, module.heads, -1).transpose(1, 2) for r in ("key", "value", "query"))
    own = torch.arange(size, device=x.device)[:, None]  # each token's own entry among the new ones
    y = attend_cached(module, state, k, v, q, own if module.read == "after" else own - 1)
    return module.out(y.transpose(1, 2).reshape(batch, size, -1))


def attend_cached(module: CacheLevel, state: LevelState, k: Tensor, v: Tensor, q: Tensor, newest: Tensor) -> Tensor:
    """Append the entries k, v [B, H, N, d] to the cache, then let query t read the cached entries
    up to `newest[t]` (an index among the new entries; -1: only older ones), within the window;
    the cache keeps the last `window` entries. Returns [B, H, S, d]."""
    previous = 0 if state.keys is None else state.keys.shape[2]
    keys = k if state.keys is None else torch.cat([state.keys, k], dim=2)
    values = v if state.values is None else torch.cat([state.values, v], dim=2)
    newest = previous + newest
    index = torch.arange(keys.shape[2], device=k.device)[None, :]
    allowed = index <= newest
    if module.window:
        allowed &= index > newest - module.window
    scores = torch.einsum("bhtd,bhnd->bhtn", q, keys) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a read with nothing cached reads zero
    y = torch.einsum("bhtn,bhnd->bhtd", weights, values)
    if module.window:
        keys, values = keys[:, :, -module.window:], values[:, :, -module.window:]
    state.keys, state.values = keys, values
    return y


def build(program: ir.Program, torch_compile: bool | str = False, graph_passes=None) -> CompiledModel:
    return CompiledModel(program, torch_compile, graph_passes)


def run_kernel(kernel, k: Tensor, v: Tensor, q: Tensor, gates: dict[str, Tensor],
               state: LevelState | None = None, start: int = 0) -> tuple[Tensor, LevelState]:
    """The compiled counterpart of `reference.run_kernel` (same arguments and layout): the rule
    alone over precomputed inputs, segment by segment."""
    per_channel = any(g.dim() == 4 for g in gates.values())
    plan = plan_kernel(kernel, per_channel)
    length = MAX_SEGMENT if kernel.every <= 1 else math.gcd(MAX_SEGMENT, kernel.every)
    state = kernel.initial_state(k.shape[0], k) if state is None else state
    full = {role: gate for role, gate in gates.items()}
    full.setdefault("lr", k.new_ones(k.shape[:3]))
    full.setdefault("retain", k.new_ones(k.shape[:3]))
    outputs, t = [], 0
    step = KERNELS["sequential" if plan.kernel == "frozen" else plan.kernel]
    while t < k.shape[1]:
        size = min(k.shape[1] - t, length - (start + t) % length)
        part = slice(t, t + size)
        at = {role: (g[:, part].transpose(1, 2) if g.dim() == 3 else g[:, part].permute(0, 2, 1, 3))
              for role, g in full.items()}
        outputs.append(step(kernel, state, k[:, part].transpose(1, 2), v[:, part].transpose(1, 2),
                            q[:, part].transpose(1, 2), at, start + t))
        t += size
    return torch.cat(outputs, dim=2).transpose(1, 2), state

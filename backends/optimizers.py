"""Optimizers written as levels (SEMANTICS §3, "Optimizers are levels"), token by token.

A level whose `update` names optimizer levels steps, for each of its weights W with gradient g_t
at the anchor: each optimizer level m (one state shaped like W) takes one gradient-descent step on
its own objective over the gradient stream, m_t = retain_t m_{t-1} - lr_t dl/dm, and W gains the
update expression: W_t = retained(W_{t-1}) + update_t, where `retained` is the level's rule (gd:
retain_t W; dgd: W (retain_t I - lr_t u u^T)). `LevelOptimizer` is that rule, literally (the
gradient of each optimizer level's objective by autograd, as the reference does for a memory).

The outer optimizer written as levels (SEMANTICS §8, nestc/runtime/optim.py `LevelsOptimizer`)
steps its optimizer levels and evaluates its update with the same `moment_gradient` and
`evaluate`, each parameter viewed as one weight of one head.

Where the composition equals a built-in optimizer (nestc/passes/optimizers.py), the compiled
backend runs the built-in's segment form instead, on the composition's gates and buffer:
`lowered` renames them for the form and back.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from nestc import rules
from nestc.lang import ir
from nestc.backends.common import op_args
from nestc.backends.pipelines import combine_gates
from nestc.passes.optimizers import ClosedForm, gate_key, stored_levels
from nestc.rules.optimizers import newton_schulz


class LevelOptimizer(nn.Module):
    """A level's `update` and its optimizer levels, one token and one weight at a time.

    A buffer (state `moment`) has one tensor per served weight. A memory of rows (a deep
    momentum's MLP) has its maps for each served weight, of the weight's input width, side by
    side in its list of the state's `moments` (weight by weight); `init meta` makes their initial
    values parameters of the outer level."""

    def __init__(self, update: ir.Update, meta: str, weight_shapes: list[tuple[int, ...]]):
        super().__init__()
        self.update = update
        self.meta = meta
        self.objectives = {level.name: (rules.OBJECTIVES[level.objective.name], op_args(level.objective))
                           for level in update.levels}
        self.kept = stored_levels(update)  # those with retain 0 keep nothing of their past
        self.memories = {level.name: (rules.STATES[level.state.name], op_args(level.state))
                         for level in update.levels if not rules.STATES[level.state.name].optimizer_state}
        # each memory's map shapes for each served weight [H, rows, width]: it maps a row to a row
        self.map_shapes = {name: [rule.weight_shapes(args, shape[0], shape[-1], shape[-1]) for shape in weight_shapes]
                           for name, (rule, args) in self.memories.items()}
        self.initial = nn.ModuleDict({
            level.name: nn.ModuleList(
                nn.ParameterList(nn.Parameter(self.memories[level.name][0].initial_value(
                    self.memories[level.name][1], map_shape, index, len(maps)))
                    for index, map_shape in enumerate(maps))
                for maps in self.map_shapes[level.name])
            for level in update.levels if level.name in self.memories and level.init.name == "meta"})

    def initial_moments(self, weights: list[Tensor]) -> dict[str, list[Tensor]]:
        moments = {}
        for name in self.kept:
            if name not in self.memories:
                moments[name] = [torch.zeros_like(w) for w in weights]
            elif name in self.initial:
                moments[name] = [p.to(weights[0].dtype).unsqueeze(0).expand(weights[0].shape[0], *p.shape)
                                 for maps in self.initial[name] for p in maps]
            else:
                moments[name] = [weights[0].new_zeros((weights[0].shape[0],) + shape)
                                 for maps in self.map_shapes[name] for shape in maps]
        return moments

    def _maps(self, name: str, index: int) -> slice:
        """Where served weight `index`'s maps of memory `name` sit in its list of moments."""
        counts = [len(maps) for maps in self.map_shapes[name]]
        start = sum(counts[:index])
        return slice(start, start + counts[index])

    def step(self, moments: dict[str, list[Tensor]], index: int, weight: Tensor, grad: Tensor,
             gates: dict[str, Tensor], by_hand: bool = False) -> Tensor:
        """Step every optimizer level on this weight's gradient; return the update. `by_hand`: a
        buffer's gradient from its objective's closed-form error (`moment_error`, the scan form's),
        not by autograd (`moment_gradient`, the reference's)."""
        stream = {"grad": grad, "param": weight, "lr": gates["lr"]}
        read = {}
        for level in self.update.levels:
            if level.name in self.memories:
                read[level.name] = self._memory_step(level, moments[level.name], index, weight, stream, read, gates)
                continue
            kept = level.name in moments
            previous = moments[level.name][index] if kept else torch.zeros_like(weight)
            read[level.name] = self._moment_step(level, previous, stream, read, gates, by_hand)
            if kept:
                moments[level.name][index] = read[level.name]
        return evaluate(self.update.expression, stream, read, weight)

    def _memory_step(self, level: ir.Level, moments: list[Tensor], index: int, weight: Tensor, stream: dict,
                     read: dict[str, Tensor], gates: dict[str, Tensor]) -> Tensor:
        """A memory of rows: its maps M take one GD step on the sum over the rows r of
        l(M(key_r), value_r), then it is read at each row of its query: weight-shaped."""
        rule, args = self.memories[level.name]
        objective, objective_args = self.objectives[level.name]
        place = self._maps(level.name, index)

        def rows(expression) -> Tensor:  # [B, H, rows, width] -> [B, rows, H, width], the rows as a sequence
            return _as_rows(evaluate(expression, stream, read, weight).expand_as(weight)).transpose(1, 2)

        maps = moments[place]
        outer = torch.is_grad_enabled()
        leaves = [m.view_as(m) if (outer and m.requires_grad) else m.detach().requires_grad_() for m in maps]
        with torch.enable_grad():
            loss = objective.pair_loss(objective_args, rule.apply_sequence(args, leaves, rows(level.key)),
                                       rows(level.value), {}).sum()
            grads = torch.autograd.grad(loss, leaves, create_graph=self.meta == "full" and outer)
        if self.meta != "full":
            grads = [g.detach() for g in grads]
        new = [_broadcast(gates[gate_key(level, "retain")], m) * m - _broadcast(gates[gate_key(level, "lr")], m) * g
               for m, g in zip(maps, grads)]
        moments[place] = new
        result = rule.apply_sequence(args, new, rows(level.query)).transpose(1, 2)
        return result.reshape(weight.shape)

    def _moment_step(self, level: ir.Level, moment: Tensor, stream: dict, read: dict[str, Tensor],
                     gates: dict[str, Tensor], by_hand: bool) -> Tensor:
        """m_t = retain_t m_{t-1} - lr_t dl/dm at m_{t-1} (`moment_gradient`, or `moment_error`)."""
        objective, args = self.objectives[level.name]
        if by_hand:
            gradient = moment_error(level, objective, args, moment, stream, read)
            gradient = gradient if self.meta == "full" else gradient.detach()
        else:
            gradient = moment_gradient(level, objective, args, moment, stream, read,
                                       differentiable=self.meta == "full")
        retain = _broadcast(gates[gate_key(level, "retain")], moment)
        lr = _broadcast(gates[gate_key(level, "lr")], moment)
        return retain * moment - lr * gradient


def moment_gradient(level: ir.Level, objective, args: dict, moment: Tensor, stream: dict[str, Tensor],
                    read: dict[str, Tensor], differentiable: bool = False) -> Tensor:
    """dl/dm of an optimizer level's objective at its state `moment` [B, H, ...]: `dot`,
    l = -<m, value>; `l2`, l = 1/2 ||m key^T - value I||^2 (each buffer as rows x columns). Its key
    and value may read the optimizer levels that stepped before it (`read`). `differentiable`:
    the outer gradient flows through it (`meta full`). Shared by the inner levels' updates and the
    outer optimizer's (nestc/runtime/optim.py `LevelsOptimizer`)."""
    value = evaluate(level.value, stream, read, moment)
    outer = torch.is_grad_enabled()
    leaf = moment.view_as(moment) if (outer and moment.requires_grad) else moment.detach().requires_grad_()
    with torch.enable_grad():
        if level.key is None:
            prediction, target = leaf.flatten(2), value.expand_as(moment).flatten(2)
        else:
            key = evaluate(level.key, stream, read, moment)
            rows = _as_rows(leaf)
            prediction = rows @ _as_rows(key.expand_as(moment)).transpose(-1, -2)
            identity = torch.eye(rows.shape[-2], dtype=rows.dtype, device=rows.device)
            target = _broadcast(value, prediction) * identity
        loss = objective.pair_loss(args, prediction, target, {}).sum()
        (gradient,) = torch.autograd.grad(loss, leaf, create_graph=differentiable and outer)
    return gradient if differentiable else gradient.detach()


def moment_error(level: ir.Level, objective, args: dict, moment: Tensor, stream: dict[str, Tensor],
                 read: dict[str, Tensor]) -> Tensor:
    """`moment_gradient` written out with the objective's closed-form error (`pair_error`, which
    tests/test_rules.py holds to its `pair_loss`): `dot`, dl/dm = error(m, value); `l2`,
    dl/dm = error(m key^T, value I) key. Plain tensor operations, so the outer level
    differentiates it as it is."""
    value = evaluate(level.value, stream, read, moment)
    if level.key is None:
        return objective.pair_error(args, moment, value.expand_as(moment), {})
    key = _as_rows(evaluate(level.key, stream, read, moment).expand_as(moment))
    prediction = _as_rows(moment) @ key.transpose(-1, -2)
    identity = torch.eye(prediction.shape[-1], dtype=prediction.dtype, device=prediction.device)
    return (objective.pair_error(args, prediction, _broadcast(value, prediction) * identity, {}) @ key) \
        .reshape(moment.shape)


def _as_rows(weight: Tensor) -> Tensor:
    """A weight as a matrix per (batch, head): a vector state's as one row."""
    return weight.unsqueeze(-2) if weight.dim() == 3 else weight


def _broadcast(value, like: Tensor) -> Tensor:
    """A number or a per-head value [B, H] against a weight-shaped tensor [B, H, ...]."""
    if not isinstance(value, Tensor):
        return like.new_tensor(value)
    if value.dim() == 1:  # one constant per head
        value = value[None]
    return value.reshape(value.shape + (1,) * (like.dim() - value.dim()))


def evaluate(expression, stream: dict[str, Tensor], read: dict[str, Tensor], like: Tensor) -> Tensor:
    """An expression of the gradient stream (an optimizer level's input, a level's update) for one
    weight `like` [B, H, ...]: elementwise arithmetic, per-head values broadcast over the weight."""
    if isinstance(expression, ir.StreamRef):
        return _broadcast(stream[expression.name], like)
    if isinstance(expression, ir.OptimizerRef):
        return read[expression.level]
    if isinstance(expression, ir.Constant):
        value = expression.value
        return _broadcast(like.new_tensor(value) if isinstance(value, tuple) else float(value), like)
    if isinstance(expression, ir.NewtonSchulz):
        return newton_schulz(evaluate(expression.operand, stream, read, like), expression.steps)
    operands = [evaluate(operand, stream, read, like) for operand in expression.operands]
    return combine_gates(expression.op, operands)


def lowered(run, closed: ClosedForm, kernel, state, k, v, q, gates: dict[str, Tensor], start: int):
    """Run a built-in optimizer's segment form for a composition equal to it: the form reads the
    composition's gates under the built-in's roles, and its buffer as the built-in's momentum."""
    gates = {**gates, **{role: gates[key] for role, key in closed.gates}}
    if closed.buffer is not None:
        state.momentum = state.moments[closed.buffer]
    try:
        return run(kernel, state, k, v, q, gates, start)
    finally:
        if closed.buffer is not None:
            state.moments[closed.buffer], state.momentum = state.momentum, []

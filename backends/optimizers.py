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
from torch import Tensor

from nestc import rules
from nestc.lang import ir
from nestc.backends.common import op_args
from nestc.backends.pipelines import combine_gates
from nestc.passes.optimizers import ClosedForm, gate_key, stored_levels
from nestc.rules.optimizers import newton_schulz


class LevelOptimizer:
    """A level's `update` and its optimizer levels, one token and one weight at a time."""

    def __init__(self, update: ir.Update, meta: str):
        self.update = update
        self.meta = meta
        self.objectives = {level.name: (rules.OBJECTIVES[level.objective.name], op_args(level.objective))
                           for level in update.levels}
        self.kept = stored_levels(update)  # those with retain 0 keep nothing of their past

    def initial_moments(self, weights: list[Tensor]) -> dict[str, list[Tensor]]:
        return {name: [torch.zeros_like(w) for w in weights] for name in self.kept}

    def step(self, moments: dict[str, list[Tensor]], index: int, weight: Tensor, grad: Tensor,
             gates: dict[str, Tensor]) -> Tensor:
        """Step every optimizer level on this weight's gradient; return the update."""
        stream = {"grad": grad, "param": weight, "lr": gates["lr"]}
        read = {}
        for level in self.update.levels:
            kept = level.name in moments
            previous = moments[level.name][index] if kept else torch.zeros_like(weight)
            read[level.name] = self._moment_step(level, previous, stream, read, gates)
            if kept:
                moments[level.name][index] = read[level.name]
        return evaluate(self.update.expression, stream, read, weight)

    def _moment_step(self, level: ir.Level, moment: Tensor, stream: dict, read: dict[str, Tensor],
                     gates: dict[str, Tensor]) -> Tensor:
        """m_t = retain_t m_{t-1} - lr_t dl/dm at m_{t-1} (`moment_gradient`)."""
        objective, args = self.objectives[level.name]
        gradient = moment_gradient(level, objective, args, moment, stream, read, differentiable=self.meta == "full")
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

"""The outer level's optimizers, built from a spec's `train { optimizer ... }`."""

from __future__ import annotations

import math

import torch
from torch import nn

from nestc import rules
from nestc.lang import ir, schema
from nestc.backends.common import op_args
from nestc.backends.optimizers import evaluate, moment_gradient
from nestc.passes.optimizers import GRAD, MINUS_LR, slow_period
from nestc.rules.optimizers import newton_schulz


def _is_matrix(name: str, parameter: torch.Tensor) -> bool:
    """Hidden weight matrices get the orthogonalised update; embeddings, gains and biases do not."""
    return parameter.dim() == 2 and "embedding" not in name


class Muon(torch.optim.Optimizer):
    """Momentum, then Newton-Schulz orthogonalisation of each weight matrix's update; AdamW for the
    rest (the common Muon recipe): B = momentum B + g, W = (1 - lr wd) W - lr s NS(B) with
    s = sqrt(max(1, rows / cols)).

    Not torch.optim.Muon (torch 2.13), which agrees on the Newton-Schulz coefficients and steps,
    the transposition of tall matrices, s (`adjust_lr_fn="original"`), the decoupled weight decay
    and, with `nesterov=False`, the plain momentum, but always orthogonalises in bfloat16 (no
    argument turns that off): its update differs from this rule by about 1% (relative, in
    float64; tests/test_outer_optimizers.py). It also keeps B as an average (momentum B +
    (1 - momentum) g) and divides by max(|B|, eps) where the rule divides by |B| + eps, which
    the normalisation all but cancels (1e-9 relative)."""

    def __init__(self, named, lr, momentum, ns_steps, adam_lr, weight_decay):
        named = list(named)
        self.matrices = [p for n, p in named if _is_matrix(n, p)]
        others = [p for n, p in named if not _is_matrix(n, p)]
        super().__init__([{"params": self.matrices, "lr": lr, "kind": "muon"},
                          {"params": others, "lr": adam_lr, "kind": "adam"}],
                         dict(momentum=momentum, ns_steps=ns_steps, weight_decay=weight_decay))
        self.adam = torch.optim.AdamW(others, lr=adam_lr, weight_decay=weight_decay) if others else None

    @torch.no_grad()
    def step(self):
        group = self.param_groups[0]
        for parameter in group["params"]:
            if parameter.grad is None:
                continue
            state = self.state[parameter]
            buffer = state.setdefault("momentum", torch.zeros_like(parameter))
            buffer.mul_(group["momentum"]).add_(parameter.grad)
            update = newton_schulz(buffer, group["ns_steps"])
            scale = max(1.0, parameter.shape[0] / parameter.shape[1]) ** 0.5
            parameter.mul_(1 - group["lr"] * group["weight_decay"]).add_(update, alpha=-group["lr"] * scale)
        if self.adam is not None:
            self.adam.param_groups[0]["lr"] = self.param_groups[1]["lr"]
            self.adam.step()

    def state_dict(self):
        """The momenta and, beside them, the inner AdamW's moments (which torch's default omits)."""
        state = super().state_dict()
        if self.adam is not None:
            state["adam"] = self.adam.state_dict()
        return state

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        adam = state_dict.pop("adam", None)
        super().load_state_dict(state_dict)
        if (adam is None) != (self.adam is None):
            raise ValueError("the saved Muon state and this model disagree on whether an inner AdamW exists")
        if adam is not None:
            self.adam.load_state_dict(adam)


class M3(torch.optim.Optimizer):
    """Multi-scale Momentum Muon (Nested Learning, Alg. 1), as printed: a fast momentum M1 and a
    second moment V accumulated every step, a slow momentum M2 that adds beta3 times the sum of the
    last `every` gradients once every `every` steps, and the update
    theta -= lr (NS(M1) + alpha NS(M2)) / (sqrt(V) + eps). Parameters that are not weight matrices
    take the same step without the orthogonalisation."""

    def __init__(self, named, lr, beta1, beta2, beta3, alpha, every, ns_steps, eps):
        super().__init__([p for _, p in named], dict(lr=lr, beta1=beta1, beta2=beta2, beta3=beta3, alpha=alpha,
                                                      every=every, ns_steps=ns_steps, eps=eps))
        self.matrix_ids = {id(p) for n, p in named if _is_matrix(n, p)}
        self.steps_taken = 0

    @torch.no_grad()
    def step(self):
        self.steps_taken += 1
        for group in self.param_groups:
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                grad = parameter.grad
                state = self.state[parameter]
                if not state:
                    for key in ("fast", "slow", "second", "recent"):
                        state[key] = torch.zeros_like(parameter)
                state["fast"].add_(grad, alpha=group["beta1"])
                state["second"].add_(grad * grad, alpha=group["beta2"])
                state["recent"].add_(grad)
                if self.steps_taken % group["every"] == 0:
                    state["slow"].add_(state["recent"], alpha=group["beta3"])
                    state["recent"].zero_()
                orthogonal = id(parameter) in self.matrix_ids
                fast = newton_schulz(state["fast"], group["ns_steps"]) if orthogonal else state["fast"]
                slow = newton_schulz(state["slow"], group["ns_steps"]) if orthogonal else state["slow"]
                update = (fast + group["alpha"] * slow) / (state["second"].sqrt() + group["eps"])
                parameter.add_(update, alpha=-group["lr"])

    def state_dict(self):
        """The moments and the step count, which decides when the slow momentum next takes its sum."""
        return {**super().state_dict(), "steps_taken": self.steps_taken}

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        self.steps_taken = state_dict.pop("steps_taken")
        super().load_state_dict(state_dict)


# `optimizer gd` without an update: W_t = W_{t-1} - lr g_t
GRADIENT_DESCENT = ir.Update(expression=ir.GateExpr(op="*", operands=(MINUS_LR, GRAD)), levels=())


class LevelsOptimizer(torch.optim.Optimizer):
    """`optimizer gd` with the train section's `update` written with optimizer levels (SEMANTICS
    §8): each parameter W, at its t-th step with gradient g_t, steps every optimizer level its
    update reads (each after the ones it reads), m_t = retain m_{t-1} - lr_m dl/dm(m_{t-1}), and
    takes W_t = W_{t-1} + update_t. An optimizer level `every N steps` adds each step's
    lr_m dl/dm(m) to a pending sum and moves once every N of the parameter's steps,
    m = retain m - pending (NL Alg. 1's slow momentum), constant in between. The weight matrices
    (`_is_matrix`) take `matrix_update` where the spec gives one, the others `update`; either
    missing is gd's -lr g.

    The streams are the parameter's own: `step` counts its steps (a level `every N steps` of the
    model steps only every N optimizer steps), as AdamW's bias correction does. The levels'
    objective gradients and the update are the inner optimizer levels' code
    (backends/optimizers.py), each parameter viewed as one weight [1, 1, ...] of one head."""

    def __init__(self, named, lr: float, update: ir.Update | None, matrix_update: ir.Update | None):
        named = list(named)
        self.updates = {"matrix": matrix_update or update or GRADIENT_DESCENT, "other": update or GRADIENT_DESCENT}
        matrices = [p for n, p in named if _is_matrix(n, p)]
        others = [p for n, p in named if not _is_matrix(n, p)]
        super().__init__([{"params": matrices, "lr": lr, "kind": "matrix"},
                          {"params": others, "lr": lr, "kind": "other"}], {})
        self.objectives = {level.name: (rules.OBJECTIVES[level.objective.name], op_args(level.objective))
                           for update in self.updates.values() for level in update.levels}

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for parameter in group["params"]:
                if parameter.grad is not None:
                    parameter.add_(self._update(self.updates[group["kind"]], parameter, group["lr"]))

    def _update(self, update: ir.Update, parameter: nn.Parameter, lr: float) -> torch.Tensor:
        state = self.state[parameter]
        if not state:
            state["step"] = 0
            for level in update.levels:
                state[level.name] = torch.zeros_like(parameter)
                if slow_period(level) > 1:
                    state[f"{level.name} pending"] = torch.zeros_like(parameter)
        state["step"] += 1
        like = parameter.reshape((1, 1) + (parameter.shape or (1,)))  # one weight of one head (a number: of one)
        stream = {"grad": parameter.grad.reshape(like.shape), "param": like, "lr": like.new_tensor(lr),
                  "step": like.new_tensor(float(state["step"]))}
        if parameter.dim() == 2:  # a weight matrix's shape, read by `matrix_update` only
            stream["rows"], stream["cols"] = (like.new_tensor(float(size)) for size in parameter.shape)
        read: dict[str, torch.Tensor] = {}
        for level in update.levels:
            moment = state[level.name].view_as(like)
            objective, args = self.objectives[level.name]
            lr_level = evaluate(level.lr, stream, read, like) if level.lr is not None else stream["lr"]
            change = lr_level * moment_gradient(level, objective, args, moment, stream, read)
            period = slow_period(level)
            if period > 1:  # the sum of its steps since it last moved, all at the state it holds
                pending = state[f"{level.name} pending"]
                pending.add_(change.view_as(pending))
                if state["step"] % period:
                    read[level.name] = moment
                    continue
                change = pending.clone().view_as(like)
                pending.zero_()
            moment = evaluate(level.retain, stream, read, like) * moment - change
            state[level.name] = moment.view_as(parameter)
            read[level.name] = moment
        return evaluate(update.expression, stream, read, like).view_as(parameter)


def build_optimizer(train: ir.Train, model: nn.Module) -> torch.optim.Optimizer:
    spec = train.optimizer
    args = op_args(spec)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if spec.name == schema.OUTER_TAKES_UPDATE:
        return LevelsOptimizer(named, args["lr"], train.update, train.matrix_update)
    if spec.name == "adamw":
        return torch.optim.AdamW([p for _, p in named], lr=args["lr"], betas=(args["beta1"], args["beta2"]),
                                 weight_decay=args["weight_decay"], eps=args["eps"])
    if spec.name == "sgd":
        return torch.optim.SGD([p for _, p in named], lr=args["lr"], momentum=args["momentum"],
                               nesterov=args["nesterov"], weight_decay=args["weight_decay"])
    if spec.name == "muon":
        return Muon(named, args["lr"], args["momentum"], args["ns_steps"], args["adam_lr"], args["weight_decay"])
    if spec.name == "m3":
        return M3(named, args["lr"], args["beta1"], args["beta2"], args["beta3"], args["alpha"], args["every"],
                  args["ns_steps"], args["eps"])
    raise ValueError(f"no outer optimizer `{spec.name}`")


def schedule(spec: ir.Op, steps: int):
    """The learning-rate multiplier at each step: linear warmup, then constant, cosine or linear."""
    args = op_args(spec)
    warmup = args["warmup"]

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        if spec.name == "cosine":
            floor = args["min_lr"]
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        if spec.name == "linear":
            return 1.0 - progress
        return 1.0

    return factor

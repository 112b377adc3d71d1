"""Closed forms of optimizers written as levels: which `update`s equal a built-in inner optimizer.

A level's `update` (SEMANTICS §3, "Optimizers are levels") is run by backends/optimizers.py token
by token, literally. The segment forms know the built-in optimizers (nestc/rules/optimizers.py).
This pass recognises the compositions that are exactly one of them, term for term, and says which
of the composition's gates plays each of the built-in's roles and which optimizer level's state is
its momentum buffer; the planner then plans the built-in, and the compiled backend runs its form
on those gates and that buffer (`backends/optimizers.py` `lowered`). Anything else runs in the scan
form (backends/forms/scan.py, the literal rule with the gradients of a segment found at once) or
token by token, and `closed_form` says why no built-in equals it: a composition is never
approximated by a built-in.

    update = m, m: dot on -grad, retain 0        gd       (lr: m's, or the level's)
    update = m, m: dot on -grad                  momentum (momentum: m's retain)
    update = m under dgd, m: retain 0, lr unset  dgd
    update = m under dgd, m: lr unset            dgd_momentum
    update = -lr * newton_schulz(m, steps=k),
             m: dot on grad, lr 1               muon(steps=k)
    update = -lr * grad                          the level's own optimizer
"""

from __future__ import annotations

from dataclasses import dataclass

from nestc import rules
from nestc.lang import ir

GRAD = ir.StreamRef(name="grad")
MINUS_GRAD = ir.GateExpr(op="neg", operands=(GRAD,))
MINUS_LR = ir.GateExpr(op="neg", operands=(ir.StreamRef(name="lr"),))


@dataclass(frozen=True)
class ClosedForm:
    """A built-in optimizer equal to a level's `update`: `gates` maps each of the built-in's gate
    roles to the key of the gate that plays it (`level.role` for an optimizer level's gate);
    `buffer` is the optimizer level whose state is the built-in's momentum buffer."""

    optimizer: ir.Op
    gates: tuple[tuple[str, str], ...] = ()
    buffer: str | None = None


def gate_key(level: ir.Level, role: str) -> str:
    """The key of an optimizer level's gate among the served level's gates: its own, or the
    served level's lr where it has none (SEMANTICS §3: an optimizer level's lr defaults to it)."""
    if role == "lr" and level.lr is None:
        return "lr"
    return f"{level.name}.{role}"


def forgets_everything(level: ir.Level) -> bool:
    """An optimizer level with retain 0 keeps nothing of its past: its state is not stored."""
    return isinstance(level.retain, ir.Constant) and level.retain.value == 0


def slow_period(level: ir.Level) -> int:
    """The outer optimizer's steps between an optimizer level's moves: N for `every N steps`
    (SEMANTICS §8), else 1."""
    return level.every.steps if level.every.tokens == 0 else 1


def outer_buffers(train: ir.Train) -> int:
    """The buffers per parameter that the outer optimizer written as levels keeps, at most: one
    per optimizer level, one more (its pending sum) for each that moves `every N steps`."""
    updates = [update for update in (train.update, train.matrix_update) if update is not None]
    return max((sum(1 + (slow_period(level) > 1) for level in update.levels) for update in updates), default=0)


def stored_levels(update: ir.Update) -> tuple[str, ...]:
    """The optimizer levels whose state a level stores, one buffer per weight, in stepping order."""
    return tuple(level.name for level in update.levels if not forgets_everything(level))


def closed_form(level: ir.Level) -> tuple[ClosedForm | None, str]:
    """The built-in optimizer that `level`'s update equals, or None and why none does."""
    update = level.update
    expression = update.expression
    decays_along_input = rules.OPTIMIZERS[level.optimizer.name].decays_along_input  # dgd's rule, not gd's
    if expression == ir.GateExpr(op="*", operands=(MINUS_LR, GRAD)):
        return ClosedForm(optimizer=level.optimizer), ""
    if isinstance(expression, ir.OptimizerRef):
        moment = update.level(expression.level)
        if not _momentum_of(moment, MINUS_GRAD):
            return None, _why_not(moment)
        keeps = not forgets_everything(moment)
        if not decays_along_input:
            gates = (("lr", gate_key(moment, "lr")),) + ((("momentum", gate_key(moment, "retain")),) if keeps else ())
            return ClosedForm(optimizer=_op("momentum" if keeps else "gd"), gates=gates,
                              buffer=moment.name if keeps else None), ""
        if moment.lr is not None:
            return None, (f"dgd's decay and the step of `{moment.name}` take different lr gates; the segment forms "
                          "know them with one (leave the optimizer level's lr unset)")
        if not keeps:
            return ClosedForm(optimizer=_op("dgd")), ""
        if rules.OPTIMIZERS.get("dgd_momentum") is None:
            return None, "no segment form computes dgd with momentum"
        return ClosedForm(optimizer=_op("dgd_momentum"), gates=(("momentum", gate_key(moment, "retain")),),
                          buffer=moment.name), ""
    if isinstance(expression, ir.GateExpr) and expression.op == "*" and expression.operands[0] == MINUS_LR \
            and isinstance(expression.operands[1], ir.NewtonSchulz) \
            and isinstance(expression.operands[1].operand, ir.OptimizerRef) and not decays_along_input:
        orthogonalised = expression.operands[1]
        moment = update.level(orthogonalised.operand.level)
        if _momentum_of(moment, GRAD) and moment.lr == ir.Constant(value=1.0) and not forgets_everything(moment):
            return ClosedForm(optimizer=_op("muon", steps=orthogonalised.steps),
                              gates=(("momentum", gate_key(moment, "retain")),), buffer=moment.name), ""
    moment = next((level for level in update.levels if not _momentum_of(level, MINUS_GRAD)
                   and not _momentum_of(level, GRAD)), None)
    if moment is not None:
        return None, _why_not(moment)
    return None, ("its update is not a built-in optimizer's (the segment forms know gd, momentum, dgd, "
                  "dgd_momentum and muon: nestc/passes/optimizers.py)")


def _why_not(moment: ir.Level) -> str:
    """Why an optimizer level has no segment form: what in it depends on each token's gradient."""
    if not rules.STATES[moment.state.name].optimizer_state:
        return (f"optimizer level `{moment.name}` is a {moment.state.name} memory of the gradients, whose step "
                "depends on each token's gradient at its previous state: no built-in optimizer computes it")
    if moment.key is not None:
        return (f"optimizer level `{moment.name}` decays by each token's gradient (m (retain I - lr k^T k)), a "
                "product of matrices no built-in optimizer computes")
    return (f"optimizer level `{moment.name}` learns from {ir.format_value(moment.value)}, not from the gradient "
            "itself: no built-in optimizer computes it")


def _momentum_of(moment: ir.Level, value: ir.Gate) -> bool:
    """Whether an optimizer level accumulates `value` as momentum does: with an objective whose
    gradient is minus its value whatever the state (dot: l = -<m, value>)."""
    return rules.OBJECTIVES[moment.objective.name].state_free_error and moment.key is None and moment.value == value


def _op(name: str, **given) -> ir.Op:
    spec = rules.OPTIMIZERS[name].spec
    return ir.Op(name=name, args=tuple((p.name, given.get(p.name, p.default)) for p in spec.params))

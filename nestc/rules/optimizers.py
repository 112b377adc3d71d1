"""Inner optimizers: how a memory level moves its state from its objective's gradient.

`step` is the reference backend's update of one weight for one token; the flags tell the compiled
segment forms which closed form of the update applies.
"""

from __future__ import annotations

from nestc.lang.operators import Param, op_spec
from nestc.rules.base import Rule, registry


def newton_schulz(update, steps: int):
    """Approximate orthogonalisation of the last two dims (the quintic iteration used by Muon)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    transpose = update.shape[-2] > update.shape[-1]
    x = update.transpose(-2, -1) if transpose else update
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        gram = x @ x.transpose(-2, -1)
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.transpose(-2, -1) if transpose else x


class Optimizer(Rule):
    """An update of one weight W from its gradient g at one token.

    `scale(t, gate)` broadcasts a gate (per head or per channel) against t; `map_input` is the
    input u of the linear map W (for rules that act on it); `momentum` is this weight's momentum
    buffer where `keeps_momentum`. Returns the new weight and the new momentum (or None)."""

    # A momentum buffer per weight, decayed by the level's `momentum` gate (default 0.9).
    keeps_momentum = False
    # The buffer accumulates the steps -lr g and moves the state itself (Titans): a linear
    # recurrence, so decay matrices solve it (anchored, layered) as well as scans (trajectory).
    momentum_of_steps = False
    # Acts on the linear maps of the state (their inputs, or their matrix structure).
    needs_weight_maps = False
    # Needs the level's (key, value) pairs, which a continuum (task-loss) level does not have.
    needs_pairs = False
    # W (retain I - lr u u^T): each map becomes a delta rule on its own inputs (layered's UT solve).
    decays_along_input = False
    # Its step is what it keeps of the old weight (`retained`) minus lr g: a level's `update`
    # (optimizers written as levels) may replace the -lr g.
    takes_update = False

    def step(self, args: dict, weight, grad, map_input, momentum, gates: dict, scale):
        raise NotImplementedError

    def retained(self, args: dict, weight, map_input, gates: dict, scale):
        """What the step keeps of the old weight, to which a level's `update` is added (SEMANTICS
        §3, optimizers as levels); only the rules that an `update` may follow have it."""
        raise NotImplementedError

    def direction(self, args: dict, momentum):
        """The update direction a buffer of gradients gives (`keeps_momentum` without steps)."""
        raise NotImplementedError


class GradientDescent(Optimizer):
    spec = op_spec("optimizer", "gd",
                   Param("implicit", "bool", False,
                         doc="the implicit step of the delta rule, lr / (1 + lr k.e): the residual at the updated "
                             "memory (Longhorn)"),
                   doc="M = retain * M - lr * g")
    forms = frozenset({"anchored", "delta", "layered", "trajectory", "scan"})
    takes_update = True

    def step(self, args, weight, grad, map_input, momentum, gates, scale):
        return self.retained(args, weight, map_input, gates, scale) - scale(grad, gates["lr"]), None

    def retained(self, args, weight, map_input, gates, scale):
        return scale(weight, gates["retain"])


class Momentum(Optimizer):
    spec = op_spec("optimizer", "momentum", doc="S = momentum * S - lr * g; M = retain * M + S (Titans)")
    forms = frozenset({"anchored", "layered", "trajectory"})
    keeps_momentum = True
    momentum_of_steps = True

    def step(self, args, weight, grad, map_input, momentum, gates, scale):
        momentum = scale(momentum, gates["momentum"]) - scale(grad, gates["lr"])
        return scale(weight, gates["retain"]) + momentum, momentum


class DeltaGradientDescent(Optimizer):
    spec = op_spec("optimizer", "dgd", doc="delta gradient descent: W = W (retain I - lr x x^T) - lr dL/dy x^T")
    forms = frozenset({"layered", "scan"})
    needs_weight_maps = True
    needs_pairs = True
    decays_along_input = True
    takes_update = True

    def step(self, args, weight, grad, map_input, momentum, gates, scale):
        return self.retained(args, weight, map_input, gates, scale) - scale(grad, gates["lr"]), None

    def retained(self, args, weight, map_input, gates, scale):
        return decayed_along_input(weight, map_input, gates, scale)


def decayed_along_input(weight, map_input, gates: dict, scale):
    """DGD's decay of a linear map W with input u: W (retain I - lr u u^T) = retain W - lr (W u) u^T."""
    import torch

    mapped = torch.einsum("bhoi,bhi->bho", weight, map_input)
    return scale(weight, gates["retain"]) - scale(torch.einsum("bho,bhi->bhoi", mapped, map_input), gates["lr"])


class DeltaGradientMomentum(Optimizer):
    spec = op_spec("optimizer", "dgd_momentum",
                   doc="delta gradient descent with momentum: S = momentum * S - lr dL/dy x^T; "
                       "W = W (retain I - lr x x^T) + S")
    forms = frozenset({"layered"})
    keeps_momentum = True
    momentum_of_steps = True
    needs_weight_maps = True
    needs_pairs = True
    decays_along_input = True

    def step(self, args, weight, grad, map_input, momentum, gates, scale):
        # dgd's decay along the input, with Titans' buffer of the steps in place of the step itself
        momentum = scale(momentum, gates["momentum"]) - scale(grad, gates["lr"])
        return decayed_along_input(weight, map_input, gates, scale) + momentum, momentum


class Muon(Optimizer):
    spec = op_spec("optimizer", "muon", Param("steps", "int", 5, minimum=1, doc="Newton-Schulz iterations"),
                   doc="momentum, then Newton-Schulz orthogonalisation of the update (ATLAS)")
    forms = frozenset({"trajectory"})
    keeps_momentum = True
    needs_weight_maps = True
    needs_pairs = True

    def step(self, args, weight, grad, map_input, momentum, gates, scale):
        momentum = scale(momentum, gates["momentum"]) + grad
        return scale(weight, gates["retain"]) - scale(self.direction(args, momentum), gates["lr"]), momentum

    def direction(self, args, momentum):
        return newton_schulz(momentum, args["steps"])


OPTIMIZERS: dict[str, Optimizer] = registry(GradientDescent(), Momentum(), DeltaGradientDescent(),
                                            DeltaGradientMomentum(), Muon())

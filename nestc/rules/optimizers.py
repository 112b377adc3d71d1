"""Inner optimizers: how a memory level moves its state from its objective's gradient.

`step` is the reference backend's update of one weight for one token; the flags tell the compiled
segment forms which closed form of the update applies.
"""

from __future__ import annotations

from dataclasses import dataclass

from nestc.lang.operators import Param, op_spec
from nestc.rules.base import Rule, registry


@dataclass(frozen=True)
class OptimizerGate:
    """A gate that only an optimizer reads (per head or per key channel): its value where the
    level gives none."""

    default: float
    doc: str


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
    # Solves its objective exactly instead of stepping on its gradient (MesaNet): the state holds
    # the objective's sufficient statistics and the read solves a linear system (`ExactSolve`).
    solves = False
    # The states and objectives it is defined on (None: any that its other needs allow).
    states: frozenset[str] | None = None
    objectives: frozenset[str] | None = None
    gates: dict[str, OptimizerGate] = {}  # the level fields (gates) only this optimizer reads, by role

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


class ExactSolve(Optimizer):
    """MesaNet (von Oswald et al. 2025; the Mesa layer, 2023): the memory is the exact minimiser of
    the l2 objective summed over every past pair, each weighted by its lr and decayed by the retain
    gates since, plus a ridge term 1/2 sum_c ridge_c ||W[:, c]||^2:
        W_t = G_t (H_t + diag(ridge_t))^-1,  H_t = retain_t H_{t-1} + lr_t k_t k_t^T,
                                             G_t = retain_t G_{t-1} + lr_t v_t k_t^T.
    The state keeps G (the weight slot, d_v x d_k) and H (`LevelState.gram`); a read solves
    (H_t + diag(ridge_t)) x = q_t exactly and returns G_t x. No gradient is taken, so `order` and
    the anchor play no part, and `meta first_order` equals `full`."""

    spec = op_spec("optimizer", "solve",
                   doc="W = G (H + diag(ridge))^-1, the exact minimiser of the decayed lr-weighted l2 loss over all "
                       "past pairs plus a ridge term (MesaNet); H, G decayed sums of lr k k^T and lr v k^T")
    forms = frozenset({"gram"})
    solves = True
    needs_pairs = True
    states = frozenset({"matrix"})
    objectives = frozenset({"l2"})
    gates = {"ridge": OptimizerGate(default=1.0, doc="the ridge penalty lambda of optimizer `solve` (positive; "
                                                     "per head or per key channel)")}

    def accumulate(self, values, gram, k, v, gates: dict, scale):
        """One token's sufficient statistics: G = retain G + lr v k^T, H = retain H + lr k k^T
        (k [B, H, dk], v [B, H, dv], per-head gates)."""
        import torch

        values = scale(values, gates["retain"]) + scale(torch.einsum("bhv,bhk->bhvk", v, k), gates["lr"])
        gram = scale(gram, gates["retain"]) + scale(torch.einsum("bhi,bhj->bhij", k, k), gates["lr"])
        return values, gram


def solve_read(values, gram, ridge, query):
    """optimizer `solve`'s read G (H + diag(ridge))^-1 q: values [..., dv, dk], gram [..., dk, dk],
    query [..., dk], ridge [...] (per head) or [..., dk] (per channel)."""
    return (values @ ridge_solve(gram, ridge, query)[..., None])[..., 0]


def ridge_solve(gram, ridge, query):
    """x = (H + diag(ridge))^-1 q by an exact solve (never an iterative one). torch solves no
    bfloat16 system, so under `--bf16` autocast the solve runs in float32."""
    import torch

    ridge = ridge[..., None].expand(query.shape) if ridge.dim() < query.dim() else ridge
    system = gram + torch.diag_embed(ridge)
    dtype = torch.promote_types(system.dtype, query.dtype)
    solve_dtype = torch.promote_types(dtype, torch.float32)
    return torch.linalg.solve(system.to(solve_dtype), query.to(solve_dtype)).to(dtype)


OPTIMIZERS: dict[str, Optimizer] = registry(GradientDescent(), Momentum(), DeltaGradientDescent(),
                                            DeltaGradientMomentum(), Muon(), ExactSolve())
OPTIMIZER_GATES: dict[str, OptimizerGate] = {role: gate for optimizer in OPTIMIZERS.values()
                                             for role, gate in optimizer.gates.items()}

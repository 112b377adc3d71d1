"""Inner objectives: the loss a memory level minimises on each (key, value) pair.

`pair_loss` is what the reference backend differentiates by autograd; `pair_error`, its
derivative with respect to the prediction M(k) in closed form, is what the compiled segment forms
use instead. tests/test_rules.py checks that the two agree for every entry.

An objective may read gates of its own (`gates`: omega's gamma, huber_token's threshold): level
fields that only it gives a meaning to, computed per token like lr and retain.
"""

from __future__ import annotations

from dataclasses import dataclass

from nestc.lang.operators import Param, op_spec
from nestc.rules.base import Rule, registry

MEMORY_STATES = frozenset({"matrix", "vector", "mlp", "glu"})
CLOSED_FORMS = frozenset({"anchored", "layered", "trajectory", "scan"})


@dataclass(frozen=True)
class ObjectiveGate:
    """A gate that an objective reads: its value where the level gives none, and whether it may
    be one value per channel (or must be one per head)."""

    default: float
    per_channel: bool
    doc: str


class Objective(Rule):
    """prediction [..., d], v [..., d] -> a loss per pair [...] (the last dim summed).

    `gates` holds the values of the objective's own gates (`gates` of the class, by role), each
    of shape [...] (one value per pair)."""

    states: frozenset[str] = MEMORY_STATES  # the states it is defined on
    gates: dict[str, ObjectiveGate] = {}  # the level fields (gates) this objective reads, by role
    forms = CLOSED_FORMS
    # The error does not depend on the prediction (dot): on a linear state every token's
    # gradient is then known ahead, so even an online (`every 1`) rule has a parallel form.
    state_free_error = False
    # 1/2 ||M k - v||^2: the online rule is the delta rule, which the UT transform solves.
    delta_rule = False
    # Each channel's error depends on that channel's prediction and value alone (no norm over the
    # channels): on a diagonal state every channel is then a memory of its own, so per-channel
    # gates run in the `anchored` form as one-channel heads.
    elementwise = False
    # The loss weighs a window of recent pairs (the state keeps them).
    windowed = False
    # The model's own training loss: the level is a continuum-memory block, with no pairs.
    continuum = False

    def pair_loss(self, args: dict, prediction, v, gates: dict):
        raise NotImplementedError

    def pair_error(self, args: dict, prediction, v, gates: dict):
        """d pair_loss / d prediction, elementwise."""
        raise NotImplementedError

    def per_pair(self, args: dict) -> "Objective":
        """The objective each pair contributes (a window objective weighs its base's)."""
        return self


class Dot(Objective):
    spec = op_spec("objective", "dot", doc="l = -<M(k), v> (Hebbian; linear attention)")
    states = MEMORY_STATES | {"moment"}  # an optimizer level's: l = -<m, value> (momentum, NL eq. 33-34)
    elementwise = True
    state_free_error = True

    def pair_loss(self, args, prediction, v, gates):
        return -(prediction * v).sum(-1)

    def pair_error(self, args, prediction, v, gates):
        return -v


class L2(Objective):
    spec = op_spec("objective", "l2", doc="l = 1/2 ||M(k) - v||^2 (the delta rule under gd)")
    states = MEMORY_STATES | {"moment"}  # an optimizer level's: l = 1/2 ||m key^T - value I||^2 (NL eq. 48)
    elementwise = True
    forms = CLOSED_FORMS | {"delta", "gram"}
    delta_rule = True

    def pair_loss(self, args, prediction, v, gates):
        return 0.5 * (prediction - v).pow(2).sum(-1)

    def pair_error(self, args, prediction, v, gates):
        return prediction - v


class Lp(Objective):
    spec = op_spec("objective", "lp", Param("p", "number", 3, minimum=1), doc="l = ||M(k) - v||_p^p (MIRAS Moneta)")
    elementwise = True

    def pair_loss(self, args, prediction, v, gates):
        return (prediction - v).abs().pow(args["p"]).sum(-1)

    def pair_error(self, args, prediction, v, gates):
        residual = prediction - v
        return args["p"] * residual.abs().pow(args["p"] - 1) * residual.sign()


class Huber(Objective):
    spec = op_spec("objective", "huber", Param("delta", "number", 1.0, minimum=0, exclusive_minimum=True),
                   doc="coordinate-wise Huber loss of M(k) - v, a constant delta (MIRAS §5.1)")
    elementwise = True

    def pair_loss(self, args, prediction, v, gates):
        import torch.nn.functional as F

        return F.huber_loss(prediction, v, reduction="none", delta=args["delta"]).sum(-1)

    def pair_error(self, args, prediction, v, gates):
        return (prediction - v).clamp(-args["delta"], args["delta"])


class HuberToken(Objective):
    """MIRAS Yaad's attentional bias: per token, the l2 loss while the residual's norm is within
    the threshold delta_t, else delta_t times the l1 loss, so that GD steps with grad l2 or
    delta_t grad l1. The l1 branch is offset by delta_t^2 / 2, which makes it the usual Huber loss
    of a one-channel residual; the offset has no gradient."""

    spec = op_spec("objective", "huber_token",
                   doc="per token: 1/2 ||r||^2 if ||r|| <= threshold, else threshold (||r||_1 - threshold / 2), "
                       "r = M(k) - v (MIRAS Yaad)")
    gates = {"threshold": ObjectiveGate(default=1.0, per_channel=False,
                                        doc="the residual norm up to which the loss is quadratic")}

    def pair_loss(self, args, prediction, v, gates):
        import torch

        residual = prediction - v
        threshold = gates["threshold"]
        within = residual.norm(dim=-1) <= threshold
        return torch.where(within, 0.5 * residual.pow(2).sum(-1),
                           threshold * (residual.abs().sum(-1) - 0.5 * threshold))

    def pair_error(self, args, prediction, v, gates):
        import torch

        residual = prediction - v
        threshold = gates["threshold"]
        within = (residual.norm(dim=-1) <= threshold)[..., None]
        return torch.where(within, residual, threshold[..., None] * residual.sign())


class Cosine(Objective):
    """1 - cos(M(k), v), with each norm sqrt(|x|^2 + eps) so that it is smooth at zero (a memory
    that starts at zero predicts 0). Scale-free: only the direction of M(k) is learned."""

    spec = op_spec("objective", "cosine", Param("eps", "number", 1e-6, minimum=0, exclusive_minimum=True,
                                                doc="added to each squared norm"),
                   doc="l = 1 - cos(M(k), v): only the direction of the prediction matters")

    def pair_loss(self, args, prediction, v, gates):
        norms = ((prediction * prediction).sum(-1) + args["eps"]).sqrt() * ((v * v).sum(-1) + args["eps"]).sqrt()
        return 1 - (prediction * v).sum(-1) / norms

    def pair_error(self, args, prediction, v, gates):
        # d(1 - cos)/dp = (cos p / |p| - v / |v|) / |p|, the norms with their eps
        prediction_norm = ((prediction * prediction).sum(-1, keepdim=True) + args["eps"]).sqrt()
        value_norm = ((v * v).sum(-1, keepdim=True) + args["eps"]).sqrt()
        cosine = (prediction * v).sum(-1, keepdim=True) / (prediction_norm * value_norm)
        return (cosine * prediction / prediction_norm - v / value_norm) / prediction_norm


class Omega(Objective):
    spec = op_spec("objective", "omega",
                   Param("window", "int", 4, minimum=1, doc="number of recent pairs in the objective"),
                   Param("base", "enum", "l2", choices=("l2", "dot"), doc="per-pair loss"),
                   doc="sum of the base loss over the last `window` pairs, weighted by the gamma gate (ATLAS)")
    states = frozenset({"matrix", "mlp", "glu"})
    forms = frozenset({"trajectory"})
    windowed = True
    # the backends weigh each pair of the window by its gamma (a per-channel gamma by its mean)
    gates = {"gamma": ObjectiveGate(default=1.0, per_channel=True, doc="weights of the pairs in an omega window")}

    def per_pair(self, args):
        return OBJECTIVES[args["base"]]

    def pair_loss(self, args, prediction, v, gates):
        return self.per_pair(args).pair_loss({}, prediction, v, {})

    def pair_error(self, args, prediction, v, gates):
        return self.per_pair(args).pair_error({}, prediction, v, {})


class Task(Objective):
    spec = op_spec("objective", "task", doc="the model's own training loss (continuum memory levels)")
    forms = frozenset()
    continuum = True


OBJECTIVES: dict[str, Objective] = registry(Dot(), L2(), Lp(), Huber(), HuberToken(), Cosine(), Omega(), Task())

# Every objective's own gates, by role (each role belongs to one objective).
OBJECTIVE_GATES: dict[str, ObjectiveGate] = {role: gate for objective in OBJECTIVES.values()
                                             for role, gate in objective.gates.items()}

"""Inner objectives: the loss a memory level minimises on each (key, value) pair.

`pair_loss` is what the reference backend differentiates by autograd; `pair_error`, its
derivative with respect to the prediction M(k) in closed form, is what the compiled segment forms
use instead. tests/test_rules.py checks that the two agree for every entry.
"""

from __future__ import annotations

from nestc.lang.operators import Param, op_spec
from nestc.rules.base import Rule, registry

MEMORY_STATES = frozenset({"matrix", "vector", "mlp"})
CLOSED_FORMS = frozenset({"anchored", "layered", "trajectory"})


class Objective(Rule):
    """prediction [..., d], v [..., d] -> a loss per pair [...] (the last dim summed)."""

    states: frozenset[str] = MEMORY_STATES  # the states it is defined on
    forms = CLOSED_FORMS
    # The error does not depend on the prediction (dot): on a linear state every token's
    # gradient is then known ahead, so even an online (`every 1`) rule has a parallel form.
    state_free_error = False
    # 1/2 ||M k - v||^2: the online rule is the delta rule, which the UT transform solves.
    delta_rule = False
    # The loss weighs a window of recent pairs (the state keeps them).
    windowed = False
    # The model's own training loss: the level is a continuum-memory block, with no pairs.
    continuum = False

    def pair_loss(self, args: dict, prediction, v):
        raise NotImplementedError

    def pair_error(self, args: dict, prediction, v):
        """d pair_loss / d prediction, elementwise."""
        raise NotImplementedError

    def per_pair(self, args: dict) -> "Objective":
        """The objective each pair contributes (a window objective weighs its base's)."""
        return self


class Dot(Objective):
    spec = op_spec("objective", "dot", doc="l = -<M(k), v> (Hebbian; linear attention)")
    state_free_error = True

    def pair_loss(self, args, prediction, v):
        return -(prediction * v).sum(-1)

    def pair_error(self, args, prediction, v):
        return -v


class L2(Objective):
    spec = op_spec("objective", "l2", doc="l = 1/2 ||M(k) - v||^2 (the delta rule under gd)")
    forms = CLOSED_FORMS | {"delta"}
    delta_rule = True

    def pair_loss(self, args, prediction, v):
        return 0.5 * (prediction - v).pow(2).sum(-1)

    def pair_error(self, args, prediction, v):
        return prediction - v


class Lp(Objective):
    spec = op_spec("objective", "lp", Param("p", "number", 3, minimum=1), doc="l = ||M(k) - v||_p^p (MIRAS Moneta)")

    def pair_loss(self, args, prediction, v):
        return (prediction - v).abs().pow(args["p"]).sum(-1)

    def pair_error(self, args, prediction, v):
        residual = prediction - v
        return args["p"] * residual.abs().pow(args["p"] - 1) * residual.sign()


class Huber(Objective):
    spec = op_spec("objective", "huber", Param("delta", "number", 1.0, minimum=0, exclusive_minimum=True),
                   doc="Huber loss of M(k) - v (MIRAS Yaad)")

    def pair_loss(self, args, prediction, v):
        import torch.nn.functional as F

        return F.huber_loss(prediction, v, reduction="none", delta=args["delta"]).sum(-1)

    def pair_error(self, args, prediction, v):
        return (prediction - v).clamp(-args["delta"], args["delta"])


class Cosine(Objective):
    """1 - cos(M(k), v), with each norm sqrt(|x|^2 + eps) so that it is smooth at zero (a memory
    that starts at zero predicts 0). Scale-free: only the direction of M(k) is learned."""

    spec = op_spec("objective", "cosine", Param("eps", "number", 1e-6, minimum=0, exclusive_minimum=True,
                                                doc="added to each squared norm"),
                   doc="l = 1 - cos(M(k), v): only the direction of the prediction matters")

    def pair_loss(self, args, prediction, v):
        norms = ((prediction * prediction).sum(-1) + args["eps"]).sqrt() * ((v * v).sum(-1) + args["eps"]).sqrt()
        return 1 - (prediction * v).sum(-1) / norms

    def pair_error(self, args, prediction, v):
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
    states = frozenset({"matrix", "mlp"})
    forms = frozenset({"trajectory"})
    windowed = True

    def per_pair(self, args):
        return OBJECTIVES[args["base"]]

    def pair_loss(self, args, prediction, v):
        return self.per_pair(args).pair_loss({}, prediction, v)

    def pair_error(self, args, prediction, v):
        return self.per_pair(args).pair_error({}, prediction, v)


class Task(Objective):
    spec = op_spec("objective", "task", doc="the model's own training loss (continuum memory levels)")
    forms = frozenset()
    continuum = True


OBJECTIVES: dict[str, Objective] = registry(Dot(), L2(), Lp(), Huber(), Cosine(), Omega(), Task())

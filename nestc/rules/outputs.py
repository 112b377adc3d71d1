"""Output maps (mirror maps): what a memory's stored weights become before any use.

`map` is applied by both backends. The optimizer moves the stored weights A with the gradient
taken with respect to the mapped weights W = map(A) (MIRAS eqs. 24-27, mirror descent), or, with
`gradient=stored`, with the gradient through the map, with respect to A itself: `pullback`
carries the one to the other, which the reference leaves to autograd and the trajectory form
writes out.
"""

from __future__ import annotations

from nestc.lang.operators import Param, op_spec
from nestc.rules.base import Rule, registry

ALL_FORMS = frozenset({"anchored", "delta", "layered", "trajectory", "scan", "gram"})


# Where the inner gradient is taken: at the mapped weights (the paper's mirror descent) or at
# the stored ones, through the map (plain gradient descent on A of l(map(A))).
GRADIENT = Param("gradient", "enum", "mapped", choices=("mapped", "stored"),
                 doc="take the inner gradient with respect to the mapped weights (MIRAS) or the stored ones")


class OutputMap(Rule):
    identity = False  # the stored weights are used as they are

    def map(self, args: dict, weights: list) -> list:
        """weights [B, H, ...] each -> the mapped weights."""
        raise NotImplementedError

    def pullback(self, args: dict, weight, grad):
        """grad [B, H, S, o, i] with respect to the mapped weights at the stored `weight`
        [B, H, o, i] -> with respect to the stored weight."""
        raise NotImplementedError

    def gradient_through_map(self, args: dict) -> bool:
        """Whether the optimizer steps with the gradient with respect to the stored weights."""
        return not self.identity and args["gradient"] == "stored"


class NoMap(OutputMap):
    spec = op_spec("output", "none", doc="no output map")
    forms = ALL_FORMS
    identity = True

    def map(self, args, weights):
        return weights

    def pullback(self, args, weight, grad):
        return grad


class Normalize(OutputMap):
    spec = op_spec("output", "normalize", Param("q", "number", 4, minimum=1), GRADIENT,
                   doc="W = A / ||A||_q^(q-2) after each update (MIRAS Moneta)")
    forms = frozenset({"trajectory"})

    def map(self, args, weights):
        # ||A||_q^(q-2) with the norm clamped at 1e-6, the clamp taken on ||A||_q^q: the root's
        # derivative is infinite at A = 0 (a zero initial state), where the clamp's zero
        # derivative would make the outer gradient 0 * inf = nan.
        power = args["q"]
        return [w / (w.abs().pow(power).flatten(2).sum(-1).clamp_min(1e-6 ** power).pow((power - 2) / power)
                     .reshape(w.shape[:2] + (1,) * (w.dim() - 2)))
                for w in weights]

    def pullback(self, args, weight, grad):
        import torch

        # W = A / n^(q-2), n = ||A||_q over the whole map (clamped at 1e-6, where it is constant):
        # dA = dW / n^(q-2) - (q-2) n^(2-2q) <dW, A> sign(A) |A|^(q-1)
        power = args["q"]
        raw = weight.abs().pow(power).flatten(2).sum(-1).pow(1.0 / power)[..., None, None]
        norm = raw.clamp_min(1e-6)
        inner = torch.einsum("bhsoi,bhoi->bhs", grad, weight)[..., None, None]
        tangent = torch.where(raw > 1e-6, (power - 2) * norm.pow(2 - 2 * power), torch.zeros_like(norm))
        pull = (torch.sign(weight) * weight.abs().pow(power - 1))[:, :, None]
        return grad / norm.pow(power - 2)[:, :, None] - tangent[:, :, None] * inner * pull


class Softmax(OutputMap):
    spec = op_spec("output", "softmax", GRADIENT, doc="W = softmax(A) over each row after each update (MIRAS Memora)")
    forms = frozenset({"trajectory"})

    def map(self, args, weights):
        return [w.softmax(dim=-1) for w in weights]

    def pullback(self, args, weight, grad):
        # rows of W = softmax(A): dA = W * (dW - rowsum(dW * W))
        mapped = weight.softmax(dim=-1)[:, :, None]
        return mapped * (grad - (grad * mapped).sum(-1, keepdim=True))


OUTPUTS: dict[str, OutputMap] = registry(NoMap(), Normalize(), Softmax())

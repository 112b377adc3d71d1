"""States: what a level stores and how it maps a key to a prediction.

A memory state is read through `apply` (per-head tensors, one token) and `apply_sequence` (a
segment). The layered and trajectory forms see a weight-map state as a chain of linear maps with
`map_activation` between them and `finish` after the last, or (`gated`) as two maps of the input
whose outputs, one through `map_activation`, multiply before the last map.
"""

from __future__ import annotations

import math

from nestc.lang.operators import Param, op_spec
from nestc.rules.base import Rule, registry

ACTIVATIONS = ("silu", "gelu", "relu", "tanh", "identity")
NORMS = ("none", "layernorm", "rmsnorm")


def activation(name: str, x):
    import torch.nn.functional as F

    return x if name == "identity" else x.tanh() if name == "tanh" else getattr(F, name)(x)


def normalise(name: str, h):
    """An MLP memory's normalisation of f(x), over the last dim, without affine parameters."""
    import torch.nn.functional as F

    if name == "layernorm":
        return F.layer_norm(h, h.shape[-1:])
    if name == "rmsnorm":
        return F.rms_norm(h, h.shape[-1:])
    return h


class State(Rule):
    # A parametric memory that an inner optimizer updates (a cache is appended to instead).
    memory = True
    # Its weights are linear maps: optimizers that act on maps (dgd, muon) apply, and so do the
    # layered and trajectory forms.
    weight_maps = False
    # One weight per channel, applied elementwise (a vector memory).
    diagonal = False
    # The prediction is linear in the weights with inputs that do not depend on them (matrix,
    # vector): an objective whose error ignores the prediction (dot) then gives gradients that
    # ignore the state, and online (`every 1`) rules keep a parallel form.
    linear = False
    default_every_tokens = 1  # a level without `every` updates every token...
    default_init = "zero"
    fields: frozenset[str] | None = None  # the level fields it takes; None: all of them
    # An optimizer level's state: a memory of another level's gradient stream (SEMANTICS §3),
    # stepped inside that level's update, never a block of the model.
    optimizer_state = False
    gated = False  # weight maps W1, W3, W2: W2 (act(W1 x) * (W3 x)) instead of a chain

    def default_objective(self, reads_pairs: bool) -> str:
        return "l2"

    def width_error(self, args: dict, key_dim: int, value_dim: int) -> str:
        """Why keys and values of these widths cannot be stored, or ""."""
        return ""

    def weight_shapes(self, args: dict, heads: int, key_dim: int, value_dim: int) -> list[tuple[int, ...]]:
        raise NotImplementedError

    def initial_value(self, args: dict, shape: tuple[int, ...], index: int, count: int):
        import torch

        return torch.zeros(shape)

    def apply(self, args: dict, weights: list, x, inputs: list | None = None):
        """M(x) for per-head weights [B, H, ...] and x [B, H, d]; records each map's input."""
        raise NotImplementedError

    def apply_sequence(self, args: dict, weights: list, x):
        """M(x) for weights [B, H, ...] (one memory per sample; [1, H, ...]: one for the whole batch,
        a feed-forward block's) and x [B, S, H, d]."""
        raise NotImplementedError

    def map_activation(self, args: dict) -> str:
        return "identity"

    def finish(self, args: dict, h, x):
        """The prediction from the last map's output h, for the input x."""
        return h

    def output_norm(self, args: dict) -> str:
        return "none"


class Matrix(State):
    spec = op_spec("state", "matrix", doc="a d_v x d_k matrix per head: y = M q")
    forms = frozenset({"anchored", "delta", "layered", "trajectory", "scan", "gram"})
    weight_maps = True
    linear = True

    def weight_shapes(self, args, heads, key_dim, value_dim):
        return [(heads, value_dim, key_dim)]

    def apply(self, args, weights, x, inputs=None):
        import torch

        if inputs is not None:
            inputs.append(x)
        return torch.einsum("bhvk,bhk->bhv", weights[0], x)

    def apply_sequence(self, args, weights, x):
        import torch

        return torch.einsum("bhvk,bshk->bshv", weights[0], x)


class Vector(State):
    spec = op_spec("state", "vector", doc="a diagonal memory per head: y = m * q (elementwise)")
    forms = frozenset({"anchored"})
    diagonal = True
    linear = True

    def weight_shapes(self, args, heads, key_dim, value_dim):
        return [(heads, key_dim)]

    def apply(self, args, weights, x, inputs=None):
        return weights[0] * x

    def apply_sequence(self, args, weights, x):
        return weights[0][:, None] * x


class Mlp(State):
    spec = op_spec(
        "state", "mlp",
        Param("depth", "int", 2, minimum=1, doc="number of linear layers"),
        Param("expand", "number", 4, minimum=0, exclusive_minimum=True, doc="hidden width / input width"),
        Param("act", "enum", "gelu", choices=ACTIVATIONS, doc="activation between layers"),
        Param("residual", "bool", True, doc="M(x) = x + f(x)"),
        Param("norm", "enum", "none", choices=NORMS, doc="normalisation of f(x) before the residual"),
        doc="a multi-layer perceptron, M(x) = x + norm(W1 act(W2 x)) for depth 2",
    )
    forms = frozenset({"layered", "trajectory", "scan"})
    weight_maps = True
    default_every_tokens = 0  # ...but an MLP without `every` is a feed-forward block
    default_init = "meta"

    def default_objective(self, reads_pairs):
        return "l2" if reads_pairs else "task"  # without keys and values: a continuum block

    def width_error(self, args, key_dim, value_dim):
        if args["residual"] and key_dim != value_dim:
            return (f"a residual mlp memory maps keys to values of the same width, but keys have {key_dim} "
                    f"channels per head and values {value_dim}")
        return ""

    def weight_shapes(self, args, heads, key_dim, value_dim):
        hidden = max(1, int(round(args["expand"] * key_dim)))
        dims = [key_dim] + [hidden] * (args["depth"] - 1) + [value_dim]
        return [(heads, dims[i + 1], dims[i]) for i in range(args["depth"])]

    def initial_value(self, args, shape, index, count):
        import torch

        # The last map of a residual memory starts small so M starts near the identity.
        scale = 0.02 if (args["residual"] and index == count - 1) else 1.0 / math.sqrt(shape[-1])
        return torch.randn(shape) * scale

    def apply(self, args, weights, x, inputs=None):
        import torch

        h = x
        for index, weight in enumerate(weights):
            if inputs is not None:
                inputs.append(h)
            h = torch.einsum("bhoi,bhi->bho", weight, h)
            if index < len(weights) - 1:
                h = activation(args["act"], h)
        return self.finish(args, h, x)

    def apply_sequence(self, args, weights, x):
        import torch

        if weights[0].shape[0] == 1:
            # One memory for the whole batch (a feed-forward block): the batch and the positions
            # are the rows of one matmul per head, so the weights' gradient is one matmul too,
            # not one per sample summed afterwards.
            h = x
            for index, weight in enumerate(weights):
                h = torch.einsum("bshi,hoi->bsho", h, weight[0])
                if index < len(weights) - 1:
                    h = activation(args["act"], h)
            return self.finish(args, h, x)
        per_head = x.transpose(1, 2)  # [B, H, S, d]: every map one batched matmul
        h = per_head
        for index, weight in enumerate(weights):
            h = h @ weight.transpose(-1, -2)
            if index < len(weights) - 1:
                h = activation(args["act"], h)
        return self.finish(args, h, per_head).transpose(1, 2)

    def map_activation(self, args):
        return args["act"]

    def finish(self, args, h, x):
        h = normalise(args["norm"], h)
        return x + h if args["residual"] and h.shape == x.shape else h

    def output_norm(self, args):
        return args["norm"]


class Glu(Mlp):
    spec = op_spec(
        "state", "glu",
        Param("expand", "number", 4, minimum=0, exclusive_minimum=True, doc="hidden width / input width"),
        Param("act", "enum", "silu", choices=ACTIVATIONS, doc="activation of the gating branch (silu: SwiGLU)"),
        Param("residual", "bool", True, doc="M(x) = x + f(x)"),
        Param("norm", "enum", "none", choices=NORMS, doc="normalisation of f(x) before the residual"),
        doc="a gated MLP (SwiGLU), M(x) = x + norm(W2 (act(W1 x) * (W3 x)))",
    )
    gated = True  # its maps in order: W1 (the activated branch), W3 (the linear branch), W2 (the output map)

    def weight_shapes(self, args, heads, key_dim, value_dim):
        hidden = max(1, int(round(args["expand"] * key_dim)))
        return [(heads, hidden, key_dim), (heads, hidden, key_dim), (heads, value_dim, hidden)]

    def apply(self, args, weights, x, inputs=None):
        import torch

        first, linear, last = weights
        if inputs is not None:
            inputs.extend([x, x])
        h = activation(args["act"], torch.einsum("bhoi,bhi->bho", first, x)) * torch.einsum("bhoi,bhi->bho", linear, x)
        if inputs is not None:
            inputs.append(h)
        return self.finish(args, torch.einsum("bhoi,bhi->bho", last, h), x)

    def apply_sequence(self, args, weights, x):
        import torch

        first, linear, last = weights
        if first.shape[0] == 1:  # one memory for the batch (a feed-forward block): one matmul per map
            h = activation(args["act"], torch.einsum("bshi,hoi->bsho", x, first[0])) \
                * torch.einsum("bshi,hoi->bsho", x, linear[0])
            return self.finish(args, torch.einsum("bshi,hoi->bsho", h, last[0]), x)
        per_head = x.transpose(1, 2)  # [B, H, S, d]
        h = activation(args["act"], per_head @ first.transpose(-1, -2)) * (per_head @ linear.transpose(-1, -2))
        return self.finish(args, h @ last.transpose(-1, -2), per_head).transpose(1, 2)


class Cache(State):
    spec = op_spec("state", "cache",
                   Param("window", "int", 0, minimum=0, doc="keep the last N pairs; 0 keeps all (global attention)"),
                   Param("weights", "enum", "softmax", choices=("softmax", "stickbreaking"),
                         doc="how a query weighs the entries it reads: softmax of the scores, or stick-breaking "
                             "(the newest entry breaks the stick first)"),
                   doc="the non-parametric KV cache read by attention")
    memory = False
    fields = frozenset({"key", "value", "query", "heads", "read", "retain", "output_norm", "output_gate"})

    @staticmethod
    def weighs_by_softmax(args: dict) -> bool:
        """Whether a query's weights are the softmax of its scores (which PyTorch's fused
        attention computes) rather than another weighting of `attention_weights`."""
        return args.get("weights", "softmax") != "stickbreaking"

    @staticmethod
    def takes_retain(args: dict) -> bool:
        """A forget gate biases softmax logits; a stick-breaking cache has none (SEMANTICS §7)."""
        return args.get("weights", "softmax") != "stickbreaking"

    def attention_weights(self, args: dict, scores, readable):
        """A query's weights over entries oldest first from its scores [..., N], of which the
        `readable` ones [..., N] (bool) may be read."""
        import torch

        if self.weighs_by_softmax(args):
            return torch.softmax(scores.masked_fill(~readable, float("-inf")), dim=-1)
        return self.stick_breaking(scores, readable)

    @staticmethod
    def stick_breaking(scores, readable):
        """Stick-breaking attention weights (Tan et al. 2024) from the scores [..., N] of one query
        over entries oldest first, of which `readable` [..., N] (bool) may be read: entry j takes
        sigmoid(z_j) of what the newer readable entries left, w_j = sigmoid(z_j) prod_{l>j}
        (1 - sigmoid(z_l)), so the weights sum to at most 1 (a query with nothing to read, or
        whose entries all score low, reads less than a full value). Summed in log space from the
        newest entry back, as each product runs, so a far entry's weight keeps its digits."""
        import torch.nn.functional as F

        log_left = F.logsigmoid(-scores).masked_fill(~readable, 0.0)
        after = log_left.flip(-1).cumsum(-1).flip(-1) - log_left  # sum over the newer entries
        return (F.logsigmoid(scores) + after).masked_fill(~readable, float("-inf")).exp()


class Moment(State):
    spec = op_spec("state", "moment",
                   doc="an optimizer level: one buffer shaped like each weight of the level whose `update` names "
                       "it, learning from that level's gradient stream (NL §4)")
    memory = False
    optimizer_state = True
    fields = frozenset({"key", "value", "lr", "retain", "objective", "every"})  # every: outer only (SEMANTICS §8)


STATES: dict[str, State] = registry(Matrix(), Vector(), Mlp(), Glu(), Cache(), Moment())

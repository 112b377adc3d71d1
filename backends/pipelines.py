"""A level's input pipelines (key, value, query) and gates, token by token: the stages of the
language's pipeline syntax as modules, shared by the reference's levels and read by the compiled
backend's sequence forms (backends/sequence.py `stage_sequence`)."""

from __future__ import annotations

import functools
import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nestc.backends.common import BackendError, concrete, op_args
from nestc.backends.state import LevelState
from nestc.lang import ir
from nestc.lang.schema import FEATURE_WIDTHS


class Stage(nn.Module):
    """One parametric or elementwise stage of a key/value/query/gate pipeline, on [B, width]."""

    def __init__(self, op: ir.Op, width: int, out_width: int, heads: int, name: str):
        super().__init__()
        self.kind = op.name
        self.args = op_args(op)
        self.heads = heads
        self.width = width
        self.out_width = out_width
        self.buffer_name = name
        if self.kind == "proj":
            bias = self.args["bias"]  # false, true (torch's initialisation) or the initial value(s)
            self.linear = nn.Linear(width, out_width, bias=bias is not False)
            if not isinstance(bias, bool):
                values = torch.as_tensor(bias, dtype=self.linear.bias.dtype)
                if values.dim() and values.numel() != out_width:
                    raise BackendError(f"`proj(bias=...)` gives {values.numel()} initial values for {out_width} outputs")
                with torch.no_grad():
                    self.linear.bias.copy_(values.expand(out_width))
        elif self.kind == "conv":
            window = self.args["window"]
            self.weight = nn.Parameter(torch.zeros(width, window))
            with torch.no_grad():
                self.weight[:, -1] = 1.0  # starts as the identity: the current token alone
                self.weight[:, :-1].normal_(0.0, 0.02)
        elif self.kind == "poly":
            degree = self.args["degree"]
            # Learnable Taylor coefficients, initialised to exp's: phi(x) = sum_i a_i x^i.
            self.coefficients = nn.Parameter(torch.tensor([1.0 / math.factorial(i) for i in range(degree + 1)]))

    def forward(self, x: Tensor, position: int, state: LevelState) -> Tensor:
        kind, args = self.kind, self.args
        if kind == "proj":
            return self.linear(x)
        if kind == "conv":
            window = args["window"]
            history = state.buffers.get(self.buffer_name)
            if history is None:
                history = x.new_zeros(x.shape[0], window - 1, x.shape[1])
            frames = torch.cat([history, x[:, None, :]], dim=1)  # [B, window, width], oldest first
            state.buffers[self.buffer_name] = frames[:, 1:, :]
            return torch.einsum("bwc,cw->bc", frames, self.weight)
        if kind in ("silu", "gelu", "relu", "tanh", "softplus", "exp"):
            return getattr(F, kind)(x) if kind not in ("tanh", "exp") else getattr(torch, kind)(x)
        if kind == "identity":
            return x
        if kind == "sigmoid":
            return args["max"] * torch.sigmoid(x)
        if kind == "scale":
            return args["factor"] * x
        if kind == "elu1":
            return F.elu(x) + 1.0
        if kind == "poly":
            return sum(a * x**i for i, a in enumerate(self.coefficients))
        if kind == "tensor_poly":
            return tensor_polynomial(x.unflatten(-1, (self.heads, -1)), args["degree"]).flatten(-2)
        if kind == "taylor":
            return taylor_features(x.unflatten(-1, (self.heads, -1))).flatten(-2)
        if kind == "square":
            return square_features(x.unflatten(-1, (self.heads, -1))).flatten(-2)
        per_head = x.reshape(x.shape[0], self.heads, -1)
        if kind == "l2norm":
            return F.normalize(per_head, dim=-1).reshape(x.shape)
        if kind == "layernorm":
            return F.layer_norm(per_head, per_head.shape[-1:]).reshape(x.shape)
        if kind == "rmsnorm":
            return F.rms_norm(per_head, per_head.shape[-1:]).reshape(x.shape)
        if kind == "rope":
            return rotate(per_head, position, args["base"]).reshape(x.shape)
        raise BackendError(f"the reference backend has no stage `{kind}`")


def tensor_polynomial(x: Tensor, degree: int) -> Tensor:
    """ATLAS's phi_p on the last axis of x [..., d]: x^b / sqrt(b!) for every multi-index b with
    |b| <= p, C(d + p, p) of them. A monomial of degree <= p is a multiset of p factors drawn from
    (1, x_1, ..., x_d), so it is a product over a gather of x with a 1 in front."""
    index, weight = _monomials(x.shape[-1], degree)
    with_one = torch.cat([x.new_ones(x.shape[:-1] + (1,)), x], dim=-1)
    return with_one[..., index.to(x.device)].prod(dim=-1) * weight.to(x)


@functools.cache
def _monomials(head_dim: int, degree: int) -> tuple[Tensor, Tensor]:
    """The factors of each monomial ([count, p] indices into (1, x_1, ..., x_d), 0 the constant)
    and its weight 1 / sqrt(b!) (the constant's repeats do not count)."""
    factors = list(itertools.combinations_with_replacement(range(head_dim + 1), degree))
    weights = [1.0 / math.sqrt(math.prod(math.factorial(chosen.count(channel)) for channel in set(chosen) - {0}))
               for chosen in factors]
    return torch.tensor(factors, dtype=torch.long), torch.tensor(weights, dtype=torch.float64)


def taylor_features(x: Tensor) -> Tensor:
    """Based's feature map on the last axis of x [..., d]: [1, x / d^(1/4), vec(x x^T) / (sqrt(2) sqrt(d))],
    the second-order Taylor expansion of exp(q.k / sqrt(d)) as an inner product."""
    head_dim = x.shape[-1]
    return torch.cat([x.new_ones(x.shape[:-1] + (1,)), x / head_dim ** 0.25,
                      square_features(x) / math.sqrt(2)], dim=-1)


def square_features(x: Tensor) -> Tensor:
    """ReBased's feature map on the last axis of x [..., d]: vec(x x^T) / sqrt(d), whose inner
    products are the squared kernel (q.k)^2 / d."""
    return (x[..., :, None] * x[..., None, :]).flatten(-2) / math.sqrt(x.shape[-1])


def causal_convolution(frames: Tensor, weight: Tensor, size: int) -> Tensor:
    """The short convolution of a sequence: out_t = sum_j weight[..., j] * frames[:, t + j], for
    frames [B, window - 1 + size, ..., width] (the history, then the sequence; oldest first) and
    weight [..., width, window]. A sum of shifted slices: faster than unfold + einsum, forward and
    backward (no copies)."""
    out = frames[:, :size] * weight[..., 0]
    for offset in range(1, weight.shape[-1]):
        out = out + frames[:, offset:offset + size] * weight[..., offset]
    return out


def rotate(x: Tensor, position, base: float) -> Tensor:
    """Rotary position embedding (pairs of channels (i, i + d/2)) of x [..., d]: at one position
    (an int), or at positions broadcast against x's leading dimensions (a tensor)."""
    half = x.shape[-1] // 2
    frequencies = base ** (-torch.arange(half, dtype=x.dtype, device=x.device) / half)
    angle = torch.as_tensor(position, dtype=x.dtype, device=x.device)[..., None] * frequencies
    cos, sin = torch.cos(angle), torch.sin(angle)
    first, second = x[..., :half], x[..., half:2 * half]
    rotated = torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)
    return torch.cat([rotated, x[..., 2 * half:]], dim=-1)


class Pipeline(nn.Module):
    """x |> stage |> ... where a stage may be another level, read at its state before the update."""

    def __init__(self, pipeline: ir.Pipeline, width: int, final_width: int, heads: int, role: str):
        super().__init__()
        self.steps: list[tuple[str, object]] = []
        self.stages = nn.ModuleList()
        current = width
        projections = [i for i, s in enumerate(pipeline.stages) if isinstance(s, ir.Op) and s.name == "proj"]
        for index, stage in enumerate(pipeline.stages):
            if isinstance(stage, ir.LevelRef):
                self.steps.append(("level", stage.level))  # a memory's read-out keeps its input's width
                continue
            if isinstance(stage, ir.Choice):
                raise BackendError("a search-space choice reached the backend: freeze the space first")
            out = current
            if stage.name == "proj":
                requested = op_args(stage)["dim"]
                out = requested or (final_width if index == projections[-1] else width)
            elif stage.name in FEATURE_WIDTHS:
                if current % heads:
                    raise BackendError(f"the {role} pipeline's `{stage.name}` acts on each head's channels, but "
                                       f"{heads} heads do not divide its input's width {current}")
                out = heads * FEATURE_WIDTHS[stage.name](current // heads, op_args(stage))
            module = Stage(stage, current, out, heads, f"{role}.{index}")
            self.steps.append(("stage", len(self.stages)))
            self.stages.append(module)
            current = out
        self.out_width = current

    def forward(self, x: Tensor, position: int, state: LevelState, read_level) -> Tensor:
        for kind, target in self.steps:
            if kind == "level":
                x = read_level(target, x)
            else:
                x = self.stages[target](x, position, state)
        return x


class Gate(nn.Module):
    """lr / retain / momentum / ... or a `let` binding: a constant (one, or one per head), a learned
    value, a pipeline, a binding of the level, or arithmetic on gates; [B, H] or [B, H, d] per token."""

    def __init__(self, gate, width: int, heads: int, head_dim: int, role: str):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.constant: float | tuple[float, ...] | None = None
        self.learned: nn.Parameter | None = None
        self.pipeline: Pipeline | None = None
        self.binding: str | None = None  # a `let` of the level, computed before the gates
        self.op: str | None = None  # arithmetic on `operands` (ir.GateExpr)
        self.operands = nn.ModuleList()
        if isinstance(gate, ir.Constant):
            value = concrete(gate.value)
            self.constant = tuple(float(v) for v in value) if isinstance(value, tuple) else float(value)
            if isinstance(value, tuple) and len(value) != heads:
                raise BackendError(f"the {role} gate gives {len(value)} values, one per head, but the level has "
                                   f"{heads} heads")
        elif isinstance(gate, ir.Op) and gate.name == "learned":
            args = op_args(gate)
            shape = (heads,) if args["per"] == "head" else (heads, head_dim)
            init = args["init"]
            if isinstance(init, tuple):
                if len(init) != heads:
                    raise BackendError(f"`learned(init=...)` in the {role} gate gives {len(init)} values, one per "
                                       f"head, but the level has {heads} heads")
                values = torch.tensor(init, dtype=torch.get_default_dtype())
                self.learned = nn.Parameter(values if args["per"] == "head" else values[:, None].repeat(1, head_dim))
            else:
                self.learned = nn.Parameter(torch.full(shape, float(init)))
        elif isinstance(gate, ir.Pipeline):
            per_channel = any(isinstance(s, ir.Op) and s.name == "proj" and op_args(s)["per"] == "channel"
                              for s in gate.stages)
            out = heads * head_dim if per_channel else heads
            self.pipeline = Pipeline(gate, width, out, heads, role)
            if self.pipeline.out_width not in (heads, heads * head_dim):
                raise BackendError(f"the {role} gate pipeline gives {self.pipeline.out_width} values per token; "
                                   f"a gate needs one per head ({heads}) or per channel ({heads * head_dim}): "
                                   f"end it with `proj` or `proj(per=channel)`")
        elif isinstance(gate, ir.LetRef):
            self.binding = gate.name
        elif isinstance(gate, ir.GateExpr):
            self.op = gate.op
            self.operands.extend(Gate(operand, width, heads, head_dim, f"{role}.{index}")
                                 for index, operand in enumerate(gate.operands))
        else:
            raise BackendError(f"cannot build the {role} gate from {ir.format_value(gate)}")

    def pipelines(self):
        """The pipelines inside this gate (their convolutions keep histories in the state)."""
        if self.pipeline is not None:
            yield self.pipeline
        for operand in self.operands:
            yield from operand.pipelines()

    def constant_tensor(self, like: Tensor) -> Tensor:
        """The constant as [H] (one value, or one per head)."""
        if isinstance(self.constant, tuple):
            return like.new_tensor(self.constant)
        return like.new_full((self.heads,), self.constant)

    def forward(self, x: Tensor, position: int, state: LevelState, read_level, lets=None) -> Tensor:
        batch = x.shape[0]
        if self.constant is not None:
            return self.constant_tensor(x).expand(batch, self.heads)
        if self.learned is not None:
            return self.learned.expand(batch, *self.learned.shape)
        if self.binding is not None:
            return lets[self.binding]
        if self.op is not None:
            return combine_gates(self.op, [operand(x, position, state, read_level, lets) for operand in self.operands])
        values = self.pipeline(x, position, state, read_level)
        if values.shape[-1] == self.heads:
            return values
        return values.reshape(batch, self.heads, self.head_dim)


def combine_gates(op: str, values: list[Tensor]) -> Tensor:
    """An ir.GateExpr on its operands' values, per head ([B, H] per token, [B, H, S] over a
    sequence) or per channel (one more, last, dimension), a per-head value broadcasting over the
    channels of its head."""
    if op == "neg":
        return -values[0]
    if op in ("exp", "log", "sigmoid", "sqrt", "abs", "sign"):
        return getattr(torch, op)(values[0])
    if op == "softplus":
        return F.softplus(values[0])
    left, right = values
    if left.dim() < right.dim():
        left = left.unsqueeze(-1)
    elif right.dim() < left.dim():
        right = right.unsqueeze(-1)
    if op == "max":
        return torch.maximum(left, right)
    if op == "pow":
        return torch.pow(left, right)
    return ir.ARITHMETIC[op](left, right)


def compute_lets(lets: nn.ModuleDict, compute) -> dict[str, Tensor]:
    """The level's `let` bindings, in order, each computed by `compute(gate, earlier values)`."""
    values: dict[str, Tensor] = {}
    for name, gate in lets.items():
        values[name] = compute(gate, values)
    return values



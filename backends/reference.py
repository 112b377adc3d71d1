"""The reference backend: a token-by-token interpreter of the IR, the oracle for faster backends.

It implements docs/design/SEMANTICS.md literally and is meant to be obviously correct, not fast:
every memory level takes one optimizer step per token on its declared objective, with the inner
gradient taken by autograd at the level's anchor state; continuum-memory levels (objective task)
take a step at each chunk boundary with the gradient of the model's own next-token loss; the
whole model advances one token at a time so that every level sees exactly the states the
semantics prescribes. Decisions the design notes leave open are listed in docs/backends.md.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nestc import rules
from nestc.lang import ir
from nestc.backends.common import BackendError, concrete, op_args
from nestc.backends.kernel import MemoryKernel
from nestc.backends.pipelines import Gate, Pipeline, compute_lets
from nestc.backends.state import LevelState, ModelState, Replay, holds_graph
from nestc.backends.updates import continuum_gradients, continuum_step
from nestc.lang.queries import (GATE_ROLES, block_levels, gate_side, generators, per_channel, reachable_levels,
                                step_copies)
from nestc.passes.estimate import require_fits
from nestc.rules.states import STATES, normalise

# --- levels ----------------------------------------------------------------------------------


class OutputNorm(nn.Module):
    """norm(y) of each head's read-out y [..., H, d_v], times a learned gain per channel of a
    head, shared by the heads (as fla's gated norms)."""

    def __init__(self, kind: str, width: int):
        super().__init__()
        self.kind = kind
        self.gain = nn.Parameter(torch.ones(width))

    def forward(self, y: Tensor) -> Tensor:
        return normalise(self.kind, y) * self.gain


class ReadOut:
    """A level's output from its heads' read-out: o = out(norm(y) * gate(x)), the norm and the
    gate each where the level has one (`output_norm`, `output_gate`)."""

    def _build_read_out(self, level: ir.Level, dim: int, heads: int, value_dim: int) -> None:
        kind = level.output_norm
        self.output_norm = OutputNorm(kind, value_dim) if kind not in (None, "none") else None
        self.output_gate = None
        if level.output_gate is not None:
            self.output_gate = Pipeline(level.output_gate, dim, heads * value_dim, heads, "output_gate")
            if self.output_gate.out_width != heads * value_dim:
                raise BackendError(f"level `{level.name}`: its output gate has width {self.output_gate.out_width}, "
                                   f"but its read-out has {heads * value_dim} channels")
        self.out = nn.Linear(heads * value_dim, dim, bias=False)

    def read_out(self, y: Tensor, gate: Tensor | None) -> Tensor:
        """y [..., H, d_v] and the output gate's values [..., H * d_v] (None without a gate)."""
        if self.output_norm is not None:
            y = self.output_norm(y)
        y = y.flatten(-2)
        return self.out(y if gate is None else y * gate)


def is_feedforward(level: ir.Level) -> bool:
    """Levels without keys and values act on the full width: y = M(x) (FFN, continuum memory)."""
    return level.key is None


class MemoryLevel(ReadOut, nn.Module):
    """A matrix / vector / mlp / glu memory with its input pipelines, gates and read-out."""

    def __init__(self, level: ir.Level, dim: int, heads: int, readable: bool = True):
        super().__init__()
        self.name = level.name
        self.read = level.read
        self.heads = heads
        # A level that only generates other levels' inputs is never read with a query and has no
        # output projection: its read-out is the raw M(input).
        roles = ("key", "value", "query") if readable else ("key", "value")
        roles += ("write_key",) if level.write_key is not None else ()
        # Under `substeps N` a key or value pipeline gives N of them per head, side by side: it is
        # built N times as wide, with N times the heads, so that per-head stages (l2norm) see each.
        self.copies = {role: concrete(step_copies(level, role)) for role in (*roles, *GATE_ROLES)}
        # An input written as gate arithmetic (HGRN's key = 1 - forget) is a Gate in `sources`, with
        # the level's width per head; the others are pipelines.
        from_gates = {role for role in roles if not isinstance(getattr(level, role), ir.Pipeline)}
        self.pipelines = nn.ModuleDict({
            role: Pipeline(getattr(level, role), dim, dim * self.copies[role], heads * self.copies[role], role)
            for role in roles if role not in from_gates
        })
        for role, pipeline in self.pipelines.items():
            if pipeline.out_width % (heads * self.copies[role]):
                raise BackendError(f"level `{level.name}`: its {role} has width {pipeline.out_width}, "
                                   f"which {heads * self.copies[role]} heads (and steps) do not divide")
        widths = {role: self.pipelines[role].out_width if role in self.pipelines else dim
                  for role in roles}
        key_dim = widths["key"] // (heads * self.copies["key"])
        value_dim = widths["value"] // (heads * self.copies["value"])
        if readable and widths["query"] // heads != key_dim:
            raise BackendError(f"level `{level.name}`: queries and keys must have the same width")
        if "write_key" in roles and widths["write_key"] // heads != key_dim:
            raise BackendError(f"level `{level.name}`: its write key has width {widths['write_key']}, but its "
                               f"keys have {heads * key_dim} ({key_dim} per head)")
        self.source_channels = {"key": key_dim, "value": value_dim, "query": key_dim}  # channels per head
        # `let` bindings first: the gates and the inputs made from gates may name them
        self.lets = nn.ModuleDict({name: Gate(value, dim, heads, key_dim, f"let {name}") for name, value in level.lets})
        self.sources = nn.ModuleDict({role: Gate(getattr(level, role), dim, heads, self.source_channels[role], role)
                                      for role in sorted(from_gates)})
        self.per_channel_sources = {role: per_channel(getattr(level, role), level.lets) for role in from_gates}
        self.gates = nn.ModuleDict({
            role: Gate(getattr(level, role), dim, heads * self.copies[role], self.source_channels[gate_side(role)], role)
            for role in GATE_ROLES if getattr(level, role) is not None
        })
        # the gates of the optimizer levels its `update` names, each computed from x as its own are
        self.optimizer_gates = nn.ModuleDict({
            moment.name: nn.ModuleDict({role: Gate(getattr(moment, role), dim, heads, key_dim, f"{moment.name}.{role}")
                                        for role in ("lr", "retain") if getattr(moment, role) is not None})
            for moment in (level.update.levels if level.update is not None else ())
        })
        self.kernel = MemoryKernel(level, heads, key_dim, value_dim)
        # the shape of a token's retain gate: [B, H], or [B, H, key_dim] per key channel
        self.retain_shape = (heads, key_dim) if per_channel(level.retain, level.lets) else (heads,)
        if readable:
            self._build_read_out(level, dim, heads, value_dim)
        else:
            self.out = self.output_norm = self.output_gate = None

    def initial_state(self, batch: int, like: Tensor) -> LevelState:
        return self.kernel.initial_state(batch, like)

    def heads_of(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], self.heads, -1)

    def all_gates(self):
        """(key, Gate) for each of the level's gates and its optimizer levels' (`level.role`)."""
        yield from self.gates.items()
        for name, gates in self.optimizer_gates.items():
            yield from ((f"{name}.{role}", gate) for role, gate in gates.items())

    def gate_module(self, key: str):
        """The Gate of `all_gates`' key: one of the level's roles, or `level.role` of an optimizer level."""
        if key in self.gates:
            return self.gates[key]
        name, role = key.split(".")
        return self.optimizer_gates[name][role]

    def source_heads(self, role: str, values: Tensor) -> Tensor:
        """An input made from gates as [B, H, d] ([B, H, S, d] over a sequence): a per-head value
        ([B, H], [B, H, S]) stands for each channel of its head."""
        if self.per_channel_sources[role]:
            return values
        return values.unsqueeze(-1).expand(*values.shape, self.source_channels[role])

    def steps_side_by_side(self, gate: Tensor, role: str) -> Tensor:
        """A per-step gate ([B, H * N] or [B, H * N, d], heads major) as [B, H, N] or [B, H, N * d]."""
        if self.copies[role] == 1:
            return gate
        return gate.reshape(gate.shape[0], self.heads, -1)

    def generate(self, x: Tensor, weights: list[Tensor]) -> Tensor:
        """This level's output on `x` (as another level's pipeline stage), without projection."""
        return self.kernel.normalized_read(self.kernel.evaluate(weights, self.heads_of(x))).reshape(x.shape[0], -1)

    def step(self, x: Tensor, position: int, state: LevelState, read_level) -> Tensor | None:
        lets = compute_lets(self.lets, lambda gate, earlier: gate(x, position, state, read_level, earlier))
        inputs = {role: self.heads_of(p(x, position, state, read_level)) for role, p in self.pipelines.items()}
        inputs.update({role: self.source_heads(role, g(x, position, state, read_level, lets))
                       for role, g in self.sources.items()})
        gates = {role: self.steps_side_by_side(g(x, position, state, read_level, lets), role) if role in self.copies
                 else g(x, position, state, read_level, lets) for role, g in self.all_gates()}
        query = inputs.get("query")
        if self.kernel.every == 0:
            y = self.kernel.evaluate(state.weights, query) if query is not None else None
        else:
            with_write_key(gates, inputs)
            y = self.kernel.step(state, inputs["key"], inputs["value"], query, gates, position)
        if y is None:
            return None
        gate = None if self.output_gate is None else self.output_gate(x, position, state, read_level)
        return self.read_out(y, gate)


def with_write_key(gates: dict[str, Tensor], inputs: dict[str, Tensor]) -> None:
    """The write key (a level's `write_key` pipeline, d_k per head) goes to the kernel with the
    token's gates, where the forms split and step it as a gate per key channel."""
    if "write_key" in inputs:
        gates["write_key"] = inputs["write_key"]


class FeedForwardLevel(nn.Module):
    """y = M(x) on the full width: frozen (an FFN) or updated from the task loss (continuum memory)."""

    def __init__(self, level: ir.Level, dim: int):
        super().__init__()
        self.name = level.name
        self.kernel = MemoryKernel(level, 1, dim, dim)
        if self.kernel.initial is None:  # parameters of a feed-forward block always start learned
            self.kernel.initial = nn.ParameterList(nn.Parameter(self.kernel._initial_value(s, i, len(self.kernel._shapes)))
                                                   for i, s in enumerate(self.kernel._shapes))
        self.every = concrete(level.every.tokens)
        self.meta = level.meta
        self.optimizer = rules.OPTIMIZERS[level.optimizer.name]
        self.gates = {}
        for role in ("lr", "retain", "momentum"):
            gate = getattr(level, role)
            if gate is None:
                continue
            if isinstance(gate, ir.Constant):
                self.gates[role] = float(concrete(gate.value))
            elif isinstance(gate, ir.Op) and gate.name == "learned":
                parameter = nn.Parameter(torch.tensor(float(op_args(gate)["init"])))
                self.register_parameter(f"{role}_gate", parameter)
                self.gates[role] = parameter
            elif self.every:
                raise BackendError(f"level `{level.name}`: a continuum-memory level's {role} must be a constant "
                                   "or `learned(...)`: it is applied once per chunk, not per token")

    def initial_state(self, batch: int, like: Tensor) -> LevelState:
        state = self.kernel.initial_state(batch, like)
        state.anchor = []
        return state

    def step(self, x: Tensor, position: int, state: LevelState, read_level) -> Tensor:
        if self.every and not all(w.requires_grad for w in state.weights):
            # Fast weights cut from any graph (inference, or a detached state): the chunk's loss
            # is still differentiated with respect to them, so they become leaves.
            state.weights = [w.detach().requires_grad_() for w in state.weights]
        weights = state.weights if self.every else [w.unsqueeze(0) for w in self.kernel.initial]
        return self.kernel.evaluate(weights, x[:, None, :]).reshape(x.shape)

    def apply_gradient(self, state: LevelState, grads, keep_graph: bool) -> None:
        """One step on the task loss accumulated over the chunk that just ended."""
        state.weights, state.momentum = continuum_step(
            state.weights, state.momentum, grads, self.optimizer.momentum_of_steps, self.gates.get("lr", 1.0),
            self.gates.get("retain", 1.0), self.gates.get("momentum", 0.9), full=self.meta == "full",
            stop=self.meta == "stop", keep_graph=keep_graph)
        state.pending = None


class _AfterHistory(torch.autograd.Function):
    """The identity on `weight`, whose autograd node also points at `history` without passing
    it any gradient. Its topological number then exceeds that of every node before it,
    and PyTorch's engine skips the nodes numbered below a gradient's inputs: differentiating the
    next chunk's loss with respect to these weights visits that chunk's graph only, not the whole
    stream's, which made each continuum step cost time growing with the position."""

    @staticmethod
    def forward(ctx, weight: Tensor, *history: Tensor) -> Tensor:
        ctx.history = len(history)
        return weight.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        return (grad,) + (None,) * ctx.history


def _place_after_history(instances: list[tuple["FeedForwardLevel", LevelState]], state: "ModelState") -> None:
    """Give the continuum level's new weights an autograd node after the last prediction, which
    depends on nearly everything the stream has computed so far (see `_AfterHistory`); values
    and gradients are unchanged. Only the last logits: pointing at the whole state would make
    more of the history reachable from every later node, slowing other gradient calls."""
    history = [state.last_logits] if state.last_logits is not None and state.last_logits.requires_grad else []
    if not history:
        return
    for _, level_state in instances:
        level_state.weights = [_AfterHistory.apply(w, *history) if w.requires_grad else w
                               for w in level_state.weights]


def update_continuum_levels(instances: list[tuple[FeedForwardLevel, LevelState]], keep_graph: bool) -> None:
    """Step every layer's copy of one continuum level: they share one pending loss, so a single
    backward pass gives all their gradients; `keep_graph` false (inference) cuts each chunk's new
    weights from the old ones (`continuum_step`)."""
    weights = [w for _, state in instances for w in state.weights]
    full = any(level.meta == "full" for level, _ in instances)
    grads = continuum_gradients(instances[0][1].pending, weights, create_graph=full)
    offset = 0
    for level, state in instances:
        count = len(state.weights)
        level.apply_gradient(state, grads[offset:offset + count], keep_graph)
        offset += count


def log_retain(retain: Tensor) -> Tensor:
    """The log of a cache's retain gate, floored at the log of the dtype's smallest normal number:
    a gate of exactly 0 then forgets an entry by a factor e^-87 (float32) per token instead of
    making every logit -inf, which would leave a `read before` query nothing to normalise over."""
    return retain.clamp_min(torch.finfo(retain.dtype).tiny).log()


class CacheLevel(ReadOut, nn.Module):
    """Attention: the non-parametric level whose state is the (windowed) KV cache, read by softmax
    or stick-breaking weights (`cache(weights=...)`). With a
    retain gate f (the Forgetting Transformer), each token's step decays every entry already in the
    cache by its f before appending its own: entry j's logit for the query at i gets the bias
    log prod_{j<s<=i} f_s (s <= i - 1 when read before), kept per entry in `state.forget`."""

    def __init__(self, level: ir.Level, dim: int, heads: int):
        super().__init__()
        self.name = level.name
        self.heads = heads
        self.read = level.read
        self.window = op_args(level.state)["window"]
        self.state_args = op_args(level.state)
        self.pipelines = nn.ModuleDict({
            role: Pipeline(getattr(level, role), dim, dim, heads, role) for role in ("key", "value", "query")
        })
        key_dim = self.pipelines["key"].out_width // heads
        self.forget_gate = Gate(level.retain, dim, heads, key_dim, "retain") if level.retain is not None else None
        self._build_read_out(level, dim, heads, self.pipelines["value"].out_width // heads)

    def initial_state(self, batch: int, like: Tensor) -> LevelState:
        return LevelState()

    def append(self, state: LevelState, k: Tensor, v: Tensor, log_forget: Tensor | None = None) -> None:
        """Decay the cached entries by the token's gate (log_forget [B, H]), then append (k, v)."""
        if log_forget is not None:
            fresh = log_forget.new_zeros(log_forget.shape + (1,))
            state.forget = fresh if state.forget is None else torch.cat([state.forget + log_forget[..., None], fresh],
                                                                        dim=2)
        k, v = k[:, :, None, :], v[:, :, None, :]
        state.keys = k if state.keys is None else torch.cat([state.keys, k], dim=2)
        state.values = v if state.values is None else torch.cat([state.values, v], dim=2)
        if self.window:
            state.keys, state.values = state.keys[:, :, -self.window:], state.values[:, :, -self.window:]
            if state.forget is not None:
                state.forget = state.forget[:, :, -self.window:]

    def attend(self, state: LevelState, q: Tensor) -> Tensor:
        if state.keys is None:
            return q.new_zeros(q.shape[0], self.heads, self.pipelines["value"].out_width // self.heads)
        scores = torch.einsum("bhd,bhnd->bhn", q, state.keys) / math.sqrt(q.shape[-1])
        if state.forget is not None:
            scores = scores + state.forget
        weights = STATES["cache"].attention_weights(self.state_args, scores, torch.ones_like(scores, dtype=torch.bool))
        return torch.einsum("bhn,bhnd->bhd", weights, state.values)

    def project(self, role: str, x: Tensor, position: int, state: LevelState, read_level) -> Tensor:
        return self.pipelines[role](x, position, state, read_level).reshape(x.shape[0], self.heads, -1)

    def step(self, x: Tensor, position: int, state: LevelState, read_level) -> Tensor:
        k, v, q = (self.project(r, x, position, state, read_level) for r in ("key", "value", "query"))
        retain = None if self.forget_gate is None else self.forget_gate(x, position, state, read_level)
        y, _ = run_cache(self, k[:, None], v[:, None], q[:, None], None if retain is None else retain[:, None], state)
        y = y[:, 0]
        gate = None if self.output_gate is None else self.output_gate(x, position, state, read_level)
        return self.read_out(y, gate)


# --- blocks ----------------------------------------------------------------------------------


class Norm(nn.Module):
    def __init__(self, kind: str, dim: int):
        super().__init__()
        self.kind = kind
        self.gain = nn.Parameter(torch.ones(dim)) if kind != "identity" else None

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "rmsnorm":
            return F.rms_norm(x, x.shape[-1:]) * self.gain
        if self.kind == "layernorm":
            return F.layer_norm(x, x.shape[-1:]) * self.gain
        return x


class Layer(nn.Module):
    """One layer: its block, with its own instance of every level the block runs."""

    def __init__(self, program: ir.Program, block: ir.Block, dim: int, heads: int):
        super().__init__()
        self.program = program
        self.dim = dim
        uses = block_levels(block)
        reached = reachable_levels({level.name: level for level in program.levels}, uses)
        used = [name for name in program.level_names if name in reached]
        read = set(uses)
        self.levels = nn.ModuleDict({name: _build_level(program.level(name), dim, heads, name in read)
                                     for name in used})
        for name in used:
            for generator in _generators(program.level(name)):
                if not isinstance(self.levels[generator], MemoryLevel):
                    raise BackendError(f"level `{generator}` generates inputs of `{name}` but is not a memory "
                                       "(key/value) level; only memories can be read as a pipeline stage")
        self.order = _step_order(program, used)
        self.block = block
        self.parts = nn.ModuleDict()
        for path, block in ir.walk_blocks(self.block):
            self._add_parameters(block, path)
        _copy_pretrained(program, self.levels)

    def _add_parameters(self, block: ir.Block, path: str) -> None:
        """Register one block node's own parameters under its path (the checkpoint's names)."""
        if isinstance(block, ir.Norm):
            self.parts[path] = Norm(block.kind, self.dim)
        elif isinstance(block, ir.Parallel):
            if concrete(block.combine) == "learned":
                self.parts[path] = _Weights(len(block.branches))
        elif isinstance(block, ir.Gated):
            self.parts[path] = Norm("rmsnorm", self.dim)
        elif isinstance(block, ir.MemoryAsContext):
            self.parts[path] = _Persistent(concrete(block.persistent), self.dim)
        elif not isinstance(block, (ir.UseLevel, ir.Sequence, ir.Residual)):
            raise BackendError(f"the reference backend cannot build the block {ir.format_value(block)}")

    def initial_state(self, batch: int, like: Tensor) -> dict[str, LevelState]:
        return {name: level.initial_state(batch, like) for name, level in self.levels.items()}

    def forward(self, x: Tensor, position: int, states: dict[str, LevelState], segment: dict) -> Tensor:
        snapshot = {name: states[name].anchor for name, level in self.levels.items() if isinstance(level, MemoryLevel)}
        stepped: dict[str, Tensor] = {}

        def read_level(name: str, value: Tensor) -> Tensor:
            level = self.levels[name]
            weights = snapshot[name] if level.read == "before" else states[name].weights
            return level.generate(value, weights)

        def run_level(name: str, value: Tensor) -> Tensor:
            for member in self.order[name]:
                if member not in stepped:
                    stepped[member] = self.levels[member].step(value, position, states[member], read_level)
            return stepped[name]

        def memory_as_context(block: ir.MemoryAsContext, path: str, value: Tensor) -> Tensor:
            return self._memory_as_context(block, path, value, position, states, segment, read_level, snapshot)

        return self.run_block(x, run_level, memory_as_context)

    def run_block(self, value: Tensor, run_level, memory_as_context) -> Tensor:
        """Evaluate the model's block on `value`; levels and MAC blocks are the caller's (per token
        here, per segment in the compiled backend); everything else is elementwise over positions."""
        return self._run(self.block, ir.ROOT_PATH, value, run_level, memory_as_context)

    def _run(self, block: ir.Block, path: str, value: Tensor, run_level, memory_as_context) -> Tensor:
        if isinstance(block, ir.UseLevel):
            return run_level(block.level, value)
        if isinstance(block, ir.Norm):
            return self.parts[path](value)
        if isinstance(block, ir.MemoryAsContext):
            return memory_as_context(block, path, value)
        inner = ir.sub_block_paths(block, path)
        if isinstance(block, ir.Sequence):
            for item_path, item in inner:
                value = self._run(item, item_path, value, run_level, memory_as_context)
            return value
        outputs = [self._run(child, child_path, value, run_level, memory_as_context) for child_path, child in inner]
        if isinstance(block, ir.Residual):
            return value + outputs[0]
        if isinstance(block, ir.Parallel):
            if block.combine == "sum":
                return sum(outputs)
            if block.combine == "mean":
                return sum(outputs) / len(outputs)
            return sum(w * o for w, o in zip(self.parts[path].weights, outputs))
        if isinstance(block, ir.Gated):
            main, gate = outputs
            return main * torch.sigmoid(self.parts[path](gate))
        raise BackendError(f"the reference backend cannot run the block {ir.format_value(block)}")

    def _memory_as_context(self, block: ir.MemoryAsContext, path: str, x, position, states, segment, read_level,
                           snapshot) -> Tensor:
        """Titans MAC, one token at a time: attention over the persistent tokens, the memory's
        read-out of each token of the segment so far and the segment's tokens; then the memory
        learns from the attention output, which is gated by the memory's read of it."""
        memory_name = block.memory
        memory, attention = self.levels[memory_name], self.levels[block.attention]
        cache = segment.setdefault(path, LevelState())
        if position % block.segment == 0:
            cache.keys = cache.values = None
            persistent = self.parts[path].tokens
            for token in persistent:
                row = token.expand(x.shape[0], -1)
                attention.append(cache, attention.project("key", row, position, cache, read_level),
                                 attention.project("value", row, position, cache, read_level))
        memory_state = states[memory_name]
        # The retrieval query reads the block's input stream; the memory's own step (below) reads
        # the attention outputs. Each stream keeps its own convolution history.
        retrieval = segment.setdefault(f"{path}:retrieval", LevelState())
        query = memory.heads_of(memory.pipelines["query"](x, position, retrieval, read_level))
        retrieved = memory.out(memory.kernel.normalized_read(memory.kernel.evaluate(snapshot[memory_name], query))
                               .reshape(x.shape[0], -1))
        for entry in (retrieved, x):
            attention.append(cache, attention.project("key", entry, position, cache, read_level),
                             attention.project("value", entry, position, cache, read_level))
        y = attention.out(attention.attend(cache, attention.project("query", x, position, cache, read_level))
                          .reshape(x.shape[0], -1))
        return y * memory.step(y, position, memory_state, read_level)


class _Weights(nn.Module):
    def __init__(self, count: int):
        super().__init__()
        self.weights = nn.Parameter(torch.full((count,), 1.0 / count))


class _Persistent(nn.Module):
    def __init__(self, count: int, dim: int):
        super().__init__()
        self.tokens = nn.Parameter(torch.randn(count, dim) * 0.02)


def _build_level(level: ir.Level, dim: int, model_heads: int, readable: bool) -> nn.Module:
    heads = concrete(level.heads) or model_heads
    if not rules.STATES[level.state.name].memory:
        return CacheLevel(level, dim, heads)
    if is_feedforward(level):
        return FeedForwardLevel(level, dim)
    return MemoryLevel(level, dim, heads, readable)


def _generators(level: ir.Level) -> set[str]:
    return generators(level) - {level.name}


def _step_order(program: ir.Program, used: list[str]) -> dict[str, list[str]]:
    """For each level, the levels to step before reading it, ending with itself: its transitive
    generators, those read after their update first in dependency order."""
    def visit(current: str, trail: tuple[str, ...], visited: list[str]) -> None:
        if current in visited or current in trail:
            return
        for generator in sorted(_generators(program.level(current))):
            visit(generator, trail + (current,), visited)
        visited.append(current)

    order: dict[str, list[str]] = {}
    for name in used:
        order[name] = []
        visit(name, (), order[name])
    return order


def _copy_pretrained(program: ir.Program, levels: nn.ModuleDict) -> None:
    for level in program.levels:
        if level.init.name != "pretrained":
            continue
        source = levels[op_args(level.init)["source"]]
        target = levels[level.name]
        with torch.no_grad():
            for mine, theirs in zip(target.kernel.initial, source.kernel.initial):
                if mine.shape != theirs.shape:
                    raise BackendError(f"level `{level.name}` cannot start from `{source.name}`: shapes differ")
                mine.copy_(theirs)


# --- the model -------------------------------------------------------------------------------


class ReferenceModel(nn.Module):
    """`model(tokens, state=None) -> (logits, state)` for a checked, choice-free program."""

    # Whether continuum updates prune the stream's history from later gradient calls
    # (`_AfterHistory`): a speed device for the compiled backend; the oracle keeps the plain graph.
    prunes_history = False

    def __init__(self, program: ir.Program, blocks: tuple[ir.Block, ...] | None = None):
        super().__init__()
        if program.model is None:
            raise BackendError(f"{program.file} has no `model` section: it is a library of levels")
        if ir.contains_search(program.model) or any(ir.contains_search(level) for level in program.levels):
            raise BackendError(f"{program.file} is a search space: freeze it to one variant first "
                               "(`nestc sweep SPEC --dry-run` lists the variants)")
        # Refuse, before allocating anything, a model whose parameters and state cannot fit in memory.
        require_fits(program, training=False)
        model = program.model
        self.program = program
        self.vocab, self.dim = model.vocab, model.dim
        self.embedding = nn.Embedding(self.vocab, self.dim)
        nn.init.normal_(self.embedding.weight, std=0.02)
        # `blocks`: the layers' blocks when not the model's own (`nestc.layer` of one level: that level alone)
        self.layers = nn.ModuleList(Layer(program, block, self.dim, model.heads)
                                    for block in (model.layer_blocks() if blocks is None else blocks))
        self.norm = Norm(model.norm if model.norm != "none" else "identity", self.dim)
        self.head = None if model.tie_embeddings else nn.Linear(self.dim, self.vocab, bias=False)
        self.task_levels = [name for name, level in self.level_modules().items()
                            if isinstance(level, FeedForwardLevel) and level.every]
        self.task_cycle = math.lcm(*(self.level_modules()[name].every for name in self.task_levels)) \
            if self.task_levels else 1

    def level_modules(self) -> dict[str, nn.Module]:
        """Each level the model runs, as its first layer with a copy builds it (the copies of
        one level differ only in their parameters)."""
        modules: dict[str, nn.Module] = {}
        for layer in self.layers:
            for name, module in layer.levels.items():
                modules.setdefault(name, module)
        return {name: modules[name] for name in self.program.level_names if name in modules}

    def initial_state(self, batch: int, like: Tensor | None = None) -> ModelState:
        """A fresh stream's state, with the dtype and device of `like` (default: the embedding's)."""
        like = self.embedding.weight if like is None else like
        return ModelState(position=0, levels=[layer.initial_state(batch, like) for layer in self.layers],
                          segments=[{} for _ in self.layers])

    def logits(self, x: Tensor) -> Tensor:
        x = self.norm(x)
        return x @ self.embedding.weight.t() if self.head is None else self.head(x)

    def forward(self, tokens: Tensor, state: ModelState | None = None) -> tuple[Tensor, ModelState]:
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, time], got shape {tuple(tokens.shape)}")
        outer_grad = torch.is_grad_enabled()
        # Continuum levels differentiate the task loss even at inference, so they run with grad on.
        with torch.enable_grad() if self.task_levels else contextlib.nullcontext():
            fresh = state is None
            state = self.initial_state(tokens.shape[0]) if fresh else state
            call_start = state.position
            if self.task_levels:
                self._start_replay(state, outer_grad, fresh)
            outputs = self.advance(tokens, state, outer_grad)
            logits = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)  # one piece: no copy
            if state.replay is not None:
                state.replay.calls.append(tokens[:, max(0, state.replay.start.position - call_start):])
        if not outer_grad:
            # Continuum levels keep the graph of their unfinished chunk in the state, so the next
            # call can still differentiate the whole chunk's loss; everything else is cut.
            return logits.detach(), state if self.task_levels else state.detach()
        return logits, state

    @staticmethod
    def _start_replay(state: ModelState, outer_grad: bool, fresh: bool) -> None:
        """Keep (at inference) a `Replay` of the stream: a fresh state (whose only graph leads
        to the outer parameters, which inference never differentiates) or one that holds no
        graph is its own start. With the outer gradient on, the state's graph is the training
        step's, which no replay under `torch.no_grad()` would rebuild, so it keeps none."""
        if outer_grad:
            state.replay = None
        elif state.replay is None and (fresh or not holds_graph(state)):
            state.replay = Replay(start=state.detach(), calls=[])

    def advance(self, inputs: Tensor, state: ModelState, outer_grad: bool, hidden: bool = False) -> list[Tensor]:
        """Read `inputs`, updating `state`; the logits of each step ([B, steps, vocab]). Here one
        token per step: the schedule the semantics is written in.

        The model is embedding -> layer stack -> norm and head. `inputs` are token ids [B, T];
        with `hidden` they are the first layer's inputs [B, T, D] instead, and each step gives the
        last layer's output [B, steps, D]: the layer stack alone (`nestc.layer`), which has no
        next-token loss, so no continuum level can learn in it (`require_no_task_levels`)."""
        if hidden:
            self.require_no_task_levels()
        outputs = []
        for t in range(inputs.shape[1]):
            if self.task_levels:
                self._learn_from_task_loss(state, inputs[:, t], outer_grad)
            x = inputs[:, t] if hidden else self.embedding(inputs[:, t])
            for layer, level_states, segment in zip(self.layers, state.levels, state.segments):
                x = layer(x, state.position, level_states, segment)
            output = x if hidden else self.logits(x)
            outputs.append(output[:, None])
            state.last_logits = output if self.task_levels else None
            state.position += 1
        return outputs

    def require_no_task_levels(self) -> None:
        """Refuse to run the layers on hidden states when a continuum level learns from the
        model's next-token loss: without the embedding and head there are no predictions."""
        if self.task_levels:
            name = self.task_levels[0]
            raise BackendError(f"level `{name}` learns in context from the model's next-token loss (objective task, "
                               f"every {self.level_modules()[name].every}), which only the whole model computes: "
                               "run it inside the model (`nestc.load`), or give the level another objective")

    def _learn_from_task_loss(self, state: ModelState, token: Tensor, keep_graph: bool) -> None:
        """The prediction made at the previous position meets its target: add its loss to every
        continuum-memory level, and step the levels whose chunk ended there."""
        if state.last_logits is None:
            return
        # Summed over the batch: each sample's fast weights receive only their own sample's loss.
        loss = F.cross_entropy(state.last_logits, token, reduction="sum")
        for name in self.task_levels:
            instances = [(layer.levels[name], level_states[name])
                         for layer, level_states in zip(self.layers, state.levels) if name in layer.levels]
            for _, level_state in instances:
                level_state.pending = loss if level_state.pending is None else level_state.pending + loss
            if state.position % instances[0][0].every == 0:
                update_continuum_levels(instances, keep_graph)
                if keep_graph and self.prunes_history:
                    _place_after_history(instances, state)
        if not keep_graph and state.position % self.task_cycle == 0:
            # Every continuum level has just stepped, so no pending loss reaches further back:
            # at inference the whole state can start afresh from here, bounding the graph.
            cut, start = state.detach(), state.detach()
            state.levels, state.segments, state.last_logits = cut.levels, cut.segments, cut.last_logits
            # The stream's replay starts here, between this token's loss (taken above, so the
            # start has no last prediction) and its read.
            start.last_logits = None
            state.replay = Replay(start=start, calls=[])


def build(program: ir.Program, blocks: tuple[ir.Block, ...] | None = None) -> ReferenceModel:
    return ReferenceModel(program, blocks)


def run_kernel(kernel: MemoryKernel, k: Tensor, v: Tensor, q: Tensor, gates: dict[str, Tensor],
               state: LevelState | None = None, start: int = 0) -> tuple[Tensor, LevelState]:
    """Run a memory rule over precomputed inputs: k, q [B, T, H, dk], v [B, T, H, dv], each gate
    [B, T, H] or [B, T, H, dk]. Returns the reads [B, T, H, dv] and the final state. This is the
    level's recurrence alone, without projections, which is what published references implement."""
    state = kernel.initial_state(k.shape[0], k) if state is None else state
    outputs = []
    for t in range(k.shape[1]):
        at_t = {role: gate[:, t] for role, gate in gates.items()}
        at_t.setdefault("lr", k.new_ones(k.shape[0], k.shape[2]))
        at_t.setdefault("retain", k.new_ones(k.shape[0], k.shape[2]))
        outputs.append(kernel.step(state, k[:, t], v[:, t], q[:, t], at_t, start + t))
    return torch.stack(outputs, dim=1), state


def run_cache(module: CacheLevel, k: Tensor, v: Tensor, q: Tensor, retain: Tensor | None,
              state: LevelState | None = None, start: int = 0) -> tuple[Tensor, LevelState]:
    """Attention over precomputed inputs, token by token: k, q [B, T, H, dk], v [B, T, H, dv],
    the retain gate [B, T, H] (None without one). Returns the reads [B, T, H, dv] (before the
    read-out) and the cache: the counterpart of `run_kernel` for a cache level. Attention does
    not depend on positions; `start` is taken so both backends' versions are called alike."""
    del start
    state = LevelState() if state is None else state
    outputs = []
    for t in range(k.shape[1]):
        forget = None if retain is None else log_retain(retain[:, t])
        if module.read == "before":
            # the first read finds nothing cached: zero, at the width of these values (which need
            # not be the module's own: the inputs are given)
            outputs.append(module.attend(state, q[:, t]) if state.keys is not None else torch.zeros_like(v[:, t]))
            module.append(state, k[:, t], v[:, t], forget)
        else:
            module.append(state, k[:, t], v[:, t], forget)
            outputs.append(module.attend(state, q[:, t]))
    return torch.stack(outputs, dim=1), state

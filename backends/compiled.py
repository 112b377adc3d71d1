"""The compiled backend: the reference's model, evaluated a segment of tokens at a time.

Same parameters and the same `ModelState` as the reference (a state dict and a state move freely
between the two); what changes is the schedule. The sequence is cut into segments aligned to
absolute positions and short enough that no level's anchor changes inside one (the segment length
divides every chunk size that matters). Inside a segment every layer runs on the whole
`[batch, segment, width]` tensor: projections, convolutions, attention and feed-forward blocks
as single calls, and each memory level through a closed form of its rule (backends/forms/):

- `anchored`: matrix or vector memories whose gradient inside the segment is taken at one state
  (every C with the segment inside a chunk, or a `dot` objective, whose gradient ignores the
  state). Every token's gradient is `e_i k_i^T` at that state; retain and momentum are linear
  recurrences, solved with decay matrices (SEMANTICS section 4, the TTT/Titans dual form).
- `delta`: the online (generalised) delta rule (`every 1`, `l2`, `gd`, matrix) with lr and retain
  per head or per key channel, erase and write gates, the implicit step and substeps, in either
  order: the chunkwise UT transform, a triangular solve per segment (DeltaNet, Gated DeltaNet,
  KDA, GDN-2, Comba, DeltaProduct, Longhorn).
- `layered`: MLP memories (and DGD on a matrix) under `every C`: each map's gradient is d u^T,
  with every token's error d found at the anchor at once by backpropagation written out by hand;
  gd and momentum then use the same decay matrices, DGD the UT solve per map (with momentum, beside
  the momentum's decay matrices).
- `trajectory`: matrix or MLP memories with per-channel gates, an output map (Moneta, Memora), an
  omega window or Muon (ATLAS): the anchor's gradients (pulled back through the output map by
  hand) give every position's state through per-entry linear recurrences; each token reads its
  own state.
- `gram`: optimizer `solve` (MesaNet's exact solve): every token's statistic H_t from decay
  matrices, one batched solve (H_t + diag(ridge_t)) x_t = q_t per segment, and the reads G_t x_t.
- `sequential`: anything else steps token by token with the reference kernel, and says so.

Continuum-memory levels update between segments (the segment length divides their periods).
Where nothing couples the layers inside a segment, the eager schedule is layer by layer instead:
each layer reads the whole call, and only the memory rules step through it segment by segment.

With `torch_compile` (`nestc.load(..., compile=True)`) the memory rules' segment steps
(`_kernel_from_tensors`, layer by layer) or else the whole segment step (`_segment_from_tensors`)
run through torch.compile as graphs, pure functions of the state's tensors (docs/backends.md says
how they avoid graph breaks and recompiles).
"""

from __future__ import annotations

import functools
import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from nestc.lang import ir
from nestc.lang.queries import generators, model_nodes
from nestc.backends.common import BackendError, concrete
from nestc.backends.forms import run_form
from nestc.backends.fused import run_fused
from nestc.backends.forms.common import apply_sequence
from nestc.backends.fx import level_provenance as fx_provenance
from nestc.backends.attention import attend_cached, attend_segment
from nestc.backends.pipelines import compute_lets
from nestc.backends.reference import CacheLevel, FeedForwardLevel, MemoryLevel, ReferenceModel, with_write_key
from nestc.backends.sequence import gate_sequence, output_gate, run_pipeline, segment_spans, steps_side_by_side
from nestc.backends.state import LevelState, ModelState, flatten_levels, tensors_at, unflatten_levels
from nestc.passes.plan import MAX_SEGMENT, LevelPlan, anchor_reader, is_generator, plan_kernel, plan_program

ATTENTION_BLOCK = 256  # queries per softmax when a layer reads a whole call at once


class CompileWarning(UserWarning):
    """A construct without a parallel form: it runs token by token."""


# --- the model ---------------------------------------------------------------------------------
class CompiledModel(ReferenceModel):
    """`model(tokens, state=None) -> (logits, state)`, equal to the reference, a segment at a time."""

    prunes_history = True

    def __init__(self, program: ir.Program, torch_compile: bool | str = False, graph_passes=None, fuse: bool = True,
                 blocks: tuple[ir.Block, ...] | None = None):
        super().__init__(program, blocks)
        self.level_spans = {level.name: level.span for level in program.levels}
        planned = plan_program(program, fuse=fuse)
        self.plans: dict[str, LevelPlan] = {name: planned.levels[name] for name in self.level_modules()}
        self.fused = planned.fused  # the levels stacked into one call (nestc/passes/fusion.py)
        self.fallback = self._whole_model_fallback(program)
        for name, plan in self.plans.items():
            if plan.kernel == "sequential":
                level = program.level(name)
                warnings.warn(f"{level.span}: level `{name}` runs token by token: {plan.reason}",
                              CompileWarning, stacklevel=2)
        if self.fallback:
            warnings.warn(f"{program.file}: the whole model runs token by token: {self.fallback}",
                          CompileWarning, stacklevel=2)
        self.segment = planned.segment
        if self.segment == 1 and not self.fallback:
            for level in program.levels:
                reader = anchor_reader(program, level.name)
                if reader and concrete(level.every.tokens) == 1:
                    warnings.warn(f"{level.span}: the whole model runs token by token: the anchor of level "
                                  f"`{level.name}`, read by {reader}, moves every token", CompileWarning, stacklevel=2)
        self.layer_by_layer = self._layer_by_layer(program)
        if self.layer_by_layer:
            self.fused = ()  # fused levels step one segment together; this schedule runs whole calls
        # each level of a fusion group -> the group's levels (run_layer steps them as one call)
        self.fusion: dict[str, tuple[str, ...]] = {name: group.levels for group in self.fused
                                                   for name in group.levels}
        # torch.compile's backend for the segment step (True: the default, inductor), or None
        self.compile_backend = ("inductor" if torch_compile is True else torch_compile) or None
        self._compiled_step = None  # made on first use
        self._compiled_kernel_step = None  # the same, for memory rules under the layer-by-layer schedule
        # With graph passes (a list, maybe empty), each segment runs as a traced fx graph
        # (backends/fx.py), one per batch size and segment length, traced on first use.
        self.graph_passes = None if graph_passes is None else list(graph_passes)
        self._graphs: dict[tuple[int, int], object] = {}
        if self.compile_backend:
            obstacle = self._torch_compile_obstacle()
            if obstacle:
                warnings.warn(f"{program.file}: torch.compile is not used: {obstacle}", CompileWarning, stacklevel=2)
                self.compile_backend = None

    def _torch_compile_obstacle(self) -> str:
        """Why torch.compile has nothing to compile, or "" when it has. Under the layer-by-layer
        schedule it compiles each memory rule's segment step (the rest already runs on whole
        calls); otherwise the whole segment step, which must then be one graph."""
        if self.layer_by_layer and not self.fallback:
            if any(_compiles_alone(module, self.plans[name]) for name, module in self.level_modules().items()):
                return ""
            return "no memory rule has a segment form to compile (the layers already run on whole calls)"
        return self._segment_obstacle()

    def _segment_obstacle(self) -> str:
        """Why the whole segment step cannot be traced as one graph, or "" when it can."""
        if self.fallback:
            return self.fallback
        for name, module in self.level_modules().items():
            plan = self.plans[name]
            if plan.kernel == "sequential":
                return f"level `{name}` runs token by token"
            if plan.kernel == "scan":  # each token's optimizer levels step through autograd.grad calls
                return f"level `{name}` steps its optimizer levels token by token (the scan form)"
            if isinstance(module, CacheLevel):
                return f"the attention cache of `{name}` changes length from segment to segment"
            if module.kernel.objective.windowed:
                return f"the omega window of `{name}` is a list of pairs that grows over the first tokens"
            if isinstance(module, FeedForwardLevel) and module.every and module.meta == "full":
                return (f"differentiating through the updates of continuum level `{name}` (`meta full`) needs "
                        "double backward through compiled graphs, which torch.compile does not support")
        return ""

    def _whole_model_fallback(self, program: ir.Program) -> str:
        for level in program.levels:
            for generator in generators(level):
                if program.level(generator).read == "after" and generator != level.name:
                    return f"level `{generator}` is read after its update by the levels it generates for"
        return ""

    def advance(self, inputs: Tensor, state: ModelState, outer_grad: bool, hidden: bool = False) -> list[Tensor]:
        """Read `inputs` a segment at a time (token by token where the model has no segment form);
        `hidden` as in the reference: the layer stack alone, on hidden states. torch.compile's and
        the graph passes' whole-segment steps start from tokens, so the layer stack alone always
        runs them eagerly (memory rules compiled on their own, under the layer-by-layer schedule,
        stay compiled)."""
        if self.fallback:
            return super().advance(inputs, state, outer_grad, hidden)
        if hidden:
            self.require_no_task_levels()
        embed = (lambda x: x) if hidden else self.embedding
        finish = (lambda x: x) if hidden else self.logits
        if self.layer_by_layer and (hidden or self.graph_passes is None):
            output = finish(self._run_layers(embed(inputs), state))
            state.position += inputs.shape[1]
            return [output]
        outputs, t = [], 0
        while t < inputs.shape[1]:
            size = min(inputs.shape[1] - t, self.segment - state.position % self.segment)
            chunk = inputs[:, t:t + size]
            if self.task_levels:
                self._learn_from_task_loss(state, chunk[:, 0], outer_grad)
                self._make_fast_weights_leaves(state)
            if self.compile_backend and not hidden:
                output = self._compiled_segment(chunk, state)
            elif self.graph_passes is not None and not hidden:
                output = self._graph_segment(chunk, state)
            else:
                output = finish(self._run_layers(embed(chunk), state))
            outputs.append(output)
            if self.task_levels:
                self._add_segment_loss(state, output, chunk)
                state.last_logits = output[:, -1]
            state.position += size
            t += size
        return outputs

    def _layer_by_layer(self, program: ir.Program) -> bool:
        """Whether each layer may read the whole call before the next one starts: nothing couples
        the layers within a segment (continuum levels learn from the last layer's logits) and no
        level's pipelines read another level's anchor or a MAC window's cache."""
        if self.task_levels:
            return False
        if any(isinstance(node, ir.MemoryAsContext) for node in model_nodes(program.model)):
            return False
        return not any(is_generator(program, level.name) for level in program.levels)

    def _run_layers(self, x: Tensor, state: ModelState) -> Tensor:
        """The layer stack on x [B, S, D] from `state.position`, advancing every level's state in
        place: one segment, or under the layer-by-layer schedule a whole call (projections,
        convolutions, gates and feed-forward blocks then run once on the whole [batch, time,
        width]; only the memory rules, and attention in blocks, step through it segment by segment)."""
        for layer, level_states, segment in zip(self.layers, state.levels, state.segments):
            x = run_layer(self, layer, x, state.position, level_states, segment)
        return x

    def _make_fast_weights_leaves(self, state: ModelState) -> None:
        """Continuum levels differentiate their chunk's loss with respect to their fast weights,
        so weights cut from any graph (inference, a detached state) become leaves."""
        for level_states in state.levels:
            for name in self.task_levels:
                level_state = level_states.get(name)
                if level_state is not None and not all(w.requires_grad for w in level_state.weights):
                    level_state.weights = [w.detach().requires_grad_() for w in level_state.weights]

    def _compiled_segment(self, chunk: Tensor, state: ModelState) -> Tensor:
        """A segment (embedding, `_run_layers`, logits) through torch.compile: the state's tensors
        go in with the same structure, strides and requires_grad at every segment, and the
        position as a tensor, so that one graph serves every segment of a given length."""
        if self._compiled_step is None:
            self._compiled_step = torch.compile(self._segment_from_tensors, backend=self.compile_backend,
                                                fullgraph=True, dynamic=False)
        return self._segment_on_tensors(chunk, state, lambda layout, position, tensors: self._compiled_step(
            layout, _as_step_input(chunk), position, [_as_step_input(t) for t in tensors]))

    def _compiled_kernel(self, plan: str, kernel, state: LevelState, k: Tensor, v: Tensor, q: Tensor,
                         gates: dict[str, Tensor], start: int) -> Tensor:
        """A memory rule's segment through torch.compile, as a pure function of tensors like
        `_compiled_segment`: the same structure, strides and requires_grad at every segment and
        the position as a tensor, so one graph serves every segment of a given length."""
        if self._compiled_kernel_step is None:
            self._compiled_kernel_step = torch.compile(_kernel_from_tensors, backend=self.compile_backend,
                                                       fullgraph=True, dynamic=False)
        if kernel.order == "decay_first" and state.retain_product is None:
            state.retain_product = torch.ones_like(gates["retain"][:, :, 0])  # [B, H] or per key channel [B, H, dk]
        layout, tensors = flatten_levels([{"": state}])
        roles = tuple(sorted(gates))
        y, tensors = self._compiled_kernel_step(
            plan, kernel, layout, roles, _as_step_input(k), _as_step_input(v), _as_step_input(q),
            [_as_step_input(gates[role]) for role in roles], torch.tensor(start, device=k.device),
            [_as_step_input(t) for t in tensors])
        unflatten_levels([{"": state}], layout, tensors)
        if (start + k.shape[2]) % kernel.every == 0:
            state.retain_product = None  # the reference's form where a chunk has just closed
        return y

    def _graph_segment(self, chunk: Tensor, state: ModelState) -> Tensor:
        """A segment (embedding, `_run_layers`, logits) through the traced fx graph for this
        batch size and segment length."""
        from nestc.backends import fx

        key = tuple(chunk.shape)
        if key not in self._graphs:
            graph = fx.trace_segment(self, *key)
            fx.run_passes(graph, self.graph_passes)
            self._graphs[key] = graph
        parameters = [parameter for _, parameter in self.named_parameters()]
        return self._segment_on_tensors(chunk, state, lambda layout, position, tensors: self._graphs[key](
            parameters, chunk, position, tensors))

    def _segment_on_tensors(self, chunk: Tensor, state: ModelState, step) -> Tensor:
        """Run `step(layout, position, state tensors) -> (logits, state tensors)` on the state
        made complete and flat, and write its result back in the reference's form."""
        _complete_state(self, state, chunk.shape[0])
        layout, tensors = flatten_levels(state.levels)
        logits, tensors = step(layout, torch.tensor(state.position, device=chunk.device), tensors)
        _write_back_state(self, state, layout, tensors, state.position + chunk.shape[1])
        return logits

    def _segment_from_tensors(self, layout: tuple, chunk: Tensor, position: Tensor,
                              tensors: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """The segment step as a pure function of tensors (what torch.compile traces): the state
        rebuilt from `tensors` by `layout`, advanced by `_run_layers`' code (`run_layer`),
        flattened again."""
        levels = [{name: LevelState() for name in layer.levels} for layer in self.layers]
        unflatten_levels(levels, layout, tensors)
        x = self.embedding(chunk)
        for layer, level_states in zip(self.layers, levels):
            x = run_layer(self, layer, x, position, level_states)
        return self.logits(x), tensors_at(levels, layout)

    def _add_segment_loss(self, state: ModelState, logits: Tensor, chunk: Tensor) -> None:
        """The predictions inside the segment whose targets are inside it too."""
        if chunk.shape[1] < 2:
            return
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1),
                               reduction="sum")
        for level_states in state.levels:
            for name in (name for name in self.task_levels if name in level_states):
                level_state = level_states[name]
                level_state.pending = loss if level_state.pending is None else level_state.pending + loss


# --- the state as the torch.compile step's inputs --------------------------------------------


def _compiles_alone(module, plan: LevelPlan) -> bool:
    """Whether this level's memory rule runs through torch.compile on its own (layer by layer):
    a segment form whose state is fixed tensors (an omega window is a list that grows)."""
    return (isinstance(module, MemoryLevel) and plan.kernel in ("anchored", "delta", "layered", "trajectory")
            and not module.kernel.objective.windowed and ("query" in module.pipelines or "query" in module.sources))


def _kernel_from_tensors(plan: str, kernel, layout: tuple, roles: tuple, k: Tensor, v: Tensor, q: Tensor,
                         gates: list[Tensor], start: Tensor, tensors: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """A memory rule's segment as a pure function of tensors (what torch.compile traces)."""
    levels = [{"": LevelState()}]
    unflatten_levels(levels, layout, tensors)
    y = run_form(plan, kernel, levels[0][""], k, v, q, dict(zip(roles, gates)), start)
    return y, tensors_at(levels, layout)


def _complete_state(model: CompiledModel, state: ModelState, batch: int) -> None:
    """Fill in what a stream's first segment creates on the fly (zero convolution histories, a
    retain product of ones), so the state has the same tensors before every segment."""
    like = model.embedding.weight
    for layer, level_states in zip(model.layers, state.levels):
        for name, module in layer.levels.items():
            level_state = level_states[name]
            if not isinstance(module, MemoryLevel):
                continue
            gates = list(module.gates.values()) + list(module.lets.values()) + list(module.sources.values())
            pipelines = list(module.pipelines.values()) + [p for gate in gates for p in gate.pipelines()]
            pipelines += [module.output_gate] if module.output_gate is not None else []
            for stage in (stage for pipeline in pipelines for stage in pipeline.stages):
                if stage.kind == "conv" and stage.buffer_name not in level_state.buffers:
                    level_state.buffers[stage.buffer_name] = like.new_zeros(batch, stage.args["window"] - 1,
                                                                            stage.width)
            if module.kernel.every and module.kernel.order == "decay_first" and level_state.retain_product is None:
                level_state.retain_product = like.new_ones(batch, *module.retain_shape)


def _as_step_input(tensor: Tensor) -> Tensor:
    """Dynamo guards on strides and requires_grad: give every input the contiguous strides, and
    make it require grad exactly when grad mode is on (a zero initial state becomes a leaf), so
    the first segment of a stream and the ones after it pass the same guards."""
    strides, step = [], 1
    for size in reversed(tensor.shape):
        strides.insert(0, step)
        step *= size
    if tensor.stride() != tuple(strides):
        tensor = tensor.clone(memory_format=torch.contiguous_format)
    if torch.is_grad_enabled() and not tensor.requires_grad and tensor.is_floating_point():
        return tensor.detach().requires_grad_()
    return tensor if torch.is_grad_enabled() else tensor.detach()


def _write_back_state(model: CompiledModel, state: ModelState, layout: tuple, tensors: list[Tensor],
                      position: int) -> None:
    """Store the step's outputs in the caller's state, in the reference's form: no retain product
    (None) where a chunk has just closed."""
    unflatten_levels(state.levels, layout, tensors)
    for layer, level_states in zip(model.layers, state.levels):
        for name, module in layer.levels.items():
            if isinstance(module, MemoryLevel) and module.kernel.every and position % module.kernel.every == 0:
                level_states[name].retain_product = None


def run_layer(model: CompiledModel, layer, x: Tensor, start: int, states: dict[str, LevelState],
              segment: dict | None = None) -> Tensor:
    """One layer's block on a segment x [B, S, D]; `segment` holds the layer's MAC caches."""
    snapshot = {name: states[name].anchor for name, level in layer.levels.items() if isinstance(level, MemoryLevel)}
    stepped: dict[str, Tensor] = {}

    def read_level(name: str, value: Tensor) -> Tensor:
        level = layer.levels[name]
        heads = value.reshape(value.shape[0], value.shape[1], level.heads, -1)
        read = level.kernel.normalized_read(apply_sequence(level.kernel, snapshot[name], heads))
        return read.reshape(value.shape[0], value.shape[1], -1)

    def run_level(name: str, value: Tensor) -> Tensor:
        for member in layer.order[name]:
            if member in stepped:
                continue
            # the members of its fusion group stepped here too, on the same input: one call
            group = [level for level in model.fusion.get(member, ()) if level in layer.order[name]
                     and level not in stepped]
            if len(group) > 1:
                with fx_provenance("+".join(group), model.level_spans.get(member)):
                    outputs = run_fused([layer.levels[level] for level in group], model.plans[member].kernel, value,
                                        start, [states[level] for level in group], read_level)
                stepped.update(zip(group, outputs))
                continue
            with fx_provenance(member, model.level_spans.get(member)):
                stepped[member] = run_module(model, layer.levels[member], model.plans[member], value, start,
                                             states[member], read_level)
        return stepped[name]

    def memory_as_context(block: ir.MemoryAsContext, path: str, value: Tensor) -> Tensor:
        if segment is None:
            raise BackendError("memory-as-context blocks need the stream's segment caches")
        return mac_segment(model, layer, block, path, value, start, states, segment, snapshot, read_level)

    return layer.run_block(x, run_level, memory_as_context)


def mac_segment(model, layer, block: ir.MemoryAsContext, path: str, x: Tensor, start: int,
                states: dict[str, LevelState], segment: dict, snapshot: dict[str, list[Tensor]], read_level) -> Tensor:
    """Titans MAC on a segment that lies in one MAC window and one chunk of the memory. Every
    token's retrieval M*(q_t) is read at the memory's anchor at once; the cache entries (the
    persistent tokens at a window's start, then each token's retrieval followed by the token)
    form one interleaved sequence through the attention's key and value pipelines; one masked
    softmax gives every y_t; the memory then learns from the y's with its own segment form."""
    memory_name, window_length = block.memory, block.segment
    memory, attention = layer.levels[memory_name], layer.levels[block.attention]
    batch, size = x.shape[:2]
    cache = segment.setdefault(path, LevelState())
    retrieval = segment.setdefault(f"{path}:retrieval", LevelState())
    positions = start + torch.arange(size, device=x.device)
    entries, entry_positions = [], []
    if start % window_length == 0:
        cache.keys = cache.values = None
        persistent = layer.parts[path].tokens
        entries.append(persistent.expand(batch, -1, -1))
        entry_positions.append(torch.zeros(persistent.shape[0], dtype=torch.long, device=x.device) + start)
    query = run_pipeline(memory.pipelines["query"], x, start, retrieval, read_level)
    query = query.reshape(batch, size, memory.heads, -1)
    retrieved = memory.out(memory.kernel.normalized_read(apply_sequence(memory.kernel, snapshot[memory_name], query))
                           .reshape(batch, size, -1))
    entries.append(torch.stack([retrieved, x], dim=2).reshape(batch, 2 * size, -1))
    entry_positions.append(positions.repeat_interleave(2))
    entries, entry_positions = torch.cat(entries, dim=1), torch.cat(entry_positions)
    k, v = (run_pipeline(attention.pipelines[role], entries, entry_positions, cache, read_level)
            .reshape(batch, entries.shape[1], attention.heads, -1).transpose(1, 2) for role in ("key", "value"))
    q = run_pipeline(attention.pipelines["query"], x, start, cache, read_level)
    q = q.reshape(batch, size, attention.heads, -1).transpose(1, 2)
    # token t's own entry (the token itself) closes its view of the cache
    y = attend_cached(attention, cache, k, v, q, first=entries.shape[1] - 2 * size + 1, stride=2)
    y = attention.out(y.transpose(1, 2).reshape(batch, size, -1))
    with fx_provenance(memory_name, model.level_spans.get(memory_name)):
        read = run_module(model, memory, model.plans[memory_name], y, start, states[memory_name], read_level)
    return y * read


def run_module(model, module, plan: LevelPlan, x: Tensor, start: int, state: LevelState, read_level):
    batch, size = x.shape[:2]
    if isinstance(module, FeedForwardLevel):
        # a feed-forward block's weights, shared by the batch, keep a batch dimension of 1
        weights = state.weights if module.every else [w.unsqueeze(0) for w in module.kernel.initial]
        return apply_sequence(module.kernel, weights, x[:, :, None, :]).reshape(x.shape)
    if isinstance(module, CacheLevel):
        # A call from an empty cache whose window holds it all is one causal attention; otherwise
        # the call attends in blocks of queries over the cache, so each block's mask stays
        # linear in the cache's length.
        whole = state.keys is None and (not module.window or module.window >= size)
        spans = [(0, size)] if whole else segment_spans(start, size, ATTENTION_BLOCK)
        blocks = torch.split(x, [length for _, length in spans], dim=1) if len(spans) > 1 else [x]
        return torch.cat([attend_segment(module, block, start + offset, state, read_level)
                          for (offset, _), block in zip(spans, blocks)], dim=1)
    heads = module.heads
    lets = compute_lets(module.lets, lambda gate, earlier: gate_sequence(gate, x, start, state, read_level, heads,
                                                                          earlier))
    inputs = {role: run_pipeline(p, x, start, state, read_level).reshape(batch, size, heads, -1).transpose(1, 2)
              for role, p in module.pipelines.items()}
    inputs.update({role: module.source_heads(role, gate_sequence(gate, x, start, state, read_level, heads, lets))
                   for role, gate in module.sources.items()})
    copies = {role: module.copies.get(role, 1) for role, _ in module.all_gates()}
    gates = {role: steps_side_by_side(gate_sequence(gate, x, start, state, read_level, heads * copies[role], lets),
                                      copies[role], heads)
             for role, gate in module.all_gates()}
    query = inputs.get("query")
    with_write_key(gates, inputs)
    if plan.kernel == "frozen":
        if query is None:
            return None
        y = apply_sequence(module.kernel, state.weights, query.transpose(1, 2)).transpose(1, 2)
    else:
        gates.setdefault("lr", x.new_ones(batch, heads, size))
        gates.setdefault("retain", x.new_ones(batch, heads, size))
        kernel = functools.partial(run_form, plan.kernel)
        read = query  # None: nobody reads this memory (a generator), so no form computes a read
        spans = segment_spans(start, size, model.segment)
        lengths = [length for _, length in spans]

        def pieces(tensor: Tensor | None) -> list:
            # one split, not a slice per span: a slice's backward writes into zeros of the whole length
            if tensor is None or len(spans) == 1:
                return [tensor] * len(spans)
            return list(torch.split(tensor, lengths, dim=2))

        gate_pieces = {role: pieces(gate) for role, gate in gates.items()}
        if model.compile_backend and model.layer_by_layer and _compiles_alone(module, plan):
            kernel = functools.partial(model._compiled_kernel, plan.kernel)
        outputs = [kernel(module.kernel, state, k, v, q, {role: gate_pieces[role][index] for role in gates},
                          start + offset)
                   for index, ((offset, _), k, v, q) in enumerate(zip(spans, pieces(inputs["key"]),
                                                                     pieces(inputs["value"]), pieces(read)))]
        if query is None:
            return None
        y = torch.cat(outputs, dim=2)
    return module.read_out(y.transpose(1, 2), output_gate(module, x, start, state, read_level))


def build(program: ir.Program, torch_compile: bool | str = False, graph_passes=None, fuse: bool = True,
          blocks: tuple[ir.Block, ...] | None = None) -> CompiledModel:
    return CompiledModel(program, torch_compile, graph_passes, fuse, blocks)


def run_kernel(kernel, k: Tensor, v: Tensor, q: Tensor, gates: dict[str, Tensor],
               state: LevelState | None = None, start: int = 0) -> tuple[Tensor, LevelState]:
    """The compiled counterpart of `reference.run_kernel` (same arguments and layout): the rule
    alone over precomputed inputs, segment by segment."""
    per_channel = any(g.dim() == 4 for g in gates.values())
    plan = plan_kernel(kernel, per_channel)
    length = MAX_SEGMENT if kernel.every <= 1 else math.gcd(MAX_SEGMENT, kernel.every)
    state = kernel.initial_state(k.shape[0], k) if state is None else state
    full = {role: gate for role, gate in gates.items()}
    full.setdefault("lr", k.new_ones(k.shape[:3]))
    full.setdefault("retain", k.new_ones(k.shape[:3]))
    outputs, t = [], 0
    step = functools.partial(run_form, "sequential" if plan.kernel == "frozen" else plan.kernel)
    while t < k.shape[1]:
        size = min(k.shape[1] - t, length - (start + t) % length)
        part = slice(t, t + size)
        at = {role: (g[:, part].transpose(1, 2) if g.dim() == 3 else g[:, part].permute(0, 2, 1, 3))
              for role, g in full.items()}
        outputs.append(step(kernel, state, k[:, part].transpose(1, 2), v[:, part].transpose(1, 2),
                            q[:, part].transpose(1, 2), at, start + t))
        t += size
    return torch.cat(outputs, dim=2).transpose(1, 2), state


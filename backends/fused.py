"""Memory levels stacked along the head axis and stepped as one call of their segment form: the
backend's side of the fusion pass (nestc/passes/fusion.py, which decides the groups).

Activations of the stacked levels are [B, S, L, width] (L levels), or [B, S, width] while they are
still the same for all: each level reads the same x, and a read of a level shared by all of them
(Hope's `mk` in every key pipeline) stays one read. A projection or convolution stacks the levels'
parameters and runs once; a read through `self` runs each level's own anchor, stacked, as one
read; parameter-free stages run once on all levels. The segment form then sees L * H heads: its
math is per (batch, head) slice, so each level's slice is what it computes alone. Afterwards each
level takes back its weights and moves its anchor at its own chunk ends (`finish_segment`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from nestc.backends.forms import KERNELS
from nestc.backends.forms.common import apply_sequence, finish_segment
from nestc.backends.pipelines import causal_convolution
from nestc.backends.sequence import output_gate, run_pipeline, stage_sequence
from nestc.backends.state import LevelState


def run_fused(modules: list, form: str, x: Tensor, start: int, states: list[LevelState], read_level) -> list:
    """Step the memory levels `modules` (one fusion group, all planned to `form`, all read before
    their update) on one segment x [B, S, D]. Returns each level's output [B, S, D], None for a
    level that nobody reads with a query."""
    batch, size = x.shape[:2]
    count, heads = len(modules), modules[0].heads
    kernel = modules[0].kernel  # the rules and arguments every member shares
    closed = kernel.closed_form  # optimizer levels run as the built-in they equal (backends/optimizers.py `lowered`)
    if closed is not None and closed.buffer is not None:
        for state in states:
            state.momentum = state.moments[closed.buffer]
    stacked_state = _stack_states(states)
    anchors = stacked_state.anchor  # what `self` reads: each level's anchor, as the unfused read_level does

    def stacked(pipelines) -> Tensor:
        return _pipeline(pipelines, x, start, states, read_level, kernel, anchors, count)

    k, v = (_per_head(stacked([module.pipelines[role] for module in modules]), count * heads)
            for role in ("key", "value"))
    gates = {role: _gate([module.gates[role] for module in modules], x, stacked) for role in modules[0].gates}
    if closed is not None:
        gates.update({role: _gate([module.gate_module(key) for module in modules], x, stacked)
                      for role, key in closed.gates})
    gates.setdefault("lr", x.new_ones(batch, count * heads, size))
    gates.setdefault("retain", x.new_ones(batch, count * heads, size))
    # A level read before its update reads its anchor (the reference's definition of that read):
    # computed for the readers alone, so the form is asked for no read at all (q None).
    outputs = []
    for module, state in zip(modules, states):
        if "query" not in module.pipelines:
            outputs.append(None)
            continue
        query = run_pipeline(module.pipelines["query"], x, start, state, read_level)
        y = apply_sequence(module.kernel, state.anchor, query.reshape(batch, size, heads, -1))
        outputs.append(module.read_out(y, output_gate(module, x, start, state, read_level)))
    KERNELS[form](kernel, stacked_state, k, v, None, gates, start)
    _take_back(stacked_state, states, heads)
    if closed is not None and closed.buffer is not None:
        for state in states:
            state.moments[closed.buffer], state.momentum = state.momentum, []
    for module, state, retain in zip(modules, states, gates["retain"].split(heads, dim=1)):
        finish_segment(module.kernel, state, start, size, retain)
    return outputs


def _per_head(values: Tensor, heads: int) -> Tensor:
    """[B, S, L, width] -> [B, L * H, S, width / H]: the levels' heads side by side."""
    return values.reshape(values.shape[0], values.shape[1], heads, -1).transpose(1, 2)


def _pipeline(pipelines: list, x: Tensor, start: int, states: list[LevelState], read_level, kernel,
              anchors: list[Tensor], count: int) -> Tensor:
    """The same pipeline of every stacked level on x [B, S, D]: [B, S, L, width]."""
    batch, size = x.shape[:2]

    def spread(shared: Tensor) -> Tensor:  # [B, S, width], the same for all -> [B, S, L, width]
        return shared[:, :, None].expand(batch, size, count, shared.shape[-1])

    h, apart = x, False  # apart: h is [B, S, L, width], one slice per level
    for index, (kind, _) in enumerate(pipelines[0].steps):
        if kind == "level":
            targets = {pipeline.steps[index][1] for pipeline in pipelines}
            if len(targets) == 1:  # the same level read by all: one read, its batch axis over S * L
                (target,) = targets
                h = read_level(target, h.flatten(1, 2)).unflatten(1, (size, count)) if apart \
                    else read_level(target, h)
            else:  # each level reads itself: the stacked anchors, one read
                h = h if apart else spread(h)
                heads = h.reshape(batch, size, anchors[0].shape[1], -1)
                h = apply_sequence(kernel, anchors, heads).reshape(batch, size, count, -1)
                apart = True
            continue
        stages = [pipeline.stages[pipeline.steps[index][1]] for pipeline in pipelines]
        if stages[0].kind == "proj":
            h = _projection([stage.linear for stage in stages], h, apart)
            apart = True
        elif stages[0].kind == "conv":
            h = _convolution(stages, h if apart else spread(h), states)
            apart = True
        elif apart:  # a stage without parameters of its own that acts on each head alone
            h = stage_sequence(stages[0], h.flatten(1, 2), start, states[0]).unflatten(1, (size, count))
        else:
            h = stage_sequence(stages[0], h, start, states[0])
    return h if apart else spread(h)


def _projection(linears: list, h: Tensor, apart: bool) -> Tensor:
    """Each level's projection: one matmul on the concatenated weights of a shared input, one
    batched matmul on inputs apart."""
    count, out = len(linears), linears[0].out_features
    bias = torch.stack([linear.bias for linear in linears]) if linears[0].bias is not None else None
    if not apart:
        weight = torch.cat([linear.weight for linear in linears])
        return F.linear(h, weight, None if bias is None else bias.flatten()).unflatten(-1, (count, out))
    weight = torch.stack([linear.weight for linear in linears])  # [L, out, in]
    y = torch.einsum("bsli,loi->bslo", h, weight)
    return y if bias is None else y + bias


def _convolution(stages: list, h: Tensor, states: list[LevelState]) -> Tensor:
    """Each level's causal convolution over h [B, S, L, width], with its own history."""
    window = stages[0].args["window"]
    batch, size, _, width = h.shape
    histories = [state.buffers.get(stage.buffer_name) for stage, state in zip(stages, states)]
    history = torch.stack([past if past is not None else h.new_zeros(batch, window - 1, width) for past in histories],
                          dim=2)
    frames = torch.cat([history, h], dim=1)  # oldest first
    for member, (stage, state) in enumerate(zip(stages, states)):
        state.buffers[stage.buffer_name] = frames[:, frames.shape[1] - (window - 1):, member]
    return causal_convolution(frames, torch.stack([stage.weight for stage in stages]), size)  # [L, width, window]


def _gate(gates: list, x: Tensor, stacked) -> Tensor:
    """The levels' gates side by side on x [B, S, D]: [B, L * H, S], or [B, L * H, S, d] per channel."""
    batch, size = x.shape[:2]
    first = gates[0]
    heads = first.heads
    if first.constant is not None:
        values = x.new_tensor([gate.constant for gate in gates]).repeat_interleave(heads)
        return values[None, :, None].expand(batch, len(gates) * heads, size)
    if first.learned is not None:
        values = torch.cat([gate.learned for gate in gates])  # [L * H] or [L * H, d]
        values = values.expand(batch, size, *values.shape)
    else:
        values = stacked([gate.pipeline for gate in gates]).flatten(2)  # [B, S, L * out]
        if values.shape[-1] != len(gates) * heads:
            values = values.reshape(batch, size, len(gates) * heads, -1)
    return values.transpose(1, 2) if values.dim() == 3 else values.permute(0, 2, 1, 3)


def _stack_states(states: list[LevelState]) -> LevelState:
    """One state of all the levels' heads side by side (the weights and anchors [B, L * H, ...])."""
    def side_by_side(parts) -> list[Tensor]:
        return [torch.cat(slices, dim=1) for slices in zip(*parts)]

    stacked = LevelState(weights=side_by_side(state.weights for state in states),
                         anchor=side_by_side(state.anchor for state in states))
    if states[0].momentum:
        stacked.momentum = side_by_side(state.momentum for state in states)
    products = [state.retain_product for state in states]
    if any(product is not None for product in products):
        like = next(product for product in products if product is not None)
        stacked.retain_product = torch.cat([product if product is not None else torch.ones_like(like)
                                            for product in products], dim=1)
    return stacked


def _take_back(stacked: LevelState, states: list[LevelState], heads: int) -> None:
    """Each level's weights (and momenta) after the call, from the stacked state."""
    for field in ("weights", "momentum"):
        per_level = zip(*(tensor.split(heads, dim=1) for tensor in getattr(stacked, field)))
        for state, pieces in zip(states, per_level):
            setattr(state, field, list(pieces))

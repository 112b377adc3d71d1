"""The sequence forms of a level's building blocks: a pipeline stage, a pipeline, a gate and the
output gate over a whole segment [B, S, ...] (positions start .. start + S - 1), equal to the
reference's token-by-token modules (backends/pipelines.py). The compiled backend's levels, its
attention (backends/attention.py) and its fused groups (backends/fused.py) read their inputs
through them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from nestc.backends.pipelines import Stage, causal_convolution, combine_gates, rotate
from nestc.backends.state import LevelState


def stage_sequence(stage: Stage, x: Tensor, start: int, state: LevelState) -> Tensor:
    """One pipeline stage on [B, S, width], positions start .. start + S - 1 (or `start`'s own)."""
    kind, args = stage.kind, stage.args
    if kind == "conv":
        window = args["window"]
        history = state.buffers.get(stage.buffer_name)
        if history is None:
            history = x.new_zeros(x.shape[0], window - 1, x.shape[2])
        frames = torch.cat([history, x], dim=1)  # oldest first
        state.buffers[stage.buffer_name] = frames[:, -(window - 1):, :] if window > 1 else frames[:, :0, :]
        return causal_convolution(frames, stage.weight, x.shape[1])
    if kind == "rope":
        heads = x.reshape(x.shape[0], x.shape[1], stage.heads, -1)
        # start is an int, a 0-dim tensor in the torch.compile step (one graph for all positions),
        # or every element's own position (a memory-as-context block's cache entries)
        if isinstance(start, Tensor) and start.dim() == 1:
            positions = start[:, None]
        else:
            positions = (start + torch.arange(x.shape[1], device=x.device))[:, None]  # [S, 1]: over heads
        return rotate(heads, positions, args["base"]).reshape(x.shape)
    if kind in ("l2norm", "layernorm", "rmsnorm"):
        heads = x.reshape(x.shape[0], x.shape[1], stage.heads, -1)
        if kind == "l2norm":
            out = F.normalize(heads, dim=-1)
        elif kind == "layernorm":
            out = F.layer_norm(heads, heads.shape[-1:])
        else:
            out = F.rms_norm(heads, heads.shape[-1:])
        return out.reshape(x.shape)
    return stage(x, start, state)  # position-free stages work on any leading shape


def run_pipeline(pipeline, x: Tensor, start: int, state: LevelState, read_level, skip: int = 0) -> Tensor:
    """x through a pipeline's steps, from step `skip` on."""
    for kind, target in pipeline.steps[skip:]:
        x = read_level(target, x) if kind == "level" else stage_sequence(pipeline.stages[target], x, start, state)
    return x


def output_gate(module, x: Tensor, start: int, state: LevelState, read_level) -> Tensor | None:
    """The level's output gate over the segment x [B, S, D]: [B, S, H * d_v], or None."""
    return None if module.output_gate is None else run_pipeline(module.output_gate, x, start, state, read_level)


def steps_side_by_side(gate: Tensor, steps: int, heads: int) -> Tensor:
    """A per-step gate over the segment, [B, H * N, S] or [B, H * N, S, d] (heads major), as
    [B, H, S, N] or [B, H, S, N * d]: what the delta form reads (forms/delta.py `delta_inputs`)."""
    if steps == 1:
        return gate
    batch, _, size = gate.shape[:3]
    by_step = gate.reshape(batch, heads, steps, size, -1).transpose(2, 3)
    return by_step.reshape(batch, heads, size, -1)


def segment_spans(start: int | Tensor, size: int, period: int) -> list[tuple[int, int]]:
    """(offset, length) pieces of positions start .. start + size - 1 that never cross a multiple
    of `period`. The torch.compile step's start is a tensor; its segment is one piece already."""
    if isinstance(start, Tensor):
        return [(0, size)]
    spans, offset = [], 0
    while offset < size:
        length = min(size - offset, period - (start + offset) % period)
        spans.append((offset, length))
        offset += length
    return spans


def gate_sequence(gate, x: Tensor, start: int, state: LevelState, read_level, heads: int,
                   lets: dict[str, Tensor] | None = None) -> Tensor:
    """A gate over the segment as [B, H, S] (or [B, H, S, d] per channel); `lets`: the level's
    bindings over the segment."""
    batch, size = x.shape[:2]
    if gate.constant is not None:
        return gate.constant_tensor(x)[None, :, None].expand(batch, heads, size)
    if gate.binding is not None:
        return lets[gate.binding]
    if gate.op is not None:
        return combine_gates(gate.op, [gate_sequence(operand, x, start, state, read_level, heads, lets)
                                       for operand in gate.operands])
    if gate.learned is not None:
        values = gate.learned.expand(batch, size, *gate.learned.shape)
    else:
        values = run_pipeline(gate.pipeline, x, start, state, read_level)
        if values.shape[-1] != heads:
            values = values.reshape(batch, size, heads, -1)
    return values.transpose(1, 2) if values.dim() == 3 else values.permute(0, 2, 1, 3)


def run_pipelines(pipelines, roles: tuple[str, ...], x: Tensor, start: int, state: LevelState,
                  read_level) -> list[Tensor]:
    """Several pipelines on the same x. Those that open with a projection of the same kind (with
    or without bias) run it as one matmul on the concatenated weights, then go on from its
    slice: one pass over x forward, and one matmul for x's gradient backward."""
    openings = {role: opening_projection(pipelines[role]) for role in roles}
    outputs: dict[str, Tensor] = {}
    for biased in (False, True):
        group = [role for role in roles if openings[role] is not None and openings[role].bias is not None] \
            if biased else [role for role in roles if openings[role] is not None and openings[role].bias is None]
        if len(group) < 2:
            continue
        linears = [openings[role] for role in group]
        weight = torch.cat([linear.weight for linear in linears])
        bias = torch.cat([linear.bias for linear in linears]) if biased else None
        pieces = F.linear(x, weight, bias).split([linear.out_features for linear in linears], dim=-1)
        for role, piece in zip(group, pieces):
            outputs[role] = run_pipeline(pipelines[role], piece, start, state, read_level, skip=1)
    return [outputs[role] if role in outputs else run_pipeline(pipelines[role], x, start, state, read_level)
            for role in roles]


def opening_projection(pipeline) -> torch.nn.Linear | None:
    """The linear map of a pipeline's first stage, when that stage is a projection."""
    if not pipeline.steps or pipeline.steps[0][0] != "stage":
        return None
    stage = pipeline.stages[pipeline.steps[0][1]]
    return stage.linear if stage.kind == "proj" else None

"""Attention over a cache level's segment in the compiled backend: one masked softmax (or
stick-breaking weighting) per segment (or per block of queries), the forget bias of a `retain` gate (FoX), RoPE's rotation
fused into the projections, and the cache the segment leaves; `run_cache` runs a cache level on
precomputed inputs as `reference.run_cache` does."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from nestc.backends.reference import CacheLevel, log_retain
from nestc.backends.sequence import (gate_sequence, opening_projection, output_gate, run_pipeline, run_pipelines,
                                    segment_spans)
from nestc.backends.state import LevelState
from nestc.passes.plan import MAX_SEGMENT
from nestc.rules.states import STATES


def attend_segment(module: CacheLevel, x: Tensor, start: int, state: LevelState, read_level) -> Tensor:
    batch, size = x.shape[:2]
    first = 0 if module.read == "after" else -1  # each token's own entry closes its view of the cache (`read after`)
    forget = None if module.forget_gate is None else \
        log_retain(gate_sequence(module.forget_gate, x, start, state, read_level, module.heads))
    base = rotary_pairs_base(module) if state.keys is None else None
    if base is not None:
        y = attend_rotary_pairs(module, x, start, state, read_level, base, first, forget)
    else:
        k, v, q = (projected.reshape(batch, size, module.heads, -1).transpose(1, 2) for projected in
                   run_pipelines(module.pipelines, ("key", "value", "query"), x, start, state, read_level))
        y = attend_cached(module, state, k, v, q, first, log_forget=forget)
    return module.read_out(y.transpose(1, 2), output_gate(module, x, start, state, read_level))


def rotary_pairs_base(module: CacheLevel) -> float | None:
    """The RoPE base when the key and query pipelines are both `proj |> rope` with one base,
    projections of one kind (with or without bias) and an even head width; otherwise None."""
    parts = []
    for role in ("key", "query"):
        pipeline = module.pipelines[role]
        if [kind for kind, _ in pipeline.steps] != ["stage", "stage"]:
            return None
        projection, rope = (pipeline.stages[index] for _, index in pipeline.steps)
        if projection.kind != "proj" or rope.kind != "rope":
            return None
        parts.append((projection.linear, rope.args["base"]))
    (key, key_base), (query, query_base) = parts
    if key_base != query_base or (key.bias is None) != (query.bias is None) \
            or key.out_features != query.out_features or (key.out_features // module.heads) % 2:
        return None
    return key_base


def attend_rotary_pairs(module: CacheLevel, x: Tensor, start: int, state: LevelState, read_level, base: float,
                        first: int, log_forget: Tensor | None) -> Tensor:
    """`attend_segment` from an empty cache for keys and queries `proj |> rope`: RoPE rotates the
    channel pairs (i, i + d/2) of each head, and reordering the projections' rows makes each pair
    adjacent, so the rotation is one complex multiplication (forward and backward) instead of
    slices, products and concatenations. Attention reads keys and queries only through their dot
    products, which one order for both leaves unchanged; the cache keeps the keys in the
    reference's order. Returns [B, H, S, d]."""
    batch, size = x.shape[:2]
    key, query = (module.pipelines[role].stages[0].linear for role in ("key", "query"))
    heads, width = module.heads, key.out_features // module.heads
    pairs = torch.arange(key.out_features, device=x.device).view(heads, 2, width // 2).transpose(1, 2).flatten()
    linears, weights = [key, query], [key.weight[pairs], query.weight[pairs]]
    biases = [key.bias[pairs], query.bias[pairs]] if key.bias is not None else None
    value = opening_projection(module.pipelines["value"])
    if value is not None and (value.bias is None) == (biases is None):
        linears.append(value)
        weights.append(value.weight)
        biases = biases + [value.bias] if biases is not None else None
    pieces = F.linear(x, torch.cat(weights), None if biases is None else torch.cat(biases)).split(
        [linear.out_features for linear in linears], dim=-1)
    k, q = (rotate_pairs(piece.reshape(batch, size, heads, width), start, base).transpose(1, 2) for piece in pieces[:2])
    v = run_pipeline(module.pipelines["value"], pieces[2], start, state, read_level, skip=1) if len(pieces) == 3 \
        else run_pipeline(module.pipelines["value"], x, start, state, read_level)
    v = v.reshape(batch, size, heads, -1).transpose(1, 2)
    bias, forget = forget_bias(state, log_forget, first)
    y = causal_attention(q, k, v, first, 1, module.window, bias, _weigh(module))
    in_order = k.unflatten(-1, (width // 2, 2)).transpose(-1, -2).flatten(-2)  # the pairs back to (i, i + d/2)
    _keep_cache(module, state, in_order, v, forget)
    return y


def rotate_pairs(x: Tensor, start: int, base: float) -> Tensor:
    """RoPE on x [B, S, H, d] whose channels are the rotation pairs side by side ((i, i + d/2)
    at 2i, 2i + 1), positions start .. start + S - 1: the reference's `rotate` in that order."""
    half = x.shape[-1] // 2
    frequencies = base ** (-torch.arange(half, dtype=x.dtype, device=x.device) / half)
    angle = (start + torch.arange(x.shape[1], dtype=x.dtype, device=x.device))[:, None, None] * frequencies
    cos, sin = torch.cos(angle), torch.sin(angle)  # [S, 1, d/2]: over heads
    pairs = x.unflatten(-1, (half, 2))
    if x.dtype in (torch.float32, torch.float64):
        if pairs.storage_offset() % 2 or any(stride % 2 for stride in pairs.stride()[:-1]):
            pairs = pairs.contiguous()  # a complex view needs whole pairs at even offsets
        turned = torch.view_as_complex(pairs) * torch.complex(cos, sin)
        return torch.view_as_real(turned).flatten(-2)
    first, second = pairs.unbind(-1)  # no complex type of this dtype (bfloat16 autocast)
    return torch.stack([first * cos - second * sin, first * sin + second * cos], dim=-1).flatten(-2)


def attend_cached(module: CacheLevel, state: LevelState, k: Tensor, v: Tensor, q: Tensor, first: int,
                  stride: int = 1, log_forget: Tensor | None = None) -> Tensor:
    """Append the entries k, v [B, H, N, d] to the cache, then let query t read the cached entries
    up to the new entry `first + stride * t` (-1: only older ones), within the window; the cache
    keeps the last `window` entries. With a forget gate (log_forget [B, H, S], one entry per query:
    stride 1), the logits get the bias of `forget_bias`. Returns [B, H, S, d]."""
    previous = 0 if state.keys is None else state.keys.shape[2]
    keys = k if state.keys is None else torch.cat([state.keys, k], dim=2)
    values = v if state.values is None else torch.cat([state.values, v], dim=2)
    bias, forget = forget_bias(state, log_forget, first)
    y = causal_attention(q, keys, values, previous + first, stride, module.window, bias, _weigh(module))
    _keep_cache(module, state, keys, values, forget)
    return y


def forget_bias(state: LevelState, log_forget: Tensor | None, first: int) -> tuple[Tensor | None, Tensor | None]:
    """The Forgetting Transformer's logit bias for a segment that appends one entry per query:
    entry j's logit for query s gets the sum of the gates' logs after j up to s (up to s - 1 when
    each query reads before its own entry, first = -1); a cached entry's sum up to the segment's
    start is its `forget`. Each sum runs from the query back to the entry (a suffix sum of the
    gates the query has seen), as the reference adds them: a difference of prefix sums would lose
    the near entries' digits to the magnitude of the far ones'. Returns the bias [B, H, S, N] and
    each entry's forget after the segment [B, H, N] (None, None without a gate)."""
    if log_forget is None:
        return None, None
    size = log_forget.shape[-1]
    position = torch.arange(size, device=log_forget.device)

    def since(last: int) -> Tensor:
        # [B, H, S, S + 1]: at (s, u), the sum of the logs of tokens u .. s + last (0 past the end)
        seen = log_forget[..., None, :].masked_fill(position[None, :] > position[:, None] + last, 0.0)
        return F.pad(seen.flip(-1).cumsum(-1).flip(-1), (0, 1))

    reads = since(first)
    bias = reads[..., 1:]  # new entry u: the tokens after u
    after = since(0)[..., -1, :]  # the segment's last token has seen all of it
    forget = after[..., 1:]
    if state.forget is not None:
        bias = torch.cat([state.forget[..., None, :] + reads[..., :1], bias], dim=-1)
        forget = torch.cat([state.forget + after[..., :1], forget], dim=-1)
    return bias, forget


def _keep_cache(module: CacheLevel, state: LevelState, keys: Tensor, values: Tensor,
                forget: Tensor | None = None) -> None:
    """The cache after a call: all its entries, or the last `window`."""
    if module.window:
        keys, values = keys[:, :, -module.window:], values[:, :, -module.window:]
        forget = None if forget is None else forget[:, :, -module.window:]
    state.keys, state.values, state.forget = keys, values, forget


def _weigh(module: CacheLevel):
    """The cache's weighting of scores when it is not softmax (`causal_attention`'s `weigh`)."""
    rule = STATES["cache"]
    return None if rule.weighs_by_softmax(module.state_args) else functools.partial(rule.attention_weights,
                                                                                   module.state_args)


def causal_attention(q: Tensor, keys: Tensor, values: Tensor, newest: int, stride: int, window: int,
                     bias: Tensor | None = None, weigh=None) -> Tensor:
    """softmax(q k^T / sqrt(d) + bias) v per head, where query t [B, H, S, d] reads the entries j
    of keys and values [B, H, N, d] with `newest + stride * t - window < j <= newest + stride * t`
    (window 0: no lower bound), and bias [B, H, S, N] (or None) is added to the logits. A query
    with no entry to read (newest + stride * t < 0) reads zero. `weigh(scores, readable)` (a
    cache's `attention_weights`, such as stick-breaking) weighs the readable entries instead of
    their softmax.

    PyTorch's scaled_dot_product_attention computes softmax attention: its causal kernel where
    query t reads entries 0 .. t (a call from an empty cache) without a bias, otherwise with the
    mask of allowed entries (as -inf logits where a bias is added)."""
    size = q.shape[2]
    empty = min(size, -(newest // stride)) if newest < 0 else 0  # the leading queries with nothing to read
    if empty:
        zeros = q.new_zeros(*q.shape[:2], empty, values.shape[-1])
        if empty == size:
            return zeros
        return torch.cat([zeros, causal_attention(q[:, :, empty:], keys, values, newest + stride * empty, stride,
                                                  window, None if bias is None else bias[:, :, empty:], weigh)],
                         dim=2)
    if weigh is None and bias is None and newest == 0 and stride == 1 and (not window or window >= size) and keys.shape[2] >= size:
        return F.scaled_dot_product_attention(q, keys[:, :, :size], values[:, :, :size], is_causal=True)
    last = (newest + stride * torch.arange(size, device=q.device))[:, None]
    index = torch.arange(keys.shape[2], device=q.device)[None, :]
    allowed = index <= last
    if window:
        allowed &= index > last - window
    if weigh is not None:
        return weigh(q @ keys.transpose(-1, -2) / math.sqrt(q.shape[-1]), allowed) @ values
    mask = allowed if bias is None else bias.masked_fill(~allowed, -math.inf)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)


def run_cache(module: CacheLevel, k: Tensor, v: Tensor, q: Tensor, retain: Tensor | None,
              state: LevelState | None = None, start: int = 0) -> tuple[Tensor, LevelState]:
    """The compiled counterpart of `reference.run_cache` (same arguments and layout): one masked
    softmax per segment of positions start .. start + T - 1 cut as the segment schedule cuts them."""
    state = LevelState() if state is None else state
    first = 0 if module.read == "after" else -1
    outputs = []
    for offset, length in segment_spans(start, k.shape[1], MAX_SEGMENT):
        part = slice(offset, offset + length)
        k_part, v_part, q_part = (x[:, part].transpose(1, 2) for x in (k, v, q))
        forget = None if retain is None else log_retain(retain[:, part].transpose(1, 2))
        outputs.append(attend_cached(module, state, k_part, v_part, q_part, first, log_forget=forget))
    return torch.cat(outputs, dim=2).transpose(1, 2), state

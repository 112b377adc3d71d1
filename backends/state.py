"""The state a model carries across calls, and the one way it is taken apart and rebuilt.

A LevelState's tensors sit in slots, each named by its field and a key: a list field's index
(`weights`, `anchor`, `momentum`), a buffer's name (`buffers`), an optimizer level's name and a
weight's index (`moments`), an omega window entry's
(index, part) (`window`: parts k, v, gamma), or None for a single tensor (`retain_product`,
`keys`, `values`, `forget`, `pending`, `gram`). `slots`, `get_slot` and `set_slot` are the only code that
knows this; everything that flattens a state walks them: the torch.compile and fx segment steps (the
state as a flat list of tensors, `flatten_levels`), state files (`nestc.runtime.checkpoint`),
`ModelState.detach` and the standalone module's initial state (`fx.standalone`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class LevelState:
    """One level instance's state for a batch: all tensors carry a leading batch dimension."""

    weights: list[Tensor] = field(default_factory=list)  # the memory (M, or an MLP's maps)
    anchor: list[Tensor] = field(default_factory=list)  # the state at the end of the previous chunk
    momentum: list[Tensor] = field(default_factory=list)
    # the states of the optimizer levels a level's `update` names: per level, one per weight
    moments: dict[str, list[Tensor]] = field(default_factory=dict)
    window: list[tuple[Tensor, Tensor, Tensor]] = field(default_factory=list)  # omega: recent (k, v, gamma)
    keys: Tensor | None = None  # cache levels
    values: Tensor | None = None
    # cache levels with a retain gate: per entry [B, H, N], the log of the product of the gates
    # of the tokens after it (the bias its attention logits get)
    forget: Tensor | None = None
    pending: Tensor | None = None  # task levels: loss accumulated since the last update
    retain_product: Tensor | None = None  # decay-first: product of retain gates since the anchor
    buffers: dict[str, Tensor] = field(default_factory=dict)  # short-convolution histories
    # optimizer `solve`: H, the decayed lr-weighted sum of k k^T [B, H, dk, dk] (the weight is G)
    gram: Tensor | None = None

    def mapped(self, function) -> LevelState:
        """A new state holding `function(tensor)` in each of this one's slots."""
        copy = LevelState()
        for name, key, tensor in slots(self):
            set_slot(copy, name, key, function(tensor))
        return copy


@dataclass
class ModelState:
    """Everything a model carries across calls: pass it back in to continue a stream."""

    position: int
    levels: list[dict[str, LevelState]]  # per layer, per level name
    last_logits: Tensor | None = None  # the prediction whose target is the next call's first token
    segments: list[dict[str, LevelState]] = field(default_factory=list)  # MAC caches, per layer
    replay: Replay | None = None  # continuum levels at inference: how to rebuild this state's graph

    def detach(self) -> ModelState:
        """A copy cut from the autograd graph (for truncated backpropagation through time); it
        has no replay, since what it dropped is exactly what a replay would rebuild."""
        def cut(level_states: list[dict[str, LevelState]]) -> list[dict[str, LevelState]]:
            return [{name: state.mapped(Tensor.detach) for name, state in states.items()} for states in level_states]

        return ModelState(position=self.position, levels=cut(self.levels),
                          last_logits=None if self.last_logits is None else self.last_logits.detach(),
                          segments=cut(self.segments))


@dataclass
class Replay:
    """A continuum level's unfinished chunk is an autograd graph: its pending loss, the last
    prediction (whose target is the next token) and every state computed from the chunk's fast
    weights, which the chunk-end gradient runs back through. No file can hold a graph, so a
    state file holds this instead: a state with no graph in it, from which the model, reading
    `calls` (the token tensors of each call since, [batch, time], in order), rebuilds the
    current state exactly. The models keep it at inference, starting it afresh where every
    continuum level has just stepped and the graph is cut (at most the levels' common cycle of
    tokens back)."""

    start: ModelState
    calls: list[Tensor]


def holds_graph(state: ModelState) -> bool:
    """Whether any of the state's tensors came out of an autograd graph (a leaf that merely
    requires grad, as a continuum level's fast weights at inference, is no graph)."""
    tensors = [t for states in (*state.levels, *state.segments) for s in states.values() for _, _, t in slots(s)]
    return any(t.grad_fn is not None for t in [*tensors, state.last_logits] if t is not None)


LIST_FIELDS = ("weights", "anchor", "momentum")  # a slot per list index
# What a compiled segment step carries in and out: fixed tensors. (An omega window is a list
# that grows; a pending loss is a graph.)
STEP_FIELDS = (*LIST_FIELDS, "moments", "retain_product", "keys", "values", "forget", "buffers", "gram")
# What a state file keeps: the pending loss of an unfinished chunk is a graph, not a value (a
# file rebuilds it by a `Replay`).
SAVED_FIELDS = (*STEP_FIELDS, "window")
ALL_FIELDS = (*SAVED_FIELDS, "pending")


def slots(level_state: LevelState, fields: tuple[str, ...] = ALL_FIELDS):
    """(field, key, tensor) for every tensor of `level_state` in `fields`, in a fixed order."""
    for name in fields:
        value = getattr(level_state, name)
        if name == "buffers":
            for buffer in sorted(value):
                yield name, buffer, value[buffer]
        elif name == "window":
            for index, entry in enumerate(value):
                for part, tensor in enumerate(entry):
                    yield name, (index, part), tensor
        elif name == "moments":
            for level in sorted(value):
                for index, tensor in enumerate(value[level]):
                    yield name, (level, index), tensor
        elif name in LIST_FIELDS:
            for index, tensor in enumerate(value):
                yield name, index, tensor
        elif value is not None:
            yield name, None, value


def get_slot(level_state: LevelState, name: str, key) -> Tensor:
    value = getattr(level_state, name)
    if name in ("window", "moments"):
        first, second = key
        return value[first][second]
    return value if key is None else value[key]


def set_slot(level_state: LevelState, name: str, key, tensor: Tensor) -> None:
    """Store `tensor` in a slot; the slots of a list field (and a window) arrive in `slots`' order."""
    if key is None:
        setattr(level_state, name, tensor)
    elif name == "buffers":
        level_state.buffers[key] = tensor
    elif name == "window":
        index, part = key
        if part == 0:
            level_state.window.append((tensor,))
        else:
            level_state.window[index] += (tensor,)
    elif name == "moments":
        level_state.moments.setdefault(key[0], []).append(tensor)
    else:
        getattr(level_state, name).append(tensor)


def flatten_levels(levels: list[dict[str, LevelState]], fields: tuple[str, ...] = STEP_FIELDS) \
        -> tuple[tuple, list[Tensor]]:
    """The levels' tensors, and where each belongs: (layer, level, field, key) per tensor."""
    layout, tensors = [], []
    for layer_index, level_states in enumerate(levels):
        for level_name, level_state in level_states.items():
            for name, key, tensor in slots(level_state, fields):
                layout.append((layer_index, level_name, name, key))
                tensors.append(tensor)
    return tuple(layout), tensors


def unflatten_levels(levels: list[dict[str, LevelState]], layout: tuple, tensors: list[Tensor]) -> None:
    """The inverse of `flatten_levels`: put each tensor where `layout` says, the lists it names
    rebuilt anew (so the state it wrote into keeps no list of the caller's)."""
    for layer_index, level_name, name, _ in layout:
        if name in LIST_FIELDS or name == "window":
            setattr(levels[layer_index][level_name], name, [])
        elif name == "moments":
            levels[layer_index][level_name].moments = {}
    for (layer_index, level_name, name, key), tensor in zip(layout, tensors):
        set_slot(levels[layer_index][level_name], name, key, tensor)


def tensors_at(levels: list[dict[str, LevelState]], layout: tuple) -> list[Tensor]:
    """The tensors at `layout`'s places, in its order (after a step has advanced the state)."""
    return [get_slot(levels[layer_index][level_name], name, key) for layer_index, level_name, name, key in layout]

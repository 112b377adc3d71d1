"""Files without pickle: trees of tensors (a trainer's state), a run's self-contained spec, and
memory states on disk (run directories themselves are nestc/runtime/rundir.py).

A run directory's `spec.nest` is self-contained (imported definitions inlined, so it loads
wherever the directory goes). A state file holds every level's state
(memories, anchors, momenta, caches, continuum fast weights, the stream position) in one
safetensors file, so what a model learned while reading persists across invocations; in the
middle of a continuum level's chunk, the state to replay from and the tokens since (`Replay`).
"""

from __future__ import annotations

import json
import os

import torch

from nestc.backends.state import SAVED_FIELDS, LevelState, ModelState, holds_graph, set_slot, slots
from nestc.lang import ast, formatter
from nestc.lang.sema import Result


class CheckpointError(Exception):
    """A checkpoint or state file that is missing, corrupt or does not fit the model."""


# --- trees of tensors without pickle -------------------------------------------------------------


def encode_tree(value, prefix: str, tensors: dict):
    """`value` (nested dicts, lists, tuples, numbers, strings, None and tensors) as JSON, its
    tensors moved into `tensors` under keys below `prefix`: what safetensors holds instead of a
    pickle, which could run code when loaded."""
    if isinstance(value, torch.Tensor):
        tensors[prefix] = value.detach().clone().contiguous()
        return {"tensor": prefix}
    if isinstance(value, dict):
        return {"dict": [[encode_tree(key, f"{prefix}.key{index}", tensors),
                          encode_tree(item, f"{prefix}.{index}", tensors)]
                         for index, (key, item) in enumerate(value.items())]}
    if isinstance(value, (list, tuple)):
        kind = "tuple" if isinstance(value, tuple) else "list"
        return {kind: [encode_tree(item, f"{prefix}.{index}", tensors) for index, item in enumerate(value)]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    raise TypeError(f"cannot save a {type(value).__name__} at `{prefix}`")


def decode_tree(encoded, tensors: dict):
    """The value that `encode_tree` encoded; CheckpointError where the encoding is malformed."""
    if not isinstance(encoded, dict) or len(encoded) != 1:
        raise CheckpointError(f"a malformed entry {str(encoded)[:80]!r}")
    ((kind, body),) = encoded.items()
    if kind == "tensor":
        if body not in tensors:
            raise CheckpointError(f"no tensor `{body}`")
        return tensors[body]
    if kind == "value" and (body is None or isinstance(body, (bool, int, float, str))):
        return body
    if kind in ("list", "tuple") and isinstance(body, list):
        items = [decode_tree(item, tensors) for item in body]
        return tuple(items) if kind == "tuple" else items
    if kind == "dict" and isinstance(body, list) and all(isinstance(p, list) and len(p) == 2 for p in body):
        return {decode_tree(key, tensors): decode_tree(item, tensors) for key, item in body}
    raise CheckpointError(f"a malformed entry {str(encoded)[:80]!r}")


def save_tree(value, path: str, metadata_key: str) -> None:
    """Write `value` as one safetensors file (its structure as JSON in the metadata), atomically."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    structure = encode_tree(value, "tree", tensors)
    temporary = path + ".tmp"
    save_file(tensors, temporary, metadata={metadata_key: json.dumps(structure)})
    os.replace(temporary, path)


def load_tree(path: str, metadata_key: str, what: str):
    """Read a file written by `save_tree`; CheckpointError, saying what and where, on anything else."""
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(path):
        raise CheckpointError(f"no {what} `{path}`")
    try:
        with safe_open(path, framework="pt") as handle:
            structure = json.loads((handle.metadata() or {}).get(metadata_key, "null"))
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, RecursionError) as error:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"`{path}` is not a {what} ({type(error).__name__}: {error})") from None
    if structure is None:
        raise CheckpointError(f"`{path}` is not a {what}")
    try:
        return decode_tree(structure, tensors)
    except RecursionError:
        raise CheckpointError(f"`{path}` is a corrupt {what}: nested too deeply") from None
    except CheckpointError as error:
        raise CheckpointError(f"`{path}` is a corrupt {what}: {error}") from None


def bundle(result: Result) -> str:
    """The checked spec as one file: imported levels, blocks and constants first, then the spec
    itself without its imports."""
    main = result.modules[result.program.file]
    parts = []
    for name, module in result.modules.items():
        if name == main.file:
            continue
        items = tuple(i for i in module.items if not isinstance(i, (ast.Import, ast.Section)))
        parts.append(f"# from {name}\n" + formatter.format_module(ast.Module(file=name, items=items)))
    text = result.sources.get(main.file).text
    lines = text.split("\n")
    for item in main.items:
        if isinstance(item, ast.Import):
            for line in range(item.span.line - 1, item.span.end_line):
                lines[line] = ""
    return "\n".join(parts + ["\n".join(lines)])


# --- states ------------------------------------------------------------------------------------


# A state file's metadata describes each level's saved fields (`state.SAVED_FIELDS`) by their
# slots: "tensor" for a single tensor, the length of a list or window, the names of the buffers.
# Each slot's tensor is stored under `_tensor_name`.


def _tensor_name(prefix: str, name: str, key) -> str:
    if key is None:
        return f"{prefix}.{name}"
    if name == "window":
        index, part = key
        return f"{prefix}.{name}.{index}.{'kvg'[part]}"
    if name == "moments":
        level, index = key
        return f"{prefix}.{name}.{level}.{index}"
    return f"{prefix}.{name}.{key}"


def _flatten(level_state: LevelState, prefix: str, tensors: dict) -> dict:
    """One LevelState's tensors under `prefix`; returns the description needed to rebuild it."""
    fields = {}
    for name, key, tensor in slots(level_state, SAVED_FIELDS):
        tensors[_tensor_name(prefix, name, key)] = tensor.detach().clone().contiguous()
        if key is None:
            fields[name] = "tensor"
        elif name == "buffers":
            fields.setdefault(name, []).append(key)
        elif name == "moments":
            fields.setdefault(name, {})[key[0]] = key[1] + 1
        else:
            fields[name] = (key[0] if name == "window" else key) + 1
    return fields


def _slot_keys(name: str, shape) -> list:
    """The slots that a field's description in a state file names."""
    if shape == "tensor":
        return [None]
    if name == "buffers":
        return list(shape)
    if name == "window":
        return [(index, part) for index in range(shape) for part in range(3)]
    if name == "moments":
        if not isinstance(shape, dict):
            raise ValueError("`moments` is not a table of optimizer levels")
        return [(level, index) for level, count in shape.items() for index in range(count)]
    return list(range(shape))


def _unflatten(fields: dict, prefix: str, tensors: dict) -> LevelState:
    level_state = LevelState()
    for name, shape in fields.items():
        if name not in SAVED_FIELDS:
            raise ValueError(f"`{prefix}` has no field `{name}`")
        for key in _slot_keys(name, shape):
            set_slot(level_state, name, key, tensors[_tensor_name(prefix, name, key)])
    return level_state


def save_state(state, path: str) -> None:
    """Write a ModelState atomically: what it holds besides autograd graphs, or, where it holds
    an unfinished continuum chunk's graph, its `Replay` (the start state and the token calls
    since), which `load_state` reads again to rebuild the graph exactly."""
    from safetensors.torch import save_file

    replay = state.replay
    if replay is None and holds_graph(state):
        pending = [name for levels in state.levels for name, s in levels.items()
                   if s.pending is not None and s.pending.grad_fn is not None]
        what = f"the unfinished chunk of continuum level `{pending[0]}`" if pending else "an autograd graph"
        raise CheckpointError(f"the state at position {state.position} holds {what}, read with gradients on: "
                              "a file cannot hold that graph; read under torch.no_grad() (as `nestc memorize` "
                              "does) to save a state that rebuilds it")
    saved = state if replay is None else replay.start
    tensors: dict[str, torch.Tensor] = {}
    layout = {
        "position": saved.position,
        "levels": [{name: _flatten(s, f"levels.{i}.{name}", tensors) for name, s in levels.items()}
                   for i, levels in enumerate(saved.levels)],
        "segments": [{name: _flatten(s, f"segments.{i}.{name}", tensors) for name, s in segment.items()}
                     for i, segment in enumerate(saved.segments)],
    }
    if saved.last_logits is not None:
        tensors["last_logits"] = saved.last_logits.detach().clone().contiguous()
    if replay is not None and replay.calls:
        layout["replay"] = {"calls": len(replay.calls), "position": state.position}
        for index, call in enumerate(replay.calls):
            tensors[f"replay.{index}"] = call.detach().cpu().contiguous()
    temporary = path + ".tmp"
    save_file(tensors, temporary, metadata={"nestc_state": json.dumps(layout)})
    os.replace(temporary, path)


def load_state(path: str, model):
    """Read a state file written by `save_state` for this model (reading its replayed calls)."""
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(path):
        raise CheckpointError(f"no state file `{path}`")
    try:
        with safe_open(path, framework="pt") as handle:
            layout = json.loads((handle.metadata() or {}).get("nestc_state", "null"))
            # Copied into memory of their own: the file's tensors sit at 8-byte offsets, and
            # matrix products there may round in another order than over fresh allocations.
            tensors = {key: handle.get_tensor(key).clone() for key in handle.keys()}
    except (SafetensorError, OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"`{path}` is not a state file ({error})") from None
    if not layout or len(layout["levels"]) != len(model.layers):
        raise CheckpointError(f"`{path}` does not hold a state of this model")
    for layer_layout, module in zip(layout["levels"], model.layers):
        if set(layer_layout) != set(module.levels):
            raise CheckpointError(f"`{path}` holds the levels {sorted(layer_layout)}, the model has "
                                  f"{sorted(module.levels)}")
    try:
        levels = [{name: _unflatten(fields, f"levels.{i}.{name}", tensors) for name, fields in layer.items()}
                  for i, layer in enumerate(layout["levels"])]
        segments = [{name: _unflatten(fields, f"segments.{i}.{name}", tensors) for name, fields in segment.items()}
                    for i, segment in enumerate(layout["segments"])]
    except KeyError as missing:
        raise CheckpointError(f"`{path}` is incomplete: no tensor {missing}") from None
    except ValueError as error:
        raise CheckpointError(f"`{path}` is corrupt: {error}") from None
    state = ModelState(position=layout["position"], levels=levels, last_logits=tensors.get("last_logits"),
                       segments=segments)
    return _replay(state, layout.get("replay"), tensors, path, model) if "replay" in layout else state


def _replay(state, replay: dict, tensors: dict, path: str, model):
    """The state after reading a file's replayed calls from its start state (`Replay`)."""
    try:
        calls = [tensors[f"replay.{index}"] for index in range(replay["calls"])]
        end = replay["position"]
    except (KeyError, TypeError) as error:
        raise CheckpointError(f"`{path}` is corrupt: a malformed replay ({type(error).__name__}: {error})") from None
    batch = next((t.shape[0] for states in state.levels for s in states.values() for _, _, t in slots(s)), None)
    for call in calls:
        shaped = call.dtype == torch.long and call.dim() == 2 and call.shape[1] > 0 and batch in (None, call.shape[0])
        if not shaped or not 0 <= int(call.min()) <= int(call.max()) < model.vocab:
            raise CheckpointError(f"`{path}` is corrupt: a replayed call is not [batch {batch}, time] token ids "
                                  f"below the vocab ({model.vocab})")
    if state.position + sum(call.shape[1] for call in calls) != end:
        raise CheckpointError(f"`{path}` is corrupt: its replay does not reach position {end}")
    device = model.embedding.weight.device
    with torch.no_grad():
        for call in calls:
            _, state = model(call.to(device), state)
    return state

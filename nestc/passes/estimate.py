"""Estimating: how many parameters a program's model has and how much memory it needs, from the
IR alone, before anything is built. A spec can ask for a billion layers and still check; building
it would allocate for minutes and then fail, so the model is refused here instead, with the
numbers.

The parameter count is exact: it follows the modules the backends build (backends/reference.py
and backends/pipelines.py; the compiled backend builds the same ones), and the rules' own
`weight_shapes` give each memory's maps. The memory figures are estimates, float32 throughout:

- parameters: 4 bytes each; training also keeps their gradients and the outer optimizer's moments
  (adamw and muon two, m3 three, sgd one), so (2 + moments) copies;
- memory state, per sequence: each updated memory's maps (its anchor copy and momentum buffer
  where it has them), each continuum level's maps, each attention cache's keys and values for a
  training context (or its window), in every layer;
- activations of one training step: batch x context x (layers x the elements one layer keeps per
  token for the backward pass, plus the logits and their gradient, 2 x vocab). Per token, a level
  keeps ACTIVATION_WIDTHS vectors of width dim (inputs, k, v, q, gates, outputs and their
  intermediates), twice an MLP state's hidden widths, a memory's state-sized gradient terms (once
  per token; a continuum level's once per chunk), attention's scores and softmax over its keys
  (3 x heads x keys); each norm keeps one vector of width dim.

Measured against the peak memory of one forward and backward of the compiled backend (specs/
transformer, titans, hope, deltanet, cms at batch 2 and 16), the activations come within a factor
of two; treat them as the order of magnitude, not a bound.

Torch-free (the CUDA device's size is asked of torch only when the model is for CUDA)."""

from __future__ import annotations

import dataclasses
import math
import os
from collections import Counter
from dataclasses import dataclass

from nestc import rules
from nestc.backends.common import BackendError, concrete, op_args
from nestc.lang import ir
from nestc.lang.queries import GATE_ROLES, block_levels, gate_side, reachable_levels, step_copies
from nestc.lang.schema import FEATURE_WIDTHS
from nestc.passes.optimizers import outer_buffers, stored_levels

FLOAT_BYTES = 4
ACTIVATION_WIDTHS = 16  # vectors of width dim a level keeps per token for backward (see above)
OUTER_MOMENTS = {"adamw": 2, "muon": 2, "m3": 3, "sgd": 1, "gd": 0}  # gd: and its update's buffers (outer_buffers)
INITS_WITH_PARAMETERS = ("meta", "nested", "pretrained")  # the others start from zeros, no parameters


class ModelTooLarge(BackendError):
    """The model's estimated memory exceeds what this machine has: it is not built."""


@dataclass(frozen=True)
class Estimate:
    parameters: int  # exact
    layer_parameters: tuple[int, ...]  # the distinct parameter counts of the layers, smallest first
    state_bytes: int  # per sequence
    activation_bytes: int  # one training step, the whole batch
    batch: int
    outer_moments: int

    @property
    def parameter_bytes(self) -> int:
        return self.parameters * FLOAT_BYTES

    @property
    def building_bytes(self) -> int:
        """What building the model and reading one sequence with it needs."""
        return self.parameter_bytes + self.state_bytes

    @property
    def training_bytes(self) -> int:
        """Parameters, gradients and moments, the batch's states and one step's activations."""
        return (self.parameter_bytes * (2 + self.outer_moments) + self.state_bytes * self.batch
                + self.activation_bytes)

    @property
    def _per_layer(self) -> str:
        smallest, largest = self.layer_parameters[0], self.layer_parameters[-1]
        return f"{smallest:,}" if smallest == largest else f"{smallest:,} to {largest:,}"

    def __str__(self) -> str:
        return "\n".join([
            f"parameters   {self.parameters:,} ({self._per_layer} per layer): "
            f"{format_bytes(self.parameter_bytes)}",
            f"state        {format_bytes(self.state_bytes)} per sequence (estimate)",
            f"activations  {format_bytes(self.activation_bytes)} per training step of {self.batch} sequences "
            "(estimate)",
            f"training     {format_bytes(self.training_bytes)} in all, with gradients and "
            f"{self.outer_moments} optimizer moment{'s' if self.outer_moments != 1 else ''} (estimate)",
        ])


def estimate(program: ir.Program) -> Estimate:
    """The estimate for a checked program whose model has fixed values; a search value in the
    train section counts at its largest (the estimate of the largest variant)."""
    if program.model is None:
        raise BackendError(f"{program.file} has no `model` section: it is a library of levels")
    model = program.model
    vocab, dim = model.vocab, concrete(model.dim)
    heads = concrete(model.heads)
    context, batch = _largest(program.train.context), _largest(program.train.batch)
    levels = {level.name: level for level in program.levels}
    # one tally per distinct layer block, counted as often as layers repeat it
    repeats = Counter(model.pattern) if model.pattern is not None else Counter({model.block: concrete(model.layers)})
    tallies = {}
    for block in repeats:
        tally = tallies[block] = _LayerTally()
        read = block_levels(block)
        reached = reachable_levels(levels, read)
        for level in program.levels:
            if level.name in reached:
                tally.add_level(level, dim, heads, level.name in read, context)
        for _, node in ir.walk_blocks(block):
            tally.add_block(node, dim)
    def total(measure) -> int:
        return sum(count * measure(tallies[block]) for block, count in repeats.items())

    outside = vocab * dim + (dim if concrete(model.norm) != "none" else 0)
    outside += 0 if concrete(model.tie_embeddings) else dim * vocab
    activations = batch * context * (total(lambda tally: tally.per_token) + 2 * vocab)
    return Estimate(parameters=outside + total(lambda tally: tally.parameters),
                    layer_parameters=tuple(sorted({tally.parameters for tally in tallies.values()})),
                    state_bytes=FLOAT_BYTES * total(lambda tally: tally.state), activation_bytes=FLOAT_BYTES * activations,
                    batch=batch, outer_moments=max(OUTER_MOMENTS[option.name]
                                                   for option in _options(program.train.optimizer))
                    + outer_buffers(program.train))


class _LayerTally:
    """One layer's parameters, state and activations, level by level and block by block."""

    def __init__(self):
        self.parameters = 0
        self.state = 0  # elements per sequence
        self.per_token = 0  # activation elements a training step keeps per token

    def add_level(self, level: ir.Level, dim: int, model_heads: int, readable: bool, context: int) -> None:
        state_rule = rules.STATES[level.state.name]
        state_args = op_args(level.state)
        every = concrete(level.every.tokens)
        self.per_token += ACTIVATION_WIDTHS * dim
        if not state_rule.memory:  # attention: key, value and query pipelines, an output map, a cache
            heads = concrete(level.heads) or model_heads
            widths = {role: self._pipeline(getattr(level, role), dim, dim, heads) for role in ("key", "value", "query")}
            self._gate(level.retain, dim, heads, widths["key"] // heads)
            self._read_out(level, dim, heads, widths["value"] // heads)
            keys = min(state_args.get("window") or context, context)
            self.state += keys * (widths["key"] + widths["value"])
            self.per_token += 3 * heads * keys
            return
        if level.key is None:  # feed-forward or continuum: y = M(x) on the full width, maps always learned
            shapes = state_rule.weight_shapes(state_args, 1, dim, dim)
            maps = _elements(shapes)
            self.parameters += maps
            self.parameters += sum(1 for role in ("lr", "retain", "momentum") if _is_learned(getattr(level, role)))
            self.per_token += 2 * _hidden(shapes)
            if every:
                self.state += maps * self._copies(level, anchor=False)
                self.per_token += maps // every
            return
        heads = concrete(level.heads) or model_heads
        roles = ("key", "value", "query") if readable else ("key", "value")
        copies = {role: concrete(step_copies(level, role)) for role in (*roles, *GATE_ROLES)}  # `substeps`
        widths = {role: self._source(getattr(level, role), dim, dim * copies[role], heads) for role in roles}
        key_dim, value_dim = widths["key"] // (heads * copies["key"]), widths["value"] // (heads * copies["value"])
        channels = {"key": key_dim, "value": value_dim}
        if level.write_key is not None:  # the delta rule's write key: a pipeline of d_k per head
            self._pipeline(level.write_key, dim, dim, heads)
        for role in GATE_ROLES:
            self._gate(getattr(level, role), dim, heads * copies[role], channels[gate_side(role)])
        for _, value in level.lets:  # a binding: one value per head (or per key channel) and token
            self._gate(value, dim, heads, key_dim)
        # a normalised memory stores its normaliser as one more value row
        shapes = state_rule.weight_shapes(state_args, heads, key_dim, value_dim + bool(concrete(level.normalize)))
        optimizer_maps = 0  # a memory of rows among them: its maps for each served weight, of its width
        for moment in level.update.levels if level.update is not None else ():  # optimizer levels' gates
            for gate in (moment.lr, moment.retain):
                self._gate(gate, dim, heads, key_dim)
            moment_rule = rules.STATES[moment.state.name]
            if not moment_rule.optimizer_state:
                maps_of = _elements([shape for served in shapes for shape in moment_rule.weight_shapes(
                    op_args(moment.state), served[0], served[-1], served[-1])])
                optimizer_maps += maps_of
                self.parameters += maps_of if moment.init.name in INITS_WITH_PARAMETERS else 0
        maps = _elements(shapes)
        self.per_token += 2 * _hidden(shapes)
        if level.init.name in INITS_WITH_PARAMETERS:
            self.parameters += maps
        if readable:
            self._read_out(level, dim, heads, value_dim)
        if every:
            self.state += maps * self._copies(level, anchor=True)
            self.per_token += maps
            if level.update is not None:  # each buffer that keeps its past, one per weight; memories' maps
                buffers = [name for name in stored_levels(level.update)
                           if rules.STATES[level.update.level(name).state.name].optimizer_state]
                self.state += maps * len(buffers) + optimizer_maps
            if rules.OBJECTIVES[level.objective.name].windowed:
                self.state += op_args(level.objective)["window"] * heads * (key_dim + value_dim + key_dim)
            if rules.OPTIMIZERS[level.optimizer.name].solves:  # H, keys by keys, beside G (the maps)
                self.state += heads * key_dim * key_dim

    @staticmethod
    def _copies(level: ir.Level, anchor: bool) -> int:
        """The maps themselves, the anchor they were at when the chunk began, a momentum buffer."""
        momentum = rules.OPTIMIZERS[level.optimizer.name].keeps_momentum
        return 1 + (1 if anchor and concrete(level.every.tokens) > 1 else 0) + (1 if momentum else 0)

    def _read_out(self, level: ir.Level, dim: int, heads: int, value_dim: int) -> None:
        """The output projection of the heads' read-out, with the output norm's gain and the
        output gate's pipeline where the level has them."""
        self.parameters += heads * value_dim * dim
        if level.output_norm not in (None, "none"):
            self.parameters += value_dim
        if level.output_gate is not None:
            self._pipeline(level.output_gate, dim, heads * value_dim, heads)

    def _gate(self, gate, dim: int, heads: int, head_dim: int) -> None:
        if gate is None or isinstance(gate, (ir.Constant, ir.LetRef)):  # a binding is counted once, where bound
            return
        if isinstance(gate, ir.GateExpr):
            for operand in gate.operands:
                self._gate(operand, dim, heads, head_dim)
            return
        if _is_learned(gate):
            self.parameters += heads if op_args(gate)["per"] == "head" else heads * head_dim
        elif isinstance(gate, ir.Pipeline):
            per_channel = any(isinstance(s, ir.Op) and s.name == "proj" and op_args(s)["per"] == "channel"
                              for s in gate.stages)
            self._pipeline(gate, dim, heads * head_dim if per_channel else heads, heads)

    def _source(self, source, width: int, final_width: int, heads: int) -> int:
        """A key, value or query: a pipeline, or gate arithmetic with the level's width per head
        (backends/reference.py `MemoryLevel.sources`); returns its width."""
        if isinstance(source, ir.Pipeline):
            return self._pipeline(source, width, final_width, heads)
        self._gate(source, width, heads, width // heads)
        return width  # the checker makes the heads divide the width

    def _pipeline(self, pipeline: ir.Pipeline, width: int, final_width: int, heads: int) -> int:
        """Count a pipeline's parameters (as backends/pipelines.py builds it); returns its width."""
        projections = [i for i, s in enumerate(pipeline.stages) if isinstance(s, ir.Op) and s.name == "proj"]
        current = width
        for index, stage in enumerate(pipeline.stages):
            if isinstance(stage, ir.LevelRef):  # another level's read-out keeps the width
                continue
            args = op_args(stage)
            if stage.name == "proj":
                out = args["dim"] or (final_width if index == projections[-1] else width)
                self.parameters += current * out + (out if args["bias"] is not False else 0)
                current = out
            elif stage.name == "conv":
                self.parameters += current * args["window"]
            elif stage.name == "poly":
                self.parameters += args["degree"] + 1
            elif stage.name in FEATURE_WIDTHS:  # widens each head's channels
                current = heads * FEATURE_WIDTHS[stage.name](current // heads, args)
        return current

    def add_block(self, block: ir.Block, dim: int) -> None:
        """A block node's own parameters (the norms, weights and persistent tokens of the model's block)."""
        if (isinstance(block, ir.Norm) and block.kind != "identity") or isinstance(block, ir.Gated):
            self.parameters += dim
            self.per_token += dim
        elif isinstance(block, ir.Parallel) and concrete(block.combine) == "learned":
            self.parameters += len(block.branches)
        elif isinstance(block, ir.MemoryAsContext):
            self.parameters += concrete(block.persistent) * dim


def _options(value) -> tuple:
    return value.options if isinstance(value, ir.Choice) else (value,)


def _largest(value) -> int:
    """A fixed size, or the largest a search value may give."""
    if isinstance(value, (ir.Range, ir.LogUniform)):
        return int(value.high)
    return max(_options(value))


def _is_learned(gate) -> bool:
    return isinstance(gate, ir.Op) and gate.name == "learned"


def _elements(shapes) -> int:
    return sum(math.prod(shape) for shape in shapes)


def _hidden(shapes) -> int:
    """The hidden widths of a stack of maps [heads, out, in]: every map's output but the last's."""
    return sum(math.prod(shape[:-1]) for shape in shapes[:-1])


# --- what the machine has ----------------------------------------------------------------------------

def available_memory(device: str = "cpu") -> tuple[int, str] | None:
    """The memory a model on `device` can use and how to name it: the device's own memory for
    CUDA, else the machine's physical RAM. None where it cannot be known."""
    if device.startswith("cuda"):
        import torch

        index = torch.device(device).index
        properties = torch.cuda.get_device_properties(torch.cuda.current_device() if index is None else index)
        return properties.total_memory, f"{properties.name} has {format_bytes(properties.total_memory)}"
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")  # Linux and macOS
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows) or no such name: no check
        return None
    return total, f"this machine has {format_bytes(total)} of memory"


def require_fits(program: ir.Program, training: bool, device: str = "cpu",
                 available: tuple[int, str] | None = None) -> Estimate:
    """The program's estimate; raises ModelTooLarge, with the numbers and the values that would
    fit, when what it needs (to train, or to build and read) exceeds the memory `device` has."""
    found = estimate(program)
    available = available or available_memory(device)
    if available is None or _needed(found, training) <= available[0]:
        return found
    raise ModelTooLarge(_refusal(program, found, training, available))


def _needed(found: Estimate, training: bool) -> int:
    return found.training_bytes if training else found.building_bytes


# The sizes a refusal may suggest lowering, each with its least value.
SIZE_FIELDS = (("model", "layers", 1), ("model", "dim", 1), ("train", "batch", 1), ("train", "context", 2))


def _refusal(program: ir.Program, found: Estimate, training: bool, available: tuple[int, str]) -> str:
    parts = [f"{found.parameters:,} parameters ({format_bytes(found.parameter_bytes)})",
             f"{format_bytes(found.state_bytes)} of memory state per sequence"]
    if training:
        parts.append(f"{format_bytes(found.activation_bytes)} of activations per step")
    fixes = []
    for section, name, least in SIZE_FIELDS:
        value = getattr(getattr(program, section), name)
        if not isinstance(value, int):  # a search value: the sweep chooses it
            continue
        if name == "layers" and program.model.pattern is not None:  # the list gives each layer: shorten it
            continue
        largest = _largest_fitting(program, section, name, least, training, available[0])
        if largest is not None:
            fixes.append(f"{section}.{name} ({value}) to at most {largest}")
    fix = ("lower " + ", or ".join(fixes) if fixes else
           "no single size fits alone: lower several of " + ", ".join(f"{s}.{n}" for s, n, _ in SIZE_FIELDS))
    return (f"{program.file}: the model needs about {format_bytes(_needed(found, training))} "
            f"{'to train' if training else 'to build'} ({', '.join(parts)}; estimated before building), "
            f"but {available[1]}; {fix}")


def _largest_fitting(program: ir.Program, section: str, name: str, least: int, training: bool,
                     available: int) -> int | None:
    """The largest value of one size below its current one with which the model fits, other
    sizes unchanged (by bisection: the estimate grows with each size); None if even `least` does not."""
    def fits(value: int) -> bool:
        changed = dataclasses.replace(getattr(program, section), **{name: value})
        return _needed(estimate(dataclasses.replace(program, **{section: changed})), training) <= available

    low, high = least, getattr(getattr(program, section), name)  # high does not fit
    if high <= low or not fits(low):
        return None
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def format_bytes(count: int) -> str:
    """Binary units, three significant digits: 3.1 PiB, 24 GiB, 512 B. In integers, so that a
    count past any float (a spec may ask for 10^400 layers) is still written out."""
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB", "ZiB", "YiB")
    index = 0
    while index < len(units) - 1 and count >= 1024 ** (index + 1):
        index += 1
    if index == 0:
        return f"{count} B"
    whole = count // 1024 ** index
    return f"{whole:,} {units[index]}" if whole >= 1000 else f"{count / 1024 ** index:.3g} {units[index]}"

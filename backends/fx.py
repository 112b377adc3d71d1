"""The compiled backend's segment step as a torch.fx graph, rewritten by passes, and emitted as
standalone Python.

`trace_segment` traces `CompiledModel._segment_from_tensors` (embedding, every layer's levels on
one segment, logits; the whole state in and out as tensors) at one batch size and segment length,
or with both symbolic (`symbolic=True`: one graph for every batch size and every segment length up
to the model's), into an `fx.GraphModule` of ATen operations whose inputs are the parameters, the
segment's tokens, its position and the state. Each node made while a level ran carries that level's name and its
definition's `file:line` (`node.meta["nest_level"]`, `["nest_source"]`), printed as a comment with
the spec's line above the operations it made, so any op of the generated code leads back to it.

Passes are graph rewrites, each switchable (`--passes`) and inspectable (`--print-after`):
- `drop_dead`: remove nodes whose values nothing uses (a level's output no one reads);
- `fold_constants`: evaluate at compile time what depends on no input, or only on input shapes:
  causal masks, constant gates (`lr = 1e-3` becomes a stored tensor, not a `full` per segment);
- `fuse_projections`: the projections that read the same tensor (a level's key, value, query
  and gate projections) become one matmul on the concatenated weights, and a split.
"""

from __future__ import annotations

import contextlib
import inspect
import linecache
import operator
import os
import pprint
import re
import string
import textwrap
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.fx.traceback as fx_traceback
from torch import Tensor, nn
from torch.fx.experimental.proxy_tensor import make_fx

from nestc.backends.common import BackendError
from nestc.backends.state import flatten_levels
from nestc.backends.updates import continuum_gradients, continuum_step

aten = torch.ops.aten

# Ops whose value depends only on their inputs' shapes and dtypes, which a traced graph fixes.
# (Not `empty_like`: its contents are whatever the op that fills it writes, at run time.)
SHAPE_ONLY = {aten.ones_like.default, aten.zeros_like.default, aten.full_like.default, aten.new_ones.default,
              aten.new_zeros.default, aten.new_full.default, aten.sym_size.int}
RANDOM = {aten.rand.default, aten.randn.default, aten.randint.default, aten.rand_like.default,
          aten.randn_like.default, aten.bernoulli.default, aten.dropout.default, aten.native_dropout.default}
FOLD_LIMIT = 1 << 20  # elements: a folded constant is stored with the graph, so keep it small


def level_provenance(name: str, span):
    """A context that tags the nodes traced inside it with a level and its definition's place.
    Free outside tracing, where node metadata is not being preserved."""
    if not fx_traceback.has_preserved_node_meta():
        return contextlib.nullcontext()
    where = f"{span.file}:{span.line}" if span is not None else "?"
    return fx_traceback.annotate({"nest_level": name, "nest_source": where})


class _Step(nn.Module):
    """The segment step with the model as a submodule, so functional_call can swap its parameters."""

    def __init__(self, model, layout: tuple):
        super().__init__()
        self.model, self.layout = model, layout

    def forward(self, chunk: Tensor, position: Tensor, tensors: list[Tensor]):
        return self.model._segment_from_tensors(self.layout, chunk, position, tensors)


@dataclass
class SegmentGraph:
    """A traced segment step: call it as `graph(params, chunk, position, state_tensors)`."""
    module: fx.GraphModule
    layout: tuple  # where each state tensor belongs (the compiled backend's state layout)
    batch: int | None  # None: symbolic, any batch size
    length: int | None  # None: symbolic, any segment length up to the model's segment
    applied: list[str] = field(default_factory=list)  # passes run so far, in order

    def __call__(self, params, chunk, position, tensors):
        return self.module(params, chunk, position, tensors)

    def op_count(self, *targets) -> int:
        return sum(1 for n in self.module.graph.nodes if n.op == "call_function" and (not targets or n.target in targets))


def trace_segment(model, batch: int, length: int, symbolic: bool = False) -> SegmentGraph:
    """Trace `model`'s segment step for `batch` sequences and segments of `length` tokens; with
    `symbolic`, `batch` and `length` are only the example sizes of a trace whose batch and
    segment length are symbols, read from the inputs when the graph runs."""
    from nestc.backends.compiled import _complete_state

    obstacle = model._segment_obstacle()
    if obstacle:
        raise BackendError(f"the segment step cannot be traced as one graph: {obstacle}")
    state = model.initial_state(batch)
    _complete_state(model, state, batch)
    layout, tensors = flatten_levels(state.levels)
    names = [name for name, _ in model.named_parameters()]
    params = [parameter.detach() for _, parameter in model.named_parameters()]
    step = _Step(model, layout)
    chunk = torch.zeros(batch, length, dtype=torch.long, device=params[0].device)
    position = torch.tensor(0, device=params[0].device)

    def segment(params, chunk, position, tensors):
        return torch.func.functional_call(step, {f"model.{n}": p for n, p in zip(names, params)},
                                          (chunk, position, tensors))

    # Traced with grad on and inputs requiring it, so the graph is the training step; at
    # inference the same operations simply record nothing.
    state_inputs = [t.detach().requires_grad_() if t.is_floating_point() else t.detach() for t in tensors]
    inputs = ([p.requires_grad_() for p in params], chunk, position, state_inputs)
    if symbolic:
        inputs, shape_env = _symbolic_inputs(*inputs)
    with fx_traceback.preserve_node_meta(), torch.enable_grad():
        module = make_fx(segment, tracing_mode="fake" if symbolic else "real", pre_dispatch=True)(*inputs)
    if symbolic:
        _refuse_specialized(shape_env, inputs[1], model.segment)
    for node in module.graph.nodes:
        custom = node.meta.pop("custom", None) or {}
        if "nest_source" in custom:
            _locate(node, custom["nest_level"], custom["nest_source"])
    module.recompile()
    return SegmentGraph(module, layout, None if symbolic else batch, None if symbolic else length)


def _symbolic_inputs(params, chunk, position, state):
    """Fake copies of the step's inputs whose batch (the tokens' and every state tensor's first
    dimension) and segment length (the tokens' second) are symbols; the parameters keep their
    sizes. Without duck sizing, a batch that happens to equal a head count stays its own symbol."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    shape_env = ShapeEnv(duck_shape=False)
    mode = FakeTensorMode(shape_env=shape_env)

    def fake(tensor: Tensor, symbolic_dims: tuple[int, ...]) -> Tensor:
        sizes = [DimDynamic.DYNAMIC if d in symbolic_dims else DimDynamic.STATIC for d in range(tensor.dim())]
        return mode.from_tensor(tensor, symbolic_context=StatelessSymbolicContext(dynamic_sizes=sizes))

    return ([fake(p, ()) for p in params], fake(chunk, (0, 1)), fake(position, ()),
            [fake(t, (0,)) for t in state]), shape_env


def _refuse_specialized(shape_env, chunk: Tensor, segment: int) -> None:
    """A symbolic trace whose code fixed the batch or the segment length (a branch on its value)
    made a graph for that size only: refuse it rather than run it at other sizes. A length of 1
    is fixed by the trace itself (sizes 0 and 1 are never symbols), and right where it is the
    model's segment."""
    for dimension, what in ((0, "batch size"), (1, "segment length")):
        size = chunk.shape[dimension]
        expression = shape_env.replace(size.node.expr) if isinstance(size, torch.SymInt) else size
        fixed = not isinstance(size, torch.SymInt) or getattr(expression, "is_number", False)
        if fixed and not (dimension == 1 and segment == 1):
            raise BackendError(f"the segment step's code fixes the {what} at {int(expression)}: its graph "
                               "cannot serve other sizes")


def _locate(node: fx.Node, level: str, source: str) -> None:
    """Record where a node comes from, and give it the stack trace fx prints as a comment."""
    node.meta["nest_level"], node.meta["nest_source"] = level, source
    file, _, line = source.rpartition(":")
    text = linecache.getline(file, int(line)).strip() if line.isdigit() else ""
    node.meta["stack_trace"] = f'File "{file}", line {line}, in level {level}\n    {text or "level " + level}\n'


# --- passes ------------------------------------------------------------------------------------

def drop_dead(graph: SegmentGraph) -> int:
    """Remove the nodes nothing uses; returns how many."""
    before = len(graph.module.graph.nodes)
    graph.module.graph.eliminate_dead_code()
    graph.module.recompile()
    return before - len(graph.module.graph.nodes)


def fold_constants(graph: SegmentGraph) -> int:
    """Replace every value computable without the inputs' contents by a stored constant; returns
    how many nodes were folded (their now unused inputs are dropped too)."""
    module = graph.module
    known: dict[fx.Node, object] = {}
    folded = 0
    for node in list(module.graph.nodes):
        if node.op == "get_attr":
            known[node] = _attribute(module, node.target)
            continue
        if node.op != "call_function" or node.target in RANDOM or _is_impure(node):
            continue
        shape_only = node.target in SHAPE_ONLY
        arguments = [a for a in node.all_input_nodes]
        if not all(a in known or (shape_only and a is node.args[0]) for a in arguments):
            continue
        args = fx.node.map_arg(node.args, lambda a: known[a] if a in known else a.meta["val"])
        kwargs = fx.node.map_arg(node.kwargs, lambda a: known[a] if a in known else a.meta["val"])
        if shape_only:
            if not all(isinstance(size, int) for size in args[0].shape):
                continue  # a symbolic size (batch, segment length) is known only when the graph runs
            args = (_concrete_like(args[0]),) + tuple(args[1:])
        with torch.no_grad():
            value = node.target(*args, **kwargs)
        if isinstance(value, Tensor) and value.numel() > FOLD_LIMIT:
            continue
        known[node] = value
        if not isinstance(value, Tensor):
            continue
        name = next(f"_folded_{i}" for i in range(folded, folded + len(module.graph.nodes) + 1)
                    if not hasattr(module, f"_folded_{i}"))  # a second run of the pass adds to the first's
        module.register_buffer(name, value.detach().clone())
        with module.graph.inserting_before(node):
            constant = module.graph.get_attr(name)
        constant.meta.update(node.meta)
        node.replace_all_uses_with(constant)
        known[constant] = value
        folded += 1
    module.graph.eliminate_dead_code()
    used = {node.target for node in module.graph.nodes if node.op == "get_attr"}
    for name in [name for name, _ in module.named_buffers() if name.startswith("_folded_") and name not in used]:
        delattr(module, name)  # a constant only a later fold read
    module.recompile()
    return folded


def _concrete_like(value):
    """A real tensor with a fake value's shape, dtype and device (only its metadata is read)."""
    return torch.empty(tuple(value.shape), dtype=value.dtype, device=value.device)


def _attribute(module: nn.Module, target: str):
    for part in target.split("."):
        module = getattr(module, part)
    return module


def _is_impure(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return node.is_impure() or (schema is not None and schema.is_mutable)


def fuse_projections(graph: SegmentGraph) -> int:
    """One `linear` on concatenated weights for every group of bias-free linears reading the same
    input; returns how many linears were removed."""
    module = graph.module
    groups: dict[fx.Node, list[fx.Node]] = {}
    for node in module.graph.nodes:
        # Weights that are inputs or stored constants exist before any use, so the joined
        # matmul can stand where the first of the group stood.
        if node.op == "call_function" and node.target == aten.linear.default and len(node.args) == 2 \
                and not node.kwargs.get("bias") and node.args[1].op in ("placeholder", "get_attr"):
            groups.setdefault(node.args[0], []).append(node)
    removed = 0
    for source, linears in groups.items():
        if len(linears) < 2:
            continue
        weights = [n.args[1] for n in linears]
        sizes = [int(w.meta["val"].shape[0]) for w in weights]
        first = min(linears, key=lambda n: list(module.graph.nodes).index(n))
        with module.graph.inserting_before(first):
            joined = module.graph.call_function(aten.cat.default, (weights, 0))
            product = module.graph.call_function(aten.linear.default, (source, joined))
            pieces = module.graph.call_function(aten.split_with_sizes.default, (product, sizes, -1))
            parts = [module.graph.call_function(operator.getitem, (pieces, index)) for index in range(len(linears))]
        if "nest_source" in first.meta:
            level = "+".join(sorted({n.meta.get("nest_level", "?") for n in linears}))
            for node in (joined, product, pieces, *parts):
                _locate(node, level, first.meta["nest_source"])
        for piece, linear in zip(parts, linears):
            piece.meta["val"] = linear.meta.get("val")
            linear.replace_all_uses_with(piece)
            module.graph.erase_node(linear)
        removed += len(linears) - 1
    module.graph.lint()
    module.recompile()
    return removed


PASSES = {"drop_dead": drop_dead, "fold_constants": fold_constants, "fuse_projections": fuse_projections}
DEFAULT_PASSES = ("drop_dead", "fold_constants", "fuse_projections")


def run_passes(graph: SegmentGraph, names=DEFAULT_PASSES, print_after=(), out=print) -> dict[str, int]:
    """Run the named passes in order; print the graph after those in `print_after`. Returns what
    each pass changed (nodes removed, folded or fused)."""
    unknown = [n for n in list(names) + list(print_after) if n not in PASSES]
    if unknown:
        raise BackendError(f"unknown pass {', '.join(unknown)}; passes: {', '.join(PASSES)}")
    changes = {}
    for name in names:
        changes[name] = PASSES[name](graph)
        graph.applied.append(name)
        if name in print_after:
            out(f"# --- after {name} ({changes[name]} changed) ---\n{readable(graph)}")
    return changes


def readable(graph: SegmentGraph) -> str:
    """The graph as Python, each run of nodes under the spec line it came from."""
    return _spec_comments(graph.module.print_readable(print_output=False))


_NO_TRACE = re.compile(r"\n[ \t]*# No stacktrace found for following nodes[ \t]*(?=\n)")


def _spec_comments(code: str) -> str:
    """fx's code without its notes on nodes that no level made (embedding, norms, logits)."""
    return _NO_TRACE.sub("", code)


# --- standalone Python -------------------------------------------------------------------------

STANDALONE_TEMPLATE = string.Template('''"""$title

Generated by `nestc compile $spec -o ...` (nestc $version; variant $variant). It depends only on
torch: `Model` loads `weights.pt` beside this file ($weights) and runs the traced segment step
(passes: $passes) over the stream's segments, the memories' state carried from one to the next
and from one call to the next. The step's batch size and segment length are symbols, so a call
may hold any number of sequences of any length: segments end at the multiples of $length
positions, as nestc's compiled backend cuts them, and a call ending between two runs a shorter
segment (the next call completes it). Each block of operations is under the spec line of the
level it computes. Continuum levels (CONTINUUM) learn between segments from the model's own
next-token loss, summed over their chunk and applied when the chunk's last target arrives. The
initial state (memories and fast weights at position 0) is stored as constants: training this
module trains the step's parameters, not the meta-learned initial states.
"""

import contextlib
import os

import torch
import torch.nn.functional as F
$imports
SEGMENT = $length  # tokens per step; segments end at the multiples of SEGMENT positions
VOCAB = $vocab
# Per continuum level: its period, optimizer, gates (a number, or the name of a learned
# parameter), whether its updates are cut from the outer graph, and its state slots per layer.
CONTINUUM = $continuum
CYCLE = $cycle  # every continuum level has stepped at multiples of this position


# The continuum-level update, copied from nestc's backends/updates.py: the backends run this code.
$continuum_update

class SegmentStep(torch.nn.Module):
    """One segment: (parameters..., tokens [batch, at most SEGMENT], position, state...) -> [logits, state...]."""

    def __init__(self):
        super().__init__()
$buffers

$forward


class Model(torch.nn.Module):
    """`model(tokens [batch, length], state=None) -> (logits, state)`; pass the state back in to
    continue the stream."""

    def __init__(self, directory=os.path.dirname(os.path.abspath(__file__))):
        super().__init__()
        saved = torch.load(os.path.join(directory, "weights.pt"), weights_only=True)
        self.names = list(saved["parameters"])
        self.weights = torch.nn.ParameterList(torch.nn.Parameter(saved["parameters"][n]) for n in self.names)
        self.step = SegmentStep()
        self.step.load_state_dict(saved["constants"])
        self.initial = saved["state"]  # one sequence's; every sequence of a batch starts from it

    def forward(self, tokens, state=None):
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, length], got {tuple(tokens.shape)}")
        batch, length = tokens.shape
        outer = torch.is_grad_enabled()
        if state is None:
            state = {"position": 0, "tensors": [t.repeat(batch, *[1] * (t.dim() - 1)) for t in self.initial],
                     "last_logits": None, "pending": [None] * len(CONTINUUM)}
        elif state["tensors"] and state["tensors"][0].shape[0] != batch:
            raise ValueError(f"the state holds {state['tensors'][0].shape[0]} sequences, the tokens {batch}")
        state = dict(state, tensors=list(state["tensors"]), pending=list(state["pending"]))
        logits = []
        start = 0
        # Continuum levels differentiate the task loss even at inference, so they run with grad on.
        with torch.enable_grad() if CONTINUUM else contextlib.nullcontext():
            while start < length:
                size = min(length - start, SEGMENT - state["position"] % SEGMENT)
                chunk = tokens[:, start:start + size]
                if CONTINUUM:
                    self._learn(state, chunk[:, 0], outer)
                    self._fast_weights_as_leaves(state["tensors"])
                outputs = self.step(*self.weights, chunk, torch.tensor(state["position"]), *state["tensors"])
                logits.append(outputs[0])
                state["tensors"] = list(outputs[1:])
                if CONTINUUM:
                    if size > 1:  # the predictions whose targets are in this segment too
                        loss = F.cross_entropy(outputs[0][:, :-1].reshape(-1, VOCAB), chunk[:, 1:].reshape(-1),
                                               reduction="sum")
                        state["pending"] = [loss if p is None else p + loss for p in state["pending"]]
                    state["last_logits"] = outputs[0][:, -1]
                state["position"] += size
                start += size
        logits = torch.cat(logits, dim=1) if logits else self.weights[0].new_zeros(batch, 0, VOCAB)
        return (logits, state) if outer else (logits.detach(), state)

    @staticmethod
    def _fast_weights_as_leaves(tensors):
        """The chunk's loss is differentiated with respect to the fast weights, so weights cut
        from any graph (inference, a loaded state) become leaves."""
        for level in CONTINUUM:
            for slot in level["weights"]:
                if not tensors[slot].requires_grad:
                    tensors[slot] = tensors[slot].detach().requires_grad_()

    def _gate(self, value):
        return self.weights[self.names.index(value)] if isinstance(value, str) else value

    def _learn(self, state, token, outer):
        """The prediction made before this segment meets its target; the levels whose chunk ends
        here step on their summed loss (one gradient at the chunk's starting weights)."""
        tensors = state["tensors"]
        if state["last_logits"] is None:
            return
        loss = F.cross_entropy(state["last_logits"], token, reduction="sum")
        for index, level in enumerate(CONTINUUM):
            pending = loss if state["pending"][index] is None else state["pending"][index] + loss
            state["pending"][index] = pending
            if state["position"] % level["every"]:
                continue
            weights = [tensors[slot] for slot in level["weights"]]
            grads = continuum_gradients(pending, weights, create_graph=False)
            weights, momenta = continuum_step(
                weights, [tensors[slot] for slot in level["momenta"]], grads, level["momentum_of_steps"],
                self._gate(level["lr"]), self._gate(level["retain"]), self._gate(level["momentum"]), full=False,
                stop=level["stop"], keep_graph=outer)
            for slot, tensor in zip(level["weights"] + level["momenta"], weights + momenta):
                tensors[slot] = tensor
            state["pending"][index] = None
        if not outer and state["position"] % CYCLE == 0:
            # Every continuum level has just stepped: nothing pending reaches back, so the whole
            # state starts afresh from here and the graph stays one cycle long.
            state["tensors"] = [t.detach() for t in tensors]
            state["last_logits"] = state["last_logits"].detach()
''')


def standalone(model, graph: SegmentGraph, spec: str, variant: str, weights_from: str) -> tuple[str, dict]:
    """The source of a torch-only module running `graph` (traced symbolic: any batch, any length),
    and what `weights.pt` must hold. `spec` is what `nestc compile` was given (a spec or a run
    directory); `weights_from` says whose weights they are."""
    from nestc import __version__

    if graph.batch is not None or graph.length is not None:
        raise BackendError("the standalone module needs the graph traced with a symbolic batch and length")
    continuum = _continuum_table(model, graph)
    module = graph.module
    module.graph._codegen = fx.graph.CodeGen()  # flat arguments and results: no pytree specs to carry
    module.recompile()
    constants = {name: buffer for name, buffer in module.named_buffers()}
    buffers = "\n".join(f"        self.register_buffer({name!r}, torch.empty({list(b.shape)}, dtype={b.dtype}))"
                        for name, b in constants.items()) or "        pass"
    forward, imports = _forward_method(module)
    source = STANDALONE_TEMPLATE.substitute(
        title=f"{os.path.basename(os.path.normpath(spec))} as standalone PyTorch: the compiled backend's segment step, traced by torch.fx",
        spec=spec, version=__version__, variant=variant, weights=weights_from,
        passes=", ".join(graph.applied) or "none", length=model.segment, vocab=model.vocab, buffers=buffers,
        forward=forward, imports=imports, continuum=pprint.pformat(continuum, width=100, sort_dicts=False), cycle=model.task_cycle,
        continuum_update="\n\n".join(inspect.getsource(f) for f in (continuum_gradients, continuum_step)))
    weights = {"parameters": {n: p.detach().clone() for n, p in model.named_parameters()},
               "constants": {n: b.clone() for n, b in constants.items()},
               "state": _one_sequence_state(model)}
    return source, weights


def _one_sequence_state(model) -> list[Tensor]:
    """The flat initial state of one sequence, which the module repeats for each sequence of a
    batch: refused when a batch's initial state is not that (a tensor without a batch dimension,
    or sequences starting apart)."""
    from nestc.backends.compiled import _complete_state

    states = []
    for batch in (1, 2):
        state = model.initial_state(batch)
        _complete_state(model, state, batch)
        states.append([t.detach().clone() for t in flatten_levels(state.levels)[1]])
    for one, two in zip(*states, strict=True):
        if two.shape[:1] != (2,) or one.shape != (1, *two.shape[1:]) or not torch.equal(one.expand_as(two), two):
            raise BackendError("the initial state is not one per sequence, the same for each: the standalone "
                               "module could not start a batch of any size from it")
    return states[0]


def _continuum_table(model, graph: SegmentGraph) -> list[dict]:
    """What the standalone module needs to step each continuum level of each layer: its period,
    optimizer and gates (each layer's copy has its own learned gates), and where its fast weights
    and momenta sit in the flat state."""
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    table = []
    for name in model.task_levels:
        for layer_index, layer in enumerate(model.layers):
            if name not in layer.levels:
                continue
            level = layer.levels[name]
            if level.meta == "full":
                raise BackendError(f"level `{name}` differentiates through its own updates (`meta full`), which "
                                   "the standalone module does not emit; run the spec through nestc.load(...) instead")
            slots = {field: [index for index, (layer_at, owner, kind, _) in enumerate(graph.layout)
                             if layer_at == layer_index and owner == name and kind == field]
                     for field in ("weights", "momentum")}
            gates = {role: names[id(value)] if isinstance(value, Tensor) else value
                     for role, value in (("lr", level.gates.get("lr", 1.0)), ("retain", level.gates.get("retain", 1.0)),
                                         ("momentum", level.gates.get("momentum", 0.9)))}
            table.append({"name": name, "every": level.every,
                          "momentum_of_steps": level.optimizer.momentum_of_steps, **gates,
                          "stop": level.meta == "stop", "weights": slots["weights"], "momenta": slots["momentum"]})
    return table


def _forward_method(module: fx.GraphModule) -> tuple[str, str]:
    """fx's generated `forward`, with the spec locations as comments, indented as a method; and
    the imports of the names it uses beyond `torch` (`device`, `inf`: what fx prints them as)."""
    code = module.graph.python_code(root_module="self", verbose=True)
    imports = sorted({fx.graph._custom_builtins[name].import_str for name in code.globals
                      if name in fx.graph._custom_builtins and name != "torch" and re.search(rf"\b{name}\b", code.src)})
    return textwrap.indent(_spec_comments(code.src).strip("\n"), "    "), "".join(f"{line}\n" for line in imports)


def write_standalone(model, graph: SegmentGraph, spec: str, variant: str, weights_from: str,
                     directory: str) -> list[str]:
    """`model.py` and `weights.pt` in `directory`; returns their paths."""
    source, weights = standalone(model, graph, spec, variant, weights_from)
    os.makedirs(directory, exist_ok=True)
    paths = [os.path.join(directory, "model.py"), os.path.join(directory, "weights.pt")]
    with open(paths[0], "w", encoding="utf-8") as handle:
        handle.write(source)
    torch.save(weights, paths[1])
    return paths

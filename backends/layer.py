"""`nestc.layer`: a model's layer stack, or one level of its block, as a PyTorch layer on hidden states.

The module runs the model's own code: `ReferenceModel.advance` / `CompiledModel.advance` with
`hidden=True`, which is the model's schedule (token by token, or segment by segment) without
the embedding in front and the final norm and head behind. Its state is the model's
`ModelState` (one entry per layer), so a stream continues across calls exactly as the model's.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from nestc.lang import ir
from nestc.lang.queries import generators, model_levels, model_nodes, reachable_levels
from nestc.backends.common import BackendError
from nestc.backends.reference import ReferenceModel
from nestc.backends.state import ModelState


class NestLayer(nn.Module):
    """`layer(x, state=None) -> (y, state)`: hidden states x [batch, time, dim] to y of the same
    shape; pass the returned state back in to continue the stream (the memories keep learning).

    Its parameters are the model's layers' (`layers.<i>....`, the names a model's state dict
    uses for them): taken from a model, they are that model's very tensors. The embedding, the
    final norm and the head are not part of it.
    """

    def __init__(self, model: ReferenceModel, what: str):
        super().__init__()
        model.require_no_task_levels()
        self.layers = model.layers
        # the model runs the schedule; kept out of the registered modules, so that its embedding
        # and head are not parameters of the layer
        self.__dict__["model"] = model
        self.dim = model.dim
        self.what = what  # "the layer stack of SPEC" or "level `NAME` of SPEC", for messages

    def forward(self, x: Tensor, state: ModelState | None = None) -> tuple[Tensor, ModelState]:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"{self.what} maps hidden states [batch, time, {self.dim}] (model.dim = {self.dim}) "
                             f"to the same shape; got shape {tuple(x.shape)}")
        if state is not None and (len(state.levels) != len(self.layers)
                                  or any(set(s) != set(layer.levels) for s, layer in zip(state.levels, self.layers))):
            raise ValueError(f"the state passed to {self.what} is not one of its states (it has other levels)")
        outer_grad = torch.is_grad_enabled()
        state = self.model.initial_state(x.shape[0], like=x) if state is None else state
        outputs = self.model.advance(x, state, outer_grad, hidden=True)
        y = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
        if not outer_grad:
            return y.detach(), state.detach()
        return y, state

    def extra_repr(self) -> str:
        return self.what


def level_block(program: ir.Program, name: str) -> ir.Block:
    """The block of a one-level layer: the level alone, as it runs where the model's block uses
    it. Names that are not such a level get the reason, or the names that are."""
    model = program.model
    used = list(dict.fromkeys(node.level for node in model_nodes(model) if isinstance(node, ir.UseLevel)))
    if name in used:
        return ir.UseLevel(level=name)
    for node in model_nodes(model):
        if isinstance(node, ir.MemoryAsContext) and name in (node.memory, node.attention):
            raise BackendError(f"level `{name}` runs inside the memory-as-context block "
                               f"mac(memory={node.memory}, attention={node.attention}): the attention reads the "
                               "memory's retrievals and the memory learns from the attention's output, so neither "
                               "has a map of its own; take the whole layer stack (name=None)")
    reached = reachable_levels({level.name: level for level in program.levels}, model_levels(model))
    readers = sorted(level.name for level in program.levels
                     if level.name in reached and name in generators(level) and level.name != name)
    readers = [reader for reader in readers if reader in used] or readers  # the block's levels first
    if readers:
        raise BackendError(f"level `{name}` has no output of its own: it generates the inputs of "
                           f"{', '.join(f'`{reader}`' for reader in readers)}; take a level that reads it "
                           "(or the whole layer stack, name=None)")
    raise ValueError(f"no level `{name}` in the model's layers; available: {', '.join(used)} "
                     "(or name=None for the whole layer stack)")


def build_layer(program: ir.Program, name: str | None, backend: str, trained: ReferenceModel | None = None,
                index: int = 0) -> NestLayer:
    """`nestc.layer`'s module for a checked program: the layer stack (`name` None) or one level,
    with fresh parameters, or copies of a trained model's (`trained`; a level from its layer
    `index`), in the dtype and on the device of the trained model's layers."""
    from nestc.backends import compiled, reference

    blocks = None if name is None else (level_block(program, name),)
    model = (compiled if backend == "compiled" else reference).build(program, blocks=blocks)
    layer = NestLayer(model, f"the layer stack of {program.file}" if name is None
                      else f"level `{name}` of {program.file}")
    if trained is None:
        return layer
    like = next(trained.layers.parameters(), trained.embedding.weight)
    model.to(dtype=like.dtype, device=like.device)
    if name is None:
        model.layers.load_state_dict(trained.layers.state_dict())
        return layer
    if not 0 <= index < len(trained.layers) or name not in trained.layers[index].levels:
        holding = [str(i) for i, trained_layer in enumerate(trained.layers) if name in trained_layer.levels]
        raise ValueError(f"layer {index} of the model has no level `{name}`; the layers that have one: "
                         f"{', '.join(holding)}")
    for level_name, module in model.layers[0].levels.items():
        module.load_state_dict(trained.layers[index].levels[level_name].state_dict())
    return layer

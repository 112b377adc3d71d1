"""Layers that differ: `layers = [a, a, b] * 2` gives each layer its own block (language §7)."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

from nestc.backends import compiled, reference
from nestc.lang import ir
from nestc.lang.sema import analyze_source
from nestc.lang.source import SourceFile
from nestc.passes.estimate import estimate
from test_reference_model import _tensors

LEVELS = """
level mixer : matrix {
    key = x |> proj |> conv(4) |> l2norm
    value = x |> proj
    query = x |> proj |> l2norm
    lr = x |> proj |> sigmoid
    retain = x |> proj(bias=true) |> sigmoid
    objective l2
    order decay_first
    every 1
}
level attn : cache(window=8) {
    key = x |> proj |> rope
    query = x |> proj |> rope
}
level ffn : mlp(expand=2, residual=false)
level cms : mlp(expand=2) {
    objective task
    lr = 0.01
    every 4
}
block recurrent = residual(rmsnorm |> mixer) |> residual(rmsnorm |> ffn)
block attention = residual(rmsnorm |> attn) |> residual(rmsnorm |> cms)
"""

TRAIN = "train {\n    context 16\n    batch 2\n}\n"


def _program(model_fields: str, levels: str = LEVELS) -> ir.Program:
    text = levels + "model {\n    vocab 32\n    dim 8\n    heads 2\n" + model_fields + "\n}\n" + TRAIN
    result = analyze_source(SourceFile("layers.nest", text))
    assert result.ok, [d.message for d in result.diagnostics]
    return result.program


def _diagnostics(model_fields: str) -> list[tuple[str, str]]:
    text = LEVELS + "model {\n    vocab 32\n    dim 8\n" + model_fields + "\n}\n" + TRAIN
    return [(d.code, d.message) for d in analyze_source(SourceFile("layers.nest", text)).diagnostics if d.is_error]


def _build(backend, program: ir.Program, seed: int = 0):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", compiled.CompileWarning)
        return backend.build(program).double()


def test_each_layer_holds_the_levels_of_its_own_block():
    program = _program("    layers = [recurrent] * 2 + [attention, recurrent]")
    assert program.model.layers == 4 and program.model.block is None
    model = _build(reference, program)
    assert [sorted(layer.levels) for layer in model.layers] == [
        ["ffn", "mixer"], ["ffn", "mixer"], ["attn", "cms"], ["ffn", "mixer"]]
    # the estimate counts from the IR, layer by layer; the built model from its modules
    assert estimate(program).parameters == sum(p.numel() for p in model.parameters())
    assert estimate(program).layer_parameters == tuple(sorted({sum(p.numel() for p in layer.parameters())
                                                               for layer in model.layers}))


def test_a_list_repeating_one_block_is_the_same_program_as_layers_n():
    listed = _program("    layers = [recurrent] * 3")
    repeated = _program("    layers 3\n    block = recurrent")
    assert ir.variant_id(listed) == ir.variant_id(repeated)
    assert listed.model == repeated.model


@pytest.mark.parametrize("backend", [reference, compiled], ids=["reference", "compiled"])
def test_two_layers_compute_what_one_layer_running_both_blocks_computes(backend):
    """[recurrent, attention] as two layers is recurrent |> attention as one layer: the same levels
    in the same order, so with the same weights the logits, the states (a continuum level's
    included) and the gradients are equal. The one-layer model is the uniform schedule, which the
    zoo's tests check against the reference and fla's oracles."""
    two = _build(backend, _program("    layers = [recurrent, attention]"))
    one = _build(backend, _program("    layers 1\n    block = recurrent |> attention"), seed=1)
    # layer i's block path `b...` is the one-layer block's item `b_i...`; its levels sit in layer 0
    renamed = {}
    for name, tensor in two.state_dict().items():
        name = re.sub(r"^layers\.(\d+)\.parts\.b", lambda m: f"layers.0.parts.b_{m.group(1)}", name)
        renamed[re.sub(r"^layers\.\d+\.levels\.", "layers.0.levels.", name)] = tensor
    one.load_state_dict(renamed)  # strict: every parameter of each model has its counterpart

    tokens = torch.randint(0, 32, (2, 23), generator=torch.Generator().manual_seed(2))
    results = []
    for model in (two, one):
        first, state = model(tokens[:, :9])
        second, state = model(tokens[:, 9:], state)
        logits = torch.cat([first, second], dim=1)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 32), tokens[:, 1:].reshape(-1))
        grads = dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(loss, list(model.parameters()))))
        results.append((logits, state, grads))
    (logits_two, state_two, grads_two), (logits_one, state_one, grads_one) = results
    torch.testing.assert_close(logits_two, logits_one, rtol=1e-9, atol=1e-9)
    merged = {**state_two.levels[0], **state_two.levels[1]}
    assert sorted(merged) == sorted(state_one.levels[0])
    for name in merged:
        for a, b in zip(_tensors(merged[name]), _tensors(state_one.levels[0][name]), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    for name, grad in grads_two.items():
        name = re.sub(r"^layers\.(\d+)\.parts\.b", lambda m: f"layers.0.parts.b_{m.group(1)}", name)
        torch.testing.assert_close(grad, grads_one[re.sub(r"^layers\.\d+\.levels\.", "layers.0.levels.", name)],
                                   rtol=1e-9, atol=1e-9)


def test_a_hybrid_compiled_equals_the_reference_in_float64():
    from test_compiled import assert_equivalent

    assert_equivalent(_program("    layers = [recurrent, attention] * 2"))


@pytest.mark.parametrize("fields, code, message", [  # each with its first error
    ("    layers = [recurrent, attention]\n    block = recurrent", "N0116",
     "the layers' blocks are given twice: by `block` and by the list in `layers`"),
    ("    layers = []", "N0107", "`layers` lists no layer"),
    ("    layers = [recurrent] * 0", "N0106", "the repetitions in `layers` must be a whole number of at least 1"),
    ("    layers = [recurrent] * 1.5", "N0106", "the repetitions in `layers` must be a whole number of at least 1"),
    ("    layers = [recurrent] * choice(1, 2)", "N0119",
     "the repetitions in `layers` cannot be a search-space value yet"),
    ("    layers = choice([recurrent], [attention])", "N0119", "a list of layers cannot be a search-space value yet"),
    ("    layers = [recurrent] + 2", "N0105", "`+` in `layers` joins lists of layers"),
    ("    layers = [recurrent] * [attention]", "N0105", "`*` in `layers` repeats a list of layers a number of times"),
    ("    layers = [recurent]", "N0101", "unknown name `recurent`"),
    ("    layers = [recurrent, mixer |> mixer]", "N0122", "level `mixer` is used 2 times in one layer's block"),
    ("    layers 2", "N0107", "`model` needs the field `block`"),
])
def test_bad_layer_lists_are_reported_where_they_stand(fields, code, message):
    found = _diagnostics(fields)
    assert found and found[0][0] == code, found
    assert found[0][1] == message


def test_the_formatter_writes_a_layer_list_as_dataflow():
    from nestc.lang.formatter import format_module
    from nestc.lang.syntax import parse

    text = LEVELS + "model {\n    vocab 32\n    dim 8\n    layers [recurrent,attention]*2\n}\n"
    assert "    layers = [recurrent, attention] * 2\n" in format_module(parse(SourceFile("f.nest", text)))

"""The segment step as a torch.fx graph: each pass measured by node counts, the rewritten graph
equal to the eager backend, provenance back to the spec, and the standalone module."""

from __future__ import annotations

import re
import subprocess
import sys
import warnings

import pytest
import torch
from click.testing import CliRunner

import nestc
from nestc.backends import compiled, fx
from nestc.cli import cli
from nesttest import SMALL_TITANS as TITANS
from test_compiled import _run
from test_reference_model import _tensors

aten = torch.ops.aten

# Four projections read the same normed input (key, value, query, lr); a constant retain gate.
GATED = """
level mixer : matrix {
    key = x |> proj |> l2norm
    value = x |> proj
    query = x |> proj |> l2norm
    lr = x |> proj |> sigmoid
    retain = 0.9
    objective l2
    optimizer gd
    every 1
}
level ffn : mlp(expand=2, residual=false)
model {
    vocab 32
    dim 16
    heads 2
    layers 2
    block = residual(rmsnorm |> mixer) |> residual(rmsnorm |> ffn)
}
train {
    context 16
}
"""



def build(text: str, passes=None):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", compiled.CompileWarning)
        return compiled.build(nestc.check(text), graph_passes=passes)


def traced(text: str, passes=()):
    model = build(text)
    graph = fx.trace_segment(model, 2, model.segment)
    fx.run_passes(graph, passes)
    return model, graph


def test_fuse_projections_makes_one_matmul_of_the_projections_reading_one_input():
    _, graph = traced(GATED)
    before = graph.op_count(aten.linear.default)
    assert fx.fuse_projections(graph) == 2 * 3  # per layer, 4 projections of one input become 1
    assert graph.op_count(aten.linear.default) == before - 6
    assert graph.op_count(aten.split_with_sizes.default) == 2


def test_fold_constants_stores_masks_and_constant_gates():
    _, graph = traced(GATED)
    masks = graph.op_count(aten.tril.default, aten.ones.default, aten.eye.default)
    assert masks > 0
    folded = fx.fold_constants(graph)
    assert folded > 0 and graph.op_count(aten.tril.default, aten.ones.default, aten.eye.default) == 0
    # The constant retain gate (0.9) is no longer built per segment: no full / fill of it remains.
    assert graph.op_count(aten.full.default, aten.full_like.default, aten.fill.Scalar) == 0
    stored = {name for name, _ in graph.module.named_buffers()}
    assert 0 < len(stored) <= folded
    assert stored == {n.target for n in graph.module.graph.nodes if n.op == "get_attr"}  # each one used


def test_drop_dead_leaves_only_nodes_someone_uses(at_repo_root):
    _, graph = traced(nestc_text("specs/hope.nest").replace("dim 64", "dim 16").replace("layers 2", "layers 1"))
    dead = [n for n in graph.module.graph.nodes if n.op == "call_function" and not n.users]
    assert dead  # the reference-shaped code computes values the segment step never reads
    assert fx.drop_dead(graph) >= len(dead)
    assert not [n for n in graph.module.graph.nodes if n.op == "call_function" and not n.users]


def nestc_text(path: str) -> str:
    from nestc.runtime.checkpoint import bundle
    from nestc.lang.sema import analyze_file

    return bundle(analyze_file(path))


@pytest.mark.parametrize("text", [GATED, TITANS], ids=["gated_delta", "titans"])
def test_the_rewritten_graph_equals_the_eager_backend(text):
    eager, graphed = build(text), build(text, passes=fx.DEFAULT_PASSES)
    tokens = torch.randint(0, eager.vocab, (2, 37), generator=torch.Generator().manual_seed(1))
    expected, expected_state, expected_grads = _run(eager, tokens, 20)  # T and the split cut segments
    actual, actual_state, actual_grads = _run(graphed, tokens, 20)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
    for a, b in zip(_tensors(actual_state), _tensors(expected_state), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(actual_grads, expected_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert len(graphed._graphs) >= 2  # segments of several lengths, one graph each


def test_every_level_node_points_at_its_definition_in_the_spec(tmp_path):
    path = tmp_path / "gated.nest"
    path.write_text(GATED)
    model = compiled.build(nestc.check(str(path)))
    graph = fx.trace_segment(model, 1, model.segment)
    lines = GATED.split("\n")
    sources = {n.meta["nest_source"] for n in graph.module.graph.nodes if "nest_source" in n.meta}
    assert {s.rsplit(":", 1)[0] for s in sources} == {str(path)}
    assert {lines[int(s.rsplit(":", 1)[1]) - 1].split(":")[0] for s in sources} == {"level mixer ", "level ffn "}
    assert f"# File: {path}:2 in level mixer, code: level mixer : matrix {{" in fx.readable(graph)


def emit_and_compare(spec, text: str, tokens, split: int, **build) -> str:
    """Write the spec's standalone module, run it in a process where nestc cannot be imported over
    two calls (the state carried, under no_grad), and compare with the compiled backend built with
    the same seed; returns the module's source."""
    spec.write_text(text)
    out = spec.parent / "out"
    result = CliRunner().invoke(cli, ["compile", str(spec), "-o", str(out)])
    assert result.exit_code == 0, result.output
    torch.manual_seed(0)  # the CLI's --seed 0 initialisation
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", compiled.CompileWarning)
        model = compiled.build(nestc.check(str(spec)))
    with torch.no_grad():
        first, state = model(tokens[:, :split])
        expected = torch.cat([first, model(tokens[:, split:], state)[0]], dim=1)
    torch.save(tokens, spec.parent / "tokens.pt")
    script = ("import sys; sys.modules['nestc'] = None  # importing nestc now fails\n"
              f"sys.path.insert(0, {str(out)!r})\n"
              "import torch; from model import Model\n"
              f"tokens = torch.load({str(spec.parent / 'tokens.pt')!r}); model = Model()\n"
              "with torch.no_grad():\n"
              f"    first, state = model(tokens[:, :{split}]); second, _ = model(tokens[:, {split}:], state)\n"
              f"torch.save(torch.cat([first, second], dim=1), {str(spec.parent / 'logits.pt')!r})\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    torch.testing.assert_close(torch.load(spec.parent / "logits.pt"), expected, rtol=1e-4, atol=1e-5)
    return (out / "model.py").read_text()


def test_the_standalone_module_needs_only_torch_and_continues_the_stream(tmp_path):
    # One sequence (the graph is traced for two), calls of 100 and 50 tokens: segments of 64, 36,
    # then 28 to finish the second one, and 22.
    tokens = torch.randint(0, 32, (1, 150), generator=torch.Generator().manual_seed(3))
    source = emit_and_compare(tmp_path / "gated.nest", GATED, tokens, 100)
    assert re.search(r"# File: .*gated\.nest:2 in level mixer", source)


def test_a_per_channel_decay_exports(tmp_path):
    """KDA's retain gate is one value per key channel: the traced step keeps its running product
    per channel (it once took a per-head product and could not be traced)."""
    text = GATED.replace("retain = 0.9", "retain = x |> proj(per=channel, bias=true) |> sigmoid") \
        .replace("every 1", "every 1\n    order decay_first")
    tokens = torch.randint(0, 32, (2, 40), generator=torch.Generator().manual_seed(4))
    emit_and_compare(tmp_path / "kda.nest", text, tokens, 23)


def test_the_standalone_module_steps_continuum_levels_like_the_backend(at_repo_root, tmp_path):
    small = nestc_text("specs/hope.nest").replace("dim 64", "dim 16").replace("layers 2", "layers 1")
    tokens = torch.randint(0, 256, (3, 96), generator=torch.Generator().manual_seed(3))
    # Test-time learning: the continuum levels step at every 16 and 64 tokens, across the calls,
    # the first of which ends inside a segment (45 = 2 * 16 + 13).
    source = emit_and_compare(tmp_path / "hope.nest", small, tokens, 45)
    assert "'name': 'cms_fast'" in source


def test_cli_prints_the_graph_after_a_pass_and_rejects_unknown_ones(tmp_path):
    spec = tmp_path / "gated.nest"
    spec.write_text(GATED)
    shown = CliRunner().invoke(cli, ["compile", str(spec), "--passes", "fold_constants",
                                     "--print-after", "fold_constants"])
    assert shown.exit_code == 0 and "after fold_constants" in shown.output and "= self._folded_" in shown.output
    unknown = CliRunner().invoke(cli, ["compile", str(spec), "--emit", "fx", "--passes", "fold_constants,inline_all"])
    assert unknown.exit_code == 2 and "unknown pass `inline_all`" in unknown.output
    misplaced = CliRunner().invoke(cli, ["compile", str(spec), "--emit", "ir", "--passes", "fold_constants"])
    assert misplaced.exit_code == 2 and "use it with --emit fx" in misplaced.output


def test_nestc_run_trains_through_the_graph(tmp_path):
    spec = tmp_path / "gated.nest"
    spec.write_text(GATED)
    result = CliRunner().invoke(cli, ["run", str(spec), "--graph", "--steps", "2", "--set", "model.vocab=256",
                                      "--runs", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    refused = CliRunner().invoke(cli, ["run", str(spec), "--graph", "--backend", "reference"])
    assert refused.exit_code == 2 and "--graph needs --backend compiled" in refused.output


def test_each_layers_continuum_level_steps_with_its_own_gates():
    """The standalone module's table of continuum levels has one entry per layer, naming that
    layer's learned gate and fast weights (it once gave every layer the first layer's gates)."""
    text = ("level cms : mlp(expand=2) {\n    objective task\n    lr = learned(init=0.01)\n    every 4\n}\n"
            "model {\n    vocab 16\n    dim 8\n    layers 2\n    block = residual(rmsnorm |> cms)\n}\n"
            "train { context 8 }\n")
    model = build(text)
    graph = fx.trace_segment(model, 1, model.segment)
    table = fx._continuum_table(model, graph)
    assert [entry["lr"] for entry in table] == ["layers.0.levels.cms.lr_gate", "layers.1.levels.cms.lr_gate"]
    layers = [{graph.layout[slot][0] for slot in entry["weights"]} for entry in table]
    assert layers == [{0}, {1}]


@pytest.mark.parametrize("dimension, what", [(0, "batch size at 2"), (1, "segment length at 64")])
def test_a_symbolic_trace_whose_code_fixes_a_size_is_refused(dimension, what, monkeypatch):
    """Code that reads a symbolic size as a number (here `int(...)`) makes a graph for that size
    only; it is refused rather than run at other sizes."""
    model = build(GATED.replace("layers 2", "layers 1"))
    step = model._segment_from_tensors

    def reading_a_size(layout, chunk, position, tensors):
        chunk = chunk.narrow(dimension, 0, int(chunk.shape[dimension]))
        return step(layout, chunk, position, tensors)

    monkeypatch.setattr(model, "_segment_from_tensors", reading_a_size)
    with pytest.raises(compiled.BackendError, match=f"fixes the {what}: its graph cannot serve other sizes"):
        fx.trace_segment(model, 2, model.segment, symbolic=True)

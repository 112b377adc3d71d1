"""`nestc.load(..., backend="compiled", compile=True)`: the segment step through torch.compile.

The numerical checks use inductor, the backend users get. The graph-break and recompile checks
are properties of Dynamo's tracing and guards, the same whatever generates the code, so they use
`aot_eager` (Dynamo and AOTAutograd without code generation), which keeps this file fast.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import nestc
from nestc.backends.compiled import CompileWarning
from nesttest import SMALL_TITANS as TITANS
from test_compiled import _run

pytestmark = pytest.mark.compile

DELTANET = """
level mixer : matrix {
    key = x |> proj |> conv(4) |> silu |> l2norm
    value = x |> proj |> conv(4) |> silu
    query = x |> proj |> conv(4) |> silu |> l2norm
    lr = x |> proj |> sigmoid
    objective l2
    optimizer gd
    every 1
    read after
}
level ffn : mlp(expand=2, residual=false)
model {
    vocab 32
    dim 16
    heads 2
    layers 1
    block = residual(rmsnorm |> mixer) |> residual(rmsnorm |> ffn)
}
"""

# The generalised delta rule (SEMANTICS §3): every field the delta form adds, with per-channel gates.
GENERALISED_DELTANET = DELTANET.replace("    optimizer gd\n", """    optimizer gd(implicit=true)
    substeps 2
    erase = x |> proj(per=channel) |> sigmoid
    write = x |> proj(per=channel) |> sigmoid
    retain = x |> proj(per=channel) |> sigmoid
    order decay_first
""")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _pair(spec: str, compile):
    torch.manual_seed(0)
    eager = nestc.load(spec, backend="compiled")
    compiled = nestc.load(spec, backend="compiled", compile=compile)
    compiled.load_state_dict(eager.state_dict())
    return eager, compiled


# Lengths whose segments all have one length (deltanet: 64, titans: 4), so inductor compiles one
# graph per spec; the second call continues the stream at a segment boundary.
@pytest.mark.parametrize("spec,length,split", [(DELTANET, 128, 64), (TITANS, 16, 8)], ids=["deltanet", "titans"])
def test_inductor_equals_the_eager_compiled_backend(spec, length, split):
    eager, compiled = _pair(spec, compile=True)
    tokens = torch.randint(0, eager.vocab, (2, length), generator=torch.Generator().manual_seed(1))
    expected, _, expected_grads = _run(eager, tokens, split)
    actual, _, actual_grads = _run(compiled, tokens, split)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
    for (name, _), a, b in zip(eager.named_parameters(), actual_grads, expected_grads, strict=True):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    assert counters["stats"]["unique_graphs"] == 1


# TITANS followed by a continuum level: its layers are coupled within a segment (the continuum
# level learns from the logits), so torch.compile takes the whole segment step.
TITANS_CMS = TITANS.replace("block = residual(rmsnorm |> lmm)",
                            "block = residual(rmsnorm |> lmm) |> residual(rmsnorm |> cms)") + """
level cms : mlp(expand=2, residual=false) {
    objective task
    lr = 1e-3
    every 4
}
"""


@pytest.mark.parametrize("spec", [DELTANET, GENERALISED_DELTANET, TITANS],
                         ids=["deltanet", "generalised_deltanet", "titans"])
def test_the_memory_rule_is_one_graph_without_breaks(spec):
    """Layer by layer, torch.compile takes each memory rule's segment step."""
    _, compiled = _pair(spec, compile="aot_eager")  # the rule compiles with fullgraph=True
    assert compiled.layer_by_layer
    tokens = torch.randint(0, compiled.vocab, (2, 2 * compiled.segment))
    logits, _ = compiled(tokens)
    logits.sum().backward()
    assert not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] == 1


def test_the_segment_step_is_one_graph_without_breaks():
    """Where the layers are coupled inside a segment, torch.compile takes the whole segment step."""
    _, compiled = _pair(TITANS_CMS, compile="aot_eager")
    assert not compiled.layer_by_layer
    tokens = torch.randint(0, compiled.vocab, (2, 2 * compiled.segment))
    logits, _ = compiled(tokens)
    logits.sum().backward()
    assert not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] == 1
    explanation = torch._dynamo.explain(compiled._segment_from_tensors)(
        *_step_arguments(compiled, tokens[:, :compiled.segment]))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def _step_arguments(model, chunk):
    """The compiled step's arguments at the start of a stream, as `_compiled_segment` makes them."""
    from nestc.backends import compiled
    from nestc.backends.state import flatten_levels

    state = model.initial_state(chunk.shape[0])
    compiled._complete_state(model, state, chunk.shape[0])
    layout, tensors = flatten_levels(state.levels)
    return layout, chunk, torch.tensor(0), [compiled._as_step_input(t) for t in tensors]


def test_training_steps_do_not_recompile():
    _, model = _pair(TITANS, compile="aot_eager")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    # 18 tokens: four segments of 4, then a last one of 2, which is one more graph
    tokens = torch.randint(0, model.vocab, (2, 18), generator=torch.Generator().manual_seed(2))

    def train_step():
        logits, _ = model(tokens)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, model.vocab), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    train_step()
    assert counters["stats"]["unique_graphs"] == 2
    with torch._dynamo.config.patch(error_on_recompile=True):
        train_step()
        train_step()
    assert counters["stats"]["unique_graphs"] == 2


def test_hopes_segment_step_with_its_fused_memories_is_one_graph_that_training_does_not_recompile():
    """Hope's whole segment step (the five memories stacked into one call, the CMS reads) is one
    graph: no break, and training steps whose calls cross the chunk ends of every memory (16 and
    64) reuse it. The continuum levels' gradient calls still run between segments, outside it.
    The compiled step equals the eager one (float64)."""
    from nestc.lang import overrides
    from nestc.lang.sema import analyze_source, read_source
    from nestc.backends import compiled as backend

    overridden = overrides.apply(read_source("specs/hope.nest"), ["model.dim=16", "model.layers=1"])
    program = analyze_source(overridden.main, replaced_imports=overridden.imported).program
    torch.manual_seed(0)
    eager = backend.build(program).double()
    model = backend.build(program, torch_compile="aot_eager").double()
    model.load_state_dict(eager.state_dict())
    assert model.fused and not model.layer_by_layer
    tokens = torch.randint(0, model.vocab, (2, 80), generator=torch.Generator().manual_seed(4))

    def train_step(net):
        logits, _ = net(tokens)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, net.vocab), tokens[:, 1:].reshape(-1))
        return logits, torch.autograd.grad(loss, list(net.parameters()), allow_unused=True)

    logits, grads = train_step(model)
    expected_logits, expected_grads = train_step(eager)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-9, atol=1e-10)
    for (name, _), a, b in zip(model.named_parameters(), grads, expected_grads, strict=True):
        if a is not None or b is not None:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda m: f"{name}: {m}")
    assert not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] == 1
    with torch._dynamo.config.patch(error_on_recompile=True):
        train_step(model)
    assert counters["stats"]["unique_graphs"] == 1


def test_compile_needs_the_compiled_backend():
    with pytest.raises(ValueError, match="compile=True needs backend='compiled'"):
        nestc.load(DELTANET, backend="reference", compile=True)


ATTENTION_ONLY = DELTANET.replace("rmsnorm |> mixer", "rmsnorm |> attn") + "level attn : cache(window=8)\n"
ATTENTION_AND_CMS = TITANS_CMS.replace("rmsnorm |> lmm", "rmsnorm |> attn") + "level attn : cache(window=8)\n"


@pytest.mark.parametrize("spec,reason", [
    (ATTENTION_ONLY, "no memory rule has a segment form to compile"),
    (ATTENTION_AND_CMS, "the attention cache of `attn` changes length"),
], ids=["nothing-to-compile", "coupled-layers-with-a-cache"])
def test_a_model_torch_compile_cannot_help_warns_and_runs_without_it(spec, reason):
    with pytest.warns(CompileWarning, match=f"torch.compile is not used: {reason}"):
        model = nestc.load(spec, backend="compiled", compile=True)
    assert model.compile_backend is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(torch.randint(0, model.vocab, (1, 5)))


def test_layer_by_layer_compiles_memory_rules_beside_an_attention_cache():
    spec = DELTANET.replace("rmsnorm |> ffn", "rmsnorm |> attn") + "level attn : cache(window=8)\n"
    eager, compiled = _pair(spec, compile="aot_eager")
    assert compiled.compile_backend == "aot_eager"
    tokens = torch.randint(0, eager.vocab, (2, 70), generator=torch.Generator().manual_seed(3))
    expected, _, expected_grads = _run(eager, tokens, 64)
    actual, _, actual_grads = _run(compiled, tokens, 64)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    for a, b in zip(actual_grads, expected_grads, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 2  # segments of 64 and of 6

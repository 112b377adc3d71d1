"""`nestc.layer`: a spec's layer stack, or one level, as a PyTorch layer on hidden states, equal to
the same layers inside nestc's own model; and `nestc.load_run` from the top level."""

from __future__ import annotations

import pathlib
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from safetensors.torch import load_file
from torch import nn

import nestc
from nestc.backends.common import BackendError
from nestc.cli import cli
from nestc.runtime import rundir
from nestc.runtime.checkpoint import CheckpointError

# A delta-rule mixer (every token), a chunked MLP memory with a short convolution (every 4:
# segments and anchors), softmax attention (a KV cache) and a frozen feed-forward block.
SPEC = """
level mixer : matrix {
    key = x |> proj |> l2norm
    value = x |> proj
    query = x |> proj |> l2norm
    lr = x |> proj |> sigmoid
    objective l2
    optimizer gd
    every 1
    read after
}

level chunked : mlp(depth=1, residual=true, norm=layernorm) {
    key = x |> proj |> conv(4)
    value = x |> proj
    query = x |> proj |> conv(4)
    lr = x |> proj |> sigmoid(max=1.0)
    objective l2
    optimizer gd
    every 4
    read after
    init meta
}

level attn : cache {
    key = x |> proj |> rope
    query = x |> proj |> rope
}

level ffn : mlp(expand=2, residual=false)

model {
    vocab 32
    dim 16
    heads 2
    layers 2
    block = residual(rmsnorm |> mixer) |> residual(rmsnorm |> chunked) |> residual(rmsnorm |> attn)
        |> residual(rmsnorm |> ffn)
}
"""
# Titans MAC, small: memory-as-context couples the layers inside a segment, so the compiled
# backend runs its segment schedule (not layer by layer).
MAC_SPEC = ((pathlib.Path(__file__).parent.parent / "specs" / "titans_mac.nest").read_text(encoding="utf-8")
            .replace("dim 64", "dim 16").replace("segment=64", "segment=4").replace("persistent=4", "persistent=2")
            .replace('import "lib/', 'import "specs/lib/'))
LEVELS = ("mixer", "chunked", "attn", "ffn")  # in block order, each behind its own rmsnorm
BACKENDS = ("reference", "compiled")
T = 11  # crosses two chunk ends of `chunked` (every 4); split at 5, mid-chunk


@pytest.fixture(autouse=True)
def _at_root(monkeypatch, request):
    monkeypatch.chdir(request.config.rootpath)
    warnings.simplefilter("ignore")  # CompileWarning: the test spec's attention is fine as it runs


def _model(backend: str, spec: str = SPEC):
    torch.manual_seed(0)
    return nestc.load(spec, backend=backend).double()


def _assert_equal(a, b):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", [SPEC, MAC_SPEC], ids=["deltanet-chunked-attention", "titans-mac"])
def test_the_layer_stack_equals_the_models_layers_and_carries_its_state(spec, backend):
    model = _model(backend, spec)
    assert backend == "reference" or model.layer_by_layer == (spec == SPEC)
    torch.manual_seed(1)  # other fresh weights, then the model's copied in by name
    layer = nestc.layer(spec, backend=backend).double()
    stack = {name: value for name, value in model.state_dict().items() if name.startswith("layers.")}
    assert set(layer.state_dict()) == set(stack)
    layer.load_state_dict(stack)
    tokens = torch.randint(0, model.vocab, (2, T))
    expected, _ = model(tokens)
    hidden = model.embedding(tokens)
    y, state = layer(hidden)
    assert y.shape == hidden.shape and state.position == T
    _assert_equal(model.logits(y), expected)
    first, carried = layer(hidden[:, :5])
    rest, carried = layer(hidden[:, 5:], carried)
    _assert_equal(torch.cat([first, rest], dim=1), y)
    assert not torch.allclose(rest, layer(hidden[:, 5:])[0])  # the state carried something


@pytest.mark.parametrize("spec, name", [(SPEC, None), ("specs/hope.nest", "mem")], ids=["stack", "hope-mem"])
def test_both_backends_give_the_same_layer(spec, name):
    """Hope's `mem` reads inputs its generator levels make (fused into one call when compiled)."""
    reference = nestc.layer(_model("reference", spec), name=name, backend="reference")
    compiled = nestc.layer(_model("compiled", spec), name=name, backend="compiled")
    hidden = torch.randn(2, 7, reference.dim, dtype=torch.float64)
    _assert_equal(compiled(hidden)[0], reference(hidden)[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_level_equals_that_level_inside_the_model(backend):
    """The model's logits rebuilt from one-level layers: each layer's residual adds the level's
    output on the rmsnorm of the stream, with the model's own norms and head around them."""
    model = _model(backend)
    tokens = torch.randint(0, model.vocab, (2, T))
    expected, _ = model(tokens)
    x = model.embedding(tokens)
    for index, model_layer in enumerate(model.layers):
        norms = list(model_layer.parts.values())
        for name, norm in zip(LEVELS, norms):
            level = nestc.layer(model, name=name, backend=backend, index=index)
            theirs = model_layer.levels[name].state_dict()
            assert all(torch.equal(value, theirs[key.split(f"levels.{name}.", 1)[1]])
                       for key, value in level.state_dict().items())
            output, _ = level(norm(x))
            x = x + output
    _assert_equal(model.logits(x), expected)


def test_a_trained_run_gives_its_model_and_its_layers(tmp_path):
    runs = tmp_path / "runs"
    result = CliRunner().invoke(cli, ["run", "specs/deltanet.nest", "--set", "model.dim=16", "--set", "model.heads=2",
                                      "--set", "model.layers=1", "--set", "train.batch=2", "--set",
                                      "train.context=16", "--steps", "2", "--runs", str(runs)])
    assert result.exit_code == 0, result.output
    (run,) = list(runs.iterdir())
    model = nestc.load_run(str(run))
    saved = load_file(rundir.latest(str(run)).model_file)
    assert set(model.state_dict()) == set(saved)
    assert all(torch.equal(value, saved[name]) for name, value in model.state_dict().items())
    layer = nestc.layer(str(run))
    assert all(torch.equal(value, saved[name]) for name, value in layer.state_dict().items())
    tokens = torch.randint(0, model.vocab, (1, 6))
    with torch.no_grad():
        expected, _ = model(tokens)
        y, _ = layer(model.embedding(tokens))
    torch.testing.assert_close(model.logits(y), expected)
    with pytest.raises(CheckpointError, match="is not a run directory"):
        nestc.load_run(str(tmp_path))


class _TinyLanguageModel(nn.Module):
    """What a user writes around the layer: an embedding, the layer, a linear head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(8, 16)
        self.mix = nestc.layer(SPEC)
        self.head = nn.Linear(16, 8)

    def forward(self, tokens):
        y, _ = self.mix(self.embed(tokens))
        return self.head(y)


def test_the_layer_trains_inside_a_users_module():
    torch.manual_seed(0)
    net = _TinyLanguageModel()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2)
    # each row counts up modulo 8 from its own start: the next token is always learnable
    tokens = (torch.arange(16)[None, :] + torch.tensor([[0], [3], [5]])) % 8
    losses = []
    for _ in range(30):
        logits = net(tokens)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, 8), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.mix.layers[0].levels["mixer"].parameters())
    assert losses[-1] < 0.3 * losses[0], losses


def test_wrong_inputs_and_levels_without_a_map_of_their_own_are_clear_errors():
    layer = nestc.layer(SPEC)
    for shape in [(2, 5, 8), (2, 5)]:
        with pytest.raises(ValueError, match=re.escape("maps hidden states [batch, time, 16] (model.dim = 16)")):
            layer(torch.zeros(shape))
    with pytest.raises(ValueError, match="no level `mixr` in the model's layers; available: mixer, chunked, attn, ffn"):
        nestc.layer(SPEC, name="mixr")
    with pytest.raises(BackendError, match=r"level `cms_fast` learns in context from the model's next-token loss"):
        nestc.layer("specs/cms.nest")
    with pytest.raises(BackendError, match=r"level `cms_fast` learns in context .* run it inside the model"):
        nestc.layer("specs/cms.nest", name="cms_fast")
    with pytest.raises(BackendError, match=r"`lmm` runs inside the memory-as-context block .* take the whole layer "
                                           r"stack \(name=None\)"):
        nestc.layer("specs/titans_mac.nest", name="lmm")
    with pytest.raises(BackendError, match="level `mk` has no output of its own: it generates the inputs of `mem`"):
        nestc.layer("specs/hope.nest", name="mk")
    with pytest.raises(ValueError, match="layer 5 of the model has no level `mixer`; the layers that have one: 0, 1"):
        nestc.layer(nestc.load(SPEC), name="mixer", index=5)
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        nestc.layer(SPEC, backend="fast")
    with pytest.raises(ValueError, match="is not one of its states"):
        layer(torch.zeros(1, 2, 16), nestc.layer(SPEC, name="ffn")(torch.zeros(1, 2, 16))[1])


def test_the_readme_example_runs():
    readme = open("README.md", encoding="utf-8").read()
    section = readme.split("## Use it in your own PyTorch code", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    exec(compile(code, "README.md", "exec"), {})

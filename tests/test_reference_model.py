"""The reference backend as a whole model: every spec runs, streams, and differentiates correctly."""

from __future__ import annotations

import glob
import random

import pytest
import torch
import torch.nn.functional as F

import nestc
from nestc.search import space
from nestc.backends.outer import MultiRateStepper
from nestc.backends.state import LevelState, ModelState
from nestc.lang.sema import analyze_source
from nestc.lang.source import SourceFile

ZOO = sorted(glob.glob("specs/*.nest"))
T_ODD = 19  # a multiple of no chunk size used in the zoo


@pytest.fixture(autouse=True)
def _at_root(monkeypatch, request):
    monkeypatch.chdir(request.config.rootpath)


def _loss(logits, tokens):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def _tensors(value):
    """Every tensor inside a state, in a fixed order."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for key in sorted(value):
            yield from _tensors(value[key])
    elif isinstance(value, (LevelState, ModelState)):
        for name in value.__dataclass_fields__:
            yield from _tensors(getattr(value, name))


@pytest.mark.parametrize("spec", ZOO)
def test_every_zoo_spec_runs_forward_and_backward(spec):
    torch.manual_seed(0)
    model = nestc.load(spec)
    # nn.Module.apply reaches every module (no module hides it with a method of its own), as the
    # tools that walk a model with it need (transformers' weight initialization)
    visited = []
    model.apply(visited.append)
    assert {id(m) for m in visited} == {id(m) for m in model.modules()}
    tokens = torch.randint(0, model.vocab, (2, T_ODD))
    logits, _ = model(tokens)
    assert logits.shape == (2, T_ODD, model.vocab)
    assert torch.isfinite(logits).all()
    loss = _loss(logits, tokens)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    # the embedding always learns: a zero gradient there would mean a broken graph
    assert model.embedding.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("spec", ZOO)
def test_split_calls_equal_one_call(spec):
    """Streaming: two calls with the state carried give the logits and state of one call."""
    torch.manual_seed(1)
    model = nestc.load(spec)
    tokens = torch.randint(0, model.vocab, (2, T_ODD))
    with torch.no_grad():
        whole, whole_state = model(tokens)
        first, state = model(tokens[:, :7])
        second, split_state = model(tokens[:, 7:], state)
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole, rtol=1e-5, atol=1e-5)
    assert split_state.position == whole_state.position == T_ODD
    for a, b in zip(_tensors(split_state), _tensors(whole_state), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _variants(path: str, limit: int):
    """Frozen variants of a space: the whole grid when small, else a seeded sample."""
    search = space.load(path)
    try:
        assignments = list(search.grid())
    except ValueError:  # a loguniform dimension: sample
        rng = random.Random(0)
        assignments = [search.sample(rng) for _ in range(limit)]
    rng = random.Random(0)
    if len(assignments) > limit:
        assignments = rng.sample(assignments, limit)
    return [search.freeze(a) for a in assignments]


@pytest.mark.parametrize("path,limit", [("specs/spaces/deltanet_space.nest", 27), ("specs/spaces/hope_space.nest", 4)])
def test_space_variants_build_and_run(path, limit):
    for text in _variants(path, limit):
        result = analyze_source(SourceFile(path, text))
        assert result.ok, [d.message for d in result.diagnostics]
        from nestc.backends.reference import build

        model = build(result.program)
        tokens = torch.randint(0, model.vocab, (1, 9))
        logits, _ = model(tokens)
        _loss(logits, tokens).backward()
        assert torch.isfinite(logits).all()


TINY = """
level mem : {state} {{
    key = x |> proj |> l2norm
    value = x |> proj
    query = x |> proj |> l2norm
    lr = x |> proj |> sigmoid
    retain = x |> proj |> sigmoid
    {extra}
}}
level ffn : mlp(expand=2, residual=false)
model {{
    vocab 7
    dim 8
    heads 2
    layers 1
    block = residual(rmsnorm |> mem) |> residual(rmsnorm |> ffn)
}}
"""

FD_CASES = {
    "matrix-gd": TINY.format(state="matrix", extra="objective l2\n    every 1"),
    "matrix-momentum-chunked": TINY.format(state="matrix",
                                           extra="objective l2\n    optimizer momentum\n    every 4\n    read before"),
    "vector-dot": TINY.format(state="vector", extra="objective dot\n    every 1"),
    "mlp-dgd-meta": TINY.format(state="mlp(depth=2, expand=2)",
                                extra="objective l2\n    optimizer dgd\n    every 2\n    init meta"),
    "attention": TINY.format(state="cache(window=3)", extra="").replace(
        "    lr = x |> proj |> sigmoid\n    retain = x |> proj |> sigmoid\n", ""),
    "cms": """
level cms : mlp(expand=2) {
    objective task
    lr = 0.1
    every 2
    meta full    # first-order updates (the default) are not differentiated, by design
}
model {
    vocab 7
    dim 8
    heads 2
    block = residual(rmsnorm |> cms)
}
""",
}


@pytest.mark.parametrize("case", sorted(FD_CASES))
def test_outer_gradients_match_finite_differences(case):
    """The outer gradient flows through the inner updates: autograd's directional derivative
    equals a central finite difference of the loss (float64), along random directions."""
    torch.manual_seed(2)
    model = nestc.load(FD_CASES[case]).double()
    tokens = torch.randint(0, 7, (2, 7))
    parameters = [p for p in model.parameters()]

    def loss_at(shift: float, direction) -> torch.Tensor:
        with torch.no_grad():
            for p, d in zip(parameters, direction):
                p.add_(shift * d)
        try:
            logits, _ = model(tokens)
            return _loss(logits, tokens)
        finally:
            with torch.no_grad():
                for p, d in zip(parameters, direction):
                    p.sub_(shift * d)

    logits, _ = model(tokens)
    loss = _loss(logits, tokens)
    grads = torch.autograd.grad(loss, parameters, allow_unused=True)
    for _ in range(2):
        direction = [torch.randn_like(p) for p in parameters]
        analytic = sum((g * d).sum() for g, d in zip(grads, direction) if g is not None)
        eps = 1e-6  # the loss is strongly curved around the tiny initial projections
        with torch.no_grad():
            numeric = (loss_at(eps, direction) - loss_at(-eps, direction)) / (2 * eps)
        torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-8)


CMS_SPEC = """
level cms : mlp(expand=2) {
    objective task
    lr = 0.5
    every 4
}
level frozen_memory : matrix {
    objective l2
    frozen
    init meta
}
model {
    vocab 11
    dim 8
    heads 2
    block = residual(rmsnorm |> cms) |> residual(rmsnorm |> frozen_memory)
}
"""


def test_continuum_levels_change_exactly_at_chunk_boundaries_and_frozen_levels_never():
    torch.manual_seed(3)
    model = nestc.load(CMS_SPEC)
    tokens = torch.randint(0, 11, (2, 13))
    state = None
    history = []
    for t in range(tokens.shape[1]):
        _, state = model(tokens[:, t:t + 1], state)
        levels = state.levels[0]
        history.append(([w.detach().clone() for w in levels["cms"].weights],
                        [w.detach().clone() for w in levels["frozen_memory"].weights]))
    initial_frozen = history[0][1]
    for t in range(1, len(history)):
        changed = any(not torch.equal(a, b) for a, b in zip(history[t][0], history[t - 1][0]))
        # the chunk of positions 4k-4 .. 4k-1 is complete when the token at 4k arrives
        assert changed == (t % 4 == 0), f"cms changed={changed} at position {t}"
        assert all(torch.equal(a, b) for a, b in zip(history[t][1], initial_frozen))


def test_continuum_update_is_the_chunk_loss_gradient():
    """Hand derivation: after the first chunk, a sample's fast weights are W0 - lr * dL/dW0 where
    L is that sample's summed next-token loss over the chunk, computed here with plain autograd."""
    torch.manual_seed(4)
    model = nestc.load(CMS_SPEC.replace("every 4", "every 2")).double()
    tokens = torch.randint(0, 11, (2, 3))
    _, state = model(tokens)
    level = model.layers[0].levels["cms"]
    initial = [w.detach().clone().requires_grad_() for w in level.kernel.initial]
    # the same network, written out by hand for the chunk's two positions with the initial weights
    hidden = [model.embedding.weight[tokens[:, t]] for t in range(2)]
    total = 0.0
    memory = model.layers[0].levels["frozen_memory"]
    norms = model.layers[0].parts
    for t in range(2):
        x = hidden[t]
        h = norms["b_0_r_0"](x)
        up = torch.einsum("oi,bi->bo", initial[0][0], h)  # [0]: the single "head" of a full-width MLP
        y = torch.einsum("oi,bi->bo", initial[1][0], F.gelu(up)) + h
        x = x + y
        h2 = norms["b_1_r_0"](x)
        heads = h2.reshape(2, 2, 4)
        q = heads
        for stage in memory.pipelines["query"].stages:
            q = stage(q.reshape(2, 8), t, LevelState()).reshape(2, 2, 4)
        read = torch.einsum("hvk,bhk->bhv", memory.kernel.initial[0], q).reshape(2, 8)
        x = x + memory.out(read)
        logits = model.logits(x)
        total = total + F.cross_entropy(logits, tokens[:, t + 1], reduction="none")
    # Each sample's fast weights follow that sample's own loss.
    for sample in range(2):
        grads = torch.autograd.grad(total[sample], initial, retain_graph=True)
        expected = [w - 0.5 * g for w, g in zip(initial, grads)]
        for got, want in zip(state.levels[0]["cms"].weights, expected):
            torch.testing.assert_close(got[sample], want, rtol=1e-8, atol=1e-10)


def test_stop_gradient_writes_cut_the_outer_gradient():
    spec = TINY.format(state="matrix", extra="objective l2\n    every 1\n    meta stop")
    model = nestc.load(spec)
    tokens = torch.randint(0, 7, (2, 6))
    logits, _ = model(tokens)
    _loss(logits, tokens).backward()
    # keys and values reach the output only through writes, which `meta stop` cuts
    for role in ("key", "value"):
        projection = model.layers[0].levels["mem"].pipelines[role].stages[0].linear.weight
        assert projection.grad is None or projection.grad.abs().max() == 0
    full = nestc.load(spec.replace("meta stop", "meta full"))
    full.load_state_dict(model.state_dict())
    logits, _ = full(tokens)
    _loss(logits, tokens).backward()
    assert full.layers[0].levels["mem"].pipelines["key"].stages[0].linear.weight.grad.abs().max() > 0


def test_levels_updated_every_n_steps_move_only_on_their_steps():
    spec = """
level slow : mlp(expand=2, residual=false) {
    every 2 steps
}
model {
    vocab 5
    dim 4
    block = residual(rmsnorm |> slow)
}
"""
    torch.manual_seed(5)
    model = nestc.load(spec)
    slow = model.layers[0].levels["slow"].kernel.initial[0]
    embedding = model.embedding.weight
    stepper = MultiRateStepper(torch.optim.SGD(model.parameters(), lr=0.1), model)
    tokens = torch.randint(0, 5, (2, 6))
    before_slow, grads = slow.detach().clone(), []
    for step in range(4):
        before_embedding = embedding.detach().clone()
        logits, _ = model(tokens)
        _loss(logits, tokens).backward()
        grads.append(slow.grad.detach().clone())
        stepper.step(step)
        assert not torch.equal(embedding, before_embedding)
        if step % 2 == 0:
            assert torch.equal(slow, before_slow)
        else:
            # one SGD step with the gradient accumulated over the two steps
            torch.testing.assert_close(slow.detach(), before_slow - 0.1 * grads[-1], rtol=1e-6, atol=1e-7)
            before_slow = slow.detach().clone()


MAC_WITH_CONVOLVED_QUERY = """
level mem : mlp(depth=2, expand=2) {
    key = x |> proj
    value = x |> proj
    query = x |> proj |> conv(3)
    objective l2
    optimizer gd
    every 2
    read before
}
level attn : cache
model {
    vocab 11
    dim 8
    heads 2
    block = residual(rmsnorm |> mac(memory=mem, attention=attn, segment=4, persistent=1))
}
"""


def test_mac_read_out_keeps_its_own_convolution_history():
    """The memory's query pipeline reads two streams in a MAC block: the block's input (the
    read-out) and the attention outputs (the memory's own step). The read-out's history holds
    only the input stream: changing the attention, which changes the outputs, leaves it alone."""
    torch.manual_seed(0)
    model = nestc.load(MAC_WITH_CONVOLVED_QUERY)
    tokens = torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(1))

    def histories():
        with torch.no_grad():
            _, state = model(tokens)
        (read_out,) = [s for path, s in state.segments[0].items() if path.endswith(":retrieval")]
        return list(read_out.buffers.values())[0], list(state.levels[0]["mem"].buffers.values())
    read_out, own = histories()
    with torch.no_grad():
        model.layers[0].levels["attn"].out.weight.mul_(3.0)
    changed_read_out, changed_own = histories()
    torch.testing.assert_close(changed_read_out, read_out, rtol=0, atol=0)
    assert any(not torch.equal(a, b) for a, b in zip(changed_own, own))

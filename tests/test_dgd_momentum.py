"""The inner optimizer `dgd_momentum` (DGD with momentum, NL Table 6): for each linear map W with
input u, S_t = momentum_t S_{t-1} - lr_t g_t and W_t = W_{t-1} (retain_t I - lr_t u_t u_t^T) + S_t.
Its token step against those equations by hand, its `layered` closed form against the reference
(float64), and momentum 0 against `dgd`."""

from __future__ import annotations

import warnings

import pytest
import torch

import nestc
from nestc.backends import compiled, reference
from nestc.backends.state import LevelState
from nestc.passes.fusion import FusionGroup
from nestc.passes.plan import plan_level, plan_program
from oracles import kernel
from test_compiled import LEVEL, _pair, _run, assert_equivalent
from test_fusion import assert_fused_equals_unfused, generators
from test_reference_model import _tensors

# A data-dependent gate in [0, 1] (the momentum gate's; lr and retain are LEVEL's own, data-dependent too)
GATE = "x |> proj |> sigmoid"
EXACT = (1e-10, 1e-10)


def _stream(seed: int, *shape) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("backend", ["reference", "compiled"])
def test_two_tokens_follow_the_equations_by_hand(backend):
    """A 2 x 3 matrix memory with objective l2 under `every 2`, from a nonzero W_0 and S_0: both
    tokens take their gradient at the anchor W_0, g_t = (W_0 k_t - v_t) k_t^T, while the decay
    along the input acts on the current W_{t-1}. The reads (read after) are W_t q_t."""
    kern = kernel("objective l2\noptimizer dgd_momentum\nevery 2", heads=1, key_dim=3, value_dim=2)
    k, q = _stream(1, 1, 2, 1, 3), _stream(2, 1, 2, 1, 3)
    v = _stream(3, 1, 2, 1, 2)
    w0, s0 = _stream(4, 2, 3), _stream(5, 2, 3)
    lr, retain, momentum = (0.4, 0.3), (0.9, 0.8), (0.7, 0.5)
    gates = {name: torch.tensor(values, dtype=torch.float64).reshape(1, 2, 1)
             for name, values in (("lr", lr), ("retain", retain), ("momentum", momentum))}
    state = LevelState(weights=[w0[None, None].clone()], anchor=[w0[None, None].clone()],
                       momentum=[s0[None, None].clone()])
    run = reference.run_kernel if backend == "reference" else compiled.run_kernel
    with torch.no_grad():
        y, state = run(kern, k, v, q, gates, state=state)

    eye = torch.eye(3, dtype=torch.float64)
    w, s, reads = w0, s0, []
    for t in range(2):
        key, value = k[0, t, 0], v[0, t, 0]
        grad = torch.outer(w0 @ key - value, key)  # at the anchor W_0
        s = momentum[t] * s - lr[t] * grad
        w = w @ (retain[t] * eye - lr[t] * torch.outer(key, key)) + s
        reads.append(w @ q[0, t, 0])
    torch.testing.assert_close(y[0, :, 0], torch.stack(reads), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state.weights[0][0, 0], w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state.momentum[0][0, 0], s, rtol=1e-12, atol=1e-12)
    # the momentum carried something: plain dgd from the same start ends elsewhere
    without = w0
    for t in range(2):
        key, value = k[0, t, 0], v[0, t, 0]
        without = without @ (retain[t] * eye - lr[t] * torch.outer(key, key)) - lr[t] * torch.outer(
            w0 @ key - value, key)
    assert (w - without).abs().max() > 0.1


def _level(state: str, objective: str, every: int, read: str, order: str = "grad_first",
           momentum: str = GATE, optimizer: str = "dgd_momentum") -> str:
    fields = (f"objective {objective}\n    optimizer {optimizer}\n    every {every}\n    read {read}\n"
              f"    order {order}")
    if optimizer == "dgd_momentum":
        fields += f"\n    momentum = {momentum}"
    return LEVEL.format(state=state, fields=fields, retain=GATE, value="x |> proj")


@pytest.mark.parametrize("state, objective, every, read, order", [
    ("matrix", "l2", 4, "before", "grad_first"),
    ("matrix", "l2", 4, "after", "grad_first"),
    ("matrix", "l2", 4, "after", "decay_first"),
    ("matrix", "dot", 1, "after", "grad_first"),  # online: the error ignores the state
    ("mlp(depth=2, expand=2)", "l2", 4, "before", "grad_first"),
    ("mlp(depth=2, expand=2)", "l2", 4, "after", "grad_first"),
    ("glu(expand=1, residual=false)", "l2", 4, "after", "grad_first"),
])
def test_the_layered_form_equals_the_reference(state, objective, every, read, order):
    """Planned `layered` (not the token loop), with data-dependent lr, retain and momentum gates,
    over 41 tokens in two calls (18 + 23: under `every 4`, 11 chunks of a segment each, the chunk
    16-20 split in two by the calls with its anchor carried across; under `every 1`, one segment
    per call): the logits, the final weights, anchors and momentum buffers, and every parameter's
    outer gradient equal the reference's."""
    program = nestc.check(_level(state, objective, every, read, order))
    assert plan_level(program.level("mem")).kernel == "layered"
    fast = assert_equivalent(program, length=41, split=18, tolerance=EXACT)
    assert fast.plans["mem"].kernel == "layered"


def test_read_before_every_token_steps_token_by_token_and_says_why():
    program = nestc.check(_level("matrix", "dot", 1, "before"))
    plan = plan_level(program.level("mem"))
    assert plan.kernel == "sequential"
    assert "the layered form has no `read before` for a memory updated every token" in plan.reason


@pytest.mark.parametrize("state", ["matrix", "mlp(depth=2, expand=2)"])
@pytest.mark.parametrize("read", ["before", "after"])
def test_momentum_zero_is_dgd(state, read):
    """With momentum 0 the buffer holds only the last step: the reference computes dgd's logits
    and states exactly (W + (0 S - lr g) is W - lr g in floating point), and its outer gradients
    to rounding (their backward adds the buffer's zero terms in another order); the compiled form
    all three to rounding."""
    programs = [nestc.check(_level(state, "l2", 4, read, optimizer=optimizer, momentum="0.0"))
                for optimizer in ("dgd", "dgd_momentum")]
    tokens = torch.randint(0, 9, (2, 19), generator=torch.Generator().manual_seed(1))
    dgd_ref, dgd_fast = _pair(programs[0], torch.float64)
    with_ref, with_fast = _pair(programs[1], torch.float64)
    with_ref.load_state_dict(dgd_ref.state_dict())
    with_fast.load_state_dict(dgd_ref.state_dict())
    for dgd, with_momentum, exact in ((dgd_ref, with_ref, True), (dgd_fast, with_fast, False)):
        expected, expected_state, expected_grads = _run(dgd, tokens, 7)
        actual, actual_state, actual_grads = _run(with_momentum, tokens, 7)
        weights = [[(s.weights, s.anchor) for layer in state.levels for s in layer.values()]
                   for state in (expected_state, actual_state)]
        values = [(actual, expected), *zip(_tensors(weights[1]), _tensors(weights[0]), strict=True)]
        for a, b in values:
            if exact:
                assert torch.equal(a, b)
            else:
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        assert len(values) >= 3 and len(actual_grads) > 5
        for a, b in zip(actual_grads, expected_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_two_generators_fuse_and_equal_the_reference_and_unfused():
    """Two dgd_momentum generators of one memory run as one stacked layered call: their momentum
    buffers are stacked with their weights."""
    program = nestc.check(generators(optimizer="dgd_momentum", momentum=f"\n    momentum = {GATE}",
                                     retain=GATE, lr1="x |> proj |> sigmoid(max=0.5)", every2=4))
    assert plan_program(program).fused == (FusionGroup("layered", ("g1", "g2")),)
    assert_equivalent(program, length=13, split=6, tolerance=EXACT)
    assert_fused_equals_unfused(program, length=13, cuts=[6])


def test_a_dgd_and_a_dgd_momentum_generator_do_not_fuse():
    """Both plan to layered, but one call computes one optimizer: they stay apart, each its own rule."""
    text = generators(optimizer="dgd")
    second = text.index("level g2")
    text = text[:second] + text[second:].replace("optimizer dgd\n", "optimizer dgd_momentum\n    momentum = 0.8\n", 1)
    program = nestc.check(text)
    plan = plan_program(program)
    assert (plan.levels["g1"].kernel, plan.levels["g2"].kernel) == ("layered", "layered")
    assert plan.fused == ()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", compiled.CompileWarning)
        assert_equivalent(program, length=13, split=6, tolerance=EXACT)

"""The gated-MLP state `glu` (SwiGLU): M(x) = [x +] norm(W2 (act(W1 x) * (W3 x))). As a frozen
feed-forward block and as a memory (its per-token gradient by autograd in the reference), against
hand-written torch; compiled (the layered and trajectory forms) == reference in float64; the
estimate's count."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import nestc
from nestc.backends import compiled, reference
from nestc.backends.reference import run_kernel
from nestc.passes.estimate import estimate
from nestc.passes.plan import plan_level
from nesttest import spec
from oracles import kernel
from test_compiled import assert_equivalent

DIM = 128


def swiglu(x, first, linear, last):
    """By hand, on the last dim: last (silu(first x) * (linear x))."""
    return (F.silu(x @ first.T) * (x @ linear.T)) @ last.T


@pytest.mark.parametrize("residual, norm", [(False, "none"), (True, "layernorm")])
def test_a_frozen_glu_is_a_swiglu_feed_forward_block(residual, norm):
    text = f"level ffn : glu(expand=2, residual={str(residual).lower()}, norm={norm})"
    program = nestc.check(spec(text, block="residual(ffn)"))
    torch.manual_seed(0)
    ffn = reference.build(program).double().layers[0].levels["ffn"]
    first, linear, last = (w[0] for w in ffn.kernel.initial)  # one head: [out, in]
    assert (first.shape, linear.shape, last.shape) == ((256, DIM), (256, DIM), (DIM, 256))
    x = torch.randn(3, DIM, dtype=torch.float64)
    expected = swiglu(x, first, linear, last)
    if norm == "layernorm":
        expected = F.layer_norm(expected, (DIM,))
    if residual:
        expected = x + expected
    with torch.no_grad():
        torch.testing.assert_close(ffn.step(x, 0, ffn.initial_state(3, x), None), expected, rtol=1e-12, atol=1e-12)


def test_one_step_of_a_glu_memory_is_its_gradient_by_hand():
    """objective l2, gd with lr 0.3, gelu branch: after token 0 each map W moves by -0.3 dL/dW of
    L = 1/2 |W2 (gelu(W1 k) * (W3 k)) - v|^2, written out by the chain rule."""
    kern = kernel("objective l2\nlr = 0.3\nevery 1", heads=2, key_dim=4, value_dim=3,
                  state="glu(expand=1.5, act=gelu, residual=false)").double()
    g = torch.Generator().manual_seed(0)
    k, q = (torch.randn(1, 1, 2, 4, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(1, 1, 2, 3, generator=g, dtype=torch.float64)
    first, linear, last = (w.detach().clone() for w in kern.initial)  # [H, out, in]
    with torch.no_grad():
        _, state = run_kernel(kern, k, v, q, {"lr": torch.full((1, 1, 2), 0.3, dtype=torch.float64)})
    key, value = k[0, 0], v[0, 0]  # [H, d]
    a, b = torch.einsum("hoi,hi->ho", first, key), torch.einsum("hoi,hi->ho", linear, key)
    gelu_slope = 0.5 * (1 + torch.erf(a / math.sqrt(2))) + a * torch.exp(-a * a / 2) / math.sqrt(2 * math.pi)
    hidden = F.gelu(a) * b
    error = torch.einsum("hoi,hi->ho", last, hidden) - value
    back = torch.einsum("hoi,ho->hi", last, error)
    expected = [first - 0.3 * torch.einsum("ho,hi->hoi", back * b * gelu_slope, key),
                linear - 0.3 * torch.einsum("ho,hi->hoi", back * F.gelu(a), key),
                last - 0.3 * torch.einsum("ho,hi->hoi", error, hidden)]
    for actual, wanted in zip(state.weights, expected, strict=True):
        torch.testing.assert_close(actual[0], wanted, rtol=1e-12, atol=1e-12)


MEMORY = """level mixer : glu(expand=2, residual=true, norm=rmsnorm) {{
    key = x |> proj |> l2norm
    lr = x |> proj |> sigmoid(max=0.1)
    retain = {retain}
    objective l2
    optimizer {optimizer}
    order {order}
    every {every}
    read {read}
}}
"""
PER_HEAD = "x |> proj(bias=true) |> sigmoid"
PER_CHANNEL = "x |> proj(per=channel, bias=true) |> sigmoid"


@pytest.mark.parametrize("optimizer, every, read, order, retain, form", [
    ("gd", 4, "after", "grad_first", PER_HEAD, "layered"),
    ("momentum", 4, "before", "grad_first", PER_HEAD, "layered"),
    ("dgd", 4, "after", "grad_first", PER_HEAD, "layered"),
    ("gd", 4, "after", "decay_first", PER_HEAD, "layered"),
    ("momentum", 4, "after", "grad_first", PER_CHANNEL, "trajectory"),
    ("gd", 1, "after", "grad_first", PER_HEAD, "sequential"),  # every 1: the gradient moves with the state
])
def test_a_glu_memory_in_its_segment_form_equals_the_reference(optimizer, every, read, order, retain, form):
    """The layered form's backward through W2 (act(W1 k) * (W3 k)), written out by hand, and the
    trajectory form on it, against the reference's autograd step by step: logits, states, outer
    gradients."""
    text = MEMORY.format(optimizer=optimizer, every=every, read=read, order=order, retain=retain)
    program = nestc.check(spec(text + "level ffn : glu(residual=false)\n",
                               block="residual(rmsnorm |> mixer) |> residual(rmsnorm |> ffn)"))
    assert plan_level(program.level("mixer")).kernel == form
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", compiled.CompileWarning)
        assert_equivalent(program, length=19, split=7)


def test_the_estimate_counts_three_maps():
    """A glu block of width 128 and expand 3: W1 and W3 [384, 128], W2 [128, 384]."""
    program = nestc.check(spec("level ffn : glu(expand=3, residual=false)", block="residual(ffn)"))
    mlp = nestc.check(spec("level ffn : mlp(expand=3, residual=false)", block="residual(ffn)"))
    assert estimate(program).parameters - estimate(mlp).parameters == 384 * 128
    assert sum(p.numel() for p in reference.build(program).parameters()) == estimate(program).parameters

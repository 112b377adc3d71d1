"""The output norm and output gate of a level: o = out(norm(y) * gate(x)), y the heads' read-out
(GDN, RetNet, FoX-Pro). Checked against a hand-written torch computation, compiled == reference in
float64 (fused, and attention), the estimate's exact parameter count, and the checker's refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import nestc
from nestc.backends import reference
from nestc.backends.common import BackendError
from nestc.passes.estimate import estimate
from nesttest import analyze, only, spec
from test_compiled import assert_equivalent

DIM, HEADS = 128, 4
HEAD = DIM // HEADS


def by_hand_norm(kind: str, y: torch.Tensor) -> torch.Tensor:
    """Each head's read-out normalised over its channels, without affine parameters."""
    if kind == "rmsnorm":
        return y / torch.sqrt(y.pow(2).mean(-1, keepdim=True) + torch.finfo(y.dtype).eps)
    centred = y - y.mean(-1, keepdim=True)
    return centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + 1e-5)


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
def test_a_gated_normalised_read_out_by_hand(norm):
    """Linear attention (objective dot, lr 1: M_t = sum_s v_s k_s^T) read after two tokens, then
    o = W_o (norm(M q) * g * silu(W_g x)) with the norm's gain g per channel of a head."""
    text = ("level mixer : matrix {\n    objective dot\n    every 1\n"
            f"    output_norm {norm}\n    output_gate = x |> proj |> silu\n}}\n")
    program = nestc.check(spec(text))
    torch.manual_seed(0)
    model = reference.build(program).double()
    level = model.layers[0].levels["mixer"]
    with torch.no_grad():
        level.output_norm.gain.uniform_(0.5, 1.5)  # not the ones it starts at
    x = torch.randn(2, 3, DIM, dtype=torch.float64)  # [token, batch, width]
    state = level.initial_state(3, x)
    with torch.no_grad():
        outputs = [level.step(x[t], t, state, None) for t in range(2)]
    weight = {role: level.pipelines[role].stages[0].linear.weight for role in ("key", "value", "query")}
    k, v, q = ((x @ weight[role].T).reshape(2, 3, HEADS, HEAD) for role in ("key", "value", "query"))
    memory = torch.zeros(3, HEADS, HEAD, HEAD, dtype=torch.float64)
    gate_weight = level.output_gate.stages[0].linear.weight
    for t in range(2):
        memory = memory + torch.einsum("bhv,bhk->bhvk", v[t], k[t])
        y = torch.einsum("bhvk,bhk->bhv", memory, q[t])
        normed = by_hand_norm(norm, y) * level.output_norm.gain
        gated = normed.reshape(3, DIM) * F.silu(x[t] @ gate_weight.T)
        torch.testing.assert_close(outputs[t], gated @ level.out.weight.T, rtol=1e-12, atol=1e-12)


# mem steps with its generator mk (which reads itself): the two fuse into one layered call
FUSED = """level mk : matrix {
    key = x |> proj |> mk |> l2norm
    objective l2
    optimizer dgd
    every 4
    read before
}
level mem extends mk {
    output_norm rmsnorm
    output_gate = x |> proj |> sigmoid
}
"""


def test_a_fused_level_with_a_read_out_gate_equals_the_reference():
    program = nestc.check(spec(FUSED, block="residual(rmsnorm |> mem)"))
    fast = assert_equivalent(program, length=21, split=9)
    assert [group.levels for group in fast.fused] == [("mk", "mem")]


@pytest.mark.parametrize("norm", ["none", "rmsnorm"])
@pytest.mark.parametrize("gate", ["", "output_gate = x |> proj |> conv(3) |> silu"])
def test_memory_and_attention_read_outs_equal_the_reference(norm, gate):
    """A read-out gate with its own convolution history streams across calls; attention reads
    the whole call at once (layer by layer), the memory in segments."""
    levels = (f"level mixer : matrix {{\n    objective l2\n    lr = x |> proj |> sigmoid\n    every 1\n"
              f"    output_norm {norm}\n    {gate}\n}}\n"
              f"level attn : cache(window=8) {{\n    output_norm {norm}\n    {gate}\n}}\n")
    program = nestc.check(spec(levels, block="residual(rmsnorm |> mixer) |> residual(rmsnorm |> attn)"))
    assert_equivalent(program, length=40, split=23)


def test_a_frozen_memory_read_at_its_queries_gates_its_read_out_too():
    """An mlp with key, value and query but no `every`: frozen, read at each query (the plan's
    `frozen` kernel), its read-out normalised and gated."""
    text = ("level mixer : mlp(depth=1, residual=false) {\n    key = x |> proj\n    value = x |> proj\n"
            "    query = x |> proj\n    output_norm layernorm\n    output_gate = x |> proj |> tanh\n}\n")
    program = nestc.check(spec(text, block="residual(rmsnorm |> mixer)"))
    fast = assert_equivalent(program, length=12, split=5)
    assert fast.plans["mixer"].kernel == "frozen"


def test_the_estimate_counts_the_read_out_exactly():
    """On top of the output projection: the norm's gain (one per channel of a head) and the gate's
    projection (width to the read-out's width)."""
    plain = nestc.check(spec("level mixer : matrix { every 1 }"))
    gated = nestc.check(spec("level mixer : matrix {\n every 1\n output_norm rmsnorm\n"
                             " output_gate = x |> proj(bias=true) |> silu\n}"))
    assert estimate(gated).parameters - estimate(plain).parameters == HEAD + DIM * DIM + DIM
    built = reference.build(gated)
    assert sum(p.numel() for p in built.parameters()) == estimate(gated).parameters


def test_a_task_level_has_no_read_out_to_gate():
    found = only(analyze(spec("level ffn : mlp { output_gate = x |> proj |> silu }", block="residual(ffn)")),
                 "N0117")
    assert "task loss" in found.message


def test_the_output_gate_reads_x_not_a_level():
    text = ("level mk : matrix { every 4\n read before }\n"
            "level mixer : matrix { output_gate = x |> proj |> mk }\n")
    found = [d for d in analyze(spec(text)).diagnostics if d.is_error]
    assert [d.code for d in found] == ["N0105"] and "output gate cannot read a level" in found[0].message


def test_a_mac_memory_has_no_read_out_gate():
    text = ("level mem : matrix {\n every 4\n read before\n output_norm rmsnorm\n}\n"
            "level swa : cache(window=8)\n")
    found = only(analyze(spec(text, block="residual(mac(memory=mem, attention=swa, segment=8))")), "N0117")
    assert "`output_norm`" in found.message


def test_a_read_out_gate_of_the_wrong_width_is_refused_when_built():
    program = nestc.check(spec("level mixer : matrix { output_gate = x |> proj(dim=12) |> silu }"))
    with pytest.raises(BackendError, match="output gate has width 12"):
        reference.build(program)


def test_the_gain_starts_at_one():
    program = nestc.check(spec("level mixer : matrix { output_norm rmsnorm }"))
    gain = reference.build(program).layers[0].levels["mixer"].output_norm.gain
    assert gain.shape == (HEAD,) and bool((gain == 1).all())

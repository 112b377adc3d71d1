"""Horizontal fusion (nestc/passes/fusion.py, backends/fused.py): which levels the pass stacks,
and that the stacked call equals each level stepped alone and the reference, in float64."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import nestc
from nestc.backends import compiled
from nestc.cli import cli
from nestc.lang import overrides
from nestc.lang.sema import analyze_source, read_source
from nestc.lang.source import SourceFile
from nestc.passes.fusion import FusionGroup
from nestc.passes.plan import plan_program
from nesttest import cli_runner
from test_compiled import assert_equivalent
from test_reference_model import _tensors

HOPE_MEMORIES = ("mk", "mv", "mlr", "mretain", "mem")


@pytest.fixture(autouse=True)
def _at_root(monkeypatch, request):
    monkeypatch.chdir(request.config.rootpath)


def _small_hope(*assignments: str):
    overridden = overrides.apply(read_source("specs/hope.nest"), ["model.dim=16", *assignments])
    result = analyze_source(overridden.main, replaced_imports=overridden.imported)
    assert result.ok
    return result.program


def test_the_plan_stacks_hopes_five_memories_and_can_be_switched_off():
    program = nestc.check("specs/hope.nest")
    assert plan_program(program).fused == (FusionGroup("layered", HOPE_MEMORIES),)
    assert plan_program(program, fuse=False).fused == ()
    assert compiled.build(program, fuse=False).fusion == {}
    fused = "fused: mk, mv, mlr, mretain, mem: one layered call, 5 levels stacked along the heads"
    for arguments in (["--print-after", "plan"], []):
        shown = cli_runner().invoke(cli, ["compile", "specs/hope.nest", *arguments])
        assert shown.exit_code == 0, shown.output
        assert fused in shown.output
        apart = cli_runner().invoke(cli, ["compile", "specs/hope.nest", "--no-fuse", *arguments])
        assert apart.exit_code == 0 and "fused" not in apart.output, apart.output


def _stepped(model, tokens, cuts):
    """Calls over `tokens` cut at `cuts`, the state carried; the logits, the final state, and the
    gradients of a loss on all the logits (zeros for a parameter the loss does not reach)."""
    logits, state, start = [], None, 0
    for end in [*cuts, tokens.shape[1]]:
        out, state = model(tokens[:, start:end], state)
        logits.append(out)
        start = end
    logits = torch.cat(logits, dim=1)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, model.vocab), tokens[:, 1:].reshape(-1))
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    return logits, state, [torch.zeros_like(p) if g is None else g for p, g in zip(model.parameters(), grads)]


def assert_fused_equals_unfused(program, length: int, cuts: list[int]):
    torch.manual_seed(0)
    fused = compiled.build(program).double()
    unfused = compiled.build(program, fuse=False).double()
    unfused.load_state_dict(fused.state_dict())
    assert fused.fusion and not unfused.fusion
    tokens = torch.randint(0, fused.vocab, (2, length), generator=torch.Generator().manual_seed(3))
    expected, expected_state, expected_grads = _stepped(unfused, tokens, cuts)
    actual, actual_state, actual_grads = _stepped(fused, tokens, cuts)
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-10)
    for a, b in zip(_tensors(actual_state), _tensors(expected_state), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    for (name, _), a, b in zip(fused.named_parameters(), actual_grads, expected_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda m: f"{name}: {m}")


def test_fused_hope_equals_unfused_across_chunk_ends_of_every_memory():
    # 150 tokens in three calls: mem's chunk (16) and the generators' (64) close inside calls and
    # at call ends; the state is carried from call to call
    assert_fused_equals_unfused(_small_hope(), length=150, cuts=[40, 64])


def test_fused_hope_with_two_layers_equals_the_reference():
    assert_equivalent(_small_hope("model.layers=2", "train.context=64"), length=70, split=33)


GENERATOR = """
level {name} : {state} {{{{
    key = x |> {key}
    value = x |> proj{value_tail}
    lr = {lr}
    retain = {retain}
    objective {objective}
    optimizer {optimizer}{momentum}
    order {order}
    every {every}
    read before
}}}}
"""
# two generators of one memory (doubled braces: formatted twice)
GENERATORS = GENERATOR.format(name="g1", key="{key1}", lr="{lr1}", every="{every1}", state="{state1}",
                              **{field: "{" + field + "}" for field in ("value_tail", "retain", "objective",
                                                                        "optimizer", "momentum", "order")}) \
    + GENERATOR.format(name="g2", key="{key2}", lr="{lr2}", every="{every2}", state="{state2}",
                       **{field: "{" + field + "}" for field in ("value_tail", "retain", "objective", "optimizer",
                                                                 "momentum", "order")}) + """
level mem : matrix {{
    key = x |> proj |> g1 |> l2norm
    value = x |> g2
    query = x |> proj |> l2norm
    every 2
}}
model {{
    vocab 9
    dim 8
    heads 2
    block = residual(rmsnorm |> mem)
}}
"""


def generators(**fields) -> str:
    defaults = dict(state1="mlp(depth=2, expand=2)", key1="proj |> l2norm", lr1="0.3", every1=2, value_tail="",
                    retain="1.0", objective="l2", optimizer="gd", momentum="", order="grad_first")
    defaults.update(fields)
    for field in ("state", "key", "lr", "every"):
        defaults.setdefault(f"{field}2", defaults[f"{field}1"])
    return GENERATORS.format(**defaults)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    state=st.sampled_from(["matrix", "mlp(depth=2, expand=2)", "mlp(depth=1)"]),
    key=st.sampled_from(["proj |> l2norm", "conv(3) |> proj |> l2norm", "proj |> conv(2) |> silu |> l2norm"]),
    self_value=st.booleans(),
    lr=st.sampled_from(["0.3", "learned(init=0.2)", "x |> proj |> sigmoid(max=0.5)",
                        "x |> proj(per=channel) |> sigmoid(max=0.5)"]),
    retain=st.sampled_from(["1.0", "0.9", "x |> proj |> sigmoid", "learned(init=0.8)"]),
    objective=st.sampled_from(["l2", "dot", "huber(delta=0.5)"]),
    optimizer=st.sampled_from(["gd", "momentum", "dgd", "dgd_momentum"]),
    order=st.sampled_from(["grad_first", "decay_first"]),
    every=st.sampled_from([(2, 2), (2, 4), (4, 2), (1, 1)]),
)
def test_random_fused_generators_equal_the_reference_and_unfused(state, key, self_value, lr, retain, objective,
                                                                 optimizer, order, every):
    """Two generators of one memory, drawn with the same rules and pipelines (their gate constants
    and periods may differ), stacked: every drawn combination either plans to a form that fuses
    and equals both the reference and the unfused backend, or does not fuse and says nothing."""
    lr2 = {"0.3": "0.1", "learned(init=0.2)": "learned(init=0.4)"}.get(lr, lr)
    text = generators(state1=state, key1=key, value_tail=" |> self" if self_value else "", lr1=lr, lr2=lr2,
                      retain=retain, objective=objective, optimizer=optimizer, order=order, every1=every[0],
                      every2=every[1], momentum="\n    momentum = 0.8" if optimizer == "momentum" else "")
    result = analyze_source(SourceFile("<fused>", text))
    if not result.ok:  # a combination the checker refuses (dgd on a state without weight maps, ...)
        return
    program = result.program
    plan = plan_program(program)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", compiled.CompileWarning)
        planned_forms = {plan.levels[name].kernel for name in ("g1", "g2")}
        if "sequential" in planned_forms:
            assert plan.fused == ()  # token by token: nothing to stack
            return
        assert plan.fused == (FusionGroup(plan.levels["g1"].kernel, ("g1", "g2")),)
        if assert_equivalent(program, length=13, split=6, diverged=lambda: assume(False)) is None:
            return
        assert_fused_equals_unfused(program, length=13, cuts=[6])


@pytest.mark.parametrize("state", ["matrix", "mlp(depth=2, expand=2)"])
@pytest.mark.parametrize("optimizer", ["gd", "momentum"])
def test_fused_trajectory_form_with_per_channel_gates_equals_the_reference_and_unfused(state, optimizer):
    text = generators(state1=state, lr1="x |> proj(per=channel) |> sigmoid(max=0.5)", optimizer=optimizer,
                      retain="x |> proj |> sigmoid", every2=4,
                      momentum="\n    momentum = x |> proj(per=channel) |> sigmoid" if optimizer == "momentum" else "")
    program = nestc.check(text)
    assert plan_program(program).fused == (FusionGroup("trajectory", ("g1", "g2")),)
    assert_equivalent(program, length=13, split=6)
    assert_fused_equals_unfused(program, length=13, cuts=[6])


@pytest.mark.parametrize("fields,why", [
    (dict(state2="mlp(depth=1)"), "another state"),
    (dict(key2="proj |> silu |> l2norm"), "another key pipeline"),
    (dict(key1="proj |> g2 |> l2norm", key2="proj |> g1 |> l2norm"), "each reads the other"),
])
def test_levels_that_differ_in_what_the_form_computes_do_not_fuse(fields, why):
    assert plan_program(nestc.check(generators())).fused == (FusionGroup("layered", ("g1", "g2")),)
    assert plan_program(nestc.check(generators(**fields))).fused == (), why

"""The rule registries (nestc/rules/): every entry is in the language, in both backends, and its
pieces agree with each other; hypothesis draws levels from the registries' combinations and the
compiled backend must equal the reference on each one the checker accepts."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from nestc import rules
from nestc.backends import compiled
from nestc.lang import schema
from nestc.lang.sema import analyze_source
from nestc.lang.source import SourceFile
from nesttest import REPO
from test_compiled import TRAJECTORY_LEVEL, assert_equivalent

MEMORY_STATES = sorted(name for name, state in rules.STATES.items() if state.memory)
PAIR_OBJECTIVES = sorted(name for name, objective in rules.OBJECTIVES.items() if not objective.continuum)
# Codes of the checker's legality errors: a combination the registries say is undefined.
LEGALITY = {"N0111", "N0112"}


def _defaults(rule) -> dict:
    return {param.name: param.default for param in rule.spec.params}


def _random(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_the_schema_lists_each_registry_entry_and_nothing_else():
    for kind, registry in rules.REGISTRIES.items():
        assert schema.OP_TABLES[kind] == {name: rule.spec for name, rule in registry.items()}, kind
        assert all(rule.spec.kind == kind and rule.forms <= set(rules.FORMS) for rule in registry.values()), kind


@pytest.mark.parametrize("name", PAIR_OBJECTIVES)
def test_each_objectives_closed_form_error_is_the_gradient_of_its_loss(name):
    """The compiled forms use `pair_error`, the reference differentiates `pair_loss`."""
    objective = rules.OBJECTIVES[name]
    args = _defaults(objective)
    prediction = _random(3, 2, 5, seed=1).requires_grad_()
    value = _random(3, 2, 5, seed=2)
    # the objective's own gates, one value per pair, spread over the residuals' norms (1 to 5 here)
    gates = {role: 1 + 4 * torch.rand(3, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
             for role in objective.gates}
    expected, = torch.autograd.grad(objective.pair_loss(args, prediction, value, gates).sum(), prediction)
    torch.testing.assert_close(objective.pair_error(args, prediction, value, gates), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(rules.OUTPUTS))
def test_each_output_maps_pullback_is_the_gradient_through_the_map(name):
    """The trajectory form pulls gradients back by hand; the reference lets autograd do it."""
    output = rules.OUTPUTS[name]
    args = _defaults(output)
    weight = _random(2, 3, 4, 5, seed=3).requires_grad_()
    grads = _random(2, 3, 6, 4, 5, seed=4)  # one gradient per position of a 6-token segment
    expected = torch.stack([torch.autograd.grad(output.map(args, [weight])[0], weight, grads[:, :, s])[0]
                            for s in range(grads.shape[2])], dim=2)
    torch.testing.assert_close(output.pullback(args, weight.detach(), grads), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", MEMORY_STATES)
def test_each_states_segment_read_is_its_token_reads(name):
    state = rules.STATES[name]
    args = _defaults(state)
    weights = [_random(2, *shape, seed=5 + i) for i, shape in enumerate(state.weight_shapes(args, 3, 4, 4))]
    x = _random(2, 7, 3, 4, seed=9)  # [B, S, H, d]
    by_token = torch.stack([state.apply(args, weights, x[:, t]) for t in range(x.shape[1])], dim=1)
    torch.testing.assert_close(state.apply_sequence(args, weights, x), by_token, rtol=1e-12, atol=1e-12)


# The trajectory tests' level with its order drawn too; the momentum gate only where it is used.
DRAWN_LEVEL = TRAJECTORY_LEVEL.replace("    read {read}\n", "    read {read}\n    order {order}\n")


def _drawn_level(optimizer: str, **fields) -> str:
    text = DRAWN_LEVEL.format(optimizer=optimizer, momentum="0.9", **fields)
    return text if rules.OPTIMIZERS[optimizer].keeps_momentum else text.replace("    momentum = 0.9\n", "")


@settings(max_examples=24, deadline=None, derandomize=True)
@given(
    state=st.sampled_from(MEMORY_STATES),
    objective=st.sampled_from(PAIR_OBJECTIVES),
    optimizer=st.sampled_from(sorted(rules.OPTIMIZERS)),
    # Half the draws without an output map or per-channel gates, which only the trajectory form
    # computes: the other forms need them absent.
    output=st.one_of(st.just("none"), st.sampled_from(sorted(rules.OUTPUTS))),
    per=st.one_of(st.just(""), st.just("(per=channel)")),
    every=st.sampled_from([1, 4]),
    read=st.sampled_from(["before", "after"]),
    order=st.sampled_from(["grad_first", "decay_first"]),
)
def test_drawn_rules_are_refused_or_equal_in_both_backends(state, objective, optimizer, output, per, every, read,
                                                            order):
    """Every combination of registry entries is either refused by the checker with a legality
    error, or planned to a form that all its rules list (or token by token), and computed by
    the compiled backend exactly as by the reference."""
    text = _drawn_level(optimizer, state=state, objective=objective, output=output, per=per, every=every, read=read,
                        order=order)
    result = analyze_source(SourceFile("<drawn>", text))
    if not result.ok:
        assert {d.code for d in result.diagnostics if d.is_error} <= LEGALITY, [d.message for d in result.diagnostics]
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", compiled.CompileWarning)
        plan = compiled.build(result.program).plans["mem"]
    parts = (rules.STATES[state], rules.OBJECTIVES[objective], rules.OPTIMIZERS[optimizer], rules.OUTPUTS[output])
    assert plan.kernel == "sequential" or all(plan.kernel in part.forms for part in parts), plan
    assert_equivalent(result.program, length=10, split=4, tolerance=(1e-9, 1e-9), diverged=lambda: assume(False))


def test_an_online_mlp_memory_with_the_dot_objective_equals_the_reference():
    """dot's error ignores the prediction, but an MLP's gradient still depends on its state: the
    planner once ran this rule in the layered form, whose gradients all sit at the segment's
    start, and the logits differed by 3e-3. It must step token by token (and say so)."""
    text = _drawn_level("gd", state="mlp(depth=2, expand=2)", objective="dot", output="none", per="", every=1,
                        read="after", order="grad_first")
    program = analyze_source(SourceFile("<online mlp>", text)).program
    with pytest.warns(compiled.CompileWarning, match="needs `every C > 1` \\(with objective `dot` on state `mlp`"):
        compiled.build(program)
    assert_equivalent(program, length=10, split=4, tolerance=(1e-12, 1e-12))


# Every rule name but `none`, which is also the empty choice of the norm enums.
RULE_NAME = "|".join(sorted(name for registry in rules.REGISTRIES.values() for name in registry if name != "none"))
# A string literal naming a rule, compared or tested for membership.
NAME_COMPARISON = re.compile(rf'(==|!=|\bin) *[({{]?"({RULE_NAME})"|"({RULE_NAME})" *(==|!=|\bin\b)')


def test_no_rule_is_known_by_name_outside_its_registry_entry():
    """The backends, passes and checker ask an entry's flags; only nestc/rules/ compares names.
    The outer optimizers and schedules (nestc/runtime/optim.py) share some names but are a
    different vocabulary, not registry entries yet."""
    sources = [path for folder in ("nestc", "backends") for path in (REPO / folder).rglob("*.py")
               if "rules" not in path.relative_to(REPO).parts and path.name != "optim.py"]
    found = [f"{path.relative_to(REPO)}:{number}: {line.strip()}" for path in sources
             for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
             if NAME_COMPARISON.search(line)]
    assert len(sources) > 30 and not found, found

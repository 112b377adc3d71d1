"""The scan form (backends/forms/scan.py): a level whose `update` names optimizer levels that no
built-in optimizer equals runs a segment at a time, its gradients at the anchor from the layered
form's backpropagation and its optimizer levels stepped token by token; it equals the reference's
literal rule (autograd at the anchor, every token) in float64, and the planner chooses it only
where the anchor is fixed inside a segment."""

from __future__ import annotations

import pytest

from nestc.backends import compiled
from nestc.passes.plan import plan_program
from test_compiled import assert_equivalent
from test_optimizer_levels import _model_spec, _program

EXACT = (1e-10, 1e-10)

# The compositions of specs/lib/optimizers.nest that are no built-in optimizer.
UPDATES = {
    "adam": "-lr * adam_first / (sqrt(adam_second) + 1e-8)",
    "sign momentum": "sign_momentum",
    "preconditioned momentum": "preconditioned_momentum",
    "delta momentum": "delta_momentum",
    "deep momentum": "deep_momentum",
}
# An MLP memory read before its update and a matrix memory read after it, each every 4 tokens.
MEMORIES = {"mlp, read before": ("mlp(depth=2, expand=2)", "before"), "matrix, read after": ("matrix", "after")}


def _spec(update: str, state: str, read: str, rule: str, every: int = 4, extra: str = "") -> str:
    # lr at most 0.02: a deep momentum's MLP diverges over these tokens with the template's 0.2
    return _model_spec(state, every, read, f"    optimizer {rule}\n    update = {update}{extra}") \
        .replace("sigmoid(max=0.2)", "sigmoid(max=0.02)")


@pytest.mark.parametrize("rule", ["gd", "dgd"])
@pytest.mark.parametrize("memory", MEMORIES)
@pytest.mark.parametrize("update", UPDATES)
def test_compositions_without_a_closed_form_run_in_the_scan_form_as_the_reference(update, memory, rule):
    """Planned `scan`, over 29 tokens in two calls of 18 and 11 (the chunk 16-20 split by the
    calls, its anchor carried across): the logits, the final weights, anchors and every optimizer
    level's state, and every parameter's outer gradient (`meta full`, through the optimizer
    levels' steps) equal the reference's."""
    state, read = MEMORIES[memory]
    program = _program(_spec(UPDATES[update], state, read, rule))
    assert plan_program(program).levels["memory"].kernel == "scan"
    fast = assert_equivalent(program, length=29, split=18, tolerance=EXACT)
    assert fast.plans["memory"].kernel == "scan"


@pytest.mark.parametrize("rule", ["gd", "dgd"])
def test_a_gated_mlp_memory_runs_in_the_scan_form_as_the_reference(rule):
    """A glu memory's three maps (W1 and W3 both read the key) each step on their own gradient."""
    program = _program(_spec(UPDATES["adam"], "glu(expand=1, residual=false)", "after", rule))
    assert plan_program(program).levels["memory"].kernel == "scan"
    assert_equivalent(program, length=29, split=18, tolerance=EXACT)


@pytest.mark.parametrize("meta", ["first_order", "stop"])
def test_the_scan_form_cuts_the_outer_gradient_as_the_reference(meta):
    program = _program(_spec(UPDATES["adam"], "mlp(depth=2, expand=2)", "after", "dgd", extra=f"\n    meta {meta}"))
    assert plan_program(program).levels["memory"].kernel == "scan"
    assert_equivalent(program, length=29, split=18, tolerance=EXACT)


@pytest.mark.parametrize("every, order, reason", [
    (1, "grad_first", "the scan form needs `every C > 1`"),
    (4, "decay_first", "the scan form has no `order decay_first`"),
])
def test_where_the_anchor_moves_inside_a_segment_the_level_steps_token_by_token_and_says_why(every, order, reason):
    program = _program(_spec(UPDATES["adam"], "matrix", "after", "gd", every=every, extra=f"\n    order {order}"))
    plan = plan_program(program).levels["memory"]
    assert plan.kernel == "sequential"
    # why no built-in optimizer equals the update, then why the scan form does not compute it
    assert plan.reason.startswith("optimizer level `adam_second` learns from (grad * grad)") and reason in plan.reason


def test_a_segment_step_with_a_scan_level_is_not_traced_by_torch_compile():
    """Its optimizer levels step through one autograd.grad call per token: no single graph."""
    program = _program(_spec(UPDATES["adam"], "matrix", "after", "gd"))
    model = compiled.build(program)
    assert model._segment_obstacle() == "level `memory` steps its optimizer levels token by token (the scan form)"

"""The outer optimizer written as levels (SEMANTICS §8, specs/lib/outer_optimizers.nest).

The library's AdamW, Muon and M3 train a tiny model five steps in float64 to the parameters the
built-ins reach; M3's Alg. 1 is checked by hand on one 2x2 parameter; the optimizer's state goes
through a file and through an interrupted `nestc run`; the checker's diagnostics; the level graph.
"""

from __future__ import annotations

import json
import os
import re
import signal

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from safetensors.torch import load_file

import nestc.runtime.train
from nestc import graph
from nestc.backends import reference
from nestc.backends.outer import MultiRateStepper
from nestc.backends.pipelines import combine_gates
from nestc.cli import cli
from nestc.lang import ir
from nestc.lang.sema import analyze_source
from nestc.lang.source import SourceFile
from nestc.passes.estimate import estimate
from nestc.runtime.optim import LevelsOptimizer, build_optimizer, schedule
from nestc.runtime.rundir import latest
from nesttest import REPO, render
from test_outer_optimizers import assert_continues_from_a_file

LIBRARY = REPO / "specs" / "lib" / "outer_optimizers.nest"
STEPS = 5

# A memory level whose key and query projections are tall (16 x 8) and the others square or wide,
# gates with biases, gains, a tied embedding and a feed-forward level (its maps are 3-D, which
# Muon and M3 do not orthogonalise), with the cosine schedule's warm-up changing lr every step.
MODEL = """import "lib/outer_optimizers.nest"
level mixer : matrix {{
    key = x |> proj(dim=16) |> l2norm
    value = x |> proj
    query = x |> proj(dim=16) |> l2norm
    lr = x |> proj(bias=true) |> sigmoid
    objective l2
}}
level ffn : mlp(expand=2, residual=false) {{ {ffn} }}
model {{
    vocab 16
    dim 8
    heads 2
    block = residual(rmsnorm |> mixer) |> residual(rmsnorm |> ffn)
}}
train {{
    {train}
    schedule cosine(warmup=2, min_lr=0.1)
    steps {steps}
}}
"""


def _check(text: str, library: str | None = None):
    """The checked spec `text` (in specs/), with the library's text replaced by `library`."""
    replaced = {str(LIBRARY): SourceFile(str(LIBRARY), library)} if library is not None else None
    return analyze_source(SourceFile(str(REPO / "specs" / "t.nest"), text), replaced_imports=replaced)


def _program(train: str, ffn: str = "", library: str | None = None) -> ir.Program:
    result = _check(MODEL.format(train=train, ffn=ffn, steps=STEPS), library)
    assert result.ok, render(result)
    return result.program


def _trained(program: ir.Program, steps: int = STEPS) -> dict[str, torch.Tensor]:
    """The parameters after `steps` steps of the training loop's own machinery (the spec's
    optimizer and schedule, `every N steps` levels accumulating), on fixed batches, in float64."""
    torch.manual_seed(0)
    model = reference.build(program).double()
    optimizer = build_optimizer(program.train, model)
    stepper = MultiRateStepper(optimizer, model)
    factor = schedule(program.train.schedule, steps)
    rates = [group["lr"] for group in optimizer.param_groups]
    generator = torch.Generator().manual_seed(1)
    for step in range(steps):
        for group, rate in zip(optimizer.param_groups, rates):
            group["lr"] = rate * factor(step)
        tokens = torch.randint(0, 16, (2, 8), generator=generator)
        logits, _ = model(tokens)
        F.cross_entropy(logits[:, :-1].reshape(-1, 16), tokens[:, 1:].reshape(-1)).backward()
        stepper.step(step)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _largest_change(after: dict, before: dict) -> float:
    return max((after[name] - before[name]).abs().max().item() for name in after)


def _library_with_m3_every(steps: int) -> str:
    text = LIBRARY.read_text()
    assert text.count("every 16 steps") == 1
    return text.replace("every 16 steps", f"every {steps} steps")


M3_LEVELS = "optimizer gd(lr=1e-3)\n    matrix_update = m3_matrix_update\n    update = m3_update"


@pytest.mark.parametrize("builtin, levels, ffn, library", [
    # the ffn steps every 2 steps: its bias correction counts its own steps, as torch's AdamW does
    ("optimizer adamw", "optimizer gd(lr=1e-3)\n    update = adamw_update", "every 2 steps", None),
    ("optimizer muon", "optimizer gd(lr=0.02)\n    matrix_update = muon_matrix_update\n    update = muon_update",
     "every 2 steps", None),
    # the built-in counts the optimizer's steps, the levels each parameter's: all step every step here
    ("optimizer m3(every=2)", M3_LEVELS, "", _library_with_m3_every(2)),
], ids=["adamw", "muon", "m3"])
def test_the_library_optimizer_trains_to_the_builtins_parameters(builtin, levels, ffn, library):
    expected = _trained(_program(builtin, ffn))
    found = _trained(_program(levels, ffn, library))
    for name in expected:
        torch.testing.assert_close(found[name], expected[name], rtol=1e-12, atol=1e-14, msg=name)
    # not a comparison of two models that stood still
    assert _largest_change(expected, _trained(_program(builtin, ffn), steps=0)) > 1e-3


def test_m3s_slow_momentum_moves_within_the_five_steps():
    """With every 2 the slow momentum moves at steps 2 and 4; with every 16 not yet: the M3
    comparison above holds a moving slow momentum."""
    moving = _trained(_program(M3_LEVELS, library=_library_with_m3_every(2)))
    still = _trained(_program(M3_LEVELS))
    assert _largest_change(moving, still) > 1e-3


def _newton_schulz(matrix: torch.Tensor) -> torch.Tensor:
    """Five quintic Newton-Schulz steps as Muon documents them: on the matrix divided by its
    Frobenius norm + 1e-7, X <- 3.4445 X + (-4.7750 G + 2.0315 G^2) X with G = X X^T (2x2: square)."""
    x = matrix / (torch.linalg.matrix_norm(matrix) + 1e-7)
    for _ in range(5):
        gram = x @ x.T
        x = 3.4445 * x + (-4.7750 * gram + 2.0315 * gram @ gram) @ x
    return x


def _m3_optimizer(parameters, every: int, lr: float) -> LevelsOptimizer:
    program = _program(M3_LEVELS, library=_library_with_m3_every(every))
    return LevelsOptimizer(parameters, lr, program.train.update, program.train.matrix_update)


def test_m3_is_algorithm_1_by_hand_on_one_weight_matrix():
    """NL Alg. 1 with f = 2 for one 2x2 weight: M1 += b1 g and V += b2 g^2 every step, M2 += b3
    (g_1 + g_2) at step 2 only, W -= lr_t (NS(M1) + NS(M2)) / (sqrt(V) + eps), lr_t the group's."""
    start = torch.tensor([[0.5, -1.0], [2.0, 0.25]], dtype=torch.float64)
    weight = torch.nn.Parameter(start.clone())
    gradients = [torch.tensor(g, dtype=torch.float64) for g in
                 ([[1.0, -2.0], [0.5, 3.0]], [[-1.5, 1.0], [2.0, -0.5]], [[0.25, 0.75], [-1.0, 1.5]])]
    rates = [1e-3, 5e-4, 2e-4]
    optimizer = _m3_optimizer([("layers.0.w", weight)], every=2, lr=rates[0])
    expected = start.clone()
    fast, second, slow = (torch.zeros(2, 2, dtype=torch.float64) for _ in range(3))
    for step, (gradient, rate) in enumerate(zip(gradients, rates), start=1):
        fast = fast + 0.9 * gradient
        second = second + 0.999 * gradient * gradient
        if step == 2:
            slow = slow + 0.5 * (gradients[0] + gradients[1])
        expected = expected - rate * (_newton_schulz(fast) + _newton_schulz(slow)) / (second.sqrt() + 1e-8)
        optimizer.param_groups[0]["lr"] = rate
        weight.grad = gradient.clone()
        optimizer.step()
        torch.testing.assert_close(weight.detach(), expected, rtol=1e-12, atol=1e-15, msg=f"step {step}")
        torch.testing.assert_close(optimizer.state[weight]["m3_slow"], slow, rtol=0, atol=0, msg=f"step {step}")
    assert optimizer.state[weight]["step"] == 3


def test_the_state_saved_to_a_file_continues_exactly(tmp_path):
    """The moments, each parameter's step count and the slow momentum's pending sum (three steps
    into M3 with f = 2, the fourth moves it): an optimizer rebuilt from the file takes the very
    step the original takes."""
    generator = torch.Generator().manual_seed(0)
    shapes = {"layers.0.w": (3, 2), "embedding.weight": (4, 2), "norm.gain": (2,)}
    parameters = {name: torch.nn.Parameter(torch.randn(*shape, generator=generator, dtype=torch.float64))
                  for name, shape in shapes.items()}
    gradients = [{name: torch.randn(*shape, generator=generator, dtype=torch.float64) for name, shape in shapes.items()}
                 for _ in range(4)]
    def pending(optimizer) -> None:  # the slow momentum's sum is mid-way when the state is saved
        assert optimizer.state[parameters["norm.gain"]]["m3_slow pending"].abs().max() > 0

    assert_continues_from_a_file(lambda named: _m3_optimizer(named, every=2, lr=1e-3), parameters, gradients,
                                 tmp_path, check=pending)


def test_an_interrupted_run_resumes_exactly(tmp_path, monkeypatch):
    """`nestc run` with the library's M3 (f = 2) stopped after step 3, its slow momentum holding a
    pending gradient, and resumed: the losses and weights of an uninterrupted run."""
    monkeypatch.chdir(REPO)
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "outer_optimizers.nest").write_text(_library_with_m3_every(2))
    spec = tmp_path / "m3_levels.nest"
    spec.write_text(MODEL.format(train=M3_LEVELS, ffn="", steps=5))
    settings = ["--steps", "5", "--set", "train.batch=2", "--set", "train.context=16", "--set", "model.vocab=256"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert CliRunner().invoke(cli, ["run", str(spec), "--runs", str(whole), *settings]).exit_code == 0
    original = nestc.runtime.train._batch
    calls = {"count": 0}

    def interrupted_batch(*args):
        calls["count"] += 1
        if calls["count"] == 3:  # a Ctrl-C in step 3: the run stops after it
            os.kill(os.getpid(), signal.SIGINT)
        return original(*args)

    monkeypatch.setattr(nestc.runtime.train, "_batch", interrupted_batch)
    stopped = CliRunner().invoke(cli, ["run", str(spec), "--runs", str(parts), *settings])
    assert stopped.exit_code == 130 and "interrupted at step 3" in stopped.output, stopped.output
    monkeypatch.setattr(nestc.runtime.train, "_batch", original)
    resumed = CliRunner().invoke(cli, ["run", str(spec), "--runs", str(parts), "--resume", *settings])
    assert resumed.exit_code == 0, resumed.output
    (a,), (b,) = list(whole.iterdir()), list(parts.iterdir())
    losses = [[json.loads(line)["loss"] for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (a, b)]
    assert len(losses[0]) == 5 and losses[0] == losses[1]
    first, second = (load_file(latest(str(d)).model_file) for d in (a, b))
    for name, tensor in first.items():
        assert torch.equal(tensor, second[name]), name


def test_the_stream_functions_evaluate_elementwise():
    """sqrt, abs, sign, max and pow, which an update's arithmetic reads (combine_gates)."""
    a, b = torch.tensor([4.0, -0.5, 9.0]), torch.tensor([2.0, 3.0, 0.5])
    assert combine_gates("sqrt", [b * b]).tolist() == [2.0, 3.0, 0.5]
    assert combine_gates("abs", [a]).tolist() == [4.0, 0.5, 9.0]
    assert combine_gates("sign", [a]).tolist() == [1.0, -1.0, 1.0]
    assert combine_gates("max", [a, b]).tolist() == [4.0, 3.0, 9.0]
    assert combine_gates("pow", [b, torch.tensor(2.0)]).tolist() == [4.0, 9.0, 0.25]


def test_the_optimizer_levels_are_part_of_the_variant_and_the_estimate():
    """The levels an update reads are in the program's dump (a change to one is another variant),
    and the estimate counts a buffer per level and parameter, one more for a pending sum."""
    library = LIBRARY.read_text()
    m3 = _program(M3_LEVELS)
    changed = _program(M3_LEVELS, library=library.replace("lr = 0.5  # b3", "lr = 0.25  # b3"))
    assert ir.variant_id(m3) != ir.variant_id(changed)
    assert "level m3_slow" in ir.dump(m3) and "every      16 steps" in ir.dump(m3)
    assert estimate(m3).outer_moments == 4  # M1, V, M2 and M2's pending sum
    assert estimate(_program("optimizer gd(lr=1e-3)\n    update = adamw_update")).outer_moments == 2
    assert estimate(_program("optimizer gd(lr=1e-3)")).outer_moments == 0


# --- diagnostics ---------------------------------------------------------------------------------

OUTER = 'import "lib/outer_optimizers.nest"\n' + """level mixer : matrix
model {{
    vocab 16
    dim 8
    block = mixer
}}
{levels}
train {{
    {train}
}}
"""


@pytest.mark.parametrize("levels, train, code, message, where", [
    ("", "optimizer adamw\n    update = adamw_update", "N0117",
     "`update` has no meaning with optimizer `adamw", "adamw"),
    ("", "update = adamw_update", "N0117", "`update` has no meaning with optimizer `adamw", "update"),
    ("", "optimizer gd\n    update = -lr * adamw_frist", "N0101", "unknown name `adamw_frist`", "adamw_frist"),
    ("", "optimizer gd\n    update = -lr * mixer", "N0105", "level `mixer` is not an optimizer level", "mixer"),
    ("", "optimizer gd\n    update = -lr * newton_schulz(m3_fast)", "N0105", "cannot hold newton_schulz(...)",
     "newton_schulz(m3_fast)"),
    ("", "optimizer gd\n    update = -lr * rows * grad", "N0105", "cannot hold `rows`", "rows"),
    ("", "optimizer gd\n    update = [1, 2] * grad", "N0105", "cannot hold one value per head", "[1, 2]"),
    ("level m : moment { value = grad; lr = x |> proj |> sigmoid }", "optimizer gd\n    update = m", "N0105",
     "optimizer level `m` of the train section's `update` cannot hold a gate of x", "x |> proj |> sigmoid"),
    ("level m : moment { value = grad; every 4 }", "optimizer gd\n    update = m", "N0117",
     "optimizer level `m` moves with the gradient stream it serves", "every 4"),
    ("", "optimizer gd\n    update = -lr * pow(0.9) * grad", "N0108", "`pow(...)`", "pow(0.9)"),
    ("", "optimizer gd\n    update = -lr * grad / stpe", "N0101", "unknown name `stpe`", "stpe"),
    ("", "optimizer gd\n    matrix_update", "N0015", "`matrix_update` needs a value", "matrix_update"),
    ("", "optimizer choice(gd, adamw)\n    update = adamw_update", "N0117",
     "`update` has no meaning with a choice of optimizers", "choice(gd, adamw)"),
], ids=["not-gd", "default-adamw", "unknown-level", "not-an-optimizer-level", "newton-schulz-outside-matrices",
        "rows-outside-matrices", "per-head-list", "gate-of-x", "every-tokens", "pow-one-value", "unknown-name",
        "no-value", "a-choice"])
def test_a_wrong_outer_update_is_a_clear_diagnostic(levels, train, code, message, where):
    text = OUTER.format(levels=levels, train=train)
    result = _check(text)
    assert [d.code for d in result.diagnostics if d.is_error] == [code], render(result)
    (diagnostic,) = [d for d in result.diagnostics if d.is_error]
    assert message in diagnostic.message, diagnostic.message
    span = diagnostic.span
    line = text.split("\n")[span.line - 1]
    assert line[span.column - 1:].startswith(where), (line, span)


def test_a_slow_optimizer_level_in_an_inner_update_is_a_clear_diagnostic():
    text = """level m : moment {
    value = -grad
    every 2 steps
}
level mixer : matrix {
    optimizer gd
    update = m
}
model {
    vocab 16
    dim 8
    block = mixer
}
"""
    result = _check(text)
    assert [d.code for d in result.diagnostics] == ["N0117"], render(result)
    (diagnostic,) = result.diagnostics
    assert "optimizer level `m` moves `every 2 steps`, but level `mixer` updates in-sequence" in diagnostic.message
    assert (diagnostic.span.line, diagnostic.span.column) == (3, 5)
    assert diagnostic.secondary[0].span.line == 7


# --- the level graph -----------------------------------------------------------------------------

GRAPHED = """import "lib/optimizers.nest"
import "lib/outer_optimizers.nest"
level mixer : matrix {
    key = x |> proj
    value = x |> proj
    query = x |> proj
    optimizer gd
    update = preconditioned_momentum
}
model {
    vocab 16
    dim 8
    block = mixer
}
train {
    optimizer gd(lr=1e-3)
    matrix_update = m3_matrix_update
    update = m3_update
    context 64
    batch 2
}
"""


def _edges(built, kind: str) -> set[tuple[str, str, str]]:
    return {(s, t, d["label"]) for s, t, d in built.edges(data=True) if d["kind"] == kind}


def test_the_graph_shows_the_optimizer_levels_with_their_frequencies_and_edges():
    result = _check(GRAPHED)
    assert result.ok, render(result)
    built = graph.build(result.program)
    nodes = built.nodes
    assert nodes["mixer.preconditioned_momentum"]["frequency"] == "every token"
    assert nodes["outer.m3_fast"]["frequency"] == "every step"
    assert nodes["outer.m3_slow"]["frequency"] == "every 16 steps"
    assert nodes["outer.m3_slow"]["rate"] * 16 == nodes["outer"]["rate"] == nodes["outer.m3_second"]["rate"]
    assert _edges(built, "gradient") == {
        ("mixer", "mixer.preconditioner", "gradient"), ("mixer", "mixer.preconditioned_momentum", "gradient"),
        ("outer", "outer.m3_fast", "gradient"), ("outer", "outer.m3_second", "gradient"),
        ("outer", "outer.m3_slow", "gradient")}
    assert _edges(built, "reads") == {("mixer.preconditioner", "mixer.preconditioned_momentum", "reads")}
    assert _edges(built, "update") == {("mixer.preconditioned_momentum", "mixer", "update")} | {
        (f"outer.{name}", "outer", label) for name in ("m3_fast", "m3_second", "m3_slow")
        for label in ("matrix update", "update")}
    order = graph.frequency_order(built)
    # slowest first: M3's slow momentum, then the outer level and its every-step levels, then the
    # memory with its optimizer levels
    assert order == ["outer.m3_slow", "outer", "outer.m3_fast", "outer.m3_second", "mixer",
                     "mixer.preconditioned_momentum", "mixer.preconditioner"]
    text = graph.to_text(built)
    assert re.search(r"^  outer\.m3_slow +every 16 steps +state moment$", text, re.M), text
    assert "optimizer gd(lr=0.001) with matrix update and update" in text
    assert "  outer.m3_slow -> outer: matrix update\n" in text
    # each served level's optimizer levels by frequency, the slowest last
    assert "  outer: m3_fast (every step), m3_second (every step), m3_slow (every 16 steps)\n" in text
    assert "  mixer: preconditioner (every token), preconditioned_momentum (every token)\n" in text
    assert '"outer.m3_slow" -> "outer" [label="matrix update"' in graph.to_dot(built)
    assert json.loads(graph.to_json(built))["order"] == order

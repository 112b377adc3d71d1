"""The estimate before building (nestc/passes/estimate.py): exact parameter counts, and models too
large for the machine refused with the numbers before anything is allocated."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import warnings

import pytest
import torch

from nestc.backends import compiled, reference
from nestc.backends.state import slots
from nestc.cli import cli
from nestc.lang import schema
from nestc.lang.sema import analyze_file
from nestc.passes.estimate import (OUTER_MOMENTS, ModelTooLarge, available_memory, estimate, format_bytes,
                                   require_fits)
from nesttest import REPO, SMALL_TITANS, SPECS, analyze, cli_runner, render

# The zoo, and the golden spec that uses the rare blocks (parallel, gated, mac, learned gates).
MODELS = sorted(p for p in SPECS.glob("*.nest")) + [REPO / "tests" / "golden" / "features.nest"]
HUGE = "model.layers=1000000000"


def _program(path):
    result = analyze_file(str(path))
    assert result.ok, render(result)
    return result.program


@pytest.mark.parametrize("path", MODELS, ids=lambda p: p.stem)
def test_the_parameter_count_is_the_built_models(path):
    program = _program(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", compiled.CompileWarning)
        built = [backend.build(program) for backend in (reference, compiled)]
    counts = [sum(p.numel() for p in model.parameters()) for model in built]
    assert counts == [estimate(program).parameters] * 2


def test_the_state_of_a_small_memory_by_hand():
    """One matrix memory, dim 128 and 4 heads, updated every token by plain gd: its state is one
    [4, 32, 32] matrix per layer; one training step keeps 16 vectors of width 128 and that matrix
    per token, plus the level's norm, and the logits twice."""
    text = "level mixer : matrix { every 1 }\nmodel {\n    vocab 256\n    dim 128\n    heads 4\n    layers 3\n" \
           "    block = residual(rmsnorm |> mixer)\n}\ntrain {\n    context 64\n    batch 2\n}\n"
    found = estimate(analyze(text).program)
    assert found.state_bytes == 4 * 3 * 4 * 32 * 32
    per_layer = 16 * 128 + 4 * 32 * 32 + 128
    assert found.activation_bytes == 4 * 2 * 64 * (3 * per_layer + 2 * 256)
    assert found.training_bytes == found.parameter_bytes * 4 + found.state_bytes * 2 + found.activation_bytes


def test_the_state_of_an_exact_solve_holds_its_gram_matrix_too():
    """optimizer solve keeps G (the [4, 32, 32] matrix) and H ([4, 32, 32], keys by keys) per layer,
    as many numbers as the built state holds."""
    text = "level mixer : matrix { objective l2; optimizer solve }\nmodel {\n    vocab 256\n    dim 128\n" \
           "    heads 4\n    layers 3\n    block = residual(rmsnorm |> mixer)\n}\n"
    program = analyze(text).program
    assert estimate(program).state_bytes == 4 * 3 * 2 * 4 * 32 * 32
    _, state = reference.build(program)(torch.zeros(1, 1, dtype=torch.long))
    # the anchor of a level updated every token is its weight itself, which the estimate counts once
    held = [t for states in state.levels for level in states.values() for name, _, t in slots(level) if name != "anchor"]
    assert sum(t.numel() for t in held) == 3 * 2 * 4 * 32 * 32


def test_every_outer_optimizer_has_a_moment_count():
    assert set(OUTER_MOMENTS) == set(schema.OUTER_OPTIMIZERS)


def test_the_suggested_size_is_the_largest_that_fits():
    program = _program(SPECS / "deltanet.nest")
    budget = (2 << 30, "this machine has 2 GiB of memory")
    with pytest.raises(ModelTooLarge) as refused:
        require_fits(dataclasses.replace(program, model=dataclasses.replace(program.model, layers=10**6)),
                     training=True, available=budget)
    message = str(refused.value)
    assert "this machine has 2 GiB of memory" in message and "of activations per step" in message
    largest = int(message.split("model.layers (1000000) to at most ")[1].split(",")[0].split()[0])

    def with_layers(layers):
        return dataclasses.replace(program, model=dataclasses.replace(program.model, layers=layers))

    assert require_fits(with_layers(largest), training=True, available=budget).training_bytes <= budget[0]
    with pytest.raises(ModelTooLarge):
        require_fits(with_layers(largest + 1), training=True, available=budget)


def test_a_billion_layers_are_refused_before_anything_is_built(tmp_path, at_repo_root):
    result = cli_runner().invoke(cli, ["run", "specs/deltanet.nest", "--set", HUGE, "--runs", str(tmp_path)])
    assert result.exit_code == 1, result.output
    message = result.stderr
    assert "the model needs about" in message and "PiB to train" in message
    assert "198,912,000,032,896 parameters (724 TiB)" in message
    assert "lower model.layers (1000000000) to at most" in message
    assert list(tmp_path.iterdir()) == []  # no run directory was made


def test_a_count_of_layers_past_any_float_is_refused_too(tmp_path, at_repo_root):
    """Formatting 10^400 layers' bytes as a float raised OverflowError, an internal error."""
    result = cli_runner().invoke(cli, ["run", "specs/titans.nest", "--set", f"model.layers={10**400}",
                                       "--runs", str(tmp_path)])
    assert result.exit_code == 1, result.output
    assert f"lower model.layers ({10**400}) to at most" in result.stderr


def test_a_run_directory_whose_spec_is_too_large_is_refused(tmp_path):
    """eval, generate and memorize build the model a run directory's spec describes: a tampered
    spec is refused before its weights are even read."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "spec.nest").write_text(SMALL_TITANS.replace("layers 1", "layers 1000000000"), encoding="utf-8")
    import torch

    from nestc.runtime import rundir

    rundir.write(str(run), 1, {"not.read": torch.zeros(1)}, {"step": 1})  # a complete checkpoint, never loaded
    (tmp_path / "text.txt").write_text("hello", encoding="utf-8")
    for command in (["eval", str(run), str(tmp_path / "text.txt")], ["generate", str(run)],
                    ["memorize", str(run), str(tmp_path / "text.txt")]):
        result = cli_runner().invoke(cli, command)
        assert result.exit_code == 1, (command, result.output)
        assert "to build" in result.stderr and "lower model.layers (1000000000) to at most" in result.stderr


def test_compile_prints_the_estimate_and_refuses_a_huge_model(tmp_path, at_repo_root):
    plan = cli_runner().invoke(cli, ["compile", "specs/deltanet.nest"])
    assert plan.exit_code == 0, plan.output
    assert "430,720 parameters (1.64 MiB); a training step needs about" in plan.stdout
    itemised = cli_runner().invoke(cli, ["compile", "specs/deltanet.nest", "--print-after", "estimate"])
    assert "parameters   430,720 (" in itemised.stdout and "activations  " in itemised.stdout
    huge = tmp_path / "huge.nest"
    huge.write_text(SMALL_TITANS.replace("layers 1", "layers 1000000000"), encoding="utf-8")
    refused = cli_runner().invoke(cli, ["compile", str(huge)])
    assert refused.exit_code == 1 and "to build" in refused.stderr


def test_a_sweep_listing_with_a_variant_too_large_says_so(tmp_path):
    """`nestc sweep --dry-run` builds each variant to count it; a billion layers used to build for minutes."""
    space = tmp_path / "space.nest"
    space.write_text(SMALL_TITANS.replace("layers 1", "layers choice(1, 1000000000)"), encoding="utf-8")
    result = cli_runner().invoke(cli, ["sweep", str(space), "--dry-run"])
    assert result.exit_code == 1, result.output
    assert "lower model.layers (1000000000) to at most" in result.stderr


def test_compile_refuses_a_search_space_as_a_usage_error(at_repo_root):
    """It reached the backend and ended as an internal error (exit 3)."""
    result = cli_runner().invoke(cli, ["compile", "specs/spaces/hope_space.nest"])
    assert result.exit_code == 2 and "is a search space: freeze it" in result.stderr


def test_the_machine_memory_is_known_here():
    total, description = available_memory()
    assert total > 1 << 20 and format_bytes(total) in description


@pytest.mark.parametrize("count, text", [(512, "512 B"), (1536, "1.5 KiB"), (24 << 30, "24 GiB"),
                                         (int(3.1 * (1 << 50)), "3.1 PiB"), (1023 << 20, "1,023 MiB"),
                                         (10**400, f"{10**400 // 1024**8:,} YiB")])
def test_format_bytes(count, text):
    assert format_bytes(count) == text


def test_the_estimate_needs_no_torch():
    program = ("import sys\nfrom nestc.lang.sema import analyze_file\nfrom nestc.passes.estimate import estimate\n"
               "print(estimate(analyze_file('specs/hope.nest').program).parameters)\n"
               "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))\n")
    completed = subprocess.run([sys.executable, "-c", program], cwd=REPO, capture_output=True, text=True,
                               timeout=600)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.split("\n")[:2] == ["322368", "[]"]

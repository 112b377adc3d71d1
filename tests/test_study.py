"""`nestc sweep --trials`: Optuna studies that train variants, resume, share workers and rank."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from nestc.lang import ir
from nestc.runtime.config import RunConfig
from nestc.search import study
from nestc.api import check
from nestc.cli import cli
from nestc.lang.sema import analyze_file

# Four variants: two objectives x two chunk sizes; trials of a few steps on 16-token sequences.
TINY_SPACE = """
level mixer : matrix {
    key = x |> proj |> l2norm
    value = x |> proj
    query = x |> proj |> l2norm
    lr = x |> proj |> sigmoid
    objective choice(l2, dot)
    optimizer gd
    every choice(1, 8)
}

model {
    vocab 256
    dim 16
    heads 2
    layers 1
    block = residual(rmsnorm |> mixer)
}

train {
    optimizer adamw(lr=3e-3)
    context 16
    batch 2
    steps STEPS
}
"""


def tiny_space(tmp_path, steps: int = 4, replace: tuple[str, str] | None = None) -> str:
    text = TINY_SPACE.replace("STEPS", str(steps))
    if replace:
        text = text.replace(*replace)
    path = tmp_path / "tiny.nest"
    path.write_text(text)
    return str(path)


def config_for(tmp_path, spec: str, **fields) -> study.SweepConfig:
    training = RunConfig(task="mqar", task_options={"pairs": 2, "keys": 8, "values": 8}, runs=str(tmp_path / "runs"))
    settings = dict(spec=spec, trials=4, run=training, sampler="grid", heartbeat_seconds=1)
    settings.update(fields)
    return study.SweepConfig(**settings)


def trials_of(config: study.SweepConfig):
    loaded, _ = study.open_study(config)
    return loaded.get_trials(deepcopy=False)


def test_a_grid_sweep_trains_each_variant_once_and_writes_the_results(tmp_path):
    config = config_for(tmp_path, tiny_space(tmp_path), prune=False)
    entries = study.run(config, log=lambda line: None)
    assert len(entries) == 4 and all(e.outcome == "complete" for e in entries)
    assert len({e.variant for e in entries}) == 4
    assert [e.bits for e in entries] == sorted(e.bits for e in entries)
    written = study.write_results(config, entries)
    with open(written["csv"]) as handle:
        rows = handle.read().splitlines()
    assert len(rows) == 5 and rows[0].startswith("rank,trial,outcome,variant,held_out_bits")
    assert [row["trial"] for row in json.load(open(written["json"]))] == [e.trial for e in entries]
    assert os.path.getsize(written["pareto"]) > 10_000
    # The best variant is a choice-free, self-contained spec with the winner's identity.
    program = check(written["best"])
    assert not ir.contains_search(program.levels) and ir.variant_id(program) == entries[0].variant
    trained = CliRunner().invoke(cli, ["run", written["best"], "--steps", "1", "--runs", str(tmp_path / "again")])
    assert trained.exit_code == 0, trained.output


def test_a_rerun_resumes_the_study_without_training_again(tmp_path):
    config = config_for(tmp_path, tiny_space(tmp_path), trials=2)
    study.run(config, log=lambda line: None)
    first = {t.number: t.value for t in trials_of(config)}
    config.trials = 3
    lines = []
    study.run(config, log=lines.append)
    after = trials_of(config)
    assert len(after) == 3 and {t.number: t.value for t in after if t.number < 2} == first
    assert sum(line.endswith("tok/s") or "pruned" in line for line in lines) == 1  # one new trial trained


def test_the_same_variant_is_never_trained_twice(tmp_path):
    spec = tiny_space(tmp_path, replace=("objective choice(l2, dot)", "objective l2"))
    spec_text = open(spec).read().replace("every choice(1, 8)", "every 8")
    open(spec, "w").write(spec_text)
    config = config_for(tmp_path, spec, sampler="random", trials=2)
    lines = []
    entries = study.run(config, log=lines.append)
    trials = trials_of(config)
    assert [t.user_attrs["outcome"] for t in trials] == ["complete", "duplicate"]
    assert trials[1].value == trials[0].value and trials[1].user_attrs["duplicate_of"] == 0
    assert len(entries) == 1 and sum("training" in line for line in lines) == 1


def test_two_workers_share_one_study_without_duplicating_trials(tmp_path):
    config = config_for(tmp_path, tiny_space(tmp_path, steps=30), workers=2, prune=False)
    study.run(config, log=lambda line: None)
    trials = trials_of(config)
    assert len(trials) == 4
    assert len({t.user_attrs["variant"] for t in trials}) == 4
    assert {t.user_attrs["worker"] for t in trials} == {0, 1}


# Only a bound on a hang: each test waits for an event (a trial's state, a file), however slow
# the machine, and fails on its own terms if the event never comes.
OUTER_TIMEOUT = 1800


def _wait_for(event, process: subprocess.Popen) -> bool:
    """Poll until `event()` holds while `process` runs; False if it ended first."""
    deadline = time.monotonic() + OUTER_TIMEOUT
    while not event():
        if process.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_a_killed_sweep_resumes_and_reruns_the_trial_it_was_in(tmp_path):
    spec = tiny_space(tmp_path, steps=600)  # seconds per trial: the kill lands inside the second
    config = config_for(tmp_path, spec, trials=2, prune=False)
    script = (f"from nestc.search import study\n"
              f"from nestc.runtime.config import RunConfig\n"
              f"study.run(study.SweepConfig(spec={spec!r}, trials=2, run={config.run!r}, sampler='grid', "
              f"heartbeat_seconds=1, prune=False), log=lambda line: None)\n")
    process = subprocess.Popen([sys.executable, "-c", script])
    database = os.path.join(config.directory, "study.db")

    def second_trial_running() -> bool:
        try:
            with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=30) as connection:
                states = [s for (s,) in connection.execute("SELECT state FROM trials ORDER BY number")]
        except sqlite3.OperationalError:  # the database or its tables are not created yet
            return False
        return states == ["COMPLETE", "RUNNING"]

    try:
        assert _wait_for(second_trial_running, process), "the sweep ended before its second trial was running"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    time.sleep(3.5)  # longer than the grace period of three 1-second heartbeats
    study.run(config, log=lambda line: None)
    trials = trials_of(config)
    states = [t.state.name for t in trials]
    assert states == ["COMPLETE", "FAIL", "COMPLETE"]
    # The retry is the killed trial's grid point, enqueued again.
    assert trials[2].params == trials[1].system_attrs["fixed_params"] and trials[2].user_attrs["outcome"] == "complete"


def test_ctrl_c_stops_a_sweep_that_a_rerun_then_finishes(tmp_path):
    spec = tiny_space(tmp_path, steps=800)  # seconds per trial: the signal lands inside the first
    config = config_for(tmp_path, spec, trials=2, prune=False)
    command = [sys.executable, "-m", "nestc", "sweep", spec, "--trials", "2", "--task", "mqar", "--task-option",
               "pairs=2", "--task-option", "keys=8", "--task-option", "values=8", "--sampler", "grid", "--no-prune",
               "--runs", config.run.runs]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    trials = os.path.join(config.directory, "trials")

    def first_trial_training() -> bool:
        return os.path.isdir(trials) and any("metrics.jsonl" in os.listdir(os.path.join(trials, d))
                                             for d in os.listdir(trials))

    assert _wait_for(first_trial_training, process), "the sweep ended before its first trial was training"
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=OUTER_TIMEOUT)
    assert process.returncode == 130 and "run the same command again to resume" in stderr
    assert "Traceback" not in stderr
    interrupted = trials_of(config)
    assert [t.state.name for t in interrupted][:1] == ["FAIL"]
    study.run(config, log=lambda line: None)
    finished = [t for t in trials_of(config) if t.state.name == "COMPLETE"]
    assert len(finished) == 2 and interrupted[0].params in [t.params for t in finished]


def test_invalid_variants_are_reported_skipped_and_counted(tmp_path):
    spec = tiny_space(tmp_path, replace=("every choice(1, 8)", "every choice(1, 7)"))
    config = config_for(tmp_path, spec)
    lines = []
    entries = study.run(config, log=lines.append)
    assert [e.outcome for e in entries][-2:] == ["invalid", "invalid"]
    assert all("does not divide the training context" in e.error for e in entries[-2:])
    assert any("invalid variant, skipped" in line for line in lines)


def test_a_study_run_with_other_settings_is_not_resumed(tmp_path):
    config = config_for(tmp_path, tiny_space(tmp_path), trials=1)
    study.run(config, log=lambda line: None)
    config.run = dataclasses.replace(config.run, steps=3)
    with pytest.raises(study.SweepError, match=r"was run with steps None \(now 3\)"):
        study.open_study(config)


def test_the_pareto_front_keeps_the_points_nothing_beats():
    points = [(1.0, 5.0), (2.0, 3.0), (3.0, 4.0), (4.0, 1.0), (2.0, 3.0)]
    # (3, 4) is beaten by (2, 3); the repeated (2, 3) points do not beat each other.
    assert study.pareto_front(points) == [0, 1, 3, 4]


def test_cli_sweep_trains_and_prints_the_leaderboard(tmp_path):
    spec = tiny_space(tmp_path)
    result = CliRunner().invoke(cli, ["sweep", spec, "--task", "mqar", "--task-option", "pairs=2",
                                      "--trials", "2", "--steps", "2", "--runs", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    assert "sweep leaderboard" in result.output and "best.nest" in result.output


@pytest.mark.parametrize("arguments, message", [
    ([], "--trials N"),
    (["--trials", "2", "--sample", "3"], "--sample lists variants with --dry-run"),
    (["--trials", "2", "--task", "mqar", "--task-option", "colour=3"], "has no option colour"),
])
def test_cli_sweep_usage_errors(tmp_path, arguments, message):
    result = CliRunner().invoke(cli, ["sweep", tiny_space(tmp_path), *arguments])
    assert result.exit_code == 2 and message in result.output


@pytest.mark.parametrize("mode", [["--dry-run"], ["--trials", "2"]])
def test_a_space_with_errors_is_reported_with_spans(tmp_path, mode):
    spec = tiny_space(tmp_path, replace=("objective choice(l2, dot)", "objective choice()"))
    result = CliRunner().invoke(cli, ["sweep", spec, *mode, "--runs", str(tmp_path / "runs")])
    assert result.exit_code == 1 and "error[N0119]: a choice needs at least one option" in result.output
    assert "tiny.nest:7:15" in result.output


def test_a_grid_needs_a_finite_space(tmp_path):
    spec = tiny_space(tmp_path, replace=("adamw(lr=3e-3)", "adamw(lr=loguniform(1e-4, 1e-2))"))
    result = CliRunner().invoke(cli, ["sweep", spec, "--trials", "2", "--sampler", "grid",
                                      "--runs", str(tmp_path / "runs")])
    assert result.exit_code == 1 and "--sampler grid needs a finite space" in result.output


def test_unused_library_levels_do_not_constrain_the_context(tmp_path):
    (tmp_path / "lib.nest").write_text("level slow : mlp {\n    objective task\n    every 256\n}\n"
                                       "level fast extends slow {\n    every 16\n}\n")
    body = 'import "lib.nest"\nmodel {\n    vocab 8\n    dim 8\n    block = residual(BLOCK)\n}\n' \
           'train {\n    context 64\n}\n'
    (tmp_path / "uses_fast.nest").write_text(body.replace("BLOCK", "fast"))
    (tmp_path / "uses_slow.nest").write_text(body.replace("BLOCK", "slow"))
    assert analyze_file(str(tmp_path / "uses_fast.nest")).ok
    slow = analyze_file(str(tmp_path / "uses_slow.nest"))
    assert [d.message for d in slow.diagnostics if d.is_error] == ["chunk size 256 does not divide the training "
                                                                    "context 64"]

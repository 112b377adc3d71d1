"""Crash-safe checkpoints (nestc/runtime/rundir.py): periodic, written as one unit, torn ones
passed over, resume exact, and no run silently replaced."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import nestc.runtime.train
from nestc.cli import cli
from nestc.runtime import rundir
from nesttest import TINY_RUN

SPEC = "specs/deltanet.nest"


@pytest.fixture(autouse=True)
def _at_root(monkeypatch, request):
    monkeypatch.chdir(request.config.rootpath)


def _run(*args):
    return CliRunner().invoke(cli, ["run", SPEC, *TINY_RUN, *args])


def _only(runs):
    (directory,) = list(runs.iterdir())
    return directory


def _steps_logged(directory) -> list[int]:
    return [json.loads(line)["step"] for line in (directory / "metrics.jsonl").read_text().splitlines()]


def _losses(directory) -> list[float]:
    return [json.loads(line)["loss"] for line in (directory / "metrics.jsonl").read_text().splitlines()]


def _assert_same_weights(a, b) -> None:
    one, two = load_file(rundir.latest(str(a)).model_file), load_file(rundir.latest(str(b)).model_file)
    assert one.keys() == two.keys()
    for name in one:
        assert torch.equal(one[name], two[name]), name


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Six steps in one go: what every interrupted and resumed run must equal, bit for bit."""
    runs = tmp_path_factory.mktemp("whole")
    result = CliRunner().invoke(cli, ["run", SPEC, *TINY_RUN, "--steps", "6", "--runs", str(runs)])
    assert result.exit_code == 0, result.output
    return _only(runs)


def test_checkpoints_come_every_n_steps_and_the_newest_two_are_kept(tmp_path):
    result = _run("--steps", "7", "--checkpoint-every", "2", "--runs", str(tmp_path))
    assert result.exit_code == 0, result.output
    directory = _only(tmp_path)
    assert sorted(os.listdir(directory / "checkpoints")) == ["step-00000006", "step-00000007"]
    manifest = json.loads((directory / "checkpoints" / "step-00000007" / "manifest.json").read_text())
    assert manifest["step"] == 7 and set(manifest["files"]) == {"model.safetensors", "trainer.safetensors"}


def test_the_main_job_checkpoints_at_least_three_times():
    from nestc.lang.sema import analyze_source, read_source

    train = analyze_source(read_source("specs/hope.nest")).program.train
    assert train.steps // train.checkpoint_every >= 3


def test_a_step_cut_short_keeps_the_last_whole_checkpoint_and_resume_is_exact(uninterrupted, tmp_path, monkeypatch):
    """An exception inside step 4 (a second Ctrl-C, say) leaves the state part-way through that
    step; the run keeps its checkpoint of step 2, and the resumed run equals one never stopped."""
    original = nestc.runtime.train._batch
    calls = {"count": 0}

    def cut_in_step_4(*args):
        calls["count"] += 1
        if calls["count"] == 4:
            raise KeyboardInterrupt
        return original(*args)

    with monkeypatch.context() as patched:
        patched.setattr(nestc.runtime.train, "_batch", cut_in_step_4)
        stopped = _run("--steps", "6", "--checkpoint-every", "2", "--runs", str(tmp_path))
    assert stopped.exit_code == 130, stopped.output
    assert "interrupted during step 4: the checkpoint of step 2 stands" in stopped.output
    directory = _only(tmp_path)
    assert _steps_logged(directory) == [1, 2, 3]
    resumed = _run("--steps", "6", "--checkpoint-every", "2", "--runs", str(tmp_path), "--resume")
    assert resumed.exit_code == 0 and "resuming" in resumed.output and "at step 2" in resumed.output
    assert _steps_logged(directory) == [1, 2, 3, 4, 5, 6]  # step 3's line was cut back, then written again
    assert _losses(directory) == _losses(uninterrupted)
    _assert_same_weights(directory, uninterrupted)


def test_a_torn_or_damaged_newest_checkpoint_is_passed_over(uninterrupted, tmp_path):
    assert _run("--steps", "4", "--checkpoint-every", "1", "--runs", str(tmp_path)).exit_code == 0
    directory = _only(tmp_path)
    newest = directory / "checkpoints" / "step-00000004"
    data = bytearray((newest / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the weights
    (newest / "model.safetensors").write_bytes(bytes(data))
    partial = directory / "checkpoints" / ".partial-step-00000005-1"  # a write that a kill cut short
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")
    resumed = _run("--steps", "6", "--checkpoint-every", "1", "--runs", str(tmp_path), "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "passing over the checkpoint of step 4: `model.safetensors` does not match the manifest" in resumed.output
    assert "at step 3" in resumed.output
    assert not partial.exists()
    assert _losses(directory) == _losses(uninterrupted)
    _assert_same_weights(directory, uninterrupted)


def test_checkpoints_none_of_which_is_complete_are_a_clear_error(tmp_path):
    assert _run("--steps", "2", "--runs", str(tmp_path)).exit_code == 0
    directory = _only(tmp_path)
    (directory / "checkpoints" / "step-00000002" / "manifest.json").unlink()
    resumed = _run("--steps", "3", "--runs", str(tmp_path), "--resume")
    assert resumed.exit_code == 1 and "has no complete checkpoint (step 2: it has no manifest" in resumed.output
    evaluated = CliRunner().invoke(cli, ["eval", str(directory), "README.md"])
    assert evaluated.exit_code == 2 and "no complete checkpoint" in evaluated.output
    assert "Traceback" not in resumed.output + evaluated.output


def test_a_new_run_never_replaces_an_earlier_one(tmp_path):
    assert _run("--steps", "3", "--runs", str(tmp_path)).exit_code == 0
    directory = _only(tmp_path)
    before = (directory / "checkpoints" / "step-00000003" / "model.safetensors").read_bytes()
    again = _run("--steps", "1", "--runs", str(tmp_path))
    assert again.exit_code == 1
    assert "already holds a run of this spec (a checkpoint at step 3): continue it with --resume, or start it " \
           "over with --overwrite" in again.output
    assert (directory / "checkpoints" / "step-00000003" / "model.safetensors").read_bytes() == before
    assert _steps_logged(directory) == [1, 2, 3]
    both = _run("--steps", "1", "--runs", str(tmp_path), "--resume", "--overwrite")
    assert both.exit_code == 2 and "give one" in both.output
    over = _run("--steps", "1", "--runs", str(tmp_path), "--overwrite")
    assert over.exit_code == 0, over.output
    assert os.listdir(directory / "checkpoints") == ["step-00000001"] and _steps_logged(directory) == [1]


def test_resuming_a_finished_run_scores_it_again(tmp_path):
    assert _run("--steps", "2", "--runs", str(tmp_path)).exit_code == 0
    again = _run("--steps", "2", "--runs", str(tmp_path), "--resume")
    assert again.exit_code == 0 and "final eval nan" not in again.output and "final eval" in again.output
    assert _steps_logged(_only(tmp_path)) == [1, 2]


def test_the_checkpoint_cadence_is_not_part_of_the_variant(tmp_path):
    assert _run("--steps", "2", "--runs", str(tmp_path)).exit_code == 0
    other_cadence = _run("--steps", "3", "--checkpoint-every", "1", "--checkpoint-minutes", "0.5", "--resume",
                         "--runs", str(tmp_path))
    assert other_cadence.exit_code == 0 and "at step 2" in other_cadence.output
    assert len(list(tmp_path.iterdir())) == 1


def _wait_for_a_write(process, root) -> None:
    """Return as soon as a checkpoint write is under way in `root` (or the process has ended)."""
    while process.poll() is None:
        if os.path.isdir(root) and any(name.startswith(".partial-") for name in os.listdir(root)):
            return


def _kill_and_resume(spec_args: list[str], runs, rng: random.Random, kills: int, steps: int) -> dict:
    """SIGKILL `nestc run` `kills` times, resuming after each: every other kill at a random moment,
    the others as soon as a checkpoint write has begun (the run checkpoints every step). Counts
    the kills that landed, those that left a partial write behind, and the kills after which the
    run could be resumed; the run is then finished by one more resume."""
    counts = {"landed": 0, "inside a write": 0, "resumable": 0}
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "nestc", "run", *spec_args, "--steps", str(steps), "--checkpoint-every", "1",
               "--runs", str(runs), "--resume"]
    for kill in range(kills):
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=environment)
        process.stderr.readline()  # it is training (or resuming) now
        if kill % 2:
            _wait_for_a_write(process, next(runs.iterdir()) / "checkpoints")
        else:
            try:
                process.wait(timeout=rng.uniform(0.05, 0.8))  # the random moment, not a deadline on the run
            except subprocess.TimeoutExpired:
                pass
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            counts["landed"] += 1
        process.wait()
        process.stderr.close()
        root = _only(runs) / "checkpoints"
        if root.is_dir() and any(name.startswith(".partial-") for name in os.listdir(root)):
            counts["inside a write"] += 1
        if rundir.latest(str(_only(runs))) is not None or not root.exists():  # CheckpointError fails the test
            counts["resumable"] += 1
    final = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=3600)
    assert final.returncode == 0, final.stderr[-2000:]
    return counts


@pytest.mark.slow
def test_twenty_sigkills_at_random_moments_each_leave_a_resumable_run_and_resume_is_exact(tmp_path):
    steps = 500  # more than the kills leave time for, so that every kill finds the run still training
    whole = subprocess.run([sys.executable, "-m", "nestc", "run", SPEC, *TINY_RUN, "--steps", str(steps),
                            "--runs", str(tmp_path / "whole")], capture_output=True, text=True, timeout=3600)
    assert whole.returncode == 0, whole.stderr[-2000:]
    counts = _kill_and_resume([SPEC, *TINY_RUN], tmp_path / "killed", random.Random(12), kills=20, steps=steps)
    assert counts["landed"] >= 10 and counts["inside a write"] >= 2 and counts["resumable"] == 20, counts
    killed, reference = _only(tmp_path / "killed"), _only(tmp_path / "whole")
    assert _steps_logged(killed) == list(range(1, steps + 1))
    assert _losses(killed) == _losses(reference)
    _assert_same_weights(killed, reference)

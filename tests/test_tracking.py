"""`nestc run --track`: metrics logged to TensorBoard (and wandb/MLflow when installed), and the
progress display on a terminal and in a log."""

from __future__ import annotations

import io
import json
import re
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from rich.console import Console

from nestc.cli import cli
from nestc.runtime import tracking
from nestc.runtime.train import Progress
from nesttest import TINY_RUN



@pytest.fixture(autouse=True)
def _at_root(monkeypatch, request):
    monkeypatch.chdir(request.config.rootpath)


def _scalars(directory) -> dict[str, list[tuple[int, float]]]:
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator",
        reason="tensorboard is not installed: pip install 'nestc[tensorboard]' (or the test extra)")
    events = event_accumulator.EventAccumulator(str(directory))
    events.Reload()
    return {name: [(e.step, e.value) for e in events.Scalars(name)] for name in events.Tags()["scalars"]}


def test_tensorboard_holds_the_metrics_jsonl_values(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed: pip install 'nestc[tensorboard]'")
    result = CliRunner().invoke(cli, ["run", "specs/deltanet.nest", "--steps", "4", "--eval-every", "2",
                                      "--runs", str(tmp_path), "--track", "tensorboard", *TINY_RUN])
    assert result.exit_code == 0, result.output
    (directory,) = list(tmp_path.iterdir())
    records = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
    scalars = _scalars(directory / "tensorboard")
    # TensorBoard keeps float32: each value is the metrics.jsonl one, rounded to float32
    for key, name in (("loss", "train/loss"), ("lr", "train/lr"), ("eval_bits_per_byte", "eval/eval_bits_per_byte")):
        expected = [(r["step"], float(np.float32(r[key]))) for r in records if key in r]
        assert scalars[name] == expected, name
    assert [step for step, _ in scalars["eval/eval_bits_per_byte"]] == [2, 4]
    # the hparams session: the run's settings beside its final score
    final = _scalars(directory / "tensorboard" / "hparams")
    assert final["eval/eval_bits_per_byte"] == [(4, float(np.float32(records[-1]["eval_bits_per_byte"])))]


def test_tensorboard_dir_puts_the_event_files_there(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed: pip install 'nestc[tensorboard]'")
    logs = tmp_path / "logs"
    result = CliRunner().invoke(cli, ["run", "specs/deltanet.nest", "--steps", "1", "--runs", str(tmp_path / "runs"),
                                      "--track", "tensorboard", "--tensorboard-dir", str(logs), *TINY_RUN])
    assert result.exit_code == 0, result.output
    assert [step for step, _ in _scalars(logs)["train/loss"]] == [1]
    (directory,) = list((tmp_path / "runs").iterdir())
    assert not (directory / "tensorboard").exists()


@pytest.mark.parametrize("kind", ["wandb", "mlflow"])
def test_a_tracker_whose_library_is_missing_names_the_package(kind, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, kind, None)  # importing it now fails, installed or not
    with pytest.raises(tracking.TrackingError, match=f"--track {kind} needs the `{kind}` package.*pip install {kind}"):
        tracking.open_trackers([kind], str(tmp_path), "run", {})
    result = CliRunner().invoke(cli, ["run", "specs/deltanet.nest", "--runs", str(tmp_path), "--track", kind, *TINY_RUN])
    assert result.exit_code == 2
    assert f"needs the `{kind}` package, which is not installed" in result.output
    assert "Traceback" not in result.output and not list(tmp_path.iterdir())  # refused before anything was made


def test_tensorboard_dir_without_tensorboard_tracking_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(cli, ["run", "specs/deltanet.nest", "--tensorboard-dir", str(tmp_path)])
    assert result.exit_code == 2 and "give --track tensorboard" in result.output


class _Clock:
    """A clock the test moves by hand."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _lines(total: int, advance: list[float], extra_at=()) -> list[str]:
    stream, clock = io.StringIO(), _Clock()
    progress = Progress(total, stream, clock=clock, every_seconds=30)
    for step, seconds in enumerate(advance, 1):
        clock.now += seconds
        progress.update(step, 2.5, 64 * step, "  eval 2.000 bits/byte" if step in extra_at else "")
    progress.done()
    return stream.getvalue().splitlines()


def test_a_log_gets_a_line_at_the_first_step_and_at_the_end():
    lines = _lines(100, [1.0] * 100)
    assert "step 1/100" in lines[0] and "64 tok/s" in lines[0] and "eta 99s" in lines[0]
    assert "step 100/100" in lines[-1]
    assert [line.split()[2] for line in lines] == [f"{n}/100" for n in (1, *range(10, 101, 10))]


def test_a_log_gets_a_line_every_30_seconds_between_the_step_lines():
    lines = _lines(100, [1.0, 20.0, 20.0, 5.0, 5.0, 5.0], extra_at=(5,))
    # step 1; step 3 (40 s after step 1); step 5 (its evaluation); step 6 is 10 s after step 5
    assert [line.split()[2] for line in lines] == ["1/100", "3/100", "5/100"]
    assert lines[-1].endswith("eval 2.000 bits/byte")


def test_a_terminal_gets_a_rich_bar_with_steps_and_tokens_per_second():
    screen, clock = io.StringIO(), _Clock()
    progress = Progress(8, console=Console(file=screen, force_terminal=True, width=160), clock=clock)
    for step in range(1, 9):
        clock.now += 0.5
        progress.update(step, 2.25, 100 * step, "  eval 1.500 bits/byte" if step == 8 else "")
    progress.done()
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue())  # without its colours
    assert "8/8" in text and "200 tok/s" in text and "train 2.250 bits" in text
    assert "step 8/8:  eval 1.500 bits/byte" in text

"""`nestc run`: training end to end on the embedded corpus, checkpoints, resume, --set."""

from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import nestc.train
from nestc.cli import cli

TINY = ["--set", "model.dim=16", "--set", "model.heads=2", "--set", "model.layers=1", "--set", "train.batch=2",
        "--set", "train.context=32"]


@pytest.fixture(autouse=True)
def _at_root(monkeypatch, request):
    monkeypatch.chdir(request.config.rootpath)


def _run(*args):
    return CliRunner().invoke(cli, ["run", *args])


@pytest.mark.parametrize("spec", ["specs/deltanet.nest", "specs/transformer.nest", "specs/titans.nest"])
def test_a_few_steps_write_everything(spec, tmp_path):
    result = _run(spec, "--steps", "3", "--runs", str(tmp_path), *TINY)
    assert result.exit_code == 0, result.output
    (directory,) = list(tmp_path.iterdir())
    assert {"spec.nest", "metrics.jsonl", "model.safetensors", "trainer.pt", "report.md"} <= set(os.listdir(directory))
    records = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert "eval_bits_per_byte" in records[-1]
    weights = load_file(str(directory / "model.safetensors"))
    assert "embedding.weight" in weights and weights["embedding.weight"].shape == (256, 16)
    assert "unigram baseline" in result.output and "saved in" in result.output


def test_resume_continues_exactly_where_an_interrupted_run_stopped(tmp_path, monkeypatch):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert _run("specs/deltanet.nest", "--steps", "4", "--runs", str(whole), *TINY).exit_code == 0
    original = nestc.train._batch
    calls = {"count": 0}

    def interrupted_batch(*args):
        calls["count"] += 1
        if calls["count"] == 3:
            raise KeyboardInterrupt
        return original(*args)

    monkeypatch.setattr(nestc.train, "_batch", interrupted_batch)
    stopped = _run("specs/deltanet.nest", "--steps", "4", "--runs", str(parts), *TINY)
    assert stopped.exit_code == 130 and "interrupted at step 2" in stopped.output
    monkeypatch.setattr(nestc.train, "_batch", original)
    resumed = _run("specs/deltanet.nest", "--steps", "4", "--runs", str(parts), "--resume", *TINY)
    assert resumed.exit_code == 0, resumed.output
    (a,), (b,) = list(whole.iterdir()), list(parts.iterdir())
    losses = [[json.loads(line)["loss"] for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (a, b)]
    assert losses[0] == losses[1]
    for name, tensor in load_file(str(a / "model.safetensors")).items():
        assert torch.equal(tensor, load_file(str(b / "model.safetensors"))[name]), name


def test_bad_set_paths_are_usage_errors_and_bad_values_diagnostics(tmp_path):
    unknown = _run("specs/deltanet.nest", "--set", "train.stepz=3", "--runs", str(tmp_path))
    assert unknown.exit_code == 2 and "did you mean `steps`" in unknown.output
    no_value = _run("specs/deltanet.nest", "--set", "train.steps", "--runs", str(tmp_path))
    assert no_value.exit_code == 2 and "PATH=VALUE" in no_value.output
    bad_level = _run("specs/deltanet.nest", "--set", "level.mixr.every=2", "--runs", str(tmp_path))
    assert bad_level.exit_code == 2 and "did you mean `mixer`" in bad_level.output
    out_of_range = _run("specs/deltanet.nest", "--set", "train.batch=0", "--runs", str(tmp_path))
    assert out_of_range.exit_code == 1 and "error[N0106]" in out_of_range.output
    assert "Traceback" not in unknown.output + no_value.output + bad_level.output + out_of_range.output
    assert not any(tmp_path.iterdir())  # nothing was trained or written


def test_a_killed_checkpoint_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    assert _run("specs/deltanet.nest", "--steps", "2", "--runs", str(tmp_path), *TINY).exit_code == 0
    (directory,) = list(tmp_path.iterdir())
    before = (directory / "model.safetensors").read_bytes()

    def dies_midway(path, *args, **kwargs):
        with open(path, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", dies_midway)
    result = _run("specs/deltanet.nest", "--steps", "2", "--runs", str(tmp_path), *TINY)
    assert result.exit_code != 0
    assert (directory / "model.safetensors").read_bytes() == before
    load_file(str(directory / "model.safetensors"))

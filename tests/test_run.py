"""`nestc run`: training end to end on the embedded corpus, checkpoints, resume, --set."""

from __future__ import annotations

import json
import math
import os
import re
import signal

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import nestc.runtime.train
from nestc.cli import cli
from nesttest import TINY_RUN



@pytest.fixture(autouse=True)
def _at_root(monkeypatch, request):
    monkeypatch.chdir(request.config.rootpath)


def _run(*args):
    return CliRunner().invoke(cli, ["run", *args])


def _weights(run_directory):
    """The weights of a run's newest complete checkpoint."""
    from nestc.runtime.rundir import latest

    return load_file(latest(str(run_directory)).model_file)


@pytest.mark.parametrize("spec", ["specs/deltanet.nest", "specs/transformer.nest", "specs/titans.nest"])
def test_a_few_steps_write_everything(spec, tmp_path):
    result = _run(spec, "--steps", "3", "--runs", str(tmp_path), *TINY_RUN)
    assert result.exit_code == 0, result.output
    (directory,) = list(tmp_path.iterdir())
    assert {"spec.nest", "metrics.jsonl", "checkpoints", "report.md", "curves.png"} <= set(os.listdir(directory))
    assert os.listdir(directory / "checkpoints") == ["step-00000003"]
    assert sorted(os.listdir(directory / "checkpoints" / "step-00000003")) == \
        ["manifest.json", "model.safetensors", "trainer.safetensors"]
    assert (directory / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the report shows the prompt as the text it is, not as a Python bytes literal
    report = (directory / "report.md").read_text()
    assert "the prompt (the held-out text's start):\n\n```\n" in report and "b'" not in report, report
    records = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert "eval_bits_per_byte" in records[-1]
    weights = _weights(directory)
    assert "embedding.weight" in weights and weights["embedding.weight"].shape == (256, 16)
    assert "unigram baseline" in result.output and "saved in" in result.output


# Each outer optimizer's whole state must round-trip: Muon's inner AdamW moments, M3's step count,
# and (with `every 2 steps` on the ffn) the gradients accumulated between a slow level's updates.
OPTIMIZERS = ["adamw(lr=1e-3)", "sgd(lr=1e-2, momentum=0.9)", "muon(lr=0.02, adam_lr=1e-3)",
              "m3(lr=1e-3, every=2)"]


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_resume_continues_exactly_where_an_interrupted_run_stopped(optimizer, tmp_path, monkeypatch):
    spec = tmp_path / "slow_ffn.nest"
    text = open("specs/deltanet.nest").read()
    assert 'import "lib/transformer.nest"  # ffn\n' in text
    spec.write_text(text.replace('import "lib/transformer.nest"  # ffn\n',
                                 "level ffn : mlp(expand=4, residual=false) {\n    every 2 steps\n}\n"))
    settings = [*TINY_RUN, "--set", f"train.optimizer={optimizer}"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    first = _run(str(spec), "--steps", "5", "--runs", str(whole), *settings)
    assert first.exit_code == 0, first.output
    original = nestc.runtime.train._batch
    calls = {"count": 0}

    def interrupted_batch(*args):
        calls["count"] += 1
        if calls["count"] == 3:  # a Ctrl-C in step 3: the run stops after it, the ffn holding its gradient
            os.kill(os.getpid(), signal.SIGINT)
        return original(*args)

    monkeypatch.setattr(nestc.runtime.train, "_batch", interrupted_batch)
    stopped = _run(str(spec), "--steps", "5", "--runs", str(parts), *settings)
    assert stopped.exit_code == 130 and "interrupted at step 3" in stopped.output
    monkeypatch.setattr(nestc.runtime.train, "_batch", original)
    resumed = _run(str(spec), "--steps", "5", "--runs", str(parts), "--resume", *settings)
    assert resumed.exit_code == 0, resumed.output
    (a,), (b,) = list(whole.iterdir()), list(parts.iterdir())
    losses = [[json.loads(line)["loss"] for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (a, b)]
    assert len(losses[0]) == 5 and losses[0] == losses[1]
    for name, tensor in _weights(a).items():
        assert torch.equal(tensor, _weights(b)[name]), name


def _forge_manifest(checkpoint_directory):
    """Make a checkpoint's manifest match its (replaced) files."""
    import hashlib

    manifest_path = checkpoint_directory / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for name in manifest["files"]:
        data = (checkpoint_directory / name).read_bytes()
        manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest_path.write_text(json.dumps(manifest))


class _CreatesAFile:
    """Unpickling this runs `open(path, "w")`: what a hostile checkpoint would do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_no_command_unpickles_a_planted_file(trained, tmp_path):
    """A pickle planted as every file that a command reads (trainer state, weights, memory state)
    is refused with a clear error, and the code it carries never runs."""
    import shutil

    marker = tmp_path / "pwned"
    planted = tmp_path / "runs"
    shutil.copytree(trained.parent, planted)
    (run,) = list(planted.iterdir())
    (saved,) = list((run / "checkpoints").iterdir())
    torch.save({"step": _CreatesAFile(marker)}, saved / "trainer.safetensors")
    _forge_manifest(saved)  # an attacker can rewrite the manifest too
    resumed = _run("specs/deltanet.nest", "--steps", "2", "--runs", str(planted), "--resume", *TINY_RUN)
    assert resumed.exit_code == 1 and "is not a trainer state" in resumed.output, resumed.output
    old_format = tmp_path / "old" / run.name
    old_format.mkdir(parents=True)
    (old_format / "spec.nest").write_text((run / "spec.nest").read_text())
    torch.save({"step": _CreatesAFile(marker)}, old_format / "trainer.pt")
    refused = _run("specs/deltanet.nest", "--steps", "2", "--runs", str(old_format.parent), "--resume", *TINY_RUN)
    assert refused.exit_code == 1 and "once a pickle, which nestc no longer reads" in refused.output, refused.output
    state = tmp_path / "state.safetensors"
    torch.save(_CreatesAFile(marker), state)
    readers = [["eval", str(run), "README.md", "--state-in", str(state)],
               ["generate", str(run), "--length", "2", "--state-in", str(state)],
               ["memorize", str(run), "README.md", "--state-in", str(state)]]
    for args in readers:
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 2 and "not a state file" in result.output, (args, result.output)
    torch.save({"embedding.weight": _CreatesAFile(marker)}, saved / "model.safetensors")
    _forge_manifest(saved)
    for args in (["eval", str(run), "README.md"], ["generate", str(run), "--length", "2"]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 2 and "not a readable safetensors file" in result.output, (args, result.output)
    assert not marker.exists()


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


def test_errors_in_set_values_point_at_the_set_not_at_the_file(tmp_path):
    """Each value an assignment put into the spec is shown on its `--set` (one line per
    assignment, columns counted in `--set PATH=VALUE`), with a note on the field it changed; a
    later splice that lengthens an earlier line moves the regions after it."""
    result = _run("specs/deltanet.nest", "--set", "model.dim=-5", "--set", "level.mixer.objective=nonsense",
                  "--set", "level.mixer.retain=x+fooo", "--runs", str(tmp_path))
    assert result.exit_code == 1, result.output
    # "--set model.dim=" is 16 characters: -5 at 17; "--set level.mixer.objective=" 28: nonsense at 29;
    # "--set level.mixer.retain=x+" 27: fooo at 28
    for place in ("--> --set:1:17", "--> --set:2:29", "--> --set:3:28"):
        assert place in result.output, result.output
    assert "2 | --set level.mixer.objective=nonsense" in result.output
    assert "--set replaces `l2` in specs/deltanet.nest:11:15" in result.output  # where `objective l2` stood
    assert "--set adds `retain` to level `mixer` of specs/deltanet.nest" in result.output
    assert "Traceback" not in result.output and not any(tmp_path.iterdir())


def test_set_reaches_a_level_defined_in_an_imported_file(tmp_path):
    result = _run("specs/hope.nest", "--set", "level.cms_slow.every=7", "--runs", str(tmp_path))
    # "--set level.cms_slow.every=" is 27 characters: the 7 at 28
    assert result.exit_code == 1 and "--> --set:1:28" in result.output
    assert "::> specs/hope.nest:" in result.output  # `context 256`, the other half of the N0110, stays
    assert "--set replaces `64` in specs/lib/cms.nest" in result.output


def test_an_error_in_a_section_a_set_changed_names_the_set(tmp_path):
    """`layers 4` in place of hybrid.nest's list of blocks leaves `model` without a block: the
    error stands at the section, and says which assignment changed it."""
    result = _run("specs/hybrid.nest", "--set", "model.layers=4", "--runs", str(tmp_path))
    assert result.exit_code == 1 and "error[N0107]" in result.output
    assert "note: `--set model.layers=4` changed this `model` section" in result.output


def test_a_failed_checkpoint_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    assert _run("specs/deltanet.nest", "--steps", "2", "--runs", str(tmp_path), *TINY_RUN).exit_code == 0
    (directory,) = list(tmp_path.iterdir())
    before = _weights(directory)

    def dies_midway(tensors, path, *args, **kwargs):
        with open(path, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    with monkeypatch.context() as patched:
        patched.setattr("safetensors.torch.save_file", dies_midway)
        result = _run("specs/deltanet.nest", "--steps", "4", "--runs", str(tmp_path), "--resume", *TINY_RUN)
    assert result.exit_code == 1 and "disk full" in result.output
    from nestc.runtime.rundir import latest

    assert latest(str(directory)).step == 2
    assert all(torch.equal(tensor, before[name]) for name, tensor in _weights(directory).items())
    resumed = _run("specs/deltanet.nest", "--steps", "4", "--runs", str(tmp_path), "--resume", *TINY_RUN)
    assert resumed.exit_code == 0 and "resuming" in resumed.output and latest(str(directory)).step == 4


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    result = CliRunner().invoke(cli, ["run", "specs/deltanet.nest", "--steps", "2", "--runs", str(runs), *TINY_RUN])
    assert result.exit_code == 0, result.output
    (directory,) = list(runs.iterdir())
    return directory


def test_a_run_directory_is_self_contained(trained, tmp_path):
    spec = (trained / "spec.nest").read_text()
    assert "import" not in spec and "level ffn" in spec  # lib/transformer.nest's ffn, inlined
    moved = tmp_path / "moved"
    os.rename(trained, moved)
    try:
        result = CliRunner().invoke(cli, ["eval", str(moved), "README.md"])
        assert result.exit_code == 0, result.output
    finally:
        os.rename(moved, trained)


def test_memorized_state_is_what_a_single_stream_would_have(trained, tmp_path):
    """eval FILE2 from the state saved after FILE1 == reading FILE1 then FILE2 as one stream."""
    from nestc.runtime.rundir import load_run
    from nestc.runtime.train import read

    first, second = tmp_path / "first.txt", tmp_path / "second.txt"
    first.write_bytes(b"The quick brown fox jumps over the lazy dog. " * 8)
    second.write_bytes(b"Pack my box with five dozen liquor jugs. " * 5)
    state = tmp_path / "state.safetensors"
    memorized = CliRunner().invoke(cli, ["memorize", str(trained), str(first), "--state-out", str(state)])
    assert memorized.exit_code == 0 and state.exists(), memorized.output
    evaluated = CliRunner().invoke(cli, ["eval", str(trained), str(second), "--state-in", str(state)])
    assert evaluated.exit_code == 0, evaluated.output
    reported = float(evaluated.output.split(": ")[1].split(" ")[0])
    model = load_run(str(trained))
    _, carried = read(model, first.read_bytes(), window=len(first.read_bytes()))
    expected, _ = read(model, second.read_bytes(), carried)
    assert abs(reported - expected) < 1e-3
    cold, _ = read(model, second.read_bytes())
    assert abs(cold - expected) > 1e-4  # the saved state changed the predictions


def test_a_state_that_cannot_be_written_is_a_clear_error(trained, tmp_path):
    missing = tmp_path / "no such directory" / "state.safetensors"
    result = CliRunner().invoke(cli, ["memorize", str(trained), "README.md", "--state-out", str(missing)])
    assert result.exit_code == 1 and f"cannot write the state to `{missing}`" in result.output, result.output
    assert "internal" not in result.output and "Traceback" not in result.output


def test_generate_reads_the_prompt_and_writes(trained):
    result = CliRunner().invoke(cli, ["generate", str(trained), "--prompt", "def ", "--length", "30"])
    assert result.exit_code == 0, result.output
    assert len(result.output.strip("\n").encode("utf-8", "surrogateescape")) > 0


def test_corrupt_or_missing_files_are_clear_errors(trained, tmp_path):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    cases = [
        (["eval", str(tmp_path), "README.md"], "not a run directory"),
        (["eval", str(trained), "no_such_file.txt"], "cannot read"),
        (["eval", str(trained), "README.md", "--state-in", str(broken)], "not a state file"),
        (["eval", str(trained), "README.md", "--state-in", str(tmp_path / "absent")], "no state file"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("task", ["mqar", "parity", "aa_star", "abab_star", "anbn", "anbncn", "shuffle2", "niah"])
def test_a_few_steps_on_each_task(task, tmp_path):
    args = ["--set", "model.dim=16", "--set", "model.heads=2", "--set", "model.layers=1", "--set", "train.batch=2"]
    length = "160" if task == "niah" else "32"
    result = _run("specs/deltanet.nest", "--task", task, "--steps", "2", "--runs", str(tmp_path),
                  "--set", f"train.context={length}", *args)
    assert result.exit_code == 0, result.output
    (directory,) = list(tmp_path.iterdir())
    assert directory.name.endswith(f"-{task}")
    last = json.loads((directory / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0.0 <= last["in_distribution_accuracy"] <= 1.0
    # mqar's held-out examples have the training length; every other task also scores longer ones apart
    assert ("longer_accuracy" in last) == (task != "mqar")
    assert "held-out accuracy" in result.output
    assert ("(longer than training)" in result.output) == (task != "mqar")


def test_data_paths_train_on_those_files_and_bad_paths_are_usage_errors(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("alpha beta gamma delta " * 100)
    (corpus / "b.txt").write_text("one two three four five " * 100)
    runs = tmp_path / "runs"
    result = _run("specs/deltanet.nest", "--data", str(corpus), "--steps", "2", "--runs", str(runs), *TINY_RUN)
    assert result.exit_code == 0, result.output
    missing = _run("specs/deltanet.nest", "--data", str(tmp_path / "nope*.txt"), "--runs", str(runs), *TINY_RUN)
    assert missing.exit_code == 2 and "no such file" in missing.output
    (tmp_path / "tiny.txt").write_text("too short")
    short = _run("specs/deltanet.nest", "--data", str(tmp_path / "tiny.txt"), "--runs", str(runs), *TINY_RUN)
    assert short.exit_code == 2 and "at least 1 KB" in short.output


@pytest.mark.parametrize("spec,parallel_flags", [("specs/deltanet.nest", ["--set", "train.processes=2"]),
                                                 ("continuum", ["--nproc", "2"])])
def test_two_data_parallel_processes_take_the_single_process_step(spec, parallel_flags, tmp_path):
    """`--nproc 2` or the spec's `train { processes 2 }` (torch.distributed with gloo, PyTorch's own
    launcher) splits each global batch in two and averages the gradients: the weights after it
    equal one process on the whole batch, for memories and for continuum levels, whose states are
    per sample. The number of processes is not part of the run's identity."""
    import subprocess
    import sys

    if spec == "continuum":
        spec = str(tmp_path / "continuum.nest")
        (tmp_path / "continuum.nest").write_text(CONTINUUM)
        args = [spec, "--steps", "2", "--set", "train.batch=4"]
    else:
        args = [spec, "--steps", "2", *TINY_RUN, "--set", "train.batch=4"]
    single = _run(*args, "--runs", str(tmp_path / "single"))
    assert single.exit_code == 0, single.output
    parallel = subprocess.run([sys.executable, "-m", "nestc", "run", *args, "--runs", str(tmp_path / "parallel"),
                               *parallel_flags, "--track", "tensorboard"],
                              capture_output=True, text=True, timeout=1800)  # a bound on a hang only
    assert parallel.returncode == 0, parallel.stderr[-2000:]
    assert "2 processes" in parallel.stderr
    (a,), (b,) = list((tmp_path / "single").iterdir()), list((tmp_path / "parallel").iterdir())
    assert a.name == b.name
    one, two = _weights(a), _weights(b)
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6, msg=name)
    losses = [[json.loads(line)["loss"] for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (a, b)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    # only the first process tracks: one event file (each process that logged would write its own)
    assert len(list((b / "tensorboard").glob("events.out.tfevents.*"))) == 1


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_simulated_nodes_resume_from_the_first_nodes_checkpoint(tmp_path):
    """`torchrun --nnodes 2` on localhost, each node with its own (unshared) runs directory and
    only node 0 holding the checkpoint: the first process sends it to the other, and the resumed
    run equals one process trained straight through."""
    import subprocess
    import sys

    args = ["specs/deltanet.nest", *TINY_RUN, "--set", "train.batch=4"]
    assert _run(*args, "--steps", "2", "--runs", str(tmp_path / "node0")).exit_code == 0
    port = _free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank",
                               str(rank), "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port",
                               str(port), "-m", "nestc", "run", *args, "--steps", "4", "--resume", "--runs",
                               str(tmp_path / f"node{rank}")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for rank in (0, 1)]
    outputs = [node.communicate(timeout=1800) for node in nodes]  # a bound on a hang only
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert "resuming" in outputs[0][1] and "at step 2" in outputs[0][1]
    assert not (tmp_path / "node1").exists()  # node 1 needed no files and wrote none
    assert _run(*args, "--steps", "4", "--runs", str(tmp_path / "single")).exit_code == 0
    one, two = _weights(next((tmp_path / "single").iterdir())), _weights(next((tmp_path / "node0").iterdir()))
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6, msg=name)


def test_an_error_on_one_process_is_the_same_clear_error_on_every_process(tmp_path):
    """The first process alone finds that the run directory holds a run; every process reports
    it and exits, none waits in a collective for the one that stopped."""
    import subprocess
    import sys

    args = ["specs/deltanet.nest", *TINY_RUN, "--set", "train.batch=4", "--steps", "2", "--runs", str(tmp_path)]
    assert _run(*args).exit_code == 0
    result = subprocess.run([sys.executable, "-m", "nestc", "run", *args, "--nproc", "2"], capture_output=True,
                            text=True, timeout=1800)  # a bound on a hang only
    assert result.returncode == 1
    assert result.stderr.count("already holds a run of this spec") == 2, result.stderr
    assert "process 0 of 2: `" in result.stderr and "failed (exit code 1)" in result.stderr
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr


def test_a_batch_that_does_not_split_among_the_processes_is_a_usage_error(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "nestc", "run", "specs/deltanet.nest", "--steps", "1", *TINY_RUN,
                             "--set", "train.batch=3", "--nproc", "2", "--runs", str(tmp_path)],
                            capture_output=True, text=True, timeout=1800)  # a bound on a hang only
    assert result.returncode != 0
    assert "must divide evenly among 2 processes" in result.stderr
    assert "Traceback" not in result.stderr


def _tokenizer_file(path) -> int:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["[UNK]"])
    from nestc.runtime.data import default_corpus

    tokenizer.train_from_iterator([default_corpus()[:20000].decode()], trainer)
    tokenizer.save(str(path))
    return tokenizer.get_vocab_size()


def test_a_tokenizer_file_trains_on_token_ids(tmp_path):
    path = tmp_path / "tokenizer.json"
    vocab = _tokenizer_file(path)
    result = _run("specs/deltanet.nest", "--tokenizer", str(path), "--steps", "2", "--runs", str(tmp_path / "runs"),
                  *TINY_RUN, "--set", f"model.vocab={vocab}", "--seed", "3")
    assert result.exit_code == 0, result.output
    assert "bits/token" in result.output
    too_small = _run("specs/deltanet.nest", "--tokenizer", str(path), "--steps", "2", "--runs",
                     str(tmp_path / "runs"), *TINY_RUN, "--set", "model.vocab=16")
    assert too_small.exit_code == 2 and f"--set model.vocab={vocab}" in too_small.output
    not_a_file = _run("specs/deltanet.nest", "--tokenizer", "README.md", "--runs", str(tmp_path / "runs"), *TINY_RUN)
    assert not_a_file.exit_code == 2 and "not a tokenizer file" in not_a_file.output


CONTINUUM = """
level fast : mlp(expand=2) {
    objective task
    lr = 0.01
    every 4
}
model {
    vocab 256
    dim 16
    heads 2
    block = residual(rmsnorm |> fast)
}
train {
    context 32
    batch 2
}
"""


def test_memory_states_of_continuum_levels_survive_a_save_and_reload(tmp_path):
    spec = tmp_path / "continuum.nest"
    spec.write_text(CONTINUUM)
    assert _run(str(spec), "--steps", "1", "--runs", str(tmp_path / "runs")).exit_code == 0
    (run,) = list((tmp_path / "runs").iterdir())
    document = tmp_path / "document.txt"
    document.write_bytes(b"abcdefgh" * 8)  # 64 bytes: the reload lands on a chunk boundary
    state = tmp_path / "state.safetensors"
    assert CliRunner().invoke(cli, ["memorize", str(run), str(document), "--state-out", str(state)]).exit_code == 0
    result = CliRunner().invoke(cli, ["eval", str(run), str(document), "--state-in", str(state)])
    assert result.exit_code == 0, result.output


def _first_loss(runs) -> float:
    (directory,) = list(runs.iterdir())
    return json.loads((directory / "metrics.jsonl").read_text().splitlines()[0])["loss"]


@pytest.mark.parametrize("backend", ["reference", "compiled"])
def test_bf16_autocasts_the_training_steps_on_a_cpu_too(backend, tmp_path):
    """Not ignored off a GPU: the matrix products run in bfloat16, so the first loss moves off
    float32's (by about 1e-4 here), and stays finite."""
    losses = {}
    for flag in ([], ["--bf16"]):
        runs = tmp_path / (flag[0][2:] if flag else "float32")
        result = _run("specs/deltanet.nest", "--steps", "1", "--backend", backend, "--runs", str(runs), *TINY_RUN, *flag)
        assert result.exit_code == 0, result.output
        assert ("bfloat16 autocast" in result.output) == bool(flag)
        losses[bool(flag)] = _first_loss(runs)
    assert math.isfinite(losses[True]) and 1e-7 < abs(losses[True] - losses[False]) < 1e-2, losses


def test_bf16_trains_the_compiled_forms_that_solve_triangular_systems(tmp_path):
    """Hope's self-modifying memories take the UT transform's triangular solve, which torch has
    no bfloat16 kernel for; under --bf16 it once ended in an internal error (exit 3)."""
    result = _run("specs/hope.nest", "--steps", "1", "--backend", "compiled", "--bf16", "--runs", str(tmp_path),
                  "--set", "model.dim=16", "--set", "model.layers=1", "--nproc", "1")
    assert result.exit_code == 0, result.output
    assert math.isfinite(_first_loss(tmp_path))


def test_a_diverging_run_stops_with_a_clear_message(tmp_path):
    result = _run("specs/deltanet.nest", "--steps", "3", "--runs", str(tmp_path), *TINY_RUN,
                  "--set", "train.optimizer=sgd(lr=1e30)", "--set", "train.clip=0")
    assert result.exit_code == 1
    assert "training diverged" in result.output and "Traceback" not in result.output


def test_task_options_set_the_recall_problem_and_bad_ones_are_usage_errors(tmp_path):
    ok = _run("specs/deltanet.nest", "--task", "mqar", "--task-option", "pairs=4", "--task-option", "keys=16",
              "--steps", "1", "--runs", str(tmp_path), *TINY_RUN)
    assert ok.exit_code == 0, ok.output
    unknown = _run("specs/deltanet.nest", "--task", "mqar", "--task-option", "pears=4", "--runs", str(tmp_path), *TINY_RUN)
    assert unknown.exit_code == 2 and "no option pears" in unknown.output
    orphan = _run("specs/deltanet.nest", "--task-option", "pairs=4", "--runs", str(tmp_path), *TINY_RUN)
    assert orphan.exit_code == 2 and "after a --task" in orphan.output


def test_a_spec_that_does_not_parse_reports_its_syntax_error_even_with_set(tmp_path):
    spec = tmp_path / "broken.nest"
    spec.write_text("model {\n    dim 3 4\n}\n")
    result = _run(str(spec), "--set", "train.steps=3", "--runs", str(tmp_path))
    assert result.exit_code == 1 and "error[N0001]" in result.output and "Traceback" not in result.output


def test_a_state_file_round_trips_every_kind_of_slot_and_reads_the_older_layout(tmp_path):
    """Weights, an omega window, a cache, a convolution history and the last logits come back
    bit for bit; files written before the state's slots were shared (which listed every field,
    empty ones as 0 or []) still load."""
    from types import SimpleNamespace

    from safetensors.torch import save_file

    from nestc.backends.state import LevelState, ModelState, slots
    from nestc.runtime.checkpoint import load_state, save_state

    t = torch.arange(6.0).reshape(1, 2, 3)
    memory = LevelState(weights=[t, t + 1], momentum=[t + 2], window=[(t, t + 3, t + 4)], buffers={"conv": t + 5})
    cache = LevelState(keys=t + 6, values=t + 7, pending=t.sum())  # a pending loss is not saved
    state = ModelState(position=7, levels=[{"mem": memory, "attn": cache}], last_logits=t[0])
    model = SimpleNamespace(layers=[SimpleNamespace(levels={"mem": None, "attn": None})])
    path = str(tmp_path / "state.safetensors")
    save_state(state, path)
    loaded = load_state(path, model)
    assert loaded.position == 7 and torch.equal(loaded.last_logits, t[0])
    def contents(level_state):
        return [(field, key, tensor.tolist()) for field, key, tensor in slots(level_state)]

    assert contents(loaded.levels[0]["mem"]) == contents(memory)
    assert contents(loaded.levels[0]["attn"]) == contents(LevelState(keys=t + 6, values=t + 7))
    older = {"position": 3, "segments": [], "levels": [{
        "mem": {"weights": 1, "anchor": 0, "momentum": 0, "window": 0, "buffers": []},
        "attn": {"weights": 0, "anchor": 0, "momentum": 0, "window": 0, "keys": "tensor", "buffers": []}}]}
    save_file({"levels.0.mem.weights.0": t, "levels.0.attn.keys": t + 1}, path,
              metadata={"nestc_state": json.dumps(older)})
    loaded = load_state(path, model)
    assert torch.equal(loaded.levels[0]["mem"].weights[0], t) and loaded.levels[0]["mem"].anchor == []
    assert torch.equal(loaded.levels[0]["attn"].keys, t + 1) and loaded.levels[0]["attn"].weights == []


@pytest.mark.parametrize("args, code, message", [
    (["--set", "model.vocab=128"], 2, "the corpus has byte values up to 226, but model.vocab is 128: --set model.vocab=256"),
    (["--set", "train.context=1"], 1, "error[N0106]"),
    (["--seed", str(2**70)], 1, "error[N0106]"),
    (["--set", "train.context=50000", "--set", "train.batch=1"], 2,
     "train.context is 50000 bytes, but the corpus's shorter split"),
    (["--set", "train.context=10000000"], 1, "lower train.context (10000000) to at most"),  # memory, before the corpus
    (["--set", "train.context=100000000"], 1, "error[N0106]"),  # past the limit of 2^24
    (["--task", "mqar", "--task-option", "pairs=0"], 2, "pairs must be at least 1"),
    (["--task", "mqar", "--task-option", "keys=2"], 2, "8 pairs need at least as many distinct keys, but keys=2"),
    (["--task", "niah", "--set", "train.context=64"], 2, "task `niah` needs train.context of at least 81 tokens"),
])
def test_bad_values_say_what_is_wrong_before_training(args, code, message, tmp_path):
    """Each once ended in an internal error or in "training diverged; lower the learning rate"."""
    result = _run("specs/deltanet.nest", "--steps", "1", "--runs", str(tmp_path), *args)
    assert result.exit_code == code and message in result.output, result.output
    assert "Traceback" not in result.output and "diverged" not in result.output
    assert not list(tmp_path.glob("*/metrics.jsonl"))  # nothing was trained


# --- threads -------------------------------------------------------------------------------------


@pytest.fixture
def threads_given_back():
    """Every test below changes torch's thread count on purpose; the next test gets it back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _threads_seen_while_training(monkeypatch):
    seen = []
    train_step = nestc.runtime.train._Session._train_step

    def recording(self, step):
        seen.append(torch.get_num_threads())
        return train_step(self, step)

    monkeypatch.setattr(nestc.runtime.train._Session, "_train_step", recording)
    return seen


def test_threads_set_torch_threads_while_the_run_trains_and_give_them_back(tmp_path, monkeypatch, threads_given_back):
    seen = _threads_seen_while_training(monkeypatch)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cases = [(["--threads", "1"], None, 1), (["--threads", "3"], None, 3), ([], None, 1), ([], "3", 3), ([], "2,1", 1)]
    for flags, environment, expected in cases:
        if environment is not None:
            monkeypatch.setenv("OMP_NUM_THREADS", environment)
        torch.set_num_threads(2)
        seen.clear()
        result = _run("specs/deltanet.nest", "--steps", "2", "--runs", str(tmp_path), "--overwrite", *TINY_RUN, *flags)
        assert result.exit_code == 0, result.output
        assert seen == [expected, expected], (flags, environment)
        assert torch.get_num_threads() == 2  # the caller's count, given back


def test_threads_reach_every_data_parallel_process(tmp_path, monkeypatch):
    launched = []
    monkeypatch.setattr("nestc.runtime.distributed.launch", lambda processes, arguments: launched.append(arguments) or 0)
    result = _run("specs/deltanet.nest", "--nproc", "2", "--threads", "1", "--runs", str(tmp_path), *TINY_RUN)
    assert result.exit_code == 0, result.output
    (arguments,) = launched
    assert arguments[arguments.index("--threads") + 1] == "1"


def test_reading_and_writing_use_the_threads_given(trained, tmp_path, monkeypatch, threads_given_back):
    seen = []
    read, sample = nestc.runtime.train.read, nestc.runtime.train.sample
    monkeypatch.setattr(nestc.runtime.train, "read", lambda *a, **k: seen.append(torch.get_num_threads()) or read(*a, **k))
    monkeypatch.setattr(nestc.runtime.train, "sample",
                        lambda *a, **k: seen.append(torch.get_num_threads()) or sample(*a, **k))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    text = tmp_path / "text.txt"
    text.write_bytes(b"The quick brown fox jumps over the lazy dog. " * 4)
    torch.set_num_threads(2)
    for args in (["eval", str(trained), str(text), "--threads", "3"], ["memorize", str(trained), str(text)],
                 ["generate", str(trained), "--length", "4", "--threads", "3"]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, (args, result.output)
    assert seen == [3, 1, 3]
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_a_thread_count_below_one_is_a_usage_error(value, tmp_path):
    for args in (["run", "specs/deltanet.nest", "--runs", str(tmp_path)], ["eval", str(tmp_path), "README.md"],
                 ["generate", str(tmp_path)], ["memorize", str(tmp_path), "README.md"]):
        result = CliRunner().invoke(cli, [*args, "--threads", value])
        assert result.exit_code == 2, (args, result.output)
        assert "--threads" in result.output and value in result.output and "Traceback" not in result.output
    assert not any(tmp_path.iterdir())


# --- --set on imported levels --------------------------------------------------------------------


def _checked_with(*assignments):
    from nestc.lang import overrides
    from nestc.lang.sema import analyze_source, read_source

    overridden = overrides.apply(read_source("specs/hope.nest"), list(assignments))
    return overridden, analyze_source(overridden.main, replaced_imports=overridden.imported)


def test_set_changes_a_level_defined_in_an_imported_file():
    from nestc.lang import ir

    overridden, result = _checked_with("level.cms_slow.every=32", "level.mv.every=16", "train.steps=7")
    assert result.ok
    program = result.program
    assert program.level("cms_slow").every.tokens == 32  # lib/cms.nest says 64
    assert program.level("mv").every.tokens == 16  # `level mv extends mk` had no body: it gets one
    assert program.level("mk").every.tokens == 64 and program.level("cms_mid").every.tokens == 32
    assert program.train.steps == 7
    assert sorted(overridden.imported) == ["specs/lib/cms.nest", "specs/lib/hope.nest"]
    cms_slow = ir.dump(program).split("level cms_slow\n")[1].split("\n  level")[0].split("\n  model")[0]
    assert re.search(r"^    every +32 tokens$", cms_slow, re.MULTILINE), cms_slow
    with open("specs/lib/cms.nest", encoding="utf-8") as handle:
        assert "every 64" in handle.read()  # the file itself is not touched


def test_a_run_with_set_on_an_imported_level_saves_the_changed_level(tmp_path):
    result = _run("specs/cms.nest", "--steps", "1", "--runs", str(tmp_path), *TINY_RUN, "--set", "level.cms_slow.every=8")
    assert result.exit_code == 0, result.output
    (directory,) = list(tmp_path.iterdir())
    saved = (directory / "spec.nest").read_text()
    assert "level cms_slow extends cms_fast {\n    every 8\n}" in saved


def test_set_on_an_unknown_level_suggests_an_imported_one(tmp_path):
    result = _run("specs/hope.nest", "--set", "level.cms_slw.every=64", "--runs", str(tmp_path))
    assert result.exit_code == 2, result.output
    assert "neither `specs/hope.nest` nor a file it imports defines a level `cms_slw`" in result.output
    assert "did you mean `cms_slow`" in result.output
    unknown_field = _run("specs/hope.nest", "--set", "level.cms_slow.evry=64", "--runs", str(tmp_path))
    assert unknown_field.exit_code == 2 and "did you mean `every`" in unknown_field.output
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("value,code,label", [("100", "N0110", "every 100 tokens"), ("-1", "N0106", "got -1"),
                                              ("nothing", "N0101", "not defined")])
def test_a_bad_value_for_an_imported_level_is_a_diagnostic_at_its_set(value, code, label, tmp_path):
    """The error stands on the `--set` ("--set level.cms_slow.every=" is 27 characters: the value
    at 28), with a note on the field of the imported file it replaced."""
    result = _run("specs/hope.nest", "--set", f"level.cms_slow.every={value}", "--runs", str(tmp_path))
    assert result.exit_code == 1, result.output
    assert f"error[{code}]" in result.output and label in result.output
    assert "--> --set:1:28" in result.output and f"1 | --set level.cms_slow.every={value}" in result.output
    line = _line_of("specs/lib/cms.nest", "every 64")
    assert f"--set replaces `64` in specs/lib/cms.nest:{line}:11" in result.output
    assert "Traceback" not in result.output and not any(tmp_path.iterdir())


def _line_of(path: str, text: str) -> int:
    with open(path, encoding="utf-8") as handle:
        return next(number for number, line in enumerate(handle, 1) if text in line)


def test_a_run_trained_with_a_tokenizer_generates_and_evaluates_with_it(tmp_path):
    """The run keeps its tokenizer: `generate` writes text (not an error on token ids above 255),
    and `eval` and `memorize` read the file as its token ids, in bits per token, and give what the
    training's own read of the same ids gives."""
    from nestc.runtime import rundir
    from nestc.runtime.train import read

    path = tmp_path / "tokenizer.json"
    vocab = _tokenizer_file(path)
    runs = tmp_path / "runs"
    trained = _run("specs/deltanet.nest", "--tokenizer", str(path), "--steps", "2", "--runs", str(runs), *TINY_RUN,
                   "--set", f"model.vocab={vocab}", "--seed", "3")
    assert trained.exit_code == 0, trained.output
    (run,) = [str(p) for p in runs.iterdir()]
    assert (runs / os.path.basename(run) / rundir.TOKENIZER_FILE).is_file()
    written = CliRunner().invoke(cli, ["generate", run, "--prompt", "The Python tutorial", "--length", "8"])
    assert written.exit_code == 0, written.output
    assert written.output.strip()  # text, decoded by the run's tokenizer
    text = tmp_path / "text.txt"
    text.write_text("The Python tutorial explains the language. " * 4)
    evaluated = CliRunner().invoke(cli, ["eval", run, str(text)])
    assert evaluated.exit_code == 0, evaluated.output
    bits = float(re.search(r": ([0-9.]+) bits/token", evaluated.output).group(1))
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(path)).encode(text.read_text()).ids
    expected, _ = read(rundir.load_run(run), ids)
    assert abs(bits - expected) < 5e-4  # the CLI prints three decimals
    memorized = CliRunner().invoke(cli, ["memorize", run, str(text)])
    assert memorized.exit_code == 0 and "bits/token while reading" in memorized.output, memorized.output


def test_the_curves_name_their_axes_in_the_run_s_unit_with_whole_steps(tmp_path, monkeypatch):
    """curves.png: a y-axis label in the run's unit (bits per token for a tokenizer's run) and
    integer step ticks; drawn through matplotlib, whose axes are read back before saving."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.figure

    from nestc.runtime import plots

    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": step, "loss": 2.0 / step}) + "\n"
                                                    for step in (1, 2, 3)))
    seen = {}

    def keep(figure, *args, **kwargs):
        axis = figure.axes[0]
        seen["ylabel"], seen["legend"] = axis.get_ylabel(), [t.get_text() for t in axis.get_legend().get_texts()]
        seen["ticks"] = [tick for tick in axis.get_xticks() if 1 <= tick <= 3]
        return original(figure, *args, **kwargs)

    original = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    assert plots.training_curves(str(tmp_path), baseline=4.0, unit="token")
    assert seen["ylabel"] == "bits per token"
    assert seen["legend"][0] == "train (bits/token)"
    assert seen["ticks"] and all(float(tick).is_integer() for tick in seen["ticks"])

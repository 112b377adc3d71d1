"""`nestc compile RUN_DIR -o DIR`: a trained run as a standalone module that needs only torch,
equal to the run's model for any batch size and any length, the state carried across calls; and
the clear errors of a path that is not a usable run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from click.testing import CliRunner

import nestc
from nestc.backends import compiled
from nestc.cli import cli
from nestc.runtime.rundir import latest, load_run
from nesttest import TINY_RUN

TINY = [*TINY_RUN, "--steps", "2"]

# Run in a process where nestc cannot be imported (not on the path, and its name blocked against
# an installed copy): load the exported module, read each case's tokens in its calls, the state
# carried from one to the next, and in one call of them all.
STANDALONE_SCRIPT = """
import sys
sys.modules["nestc"] = None
try:
    import nestc
except ImportError:
    pass
else:
    raise SystemExit("nestc is importable")
exported, cases_path, logits_path = sys.argv[1:]
sys.path.insert(0, exported)
import torch
from model import Model

model = Model()
results = []
with torch.no_grad():
    for tokens, calls in torch.load(cases_path):
        pieces, state, start = [], None, 0
        for length in calls:
            logits, state = model(tokens[:, start:start + length], state)
            pieces.append(logits)
            start += length
        results.append((torch.cat(pieces, dim=1), model(tokens)[0]))
torch.save(results, logits_path)
"""


@pytest.fixture(scope="module")
def titans_run(tmp_path_factory, request):
    runs = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(request.config.rootpath)
        # Titans' memory learns from the gradient at its chunk's start (every 16 tokens): cut
    # anywhere but at the multiples of its segment, a call would read other states.
    result = CliRunner().invoke(cli, ["run", "specs/titans.nest", "--runs", str(runs), *TINY])
    assert result.exit_code == 0, result.output
    (directory,) = list(runs.iterdir())
    return directory


def _cases(segment: int, vocab: int) -> list[tuple[torch.Tensor, list[int]]]:
    """Token batches of 1 and 3 sequences, read in calls whose lengths are whole segments, and
    not: a call ending inside a segment leaves the next call to finish it."""
    generator = torch.Generator().manual_seed(7)
    calls = [(1, [segment, 2 * segment]), (3, [segment + 5, 3, segment - 1]), (1, [1, 2 * segment + 3]),
             (3, [2, 1])]
    return [(torch.randint(0, vocab, (batch, sum(lengths)), generator=generator), lengths)
            for batch, lengths in calls]


def _run_model_logits(model, cases) -> list[torch.Tensor]:
    """The run's model (nestc's compiled backend) on each case, call by call."""
    expected = []
    with torch.no_grad():
        for tokens, calls in cases:
            pieces, state, start = [], None, 0
            for length in calls:
                logits, state = model(tokens[:, start:start + length], state)
                pieces.append(logits)
                start += length
            expected.append(torch.cat(pieces, dim=1))
    return expected


@pytest.fixture(scope="module")
def exported(titans_run, tmp_path_factory):
    directory = tmp_path_factory.mktemp("exported")
    result = CliRunner().invoke(cli, ["compile", str(titans_run), "-o", str(directory)])
    assert result.exit_code == 0, result.output
    return directory


def test_a_trained_run_runs_standalone_at_any_batch_and_length(titans_run, exported, tmp_path):
    model = load_run(str(titans_run))
    cases = _cases(model.segment, model.vocab)
    torch.save(cases, tmp_path / "cases.pt")
    isolated = tmp_path / "elsewhere"
    isolated.mkdir()
    done = subprocess.run([sys.executable, "-I", "-c", STANDALONE_SCRIPT, str(exported), str(tmp_path / "cases.pt"),
                           str(tmp_path / "logits.pt")], cwd=isolated, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    actual = torch.load(tmp_path / "logits.pt")
    for (tokens, calls), expected, (in_calls, in_one_call) in zip(cases, _run_model_logits(model, cases), actual,
                                                                  strict=True):
        assert in_calls.shape == (tokens.shape[0], sum(calls), model.vocab)
        torch.testing.assert_close(in_calls, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(in_one_call, expected, rtol=1e-5, atol=1e-6)
    source = (exported / "model.py").read_text()
    assert f"the weights `nestc run` trained, {os.path.join('checkpoints', 'step-00000002')}" in source
    assert "BATCH" not in source  # no batch size is baked in


def test_the_exported_weights_are_the_trained_ones_not_a_seeded_draw(titans_run, exported):
    saved = torch.load(exported / "weights.pt", weights_only=True)["parameters"]
    trained = dict(load_run(str(titans_run)).named_parameters())
    assert saved.keys() == trained.keys()
    for name, tensor in saved.items():
        assert torch.equal(tensor, trained[name].detach()), name
    torch.manual_seed(0)  # what `nestc compile SPEC -o` draws by default
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", compiled.CompileWarning)
        drawn = dict(compiled.build(nestc.check(str(titans_run / "spec.nest"))).named_parameters())
    assert any(not torch.equal(drawn[name].detach(), saved[name]) for name in saved)  # training moved them


def _forge_manifest(checkpoint) -> None:
    """Make a checkpoint's manifest match its (replaced) files, as a damaged copy would not."""
    import hashlib

    manifest_path = checkpoint / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for name in manifest["files"]:
        data = (checkpoint / name).read_bytes()
        manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest_path.write_text(json.dumps(manifest))


def test_paths_that_are_not_usable_runs_are_clear_errors(titans_run, tmp_path):
    not_a_run = tmp_path / "empty"
    not_a_run.mkdir()
    untrained = tmp_path / "untrained"
    untrained.mkdir()
    shutil.copy(titans_run / "spec.nest", untrained / "spec.nest")
    damaged = tmp_path / "damaged"
    shutil.copytree(titans_run, damaged)
    model_file = latest(str(damaged)).model_file
    with open(model_file, "r+b") as handle:
        handle.seek(100)
        handle.write(b"\0" * 16)
    forged = tmp_path / "forged"
    shutil.copytree(titans_run, forged)
    checkpoint = latest(str(forged))
    with open(checkpoint.model_file, "wb") as handle:
        handle.write(b"not a safetensors file")
    _forge_manifest(type(tmp_path)(checkpoint.directory))
    out = str(tmp_path / "out")
    cases = [
        ([str(tmp_path / "absent"), "-o", out], "cannot read"),
        ([str(not_a_run), "-o", out], "not a run directory: `spec.nest` is missing"),
        ([str(untrained), "-o", out], "has no checkpoint yet: train it with `nestc run`"),
        ([str(damaged), "-o", out], "has no complete checkpoint (step 2: `model.safetensors` does not match"),
        ([str(forged), "-o", out], "is not a readable safetensors file"),
        (["-o", out, "--run", str(titans_run)], f"the run directory is the argument: `nestc compile {titans_run}"),
        ([str(titans_run)], "export its trained model with -o DIR"),
        ([str(titans_run), "--emit", "ir"], "is a run directory: --emit ir reads a spec"),
        ([str(titans_run), "-o", out, "--print-after", "plan"], "is a run directory: --print-after plan reads a spec"),
        ([str(titans_run), "-o", out, "--seed", "3"], "--seed shapes a spec's model"),
        ([str(titans_run), "-o", out, "--batch", "3"], "the standalone module (-o, --emit py) runs any batch size"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(cli, ["compile", *args])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output and "Traceback" not in result.output, (args, result.output)
    assert not (tmp_path / "out").exists()


def test_a_spec_the_module_cannot_hold_is_refused_with_the_reason(tmp_path, request, monkeypatch):
    monkeypatch.chdir(request.config.rootpath)
    result = CliRunner().invoke(cli, ["compile", "specs/transformer.nest", "-o", str(tmp_path / "out")])
    assert result.exit_code == 1, result.output
    assert "the segment step cannot be traced as one graph: the attention cache of" in result.output

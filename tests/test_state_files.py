"""Memory states on disk (nestc/runtime/checkpoint.py save_state/load_state) in the middle of a
continuum level's chunk: reading a stream in pieces, with the state saved and loaded between
them, is reading it straight through (backends/state.py `Replay`)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import nestc
from nestc.backends.state import slots
from nestc.cli import cli
from nestc.runtime.checkpoint import CheckpointError, load_state, save_state
from nesttest import REPO

# Two continuum levels with periods 2 and 3 (a common cycle of 6 tokens) around an online memory,
# whose state the chunk-end gradients also run back through.
SPEC = """
level fast : mlp(expand=2) {
    objective task
    lr = 0.5
    every 2
}
level slow extends fast {
    every 3
}
level mixer : matrix {
    key = x |> proj |> conv(2) |> l2norm
    value = x |> proj
    query = x |> proj |> l2norm
    lr = x |> proj |> sigmoid
    objective l2
    optimizer gd
    every 1
    read after
}
model {
    vocab 64
    dim 16
    heads 2
    layers 2
    block = residual(rmsnorm |> fast) |> residual(rmsnorm |> mixer) |> residual(rmsnorm |> slow)
}
train {
    context 12
    batch 2
}
"""

# One continuum level with chunks of 4 tokens: the compiled backend reads it 4 tokens at a time.
CHUNKED = """
level fast : mlp(expand=2) {
    objective task
    lr = 0.5
    every 4
}
model {
    vocab 256
    dim 16
    heads 2
    layers 2
    block = residual(rmsnorm |> fast)
}
train {
    context 32
    batch 2
}
"""


def _model(spec: str, backend: str):
    torch.manual_seed(0)
    return nestc.load(spec, backend=backend).double()


def _read(model, pieces, save_between=None):
    """The logits of reading `pieces` as one stream, and the final state; with `save_between`
    (a directory), the state goes through a file between each two pieces."""
    state, logits = None, []
    with torch.no_grad():
        for index, piece in enumerate(pieces):
            if index and save_between is not None:
                path = str(save_between / f"state{index}.safetensors")
                save_state(state, path)
                state = load_state(path, model)
            out, state = model(piece, state)
            logits.append(out)
    return torch.cat(logits, dim=1), state


def _tensors(state):
    return [t for states in state.levels for s in states.values() for _, _, t in slots(s)]


@pytest.mark.parametrize("backend", nestc.api.BACKENDS)
@pytest.mark.parametrize("spec, cuts", [(SPEC, (1, 7, 11, 12)), (CHUNKED, (3, 10, 16))], ids=["cycle6", "chunk4"])
def test_a_state_saved_mid_chunk_continues_the_stream_exactly(spec, cuts, backend, tmp_path):
    """Cuts inside chunks of every level, before the first cycle ends, on a boundary of both
    levels (12): the same logits and final state as reading in the same pieces without a file,
    bit for bit, and as reading straight through (bit for bit on the reference backend; the
    compiled one reads a piece's end as a shorter segment, which rounds differently)."""
    model = _model(spec, backend)
    text = torch.randint(0, model.vocab, (2, 20), generator=torch.Generator().manual_seed(1))
    bounds = (0, *cuts, text.shape[1])
    pieces = [text[:, start:end] for start, end in zip(bounds, bounds[1:])]
    saved_logits, saved = _read(model, pieces, save_between=tmp_path)
    kept_logits, kept = _read(model, pieces)
    whole_logits, whole = _read(model, [text])
    assert saved.position == whole.position == text.shape[1]
    assert torch.equal(saved_logits, kept_logits)
    assert all(torch.equal(a, b) for a, b in zip(_tensors(saved), _tensors(kept), strict=True))
    if backend == "reference":
        assert torch.equal(saved_logits, whole_logits)
        assert all(torch.equal(a, b) for a, b in zip(_tensors(saved), _tensors(whole), strict=True))
    else:
        torch.testing.assert_close(saved_logits, whole_logits, rtol=0, atol=1e-12)
    # A state cut from its graph, which is what a file without the replay held, loses the
    # chunk's gradient: the checks above can fail.
    lossy = _read(model, [text[:, :cuts[0]]])[1].detach()
    with torch.no_grad():
        torch.manual_seed(0)
        assert not torch.allclose(model(text[:, cuts[0]:], lossy)[0], whole_logits[:, cuts[0]:], atol=1e-6)


@pytest.mark.parametrize("backend", nestc.api.BACKENDS)
def test_an_exact_solve_state_goes_through_a_file_whole(backend, tmp_path):
    """specs/mesanet.nest's state holds G as its weight and H as its `gram`: reading in pieces with
    the state saved and loaded between them is reading them without a file, bit for bit, and the
    file holds H (a state without it could not continue: the solve reads H)."""
    model = _model(str(REPO / "specs" / "mesanet.nest"), backend)
    text = torch.randint(0, model.vocab, (2, 20), generator=torch.Generator().manual_seed(1))
    pieces = [text[:, :7], text[:, 7:20]]
    saved_logits, saved = _read(model, pieces, save_between=tmp_path)
    kept_logits, kept = _read(model, pieces)
    assert torch.equal(saved_logits, kept_logits)
    assert all(torch.equal(a, b) for a, b in zip(_tensors(saved), _tensors(kept), strict=True))
    loaded = load_state(str(tmp_path / "state1.safetensors"), model)
    grams = [states["mixer"].gram for states in loaded.levels]
    assert all(g is not None and g.shape == (2, 4, 32, 32) and g.abs().sum() > 0 for g in grams)


def test_a_state_read_with_gradients_on_is_refused_naming_the_level(tmp_path):
    """Training-mode states carry the outer step's graph, which no replay rebuilds."""
    model = _model(CHUNKED, "reference")
    _, state = model(torch.zeros(1, 6, dtype=torch.long))
    with pytest.raises(CheckpointError, match=r"position 6 holds the unfinished chunk of continuum level `fast`"
                                              r".*torch.no_grad\(\)"):
        save_state(state, str(tmp_path / "state.safetensors"))


def test_a_corrupt_replay_is_a_clear_error(tmp_path):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    model = _model(CHUNKED, "reference")
    path = str(tmp_path / "state.safetensors")
    with torch.no_grad():
        _, state = model(torch.zeros(1, 6, dtype=torch.long))
    save_state(state, path)
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(path)
    tensors["replay.0"] = torch.full((1, 6), 300)  # past the vocab of 256
    save_file(tensors, path, metadata=metadata)
    with pytest.raises(CheckpointError, match=r"a replayed call is not \[batch 1, time\] token ids below the vocab"):
        load_state(path, model)
    layout = json.loads(metadata["nestc_state"])
    layout["replay"]["calls"] = 2
    save_file(load_file(path), path, metadata={"nestc_state": json.dumps(layout)})
    with pytest.raises(CheckpointError, match=r"is corrupt: a malformed replay \(KeyError: 'replay.1'\)"):
        load_state(path, model)


def test_a_state_memorized_mid_chunk_reads_on_as_one_stream(tmp_path, monkeypatch, request):
    """A state that `nestc memorize` saved after 114 bytes (mid-chunk), loaded, scores the rest
    exactly as reading both in one stream does."""
    from nestc.runtime.rundir import load_run
    from nestc.runtime.train import read

    monkeypatch.chdir(request.config.rootpath)
    spec = tmp_path / "chunked.nest"
    spec.write_text(CHUNKED)
    assert CliRunner().invoke(cli, ["run", str(spec), "--steps", "1", "--runs", str(tmp_path / "runs")]).exit_code == 0
    (run,) = list((tmp_path / "runs").iterdir())
    first, second = b"The quick brown fox jumps over the lazy dog. " * 2 + b"abcdefghijklmnopqrstuvwx", b"Pack my box. " * 4
    (tmp_path / "first.txt").write_bytes(first)
    state = tmp_path / "state.safetensors"
    result = CliRunner().invoke(cli, ["memorize", str(run), str(tmp_path / "first.txt"), "--state-out", str(state)])
    assert result.exit_code == 0 and "position 114" in result.output, result.output
    model = load_run(str(run))
    _, carried = read(model, first)
    expected, _ = read(model, second, carried)
    reloaded, _ = read(model, second, load_state(str(state), model))
    assert reloaded == expected

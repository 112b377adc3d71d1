"""`sample` and `nestc generate`: temperature, top-k, top-p and seed, and that the prompt steers
what a trained model writes."""

from __future__ import annotations

import random

import pytest
import torch
from click.testing import CliRunner

import nestc
from nestc.cli import cli
from nestc.runtime.train import sample, truncate

SPEC = """
level mixer : matrix {
    key = x |> proj |> l2norm
    value = x |> proj
    query = x |> proj |> l2norm
    objective l2
    optimizer gd
    lr = 0.5
    every 1
    read after
}
model {
    vocab 256
    dim 16
    heads 2
    block = residual(rmsnorm |> mixer)
}
"""


@pytest.fixture(scope="module")
def untrained():
    """A model at its initial weights: next-symbol distributions close to uniform, so draws spread."""
    torch.manual_seed(0)
    return nestc.load(SPEC, backend="compiled")


# ids 0..3 with probabilities 1/8, 1/2, 1/8, 1/4 (exact in binary: no rounding at the boundaries);
# ranked: 1 (1/2), 3 (1/4), then 0 and 2 (1/8 each; the lower id first)
DISTRIBUTION = [0.125, 0.5, 0.125, 0.25]


@pytest.mark.parametrize("top_k,top_p,kept", [
    (None, 0.5, [0, 1, 0, 0]),  # 1/2 reaches 1/2 on its own
    (None, 0.6, [0, 2 / 3, 0, 1 / 3]),  # 1/2 is short of 0.6; 1/2 + 1/4 reaches it
    (None, 0.75, [0, 2 / 3, 0, 1 / 3]),  # exactly 3/4: the smallest set whose mass reaches p
    (None, 0.76, [1 / 7, 4 / 7, 0, 2 / 7]),  # one 1/8 more: the tie goes to the lower id
    (None, 1.0, DISTRIBUTION),
    (1, None, [0, 1, 0, 0]),
    (3, None, [1 / 7, 4 / 7, 0, 2 / 7]),
    (3, 0.8, [0, 2 / 3, 0, 1 / 3]),  # p of the top-3 mass (7/8): 0.7; 1/2 + 1/4 reaches it
    (3, 0.9, [1 / 7, 4 / 7, 0, 2 / 7]),  # 0.7875 of 7/8: 1/2 + 1/4 is short of it
])
def test_truncation_keeps_the_most_likely_symbols_and_renormalises(top_k, top_p, kept):
    result = truncate(torch.tensor(DISTRIBUTION, dtype=torch.float64), top_k, top_p)
    assert torch.allclose(result, torch.tensor(kept, dtype=torch.float64), rtol=0, atol=1e-15)


def test_top_k_one_is_greedy_decoding(untrained):
    prompt = list(b"greedy ")
    written, _ = sample(untrained, prompt, 12, temperature=3.0, seed=5, top_k=1)
    expected = []
    with torch.no_grad():
        logits, state = untrained(torch.tensor([prompt]))
        for _ in range(12):
            expected.append(int(logits[0, -1].argmax()))
            logits, state = untrained(torch.tensor([[expected[-1]]]), state)
    assert list(written) == expected


def test_the_seed_fixes_the_draws(untrained):
    def draw(seed, **options):
        return sample(untrained, list(b"seed "), 24, temperature=1.0, seed=seed, **options)[0]

    assert draw(1) == draw(1)
    assert draw(1) != draw(2)
    assert draw(1, top_p=0.9) == draw(1, top_p=0.9) != draw(2, top_p=0.9)


@pytest.mark.parametrize("options,message", [
    ({"top_k": 0}, "k must be at least 1"),
    ({"top_p": 0.0}, "0 < p <= 1"),
    ({"top_p": 1.5}, "0 < p <= 1"),
    ({"temperature": 0.0}, "the temperature must be above 0"),
])
def test_bad_sampling_settings_are_refused(untrained, options, message):
    with pytest.raises(ValueError, match=message):
        sample(untrained, list(b"x"), 3, **options)


def _copy_corpus(path) -> None:
    """Lines `word|word` of six distinct random letters: after the bar, only copying predicts."""
    rng = random.Random(0)
    words = ("".join(rng.sample("abcdefghijklmnopqrstuvwxyz", 6)) for _ in range(3000))
    path.write_text("".join(f"{word}|{word}\n" for word in words))


def test_the_prompt_steers_a_model_trained_to_copy(tmp_path, monkeypatch, request):
    """A one-layer Transformer trained (seeded, 200 steps) on `word|word` lines writes, greedily,
    the word of its own prompt after the bar: different prompts, different continuations, each
    its prompt's word. Then the CLI's sampling flags reach `sample`, and bad ones are usage errors."""
    monkeypatch.chdir(request.config.rootpath)
    corpus = tmp_path / "copy.txt"
    _copy_corpus(corpus)
    runs = tmp_path / "runs"
    trained = CliRunner().invoke(cli, [
        "run", "specs/transformer.nest", "--data", str(corpus), "--steps", "200", "--runs", str(runs),
        "--set", "model.dim=32", "--set", "model.heads=2", "--set", "model.layers=1", "--set", "train.batch=8",
        "--set", "train.context=32", "--set", "train.optimizer=adamw(lr=1e-2)", "--set", "train.schedule=constant"])
    assert trained.exit_code == 0, trained.output
    (run,) = [str(p) for p in runs.iterdir()]
    written = {}
    for word in ("qwerty", "zxcvbn", "plokmi"):
        result = CliRunner().invoke(cli, ["generate", run, "--prompt", f"{word}|", "--length", "6", "--top-k", "1"])
        assert result.exit_code == 0, result.output
        written[word] = result.output.rstrip("\n")
    assert written == {word: word for word in written}
    for flags, message in ((["--top-k", "0"], "--top-k"), (["--top-p", "0"], "--top-p"),
                           (["--top-p", "1.5"], "--top-p")):
        refused = CliRunner().invoke(cli, ["generate", run, *flags])
        assert refused.exit_code == 2 and message in refused.output and "Traceback" not in refused.output
    seen = []
    monkeypatch.setattr("nestc.runtime.train.sample", lambda *a, **k: seen.append(k) or sample(*a, **k))
    nucleus = CliRunner().invoke(cli, ["generate", run, "--length", "4", "--top-k", "5", "--top-p", "0.9"])
    assert nucleus.exit_code == 0, nucleus.output
    assert seen == [{"top_k": 5, "top_p": 0.9}]

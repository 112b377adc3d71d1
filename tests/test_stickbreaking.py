"""Stick-breaking attention (`cache(weights=stickbreaking)`): a query gives entry j the share
sigmoid(z_j) of what the newer entries left of a unit stick. Checked against fla's
naive_stickbreaking_attn with the query's own entry (`read after`: attend_current=True;
tests/test_zoo_oracles.py has the zoo spec's `read before`), against a hand-written float64 loop
with a window, and compiled == reference on whole models in float64, streamed in two calls."""

from __future__ import annotations

import pytest
import torch

import nestc
import oracles
from nestc.backends import reference
from nestc.backends.reference import CacheLevel
from nestc.rules.states import STATES
from nesttest import analyze, only, spec
from oracles import assert_close, fla_naive, generator
from test_compiled import assert_equivalent

B, H, D = 2, 2, 8


def inputs(T: int, seed: int, sharpness: float = 1.0):
    g = generator(seed)
    q, k, v = (torch.randn(B, T, H, D, generator=g) for _ in range(3))
    return q * sharpness, k, v


def run_split(state: str, read: str, q, k, v, split: int):
    module = CacheLevel(oracles.level(f"read {read}", state=state), dim=H * D, heads=H)
    cache, reads = None, []
    with torch.no_grad():
        for part in (slice(0, split), slice(split, q.shape[1])):
            y, cache = oracles.RUN_CACHE[oracles.backend](module, k[:, part], v[:, part], q[:, part], None,
                                                          state=cache, start=part.start)
            reads.append(y)
    return torch.cat(reads, dim=1)


@pytest.mark.usefixtures("kernel_backend")
@pytest.mark.parametrize("sharpness", [1.0, 6.0])  # 6: scores up to about +-60, sigmoids saturated
def test_reading_its_own_entry_equals_fla_attend_current(sharpness):
    T = 71  # the compiled run's segments: 0-30, 30-64, 64-71
    q, k, v = inputs(T, seed=int(sharpness), sharpness=sharpness)
    expected, _ = fla_naive("stickbreaking_attn").naive_stickbreaking_attn(q, k, v, attend_current=True)
    actual = run_split("cache(weights=stickbreaking)", "after", q, k, v, split=30)
    assert_close(actual, expected, f"stickbreaking read after | fla attend_current | {oracles.backend}")


def stick_breaking_by_hand(q, k, v, window: int, own: bool):
    """float64 loop: query t reads entries j in (t - window, t] (`own`) or (t - window, t - 1],
    weight sigmoid(z_j) times (1 - sigmoid(z_l)) for every readable l newer than j."""
    q, k, v = (x.double() for x in (q, k, v))
    out = torch.zeros_like(v)
    for t in range(q.shape[1]):
        newest = t if own else t - 1
        readable = [j for j in range(newest + 1) if not window or j > newest - window]
        for j in readable:
            z = torch.einsum("bhd,bhd->bh", q[:, t], k[:, j]) / D ** 0.5
            weight = torch.sigmoid(z)
            for later in readable:
                if later > j:
                    weight = weight * (1 - torch.sigmoid(torch.einsum("bhd,bhd->bh", q[:, t], k[:, later]) / D ** 0.5))
            out[:, t] += weight[..., None] * v[:, j]
    return out


@pytest.mark.usefixtures("kernel_backend")
@pytest.mark.parametrize("read", ["before", "after"])
def test_a_windowed_stick_breaking_cache_reads_the_last_entries(read):
    q, k, v = inputs(23, seed=5)
    expected = stick_breaking_by_hand(q, k, v, window=5, own=read == "after").float()
    actual = run_split("cache(window=5, weights=stickbreaking)", read, q, k, v, split=9)
    assert_close(actual, expected, f"stickbreaking window 5 read {read} | by hand | {oracles.backend}")


def test_the_weights_sum_to_at_most_one_and_break_from_the_newest():
    scores = torch.tensor([[0.0, 2.0, -1.0, 3.0]])
    weights = STATES["cache"].stick_breaking(scores, torch.tensor([[True, True, True, False]]))
    s = torch.sigmoid(scores[0])
    # by hand: entry 2 (the newest readable) first, then 1 and 0 take from what is left
    expected = torch.stack([s[0] * (1 - s[1]) * (1 - s[2]), s[1] * (1 - s[2]), s[2], torch.tensor(0.0)])
    torch.testing.assert_close(weights[0], expected)
    assert weights.sum() < 1


BODY = """level mixer : cache(window={window}, weights=stickbreaking) {{
    key = x |> proj{rope}
    query = x |> proj{rope}
    read {read}
}}
"""


@pytest.mark.parametrize("rope", ["", " |> rope"])  # rope: the projections' RoPE-pairs path
@pytest.mark.parametrize("read", ["before", "after"])
@pytest.mark.parametrize("window", [0, 6])
def test_stick_breaking_models_equal_the_reference_in_float64(rope, read, window):
    program = nestc.check(spec(BODY.format(window=window, rope=rope, read=read), block="residual(rmsnorm |> mixer)"))
    assert_equivalent(program, length=45, split=19)


def test_stick_breaking_is_not_softmax():
    """The weights reach the logits: the same weights under softmax give other logits."""
    breaking = nestc.check(spec(BODY.format(window=0, rope="", read="after"), block="residual(mixer)"))
    softmax = nestc.check(spec(BODY.format(window=0, rope="", read="after").replace("stickbreaking", "softmax"),
                               block="residual(mixer)"))
    tokens = torch.arange(12)[None] % 7
    torch.manual_seed(0)
    first, second = reference.build(breaking), reference.build(softmax)
    second.load_state_dict(first.state_dict())
    assert (first(tokens)[0] - second(tokens)[0]).abs().max() > 1e-3


def test_a_stick_breaking_cache_has_no_retain():
    text = "level mixer : cache(weights=stickbreaking) { retain = x |> proj |> sigmoid }"
    found = only(analyze(spec(text)), "N0117")
    assert "stick-breaking" in found.message

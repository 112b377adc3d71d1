"""Decay on caches (the Forgetting Transformer, FoX): a `retain` gate on a `cache` level biases each
head's attention logits by the log of the product of the gates since each entry. Checked against
fla's naive_forgetting_attn with a window (tests/test_zoo_oracles.py has the global case), against
a hand-written `read before` version, and compiled == reference on whole models in float64
(streamed in two calls: the bias of carried entries continues)."""

from __future__ import annotations

import warnings

import pytest
import torch

import nestc
import oracles
from nestc.backends import compiled, reference
from nestc.backends.reference import CacheLevel
from nesttest import REPO, analyze, only, spec
from oracles import assert_close, fla_naive, generator, uniform
from test_compiled import assert_equivalent

B, H, D = 2, 2, 8


def cache_level(body: str, state: str = "cache"):
    return oracles.level(body, state=state)


def inputs(T: int, seed: int, low: float):
    g = generator(seed)
    q, k, v = (torch.randn(B, T, H, D, generator=g) for _ in range(3))
    retain = (-uniform(seed, B, T, H, low=0.0, high=-torch.log(torch.tensor(low)).item())).exp()
    return q, k, v, retain


def run_split(level, q, k, v, retain, split: int):
    """Both calls of a stream split at `split`, the cache carried between them."""
    module = CacheLevel(level, dim=H * D, heads=H)
    state, reads = None, []
    with torch.no_grad():
        for part in (slice(0, split), slice(split, q.shape[1])):
            y, state = oracles.RUN_CACHE[oracles.backend](module, k[:, part], v[:, part], q[:, part],
                                                          retain[:, part], state=state, start=part.start)
            reads.append(y)
    return torch.cat(reads, dim=1)


@pytest.mark.usefixtures("kernel_backend")
@pytest.mark.parametrize("window", [1, 5, 64])
@pytest.mark.parametrize("low", [0.5, 3e-4])
def test_a_windowed_forgetting_cache_equals_fla(window, low):
    """cache(window=W) with a retain gate reads the last W entries, as fla's window_size does;
    gates log-uniform down to `low` (3e-4 = e^-8, test_zoo_oracles' `wide` case: lower gates take
    fla's float32 prefix sums past the tolerance, test_fla_forgetting_attn_loses_digits_...)."""
    T = 71  # the compiled run's segments: 0-30, 30-64, 64-71
    q, k, v, retain = inputs(T, seed=window, low=low)
    level = cache_level("retain = x |> proj |> sigmoid", state=f"cache(window={window})")
    expected = fla_naive("forgetting_attn").naive_forgetting_attn(q, k, v, retain.log(), window_size=window)
    assert_close(run_split(level, q, k, v, retain, split=30), expected,
                 f"cache(window={window}) | fla forgetting_attn | {oracles.backend} | low={low}")


def forgetting_reads_before(q, k, v, retain):
    """By hand, float64: query t reads entries j < t with logits q_t.k_j / sqrt(d) plus the logs
    of the gates of tokens j + 1 .. t - 1 (entry t - 1 undecayed); the first query reads zero."""
    q, k, v, retain = (x.double() for x in (q, k, v, retain))
    T = q.shape[1]
    out = torch.zeros_like(v)
    for t in range(1, T):
        logits = torch.einsum("bhd,bjhd->bhj", q[:, t], k[:, :t]) / D ** 0.5
        for j in range(t):
            logits[..., j] += retain[:, j + 1:t].log().sum(1)
        out[:, t] = torch.einsum("bhj,bjhd->bhd", logits.softmax(-1), v[:, :t])
    return out


@pytest.mark.usefixtures("kernel_backend")
def test_a_forgetting_cache_read_before_decays_by_the_gates_before_the_query():
    T = 40
    q, k, v, retain = inputs(T, seed=3, low=0.05)
    level = cache_level("retain = x |> proj |> sigmoid\nread before")
    expected = forgetting_reads_before(q, k, v, retain).float()
    actual = run_split(level, q, k, v, retain, split=17)
    assert_close(actual, expected, f"read before | by hand | {oracles.backend}")
    # the gates matter: without them the reads differ
    plain = run_split(cache_level("read before"), q, k, v, torch.ones_like(retain), split=17)
    assert (plain - expected).abs().max() > 1e-2


FOX = """level mixer : cache {{
    key = x |> proj{key}
    query = x |> proj{key}
    retain = {retain}
    read {read}
}}
"""


@pytest.mark.parametrize("key, retain, read", [
    (" |> rope", "x |> proj(bias=true) |> sigmoid", "after"),  # keys and queries through the RoPE pairs path
    ("", "x |> proj |> sigmoid", "before"),
    ("", "0.8", "after"),  # a constant: ALiBi-like, a bias linear in the distance
    ("", "learned(init=0.9)", "before"),
])
@pytest.mark.parametrize("window", [0, 6])
def test_forgetting_models_equal_the_reference_in_float64(key, retain, read, window):
    level = FOX.format(key=key, retain=retain, read=read).replace("cache {", f"cache(window={window}) {{")
    program = nestc.check(spec(level, block="residual(rmsnorm |> mixer)"))
    assert_equivalent(program, length=45, split=19)


def test_a_forgetting_cache_changes_the_model():
    """The gate reaches the logits: the same weights without it give other logits."""
    with_gate = nestc.check(spec(FOX.format(key="", retain="0.5", read="after"), block="residual(mixer)"))
    without = nestc.check(spec(FOX.format(key="", retain="1.0", read="after"), block="residual(mixer)"))
    tokens = torch.arange(12)[None] % 7
    torch.manual_seed(0)
    first = reference.build(with_gate)
    second = reference.build(without)
    second.load_state_dict(first.state_dict())
    assert (first(tokens)[0] - second(tokens)[0]).abs().max() > 1e-3


def test_only_retain_is_lifted_on_a_cache():
    only(analyze(spec("level mixer : cache { lr = x |> proj |> sigmoid }")), "N0117")


def test_a_cache_retain_is_one_value_per_head():
    found = only(analyze(spec("level mixer : cache { retain = x |> proj(per=channel) |> sigmoid }")), "N0117")
    assert "one value per head" in found.message


def test_a_mac_attention_cannot_forget():
    text = ("level mem : matrix { every 4\n read before }\n"
            "level swa : cache(window=8) { retain = x |> proj |> sigmoid }\n")
    found = only(analyze(spec(text, block="residual(mac(memory=mem, attention=swa, segment=8))")), "N0117")
    assert "`retain`" in found.message


def test_the_zoo_spec_runs_attention_in_one_masked_softmax_per_segment():
    with warnings.catch_warnings():
        warnings.simplefilter("error", compiled.CompileWarning)
        model = compiled.build(nestc.check(str(REPO / "specs" / "forgetting_transformer.nest")))
    assert model.plans["mixer"].kernel == "module"


def test_a_forgetting_cache_saved_mid_stream_continues_exactly(tmp_path):
    """The entries' forget biases are part of the state a file keeps."""
    from nestc.runtime.checkpoint import load_state, save_state

    program = nestc.check(str(REPO / "specs" / "forgetting_transformer.nest"))
    torch.manual_seed(0)
    model = reference.build(program)
    tokens = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _, state = model(tokens[:, :6])
        assert state.levels[0]["mixer"].forget.shape == (2, 4, 6)
        save_state(state, str(tmp_path / "state.safetensors"))
        expected, _ = model(tokens[:, 6:], state)
        actual, _ = model(tokens[:, 6:], load_state(str(tmp_path / "state.safetensors"), model))
    assert torch.equal(actual, expected)

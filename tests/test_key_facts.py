"""The facts that make deltanet and hope what they are, asserted value by value.

The goldens are produced by the code under test; these checks are independent of them and run on
both the zoo spec and its golden copy (so a wrong golden cannot be blessed by accident).
"""

from __future__ import annotations

import json

import pytest

from nestc import graph
from nestc.lang import ir
from nestc.lang.queries import generated_roles
from nestc.lang.sema import analyze_file
from nesttest import render

DELTANET = ["specs/deltanet.nest", "tests/golden/deltanet.nest"]
HOPE = ["specs/hope.nest", "tests/golden/hope.nest"]
CMS = ("cms_fast", "cms_mid", "cms_slow")
MEMORIES = ("mk", "mv", "mlr", "mretain", "mem")


def _program(path):
    result = analyze_file(path)
    assert result.ok, render(result)
    return result.program


def _edges(built, kind):
    return {(s, t): d["label"] for s, t, d in built.edges(data=True) if d["kind"] == kind}


# --- DeltaNet ------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", DELTANET)
def test_deltanet_has_exactly_two_levels(path, at_repo_root):
    program = _program(path)
    assert sorted(program.level_names) == ["ffn", "mixer"]


@pytest.mark.parametrize("path", DELTANET)
def test_deltanet_mixer_is_the_delta_rule(path, at_repo_root):
    mixer = _program(path).level("mixer")
    assert mixer.state == ir.Op(name="matrix")
    assert mixer.every.tokens == 1 and mixer.every.steps == 1  # one update per token
    assert isinstance(mixer.objective, ir.Op) and mixer.objective.name == "l2"
    assert mixer.optimizer == ir.Op(name="gd", args=(("implicit", False),))  # the explicit step
    assert mixer.read == "after"
    # beta_t: a data-dependent step size x |> proj |> sigmoid
    assert isinstance(mixer.lr, ir.Pipeline)
    assert [s.name for s in mixer.lr.stages] == ["proj", "sigmoid"]
    assert [s.name for s in mixer.key.stages] == ["proj", "conv", "silu", "l2norm"]


@pytest.mark.parametrize("path", DELTANET)
def test_deltanet_ffn_is_frozen_and_model_is_two_residual_blocks(path, at_repo_root):
    program = _program(path)
    assert program.level("ffn").every.tokens == 0
    model = program.model
    assert (model.vocab, model.dim, model.heads, model.layers) == (256, 128, 4, 2)
    assert isinstance(model.block, ir.Sequence) and len(model.block.items) == 2
    assert all(isinstance(item, ir.Residual) for item in model.block.items)
    assert program.train.context == 256


@pytest.mark.parametrize("path", DELTANET)
def test_deltanet_graph(path, at_repo_root):
    built = graph.build(_program(path))
    order = graph.frequency_order(built)
    assert order[0] == "outer" and order[-1] == "mixer"
    assert ("mixer", "ffn") in _edges(built, "data")
    assert set(_edges(built, "trains")) == {("outer", "mixer"), ("outer", "ffn")}
    assert _edges(built, "generates") == {}


# --- Hope ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", HOPE)
def test_hope_levels(path, at_repo_root):
    program = _program(path)
    assert set(program.level_names) == set(MEMORIES) | set(CMS)


@pytest.mark.parametrize("path", HOPE)
def test_hope_mk_generates_the_keys_of_mem(path, at_repo_root):
    program = _program(path)
    built = graph.build(program)
    generates = [(d["label"]) for s, t, d in built.edges(data=True) if (s, t) == ("mk", "mem") and d["kind"] == "generates"]
    assert generates, "expected a generates edge mk -> mem"
    assert generated_roles(program.level("mem"))["mk"] == {"key"}
    assert all("key" in label for label in generates)
    # mv, mlr, mretain generate the values, step sizes and retention of mem
    roles = generated_roles(program.level("mem"))
    assert roles["mv"] == {"value"} and roles["mlr"] == {"lr"} and roles["mretain"] == {"retain"}


@pytest.mark.parametrize("path", HOPE)
def test_hope_memories_read_before(path, at_repo_root):
    program = _program(path)
    assert program.level("mem").read == "before"
    # the memories generate each other in a cycle, which is executable only because all read before
    assert all(program.level(name).read == "before" for name in MEMORIES)
    assert "mk" in generated_roles(program.level("mk"))  # self-modifying


@pytest.mark.parametrize("path", HOPE)
def test_hope_cms_levels(path, at_repo_root):
    program = _program(path)
    periods = {name: program.level(name).every.tokens for name in CMS}
    assert len(set(periods.values())) >= 2
    assert periods == {"cms_fast": 16, "cms_mid": 32, "cms_slow": 64}
    # powers of two up to 64: every common context is a multiple of each period
    assert all(context % period == 0 for context in (64, 128, 256, 512, 1024) for period in periods.values())
    for name in CMS:
        level = program.level(name)
        assert level.objective.name == "task"
        assert level.key is None and level.value is None  # y = M(x): no key/value pipelines
        assert level.read == "before"
    assert program.level("mem").every.tokens == 16
    assert program.level("mk").every.tokens == 64


@pytest.mark.parametrize("path", HOPE)
def test_hope_frequency_order(path, at_repo_root):
    built = graph.build(_program(path))
    order = graph.frequency_order(built)
    assert order[0] == "outer"
    assert order.index("cms_slow") < order.index("cms_mid") < order.index("cms_fast")
    assert order.index("mk") < order.index("mem")  # generators (every 64) are slower than mem (every 16)
    rates = [built.nodes[n]["rate"] for n in order]
    assert rates == sorted(rates)
    assert json.loads(graph.to_json(built))["order"] == order


@pytest.mark.parametrize("path", HOPE)
def test_hope_data_and_outer_edges(path, at_repo_root):
    built = graph.build(_program(path))
    data = _edges(built, "data")
    assert {("mem", "cms_fast"), ("cms_fast", "cms_mid"), ("cms_mid", "cms_slow")} <= set(data)
    assert {t for s, t in _edges(built, "task_gradient")} == set(CMS)
    assert {t for s, t in _edges(built, "meta_init")} == set(MEMORIES) | set(CMS)

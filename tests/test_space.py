"""Search spaces: dimensions, grid, sampling and freezing (torch-free)."""

from __future__ import annotations

import random

import pytest

from nestc.lang import ir, syntax
from nestc.search import space
from nestc.lang.diagnostics import NestError
from nestc.lang.sema import analyze_source
from nestc.lang.source import SourceFile

SPEC = """
const D = choice(32, 64)                  # one dimension, used twice below
level mem : mlp(depth=choice(1, 2)) {
    objective choice(l2, dot)
    every choice(8, 16, name="chunk")
}
level cms : mlp(expand=2) {
    objective task
    every choice(8, 16, name="chunk")      # tied to the memory's chunk
}
level cms2 extends cms
model {
    vocab 16
    dim D
    heads 2
    block = residual(mem) |> choice(identity, residual(cms) |> residual(rmsnorm |> choice(cms2, identity)))
}
train {
    optimizer adamw(lr=loguniform(1e-4, 1e-2))
    context 64
}
"""


def _space(text: str, name: str = "space.nest") -> space.Space:
    source = SourceFile(name, text)
    return space.Space(source, syntax.parse(source))


def test_dimensions_are_labelled_by_place_or_name_and_tied_by_name():
    search = _space(SPEC)
    labels = list(search.dimensions)
    assert labels == ["const D", "level mem / state / depth", "level mem / objective", "chunk", "model / block",
                      "model / block #2", "train / optimizer / lr"]
    assert len(search.dimensions["chunk"].sites) == 2
    assert search.dimensions["model / block #2"].condition == ("model / block", 1)
    assert search.dimensions["train / optimizer / lr"].kind == "loguniform"


def test_grid_counts_conditional_dimensions_only_where_they_exist():
    text = SPEC.replace("loguniform(1e-4, 1e-2)", "1e-3")
    search = _space(text)
    grid = list(search.grid())
    # D(2) x depth(2) x objective(2) x chunk(2) x block: identity (1) or the cms branch with 2 inner options
    assert len(grid) == 2 * 2 * 2 * 2 * (1 + 2) == search.size
    assert all("model / block #2" not in a for a in grid if a["model / block"] == 0)
    assert len({tuple(sorted(a.items())) for a in grid}) == len(grid)


def test_a_loguniform_space_is_infinite_and_has_no_grid():
    search = _space(SPEC)
    assert search.size == float("inf")
    with pytest.raises(ValueError, match="sample"):
        next(search.grid())


def test_sampling_is_deterministic_under_a_seed_and_stays_in_bounds():
    search = _space(SPEC)
    first = [search.sample(random.Random(3)) for _ in range(5)]
    again = [search.sample(random.Random(3)) for _ in range(5)]
    assert first == again
    for assignment in (search.sample(random.Random(seed)) for seed in range(50)):
        assert 1e-4 <= assignment["train / optimizer / lr"] <= 1e-2


def test_every_frozen_variant_checks_clean_and_has_its_own_id():
    search = _space(SPEC.replace("loguniform(1e-4, 1e-2)", "1e-3"))
    ids = set()
    for assignment in search.grid():
        text = search.freeze(assignment)
        result = analyze_source(SourceFile("space.nest", text))
        assert result.ok, [d.message for d in result.diagnostics]
        assert not ir.contains_search(result.program)
        assert "# one dimension, used twice below" in text  # freezing keeps comments
        ids.add(ir.variant_id(result.program))
    assert len(ids) == search.size


def test_freezing_substitutes_the_chosen_values():
    search = _space(SPEC)
    assignment = {"const D": 1, "level mem / state / depth": 0, "level mem / objective": 1, "chunk": 1,
                  "model / block": 1, "model / block #2": 0, "train / optimizer / lr": 0.005}
    text = search.freeze(assignment)
    assert "const D = 64" in text
    assert "mlp(depth=1)" in text and "objective dot" in text
    assert text.count("every 16") == 2
    assert "block = residual(mem) |> residual(cms) |> residual(rmsnorm |> cms2)" in text
    assert "adamw(lr=0.005)" in text
    with pytest.raises(KeyError, match="chunk"):
        search.freeze({k: v for k, v in assignment.items() if k != "chunk"})


def test_the_zoo_spaces_have_the_expected_sizes():
    assert space.load("specs/spaces/deltanet_space.nest").size == 27
    hope = space.load("specs/spaces/hope_space.nest")
    assert [d.label for d in hope.dimensions.values()][-1] == "train / optimizer / lr"


def test_a_named_dimension_with_different_options_is_a_diagnostic():
    with pytest.raises(NestError) as raised:
        _space("const a = choice(1, 2, name=\"n\")\nconst b = choice(1, 3, name=\"n\")\n")
    assert raised.value.diagnostics[0].code == "N0119"
    assert raised.value.diagnostics[0].span.line == 2


@pytest.fixture(autouse=True)
def _at_root(monkeypatch, request):
    monkeypatch.chdir(request.config.rootpath)

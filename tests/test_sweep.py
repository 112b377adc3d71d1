"""`nestc sweep --dry-run`: variants listed with ids and sizes; invalid variants reported, skipped."""

from __future__ import annotations

import json

from click.testing import CliRunner

from nestc.cli import cli
from nestc.search.sweep import variants

INVALID_HALF = """
level mem : vector {
    objective l2
    optimizer choice(gd, dgd)      # dgd has no vector form: half the variants are invalid
}
model {
    vocab 8
    dim choice(8, 16)
    heads 2
    block = residual(mem)
}
"""


def test_zoo_space_lists_every_variant_with_a_distinct_id(monkeypatch, request):
    monkeypatch.chdir(request.config.rootpath)
    result = CliRunner().invoke(cli, ["sweep", "specs/spaces/deltanet_space.nest", "--dry-run", "--format", "json"])
    assert result.exit_code == 0, result.output
    listed = json.loads(result.output)
    assert len(listed) == 27
    assert len({v["id"] for v in listed}) == 27
    assert all(v["parameters"] > 0 and v["flops_per_token"] > 2 * v["parameters"] for v in listed)


def test_invalid_variants_are_reported_and_skipped(tmp_path):
    path = tmp_path / "half.nest"
    path.write_text(INVALID_HALF)
    found = variants(str(path))
    assert len(found) == 4
    invalid = [v for v in found if not v.ok]
    assert [v.choices["level mem / optimizer"] for v in invalid] == ["dgd", "dgd"]
    assert all(v.diagnostics[0].code == "N0112" for v in invalid)
    # parameters grow with the width: 8 -> 16 doubles the embedding and quadruples the projections
    valid = sorted((v for v in found if v.ok), key=lambda v: v.parameters)
    assert valid[0].choices["model / dim"] == "8" and valid[1].choices["model / dim"] == "16"
    result = CliRunner().invoke(cli, ["sweep", str(path), "--dry-run"])
    assert result.exit_code == 0
    assert "4 variants listed, 2 valid, 2 with errors (skipped)" in result.output
    assert "error[N0112]" in result.output


def test_sweep_without_dry_run_is_a_usage_error(tmp_path):
    path = tmp_path / "half.nest"
    path.write_text(INVALID_HALF)
    result = CliRunner().invoke(cli, ["sweep", str(path)])
    assert result.exit_code == 2
    assert "--dry-run" in result.output


def test_several_spaces_are_listed_each_in_turn(tmp_path):
    first, second = tmp_path / "half.nest", tmp_path / "wide.nest"
    first.write_text(INVALID_HALF)
    second.write_text(INVALID_HALF.replace("choice(8, 16)", "choice(8, 16, 32)"))
    result = CliRunner().invoke(cli, ["sweep", str(first), str(second), "--dry-run", "--format", "json"])
    assert result.exit_code == 0, result.output
    listed = json.loads(result.output)
    assert list(listed) == [str(first), str(second)]
    assert [len(listed[str(first)]), len(listed[str(second)])] == [4, 6]
    text = CliRunner().invoke(cli, ["sweep", str(first), str(second), "--dry-run"])
    assert text.exit_code == 0
    assert text.output.index(f"{first}:") < text.output.index("4 variants listed") \
        < text.output.index(f"{second}:") < text.output.index("6 variants listed")


def test_several_spaces_refuse_one_study_name_and_a_shared_file_name(tmp_path):
    (tmp_path / "a").mkdir()
    first, second, twin = tmp_path / "half.nest", tmp_path / "wide.nest", tmp_path / "a" / "half.nest"
    for path in (first, second, twin):
        path.write_text(INVALID_HALF)
    named = CliRunner().invoke(cli, ["sweep", str(first), str(second), "--trials", "1", "--study", "mine"])
    assert named.exit_code == 2 and "--study names one study" in named.output
    twins = CliRunner().invoke(cli, ["sweep", str(first), str(twin), "--trials", "1"])
    assert twins.exit_code == 2 and "two spaces are named `half`" in twins.output


def test_an_error_in_any_space_stops_the_sweep_before_one_trains(tmp_path):
    good, bad = tmp_path / "good.nest", tmp_path / "bad.nest"
    good.write_text(INVALID_HALF)
    bad.write_text(INVALID_HALF.replace("choice(8, 16)", "choice()"))
    result = CliRunner().invoke(cli, ["sweep", str(good), str(bad), "--trials", "1", "--runs", str(tmp_path / "runs")])
    assert result.exit_code == 1 and "error[N0119]" in result.output and "bad.nest" in result.output
    assert not (tmp_path / "runs").exists()

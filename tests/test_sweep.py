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

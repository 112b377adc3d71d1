"""Golden files: IR dumps, level graphs and rendered diagnostics, compared byte for byte.

Inputs live in tests/golden/ (valid specs: `<name>.nest` -> `<name>.ir.txt`, `<name>.graph.txt`)
and tests/golden/errors/ (`<name>.nest` -> `<name>.stderr`, rendered without colour). Imported
helper files sit in the `lib/` folders and are not goldens themselves. Paths are relative to the
repository root, so file names inside the goldens are stable.

Run `python -m pytest tests/test_golden.py --update-goldens` to rewrite the expected files after
an intended change, then review the diff. Because goldens are produced by the code under test,
tests/test_key_facts.py checks the important facts independently.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from nestc import graph
from nestc.lang import ir
from nestc.lang.diagnostics import render_all
from nestc.lang.sema import analyze_file
from nesttest import REPO

GOLDEN = REPO / "tests" / "golden"
VALID = sorted(p.relative_to(REPO).as_posix() for p in GOLDEN.glob("*.nest"))
INVALID = sorted(p.relative_to(REPO).as_posix() for p in (GOLDEN / "errors").glob("*.nest"))


def _compare(path: Path, actual: str, update: bool) -> None:
    if update:
        path.write_text(actual, encoding="utf-8")
        return
    assert path.exists(), f"missing golden {path.relative_to(REPO)}: run pytest --update-goldens"
    expected = path.read_text(encoding="utf-8")
    assert actual == expected, (
        f"{path.relative_to(REPO)} differs from the compiler's output "
        "(if the change is intended, run pytest --update-goldens and review the diff)"
    )


def test_golden_inputs_are_present():
    names = {Path(p).stem for p in VALID}
    assert {"deltanet", "hope", "titans_lib", "deltanet_space", "features"} <= names
    assert len(INVALID) >= 4


@pytest.mark.parametrize("relative", VALID)
def test_ir_and_graph_golden(relative, at_repo_root, update_goldens):
    result = analyze_file(relative)
    assert result.ok, render_all(result.diagnostics, result.sources)
    assert result.diagnostics == [], "golden inputs should check without warnings"
    base = REPO / relative[: -len(".nest")]
    _compare(Path(f"{base}.ir.txt"), ir.dump(result.program), update_goldens)
    _compare(Path(f"{base}.graph.txt"), graph.to_text(graph.build(result.program)), update_goldens)


@pytest.mark.parametrize("relative", INVALID)
def test_diagnostics_golden(relative, at_repo_root, update_goldens):
    result = analyze_file(relative)
    assert not result.ok
    assert result.program is None
    rendered = render_all(result.diagnostics, result.sources, color=False) + "\n"
    assert "\x1b[" not in rendered
    base = REPO / relative[: -len(".nest")]
    _compare(Path(f"{base}.stderr"), rendered, update_goldens)


def test_no_orphan_golden_outputs():
    """Every expected-output file belongs to an input (catches renamed or deleted inputs)."""
    outputs = list(GOLDEN.glob("*.ir.txt")) + list(GOLDEN.glob("*.graph.txt")) + list(GOLDEN.glob("errors/*.stderr"))
    for output in outputs:
        stem = output.name.split(".")[0]
        assert (output.parent / f"{stem}.nest").exists(), f"{output} has no input"


def test_cli_stderr_matches_golden(at_repo_root):
    """`nestc check --color never` prints exactly the golden rendering on stderr."""
    from nestc.cli import cli
    from nesttest import cli_runner

    relative = "tests/golden/errors/chunk_context.nest"
    result = cli_runner().invoke(cli, ["check", "--color", "never", relative])
    assert result.exit_code == 1
    expected = (REPO / "tests/golden/errors/chunk_context.stderr").read_text(encoding="utf-8")
    assert result.stderr == expected

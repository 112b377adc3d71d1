"""Fuzzing the front end with mutated zoo specs (fixed seed; tests/nestfuzz.py): analysis never
raises, it only reports diagnostics, and the command line never shows a traceback or an internal
error. benchmarks/fuzz.py runs ten times as many through the command line.
"""

from __future__ import annotations

import random

from nestc.lang.sema import analyze_file
from nestfuzz import mutants, prepare
from nesttest import run_nestc

SEED = 20251126
MUTANTS = 1000


def test_analysis_never_raises(tmp_path, monkeypatch):
    prepare(tmp_path)
    monkeypatch.chdir(tmp_path)
    failures, clean, distinct = [], 0, set()
    for name, text in mutants(MUTANTS, SEED):
        distinct.add(text)
        (tmp_path / "mutant.nest").write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            result = analyze_file("mutant.nest")
        except Exception as error:  # noqa: BLE001 - the point of the test
            failures.append(f"{name}: {type(error).__name__}: {error}\n---\n{text[:2000]}")
            continue
        if result.ok:
            clean += 1
        else:
            assert any(d.is_error for d in result.diagnostics)
            assert result.program is None
            for diagnostic in result.diagnostics:
                assert diagnostic.code.startswith("N0") and len(diagnostic.code) == 5
                if diagnostic.span is not None:
                    assert diagnostic.span.line >= 1 and diagnostic.span.column >= 1
    assert not failures, f"{len(failures)} mutants crashed the analyzer; first:\n{failures[0]}"
    assert len(distinct) > 0.9 * MUTANTS  # the mutations really vary
    assert clean < len(distinct) / 2  # and most of them break something


def test_cli_on_mutants_never_shows_a_traceback(tmp_path):
    """A handful of mutants through the real entry point (`python -m nestc check`)."""
    prepare(tmp_path)
    chosen = random.Random(SEED + 1).sample(mutants(MUTANTS, SEED), 6)
    files = []
    for index, (_, text) in enumerate(chosen):
        target = tmp_path / f"mutant_{index}.nest"
        target.write_text(text, encoding="utf-8")
        files.append(target.name)
    # one by one for the exit codes, plus all at once
    for name in files + [" ".join(files)]:
        completed = run_nestc("check", "--color", "never", *name.split(), cwd=tmp_path)
        assert completed.returncode in (0, 1), completed.stderr
        assert "Traceback" not in completed.stderr
        assert "internal compiler error" not in completed.stderr
        if completed.returncode == 1:
            assert "error[N0" in completed.stderr

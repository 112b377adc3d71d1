"""Fuzzing the front end with mutated zoo specs (fixed seed): analysis never raises, it only
reports diagnostics, and the command line never shows a traceback or an internal error.
"""

from __future__ import annotations

import random
import shutil

import pytest

from nestc.lang.sema import analyze_source
from nestc.lang.source import SourceFile
from nesttest import REPO, SPECS, ZOO, run_nestc

SEED = 20251126
MUTANTS_PER_SPEC = 16
ALPHABET = '{}()[]=:,|>"#;' + "abcxyzAZ_0123456789 \n"


def mutate(text: str, rng: random.Random) -> str:
    """One random edit: delete / duplicate / swap lines, delete / insert a character, truncate."""
    lines = text.split("\n")
    operation = rng.choice(["delete_line", "duplicate_line", "swap_lines", "delete_char", "insert_char",
                            "insert_char", "truncate"])
    if operation == "delete_line" and len(lines) > 1:
        del lines[rng.randrange(len(lines))]
    elif operation == "duplicate_line":
        index = rng.randrange(len(lines))
        lines.insert(index, lines[index])
    elif operation == "swap_lines" and len(lines) > 1:
        i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
        lines[i], lines[j] = lines[j], lines[i]
    elif operation == "delete_char" and text:
        index = rng.randrange(len(text))
        return text[:index] + text[index + 1:]
    elif operation == "insert_char":
        index = rng.randrange(len(text) + 1)
        return text[:index] + rng.choice(ALPHABET) + text[index:]
    elif operation == "truncate":
        return text[:rng.randrange(len(text) + 1)]
    return "\n".join(lines)


def mutants():
    """(spec path relative to the repo, mutated text), deterministic for a given zoo."""
    rng = random.Random(SEED)
    out = []
    for path in ZOO:
        text = path.read_text(encoding="utf-8")
        for _ in range(MUTANTS_PER_SPEC):
            mutated = text
            for _ in range(rng.randint(1, 3)):
                mutated = mutate(mutated, rng)
            out.append((path.relative_to(REPO).as_posix(), mutated))
    return out


def test_there_are_a_few_hundred_mutants():
    assert len(mutants()) >= 300


def test_analysis_never_raises(at_repo_root):
    failures, clean, distinct = [], 0, set()
    for name, text in mutants():
        distinct.add(text)
        try:
            result = analyze_source(SourceFile(name, text))
        except Exception as error:  # noqa: BLE001 - the point of the test
            failures.append(f"{name}: {type(error).__name__}: {error}\n---\n{text}")
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
    assert len(distinct) > 250  # the mutations really vary
    assert clean < len(distinct)  # and most of them break something


def test_cli_on_mutants_never_shows_a_traceback(tmp_path):
    """A handful of mutants through the real entry point (`python -m nestc check`)."""
    shutil.copytree(SPECS / "lib", tmp_path / "lib")  # so the mutants' imports still resolve
    rng = random.Random(SEED + 1)
    chosen = rng.sample(mutants(), 6)
    files = []
    for index, (name, text) in enumerate(chosen):
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

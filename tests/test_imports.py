"""Imports: missing files, cycles, diamonds and definitions duplicated across files."""

from __future__ import annotations

from pathlib import Path

from nestc.lang.sema import analyze_file
from nesttest import MODEL, caret, render

USE_MIXER = MODEL % "mixer"


def write(directory: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def test_missing_import_points_at_the_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # 'import "lib/missing.nest"': the quoted path spans columns 8-25 (18 characters)
    write(tmp_path, {"main.nest": 'import "lib/missing.nest"\nlevel mixer : matrix\n' + USE_MIXER})
    result = analyze_file("main.nest")
    assert not result.ok
    (diagnostic,) = result.diagnostics
    assert diagnostic.code == "N0115"
    span = diagnostic.span
    assert (span.file, span.line, span.column, span.end_line, span.end_column) == ("main.nest", 1, 8, 1, 26)
    assert "lib/missing.nest" in diagnostic.message
    assert caret(render(result), 1) == (8, 18)


def test_import_of_a_non_nest_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, {"main.nest": 'import "notes.txt"\nlevel mixer : matrix\n' + USE_MIXER, "notes.txt": ""})
    (diagnostic,) = analyze_file("main.nest").diagnostics
    assert diagnostic.code == "N0115" and diagnostic.span.column == 8


def test_import_paths_are_relative_to_the_importing_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, {
        "specs/main.nest": 'import "lib/a.nest"\n' + USE_MIXER,
        "specs/lib/a.nest": 'import "b.nest"\n',  # specs/lib/b.nest, not ./b.nest
        "specs/lib/b.nest": "level mixer : matrix { every 1 }\n",
        "b.nest": "level decoy : matrix\n",
    })
    result = analyze_file("specs/main.nest")
    assert result.ok, render(result)
    assert result.program.level_names == ("mixer",)


def test_import_cycle(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, {
        "main.nest": 'import "a.nest"\nlevel mixer : matrix\n' + USE_MIXER,
        "a.nest": 'import "b.nest"\nlevel la : matrix\n',
        "b.nest": '# b imports a again\nimport "a.nest"\nlevel lb : matrix\n',
    })
    result = analyze_file("main.nest")
    assert not result.ok
    cycles = [d for d in result.diagnostics if d.code == "N0115"]
    assert len(cycles) == 1
    (cycle,) = cycles
    assert (cycle.span.file, cycle.span.line, cycle.span.column) == ("b.nest", 2, 8)
    assert "a.nest -> b.nest -> a.nest" in " ".join(cycle.notes)


def test_a_file_importing_itself(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, {"main.nest": 'import "main.nest"\nlevel mixer : matrix\n' + USE_MIXER})
    result = analyze_file("main.nest")
    assert [d.code for d in result.diagnostics] == ["N0115"]


def test_diamond_import_loads_the_shared_file_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, {
        "top.nest": 'import "left.nest"\nimport "right.nest"\n' + MODEL % "left |> right |> base",
        "left.nest": 'import "base.nest"\nlevel left extends base\n',
        "right.nest": 'import "./base.nest"\nlevel right extends base { every 4 }\n',
        "base.nest": "level base : matrix { every 1 }\n",
    })
    result = analyze_file("top.nest")
    assert result.ok, render(result)
    assert result.diagnostics == []
    assert sorted(result.program.level_names) == ["base", "left", "right"]
    assert result.program.level("right").every.tokens == 4
    assert result.program.level("left").every.tokens == 1
    assert sorted(result.modules) == ["base.nest", "left.nest", "right.nest", "top.nest"]


def test_definition_duplicated_across_files_shows_both_spans(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, {
        "main.nest": 'import "lib.nest"\n\nlevel mixer : matrix\n' + USE_MIXER,
        "lib.nest": "# library\nconst D = 4\nlevel mixer : vector\n",
    })
    result = analyze_file("main.nest")
    assert not result.ok
    (duplicate,) = result.diagnostics
    assert duplicate.code == "N0102"
    assert (duplicate.span.file, duplicate.span.line, duplicate.span.column) == ("main.nest", 3, 7)
    (first,) = duplicate.secondary
    assert (first.span.file, first.span.line, first.span.column, first.span.end_column) == ("lib.nest", 3, 7, 12)
    rendered = render(result)
    assert "main.nest:3:7" in rendered and "lib.nest:3:7" in rendered
    assert "level mixer : vector" in rendered and "level mixer : matrix" in rendered


def test_constant_duplicated_across_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, {
        "main.nest": 'import "lib.nest"\nconst D = 64\nlevel mixer : matrix\n' + USE_MIXER,
        "lib.nest": "const D = 32\n",
    })
    (duplicate,) = analyze_file("main.nest").diagnostics
    assert duplicate.code == "N0102"
    assert duplicate.span.file == "main.nest" and duplicate.secondary[0].span.file == "lib.nest"


def test_errors_inside_an_imported_file_are_reported_there(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, {
        "main.nest": 'import "lib.nest"\n' + USE_MIXER,
        "lib.nest": "level mixer : matrix {\n    every 1\n    evry 2\n}\n",
    })
    result = analyze_file("main.nest")
    (diagnostic,) = result.diagnostics
    assert diagnostic.code == "N0103"
    assert (diagnostic.span.file, diagnostic.span.line, diagnostic.span.column) == ("lib.nest", 3, 5)
    assert "    evry 2" in render(result)


def test_syntax_error_in_an_imported_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, {"main.nest": 'import "lib.nest"\n' + USE_MIXER, "lib.nest": "level mixer : matrix {\n"})
    result = analyze_file("main.nest")
    assert not result.ok
    # (the main file may also report the names it could not find; the syntax error must be there)
    assert ("N0012", "lib.nest", 1) in [(d.code, d.span.file, d.span.line) for d in result.diagnostics]
    assert "lib.nest:1:" in render(result)


def _special_files(directory: Path) -> dict[str, str]:
    """Import targets that a plain read would hang on, read without end, or choke on: the
    expected reason of each refusal."""
    import os

    os.mkfifo(directory / "fifo.nest")
    (directory / "zero.nest").symlink_to("/dev/zero")
    (directory / "huge.nest").write_bytes(b"#" * ((1 << 20) + 1))
    return {"fifo.nest": "not a regular file", "zero.nest": "not a regular file", "huge.nest": "larger than"}


def test_imports_of_special_or_huge_files_are_refused_without_reading_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, reason in _special_files(tmp_path).items():
        write(tmp_path, {"main.nest": f'import "{name}"\nlevel mixer : matrix\n' + USE_MIXER})
        (diagnostic,) = analyze_file("main.nest").diagnostics
        assert diagnostic.code == "N0115" and reason in diagnostic.message, (name, diagnostic.message)
    direct = analyze_file("fifo.nest").diagnostics
    assert [d.code for d in direct] == ["N0100"] and "not a regular file" in direct[0].message


def test_a_nul_byte_in_an_import_path_is_a_diagnostic(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, {"main.nest": 'import "lib\0x.nest"\nlevel mixer : matrix\n' + USE_MIXER})
    (diagnostic,) = analyze_file("main.nest").diagnostics
    assert diagnostic.code == "N0115" and "nul byte" in diagnostic.message and diagnostic.span.line == 1


def test_a_utf8_byte_order_mark_is_accepted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lib.nest").write_bytes("\ufefflevel mixer : matrix\n".encode("utf-8"))
    (tmp_path / "main.nest").write_bytes(('\ufeffimport "lib.nest"\n' + USE_MIXER).encode("utf-8"))
    result = analyze_file("main.nest")
    assert result.ok, render(result)

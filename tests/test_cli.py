"""The `nestc` command line: exit codes, output formats, fmt, explain and error handling.

Most tests drive `nestc.cli.cli` in-process with click's CliRunner; the ones about the real entry
point (`nestc.cli:main`, which turns crashes into exit code 3) call main() or a subprocess.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from collections import Counter

import pytest

from nestc.lang import errors
from nestc.cli import cli
from nesttest import REPO, ZOO, cli_runner, run_nestc

ERROR_FILE = "tests/golden/errors/values.nest"
CLEAN_FILE = "specs/deltanet.nest"


def invoke(*args, **kwargs):
    return cli_runner().invoke(cli, list(args), **kwargs)


# --- check ----------------------------------------------------------------------------------------

def test_check_zoo_exits_0(at_repo_root):
    paths = [str(p.relative_to(REPO)) for p in ZOO]
    result = invoke("check", *paths)
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    for path in paths:
        assert f"ok: {path} (" in result.stdout


def test_check_reports_level_count(at_repo_root):
    result = invoke("check", CLEAN_FILE)
    assert result.stdout == f"ok: {CLEAN_FILE} (2 levels)\n"


def test_check_quiet_prints_nothing_for_clean_files(at_repo_root):
    result = invoke("check", "-q", CLEAN_FILE)
    assert result.exit_code == 0 and result.stdout == "" and result.stderr == ""


def test_check_error_file_exits_1(at_repo_root):
    result = invoke("check", "--color", "never", ERROR_FILE)
    assert result.exit_code == 1
    assert "error[N0106]" in result.stderr
    assert "could not compile: 8 errors" in result.stderr
    assert "ok:" not in result.stdout


def test_check_mixed_files_exits_1_but_checks_all(at_repo_root):
    result = invoke("check", "--color", "never", ERROR_FILE, CLEAN_FILE)
    assert result.exit_code == 1
    assert f"ok: {CLEAN_FILE}" in result.stdout


@pytest.mark.parametrize("command", ["check", "graph", "fmt"])
def test_missing_file_is_a_usage_error(command, tmp_path):
    """README and cli.py: exit code 2 for usage errors, "a missing file" among them."""
    result = invoke(command, str(tmp_path / "missing.nest"))
    assert result.exit_code == 2, (result.exit_code, result.stderr)
    assert "missing.nest" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args", [["check", "--bogus", CLEAN_FILE], ["check"], ["graph", "--format", "svg", CLEAN_FILE],
                                  ["check", "--error-format", "xml", CLEAN_FILE], ["frobnicate"]])
def test_bad_usage_exits_2(args, at_repo_root):
    result = invoke(*args)
    assert result.exit_code == 2
    assert "Usage:" in result.stderr


def test_check_directory_is_a_usage_error(at_repo_root):
    assert invoke("check", "specs").exit_code == 2


def test_error_format_json(at_repo_root):
    result = invoke("check", "--error-format", "json", ERROR_FILE)
    assert result.exit_code == 1
    diagnostics = json.loads(result.stdout)
    assert isinstance(diagnostics, list) and len(diagnostics) == 8
    for entry in diagnostics:
        assert re.fullmatch(r"N0\d{3}", entry["code"])
        assert entry["severity"] == "error"
        assert entry["file"] == ERROR_FILE
        assert isinstance(entry["line"], int) and isinstance(entry["column"], int)
        assert entry["message"]
    first = diagnostics[0]
    assert (first["code"], first["line"], first["column"], first["end_column"]) == ("N0106", 3, 35, 36)
    assert "error[" not in result.stderr  # no human rendering mixed in


def test_error_format_json_clean_file_is_an_empty_list(at_repo_root):
    result = invoke("check", "--error-format", "json", CLEAN_FILE)
    assert result.exit_code == 0
    assert json.loads(result.stdout) == []


def test_error_format_json_has_secondary_spans(at_repo_root):
    result = invoke("check", "--error-format", "json", "tests/golden/errors/duplicate_across_files.nest")
    (entry,) = json.loads(result.stdout)
    assert entry["code"] == "N0102"
    (other,) = entry["secondary"]
    assert other["file"] == "tests/golden/errors/lib/mixers.nest" and other["line"] == 2 and other["column"] == 7


def test_color_choices(at_repo_root, monkeypatch):
    # `always` means always, also when stderr is a pipe (click.echo strips colour unless told)
    assert "\x1b[" in invoke("check", "--color", "always", ERROR_FILE).stderr
    assert "\x1b[" not in invoke("check", "--color", "never", ERROR_FILE).stderr
    monkeypatch.setenv("NO_COLOR", "1")
    assert "\x1b[" not in invoke("check", ERROR_FILE).stderr


# --- graph ----------------------------------------------------------------------------------------

def test_graph_text(at_repo_root):
    result = invoke("graph", "specs/hope.nest")
    assert result.exit_code == 0
    assert result.stdout.startswith("level graph of specs/hope.nest (slowest first)")
    assert "edges:" in result.stdout


def test_graph_dot(at_repo_root):
    result = invoke("graph", "--format", "dot", "specs/hope.nest")
    assert result.exit_code == 0
    assert result.stdout.startswith("digraph ")
    assert result.stdout.rstrip().endswith("}")
    assert '"mk" -> "mem"' in result.stdout
    assert result.stdout.count("{") == result.stdout.count("}")


def test_graph_json(at_repo_root):
    result = invoke("graph", "--format", "json", "specs/hope.nest")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["name"] == "specs/hope.nest"
    assert data["order"][0] == "outer"
    assert {n["id"] for n in data["nodes"]} == set(data["order"])
    assert {"source": "mk", "target": "mem", "kind": "generates", "label": "generates key"} in data["edges"]
    for node in data["nodes"]:
        assert re.fullmatch(r"\d+(/\d+)?", node["updates_per_token"])


def test_graph_mermaid(at_repo_root):
    result = invoke("graph", "--format", "mermaid", "specs/deltanet.nest")
    assert result.exit_code == 0
    assert result.stdout.startswith("flowchart TB\n")
    assert "|data|" in result.stdout


def test_graph_output_file(at_repo_root, tmp_path):
    target = tmp_path / "g.json"
    result = invoke("graph", "--format", "json", "-o", str(target), CLEAN_FILE)
    assert result.exit_code == 0
    assert result.stdout == ""
    assert json.loads(target.read_text())["order"][0] == "outer"
    assert not list(tmp_path.glob(".nestc-*"))  # no temporary file left behind


def test_graph_of_a_bad_spec_exits_1(at_repo_root):
    result = invoke("graph", "--color", "never", ERROR_FILE)
    assert result.exit_code == 1
    assert result.stdout == ""
    assert "error[" in result.stderr


def test_graph_png_without_graphviz_is_drawn_with_matplotlib(at_repo_root, monkeypatch, tmp_path):
    monkeypatch.setattr(shutil, "which", lambda *args, **kwargs: None)  # no `dot` on the PATH
    target = tmp_path / "g.png"
    result = invoke("graph", "--format", "png", "-o", str(target), "specs/hope.nest")
    assert result.exit_code == 0, result.stderr
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {target} (drawn with matplotlib" in result.stderr


@pytest.mark.parametrize("graphviz", [None, "/usr/bin/dot"])
def test_graph_png_without_an_output_file_says_so(graphviz, at_repo_root, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda *args, **kwargs: graphviz)
    result = invoke("graph", "--format", "png", CLEAN_FILE)
    assert result.exit_code == 2
    assert "Missing option '-o' / '--output'" in result.stderr and "Graphviz" not in result.stderr


def _fake_dot(tmp_path, exit_code: int):
    script = tmp_path / "dot"
    script.write_text(
        f"#!{sys.executable}\n"
        "import sys\n"
        "data = sys.stdin.read()\n"
        f"if {exit_code}:\n"
        "    sys.stderr.write('syntax error in line 1')\n"
        f"    sys.exit({exit_code})\n"
        "open(sys.argv[sys.argv.index('-o') + 1], 'w').write('PNG ' + data.split()[0])\n")
    script.chmod(0o755)
    return str(script)


def test_graph_png_with_graphviz(at_repo_root, monkeypatch, tmp_path):
    dot = _fake_dot(tmp_path, 0)
    monkeypatch.setattr(shutil, "which", lambda name, *args, **kwargs: dot if name == "dot" else None)
    target = tmp_path / "g.png"
    result = invoke("graph", "--format", "png", "-o", str(target), CLEAN_FILE)
    assert result.exit_code == 0, result.stderr
    assert target.read_text() == "PNG digraph"  # dot received the graph in DOT
    assert f"wrote {target}" in result.stderr


def test_graph_png_when_graphviz_fails(at_repo_root, monkeypatch, tmp_path):
    dot = _fake_dot(tmp_path, 1)
    monkeypatch.setattr(shutil, "which", lambda name, *args, **kwargs: dot if name == "dot" else None)
    result = invoke("graph", "--format", "png", "-o", str(tmp_path / "g.png"), CLEAN_FILE)
    assert result.exit_code == 1
    assert "graphviz failed: syntax error in line 1" in result.stderr


# --- fmt ------------------------------------------------------------------------------------------

UNFORMATTED = """\
# a level  with   odd spacing
level mixer:matrix{ # header comment
  key=x|>proj   |>silu   # key comment
    every   1
}
model {   vocab 256 ; dim 128
  block=mixer }
"""


def _comments(text):
    return Counter(line[line.index("#"):].rstrip() for line in text.splitlines() if "#" in line)


def test_fmt_check_then_fmt(tmp_path):
    path = tmp_path / "spec.nest"
    path.write_text(UNFORMATTED)
    result = invoke("fmt", "--check", str(path))
    assert result.exit_code == 1
    assert f"would reformat {path}" in result.stderr
    assert path.read_text() == UNFORMATTED  # --check changes nothing

    result = invoke("fmt", str(path))
    assert result.exit_code == 0
    assert f"reformatted {path}" in result.stderr
    formatted = path.read_text()
    assert formatted != UNFORMATTED
    assert re.search(r"^    key = x \|> proj \|> silu +# key comment$", formatted, re.M)
    assert _comments(formatted) == _comments(UNFORMATTED)

    result = invoke("fmt", "--check", str(path))
    assert result.exit_code == 0 and result.stderr == ""


def test_fmt_stdout_leaves_the_file_alone(tmp_path):
    path = tmp_path / "spec.nest"
    path.write_text(UNFORMATTED)
    result = invoke("fmt", "--stdout", str(path))
    assert result.exit_code == 0
    assert path.read_text() == UNFORMATTED
    assert result.stdout.startswith("# a level  with   odd spacing\nlevel mixer : matrix {")
    assert re.search(r"^level mixer : matrix \{ +# header comment$", result.stdout, re.M)


def test_fmt_keeps_comments_of_the_zoo(tmp_path):
    for spec in ZOO:
        path = tmp_path / spec.name
        shutil.copy(spec, path)
        assert invoke("fmt", str(path)).exit_code == 0
        assert _comments(path.read_text()) == _comments(spec.read_text()), spec.name


def test_fmt_syntax_error_exits_1_and_changes_nothing(tmp_path):
    path = tmp_path / "broken.nest"
    path.write_text("model {\n    dim 128\n")
    result = invoke("fmt", "--color", "never", str(path))
    assert result.exit_code == 1
    assert "error[N0012]" in result.stderr
    assert path.read_text() == "model {\n    dim 128\n"


# --- explain --------------------------------------------------------------------------------------

def test_explain_prints_the_page():
    result = invoke("explain", "N0110")
    assert result.exit_code == 0
    assert result.stdout.startswith("N0110: chunk size does not divide the training context\n")
    assert "every 16" in result.stdout


@pytest.mark.parametrize("spelling", ["n0110", "110", " N0110 "])
def test_explain_accepts_other_spellings(spelling):
    result = invoke("explain", spelling)
    assert result.exit_code == 0 and result.stdout.startswith("N0110:")


@pytest.mark.parametrize("code", ["N9999", "E0110", "banana"])
def test_explain_unknown_code_exits_2(code):
    result = invoke("explain", code)
    assert result.exit_code == 2
    assert "no diagnostic has the code" in result.stderr
    assert "N0110" in result.stderr  # lists the known codes


def _codes_used_in_source() -> set[str]:
    found = set()
    for path in (REPO / "nestc").rglob("*.py"):
        found |= set(re.findall(r"[\"'](N0\d{3})[\"']", path.read_text(encoding="utf-8")))
    return found


def test_every_code_used_in_nestc_has_an_explain_page():
    used = _codes_used_in_source()
    assert len(used) >= 30  # the grep really finds the codes
    missing = sorted(code for code in used if errors.page(code) is None)
    assert not missing, f"codes without an explain page: {missing}"
    for code in used:
        page = errors.page(code)
        assert page.startswith(f"{code}: ") and len(page.splitlines()) >= 2


def test_explain_lists_codes_in_order():
    assert errors.codes() == sorted(errors.codes())
    assert all(re.fullmatch(r"N0\d{3}", code) for code in errors.codes())


# --- the real entry point ---------------------------------------------------------------------------

def test_entry_point_exit_codes():
    assert run_nestc("check", "-q", CLEAN_FILE).returncode == 0
    failed = run_nestc("check", "--color", "never", ERROR_FILE)
    assert failed.returncode == 1 and "error[N0106]" in failed.stderr
    usage = run_nestc("check", "--bogus", CLEAN_FILE)
    assert usage.returncode == 2 and "No such option" in usage.stderr
    assert run_nestc("--version").stdout.startswith("nestc, version ")


def test_internal_errors_are_reported_not_raised(monkeypatch, capsys):
    """A bug in nestc exits 3 with a short message, never a traceback."""
    from nestc import cli as cli_module

    def explode(path):
        raise RuntimeError("boom")

    monkeypatch.setattr(cli_module, "_analyze", explode)
    monkeypatch.setattr(sys, "argv", ["nestc", "check", CLEAN_FILE])
    with pytest.raises(SystemExit) as exited:
        cli_module.main()
    assert exited.value.code == 3
    captured = capsys.readouterr()
    assert "internal compiler error: RuntimeError: boom" in captured.err
    assert "Traceback" not in captured.err


def test_compile_shows_every_stage(at_repo_root, tmp_path):
    plan = invoke("compile", "specs/hope.nest")
    assert plan.exit_code == 0
    assert "segment length 16 tokens\n" in plan.stdout  # hope's layers are coupled inside a segment
    assert ("segment length 64 tokens; layer by layer (each layer reads a whole call)"
            in invoke("compile", "specs/deltanet.nest").stdout)
    assert "mem          memory, layered form" in plan.stdout
    assert "cms_slow     continuum memory" in plan.stdout
    assert "memory       memory, trajectory form" in invoke("compile", "specs/moneta.nest").stdout
    vector = tmp_path / "vector.nest"
    for objective, plan_line in (("l2", "mem          memory, anchored form"),  # each channel a memory apart
                                 ("cosine", "mem          memory, sequential form (the anchored form takes per-head "
                                            "gates only)")):  # a norm over the channels couples them
        vector.write_text("level mem : vector {\n    key = x |> proj\n    value = x |> proj\n    query = x |> proj\n"
                          f"    retain = x |> proj(per=channel) |> sigmoid\n    objective {objective}\n    every 4\n}}\n"
                          "model {\n    vocab 9\n    dim 8\n    heads 2\n    block = residual(rmsnorm |> mem)\n}\n",
                          encoding="utf-8")
        assert plan_line in invoke("compile", str(vector)).stdout
    assert invoke("compile", "specs/deltanet.nest", "--emit", "ir").stdout.startswith("program specs/deltanet.nest")
    assert "LevelDef(name='mixer'" in invoke("compile", "specs/deltanet.nest", "--emit", "ast").stdout
    assert "edges:" in invoke("compile", "specs/deltanet.nest", "--emit", "graph").stdout
    assert invoke("compile", "specs/lib/hope.nest").exit_code == 2


def test_compile_prints_what_the_planning_pass_decided(at_repo_root):
    printed = invoke("compile", "specs/hope.nest", "--print-after", "plan")
    assert printed.exit_code == 0, printed.output
    assert "segment length 16 tokens\n" in printed.stdout and "  mem          layered\n" in printed.stdout
    unknown = invoke("compile", "specs/hope.nest", "--print-after", "plam")
    assert unknown.exit_code == 2 and "unknown pass `plam`; passes: plan, estimate, drop_dead" in unknown.output

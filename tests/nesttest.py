"""Helpers shared by the test modules (imported as `nesttest`; tests/ is on sys.path)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from nestc.lang.diagnostics import Diagnostic, render_all
from nestc.lang.sema import Result, analyze_source
from nestc.lang.source import SourceFile

REPO = Path(__file__).resolve().parent.parent
SPECS = REPO / "specs"
ZOO = sorted(SPECS.glob("*.nest")) + sorted((SPECS / "spaces").glob("*.nest"))
LIBRARY = sorted((SPECS / "lib").glob("*.nest"))

# A small, valid model section most snippets can append to their levels.
MODEL = """
model {
    vocab 256
    dim 128
    heads 4
    block = %s
}
"""


def analyze(text: str, name: str = "t.nest") -> Result:
    return analyze_source(SourceFile(name, text))


def spec(levels: str, block: str = "mixer", train: str = "") -> str:
    """Levels text + a model whose block is `block` + an optional train section."""
    return levels.rstrip("\n") + "\n" + MODEL % block + (("\n" + train) if train else "")


def codes(result: Result) -> list[str]:
    return [d.code for d in result.diagnostics]


def errors(result: Result) -> list[Diagnostic]:
    return [d for d in result.diagnostics if d.is_error]


def only(result: Result, code: str) -> Diagnostic:
    """The single diagnostic of `result`, which must have `code`."""
    assert codes(result) == [code], render(result)
    return result.diagnostics[0]


def render(result: Result) -> str:
    return render_all(result.diagnostics, result.sources, color=False)


def caret(rendered: str, line_number: int) -> tuple[int, int]:
    """(column, length) of the `^` run drawn under source line `line_number` in a rendering.

    The snippet layout is `NN | <source>` followed by `   | <marks>`; the column is counted in
    the source text, so it can be compared with a hand-computed 1-based column.
    """
    lines = rendered.split("\n")
    for index, text in enumerate(lines):
        match = re.match(r"^\s*(\d+) \| ", text)
        if match and int(match.group(1)) == line_number and index + 1 < len(lines):
            prefix = len(match.group(0))
            marks = lines[index + 1][prefix:]
            run = re.search(r"\^+", marks)
            if run:
                return run.start() + 1, len(run.group(0))
    raise AssertionError(f"no caret under line {line_number} in:\n{rendered}")


def cli_runner() -> CliRunner:
    """A runner that keeps stdout and stderr apart (click 8.1 needs mix_stderr=False)."""
    try:
        return CliRunner(mix_stderr=False)  # type: ignore[call-arg]
    except TypeError:
        return CliRunner()


def run_nestc(*args: str, cwd: Path = REPO, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the real entry point (`python -m nestc`, i.e. nestc.cli:main) in a subprocess."""
    return subprocess.run([sys.executable, "-m", "nestc", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


# A small Titans: a 2-layer MLP memory with momentum and forgetting, chunks of 4 tokens.
# `nestc run` settings that shrink a zoo spec to a run of seconds.
TINY_RUN = ("--set", "model.dim=16", "--set", "model.heads=2", "--set", "model.layers=1", "--set", "train.batch=2",
            "--set", "train.context=32")

SMALL_TITANS = """
level lmm : mlp(depth=2, expand=2) {
    key = x |> proj |> conv(4) |> silu |> l2norm
    value = x |> proj |> conv(4) |> silu
    query = x |> proj |> conv(4) |> silu |> l2norm
    lr = x |> proj |> sigmoid(max=0.1)
    momentum = x |> proj |> sigmoid
    retain = x |> proj |> sigmoid
    objective l2
    optimizer momentum
    every 4
    read before
    init meta
}
model {
    vocab 32
    dim 16
    heads 2
    layers 1
    block = residual(rmsnorm |> lmm)
}
"""

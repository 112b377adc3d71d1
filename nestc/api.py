"""The Python API: `nestc.load(spec) -> model`."""

from __future__ import annotations

import os

from nestc.lang.diagnostics import NestError
from nestc.lang.source import SourceFile

BACKENDS = ("reference", "compiled")


def check(spec: str):
    """Parse and check a spec given as a path or as text; returns the IR program.

    Raises `NestError` carrying every diagnostic when the spec has errors.
    """
    from nestc.lang.sema import analyze_file, analyze_source

    if "\n" not in spec and spec.endswith(".nest") and os.path.exists(spec):
        result = analyze_file(spec)
    elif "\n" not in spec and spec.endswith(".nest"):
        result = analyze_file(spec)  # reports the missing file as a diagnostic
    else:
        result = analyze_source(SourceFile("<spec>", spec))
    if not result.ok:
        raise NestError([d for d in result.diagnostics if d.is_error])
    return result.program


def load(spec: str, backend: str = "reference", compile: bool | str = False, graph: bool | list[str] = False,
         fuse: bool = True):
    """Build a runnable PyTorch model from a spec path (or spec text).

    `model(tokens, state=None) -> (logits, state)`: tokens are [batch, time] integers; `state`
    holds every level's state and continues a stream when passed back in. `backend="reference"`
    is the token-by-token oracle; `"compiled"` computes the same function a segment at a time.

    `compile=True` (compiled backend only) runs each segment through `torch.compile` (one graph
    per segment length, compiled on first use: the first call is slow); a string names another
    torch.compile backend instead of inductor (`"aot_eager"` traces without generating code). A
    model that cannot be traced as one graph (token-by-token levels, attention caches) warns
    with `CompileWarning` and runs without it.

    `graph=True` (compiled backend only) runs each segment as a torch.fx graph traced from the
    backend and rewritten by the default passes (backends/fx.py); a list names the passes to run.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; available: {', '.join(BACKENDS)}")
    if graph is not False and backend != "compiled":
        raise ValueError(f"graph={graph!r} needs backend='compiled', not {backend!r}")
    if compile and backend != "compiled":
        raise ValueError(f"compile={compile!r} needs backend='compiled', not {backend!r}: the reference backend "
                         "is the token-by-token oracle and is never compiled")
    program = check(spec)
    if backend == "compiled":
        from nestc.backends import compiled

        from nestc.backends.fx import DEFAULT_PASSES

        passes = None if graph is False else (DEFAULT_PASSES if graph is True else list(graph))
        return compiled.build(program, torch_compile=compile, graph_passes=passes, fuse=fuse)
    from nestc.backends import reference

    return reference.build(program)

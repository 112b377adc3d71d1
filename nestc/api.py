"""The Python API: `nestc.load(spec) -> model`, `nestc.layer(spec) -> nn.Module` on hidden states,
`nestc.load_run(run_dir) -> model`."""

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


def layer(spec, name: str | None = None, backend: str = "compiled", index: int = 0):
    """A spec's layers as a PyTorch layer on hidden states, to use inside your own model.

    `y, state = layer(x, state=None)`: x and y are [batch, time, dim], dim the spec's
    `model.dim`. Passing the returned state back in continues the stream, as the model's state
    does: its memories keep what they learnt (and keep learning) across calls, so two calls
    equal one call on their concatenation. Under `torch.no_grad()` the state comes back cut from
    the graph; when training over several calls, detach it (`state.detach()`) where the
    gradient should stop.

    `name=None` is the whole layer stack: every one of `layers`, the blocks between the
    embedding and the final norm and head (none of which it has); y is the last layer's output.
    `name="mixer"` is one level of the block as the block runs it: on the stream that reaches
    the level, everything the level owns (its projections, convolutions and gates, its memory's
    read, output norm, output gate and output projection) and nothing of the block around it
    (no norm before it, no residual around it). A level without a map of its own is refused
    with the reason: a continuum level, which learns from the model's next-token loss (so does
    a stack holding one), a level that only generates another level's inputs, the memory and
    attention of a memory-as-context block (take the whole stack). An unknown name lists the
    levels there are.

    `spec`: a spec path or text (fresh parameters, initialised as `nestc.load` does), a run
    directory, or a model from `nestc.load` / `nestc.load_run`, whose parameters are copied
    (a level's from the copy in layer `index`). The layer's parameters are named as in a
    model's state dict (`layers.<i>.levels.<level>....`). `backend` as in `nestc.load`: both give
    the same function; "compiled" computes it a segment at a time.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; available: {', '.join(BACKENDS)}")
    from nestc.backends.layer import build_layer
    from nestc.backends.reference import ReferenceModel

    if isinstance(spec, ReferenceModel):
        return build_layer(spec.program, name, backend, trained=spec, index=index)
    if not isinstance(spec, str):
        raise TypeError(f"nestc.layer takes a spec (a path or text), a run directory or a nestc model, "
                        f"not {type(spec).__name__}")
    if "\n" not in spec and os.path.isdir(spec):
        trained = load_run(spec, backend)
        return build_layer(trained.program, name, backend, trained=trained, index=index)
    return build_layer(check(spec), name, backend)


def load_run(run_directory: str, backend: str = "compiled"):
    """The trained model of a run directory (`nestc run`, `nestc.runtime.train`): its spec with the
    newest complete checkpoint's weights. Raises `CheckpointError` (no run, no checkpoint, an
    unreadable or mismatched one) or `NestError` (a spec that no longer checks)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; available: {', '.join(BACKENDS)}")
    from nestc.runtime.rundir import load_run as load_trained

    return load_trained(run_directory, backend)

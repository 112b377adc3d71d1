"""The `nestc` command line.

Exit codes: 0 clean, 1 diagnostics (errors in a spec), 2 usage (bad flags, missing files),
3 internal compiler error (a bug in nestc: reported as such, never as a bare traceback).
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import tempfile

import click

from nestc import __version__
from nestc.lang.diagnostics import render_all, to_json
from nestc.lang.source import SourceMap


EXIT_DIAGNOSTICS = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3


def _exit_code(result) -> int:
    """0 clean; 2 when the file itself could not be read (a usage error); 1 for diagnostics."""
    if result.ok:
        return 0
    if any(d.code == "N0100" for d in result.diagnostics):
        return EXIT_USAGE
    return EXIT_DIAGNOSTICS


def _use_color(choice: str, stream=None) -> bool:
    if choice == "always":
        return True
    if choice == "never" or os.environ.get("NO_COLOR"):
        return False
    stream = stream or sys.stderr
    return hasattr(stream, "isatty") and stream.isatty()


_error_format = click.option("--error-format", type=click.Choice(["human", "json"]), default="human",
                             show_default=True, help="How diagnostics are printed.")
_color = click.option("--color", type=click.Choice(["auto", "always", "never"]), default="auto",
                      show_default=True, help="Colour diagnostics.")


def _report(diagnostics, sources: SourceMap, error_format: str, color: str) -> None:
    if not diagnostics:
        return
    if error_format == "json":
        click.echo(to_json(diagnostics), err=True)
    else:
        use_color = _use_color(color)
        # click strips colour codes when stderr is not a terminal unless told otherwise
        click.echo(render_all(diagnostics, sources, use_color), err=True, color=use_color)


def _analyze(path: str):
    from nestc.lang.sema import analyze_file

    return analyze_file(path)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="nestc")
def cli() -> None:
    """nestc: compile nested-learning specs (.nest) into level graphs and PyTorch models."""


@cli.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@_error_format
@_color
@click.option("--quiet", "-q", is_flag=True, help="Print nothing for files that check clean.")
def check(files, error_format, color, quiet) -> None:
    """Check spec FILES and report every problem found."""
    all_diagnostics = []
    status = 0
    for path in files:
        result = _analyze(path)
        status = max(status, _exit_code(result))
        if error_format == "json":
            all_diagnostics.extend(result.diagnostics)
        else:
            _report(result.diagnostics, result.sources, error_format, color)
        if result.ok and not quiet and error_format == "human":
            program = result.program
            summary = f"{len(program.levels)} level{'s' if len(program.levels) != 1 else ''}"
            click.echo(f"ok: {path} ({summary})")
    if error_format == "json":
        click.echo(to_json(all_diagnostics))
    sys.exit(status)


@cli.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(["text", "dot", "json", "mermaid", "png"]), default="text",
              show_default=True, help="Output format.")
@click.option("--output", "-o", type=click.Path(dir_okay=False),
              help="Write to this file (required for png: laid out by Graphviz's `dot` when installed, else "
                   "drawn by matplotlib).")
@_error_format
@_color
def graph(file, fmt, output, error_format, color) -> None:
    """Show the level graph of a spec, levels from slowest to fastest."""
    from nestc import graph as level_graph

    if fmt == "png" and not output:
        raise click.MissingParameter("--format png writes an image file: say where with -o FILE.png",
                                     param_hint="'-o' / '--output'", param_type="option")
    result = _analyze(file)
    _report(result.diagnostics, result.sources, error_format, color)
    if not result.ok:
        sys.exit(_exit_code(result))
    built = level_graph.build(result.program)
    if fmt == "png":
        _write_png(built, output)
        return
    render = {"text": level_graph.to_text, "dot": level_graph.to_dot, "json": level_graph.to_json,
              "mermaid": level_graph.to_mermaid}[fmt]
    text = render(built)
    if output:
        _write_atomically(output, text)
        click.echo(f"wrote {output}", err=True)
    else:
        click.echo(text, nl=False)


def _write_png(built, output: str) -> None:
    """Graphviz's `dot` lays the graph out when it is installed; else networkx and matplotlib draw it."""
    from nestc import graph as level_graph

    dot = shutil.which("dot")
    if dot is None:
        try:
            level_graph.draw_png(built, output)
        except OSError as error:
            raise click.ClickException(f"cannot write `{output}`: {error.strerror or error}") from None
        click.echo(f"wrote {output} (drawn with matplotlib: Graphviz's `dot` is not installed, and lays larger "
                   "graphs out better)", err=True)
        return
    completed = subprocess.run([dot, "-Tpng", "-o", output], input=level_graph.to_dot(built).encode(),
                               capture_output=True)
    if completed.returncode != 0:
        raise click.ClickException(f"graphviz failed: {completed.stderr.decode(errors='replace').strip()}") from None
    click.echo(f"wrote {output}", err=True)


def _write_atomically(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=".nestc-", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
        if os.path.exists(path):
            shutil.copymode(path, temporary)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


@cli.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--check", "check_only", is_flag=True, help="Change nothing; exit 1 if a file is not formatted.")
@click.option("--stdout", "to_stdout", is_flag=True, help="Print the formatted text instead of rewriting files.")
@_error_format
@_color
def fmt(files, check_only, to_stdout, error_format, color) -> None:
    """Format spec FILES in the canonical style (in place by default)."""
    from nestc.lang import formatter, syntax
    from nestc.lang.diagnostics import NestError
    from nestc.lang.source import SourceFile

    status = 0
    for path in files:
        try:
            with open(path, encoding="utf-8") as handle:
                source = SourceFile(path, handle.read())
        except (OSError, UnicodeDecodeError) as error:
            raise click.UsageError(f"cannot read `{path}`: {getattr(error, 'strerror', None) or error}") from None
        sources = SourceMap()
        sources.add(source)
        try:
            module = syntax.parse(source)
        except NestError as error:
            _report(error.diagnostics, sources, error_format, color)
            status = EXIT_DIAGNOSTICS
            continue
        text = formatter.format_module(module)
        if to_stdout:
            click.echo(text, nl=False)
        elif text != source.text:
            if check_only:
                click.echo(f"would reformat {path}", err=True)
                status = EXIT_DIAGNOSTICS
            else:
                _write_atomically(path, text)
                click.echo(f"reformatted {path}", err=True)
    sys.exit(status)


_task = click.option("--task", type=click.Choice(["mqar", "parity", "aa_star", "abab_star", "anbn", "anbncn",
                                                   "shuffle2", "niah"]),
                     help="Train on a generated task instead of the corpus; held-out accuracy at the training "
                          "lengths and, apart, on longer examples where the task has them (docs/runs.md).")
_task_options = click.option("--task-option", "task_options", multiple=True, metavar="KEY=N",
                             help="A task setting, e.g. --task-option pairs=16 (mqar: pairs, keys, values).")


def _threads_option(what: str):
    return click.option("--threads", type=click.IntRange(min=1), metavar="N",
                        help=f"torch's intra-op threads {what} (default: $OMP_NUM_THREADS if set, else 1: on a "
                             "2-core machine with other work running, 2 threads made a step of hope.nest many "
                             "times slower than 1; docs/benchmarks.md, \"Threads\").")


def _thread_count(threads: int | None) -> int:
    """--threads, else OMP_NUM_THREADS when it is a plain count, else 1 (docs/benchmarks.md)."""
    if threads is not None:
        return threads
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else 1


def _parse_task_options(task: str | None, task_options: tuple[str, ...]) -> dict[str, int]:
    options = {}
    for option in task_options:
        key, _, value = option.partition("=")
        if not task or not value.strip().isdigit():
            raise click.UsageError(f"--task-option {option}: expected KEY=N after a --task")
        options[key.strip()] = int(value)
    return options


@cli.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--steps", type=click.IntRange(min=1), help="Optimizer steps (default: the spec's `train { steps }`).")
@click.option("--set", "assignments", multiple=True, metavar="PATH=VALUE",
              help="Change a field, e.g. --set train.batch=4 --set level.mixer.every=16 (repeatable).")
@click.option("--backend", type=click.Choice(["compiled", "reference"]), default="compiled", show_default=True)
@click.option("--resume", is_flag=True, help="Continue from the run directory's last complete checkpoint.")
@click.option("--overwrite", is_flag=True, help="Start over in a run directory that holds an earlier run.")
@click.option("--checkpoint-every", type=click.IntRange(min=0), metavar="N",
              help="Checkpoint every N steps (0: not by step count; default: the spec's train.checkpoint_every).")
@click.option("--checkpoint-minutes", type=click.FloatRange(min=0), metavar="M",
              help="Checkpoint every M minutes (0: not by time; default: the spec's train.checkpoint_minutes).")
@click.option("--runs", default="runs", show_default=True, type=click.Path(file_okay=False),
              help="Where run directories are created.")
@click.option("--eval-every", type=click.IntRange(min=1), help="Evaluate every N steps (default: 5 times a run).")
@_task
@_task_options
@click.option("--data", "data_paths", multiple=True, metavar="PATH",
              help="Train on these text files, globs or directories instead of the embedded corpus (repeatable); "
                   "or on one token file (FILE.bin or FILE.u16.bin: uint16 ids, FILE.u32.bin: uint32), or on "
                   "one Hugging Face dataset, streamed: hf:NAME_OR_PATH[:[CONFIG/]SPLIT[:COLUMN]] "
                   "(default split train, column text; needs nestc[data]).")
@click.option("--nproc", type=click.IntRange(min=1),
              help="Data-parallel processes (torch.distributed, gloo); the batch is split among them "
                   "(default: the spec's train.processes).")
@click.option("--tokenizer", type=click.Path(dir_okay=False),
              help="A `tokenizers` JSON file: train on its token ids instead of bytes.")
@click.option("--seed", type=int, help="Seed of initialisation and data order (default: the spec's train seed).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--bf16", is_flag=True,
              help="bfloat16 autocast of the training steps, on a CPU as on a GPU (evaluation stays float32).")
@click.option("--compile", "torch_compile", is_flag=True,
              help="Run each segment through torch.compile (the first steps pay the compile).")
@click.option("--graph", is_flag=True, help="Run each segment through the traced and rewritten fx graph.")
@_threads_option("in each training process")
@click.option("--track", multiple=True, type=click.Choice(["tensorboard", "wandb", "mlflow"]),
              help="Also log the metrics (and, at the end, the settings with the final scores) to TensorBoard, "
                   "Weights & Biases or MLflow (repeatable); metrics.jsonl is written either way.")
@click.option("--tensorboard-dir", type=click.Path(file_okay=False),
              help="Where --track tensorboard writes its event files (default: RUN/tensorboard).")
@_color
def run(spec, steps, assignments, backend, resume, overwrite, checkpoint_every, checkpoint_minutes, runs, eval_every,
        task, task_options, data_paths, nproc, tokenizer, seed, device, bf16, torch_compile, graph, threads,
        track, tensorboard_dir, color) -> None:
    """Train a spec's model on the embedded default corpus (CPython's own documentation, bytes)."""
    import warnings

    from nestc.runtime import data, tracking
    from nestc.lang import overrides

    if tensorboard_dir and "tensorboard" not in track:
        raise click.UsageError("--tensorboard-dir says where --track tensorboard writes: give --track tensorboard")
    for kind in track:  # a missing library stops the run before anything is built
        try:
            tracking.require(kind)
        except tracking.TrackingError as error:
            raise click.UsageError(str(error)) from None

    if device != "cpu":
        import torch

        if not device.startswith("cuda") or not torch.cuda.is_available():
            raise click.UsageError(f"--device {device}: " + ("CUDA is not available on this machine"
                                                             if device.startswith("cuda") else "use cpu or cuda"))
    options = _parse_task_options(task, task_options)
    threads = _thread_count(threads)
    if (torch_compile or graph) and backend != "compiled":
        raise click.UsageError(f"--{'compile' if torch_compile else 'graph'} needs --backend compiled: the reference "
                               "backend is the token-by-token oracle")
    if data_paths and task:
        raise click.UsageError("--data and --task are alternatives: give one")
    from nestc.lang.sema import analyze_source, read_source

    try:
        source = read_source(spec)
    except (OSError, UnicodeDecodeError) as error:
        raise click.UsageError(f"cannot read `{spec}`: {getattr(error, 'strerror', None) or error}") from None
    if resume and overwrite:
        raise click.UsageError("--resume continues a run and --overwrite starts it over: give one")
    for field, value in (("seed", seed), ("checkpoint_every", checkpoint_every),
                         ("checkpoint_minutes", checkpoint_minutes), ("processes", nproc)):
        if value is not None:
            assignments = (*assignments, f"train.{field}={value}")
    try:
        overridden = overrides.apply(source, list(assignments))
    except overrides.OverrideError as error:
        raise click.UsageError(str(error)) from None
    result = analyze_source(overridden.main, replaced_imports=overridden.imported)
    _report(overridden.relocate(result.diagnostics, result.sources), result.sources, "human", color)
    if not result.ok:
        sys.exit(EXIT_DIAGNOSTICS)
    if result.program.model is None:
        raise click.UsageError(f"`{spec}` has no `model` section: nothing to train")
    corpus = None
    if data_paths:
        settings = result.program.train
        try:  # a streamed dataset is read as far as the run's steps reach
            corpus = data.load(list(data_paths), data.bytes_for(steps or settings.steps, settings.batch,
                                                                settings.context))
        except data.DataError as error:
            raise click.UsageError(str(error)) from None
    nproc = result.program.train.processes
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        if result.program.train.batch % nproc:
            raise click.UsageError(f"the batch ({result.program.train.batch}) must divide evenly among {nproc} "
                                   "processes: change --nproc or --set train.batch=...")
        arguments = [spec, "--backend", backend, "--runs", runs]
        arguments += [a for assignment in assignments for a in ("--set", assignment)]
        arguments += [a for path in data_paths for a in ("--data", path)]
        for flag, value in (("--steps", steps), ("--eval-every", eval_every), ("--task", task)):
            if value is not None:
                arguments += [flag, str(value)]
        arguments += [a for option in task_options for a in ("--task-option", option)]
        arguments += (["--resume"] if resume else []) + (["--overwrite"] if overwrite else [])
        arguments += ["--device", device, "--threads", str(threads)] + (["--bf16"] if bf16 else [])
        arguments += (["--compile"] if torch_compile else []) + (["--graph"] if graph else [])
        arguments += ["--tokenizer", tokenizer] if tokenizer else []
        arguments += [a for kind in track for a in ("--track", kind)]
        arguments += ["--tensorboard-dir", tensorboard_dir] if tensorboard_dir else []
        from nestc.runtime import distributed

        sys.exit(distributed.launch(nproc, arguments))
    from nestc.backends.common import BackendError
    from nestc.backends.compiled import CompileWarning
    from nestc.runtime.checkpoint import CheckpointError, bundle
    from nestc.runtime.config import RunConfig
    from nestc.runtime.distributed import SetupFailed
    from nestc.runtime.train import TrainingDiverged, train

    config = RunConfig(steps=steps, backend=backend, runs=runs, resume=resume, overwrite=overwrite,
                       eval_every=eval_every, task=task, task_options=options, tokenizer=tokenizer, device=device,
                       bf16=bf16, compile=torch_compile, graph=graph, threads=threads, track=track,
                       tensorboard_dir=tensorboard_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CompileWarning)
        try:
            outcome = train(result.program, bundle(result), config, corpus=corpus,
                            log=lambda message: click.echo(message, err=True))
        except (BackendError, TrainingDiverged, CheckpointError, SetupFailed, tracking.TrackingError) as error:
            raise click.ClickException(str(error)) from None
        except OSError as error:  # the run directory: a full disk, no permission ...
            raise click.ClickException(f"cannot write the run under `{runs}`: {error}") from None
        except ValueError as error:  # a batch that does not split, a tokenizer that does not fit
            raise click.UsageError(str(error)) from None
    for warning in caught:
        click.echo(f"note: {warning.message}", err=True)
    sys.exit(130 if outcome.interrupted else 0)


@cli.command(name="compile")
@click.argument("spec", metavar="SPEC|RUN_DIR", type=click.Path(), required=False)
@click.option("--emit", type=click.Choice(["ast", "ir", "graph", "plan", "fx", "py"]), default=None,
              help="The stage to print: the syntax tree, the checked IR, the level graph, the compiled backend's "
                   "plan (each memory's kernel and the segment length), the traced segment step after the passes "
                   "(fx), or the standalone module (py). Default: plan, or nothing with -o.")
@click.option("-o", "--output", type=click.Path(file_okay=False),
              help="Write a standalone model (model.py and weights.pt, needing only torch; any batch size, any "
                   "length) to this directory: a spec's with seeded weights, a run directory's with its trained ones.")
@click.option("--passes", help="The graph passes to run, in order, comma-separated; empty for none (default: "
                                "drop_dead,fold_constants,fuse_projections).")
@click.option("--print-after", "print_after", multiple=True, metavar="PASS",
              help="Print what an IR pass decided (plan), or the fx graph after a graph pass (repeatable).")
@click.option("--batch", type=click.IntRange(min=1), default=None,
              help="The batch size of the graph --emit fx prints (default 1); the standalone module takes any.")
@click.option("--seed", type=int, default=None, help="Seed of a spec's standalone model's initial weights (default 0).")
@click.option("--no-fuse", "fuse", flag_value=False, default=None,
              help="Plan without horizontal fusion: every memory level runs as its own call.")
@click.option("--run", "run_option", hidden=True, help="Refused: the run directory is the argument.")
@_color
def compile_spec(spec, emit, output, passes, print_after, batch, seed, fuse, run_option, color) -> None:
    """Show what a spec compiles to, stage by stage, or write it as standalone PyTorch (-o DIR).
    Given a run directory (what `nestc run` wrote), -o DIR exports its trained model."""
    import warnings

    if run_option is not None:
        raise click.UsageError(f"the run directory is the argument: `nestc compile {run_option} -o DIR`")
    if spec is None:  # optional only so that a misplaced --run gets the line above
        raise click.UsageError("Missing argument 'SPEC|RUN_DIR'.")
    standalone = bool(output) or emit == "py"
    if batch is not None and standalone:
        raise click.UsageError("--batch picks the batch of the graph --emit fx prints; the standalone module "
                               "(-o, --emit py) runs any batch size")
    if os.path.isdir(spec):
        _export_run(spec, emit, output, passes, print_after, batch or 1, seed, fuse)
        return
    fuse = fuse is not False
    result = _analyze(spec)
    _report(result.diagnostics, result.sources, "human", color)
    if not result.ok:
        sys.exit(_exit_code(result))
    program = result.program
    from nestc.lang import ir

    if ir.contains_search(program) and (emit not in ("ast", "ir", "graph") or output or print_after):
        raise click.UsageError(f"`{spec}` is a search space: freeze it to one variant first "
                               "(`nestc sweep SPEC --dry-run` lists the variants)")
    from nestc.passes import PASSES

    ir_passes = [name for name in print_after if name in PASSES]
    if ir_passes != list(print_after):  # graph passes: their names come with torch
        from nestc.backends import fx

        unknown = [name for name in print_after if name not in PASSES and name not in fx.PASSES]
        if unknown:
            raise click.UsageError(f"unknown pass `{unknown[0]}`; passes: {', '.join([*PASSES, *fx.PASSES])}")
    for name in ir_passes:
        if program.model is None:
            raise click.UsageError(f"`{spec}` has no `model` section: nothing to plan")
        click.echo(f"--- after {name}: {PASSES[name].doc}")
        click.echo(str(PASSES[name].run(program, fuse=fuse) if name == "plan" else PASSES[name].run(program)))
    print_after = tuple(name for name in print_after if name not in PASSES)
    if ir_passes and not print_after and emit is None and output is None:
        return
    emit = emit or ("plan" if output is None and not print_after else None)
    if output or print_after or emit in ("fx", "py"):
        import torch

        from nestc.backends import compiled
        from nestc.backends.common import BackendError

        if program.model is None:
            raise click.UsageError(f"`{spec}` has no `model` section: nothing to compile")
        torch.manual_seed(0 if seed is None else seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", compiled.CompileWarning)
            try:
                model = compiled.build(program, fuse=fuse)
            except BackendError as error:
                raise click.ClickException(str(error)) from None
        weights_from = f"initial weights drawn with seed {0 if seed is None else seed}"
        _emit_traced(model, spec, emit, output, passes, print_after, batch or 1, weights_from)
        return
    if passes is not None:
        raise click.UsageError("--passes rewrites the traced graph: use it with --emit fx, --emit py or -o")
    if emit == "ast":
        for item in result.modules[program.file].items:
            click.echo(repr(item))
    elif emit == "ir":
        click.echo(ir.dump(program), nl=False)
    elif emit == "graph":
        from nestc import graph as level_graph

        click.echo(level_graph.to_text(level_graph.build(program)), nl=False)
    else:
        if program.model is None:
            raise click.UsageError(f"`{spec}` has no `model` section: nothing to compile")
        from nestc.backends import compiled
        from nestc.backends.common import BackendError
        from nestc.graph import layer_groups
        from nestc.passes.estimate import format_bytes

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", compiled.CompileWarning)
            try:
                model = compiled.build(program, fuse=fuse)
            except BackendError as error:  # a model too large for this machine, a width that does not split
                raise click.ClickException(str(error)) from None
        schedule = "; layer by layer (each layer reads a whole call)" if model.layer_by_layer and not model.fallback else ""
        click.echo(f"segment length {model.segment} tokens" + (f"; {model.fallback}" if model.fallback else schedule))
        for group in layer_groups(program):
            click.echo(f"  layers {group['layers']}: {', '.join(group['levels'])}")
        from nestc.backends.reference import CacheLevel

        for name, plan in model.plans.items():
            level = model.level_modules()[name]
            if plan.kernel != "module":
                kind = f"memory, {plan.kernel} form"
            elif isinstance(level, CacheLevel):
                kind = "attention, one masked softmax per segment"
            else:
                kind = "continuum memory, steps between segments" if level.every else "feed-forward block"
            click.echo(f"  {name:12s} {kind}" + (f" ({plan.reason})" if plan.reason else ""))
        for group in model.fused:
            click.echo(f"  fused: {group}")
        found = PASSES["estimate"].run(program)
        click.echo(f"{found.parameters:,} parameters ({format_bytes(found.parameter_bytes)}); a training step needs "
                   f"about {format_bytes(found.training_bytes)} (an estimate: `--print-after estimate` itemises it)")
        for warning in caught:
            click.echo(f"note: {warning.message}", err=True)


def _export_run(run_directory: str, emit: str | None, output: str | None, passes: str | None, print_after,
                batch: int, seed: int | None, fuse: bool | None) -> None:
    """`nestc compile RUN_DIR -o DIR`: the run's trained model as a standalone module."""
    from nestc.passes import PASSES

    spec_stage = f"--emit {emit}" if emit not in (None, "fx", "py") else \
        next((f"--print-after {name}" for name in print_after if name in PASSES), None)
    if spec_stage:
        raise click.UsageError(f"`{run_directory}` is a run directory: {spec_stage} reads a spec "
                               f"(the run's is `{os.path.join(run_directory, 'spec.nest')}`)")
    if not (output or emit):
        raise click.UsageError(f"`{run_directory}` is a run directory: export its trained model with -o DIR "
                               "(or print it with --emit py)")
    if seed is not None or fuse is not None:
        raise click.UsageError(f"--{'seed' if seed is not None else 'no-fuse'} shapes a spec's model; a run "
                               "directory's is the one it trained")
    from nestc.runtime.rundir import latest

    model, _ = _load_run(run_directory, None)
    found = latest(run_directory)  # the checkpoint whose weights the model holds, named in the module
    _emit_traced(model, run_directory, emit, output, passes, print_after, batch,
                 f"the weights `nestc run` trained, {os.path.relpath(found.directory, run_directory)}")


def _emit_traced(model, spec: str, emit: str | None, output: str | None, passes: str | None, print_after,
                 batch: int, weights_from: str) -> None:
    """The fx stages of `nestc compile`: trace the segment step, run the passes, print or write.
    The standalone module (--emit py, -o) is traced with a symbolic batch and length; the graph
    printed alone (--emit fx, --print-after) at `batch` sequences of a whole segment."""
    import warnings

    from nestc.lang import ir
    from nestc.backends import compiled, fx
    from nestc.backends.common import BackendError

    passes = list(fx.DEFAULT_PASSES) if passes is None else [p.strip() for p in passes.split(",") if p.strip()]
    unknown = [p for p in [*passes, *print_after] if p not in fx.PASSES]
    if unknown:
        raise click.UsageError(f"unknown pass `{unknown[0]}`; passes: {', '.join(fx.PASSES)}")
    skipped = [p for p in print_after if p not in passes]
    if skipped:
        raise click.UsageError(f"--print-after {skipped[0]}: that pass is not in --passes")
    standalone = bool(output) or emit == "py"
    variant = ir.variant_id(model.program)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", compiled.CompileWarning)
            # An example batch of 2: a size of 1 would be fixed in the graph, not a symbol.
            graph = fx.trace_segment(model, 2 if standalone else batch, model.segment, symbolic=standalone)
        changes = fx.run_passes(graph, passes, print_after, out=click.echo)
        click.echo("passes: " + (", ".join(f"{name} {count}" for name, count in changes.items()) or "none")
                   + f"; {graph.op_count()} operations", err=True)
        if emit == "fx":
            click.echo(fx.readable(graph))
        if emit == "py":
            click.echo(fx.standalone(model, graph, spec, variant, weights_from)[0])
        if output:
            for path in fx.write_standalone(model, graph, spec, variant, weights_from, output):
                click.echo(f"wrote {path}", err=True)
    except BackendError as error:
        raise click.ClickException(str(error)) from None
    except OSError as error:
        raise click.ClickException(f"cannot write `{output}`: {error}") from None


def _load_run(run_directory: str, state_in: str | None):
    """A trained model and, optionally, a saved memory state; bad files are usage errors."""
    from nestc.backends.common import BackendError
    from nestc.lang.diagnostics import NestError
    from nestc.runtime.checkpoint import CheckpointError, load_state
    from nestc.runtime.rundir import load_run

    try:
        model = load_run(run_directory)
        state = load_state(state_in, model) if state_in else None
    except CheckpointError as error:
        raise click.UsageError(str(error)) from None
    except BackendError as error:  # the saved spec's model is too large for this machine
        raise click.ClickException(str(error)) from None
    except NestError as error:
        raise click.ClickException(f"the spec saved in `{run_directory}` does not check: {error}") from None
    return model, state


def _codec(run_directory: str):
    """How a run's text becomes the symbols its model reads, and back, and their name: bytes, or
    the token ids of the tokenizer it trained with (saved in the run directory)."""
    from nestc.runtime.data import DataError, token_numbers
    from nestc.runtime.rundir import run_tokenizer

    try:
        tokenizer = run_tokenizer(run_directory)
    except DataError as error:
        raise click.ClickException(f"the tokenizer saved in `{run_directory}`: {error}") from None
    if tokenizer is None:  # ids above 255 come from a token file's run: written as numbers
        return bytes, lambda symbols: symbols if isinstance(symbols, bytes) else token_numbers(symbols), "byte"
    return (lambda text: tokenizer.encode(text.decode("utf-8", "replace")).ids,
            lambda ids: tokenizer.decode(list(ids)).encode("utf-8"), "token")


def _read_text_file(path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as error:
        raise click.UsageError(f"cannot read `{path}`: {error.strerror}") from None


def _save_state(state, path: str | None) -> None:
    if path:
        from safetensors import SafetensorError

        from nestc.runtime.checkpoint import CheckpointError, save_state

        try:
            save_state(state, path)
        except (SafetensorError, OSError) as error:
            raise click.ClickException(f"cannot write the state to `{path}`: {error}") from None
        except CheckpointError as error:
            raise click.ClickException(str(error)) from None
        click.echo(f"state saved to {path} (position {state.position})", err=True)


_run_argument = click.argument("run_directory", metavar="RUN", type=click.Path(file_okay=False))
_state_in = click.option("--state-in", type=click.Path(dir_okay=False), help="Start from this saved memory state.")
_state_out = click.option("--state-out", type=click.Path(dir_okay=False), help="Save the memory state here.")


@cli.command()
@_run_argument
@click.option("--prompt", default="", help="Text to read before writing.")
@click.option("--length", type=click.IntRange(min=1), default=200, show_default=True,
              help="Symbols to write: bytes, or tokens for a run trained with --tokenizer.")
@click.option("--temperature", type=click.FloatRange(min=0.01), default=0.8, show_default=True,
              help="Divides the logits: below 1 sharpens the distribution, above 1 flattens it.")
@click.option("--top-k", type=click.IntRange(min=1), metavar="K", help="Draw only from the K most likely symbols.")
@click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), metavar="P",
              help="Draw only from the smallest set of most likely symbols whose probability reaches P "
                   "(nucleus sampling; after --top-k when both are given).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the draws: the same seed, the same text.")
@_state_in
@_state_out
@_threads_option("while it writes")
def generate(run_directory, prompt, length, temperature, top_k, top_p, seed, state_in, state_out, threads) -> None:
    """Write text with a trained run's model; its memories keep learning while it reads and writes.
    `--top-k 1` is greedy decoding."""
    from nestc.runtime.train import intra_op_threads, sample

    model, state = _load_run(run_directory, state_in)
    encode, decode, _ = _codec(run_directory)
    # no prompt: a newline (for a tokenizer that makes no token of it, token id 0)
    symbols = encode(prompt.encode("utf-8") or b"\n") or [0]
    with intra_op_threads(_thread_count(threads)):
        written, state = sample(model, symbols, length, temperature, seed, state, top_k=top_k, top_p=top_p)
    click.echo(decode(written).decode("utf-8", "replace"))
    _save_state(state, state_out)


@cli.command()
@_run_argument
@click.argument("file", type=click.Path(dir_okay=False))
@_state_in
@_state_out
@_threads_option("while it reads")
def memorize(run_directory, file, state_in, state_out, threads) -> None:
    """Read FILE with a trained run's model (its memories learn it) and save the state."""
    from nestc.runtime.train import intra_op_threads, read

    model, state = _load_run(run_directory, state_in)
    encode, _, unit = _codec(run_directory)
    with intra_op_threads(_thread_count(threads)):
        bits, state = read(model, encode(_read_text_file(file)), state)
    click.echo(f"read {file}: {bits:.3f} bits/{unit} while reading")
    _save_state(state, state_out)


@cli.command(name="eval")
@_run_argument
@click.argument("file", type=click.Path(dir_okay=False))
@_state_in
@_threads_option("while it reads")
def evaluate_file(run_directory, file, state_in, threads) -> None:
    """Bits per byte (per token with a tokenizer) of a trained run's model on FILE (from a saved
    state with --state-in)."""
    from nestc.runtime.train import intra_op_threads, read

    model, state = _load_run(run_directory, state_in)
    encode, _, unit = _codec(run_directory)
    with intra_op_threads(_thread_count(threads)):
        bits, _ = read(model, encode(_read_text_file(file)), state)
    click.echo(f"{file}: {bits:.3f} bits/{unit}" + (f" (state from {state_in})" if state_in else ""))


@cli.command()
@click.argument("code")
def explain(code) -> None:
    """Explain a diagnostic code, e.g. `nestc explain N0110`."""
    from nestc.lang import errors

    page = errors.page(code)
    if page is None:
        raise click.UsageError(f"no diagnostic has the code `{code}`; codes look like N0110 "
                               f"(known: {', '.join(errors.codes())})")
    click.echo(page)


def main() -> None:
    try:
        cli(standalone_mode=False)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)
    except SystemExit:
        raise
    except Exception as error:  # noqa: BLE001 - a last line of defence against tracebacks
        click.echo(f"internal compiler error: {type(error).__name__}: {error}\n"
                   "  this is a bug in nestc, not in your spec; please report it with the spec that caused it",
                   err=True)
        sys.exit(EXIT_INTERNAL)


# `nestc sweep` lives in nestc/cli_sweep.py, which registers it on `cli` when imported (last: it
# reads the helpers above).
importlib.import_module("nestc.cli_sweep")

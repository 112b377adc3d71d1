"""`nestc sweep`: train and rank the variants of search spaces (nestc/search/), or list them.

It registers itself on nestc/cli.py's `cli` group (cli.py imports it last), whose option decorators
and diagnostic helpers it uses.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

import click

from nestc.cli import (EXIT_DIAGNOSTICS, _analyze, _color, _parse_task_options, _report, _task, _task_options,
                       _use_color, cli)
from nestc.lang.diagnostics import render_all
from nestc.lang.source import SourceMap

if TYPE_CHECKING:  # the sweep's modules load only when a sweep trains
    from nestc.search.study import SweepConfig

SEARCH_VALUE_ERRORS = ("N0114", "N0119")  # a search value where none may stand; an invalid choice or range


@cli.command()
@click.argument("specs", metavar="SPACES...", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--dry-run", is_flag=True, help="List the variants without training them.")
@click.option("--sample", type=click.IntRange(min=1), help="With --dry-run: list a seeded sample of this many variants.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the sample, or of the sampler (each trial's sampler is seeded by it and the trial's number).")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option("--trials", type=click.IntRange(min=1), help="Variants to train (the study's total: a rerun resumes).")
@click.option("--steps", type=click.IntRange(min=1), help="Training steps per variant (default: the spec's).")
@_task
@_task_options
@click.option("--sampler", type=click.Choice(["tpe", "random", "grid"]), default="tpe", show_default=True,
              help="How variants are drawn: Optuna's TPE, uniformly at random, or the grid in order.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Local worker processes sharing the study (the cores are divided among them).")
@click.option("--storage", metavar="URL", help="An SQLAlchemy database URL shared by workers on several machines "
                                               "(default: SQLite under the sweep's directory).")
@click.option("--study", "study_name", help="The study's name (default: the space's file name and the task); "
                                             "one space only.")
@click.option("--runs", default="runs", show_default=True, type=click.Path(file_okay=False),
              help="Where the sweep's directory is created.")
@click.option("--eval-every", type=click.IntRange(min=1), help="Evaluate (and maybe prune) every N steps.")
@click.option("--no-prune", is_flag=True, help="Train every variant to the end (no median pruning).")
@_color
def sweep(specs, dry_run, sample, seed, fmt, trials, steps, task, task_options, sampler, workers, storage,
          study_name, runs, eval_every, no_prune, color) -> None:
    """Train and rank the variants of search SPACES, or list them with --dry-run. Several spaces are
    swept one after the other, each in a study (and directory) of its own, named after its file."""
    import json

    for spec in specs:
        if not os.path.isfile(spec):
            raise click.UsageError(f"cannot read `{spec}`: no such file") from None
    if len(specs) > 1:
        if study_name:
            raise click.UsageError("--study names one study, but each of several spaces has its own (named after "
                                   "its file): sweep a space alone to name its study")
        stems = [os.path.splitext(os.path.basename(spec))[0] for spec in specs]
        repeated = sorted({stem for stem in stems if stems.count(stem) > 1})
        if repeated:
            raise click.UsageError(f"two spaces are named `{repeated[0]}`, and a space's study and directory take "
                                   "its file's name: rename one, or sweep them one at a time with --study")
    # Errors of a space itself (syntax, unreadable files, an empty choice, a bad range) stop the
    # sweep here, before any space trains; errors that only some options cause are each variant's,
    # reported when it is frozen.
    failed = False
    for spec in specs:
        checked = _analyze(spec)
        space_errors = [d for d in checked.diagnostics
                        if d.is_error and (d.code in SEARCH_VALUE_ERRORS or d.code <= "N0100")]
        if space_errors:
            _report(space_errors, checked.sources, "human", color)
            failed = True
    if failed:
        sys.exit(EXIT_DIAGNOSTICS)
    if not dry_run:
        if trials is None:
            raise click.UsageError("say how many variants to train with --trials N, or list them with --dry-run")
        if sample is not None:
            raise click.UsageError("--sample lists variants with --dry-run; a training sweep draws --trials of them")
        from nestc.runtime.config import RunConfig
        from nestc.search import study

        training = RunConfig(steps=steps, runs=runs, eval_every=eval_every, task=task,
                             task_options=_parse_task_options(task, task_options))
        configs = [study.SweepConfig(spec=spec, trials=trials, run=training, sampler=sampler, seed=seed,
                                     workers=workers, storage=storage, study=study_name, prune=not no_prune)
                   for spec in specs]
        listed = {config.spec: [entry.__dict__ for entry in _train_sweep(config, fmt, color)] for config in configs}
    else:
        listed = {}
        for spec in specs:
            if len(specs) > 1 and fmt != "json":
                click.echo(f"{spec}:")
            listed[spec] = _list_variants(spec, sample, seed, fmt, color)
    if fmt == "json":  # one space: its list, as ever; several: each space's under its path
        click.echo(json.dumps(listed[specs[0]] if len(specs) == 1 else listed, indent=2))


def _list_variants(spec: str, sample: int | None, seed: int, fmt: str, color) -> list[dict]:
    """`--dry-run`: the variants of one space, printed (text) or returned (json)."""
    from nestc.backends.common import BackendError
    from nestc.lang.diagnostics import NestError
    from nestc.search import sweep as sweeping

    try:
        found = sweeping.variants(spec, sample=sample, seed=seed)  # builds each variant to count it
    except NestError as error:
        _report(error.diagnostics, _sources_of(spec), "human", color)
        sys.exit(EXIT_DIAGNOSTICS)
    except BackendError as error:  # a variant too large for this machine
        raise click.ClickException(str(error)) from None
    if fmt == "json":
        return [{"id": v.id, "choices": v.choices, "parameters": v.parameters, "flops_per_token": v.flops_per_token,
                 "errors": [d.to_json() for d in v.diagnostics]} for v in found]
    for variant in found:
        choices = ", ".join(f"{label}={value}" for label, value in variant.choices.items())
        if variant.ok:
            click.echo(f"{variant.id}  {variant.parameters:>10,d} params  {variant.flops_per_token / 1e6:8.2f} "
                       f"MFLOP/token  {choices}")
        else:
            click.echo(f"{'(invalid)':12s}  {choices}")
            click.echo(render_all(variant.diagnostics, variant.sources, _use_color(color, sys.stdout)))
    valid = sum(v.ok for v in found)
    click.echo(f"{len(found)} variant{'s' if len(found) != 1 else ''} listed, {valid} valid, "
               f"{len(found) - valid} with errors (skipped)")
    return []


def _train_sweep(config: SweepConfig, fmt: str, color) -> list:
    """Sweep one space; returns its leaderboard (printed as a table unless `fmt` is json)."""
    import warnings

    import optuna
    import sqlalchemy.exc

    from nestc.search import study
    from nestc.runtime import tasks
    from nestc.backends.compiled import CompileWarning
    from nestc.lang.diagnostics import NestError

    if config.run.task:  # an unknown task option fails here, not in every trial
        try:
            tasks.make(config.run.task, 64, config.run.task_options)
        except ValueError as error:
            raise click.UsageError(str(error)) from None
    click.echo(f"sweep `{config.name}`: {config.trials} trials of {config.spec}; study in {config.storage_shown}",
               err=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CompileWarning)
            entries = study.run(config, log=lambda line: click.echo(line, err=True))
        written = study.write_results(config, entries)
    except NestError as error:
        _report(error.diagnostics, _sources_of(config.spec), "human", color)
        sys.exit(EXIT_DIAGNOSTICS)
    except study.SweepError as error:
        raise click.ClickException(str(error)) from None
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as error:  # lost mid-sweep
        raise click.ClickException(study.storage_error(config.storage_url, error)
                                   + "; the finished trials are kept: run the same command again to resume") from None
    except KeyboardInterrupt:
        click.echo(f"interrupted: the study is kept in {config.storage_shown}; run the same command again to resume",
                   err=True)
        sys.exit(130)
    except OSError as error:
        raise click.ClickException(f"cannot write the sweep under `{config.run.runs}`: {error}") from None
    if fmt != "json":
        study.format_table(entries, task=config.run.task is not None)
    for kind, path in written.items():
        click.echo(f"{kind}: {path}", err=True)
    if "best" in written:
        click.echo(f"train the best variant further: nestc run {written['best']}", err=True)
    return entries


def _sources_of(path: str) -> SourceMap:
    from nestc.lang.sema import read_source

    sources = SourceMap()
    sources.add(read_source(path))
    return sources

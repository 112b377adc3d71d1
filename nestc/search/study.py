"""`nestc sweep --trials N`: train variants of a search space with Optuna and rank them.

A sweep is an Optuna study kept in a database (SQLite under `runs/sweep-<name>/` by default), so
a killed sweep resumes where it stopped and several workers, local processes or other machines
pointed at one `--storage`, share its trials. Each trial freezes one variant of the space, trains
it with `nestc run`'s loop in a directory of its own (`trials/<trial number>`) and scores it by
held-out bits (per scored token on a task, per byte on the corpus): lower is better. The bits are
reported at every evaluation, so the median pruner stops variants that trail the others early. A
trial whose worker died is noticed by its missing heartbeat, marked failed and run again.

A trial claims its variant in the storage before training it (`VariantClaims`), so no variant is
ever trained by two trials, whichever workers or machines run them; and each trial's sampler is
seeded from `--seed` and the trial's number (`trial_seed`), so workers and resumed sweeps draw
afresh instead of replaying one another's draws.

Outcomes kept in each trial's user attributes (`outcome`): `complete`, `pruned`, `duplicate`
(a variant another trial trains or trained: its score is reused if there is one, nothing is
trained twice), `invalid` (the frozen variant has errors: reported and skipped) and `diverged`.
All of them count toward `--trials`.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import time
from dataclasses import dataclass, field, replace

from nestc.lang import ir
from nestc.runtime.config import RunConfig
from nestc.search import space
from nestc.lang.diagnostics import render_all
from nestc.lang.sema import analyze_source
from nestc.lang.source import SourceFile

SAMPLERS = ("tpe", "random", "grid")
OUTCOMES_COUNTED = ("complete", "pruned", "duplicate", "invalid", "diverged")
# The outcomes of a trial that trained its variant (or tried to): a claim held by one of them stands.
OUTCOMES_TRAINED = ("complete", "pruned", "invalid", "diverged")
CLAIMS_TABLE = "nestc_variant_claims"
# The pip package of each common database driver, for the error that says one is missing.
DRIVER_PACKAGES = {"psycopg2": "psycopg2-binary", "psycopg": "'psycopg[binary]'", "pg8000": "pg8000",
                   "pymysql": "pymysql", "mysqldb": "mysqlclient"}


class SweepError(Exception):
    """A sweep that cannot start: the message says what and how to fix it."""


@dataclass
class SweepConfig:
    spec: str
    trials: int
    # How each trial trains (quietly, under the sweep's directory); its `runs` is where the sweep's
    # directory is created, its `task` names the study.
    run: RunConfig = field(default_factory=RunConfig)
    sampler: str = "tpe"
    seed: int = 0
    workers: int = 1
    storage: str | None = None  # an SQLAlchemy URL; default: SQLite in the sweep's directory
    study: str | None = None  # default: <spec name>-<task or corpus>
    prune: bool = True
    heartbeat_seconds: int = 10  # a trial silent for 3 heartbeats belongs to a dead worker

    @property
    def name(self) -> str:
        stem = os.path.splitext(os.path.basename(self.spec))[0]
        return self.study or f"{stem}-{self.run.task or 'corpus'}"

    @property
    def directory(self) -> str:
        return os.path.join(self.run.runs, f"sweep-{self.name}")

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{os.path.abspath(os.path.join(self.directory, 'study.db'))}"

    @property
    def storage_shown(self) -> str:
        """The storage URL as it may be printed: its password, if any, is `***`."""
        return redact(self.storage_url)


def redact(url: str) -> str:
    """`url` with its password replaced by `***` (SQLAlchemy's own rendering). A string SQLAlchemy
    cannot parse is shown whole only if it has no `@`, before which a password would stand; else
    up to its scheme."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        if "@" not in url:
            return url
        return url.split("://", 1)[0] + "://..." if "://" in url else "..."


@dataclass
class Entry:
    """One row of the leaderboard."""
    trial: int
    outcome: str
    variant: str | None
    bits: float | None
    accuracy: float | None  # on a task, held-out accuracy at the training lengths
    parameters: int | None
    tokens_per_second: float | None
    choices: dict
    error: str | None = None
    longer_accuracy: float | None = None  # on a task's held-out examples longer than training


def _optuna():
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # nestc prints its own line per trial
    # Heartbeats and their retry are "experimental" in Optuna, and have been since 2.8.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def _engine_kwargs(url: str) -> dict:
    # SQLite locks the whole file while one worker writes: the others wait for it, up to a minute.
    return {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}


def _storage(config: SweepConfig):
    optuna = _optuna()
    import sqlalchemy.exc
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    if config.storage is None:
        os.makedirs(config.directory, exist_ok=True)
    for attempt in range(3):
        try:
            storage = RDBStorage(config.storage_url, engine_kwargs=_engine_kwargs(config.storage_url),
                                 heartbeat_interval=config.heartbeat_seconds,
                                 grace_period=3 * config.heartbeat_seconds,
                                 heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=2))
            return storage, VariantClaims(config.storage_url)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as error:
            # Workers that open a new database at once race to create Optuna's tables, and the
            # server refuses the loser's (a duplicate table or key). The winner's are there now.
            if attempt == 2:
                raise SweepError(storage_error(config.storage_url, error)) from None
        except (optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError, ValueError,
                ImportError) as error:
            raise SweepError(storage_error(config.storage_url, error)) from None


def storage_error(url: str, error: BaseException) -> str:
    """What went wrong with the storage at `url`, and how to fix it, in one message without its password."""
    import sqlalchemy.exc
    from sqlalchemy.engine import make_url

    shown = f"--storage {redact(url)}"
    if isinstance(error, sqlalchemy.exc.NoSuchModuleError):
        return (f"{shown}: SQLAlchemy has no database dialect `{url.split(':', 1)[0]}`; write the URL as "
                "dialect+driver://user:password@host/database, e.g. postgresql+psycopg2://... or sqlite:///path.db")
    if isinstance(error, sqlalchemy.exc.ArgumentError):
        return (f"{shown}: not a database URL ({error}); write it as dialect+driver://user:password@host/database, "
                "e.g. postgresql+psycopg2://user:password@host/sweeps")
    if isinstance(error, ImportError):  # Optuna's, with SQLAlchemy's ModuleNotFoundError as its cause
        driver = make_url(url).get_driver_name()
        package = DRIVER_PACKAGES.get(driver, driver)
        other = {"psycopg2": "psycopg 3 as postgresql+psycopg://", "psycopg": "psycopg2 as postgresql+psycopg2://"}
        return (f"{shown}: its database driver `{driver}` is not installed: pip install {package}"
                + (f" (or name {other[driver]}...)" if driver in other else ""))
    lines = str(getattr(error, "orig", None) or error).strip().splitlines()
    detail = lines[0] if lines else type(error).__name__
    password = make_url(url).password
    if password:  # drivers do not echo it, but a message that did would not show it either
        detail = detail.replace(password, "***")
    if isinstance(error, sqlalchemy.exc.OperationalError) and url.startswith("sqlite"):
        return f"{shown}: cannot open it: {detail}; check that its directory exists and is writable"
    if isinstance(error, sqlalchemy.exc.OperationalError):
        return (f"{shown}: cannot connect to it: {detail}; check that the server is running and reachable "
                "and that the user, password and database are right")
    return f"{shown}: cannot use it: {detail}"


class VariantClaims:
    """Which trial trains each variant: one row per (study, variant) in a table of the study's own
    database, inserted by the trial that trains it. The table's primary key makes the insert atomic
    on SQLite and on a database server alike: of two workers that draw one variant at once, exactly
    one inserts the row, and the other finds it and trains nothing. A row whose trial ended without
    training (its worker was killed, or interrupted) no longer stands: the next trial of the variant
    takes it over by a compare-and-set update, which again only one trial can win."""

    def __init__(self, url: str):
        import sqlalchemy

        self.engine = sqlalchemy.create_engine(url, **_engine_kwargs(url))
        metadata = sqlalchemy.MetaData()
        self.table = sqlalchemy.Table(CLAIMS_TABLE, metadata,
                                      sqlalchemy.Column("study", sqlalchemy.String(512), primary_key=True),
                                      sqlalchemy.Column("variant", sqlalchemy.String(64), primary_key=True),
                                      sqlalchemy.Column("trial", sqlalchemy.Integer, nullable=False))
        try:
            metadata.create_all(self.engine)
        except sqlalchemy.exc.SQLAlchemyError:  # another worker created it between the check and the create
            if not sqlalchemy.inspect(self.engine).has_table(CLAIMS_TABLE):
                raise

    def take(self, study: str, variant: str, trial: int, standing):
        """Claim `variant` for trial number `trial` of `study`. None when the trial may train it;
        otherwise the trial whose claim stands, as `standing(number)` returns it (None: that
        trial's claim no longer stands)."""
        import sqlalchemy

        table = self.table
        row = (table.c.study == study) & (table.c.variant == variant)
        while True:
            try:
                with self.engine.begin() as connection:
                    connection.execute(table.insert().values(study=study, variant=variant, trial=trial))
                return None
            except sqlalchemy.exc.IntegrityError:  # claimed already
                pass
            with self.engine.begin() as connection:
                holder_number = connection.execute(sqlalchemy.select(table.c.trial).where(row)).scalar_one()
            holder = standing(holder_number) if holder_number != trial else None
            if holder is not None:
                return holder
            with self.engine.begin() as connection:
                taken = connection.execute(table.update().where(row & (table.c.trial == holder_number))
                                           .values(trial=trial)).rowcount
            if taken == 1:
                return None
            # Another trial took the row over first: see whose claim it is now.


def _standing_claim(study, number: int, variant: str):
    """Trial `number` of `study` if its claim on `variant` stands: it is training the variant now,
    or it trained it. None for a trial that stopped without an outcome (its worker was killed, or
    interrupted) or that is not about this variant (a row left by a deleted study of the same name)."""
    optuna = _optuna()
    holder = next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)
    if holder is None or holder.user_attrs.get("variant") != variant:
        return None
    if holder.state == optuna.trial.TrialState.RUNNING or holder.user_attrs.get("outcome") in OUTCOMES_TRAINED:
        return holder
    return None


def trial_seed(seed: int, trial_number: int) -> int:
    """The sampler's seed for one trial: `seed` (--seed) mixed with the trial's number by numpy's
    SeedSequence. The storage numbers a study's trials 0, 1, 2, ... across all its workers and
    machines, and a resumed sweep goes on from the next number, so every trial draws from its own
    stream: workers never replay one another's draws, a resume never replays the draws it made, and
    what a trial draws depends only on --seed, its number and the scores before it (the random
    sampler ignores those), not on which worker or process draws it."""
    import numpy

    return int(numpy.random.SeedSequence([seed, trial_number]).generate_state(1)[0])


def _sampler(config: SweepConfig):
    optuna = _optuna()

    def seeded(seed: int):
        if config.sampler == "tpe":
            return optuna.samplers.TPESampler(seed=seed)
        # Grid trials are enqueued with every value fixed, so their sampler never draws.
        return optuna.samplers.RandomSampler(seed=seed)

    # Defined here because optuna loads only when a sweep trains.
    class TrialSeeded(optuna.samplers.BaseSampler):
        """A TPE or random sampler made afresh for each trial with `trial_seed`: TPE keeps nothing
        between trials but its random state (the history it models is read from the storage)."""

        def __init__(self):
            self.inner = seeded(config.seed)

        def before_trial(self, study, trial):
            self.inner = seeded(trial_seed(config.seed, trial.number))
            self.inner.before_trial(study, trial)

        def infer_relative_search_space(self, study, trial):
            return self.inner.infer_relative_search_space(study, trial)

        def sample_relative(self, study, trial, search_space):
            return self.inner.sample_relative(study, trial, search_space)

        def sample_independent(self, study, trial, param_name, param_distribution):
            return self.inner.sample_independent(study, trial, param_name, param_distribution)

        def after_trial(self, study, trial, state, values):
            self.inner.after_trial(study, trial, state, values)

    return TrialSeeded()


def open_study(config: SweepConfig):
    """Create the study, or load it to resume; a study run with other settings is an error."""
    study, search, _ = _open(config)
    return study, search


def _open(config: SweepConfig):
    """`open_study`, and the study's variant claims."""
    optuna = _optuna()
    search = space.load(config.spec)
    if config.sampler == "grid" and search.size == math.inf:
        raise SweepError(f"{config.spec}: --sampler grid needs a finite space, but it has a loguniform "
                         "dimension; use --sampler tpe or random")
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0) if config.prune \
        else optuna.pruners.NopPruner()
    storage, claims = _storage(config)
    study = optuna.create_study(study_name=config.name, storage=storage, direction="minimize",
                                sampler=_sampler(config), pruner=pruner, load_if_exists=True)
    settings = {"spec": os.path.abspath(config.spec), "task": config.run.task, "steps": config.run.steps,
                "task_options": config.run.task_options, "sampler": config.sampler}
    recorded = study.user_attrs.get("settings")
    if recorded is None:
        study.set_user_attr("settings", settings)
    elif recorded != settings:
        different = ", ".join(f"{key} {recorded.get(key)!r} (now {value!r})" for key, value in settings.items()
                              if recorded.get(key) != value)
        raise SweepError(f"study `{config.name}` in {config.storage_shown} was run with {different}; "
                         "run it with the same settings to resume it, or give --study a new name")
    # The grid's first --trials points, in order; a resume with more --trials goes on along it.
    enqueued = study.user_attrs.get("grid_points_enqueued", 0)
    if config.sampler == "grid" and enqueued < config.trials:
        for assignment in itertools.islice(search.grid(), enqueued, config.trials):
            study.enqueue_trial(_params(search, assignment), skip_if_exists=True)
        study.set_user_attr("grid_points_enqueued", config.trials)
    return study, search, claims


def _params(search: space.Space, assignment: dict) -> dict:
    """Optuna's parameters for an assignment: a choice by its option's text, numbers as numbers."""
    return {label: search.dimensions[label].describe(value) if search.dimensions[label].kind == "choice" else value
            for label, value in assignment.items()}


def _suggest(trial, search: space.Space) -> dict:
    """Draw an assignment through the trial (a choice by its options' texts, which Optuna stores)."""
    def suggest(dimension: space.Dimension):
        if dimension.kind == "choice":
            texts = [dimension.describe(index) for index in range(len(dimension.options))]
            return texts.index(trial.suggest_categorical(dimension.label, texts))
        if dimension.kind == "range":
            return trial.suggest_categorical(dimension.label, list(dimension.options))
        low, high = dimension.options
        return trial.suggest_float(dimension.label, low, high, log=True)

    return search.assign(suggest)


def _counted(study) -> tuple[int, int, int]:
    """(finished trials that count toward --trials, running ones, waiting ones)."""
    optuna = _optuna()
    states = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    finished = sum(t.user_attrs.get("outcome") in OUTCOMES_COUNTED for t in trials if t.state.is_finished())
    running = sum(t.state == states.RUNNING for t in trials)
    waiting = sum(t.state == states.WAITING for t in trials)
    return finished, running, waiting


def work(config: SweepConfig, worker: int = 0, log=print, start_together=None) -> None:
    """One worker: run trials until the study has `config.trials` of them. Local workers wait at
    `start_together` (a barrier) once they are ready, so the first does not take every trial
    while the others are still importing torch."""
    import threading

    import torch

    _optuna()
    from optuna.storages import fail_stale_trials

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.workers))
    study, search, claims = _open(config)
    if start_together is not None:
        try:
            start_together.wait(timeout=120)
        except threading.BrokenBarrierError:  # a worker died while starting: the others go on
            pass
    objective = _Objective(config, search, claims, worker, log)
    while True:
        fail_stale_trials(study)
        _fail_stillborn_trials(study, 3 * config.heartbeat_seconds)
        finished, running, waiting = _counted(study)
        if waiting or finished + running < config.trials:
            study.optimize(objective, n_trials=1, catch=())
        elif running:
            time.sleep(config.heartbeat_seconds)  # another worker's trial, or a dead one's, not yet stale
        else:
            return


def _fail_stillborn_trials(study, grace_seconds: float) -> None:
    """Fail (and enqueue again) the trials whose worker died between creating them and recording
    its worker, which it does only after a first heartbeat (`_Objective._evaluate`): they have
    neither, and Optuna's stale-trial check never sees them. A live trial records its worker
    within milliseconds of starting."""
    optuna = _optuna()
    from datetime import datetime

    now = datetime.now()
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if "worker" in trial.user_attrs or (now - trial.datetime_start).total_seconds() < grace_seconds:
            continue
        try:
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:  # another worker got to it first
            continue
        if trial.system_attrs.get("fixed_params"):
            study.enqueue_trial(trial.system_attrs["fixed_params"])


class _Objective:
    def __init__(self, config: SweepConfig, search: space.Space, claims: VariantClaims, worker: int, log):
        self.config, self.search, self.claims, self.worker, self.log = config, search, claims, worker, log

    def __call__(self, trial) -> float:
        try:
            return self._evaluate(trial)
        except KeyboardInterrupt:  # Ctrl-C: the trial fails, and its variant waits for the resumed sweep
            trial.study.enqueue_trial(trial.params)
            raise

    def _evaluate(self, trial) -> float:
        optuna = _optuna()
        from nestc.backends.common import BackendError
        from nestc.runtime.checkpoint import bundle
        from nestc.runtime.train import TrainingDiverged, train

        assignment = _suggest(trial, self.search)
        choices = self.search.describe(assignment)
        trial.set_user_attr("assignment", assignment)
        # Optuna's heartbeat thread beats first at some moment after the trial starts; beat once
        # before recording the worker, so that every trial with a worker has a heartbeat. A worker
        # killed from here on leaves a trial that goes stale; one killed before leaves a trial
        # without a worker, which `_fail_stillborn_trials` fails. None is left that no check fails.
        trial.study._storage.record_heartbeat(trial._trial_id)
        trial.set_user_attr("worker", self.worker)
        trial.set_user_attr("choices", choices)
        prefix = f"trial {trial.number}" + (f" (worker {self.worker})" if self.config.workers > 1 else "")
        result = analyze_source(SourceFile(self.config.spec, self.search.freeze(assignment)))
        if not result.ok:
            errors = [d for d in result.diagnostics if d.is_error]
            trial.set_user_attr("outcome", "invalid")
            trial.set_user_attr("error", errors[0].message)
            self.log(f"{prefix}: invalid variant, skipped: {errors[0].message}")
            self.log(render_all(errors, result.sources, color=False))
            return math.nan
        variant = ir.variant_id(result.program)
        trial.set_user_attr("variant", variant)  # before the claim: a standing claim's trial names its variant
        holder = self.claims.take(trial.study.study_name, variant, trial.number,
                                  lambda number: _standing_claim(trial.study, number, variant))
        if holder is not None:
            return self._duplicate(trial, holder, variant, prefix)
        directory = _fresh_directory(os.path.join(self.config.directory, "trials"), trial.number)
        trial.set_user_attr("directory", directory)
        # The directory was just made, empty, for this trial alone: `overwrite` only says so to train().
        trial_config = replace(self.config.run, directory=directory, overwrite=True, resume=False, quiet=True)

        def report(step: int, bits: float) -> None:
            trial.report(bits, step)
            if trial.should_prune():
                trial.set_user_attr("held_out_bits", bits)
                raise optuna.TrialPruned(f"held-out {bits:.3f} bits at step {step} trails the median")

        self.log(f"{prefix}: training {variant}  " + ", ".join(f"{k}={v}" for k, v in choices.items()))
        try:
            run = train(result.program, bundle(result), trial_config, on_eval=report)
        except optuna.TrialPruned as pruned:
            trial.set_user_attr("outcome", "pruned")
            self.log(f"{prefix}: pruned: {pruned}")
            raise
        except (BackendError, ValueError) as error:  # a model the backend cannot build, or the task cannot feed
            trial.set_user_attr("outcome", "invalid")
            trial.set_user_attr("error", str(error))
            self.log(f"{prefix}: cannot train it, skipped: {error}")
            return math.nan
        except TrainingDiverged as error:
            trial.set_user_attr("outcome", "diverged")
            trial.set_user_attr("error", str(error))
            self.log(f"{prefix}: {error}")
            return math.nan
        if run.interrupted:  # train() caught the Ctrl-C to save its checkpoint: pass it on
            raise KeyboardInterrupt
        trial.set_user_attr("held_out_bits", run.held_out_bits)
        trial.set_user_attr("accuracy", run.final_score if self.config.run.task else None)
        trial.set_user_attr("longer_accuracy", run.longer_accuracy)
        trial.set_user_attr("parameters", run.parameters)
        trial.set_user_attr("tokens_per_second", run.tokens_per_second)
        trial.set_user_attr("outcome", "complete")
        accuracy = f", accuracy {run.final_score:.3f}" if self.config.run.task else ""
        if run.longer_accuracy is not None:
            accuracy += f" (longer than training {run.longer_accuracy:.3f})"
        self.log(f"{prefix}: held-out {run.held_out_bits:.3f} bits{accuracy}, {run.parameters:,} params, "
                 f"{run.tokens_per_second:,.0f} tok/s")
        return run.held_out_bits

    def _duplicate(self, trial, holder, variant: str, prefix: str) -> float:
        """The trial of a variant that trial `holder` claimed: nothing is trained; the holder's
        score is reused if it has one, and the trial is pruned while the holder still trains."""
        optuna = _optuna()
        trial.set_user_attr("outcome", "duplicate")
        trial.set_user_attr("duplicate_of", holder.number)
        if holder.state == optuna.trial.TrialState.RUNNING:
            self.log(f"{prefix}: variant {variant} is being trained in trial {holder.number}; skipped")
            raise optuna.TrialPruned(f"variant {variant} is being trained in trial {holder.number}")
        for key in ("held_out_bits", "accuracy", "longer_accuracy", "parameters", "tokens_per_second", "error"):
            if key in holder.user_attrs:
                trial.set_user_attr(key, holder.user_attrs[key])
        outcome = holder.user_attrs["outcome"]
        self.log(f"{prefix}: variant {variant} was trained in trial {holder.number} ({outcome}); "
                 + ("its score is reused" if outcome == "complete" else "not trained again"))
        if outcome == "pruned":
            raise optuna.TrialPruned(f"variant {variant} was pruned in trial {holder.number}")
        return holder.value if outcome == "complete" else math.nan


def _fresh_directory(parent: str, number: int) -> str:
    """A new, empty directory for trial `number` under `parent`: `parent/<number>`, or, where a
    deleted study of the same name left that, `parent/<number>-2`, `-3`, ... Made with mkdir,
    which fails on a directory that exists, so no two trials ever get one."""
    os.makedirs(parent, exist_ok=True)
    for attempt in itertools.count(1):
        directory = os.path.join(parent, str(number) if attempt == 1 else f"{number}-{attempt}")
        try:
            os.mkdir(directory)
            return directory
        except FileExistsError:
            continue


def _spawned_worker(config: SweepConfig, worker: int, start_together) -> None:
    import sys
    import warnings

    from nestc.backends.compiled import CompileWarning

    warnings.simplefilter("ignore", CompileWarning)  # the first worker's log already has them
    try:
        work(config, worker, log=lambda line: print(line, file=sys.stderr, flush=True), start_together=start_together)
    except KeyboardInterrupt:  # Ctrl-C reaches every worker; the first one reports it
        pass


def run(config: SweepConfig, log=print) -> list[Entry]:
    """Run the sweep with `config.workers` local processes (this one included); returns the
    leaderboard, best first."""
    import multiprocessing

    open_study(config)  # creates the study (and its grid) once, before the workers race to it
    context = multiprocessing.get_context("spawn")
    start_together = context.Barrier(config.workers) if config.workers > 1 else None
    helpers = [context.Process(target=_spawned_worker, args=(config, worker, start_together))
               for worker in range(1, config.workers)]
    for helper in helpers:
        helper.start()
    try:
        work(config, 0, log, start_together)
    finally:
        for helper in helpers:
            helper.join()
    return leaderboard(config)


def leaderboard(config: SweepConfig) -> list[Entry]:
    """Every trial that counts, best first: trained variants by held-out bits, then pruned ones by
    their last evaluation, then those that failed."""
    study, _ = open_study(config)
    entries = []
    for trial in study.get_trials(deepcopy=False):
        attributes = trial.user_attrs
        outcome = attributes.get("outcome")
        if outcome not in OUTCOMES_COUNTED or outcome == "duplicate":
            continue
        entries.append(Entry(trial=trial.number, outcome=outcome, variant=attributes.get("variant"),
                             bits=attributes.get("held_out_bits"), accuracy=attributes.get("accuracy"),
                             parameters=attributes.get("parameters"),
                             tokens_per_second=attributes.get("tokens_per_second"),
                             choices=attributes.get("choices", {}), error=attributes.get("error"),
                             longer_accuracy=attributes.get("longer_accuracy")))
    rank = {"complete": 0, "pruned": 1, "diverged": 2, "invalid": 3}
    entries.sort(key=lambda e: (rank[e.outcome], e.bits if e.bits is not None else math.inf, e.trial))
    return entries


def write_results(config: SweepConfig, entries: list[Entry]) -> dict[str, str]:
    """leaderboard.csv, leaderboard.json, pareto.png, Optuna's history.png and importance.png, and
    best.nest in the sweep's directory; returns the paths written."""
    os.makedirs(config.directory, exist_ok=True)
    written = {}
    labels = sorted({label for entry in entries for label in entry.choices})
    path = os.path.join(config.directory, "leaderboard.csv")
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["rank", "trial", "outcome", "variant", "held_out_bits", "accuracy", "longer_accuracy",
                         "parameters", "tokens_per_second", *labels, "error"])
        for rank, entry in enumerate(entries, 1):
            writer.writerow([rank, entry.trial, entry.outcome, entry.variant, entry.bits, entry.accuracy,
                             entry.longer_accuracy, entry.parameters, entry.tokens_per_second,
                             *(entry.choices.get(label, "") for label in labels), entry.error or ""])
    written["csv"] = path
    path = os.path.join(config.directory, "leaderboard.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump([entry.__dict__ for entry in entries], handle, indent=2)
    written["json"] = path
    trained = [e for e in entries if e.outcome == "complete"]
    if trained:
        written["pareto"] = pareto_plot(trained, os.path.join(config.directory, "pareto.png"),
                                        "task" if config.run.task else "corpus")
        written.update(study_plots(config))
        written["best"] = write_best(config, trained[0])
    return written


def study_plots(config: SweepConfig) -> dict[str, str]:
    """Optuna's own plots of the study: the held-out bits trial after trial (`history.png`) and,
    once two variants have trained, how much each choice moved them (`importance.png`, by
    PED-ANOVA, which needs no scikit-learn; with few trials, a rough guide)."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    optuna = _optuna()
    from optuna.visualization import matplotlib as optuna_plots

    study, _ = open_study(config)
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    target = f"held-out bits per {'scored token' if config.run.task else 'byte'}"
    plots = {"history": lambda: optuna_plots.plot_optimization_history(study, target_name=target)}
    if len(complete) >= 2 and any(trial.params for trial in complete):
        plots["importance"] = lambda: optuna_plots.plot_param_importances(
            study, evaluator=optuna.importance.PedAnovaImportanceEvaluator(), target_name=target)
    written = {}
    for name, plot in plots.items():
        # Optuna switches matplotlib to its own style; the context gives the process's back.
        with warnings.catch_warnings(), matplotlib.rc_context():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # their matplotlib backend's
            axis = plot()
            if name == "history":
                axis.xaxis.set_major_locator(MaxNLocator(integer=True))  # trial numbers
            path = os.path.join(config.directory, f"{name}.png")
            axis.figure.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(axis.figure)
        written[name] = path
    return written


def write_best(config: SweepConfig, best: Entry) -> str:
    """The best variant as one self-contained, choice-free spec that `nestc run` accepts."""
    from nestc.runtime.checkpoint import bundle

    study, search = open_study(config)
    assignment = study.trials[best.trial].user_attrs["assignment"]
    result = analyze_source(SourceFile(config.spec, search.freeze(assignment)))
    steps = config.run.steps or result.program.train.steps
    header = (f"# The best variant of {config.spec} in sweep `{config.name}`: trial {best.trial}, variant "
              f"{best.variant},\n# held-out {best.bits:.4f} bits after {steps} training steps. "
              "Its choices:\n" + "".join(f"#   {label} = {value}\n" for label, value in best.choices.items()))
    path = os.path.join(config.directory, "best.nest")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(header + bundle(result))
    return path


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (both minimised)."""
    return [i for i, (x, y) in enumerate(points)
            if not any(ox <= x and oy <= y and (ox, oy) != (x, y) for ox, oy in points)]


def pareto_plot(entries: list[Entry], path: str, measure: str) -> str:
    import matplotlib.pyplot as plt

    figure = pareto_figure(entries, measure)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def pareto_figure(entries: list[Entry], measure: str):
    """Held-out bits against parameters (log scale) and against training throughput, with each
    front drawn; the x ticks stand at the variants' own values, labelled with 3 significant digits,
    those that read alike merged and those that would overlap thinned."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bits = [e.bits for e in entries]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = ((axes[0], [e.parameters for e in entries], "parameters (count, log scale; fewer is better)", 1),
              (axes[1], [e.tokens_per_second for e in entries], "training throughput (tokens/s; more is better)", -1))
    for axis, values, label, sign in panels:
        front = sorted(pareto_front([(sign * v, b) for v, b in zip(values, bits)]), key=lambda i: values[i])
        axis.scatter(values, bits, color="0.6", label="variants")
        axis.plot([values[i] for i in front], [bits[i] for i in front], "o-", color="C3", label="Pareto front")
        for entry, x, y in zip(entries, values, bits):
            axis.annotate(str(entry.trial), (x, y), textcoords="offset points", xytext=(4, 3), fontsize=8)
        if sign > 0:  # parameter counts span orders of magnitude
            axis.set_xscale("log")
        axis.set_xlabel(label)
        axis.set_ylabel(f"held-out bits per {'scored token' if measure == 'task' else 'byte'} (lower is better)")
        axis.yaxis.get_major_formatter().set_useOffset(False)  # the bits as they are, not as +3.4 offsets
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle("sweep: quality against size and speed (labels are trial numbers)")
    figure.tight_layout()
    for axis, values, _, _ in panels:
        _ticks_at_values(figure, axis, values)
    return figure


def _short_number(value: float) -> str:
    """3 significant digits, thousands as k and millions as M: 10240 -> 10.2k."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def _ticks_at_values(figure, axis, values) -> None:
    """x ticks at the distinct `values`, one per distinct label, dropping from left to right any
    whose label would touch the previous one's."""
    from matplotlib.ticker import NullLocator

    labelled: dict[str, float] = {}
    for value in sorted(set(values)):
        labelled.setdefault(_short_number(value), value)
    axis.xaxis.set_minor_locator(NullLocator())
    axis.set_xticks(list(labelled.values()), list(labelled))
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    kept, right_edge = [], -math.inf
    for tick in axis.xaxis.get_major_ticks():
        extent = tick.label1.get_window_extent(renderer)
        if extent.x0 > right_edge + 6:  # pixels between two labels
            kept.append((tick.get_loc(), tick.label1.get_text()))
            right_edge = extent.x1
    axis.set_xticks([position for position, _ in kept], [text for _, text in kept])


def format_table(entries: list[Entry], task: bool, stream=None) -> None:
    """The leaderboard as a rich table."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="sweep leaderboard (held-out bits, lower is better)")
    longer = any(entry.longer_accuracy is not None for entry in entries)  # a task held out at longer lengths
    for column, justify in (("#", "right"), ("trial", "right"), ("variant", "left"), ("outcome", "left"),
                            ("bits", "right"), *((("accuracy", "right"),) if task else ()),
                            *((("longer", "right"),) if longer else ()),
                            ("params", "right"), ("tok/s", "right"), ("choices", "left")):
        table.add_column(column, justify=justify)
    for rank, entry in enumerate(entries, 1):
        cells = [str(rank), str(entry.trial), entry.variant or "-", entry.outcome,
                 f"{entry.bits:.4f}" if entry.bits is not None else "-"]
        if task:
            cells.append(f"{entry.accuracy:.3f}" if entry.accuracy is not None else "-")
        if longer:
            cells.append(f"{entry.longer_accuracy:.3f}" if entry.longer_accuracy is not None else "-")
        cells += [f"{entry.parameters:,}" if entry.parameters else "-",
                  f"{entry.tokens_per_second:,.0f}" if entry.tokens_per_second else "-",
                  entry.error or ", ".join(f"{k}={v}" for k, v in entry.choices.items())]
        table.add_row(*cells)
    Console(file=stream, width=200).print(table)

"""`nestc sweep --trials`: Optuna studies that train variants, resume, share workers and rank."""

from __future__ import annotations

import collections
import dataclasses
import glob
import io
import json
import multiprocessing
import os
import pwd
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time

import optuna
import pytest
from click.testing import CliRunner
from sqlalchemy.engine import make_url

from nestc.lang import ir
from nestc.runtime.config import RunConfig
from nestc.search import study
from nestc.api import check
from nestc.cli import cli
from nestc.lang.sema import analyze_file

# Four variants: two objectives x two chunk sizes; trials of a few steps on 16-token sequences.
TINY_SPACE = """
level mixer : matrix {
    key = x |> proj |> l2norm
    value = x |> proj
    query = x |> proj |> l2norm
    lr = x |> proj |> sigmoid
    objective choice(l2, dot)
    optimizer gd
    every choice(1, 8)
}

model {
    vocab 256
    dim 16
    heads 2
    layers 1
    block = residual(rmsnorm |> mixer)
}

train {
    optimizer adamw(lr=3e-3)
    context 16
    batch 2
    steps STEPS
}
"""


def tiny_space(tmp_path, steps: int = 4, replace: tuple[str, str] | None = None) -> str:
    text = TINY_SPACE.replace("STEPS", str(steps))
    if replace:
        text = text.replace(*replace)
    path = tmp_path / "tiny.nest"
    path.write_text(text)
    return str(path)


def one_variant_space(tmp_path, steps: int = 4) -> str:
    """TINY_SPACE with both choices fixed: every trial draws the same variant."""
    spec = tiny_space(tmp_path, steps, replace=("objective choice(l2, dot)", "objective l2"))
    with open(spec) as handle:
        text = handle.read()
    with open(spec, "w") as handle:
        handle.write(text.replace("every choice(1, 8)", "every 8"))
    return spec


def config_for(tmp_path, spec: str, **fields) -> study.SweepConfig:
    training = RunConfig(task="mqar", task_options={"pairs": 2, "keys": 8, "values": 8}, runs=str(tmp_path / "runs"))
    settings = dict(spec=spec, trials=4, run=training, sampler="grid", heartbeat_seconds=1)
    settings.update(fields)
    return study.SweepConfig(**settings)


def trials_of(config: study.SweepConfig):
    loaded, _ = study.open_study(config)
    return loaded.get_trials(deepcopy=False)


def test_a_grid_sweep_trains_each_variant_once_and_writes_the_results(tmp_path):
    config = config_for(tmp_path, tiny_space(tmp_path), prune=False)
    entries = study.run(config, log=lambda line: None)
    assert len(entries) == 4 and all(e.outcome == "complete" for e in entries)
    assert len({e.variant for e in entries}) == 4
    assert [e.bits for e in entries] == sorted(e.bits for e in entries)
    written = study.write_results(config, entries)
    with open(written["csv"]) as handle:
        rows = handle.read().splitlines()
    assert len(rows) == 5 and rows[0].startswith("rank,trial,outcome,variant,held_out_bits")
    assert [row["trial"] for row in json.load(open(written["json"]))] == [e.trial for e in entries]
    assert os.path.getsize(written["pareto"]) > 10_000
    # Optuna's own plots: the bits trial after trial, and each choice's importance
    for name in ("history", "importance"):
        with open(written[name], "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n", name
    # The best variant is a choice-free, self-contained spec with the winner's identity.
    program = check(written["best"])
    assert not ir.contains_search(program.levels) and ir.variant_id(program) == entries[0].variant
    trained = CliRunner().invoke(cli, ["run", written["best"], "--steps", "1", "--runs", str(tmp_path / "again")])
    assert trained.exit_code == 0, trained.output


def test_a_rerun_resumes_the_study_without_training_again(tmp_path):
    config = config_for(tmp_path, tiny_space(tmp_path), trials=2)
    study.run(config, log=lambda line: None)
    first = {t.number: t.value for t in trials_of(config)}
    config.trials = 3
    lines = []
    study.run(config, log=lines.append)
    after = trials_of(config)
    assert len(after) == 3 and {t.number: t.value for t in after if t.number < 2} == first
    assert sum(line.endswith("tok/s") or "pruned" in line for line in lines) == 1  # one new trial trained


def test_the_same_variant_is_never_trained_twice(tmp_path):
    config = config_for(tmp_path, one_variant_space(tmp_path), sampler="random", trials=2)
    lines = []
    entries = study.run(config, log=lines.append)
    trials = trials_of(config)
    assert [t.user_attrs["outcome"] for t in trials] == ["complete", "duplicate"]
    assert trials[1].value == trials[0].value and trials[1].user_attrs["duplicate_of"] == 0
    assert len(entries) == 1 and sum("training" in line for line in lines) == 1


def test_two_workers_share_one_study_without_duplicating_trials(tmp_path):
    config = config_for(tmp_path, tiny_space(tmp_path, steps=30), workers=2, prune=False)
    study.run(config, log=lambda line: None)
    trials = trials_of(config)
    assert len(trials) == 4
    assert len({t.user_attrs["variant"] for t in trials}) == 4
    assert {t.user_attrs["worker"] for t in trials} == {0, 1}


def trainings_per_variant(trials) -> collections.Counter:
    """How many trials trained each variant: a trial that trains gets its own directory first."""
    return collections.Counter(t.user_attrs["variant"] for t in trials if "directory" in t.user_attrs)


def test_two_workers_that_draw_one_variant_train_it_once(tmp_path):
    # Every draw is the same variant, and the workers start together: without a claim both train it.
    config = config_for(tmp_path, one_variant_space(tmp_path, steps=30), sampler="random", workers=2, prune=False)
    study.run(config, log=lambda line: None)
    trials = trials_of(config)
    assert len(trials) >= 4 and all(t.state.is_finished() for t in trials)
    assert trainings_per_variant(trials) == {trials[0].user_attrs["variant"]: 1}
    trained = [t for t in trials if "directory" in t.user_attrs]
    assert [t.user_attrs["outcome"] for t in trained] == ["complete"]
    assert all(t.user_attrs["outcome"] == "duplicate" and t.user_attrs["duplicate_of"] == trained[0].number
               for t in trials if t is not trained[0])
    # One directory, the trial's own, named by its number.
    assert os.listdir(os.path.join(config.directory, "trials")) == [str(trained[0].number)]
    assert trained[0].user_attrs["directory"] == os.path.join(config.directory, "trials", str(trained[0].number))


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_a_claim_left_by_a_trial_that_stopped_without_training_is_taken_over(tmp_path):
    config = config_for(tmp_path, one_variant_space(tmp_path), sampler="random", trials=1)
    loaded, _ = study.open_study(config)
    claims = study.VariantClaims(config.storage_url)
    crashed = loaded.ask()
    crashed.set_user_attr("variant", "v1")
    assert claims.take(config.name, "v1", crashed.number, lambda n: study._standing_claim(loaded, n, "v1")) is None
    second = loaded.ask()
    second.set_user_attr("variant", "v1")
    # While the first trial runs, its claim stands: the second is told whose it is.
    holder = claims.take(config.name, "v1", second.number, lambda n: study._standing_claim(loaded, n, "v1"))
    assert holder.number == crashed.number
    loaded.tell(crashed, state=optuna.trial.TrialState.FAIL)  # its worker died: no outcome
    assert claims.take(config.name, "v1", second.number, lambda n: study._standing_claim(loaded, n, "v1")) is None
    third = loaded.ask()
    third.set_user_attr("variant", "v1")
    holder = claims.take(config.name, "v1", third.number, lambda n: study._standing_claim(loaded, n, "v1"))
    assert holder.number == second.number


def test_trial_seeds_differ_by_trial_and_by_seed_and_repeat():
    seeds = {study.trial_seed(seed, number) for seed in (0, 1, 7) for number in range(1000)}
    assert len(seeds) == 3000 and all(0 <= s < 2**32 for s in seeds)
    assert study.trial_seed(3, 12) == study.trial_seed(3, 12)


def drawn_rates(config) -> list[float]:
    return [t.params["train / optimizer / lr"] for t in trials_of(config)]


def test_a_resumed_sweep_draws_afresh_and_one_worker_repeats_its_draws(tmp_path):
    spec = tiny_space(tmp_path, steps=1, replace=("adamw(lr=3e-3)", "adamw(lr=loguniform(1e-4, 1e-2))"))
    resumed = config_for(tmp_path, spec, sampler="random", trials=2, study="resumed")
    study.run(resumed, log=lambda line: None)
    resumed.trials = 4
    study.run(resumed, log=lambda line: None)
    rates = drawn_rates(resumed)
    assert len(set(rates)) == 4  # the resumed process did not replay the first draws
    # A sweep run at once draws what the stopped-and-resumed one drew; another --seed, other values.
    at_once = config_for(tmp_path, spec, sampler="random", trials=4, study="at-once")
    study.run(at_once, log=lambda line: None)
    assert drawn_rates(at_once) == rates
    other_seed = config_for(tmp_path, spec, sampler="random", trials=2, study="other-seed", seed=1)
    study.run(other_seed, log=lambda line: None)
    assert not set(drawn_rates(other_seed)) & set(rates)


def test_workers_draw_different_values(tmp_path):
    spec = tiny_space(tmp_path, steps=1, replace=("adamw(lr=3e-3)", "adamw(lr=loguniform(1e-4, 1e-2))"))
    config = config_for(tmp_path, spec, sampler="tpe", trials=4, workers=2)
    study.run(config, log=lambda line: None)
    trials = trials_of(config)
    assert {t.user_attrs["worker"] for t in trials} == {0, 1} and len(set(drawn_rates(config))) == len(trials)


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_the_storage_password_is_never_printed():
    assert study.redact("postgresql+psycopg2://sweeper:s3cret@db.example/sweeps") == \
        "postgresql+psycopg2://sweeper:***@db.example/sweeps"
    assert study.redact("sqlite:////tmp/study.db") == "sqlite:////tmp/study.db"
    assert study.redact("not a url") == "not a url"  # SQLAlchemy cannot parse it, but it has no password
    assert study.redact("postgresql:/sweeper:s3cret@db") == "..."


@pytest.mark.parametrize("scheme, hidden_module, message", [
    ("postgresql+psycopg2", None, "cannot connect to it: connection to server at \"127.0.0.1\""),
    ("postgresql+psycopg2", "psycopg2", "its database driver `psycopg2` is not installed: pip install psycopg2-binary"),
    ("postgresql+psycopg", "psycopg", "its database driver `psycopg` is not installed: pip install 'psycopg[binary]'"),
    # Plain postgresql:// means psycopg2 up to SQLAlchemy 2.0 and psycopg 3 from 2.1: either is named.
    ("postgresql", "psycopg2 psycopg", f"its database driver `{make_url('postgresql://').get_driver_name()}` is not"),
    ("postgres", None, "SQLAlchemy has no database dialect `postgres`"),
])
def test_a_storage_that_cannot_be_opened_is_a_clear_error_without_its_password(tmp_path, monkeypatch, scheme,
                                                                              hidden_module, message):
    if hidden_module is None and scheme.endswith("psycopg2"):
        pytest.importorskip("psycopg2", reason="the PostgreSQL driver: pip install psycopg2-binary (the test extra)")
    for module in (hidden_module or "").split():
        monkeypatch.setitem(sys.modules, module, None)  # importing it fails, as when it is not installed
    url = f"{scheme}://sweeper:s3cret@127.0.0.1:{unused_port()}/sweeps"
    result = CliRunner().invoke(cli, ["sweep", tiny_space(tmp_path), "--trials", "1", "--storage", url,
                                      "--runs", str(tmp_path / "runs")])
    assert result.exit_code == 1, result.output
    assert message in result.output and "sweeper:***@127.0.0.1" in result.output
    assert "s3cret" not in result.output and "Traceback" not in result.output


# Only a bound on a hang: each test waits for an event (a trial's state, a file), however slow
# the machine, and fails on its own terms if the event never comes.
OUTER_TIMEOUT = 1800


def _wait_for(event, process: subprocess.Popen) -> bool:
    """Poll until `event()` holds while `process` runs; False if it ended first."""
    deadline = time.monotonic() + OUTER_TIMEOUT
    while not event():
        if process.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_a_killed_sweep_resumes_and_reruns_the_trial_it_was_in(tmp_path):
    spec = tiny_space(tmp_path, steps=600)  # seconds per trial: the kill lands inside the second
    config = config_for(tmp_path, spec, trials=2, prune=False)
    script = (f"from nestc.search import study\n"
              f"from nestc.runtime.config import RunConfig\n"
              f"study.run(study.SweepConfig(spec={spec!r}, trials=2, run={config.run!r}, sampler='grid', "
              f"heartbeat_seconds=1, prune=False), log=lambda line: None)\n")
    process = subprocess.Popen([sys.executable, "-c", script])
    database = os.path.join(config.directory, "study.db")

    def second_trial_running() -> bool:
        try:
            with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=30) as connection:
                states = [s for (s,) in connection.execute("SELECT state FROM trials ORDER BY number")]
        except sqlite3.OperationalError:  # the database or its tables are not created yet
            return False
        return states == ["COMPLETE", "RUNNING"]

    try:
        assert _wait_for(second_trial_running, process), "the sweep ended before its second trial was running"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    time.sleep(3.5)  # longer than the grace period of three 1-second heartbeats
    study.run(config, log=lambda line: None)
    trials = trials_of(config)
    states = [t.state.name for t in trials]
    assert states == ["COMPLETE", "FAIL", "COMPLETE"]
    # The retry is the killed trial's grid point, enqueued again.
    assert trials[2].params == trials[1].system_attrs["fixed_params"] and trials[2].user_attrs["outcome"] == "complete"


def test_ctrl_c_stops_a_sweep_that_a_rerun_then_finishes(tmp_path):
    spec = tiny_space(tmp_path, steps=800)  # seconds per trial: the signal lands inside the first
    config = config_for(tmp_path, spec, trials=2, prune=False)
    command = [sys.executable, "-m", "nestc", "sweep", spec, "--trials", "2", "--task", "mqar", "--task-option",
               "pairs=2", "--task-option", "keys=8", "--task-option", "values=8", "--sampler", "grid", "--no-prune",
               "--runs", config.run.runs]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    trials = os.path.join(config.directory, "trials")

    def first_trial_training() -> bool:
        return os.path.isdir(trials) and any("metrics.jsonl" in os.listdir(os.path.join(trials, d))
                                             for d in os.listdir(trials))

    assert _wait_for(first_trial_training, process), "the sweep ended before its first trial was training"
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=OUTER_TIMEOUT)
    assert process.returncode == 130 and "run the same command again to resume" in stderr
    assert "Traceback" not in stderr
    interrupted = trials_of(config)
    assert [t.state.name for t in interrupted][:1] == ["FAIL"]
    study.run(config, log=lambda line: None)
    finished = [t for t in trials_of(config) if t.state.name == "COMPLETE"]
    assert len(finished) == 2 and interrupted[0].params in [t.params for t in finished]


def test_invalid_variants_are_reported_skipped_and_counted(tmp_path):
    spec = tiny_space(tmp_path, replace=("every choice(1, 8)", "every choice(1, 7)"))
    config = config_for(tmp_path, spec)
    lines = []
    entries = study.run(config, log=lines.append)
    assert [e.outcome for e in entries][-2:] == ["invalid", "invalid"]
    assert all("does not divide the training context" in e.error for e in entries[-2:])
    assert any("invalid variant, skipped" in line for line in lines)


def test_a_study_run_with_other_settings_is_not_resumed(tmp_path):
    config = config_for(tmp_path, tiny_space(tmp_path), trials=1)
    study.run(config, log=lambda line: None)
    config.run = dataclasses.replace(config.run, steps=3)
    with pytest.raises(study.SweepError, match=r"was run with steps None \(now 3\)"):
        study.open_study(config)


def test_the_pareto_front_keeps_the_points_nothing_beats():
    points = [(1.0, 5.0), (2.0, 3.0), (3.0, 4.0), (4.0, 1.0), (2.0, 3.0)]
    # (3, 4) is beaten by (2, 3); the repeated (2, 3) points do not beat each other.
    assert study.pareto_front(points) == [0, 1, 3, 4]


def test_cli_sweep_trains_and_prints_the_leaderboard(tmp_path):
    spec = tiny_space(tmp_path)
    result = CliRunner().invoke(cli, ["sweep", spec, "--task", "mqar", "--task-option", "pairs=2",
                                      "--trials", "2", "--steps", "2", "--runs", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    assert "sweep leaderboard" in result.output and "best.nest" in result.output


@pytest.mark.parametrize("arguments, message", [
    ([], "--trials N"),
    (["--trials", "2", "--sample", "3"], "--sample lists variants with --dry-run"),
    (["--trials", "2", "--task", "mqar", "--task-option", "colour=3"], "has no option colour"),
])
def test_cli_sweep_usage_errors(tmp_path, arguments, message):
    result = CliRunner().invoke(cli, ["sweep", tiny_space(tmp_path), *arguments])
    assert result.exit_code == 2 and message in result.output


@pytest.mark.parametrize("mode", [["--dry-run"], ["--trials", "2"]])
def test_a_space_with_errors_is_reported_with_spans(tmp_path, mode):
    spec = tiny_space(tmp_path, replace=("objective choice(l2, dot)", "objective choice()"))
    result = CliRunner().invoke(cli, ["sweep", spec, *mode, "--runs", str(tmp_path / "runs")])
    assert result.exit_code == 1 and "error[N0119]: a choice needs at least one option" in result.output
    assert "tiny.nest:7:15" in result.output


def test_a_grid_needs_a_finite_space(tmp_path):
    spec = tiny_space(tmp_path, replace=("adamw(lr=3e-3)", "adamw(lr=loguniform(1e-4, 1e-2))"))
    result = CliRunner().invoke(cli, ["sweep", spec, "--trials", "2", "--sampler", "grid",
                                      "--runs", str(tmp_path / "runs")])
    assert result.exit_code == 1 and "--sampler grid needs a finite space" in result.output


def test_unused_library_levels_do_not_constrain_the_context(tmp_path):
    (tmp_path / "lib.nest").write_text("level slow : mlp {\n    objective task\n    every 256\n}\n"
                                       "level fast extends slow {\n    every 16\n}\n")
    body = 'import "lib.nest"\nmodel {\n    vocab 8\n    dim 8\n    block = residual(BLOCK)\n}\n' \
           'train {\n    context 64\n}\n'
    (tmp_path / "uses_fast.nest").write_text(body.replace("BLOCK", "fast"))
    (tmp_path / "uses_slow.nest").write_text(body.replace("BLOCK", "slow"))
    assert analyze_file(str(tmp_path / "uses_fast.nest")).ok
    slow = analyze_file(str(tmp_path / "uses_slow.nest"))
    assert [d.message for d in slow.diagnostics if d.is_error] == ["chunk size 256 does not divide the training "
                                                                    "context 64"]


def _postgres_binaries() -> str | None:
    """The directory of PostgreSQL's initdb and pg_ctl: on PATH, or where Debian puts them."""
    on_path = shutil.which("initdb")
    candidates = [os.path.dirname(os.path.realpath(on_path))] if on_path else []
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    return next((d for d in candidates if all(os.access(os.path.join(d, tool), os.X_OK)
                                              for tool in ("initdb", "pg_ctl"))), None)


@pytest.fixture
def postgres_server():
    """A PostgreSQL server of this test's own on 127.0.0.1 (a free port; its socket in a temporary
    directory), with a database `sweeps`; yields its (host, port, user). Stopped and deleted at
    the end, whatever the test did. initdb refuses to run as root, so as root the server runs as
    the user `postgres` (or `nobody`)."""
    psycopg2 = pytest.importorskip("psycopg2", reason="the PostgreSQL driver: pip install psycopg2-binary")
    binaries = _postgres_binaries()
    if binaries is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl) on PATH or in /usr/lib/postgresql/*/bin: "
                    "apt-get install postgresql")
    as_user, owner = [], None
    if os.getuid() == 0:
        owner = next((user for user in ("postgres", "nobody") if _user_exists(user)), None)
        if owner is None or shutil.which("runuser") is None:
            pytest.skip("running as root, and initdb refuses root: needs runuser and a user `postgres` or `nobody`")
        as_user = ["runuser", "-u", owner, "--"]
    home = tempfile.mkdtemp(prefix="nestc-postgres-")  # not under tmp_path, which only root may enter
    data, sockets, log = (os.path.join(home, name) for name in ("data", "sockets", "server.log"))
    os.mkdir(sockets)
    if owner is not None:
        account = pwd.getpwnam(owner)
        for path in (home, sockets):
            os.chown(path, account.pw_uid, account.pw_gid)
    port, user = unused_port(), "nestc"

    def tool(name: str, *arguments: str) -> subprocess.CompletedProcess:
        return subprocess.run([*as_user, os.path.join(binaries, name), *arguments], capture_output=True, text=True,
                              timeout=OUTER_TIMEOUT)

    started = False
    try:
        initialised = tool("initdb", "-D", data, "-U", user, "--auth=trust", "--no-sync", "-E", "UTF8",
                           "--locale=C")
        assert initialised.returncode == 0, initialised.stdout + initialised.stderr
        # -w: pg_ctl returns once the server accepts connections (or fails after -t seconds).
        start = tool("pg_ctl", "-D", data, "-l", log, "-w", "-t", "300", "-o",
                     f"-c listen_addresses=127.0.0.1 -p {port} -k {sockets} -c fsync=off", "start")
        started = start.returncode == 0
        assert started, start.stdout + start.stderr + (open(log).read() if os.path.exists(log) else "")
        connection = psycopg2.connect(host="127.0.0.1", port=port, user=user, dbname="postgres")
        connection.autocommit = True  # CREATE DATABASE cannot run inside a transaction
        with connection.cursor() as cursor:
            cursor.execute("CREATE DATABASE sweeps")
        connection.close()
        yield "127.0.0.1", port, user
    finally:
        if started:
            tool("pg_ctl", "-D", data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(home, ignore_errors=True)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def test_two_sweep_processes_on_postgresql_train_each_variant_once(tmp_path, postgres_server):
    host, port, user = postgres_server
    # The server trusts local connections, so any password works: the one given must never be printed.
    url = f"postgresql+psycopg2://{user}:s3cret-pw@{host}:{port}/sweeps"
    spec = tiny_space(tmp_path, steps=30)
    # Eight random draws from four variants: some variants are drawn more than once, some at once.
    command = [sys.executable, "-m", "nestc", "sweep", spec, "--trials", "8", "--sampler", "random", "--task",
               "mqar", "--task-option", "pairs=2", "--task-option", "keys=8", "--task-option", "values=8",
               "--no-prune", "--storage", url, "--study", "on-postgres"]
    # Two machines, each with its own runs directory, sharing one study.
    machines = [subprocess.Popen([*command, "--runs", str(tmp_path / f"machine-{i}")], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [machine.communicate(timeout=OUTER_TIMEOUT) for machine in machines]
    for machine, (stdout, stderr) in zip(machines, outputs):
        assert machine.returncode == 0, stderr
        assert "s3cret-pw" not in stdout + stderr and f"{user}:***@{host}:{port}/sweeps" in stderr
    trials = optuna.load_study(study_name="on-postgres", storage=url).get_trials(deepcopy=False)
    assert all(t.state.is_finished() for t in trials)
    assert sum(t.user_attrs.get("outcome") in study.OUTCOMES_COUNTED for t in trials) >= 8
    trained = trainings_per_variant(trials)
    assert trained and set(trained.values()) == {1}, trained  # no variant trained twice
    assert {t.user_attrs["variant"] for t in trials} == set(trained)  # every variant drawn was trained once
    directories = glob.glob(str(tmp_path / "machine-*" / "sweep-on-postgres" / "trials" / "*"))
    assert len(directories) == sum(trained.values())


def _open_storage_at_once(url: str, together, results) -> None:
    config = study.SweepConfig(spec="space.nest", trials=1, storage=url)
    together.wait(timeout=OUTER_TIMEOUT)
    try:
        study._storage(config)
        results.put("opened")
    except study.SweepError as error:
        results.put(str(error))


def test_workers_that_open_a_new_postgresql_database_at_once_all_open_it(postgres_server):
    # They race to create Optuna's tables; the server refuses the losers' (a duplicate type or key).
    import psycopg2

    host, port, user = postgres_server
    context = multiprocessing.get_context("spawn")
    outcomes = []
    for attempt in range(3):
        connection = psycopg2.connect(host=host, port=port, user=user, dbname="postgres")
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE fresh{attempt}")
        connection.close()
        together, results = context.Barrier(3), context.Queue()
        workers = [context.Process(target=_open_storage_at_once,
                                   args=(f"postgresql+psycopg2://{user}@{host}:{port}/fresh{attempt}", together,
                                         results)) for _ in range(3)]
        for worker in workers:
            worker.start()
        outcomes += [results.get(timeout=OUTER_TIMEOUT) for _ in workers]
        for worker in workers:
            worker.join()
    assert outcomes == ["opened"] * 9


def test_several_spaces_are_swept_each_in_its_own_study(tmp_path):
    first = tiny_space(tmp_path, steps=2)
    second = str(tmp_path / "other.nest")
    shutil.copy(first, second)
    runs = tmp_path / "runs"
    result = CliRunner().invoke(cli, ["sweep", first, second, "--task", "mqar", "--task-option", "pairs=2",
                                      "--trials", "1", "--steps", "2", "--runs", str(runs), "--format", "json"])
    assert result.exit_code == 0, result.output
    boards = json.loads(result.stdout)
    assert list(boards) == [first, second] and all(len(board) == 1 for board in boards.values())
    assert sorted(os.listdir(runs)) == ["sweep-other-mqar", "sweep-tiny-mqar"]
    for name in ("sweep-other-mqar", "sweep-tiny-mqar"):
        assert {"study.db", "leaderboard.csv", "best.nest"} <= set(os.listdir(runs / name))


def test_a_sweep_on_a_language_reports_its_accuracy_at_the_training_lengths_and_beyond_apart(tmp_path):
    config = config_for(tmp_path, tiny_space(tmp_path, steps=1), trials=1)
    config.run = dataclasses.replace(config.run, task="parity", task_options={})
    (entry,) = study.run(config, log=lambda line: None)
    assert entry.outcome == "complete" and 0.0 <= entry.accuracy <= 1.0 and 0.0 <= entry.longer_accuracy <= 1.0
    (trial,) = [d for d in os.listdir(os.path.join(config.directory, "trials"))]
    with open(os.path.join(config.directory, "trials", trial, "metrics.jsonl")) as handle:
        last = json.loads(handle.read().splitlines()[-1])
    assert (entry.accuracy, entry.longer_accuracy) == (last["in_distribution_accuracy"], last["longer_accuracy"])
    assert entry.bits == last["held_out_bits"]  # the objective: bits over both length ranges
    with open(study.write_results(config, [entry])["csv"]) as handle:
        header, row = handle.read().splitlines()
    assert header.startswith("rank,trial,outcome,variant,held_out_bits,accuracy,longer_accuracy,")
    table = io.StringIO()
    study.format_table([entry], task=True, stream=table)
    assert "longer" in table.getvalue() and f"{entry.longer_accuracy:.3f}" in table.getvalue()


def test_the_pareto_plots_tick_labels_are_distinct_and_do_not_overlap():
    import matplotlib.pyplot as plt

    # parameter counts that differ in the fourth digit or repeat, throughputs close together and far apart
    sizes = [10_240, 10_240, 10_496, 10_752, 20_480, 41_000, 1_250_000]
    speeds = [12_345.6, 12_346.1, 12_390.0, 13_000.0, 25_000.0, 3_100.0, 900.0]
    entries = [study.Entry(trial=n, outcome="complete", variant=f"v{n}", bits=3.4521 + 0.0001 * n, accuracy=None,
                           parameters=size, tokens_per_second=speed, choices={})
               for n, (size, speed) in enumerate(zip(sizes, speeds))]
    figure = study.pareto_figure(entries, "corpus")
    try:
        figure.canvas.draw()
        renderer = figure.canvas.get_renderer()
        size_axis, speed_axis = figure.axes
        assert size_axis.get_xscale() == "log"
        assert "parameters" in size_axis.get_xlabel() and "tokens/s" in speed_axis.get_xlabel()
        assert "bits per byte" in size_axis.get_ylabel()
        for axis in (size_axis, speed_axis):
            for ticks in (axis.xaxis.get_majorticklabels(), axis.yaxis.get_majorticklabels()):
                shown = [label for label in ticks if label.get_visible() and label.get_text()]
                texts = [label.get_text() for label in shown]
                assert len(shown) >= 2 and len(set(texts)) == len(texts), texts
                boxes = [label.get_window_extent(renderer) for label in shown]
                for index, box in enumerate(boxes):
                    assert not any(box.overlaps(other) for other in boxes[index + 1:]), texts
            assert not [label.get_text() for label in axis.xaxis.get_minorticklabels() if label.get_text()]
        assert [label.get_text() for label in size_axis.xaxis.get_majorticklabels()][0] == "10.2k"
    finally:
        plt.close(figure)

"""`nestc run`: train a spec's model on the embedded default corpus (byte-level language modelling).

Everything a run writes goes under `runs/<spec>-<variant id>/`: the resolved spec, `metrics.jsonl`,
checkpoints (weights and trainer state together, every `train.checkpoint_every` steps or
`checkpoint_minutes` minutes and at the end; nestc/runtime/rundir.py), the curves (`curves.png`)
and `report.md`. `--resume` continues exactly where the last complete checkpoint stopped.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nestc.backends.outer import MultiRateStepper
from nestc.lang import ir
from nestc.passes.estimate import require_fits
from nestc.runtime import data, distributed, plots, rundir, tasks, tracking
from nestc.runtime.checkpoint import CheckpointError
from nestc.runtime.config import RunConfig
from nestc.runtime.optim import build_optimizer, schedule


class TrainingDiverged(Exception):
    """The loss stopped being a finite number; nothing after it is worth saving."""


@dataclass
class RunResult:
    directory: str
    steps: int
    final_score: float  # held-out bits per byte on a corpus; on a task, held-out accuracy at the training lengths
    unigram_bits: float  # per byte, or per token with a tokenizer
    interrupted: bool = False
    held_out_bits: float = float("nan")  # per byte on a corpus, per scored token on a task
    parameters: int = 0
    tokens_per_second: float = 0.0  # training throughput, evaluations excluded
    longer_accuracy: float | None = None  # on a task's examples longer than training, where it has them


def evaluate(model, validation, context: int, batches: int = 4, batch: int = 4) -> float:
    """Bits per symbol on fixed, evenly spaced windows of the held-out split (bytes, token ids, or
    a sequence tensor)."""
    validation = data.as_sequence(validation)
    count = batches * batch
    stride = max(1, (len(validation) - context - 1) // count)
    starts = [i * stride for i in range(count)]
    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, count, batch):
            chunk = data.windows(validation, starts[start:start + batch], context).to(model.embedding.weight.device)
            logits, _ = model(chunk)
            total += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1),
                                     reduction="sum").item()
            tokens += chunk[:, 1:].numel()
    return total / tokens / math.log(2)


def sample(model, prompt, length: int, temperature: float = 0.8, seed: int = 0, state=None,
           top_k: int | None = None, top_p: float | None = None):
    """Read the prompt (bytes, token ids, or a sequence tensor), then write `length` symbols, the
    memories learning all the while: each drawn from the next-symbol distribution at
    `temperature`, cut to its `top_k` most likely symbols and then to its nucleus of mass `top_p`
    (`truncate`). Returns the symbols written (as bytes when they fit) and the state after them."""
    if not temperature > 0:
        raise ValueError(f"the temperature must be above 0, not {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top-k keeps the k most likely symbols: k must be at least 1, not {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top-p keeps a mass p of the distribution: 0 < p <= 1, not {top_p}")
    generator = torch.Generator().manual_seed(seed)
    device = model.embedding.weight.device
    with torch.no_grad():
        logits, state = model(data.as_sequence(prompt).long()[None].to(device), state)
        out = []
        for _ in range(length):
            probabilities = truncate(torch.softmax(logits[0, -1].float().cpu() / temperature, dim=-1), top_k, top_p)
            symbol = int(torch.multinomial(probabilities, 1, generator=generator))
            out.append(symbol)
            logits, state = model(torch.tensor([[symbol]], device=device), state)
    return (bytes(out) if max(out, default=0) < 256 else out), state


def truncate(probabilities: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """A distribution cut to its `top_k` most likely symbols, then (renormalised) to the smallest
    set of most likely symbols whose mass reaches `top_p`, and renormalised. Equal probabilities
    rank by symbol id, lowest first, as argmax picks: top-k 1 is greedy decoding."""
    order = torch.argsort(probabilities, descending=True, stable=True)
    ranked = probabilities[order]
    if top_k is not None:
        ranked[top_k:] = 0
    if top_p is not None:
        # A symbol stays while the more likely ones hold less than p of the (top-k) mass.
        before = torch.cumsum(ranked, 0) - ranked
        ranked[before >= top_p * ranked.sum()] = 0
    kept = torch.zeros_like(probabilities)
    kept[order] = ranked
    return kept / kept.sum()


def read(model, text, state=None, window: int = 256):
    """Bits per symbol of `text` (bytes, token ids, or a sequence tensor) read as one stream (in
    calls of `window` symbols, the state carried), and the state after it: what the memories
    learned from the text."""
    total, count = 0.0, 0
    text = data.as_sequence(text)
    with torch.no_grad():
        previous = None
        for start in range(0, len(text), window):
            chunk = text[start:start + window].long()[None]
            logits, state = model(chunk, state)
            if previous is not None:  # the last prediction of the previous call meets its target
                total += F.cross_entropy(previous, chunk[:, 0], reduction="sum").item()
                count += 1
            if chunk.shape[1] > 1:
                total += F.cross_entropy(logits[0, :-1], chunk[0, 1:], reduction="sum").item()
                count += chunk.shape[1] - 1
            previous = logits[:, -1]
    return total / max(count, 1) / math.log(2), state


def task_loss(model, batch) -> torch.Tensor:
    """Cross-entropy of the scored next tokens only."""
    logits, _ = model(batch.tokens)
    targets = batch.tokens[:, 1:][batch.scored[:, :-1]]
    return F.cross_entropy(logits[:, :-1][batch.scored[:, :-1]], targets)


HELD_OUT_SCORED = 1_000  # scored tokens per held-out range: an accuracy near 50% is then +-1.6 points (one sd)


@dataclass
class TaskScores:
    """A model's held-out scores on a task, the training lengths and the longer ones apart."""
    in_distribution: float  # exact-match accuracy on examples of the training lengths
    longer: float | None  # on examples longer than any training one; None where the task has none
    bits: float  # cross-entropy per scored token over both (ranks models long before accuracy moves)
    in_distribution_tokens: int  # how many tokens each accuracy is over
    longer_tokens: int


def task_scores(model, task, seed: int, size: int = 64, scored: int = HELD_OUT_SCORED) -> TaskScores:
    """Held-out scores of examples drawn until each length range (the training lengths, and the
    longer ones where the task has them) has at least `scored` scored tokens. The examples go in
    batches of `size` of similar lengths, each batch as long as its longest example: the model is
    causal, so the padding a full-length batch would add after an example cannot change its
    scores, and leaving it out saves a third of the work on a language."""
    rng = random.Random(10_000 + seed)
    device = next(model.parameters()).device
    accuracies, counts, nats = [], [], 0.0
    with torch.no_grad():
        for longer in (False, True) if task.tests_longer else (False,):
            examples, total = [], 0
            while total < scored:
                examples.append(task.fitted(rng, longer))
                total += len(examples[-1][1])
            examples.sort(key=lambda example: len(example[0]))
            right = 0
            for start in range(0, len(examples), size):
                chunk = examples[start:start + size]
                batch = tasks.pad(chunk, max(len(tokens) for tokens, _ in chunk))
                tokens = batch.tokens.to(device)
                mask = batch.scored[:, :-1].to(device)
                logits, _ = model(tokens)
                right += (logits[:, :-1].argmax(-1)[mask] == tokens[:, 1:][mask]).sum().item()
                nats += F.cross_entropy(logits[:, :-1][mask].float(), tokens[:, 1:][mask], reduction="sum").item()
            accuracies.append(right / total)
            counts.append(total)
    return TaskScores(in_distribution=accuracies[0], longer=accuracies[1] if task.tests_longer else None,
                      bits=nats / sum(counts) / math.log(2), in_distribution_tokens=counts[0],
                      longer_tokens=counts[1] if task.tests_longer else 0)


def _batch(train: torch.Tensor, context: int, batch: int, rng: random.Random) -> torch.Tensor:
    return data.windows(train, [rng.randrange(0, len(train) - context) for _ in range(batch)], context)


class Progress:
    """How far the run is: on a terminal, a `rich.progress` bar (steps, train bits, tok/s, ETA)
    with each evaluation printed above it, where it stays; elsewhere (a log file, a pipe) a plain line at the first
    step, then every tenth of the run or `every_seconds` of `clock` time, whichever comes first,
    at each evaluation and at the end. `stream` None: nothing at all."""

    def __init__(self, total: int, stream=sys.stderr, *, start: int = 0, clock=time.perf_counter,
                 console=None, every_seconds: float = 30.0):
        self.total, self.stream, self.first, self.clock = total, stream, start, clock
        self.every_steps, self.every_seconds = max(1, total // 10), every_seconds
        self.began = self.last_line = clock()
        self.bar = None
        if console is None and stream is not None and hasattr(stream, "isatty") and stream.isatty():
            from rich.console import Console

            console = Console(file=stream)
        if console is not None:
            self._start_bar(console)

    def _start_bar(self, console) -> None:
        from rich import progress

        self.bar = progress.Progress(
            progress.BarColumn(bar_width=24), progress.TextColumn("step"), progress.MofNCompleteColumn(),
            progress.TextColumn("train {task.fields[bits]} bits  {task.fields[rate]} tok/s  eta"),
            progress.TimeRemainingColumn(), console=console, get_time=self.clock)
        self.task = self.bar.add_task("train", total=self.total, completed=self.first, bits="-", rate="-")
        self.bar.start()

    def update(self, step: int, loss: float, tokens: int, extra: str = "") -> None:
        """After `step` (counted from 1), with its train loss in bits, the tokens trained since the
        start and, after an evaluation, its note."""
        now = self.clock()
        elapsed = now - self.began
        rate = tokens / elapsed if elapsed > 0 else 0.0
        if self.bar is not None:
            self.bar.update(self.task, completed=step, bits=f"{loss:.3f}", rate=f"{rate:,.0f}")
            if extra:  # an evaluation stays on the screen, above the bar
                self.bar.console.print(f"step {step}/{self.total}:{extra}")
            return
        due = (step == self.first + 1 or step == self.total or step % self.every_steps == 0 or extra
               or now - self.last_line >= self.every_seconds)
        if self.stream is None or not due:
            return
        self.last_line = now
        done = step - self.first
        eta = elapsed / done * (self.total - step) if done else 0.0
        width = 24
        filled = int(width * step / self.total)
        self.stream.write(f"[{'#' * filled}{'.' * (width - filled)}] step {step}/{self.total}  train {loss:.3f} bits  "
                          f"{rate:,.0f} tok/s  eta {eta:.0f}s{extra}\n")
        self.stream.flush()

    def done(self) -> None:
        if self.bar is not None:
            self.bar.stop()


class _StopAfterStep:
    """While active, the first SIGINT only asks the loop to stop after the current step (it is
    `requested`); the second raises KeyboardInterrupt as usual. Signals reach only the main
    thread, so elsewhere (a sweep's worker thread) this does nothing."""

    def __init__(self):
        self.requested, self._previous = False, None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exception) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _quiet(*_args) -> None:
    """The log of a process that is not the first one."""


def train(program: ir.Program, spec_text: str, config: RunConfig = RunConfig(), *,
          corpus: data.Corpus | bytes | None = None, log=print, on_eval=None) -> RunResult:
    """Train `program` on `corpus` (text as bytes, or what `--data` names, data.load; default: the
    embedded corpus) or `config.task`; returns where everything was written and the scores.

    `on_eval(step, held_out_bits)` is called after each evaluation; an exception it raises (a
    sweep's pruning) ends the run there, without a checkpoint."""
    # Flushing subnormals (see _Session._set_up) and the thread count are process state that
    # outlives the run; a caller in the same process (a sweep, a test, a notebook) gets its own back.
    flushing = _flushes_subnormals()
    try:
        with intra_op_threads(config.threads):
            session = _Session(program, spec_text, config, corpus, log)
            try:
                session.run_steps(on_eval)
                return session.report()
            finally:
                session.trackers.close()
    finally:
        torch.set_flush_denormal(flushing)


@contextlib.contextmanager
def intra_op_threads(count: int | None):
    """torch's intra-op thread count set to `count` inside the block (None: left as it is), and
    given back after it."""
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if count is not None:
            torch.set_num_threads(previous)


def _flushes_subnormals() -> bool:
    return (torch.tensor([1e-40]) * 2).item() == 0


class _Session:
    """One run: `__init__` sets it up (directory, model, optimizer, data, resume), `run_steps`
    trains, `report` saves and summarises what was trained."""

    def __init__(self, program: ir.Program, spec_text: str, config: RunConfig, corpus, log):
        self.program, self.config, self.settings = program, config, program.train
        self.steps = config.steps or self.settings.steps
        self.world, self.rank = distributed.start(self.settings.batch, config.device)
        self.device = config.device
        if self.world > 1 and self.device.startswith("cuda"):
            self.device = f"cuda:{torch.cuda.current_device()}"
        self.lead = self.rank == 0
        self.log = _quiet if not self.lead or config.quiet else log  # only the first process reports and writes
        self.name = os.path.splitext(os.path.basename(program.file))[0]
        failure = None
        try:
            self._set_up(spec_text, corpus)
        except Exception as error:  # noqa: BLE001 (each process's own error, raised on all of them below)
            if self.world == 1:
                raise
            failure = error
        if self.world > 1:
            distributed.agree(failure)
        self.start = self._resume()
        self.trackers = self._open_trackers()
        # What trains: under several processes, the model wrapped so that its gradients are averaged.
        self.trained = distributed.wrap(self.model, self.device) if self.world > 1 else self.model
        self._announce()
        self.tokens, self.interrupted, self.step, self.step_cut_short = 0, False, self.start, False
        self.score = self.held_out = float("nan")
        self.task_result = None  # a task's last TaskScores
        self.training_seconds = 0.0

    def _set_up(self, spec_text: str, corpus) -> None:
        """What each process sets up on its own: the directory (the first process), the model,
        the optimizer and the data."""
        config = self.config
        # A training step needs the parameters, their gradients and moments, the batch's states
        # and the activations on the device: refuse, with the estimate, what cannot fit there,
        # before the run directory is made or anything is built.
        require_fits(self.program, training=True, device=self.device)
        self.problem = tasks.make(config.task, self.settings.context, config.task_options) if config.task else None
        # A task and its options are part of what a run is: `-mqar-keys16-pairs4` after the variant id.
        task = [config.task, *(f"{key}{value}" for key, value in sorted(config.task_options.items()))] \
            if config.task else []
        self.directory = config.directory or os.path.join(
            config.runs, "-".join([self.name, ir.variant_id(self.program), *task]))
        if self.lead:
            self._claim_directory()
            with open(os.path.join(self.directory, "spec.nest"), "w", encoding="utf-8") as handle:
                handle.write(spec_text)
        torch.manual_seed(self.settings.seed)
        if torch.device(self.device).type == "cpu":
            # Memories that decay token after token reach subnormal magnitudes (below 1e-38), which x86
            # CPUs compute several times slower; flushing them to zero changes nothing measurable.
            torch.set_flush_denormal(True)
        self.model = self._build_model()
        self.optimizer = build_optimizer(self.settings, self.model)
        self.autocast = torch.autocast(device_type=torch.device(self.device).type, dtype=torch.bfloat16,
                                       enabled=config.bf16)
        self.factor = schedule(self.settings.schedule, self.steps)
        self.base_rates = [group["lr"] for group in self.optimizer.param_groups]
        self.stepper = MultiRateStepper(self.optimizer, self.model)
        self._read_corpus(corpus)
        self.rng = random.Random(self.settings.seed)
        self.generator = torch.Generator().manual_seed(self.settings.seed)
        self.metrics_path = os.path.join(self.directory, rundir.METRICS_FILE)
        self.eval_every = config.eval_every or max(1, self.steps // 5)
        self.parameters = sum(p.numel() for p in self.model.parameters())
        if self.problem is not None and self.model.vocab < tasks.VOCAB_NEEDED:
            raise ValueError(f"task `{config.task}` uses token ids up to {tasks.VOCAB_NEEDED - 1}, but the model's "
                             f"vocab is {self.model.vocab}: --set model.vocab={tasks.VOCAB_NEEDED} or more")

    def _build_model(self):
        from nestc.backends import compiled, reference

        if self.config.backend == "compiled":
            from nestc.backends.fx import DEFAULT_PASSES

            model = compiled.build(self.program, torch_compile=self.config.compile,
                                   graph_passes=DEFAULT_PASSES if self.config.graph else None)
        else:
            model = reference.build(self.program)
        return model.to(self.device)

    def _read_corpus(self, corpus: data.Corpus | bytes | None) -> None:
        """The training and held-out splits, one sequence of bytes or token ids (a tokenizer's
        or a token file's)."""
        if not isinstance(corpus, data.Corpus):
            corpus = data.Corpus(data.default_corpus() if corpus is None else corpus, "the corpus")
        self.unit, self.decode = ("token", data.token_numbers) if corpus.tokenized else ("byte", bytes)
        symbols, tokenizer, encoder = corpus.symbols, self.config.tokenizer, None
        if tokenizer is not None and corpus.tokenized:  # the ids are the tokenizer's already: it decodes them
            encoder = data.load_tokenizer(tokenizer)
        elif tokenizer is not None:
            symbols, encoder = data.tokenize(symbols, tokenizer)
            self.unit = "token"
        if encoder is not None:
            self.decode = lambda ids: encoder.decode(list(ids)).encode("utf-8")  # noqa: E731
            if self.lead:  # the run's own copy: generate, eval and memorize read and write with it
                encoder.save(os.path.join(self.directory, rundir.TOKENIZER_FILE))
        symbols = data.as_sequence(symbols)
        self.train_symbols, self.validation = data.split(symbols)
        if self.config.task is None:
            self._check_corpus_fits(symbols, corpus.origin, encoder)
        self.unigram = data.unigram_bits(self.train_symbols, self.validation, self.model.vocab)

    def _check_corpus_fits(self, symbols: torch.Tensor, origin: str, encoder) -> None:
        """The model must have a token id for every symbol, and a training window (context plus
        its next token) must fit in each split."""
        unit, context, vocab = self.unit, self.settings.context, self.model.vocab
        top = data.largest(symbols)
        if top >= vocab:
            if encoder is not None:
                raise data.DataError(f"--tokenizer {self.config.tokenizer}: token ids reach {top}, but the model's "
                                     f"vocab is {vocab}: --set model.vocab={max(encoder.get_vocab_size(), top + 1)}")
            if unit == "token":
                raise data.DataError(f"{origin}: token ids reach {top}, but the model's vocab is {vocab}: "
                                     f"--set model.vocab={top + 1} or more")
            raise data.DataError(f"the corpus has byte values up to {top}, but model.vocab is "
                                 f"{vocab}: --set model.vocab=256 (one id per byte value)")
        shortest = min(len(self.train_symbols), len(self.validation))
        if shortest <= context:
            raise data.DataError(f"train.context is {context} {unit}s, but the corpus's shorter split has only "
                                 f"{shortest}: --set train.context={max(2, shortest // 2)} or a larger corpus (--data)")

    def _claim_directory(self) -> None:
        """Create the run directory; one that holds an earlier run is continued (--resume),
        started over (--overwrite), or refused, never silently replaced."""
        directory, config = self.directory, self.config
        if rundir.old_layout(directory) and (config.resume or not config.overwrite):
            raise CheckpointError(f"`{directory}` was written by an older nestc (its weights and trainer state at the "
                                  "top level, the trainer state once a pickle, which nestc no longer reads since "
                                  "loading one can run code); start over with --overwrite")
        if rundir.holds_run(directory) and not config.resume:
            if not config.overwrite:
                found = rundir.latest(directory)
                where = f"a checkpoint at step {found.step}" if found else "no checkpoint"
                raise CheckpointError(f"`{directory}` already holds a run of this spec ({where}): continue it with "
                                      "--resume, or start it over with --overwrite")
            rundir.clear(directory)
        os.makedirs(directory, exist_ok=True)

    def _resume(self) -> int:
        """The step to start from: the newest complete checkpoint's with --resume, else 0. Under
        several processes the first one decides and sends the checkpoint to the others."""
        found = None
        if self.config.resume:
            found = rundir.latest(self.directory, self.log) if self.world == 1 else self._receive_checkpoint()
        if found is None:
            if self.config.resume:
                self.log(f"nothing to resume in {self.directory}: starting at step 0")
            if self.lead:
                rundir.cut_metrics(self.metrics_path, 0)
            return 0
        failure = None
        try:
            start = rundir.restore(found, self.model, self.optimizer, self.generator, self.rng)
        except CheckpointError as error:
            if self.world == 1:
                raise
            failure = error
        if self.world > 1:
            distributed.agree(failure)
            if not self.lead:
                shutil.rmtree(found.directory, ignore_errors=True)
        if self.lead:
            rundir.cut_metrics(self.metrics_path, found.step)
        self.log(f"resuming {self.directory} at step {found.step}")
        return start

    def _receive_checkpoint(self) -> rundir.Checkpoint | None:
        """The first process's newest checkpoint, on every process: the others receive its files
        into a temporary directory, so only the first process's node needs the run directory."""
        found, failure = None, None
        if self.lead:
            try:
                found = rundir.latest(self.directory, self.log)
            except CheckpointError as error:
                failure = error
        distributed.agree(failure)
        sent = (str(found.step).encode() if found else b"") if self.lead else None
        step = distributed.broadcast_bytes(sent, 0)
        if not step:
            return None
        if self.lead:
            for path in (found.model_file, found.trainer_file):
                with open(path, "rb") as handle:
                    distributed.broadcast_bytes(handle.read(), 0)
            return found
        received = rundir.Checkpoint(tempfile.mkdtemp(prefix="nestc-resume-"), int(step))
        for path in (received.model_file, received.trainer_file):
            with open(path, "wb") as handle:
                handle.write(distributed.broadcast_bytes(None, 0))
        return received

    def _open_trackers(self) -> tracking.Trackers:
        """The first process's trackers (it alone writes metrics.jsonl); one that cannot start (an
        event directory it cannot write) stops every process with its message."""
        trackers, failure = tracking.Trackers(), None
        if self.lead:
            try:
                trackers = tracking.open_trackers(self.config.track, self.directory,
                                                  os.path.basename(self.directory), self._hyperparameters(),
                                                  self.start, self.config.tensorboard_dir)
            except Exception as error:  # noqa: BLE001 (raised on every process below)
                if self.world == 1:
                    raise
                failure = error
        if self.world > 1 and self.config.track:  # every process has the same flags
            distributed.agree(failure)
        return trackers

    def _hyperparameters(self) -> dict:
        """What the trackers record the run as: its spec, training settings and size."""
        settings = self.settings
        return {"spec": self.program.file, "variant": ir.variant_id(self.program), "backend": self.config.backend,
                "steps": self.steps, "batch": settings.batch, "context": settings.context, "seed": settings.seed,
                "clip": float(settings.clip), "optimizer": settings.optimizer.name,
                "schedule": settings.schedule.name, "processes": self.world, "parameters": self.parameters,
                "data": self.config.task or "corpus", "unit": self.unit, "bf16": self.config.bf16}

    def _announce(self) -> None:
        context, batch, unit = self.settings.context, self.settings.batch, self.unit
        what = f"training {self.program.file} ({self.parameters:,} parameters, {self.config.backend} backend" \
            + (", bfloat16 autocast)" if self.config.bf16 else ")")
        if self.problem is None:
            self.log(f"{what} for {self.steps} steps of {batch}x{context} {unit}s; unigram baseline "
                     f"{self.unigram:.3f} bits/{unit}" + (f"; {self.world} processes" if self.world > 1 else ""))
        else:
            longer = f", and apart on {self.problem.lengths(True)}" if self.problem.tests_longer else ""
            self.log(f"{what} on task `{self.config.task}` for {self.steps} steps of {batch}x{context} tokens; "
                     f"accuracy measured on {self.problem.lengths(False)}{longer}")

    def run_steps(self, on_eval) -> None:
        """Train from the start step to the last, logging each step and checkpointing on the
        spec's cadence. A Ctrl-C (SIGINT) stops the run after the step it interrupts, so that the
        final checkpoint is of a whole step; a second one stops it at once, and the last periodic
        checkpoint stands."""
        progress = Progress(self.steps, stream=sys.stderr if self.lead and not self.config.quiet else None,
                            start=self.start)
        every, minutes = self.settings.checkpoint_every, self.settings.checkpoint_minutes
        last_save = time.monotonic()
        try:
            with _StopAfterStep() as stop, \
                    open(self.metrics_path if self.lead else os.devnull, "a", encoding="utf-8") as metrics:
                # `self.step` counts the steps done: after a Ctrl-C, not the one it interrupted.
                for self.step in range(self.start, self.steps):
                    step_start = time.perf_counter()
                    loss = self._train_step(self.step)
                    self.tokens += self.settings.batch * self.settings.context
                    self.training_seconds += time.perf_counter() - step_start
                    record = {"step": self.step + 1, "loss": loss.item(), "lr": self.optimizer.param_groups[0]["lr"]}
                    due = self.lead and ((self.step + 1) % self.eval_every == 0 or self.step + 1 == self.steps)
                    extra = self._evaluate(record) if due else ""
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                    self.trackers.log(record)
                    progress.update(self.step + 1, loss.item() / math.log(2), self.tokens, extra)
                    if due and on_eval is not None:
                        on_eval(self.step + 1, self.held_out)
                    by_count = every and (self.step + 1) % every == 0
                    if by_count or (minutes and time.monotonic() - last_save >= 60 * minutes):
                        if self.lead:
                            os.fsync(metrics.fileno())  # the log reaches at least as far as the checkpoint
                            self._save(self.step + 1)
                        last_save = time.monotonic()
                    if stop.requested if self.world == 1 else distributed.any_process(stop.requested):
                        self.step += 1
                        self.interrupted = True
                        break
                else:
                    self.step = self.steps
        except KeyboardInterrupt:
            self.interrupted, self.step_cut_short = True, True
        finally:  # a diverged run or a pruned trial too: a terminal gets its cursor back
            progress.done()
        if self.world > 1:
            self.trained = self.model
            distributed.finish()

    def _save(self, step: int) -> rundir.Checkpoint:
        return rundir.save(self.directory, self.model, self.optimizer, step, self.generator, self.rng)

    def _train_step(self, step: int) -> torch.Tensor:
        """One optimizer step on one batch; returns its loss (averaged over the processes)."""
        model, batch, world = self.trained, self.settings.batch, self.world
        for group, rate in zip(self.optimizer.param_groups, self.base_rates):
            group["lr"] = rate * self.factor(step)
        # Every process draws the same global batch and trains on its own slice of it.
        shard = slice(self.rank * batch // world, (self.rank + 1) * batch // world)
        # A step that updates no parameter only accumulates: the processes exchange its gradients
        # with the next step's (averaging is linear, so the sum is the same), and clipping waits
        # for the step that applies them.
        updates = self.stepper.any_due(step)
        with contextlib.nullcontext() if world == 1 or updates else model.no_sync():
            with self.autocast:
                if self.problem is None:
                    tokens_batch = _batch(self.train_symbols, self.settings.context, batch, self.rng)[shard]
                    tokens_batch = tokens_batch.to(self.device)
                    logits, _ = model(tokens_batch)
                    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                           tokens_batch[:, 1:].reshape(-1))
                else:
                    whole = self.problem.batch(self.rng, batch)
                    loss = task_loss(model, tasks.Batch(whole.tokens[shard].to(self.device),
                                                        whole.scored[shard].to(self.device)))
            logged = distributed.mean(loss) if world > 1 else loss  # so that every process sees a divergence
            if not torch.isfinite(logged):
                raise TrainingDiverged(f"the loss is {logged.item()} at step {step + 1}: training diverged; "
                                       "lower the learning rate (--set train.optimizer=adamw(lr=...)), the "
                                       "memories' lr gates, or raise train.clip")
            # The stepper clears the gradients it applied and keeps accumulating the others.
            loss.backward()
        if self.settings.clip and updates:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.clip)
        self.stepper.step(step)
        return logged

    def _evaluate(self, record: dict) -> str:
        """Score the model on the held-out split into `record`; returns the progress line's note."""
        if self.problem is None:
            self.score = self.held_out = evaluate(self.model, self.validation, self.settings.context)
            record["eval_bits_per_byte"] = self.score
            return f"  eval {self.score:.3f} bits/{self.unit}"
        self.task_result = scores = task_scores(self.model, self.problem, self.settings.seed)
        self.score, self.held_out = scores.in_distribution, scores.bits
        record.update(self._final_scores())
        return f"  held-out accuracy {scores.in_distribution:.3f}" + (
            f", longer {scores.longer:.3f}" if scores.longer is not None else "")

    def _final_scores(self) -> dict:
        """The scores the trackers file beside the hyperparameters, under metrics.jsonl's names."""
        if self.problem is None:
            return {"eval_bits_per_byte": self.score}
        scores = self.task_result
        if scores is None:  # interrupted before the first evaluation
            return {"in_distribution_accuracy": math.nan, "held_out_bits": math.nan}
        longer = {} if scores.longer is None else {"longer_accuracy": scores.longer}
        return {"in_distribution_accuracy": scores.in_distribution, **longer, "held_out_bits": scores.bits}

    def _task_summary(self) -> str:
        """The task's held-out accuracies, each with the lengths and the number of tokens it is over."""
        problem, scores = self.problem, self.task_result
        summary = f"held-out accuracy {scores.in_distribution:.3f} on {problem.lengths(False)} (as trained), " \
                  f"over {scores.in_distribution_tokens:,} scored tokens"
        if scores.longer is not None:
            summary += f"; {scores.longer:.3f} on {problem.lengths(True)} (longer than training), " \
                       f"over {scores.longer_tokens:,}"
        return summary + f"; {scores.bits:.3f} bits per scored token"

    def report(self) -> RunResult:
        """Save the final checkpoint and the curves, write report.md (with a sample on a corpus),
        and return the scores."""
        if self.lead and self.start == self.steps:  # resumed a finished run: nothing trained, so score it here
            self._evaluate({})
        directory, step, score, unigram = self.directory, self.step, self.score, self.unigram
        result = RunResult(directory, step, score, unigram, self.interrupted, held_out_bits=self.held_out,
                           parameters=self.parameters,
                           tokens_per_second=self.tokens / self.training_seconds if self.training_seconds else 0.0,
                           longer_accuracy=self.task_result.longer if self.task_result else None)
        if not self.lead:
            return result
        if self.step_cut_short:  # the state is part-way through a step: keep the last whole one
            found = rundir.latest(directory)
            self.log(f"interrupted during step {step + 1}: " + (
                f"the checkpoint of step {found.step} stands; continue with --resume" if found
                else "no checkpoint yet; rerun with --overwrite to start over"))
            return result
        self._save(step)
        self.trackers.finish(step, self._final_scores())
        plots.training_curves(directory, baseline=None if self.problem is not None else unigram,
                              unit="token" if self.problem is not None else self.unit)
        if self.interrupted:
            self.log(f"interrupted at step {step}: checkpoint saved; continue with --resume")
            return result
        if self.problem is not None:
            summary = self._task_summary()
            with open(os.path.join(directory, "report.md"), "w", encoding="utf-8") as handle:
                handle.write(f"# {self.name} on {self.config.task}\n\nsteps {step}, {summary}\n")
            self.log(summary)
            self.log(f"saved in {directory}/")
            return result
        unit = self.unit
        prompt = self.validation[:64].tolist()
        written, _ = sample(self.model, prompt, self.config.sample_bytes, seed=self.settings.seed)
        prompt = self.decode(prompt)
        written = self.decode(written)
        with open(os.path.join(directory, "report.md"), "w", encoding="utf-8") as handle:
            handle.write(f"# {self.name}\n\nsteps {step}, final eval {score:.3f} bits/{unit} (unigram baseline "
                         f"{unigram:.3f})\n\nthe prompt (the held-out text's start):\n\n```\n"
                         f"{prompt.decode('utf-8', 'replace')}\n```\n\nthe sample written after it:\n\n```\n"
                         f"{written.decode('utf-8', 'replace')}\n```\n")
        self.log(f"final eval {score:.3f} bits/{unit} (unigram baseline {unigram:.3f})")
        self.log("sample: " + written.decode("utf-8", "replace").replace("\n", " ")[:120])
        self.log(f"saved in {directory}/ (checkpoints/, metrics.jsonl, curves.png, report.md)")
        return result

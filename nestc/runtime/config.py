"""The settings of one training run, shared by `nestc run`, `nestc sweep` and the sweep's trials.

Torch-free, so that a sweep's configuration can hold one without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RunConfig:
    """How a run trains: one field per `nestc run` flag that reaches the loop (the flags that
    change the spec, `--set` and `--seed`, are already in the program). `nestc sweep` trains each
    trial with one of these, quiet."""
    steps: int | None = None  # default: the spec's train { steps }
    backend: str = "compiled"
    runs: str = "runs"
    directory: str | None = None  # default: <runs>/<spec>-<variant id>[-<task>]
    resume: bool = False
    overwrite: bool = False  # start over in a directory that holds a run (else that is an error)
    eval_every: int | None = None  # default: 5 evaluations a run
    task: str | None = None  # default: the corpus
    task_options: dict = field(default_factory=dict)
    tokenizer: str | None = None
    device: str = "cpu"
    threads: int | None = None  # torch's intra-op threads while this run trains; None: leave the process's
    bf16: bool = False
    compile: bool = False  # each segment through torch.compile (docs/backends.md)
    graph: bool = False  # each segment through the rewritten fx graph
    quiet: bool = False  # no log and no progress line
    track: tuple[str, ...] = ()  # trackers beside metrics.jsonl: tensorboard, wandb, mlflow (runtime/tracking.py)
    tensorboard_dir: str | None = None  # default: the run directory's tensorboard/
    sample_bytes: int = 160  # the sample written into report.md

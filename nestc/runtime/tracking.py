"""Where a run's metrics go besides `metrics.jsonl`: TensorBoard, Weights & Biases or MLflow
(`nestc run --track KIND`, repeatable).

The training loop talks to one `Trackers`: `log` with each metrics.jsonl record, `finish` with the
final scores at the end (the run's hyperparameters beside them), `close` always. Each kind's
library is imported only when that kind is asked for; one that is missing is a `TrackingError`
naming the package to install.
"""

from __future__ import annotations

import importlib
import os

# The package each kind needs (and the pip extra that brings it, where nestc has one).
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
INSTALL = {"tensorboard": "pip install 'nestc[tensorboard]'", "wandb": "pip install wandb",
           "mlflow": "pip install mlflow"}
KINDS = tuple(PACKAGES)
TENSORBOARD_DIRECTORY = "tensorboard"  # inside the run directory, unless --tensorboard-dir says where
TRAIN_KEYS = ("loss", "lr")  # the records' other numbers are held-out scores


class TrackingError(Exception):
    """A tracker asked for that cannot be used: the message names the package to install."""


def require(kind: str):
    """The library `kind` logs through, imported; a `TrackingError` when it is not installed."""
    package = PACKAGES[kind]
    try:
        return importlib.import_module(package)
    except ImportError:
        raise TrackingError(f"--track {kind} needs the `{package}` package, which is not installed: "
                            f"{INSTALL[kind]}") from None


def tag(key: str) -> str:
    """A metrics.jsonl key as the tracker's metric name: `train/loss`, `eval/eval_bits_per_byte`."""
    return f"{'train' if key in TRAIN_KEYS else 'eval'}/{key}"


class _TensorBoard:
    def __init__(self, directory: str, name: str, hyperparameters: dict, first_step: int):
        require("tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.hyperparameters = hyperparameters
        # A resumed run hides the events its killed predecessor logged after the checkpoint it resumes.
        self.writer = SummaryWriter(log_dir=directory, purge_step=first_step + 1 if first_step else None)

    def log(self, step: int, metrics: dict) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(tag(key), value, step)
        self.writer.flush()

    def finish(self, step: int, final: dict) -> None:
        # TensorBoard's hparams plugin: one session (in `hparams/`) of the settings and the scores.
        self.writer.add_hparams(self.hyperparameters, {tag(k): v for k, v in final.items()}, run_name="hparams",
                                global_step=step)

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, directory: str, name: str, hyperparameters: dict, first_step: int):
        wandb = require("wandb")
        self.run = wandb.init(project="nestc", name=name, dir=directory, config=hyperparameters)

    def log(self, step: int, metrics: dict) -> None:
        self.run.log({tag(k): v for k, v in metrics.items()}, step=step)

    def finish(self, step: int, final: dict) -> None:
        self.run.summary.update({tag(k): v for k, v in final.items()})

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    def __init__(self, directory: str, name: str, hyperparameters: dict, first_step: int):
        self.mlflow = require("mlflow")
        self.mlflow.start_run(run_name=name)
        self.mlflow.log_params(hyperparameters)

    def log(self, step: int, metrics: dict) -> None:
        self.mlflow.log_metrics({tag(k): v for k, v in metrics.items()}, step=step)

    def finish(self, step: int, final: dict) -> None:
        self.mlflow.log_metrics({tag(k): v for k, v in final.items()}, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


_MAKERS = {"tensorboard": _TensorBoard, "wandb": _WandB, "mlflow": _MLflow}


class Trackers:
    """The trackers of one run (none: every call does nothing)."""

    def __init__(self, trackers=()):
        self.trackers = list(trackers)

    def log(self, record: dict) -> None:
        """One metrics.jsonl record: its numbers at its step."""
        metrics = {key: value for key, value in record.items() if key != "step"}
        for tracker in self.trackers:
            tracker.log(record["step"], metrics)

    def finish(self, step: int, final: dict) -> None:
        for tracker in self.trackers:
            tracker.finish(step, final)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()


def open_trackers(kinds, run_directory: str, name: str, hyperparameters: dict, first_step: int = 0,
                  tensorboard_directory: str | None = None) -> Trackers:
    """A tracker of each kind in `kinds` for the run in `run_directory` starting after `first_step`;
    TensorBoard writes into `tensorboard_directory` (default: the run directory's `tensorboard/`)."""
    opened = []
    try:
        for kind in dict.fromkeys(kinds):  # each once, in the order asked
            directory = (tensorboard_directory or os.path.join(run_directory, TENSORBOARD_DIRECTORY)) \
                if kind == "tensorboard" else run_directory
            opened.append(_MAKERS[kind](directory, name, hyperparameters, first_step))
    except BaseException:
        Trackers(opened).close()
        raise
    return Trackers(opened)

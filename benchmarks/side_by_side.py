"""Training steps of models timed side by side in one process, for the benchmark scripts that
compare two plans or two specs (hope_momentum.py, scan_form.py): the header they print, one
forward and backward pass, and the alternating repeats."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time

import torch


def print_header(threads: int) -> None:
    """The command and the machine, with the threads and the load average the figures ran under."""
    torch.set_num_threads(threads)
    print("command: python " + " ".join(sys.argv))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
          f"{threads} thread(s), load average {os.getloadavg()[0]:.1f}")


def step_seconds(model, tokens: torch.Tensor) -> float:
    """One forward and backward pass of the next-token loss."""
    start = time.perf_counter()
    logits, _ = model(tokens)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, model.vocab), tokens[:, 1:].reshape(-1))
    loss.backward()
    return time.perf_counter() - start


def alternating_times(models: dict, tokens: torch.Tensor, repeats: int) -> dict[str, list[float]]:
    """Each model's step times: two untimed steps each, then `repeats` rounds taking one step of
    each model in turn, so that the machine's drift falls on all of them alike."""
    for model in models.values():
        for _ in range(2):
            step_seconds(model, tokens)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            times[name].append(step_seconds(model, tokens))
    return times


def print_times(times: dict[str, list[float]], scale: float, unit: str, width: int) -> list[float]:
    """The median and the range of each model's times (in `unit`, seconds times `scale`); returns
    the medians in seconds."""
    for name, values in times.items():
        print(f"  {name:{width}s} {statistics.median(values) * scale:8.3f} {unit}  "
              f"({min(values) * scale:.3f}-{max(values) * scale:.3f})")
    return [statistics.median(values) for values in times.values()]

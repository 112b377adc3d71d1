"""Hope's training step with its memories' inner optimizer DGD with momentum (specs/hope_momentum.nest,
as the paper trains it, NL Table 6) next to plain DGD (specs/hope.nest, the main job), side by side
in one process.

    python benchmarks/hope_momentum.py [--batch 2] [--repeats 7] [--threads 1]

Both are compiled the same way (the momentum lowers to the built-in dgd_momentum, fused across
the five memories); the figure is one forward and backward pass of a batch of 256-byte windows
(the main job's per-process batch is 2), the variants alternating, after two untimed steps each.
Prints the median and the range of the repeats, and their ratio.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings

import torch

from nestc.backends import compiled
from nestc.lang.sema import analyze_source
from nestc.lang.sema.imports import read_source

SPECS = {"DGD with momentum (hope_momentum.nest)": "specs/hope_momentum.nest",
         "plain DGD (hope.nest)": "specs/hope.nest"}


def build(spec: str):
    result = analyze_source(read_source(spec))
    if not result.ok:
        raise SystemExit("\n".join(d.message for d in result.diagnostics))
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", compiled.CompileWarning)  # both in closed form, or say so
        return compiled.build(result.program)


def step_seconds(model, tokens: torch.Tensor) -> float:
    start = time.perf_counter()
    logits, _ = model(tokens)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, model.vocab), tokens[:, 1:].reshape(-1))
    loss.backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("command: python " + " ".join(sys.argv))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
          f"{args.threads} thread(s), load average {os.getloadavg()[0]:.1f}")
    models = {name: build(spec) for name, spec in SPECS.items()}
    tokens = torch.randint(0, 256, (args.batch, 256), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {name: [] for name in models}
    for name, model in models.items():
        for _ in range(2):
            step_seconds(model, tokens)
    for _ in range(args.repeats):
        for name, model in models.items():
            times[name].append(step_seconds(model, tokens))
    print(f"\nfwd+bwd of {args.batch} x 256 bytes, {args.repeats} repeats (median, min-max):")
    for name, values in times.items():
        print(f"  {name:38s} {statistics.median(values):.3f} s  ({min(values):.3f}-{max(values):.3f})")
    momentum, plain = (statistics.median(values) for values in times.values())
    print(f"  ratio momentum / plain: {momentum / plain:.2f}")


if __name__ == "__main__":
    main()

"""Gated DeltaNet on MQAR with its decay initialised as Mamba-2 does, against the former init.

    python benchmarks/gated_deltanet_init.py [--steps 500] [--seeds 0] [--lr 3e-3]

specs/gated_deltanet.nest starts its retain gate near 1 (softplus of the bias log-uniform over
[1e-3, 1e-1], A = 1: retain 0.999 to 0.905 across the heads). The former line,
`retain = x |> proj(bias=true) |> softplus |> scale(-1) |> exp`, started near exp(-softplus(0)),
about 0.5 per token: a memory with a half-life under one token. Each run is `nestc run` on MQAR
(context 64, 8 pairs, batch 32: issue 14's setting), one thread, a fresh run directory; the table
gives the held-out accuracy the run prints at its end.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

SPEC = "specs/gated_deltanet.nest"
FORMER_RETAIN = "x |> proj(bias=true) |> softplus |> scale(-1) |> exp"
INITS = {"Mamba-2 (the spec)": [], "former": ["--set", f"level.mixer.retain={FORMER_RETAIN}"]}


def run(extra: list[str], steps: int, seed: int, lr: float, runs: str) -> tuple[float, float]:
    command = [sys.executable, "-m", "nestc", "run", SPEC, "--task", "mqar", "--task-option", "pairs=8",
               "--set", "train.context=64", "--set", "train.batch=32", "--set", f"train.seed={seed}",
               "--set", f"train.optimizer=adamw(lr={lr}, weight_decay=0.1)", "--steps", str(steps),
               "--threads", "1", "--runs", runs, *extra]
    started = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{completed.stderr}")
    found = re.search(r"held-out accuracy ([0-9.]+) on examples", completed.stdout + completed.stderr)
    if found is None:
        sys.exit(f"no final accuracy in the output of {' '.join(command)}")
    return float(found.group(1)), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()
    print(f"command: python {' '.join(sys.argv)}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}")
    print(f"| init | seed | held-out accuracy after {args.steps} steps | seconds |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as runs:
        for seed in args.seeds:
            for name, extra in INITS.items():
                accuracy, seconds = run(extra, args.steps, seed, args.lr, os.path.join(runs, f"{seed}-{len(extra)}"))
                print(f"| {name} | {seed} | {accuracy:.3f} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()

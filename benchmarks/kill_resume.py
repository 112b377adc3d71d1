"""SIGKILL `nestc run` at random moments, resume after each kill, and count what survived.

    python benchmarks/kill_resume.py --kills 100

The run checkpoints every step (a tiny DeltaNet). Every other kill comes at a random moment; the
others come as soon as a checkpoint's write has begun, so that many land inside it. After each
kill the script checks that the run directory still has a complete checkpoint (or none yet, if
the kill came before the first), and resumes from it. At the end it finishes the run and
compares its losses and weights with an uninterrupted run of the same spec. It prints the count
of each outcome; resume is exact when both comparisons say "equal".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file

from nestc.runtime import rundir

TINY = ["--set", "model.dim=16", "--set", "model.heads=2", "--set", "model.layers=1", "--set", "train.batch=2",
        "--set", "train.context=32"]


def _losses(directory: str) -> list[float]:
    with open(os.path.join(directory, "metrics.jsonl"), encoding="utf-8") as handle:
        return [json.loads(line)["loss"] for line in handle]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=100)
    parser.add_argument("--steps", type=int, default=3000, help="more than the kills leave time for")
    parser.add_argument("--spec", default="specs/deltanet.nest")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    args = parser.parse_args()
    print("command:", " ".join([os.path.basename(sys.executable), *sys.argv]))
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"torch {torch.__version__}")
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as scratch:
        base = [sys.executable, "-m", "nestc", "run", args.spec, *TINY, "--steps", str(args.steps)]
        whole = subprocess.run([*base, "--runs", os.path.join(scratch, "whole")], capture_output=True, text=True)
        if whole.returncode:
            sys.exit(f"the uninterrupted run failed:\n{whole.stderr[-2000:]}")
        runs = os.path.join(scratch, "killed")
        command = [*base, "--checkpoint-every", "1", "--runs", runs, "--resume"]
        counts = {"killed": 0, "killed inside a checkpoint write": 0, "finished before the kill": 0,
                  "resumable after the kill": 0, "not resumable": 0}
        for kill in range(args.kills):
            process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=environment)
            process.stderr.readline()  # it is training (or resuming) now
            (name,) = os.listdir(runs)
            directory = os.path.join(runs, name)
            root = os.path.join(directory, rundir.CHECKPOINTS)
            if kill % 2:  # as soon as a checkpoint write has begun
                while process.poll() is None and not (os.path.isdir(root) and any(
                        entry.startswith(".partial-") for entry in os.listdir(root))):
                    pass
            else:  # at a random moment
                try:
                    process.wait(timeout=rng.uniform(0.05, 0.8))
                except subprocess.TimeoutExpired:
                    pass
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                counts["killed"] += 1
            else:
                counts["finished before the kill"] += 1
            process.wait()
            process.stderr.close()
            if os.path.isdir(root) and any(entry.startswith(".partial-") for entry in os.listdir(root)):
                counts["killed inside a checkpoint write"] += 1
            try:
                usable = rundir.latest(directory) is not None or not os.path.isdir(root)
            except rundir.CheckpointError:
                usable = False
            counts["resumable after the kill" if usable else "not resumable"] += 1
        final = subprocess.run(command, capture_output=True, text=True, env=environment)
        if final.returncode:
            sys.exit(f"the last resume failed:\n{final.stderr[-2000:]}")
        (name,) = os.listdir(runs)
        killed, reference = os.path.join(runs, name), os.path.join(scratch, "whole", os.listdir(
            os.path.join(scratch, "whole"))[0])
        one = load_file(rundir.latest(killed).model_file)
        two = load_file(rundir.latest(reference).model_file)
        weights_equal = one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
        losses_equal = _losses(killed) == _losses(reference)
    for outcome, count in counts.items():
        print(f"{outcome:>34}: {count}")
    print(f"{'losses vs the uninterrupted run':>34}: {'equal' if losses_equal else 'DIFFER'}")
    print(f"{'weights vs the uninterrupted run':>34}: {'equal' if weights_equal else 'DIFFER'}")


if __name__ == "__main__":
    main()

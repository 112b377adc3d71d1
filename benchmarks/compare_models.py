"""Hope, Titans, DeltaNet and a Transformer at equal steps: the default corpus, mqar and parity.

    python benchmarks/compare_models.py [--steps 50] [--batch 2] [--runs /tmp/nestc-compare]

Every model trains with its own spec's outer level (optimizer, learning rate, schedule) and the
same batch, context (256, as each spec gives it) and number of
steps, through `nestc run`. Prints a Markdown table: held-out bits per byte on the corpus (lower is better) and
held-out accuracy on the tasks: mqar at the training length; parity on strings of the training
lengths and, apart, on strings longer than any training one (up to twice the context).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

SPECS = ["specs/hope.nest", "specs/titans.nest", "specs/deltanet.nest", "specs/transformer.nest"]
TASKS = [None, "mqar", "parity"]


def _finished(runs: str, spec: str, task: str | None, steps: int) -> dict | None:
    """The last metrics record of an earlier run of the same variant that reached `steps`."""
    name = os.path.splitext(os.path.basename(spec))[0]
    suffix = f"-{task}" if task else ""
    if not os.path.isdir(runs):
        return None
    for directory in os.listdir(runs):
        if directory.startswith(name + "-") and directory.endswith(suffix) and \
                (task or not any(directory.endswith(f"-{t}") for t in TASKS if t)):
            path = os.path.join(runs, directory, "metrics.jsonl")
            if os.path.exists(path):
                with open(path, encoding="utf-8") as handle:
                    lines = handle.read().splitlines()
                last = json.loads(lines[-1]) if lines else {}
                # a run of the tasks before issue 17 (one accuracy over mixed lengths) does not count
                if last.get("step") == steps and (task is None or "in_distribution_accuracy" in last):
                    return last
    return None


def final_record(runs: str, spec: str, task: str | None, steps: int, batch: int) -> dict:
    """Train (or reuse a finished run of the same variant) and return its last metrics record."""
    last = _finished(runs, spec, task, steps)
    if last is not None:
        return last
    sets = ["--set", f"train.batch={batch}", "--set", "train.context=256"]
    # --overwrite: a run of this variant that did not count (unfinished, or scored by the tasks
    # before issue 17) is trained again rather than stopping the comparison
    command = [sys.executable, "-m", "nestc", "run", spec, "--steps", str(steps), "--runs", runs, "--overwrite", *sets]
    if task:
        command += ["--task", task]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return _finished(runs, spec, task, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--runs", default="/tmp/nestc-compare")
    args = parser.parse_args()
    print(f"{args.steps} steps, batch {args.batch}, context 256; command: python {' '.join(sys.argv)}\n")
    print("| spec | corpus (bits/byte) | mqar (accuracy) | parity (accuracy, as trained) | parity (longer) |")
    print("|---|---|---|---|---|")
    for spec in SPECS:
        corpus, mqar, parity = [final_record(args.runs, spec, task, args.steps, args.batch) for task in TASKS]
        print(f"| {os.path.basename(spec)} | {corpus['eval_bits_per_byte']:.3f} | {mqar['in_distribution_accuracy']:.3f} "
              f"| {parity['in_distribution_accuracy']:.3f} | {parity['longer_accuracy']:.3f} |", flush=True)


if __name__ == "__main__":
    main()

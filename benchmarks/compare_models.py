"""Hope, Titans, DeltaNet and a Transformer at equal steps: the default corpus, mqar and parity.

    python benchmarks/compare_models.py [--steps 50] [--batch 2] [--runs /tmp/nestc-compare]

Every model trains with the same outer level (AdamW, lr 3e-3, cosine with 10 warm-up steps), batch,
context (256: Hope's slowest continuum level updates every 256 tokens) and number of steps, through
`nestc run`. Prints a Markdown table: held-out bits per byte on the corpus (lower is better) and
held-out accuracy on the tasks (sequences twice the training length for parity).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

SPECS = ["specs/hope.nest", "specs/titans.nest", "specs/deltanet.nest", "specs/transformer.nest"]
TASKS = [None, "mqar", "parity"]


def final_score(runs: str, spec: str, task: str | None, steps: int, batch: int) -> float:
    sets = ["--set", f"train.batch={batch}", "--set", "train.context=256", "--set",
            "train.optimizer=adamw(lr=3e-3, weight_decay=0.1)", "--set", "train.schedule=cosine(warmup=10)"]
    command = [sys.executable, "-m", "nestc", "run", spec, "--steps", str(steps), "--runs", runs, *sets]
    if task:
        command += ["--task", task]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    name = os.path.splitext(os.path.basename(spec))[0]
    suffix = f"-{task}" if task else ""
    (directory,) = [d for d in os.listdir(runs) if d.startswith(name + "-") and d.endswith(suffix)
                    and (task or not any(d.endswith(f"-{t}") for t in TASKS if t))]
    with open(os.path.join(runs, directory, "metrics.jsonl"), encoding="utf-8") as handle:
        last = json.loads(handle.read().splitlines()[-1])
    return last["held_out_accuracy" if task else "eval_bits_per_byte"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--runs", default="/tmp/nestc-compare")
    args = parser.parse_args()
    print(f"{args.steps} steps, batch {args.batch}, context 256; command: python {' '.join(sys.argv)}\n")
    print("| spec | corpus (bits/byte) | mqar (accuracy) | parity (accuracy) |")
    print("|---|---|---|---|")
    for spec in SPECS:
        scores = [final_score(args.runs, spec, task, args.steps, args.batch) for task in TASKS]
        print(f"| {os.path.basename(spec)} | {scores[0]:.3f} | {scores[1]:.3f} | {scores[2]:.3f} |", flush=True)


if __name__ == "__main__":
    main()

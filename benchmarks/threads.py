"""Training-step time under 1 and 2 intra-op threads, on a quiet CPU and beside a busy one.

    python benchmarks/threads.py [--repeat 5] [--steps 3] [--threads 1 2] [--hogs 1]
                                 [--work train|read|generate] [SPEC ...]

Each measurement is a fresh subprocess that builds the spec's model as `nestc run` does (the
compiled backend, its optimizer, subnormals flushed), sets `torch.set_num_threads(T)`, trains one
warm-up step and then times `--steps` whole training steps (forward, backward, optimizer step;
`_Session._train_step` itself) at the spec's own sizes. `--work read` times instead what
`nestc eval` and `nestc memorize` do per call (`read` of 1,024 held-out bytes, the state carried),
and `--work generate` what `nestc generate` does (`sample` of 32 bytes after a 64-byte prompt),
with the same untrained model. `--repeat` processes per configuration,
interleaved (repeat r measures every spec, condition and thread count before repeat r+1, the
thread order alternating), so that drifting load from elsewhere spreads over all of them. The
`loaded` condition runs `--hogs` busy-looping Python processes (started and stopped here) beside
the measurement. Each process contributes its median step time; the table shows the median over
the processes and their range (min-max), and the load average when each configuration started.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

DEFAULT_SPECS = ["specs/hope.nest", "specs/deltanet.nest", "specs/transformer.nest"]
BUSY_LOOP = "while True: pass"
READ_BYTES, PROMPT_BYTES, GENERATED_BYTES = 1024, 64, 32


def measure(spec: str, threads: int, steps: int, work: str) -> dict:
    """In this (fresh) process: seconds per training step (or per read or generation), one per
    timed repetition."""
    import torch

    torch.set_num_threads(threads)
    from nestc.lang.sema import analyze_file
    from nestc.runtime.config import RunConfig
    from nestc.runtime.train import _Session, read, sample

    result = analyze_file(spec)
    if not result.ok:
        raise SystemExit(f"{spec} does not check")
    with tempfile.TemporaryDirectory(prefix="nestc-threads-") as directory:
        session = _Session(result.program, "", RunConfig(directory=directory, quiet=True), None, log=lambda *_: None)
        text = session.validation[:READ_BYTES]
        tasks = {"train": lambda step: session._train_step(step),
                 "read": lambda step: read(session.model, text),
                 "generate": lambda step: sample(session.model, text[:PROMPT_BYTES], GENERATED_BYTES, seed=step)}
        task = tasks[work]
        task(0)  # warm-up: first-call allocations
        times = []
        for step in range(1, steps + 1):
            start = time.perf_counter()
            task(step)
            times.append(time.perf_counter() - start)
    settings = result.program.train
    tokens = {"train": settings.batch * settings.context, "read": READ_BYTES,
              "generate": PROMPT_BYTES + GENERATED_BYTES}[work]
    return {"threads_seen": torch.get_num_threads(), "seconds": times, "tokens_per_step": tokens}


def run_child(spec: str, threads: int, steps: int, work: str = "train") -> dict:
    environment = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    completed = subprocess.run([sys.executable, __file__, "--child", spec, "--threads", str(threads),
                                "--steps", str(steps), "--work", work], capture_output=True, text=True,
                               env=environment)
    if completed.returncode != 0:
        raise SystemExit(f"measuring {spec} with {threads} threads failed:\n{completed.stderr}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


class Hogs:
    """`count` processes that keep a core busy while the block runs."""

    def __init__(self, count: int):
        self.count, self.processes = count, []

    def __enter__(self):
        self.processes = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(self.count)]
        time.sleep(0.5)  # let them reach the loop before the measured process starts
        return self

    def __exit__(self, *exception) -> None:
        for process in self.processes:
            process.kill()
        for process in self.processes:
            process.wait()


def _processor() -> str:
    """The processor's model name (Linux), else the architecture."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            return next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("specs", nargs="*", default=DEFAULT_SPECS)
    parser.add_argument("--repeat", type=int, default=5, help="Fresh processes per configuration.")
    parser.add_argument("--steps", type=int, default=3, help="Timed training steps per process (after a warm-up).")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--hogs", type=int, default=1, help="Busy processes beside the `loaded` measurements.")
    parser.add_argument("--conditions", nargs="+", choices=["quiet", "loaded"], default=["quiet", "loaded"])
    parser.add_argument("--work", choices=["train", "read", "generate"], default="train",
                        help="What is timed: a training step, a read (eval, memorize) or a generation.")
    parser.add_argument("--json", help="Also write every measurement here.")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.child:
        print(json.dumps(measure(arguments.child, arguments.threads[0], arguments.steps, arguments.work)))
        return

    import torch

    print(f"# command: python {' '.join(sys.argv)}")
    print(f"# machine: {platform.platform()}, {_processor()}, {os.cpu_count()} cpus, "
          f"python {platform.python_version()}, torch {torch.__version__}; load average at start "
          + " / ".join(f"{x:.2f}" for x in os.getloadavg()))
    records = []
    for repeat in range(arguments.repeat):
        order = arguments.threads if repeat % 2 == 0 else arguments.threads[::-1]
        for spec in arguments.specs:
            for condition in arguments.conditions:
                for threads in order:
                    load = os.getloadavg()[0]
                    with Hogs(arguments.hogs if condition == "loaded" else 0):
                        found = run_child(spec, threads, arguments.steps, arguments.work)
                    record = {"spec": spec, "condition": condition, "threads": threads, "repeat": repeat,
                              "load": load, **found}
                    records.append(record)
                    print(f"  repeat {repeat} {spec} {condition} threads={threads}: "
                          + ", ".join(f"{s:.3f}" for s in found["seconds"]) + f" s/step (load {load:.2f})",
                          file=sys.stderr, flush=True)
    if arguments.json:
        with open(arguments.json, "w", encoding="utf-8") as handle:
            json.dump(records, handle, indent=1)
    print(f"\ntimed: {arguments.work}")
    print("\n| spec | condition | threads | median s/step | min-max s/step | tok/s (median) | time vs 1 thread | "
          "load avg (range) |")
    print("|---|---|---|---|---|---|---|---|")
    for spec in arguments.specs:
        for condition in arguments.conditions:
            medians = {}
            for threads in arguments.threads:
                chosen = [r for r in records if (r["spec"], r["condition"], r["threads"]) == (spec, condition, threads)]
                per_process = [statistics.median(r["seconds"]) for r in chosen]
                medians[threads] = statistics.median(per_process)
                loads = [r["load"] for r in chosen]
                ratio = medians[threads] / medians[arguments.threads[0]]
                print(f"| {os.path.splitext(os.path.basename(spec))[0]} | {condition} | {threads} | "
                      f"{medians[threads]:.3f} | {min(per_process):.3f}-{max(per_process):.3f} | "
                      f"{chosen[0]['tokens_per_step'] / medians[threads]:,.0f} | {ratio:.2f}x | "
                      f"{min(loads):.2f}-{max(loads):.2f} |")


if __name__ == "__main__":
    main()

"""Seconds to check an `extends` chain of N levels: checking should take time linear in N.

    python benchmarks/check_speed.py [--levels 250 500 1000 2000] [--repeat 5]

Each spec is `level l1 : mlp {...}` followed by `level l{i} extends l{i-1} { every ... }` up to
N, and a model that uses the last level. It is checked in-process (`analyze_source`, what
`nestc check` runs; Python is single-threaded here), `--repeat` times (after one unmeasured check that loads the grammar); the median, the spread
(fastest and slowest) and the median per level are printed, with the ratio of each median to the
previous one against the ratio of the sizes: linear time gives equal ratios. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

from nestc.lang.sema import analyze_source
from nestc.lang.source import SourceFile


def chain_spec(levels: int) -> str:
    """An `extends` chain of `levels` levels; the last one inherits `objective` and `lr` from the first."""
    lines = ["level l1 : mlp(expand=4) {", "    objective task", "    lr = 0.005", "    every 1", "}"]
    lines += [f"level l{i} extends l{i - 1} {{ every {1 + i % 2} }}" for i in range(2, levels + 1)]
    lines += ["model {", "    vocab 256", "    dim 64", "    layers 1", f"    block = residual(rmsnorm |> l{levels})",
              "}", "train {", "    context 64", "    batch 2", "    steps 1", "}"]
    return "\n".join(lines) + "\n"


def check_seconds(text: str, name: str) -> float:
    start = time.perf_counter()
    try:
        result = analyze_source(SourceFile(name, text))
    except RecursionError:
        return float("nan")
    seconds = time.perf_counter() - start
    if not result.ok:
        raise SystemExit(f"{name}: the generated chain does not check: {result.diagnostics[0].message}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", type=int, nargs="+", default=[250, 500, 1000, 2000])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print(f"command: python benchmarks/check_speed.py --levels {' '.join(map(str, args.levels))} "
          f"--repeat {args.repeat}")
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
          f"python {platform.python_version()} (one thread: the checker is pure Python)")
    print(f"{'levels':>7s} {'median s':>9s} {'fastest':>8s} {'slowest':>8s} {'ms/level':>9s} "
          f"{'time ratio':>10s} {'size ratio':>10s}")
    check_seconds(chain_spec(2), "warmup.nest")  # the first check also loads the grammar: not measured
    previous = None
    for levels in args.levels:
        text = chain_spec(levels)
        times = [check_seconds(text, f"chain{levels}.nest") for _ in range(args.repeat)]
        if any(t != t for t in times):  # NaN: the checker recursed too deep
            print(f"{levels:7d}  RecursionError", flush=True)
            previous = None
            continue
        median = statistics.median(times)
        ratios = ("", "")
        if previous is not None:
            ratios = (f"{median / previous[1]:.2f}", f"{levels / previous[0]:.2f}")
        print(f"{levels:7d} {median:9.3f} {min(times):8.3f} {max(times):8.3f} {1000 * median / levels:9.3f} "
              f"{ratios[0]:>10s} {ratios[1]:>10s}", flush=True)
        previous = (levels, median)
    sys.exit(0)


if __name__ == "__main__":
    main()

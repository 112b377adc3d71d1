"""Fuzz `nestc check` with mutated zoo specs and count the exit codes (3 is an internal error).

    python benchmarks/fuzz.py [--mutants 10000] [--seed 1]

The mutants are tests/nestfuzz.py's (token edits, deep nesting, huge numbers, NUL bytes, imports
of special files, import cycles), each checked through the command line in-process, in a
scratch directory that holds the zoo's library and the special files.
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the shared mutator

from nestc.cli import cli  # noqa: E402
from nestfuzz import mutants, prepare  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mutants", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    print(f"command: python benchmarks/fuzz.py --mutants {args.mutants} --seed {args.seed}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    counts: collections.Counter = collections.Counter()
    internal = []
    runner = CliRunner()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch)
        prepare(directory)
        os.chdir(directory)
        for name, text in mutants(args.mutants, args.seed):
            (directory / "mutant.nest").write_text(text, encoding="utf-8", errors="surrogatepass")
            result = runner.invoke(cli, ["check", "--color", "never", "mutant.nest"])
            counts[result.exit_code] += 1
            if result.exit_code not in (0, 1) and len(internal) < 3:
                internal.append(f"{name} -> exit {result.exit_code}: {result.output[-300:]!r}")
    print(f"{args.mutants} mutants in {time.perf_counter() - start:.0f} s; exit codes:")
    for code, count in sorted(counts.items()):
        meaning = {0: "clean", 1: "diagnostics", 2: "usage error", 3: "internal error"}.get(code, "other")
        print(f"  {code} ({meaning}): {count}")
    for line in internal:
        print("  e.g. " + line)
    sys.exit(1 if counts[3] else 0)


if __name__ == "__main__":
    main()

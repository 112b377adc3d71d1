"""Does a model that memorized a document predict its continuation better? (the paper's point)

    python benchmarks/test_time_learning.py RUN_DIRECTORY... [--documents 24] [--prefix 192] [--suffix 64]

For held-out stretches of the corpus, the continuation (the last --suffix bytes) is scored three
ways: from a fresh state; from the state saved after memorizing the stretch's own beginning (the
--prefix bytes before it), written to disk and read back exactly as `nestc memorize` /
`nestc eval --state-in` do; and from the state after memorizing the beginning of a different
stretch (a warm state that knows nothing about this document). Each run given is one row: the
three means, and on how many stretches its own beginning helped (against the fresh state, and
against the other document's).

`--skip N` reads the continuation's first N bytes in every condition before scoring the rest, so
that all three score from the same short context (a state carries its convolutions' histories:
without it, the own beginning's gain includes predicting the first bytes from the bytes just
before them, which is context, not learning).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile

import torch

from nestc.runtime import data
from nestc.runtime.checkpoint import load_state, save_state
from nestc.runtime.rundir import load_run
from nestc.runtime.train import read


def scores(run: str, stretches: list[bytes], prefix: int, skip: int,
           scratch: str) -> tuple[list[float], list[float], list[float]]:
    """(fresh, own beginning, other document's beginning) bits per byte of each stretch's
    continuation after its first `skip` bytes (read, not scored)."""
    model = load_run(run)
    path = os.path.join(scratch, "state.safetensors")

    def continuation_bits(continuation, state=None) -> float:
        if skip:
            _, state = read(model, continuation[:skip], state)
        return read(model, continuation[skip:], state)[0]

    fresh, own, other = [], [], []
    for index, stretch in enumerate(stretches):
        beginning, continuation = stretch[:prefix], stretch[prefix:]
        unrelated = stretches[(index + len(stretches) // 2) % len(stretches)][:prefix]
        fresh.append(continuation_bits(continuation))
        _, state = read(model, beginning, window=prefix)
        save_state(state, path)
        own.append(continuation_bits(continuation, load_state(path, model)))
        _, state = read(model, unrelated, window=prefix)
        other.append(continuation_bits(continuation, state))
    return fresh, own, other


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="RUN")
    parser.add_argument("--documents", type=int, default=24)
    parser.add_argument("--prefix", type=int, default=192)
    parser.add_argument("--suffix", type=int, default=64)
    parser.add_argument("--skip", type=int, default=0,
                        help="read the continuation's first N bytes before scoring the rest (default 0)")
    args = parser.parse_args()
    if not 0 <= args.skip < args.suffix - 1:
        parser.error(f"--skip must leave at least two bytes of the {args.suffix}-byte continuation to score")
    torch.set_num_threads(1)
    _, validation = data.split(data.default_corpus())
    size = args.prefix + args.suffix
    stride = (len(validation) - size) // args.documents
    stretches = [validation[i * stride:i * stride + size] for i in range(args.documents)]
    print(f"command: python {' '.join(sys.argv)}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, 1 thread")
    print(f"{args.documents} held-out stretches of the embedded corpus: a {args.prefix}-byte beginning, "
          f"then a {args.suffix}-byte continuation scored" + (f" after its first {args.skip}" if args.skip else "") + "\n")
    print("| run | fresh state | after its own beginning (saved, reloaded) | after another document's | "
          "own beginning helped (vs fresh) | (vs another's) |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch:
        for run in args.runs:
            fresh, own, other = scores(run, stretches, args.prefix, args.skip, scratch)
            helped = sum(o < f for o, f in zip(own, fresh))
            helped_other = sum(o < w for o, w in zip(own, other))
            print(f"| {os.path.basename(os.path.normpath(run))} | {statistics.mean(fresh):.3f} | "
                  f"{statistics.mean(own):.3f} | {statistics.mean(other):.3f} | {helped} of {len(stretches)} | "
                  f"{helped_other} of {len(stretches)} |")


if __name__ == "__main__":
    main()

"""Does a model that memorized a document predict its continuation better? (the paper's point)

    python benchmarks/test_time_learning.py RUN_DIRECTORY [--documents 24] [--prefix 192] [--suffix 64]

For held-out stretches of the corpus, the continuation (the last --suffix bytes) is scored three
ways: from a fresh state; from the state saved after memorizing the stretch's own beginning (the
--prefix bytes before it), written to disk and read back exactly as `nestc memorize` /
`nestc eval --state-in` do; and from the state after memorizing the beginning of a different
stretch (a warm state that knows nothing about this document).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

from nestc.runtime import data
from nestc.runtime.checkpoint import load_state, save_state
from nestc.runtime.rundir import load_run
from nestc.runtime.train import read


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--documents", type=int, default=24)
    parser.add_argument("--prefix", type=int, default=192)
    parser.add_argument("--suffix", type=int, default=64)
    args = parser.parse_args()
    model = load_run(args.run)
    _, validation = data.split(data.default_corpus())
    size = args.prefix + args.suffix
    stride = (len(validation) - size) // args.documents
    stretches = [validation[i * stride:i * stride + size] for i in range(args.documents)]
    cold, own, other = [], [], []
    with tempfile.TemporaryDirectory() as scratch:
        path = os.path.join(scratch, "state.safetensors")
        for index, stretch in enumerate(stretches):
            prefix, suffix = stretch[:args.prefix], stretch[args.prefix:]
            unrelated = stretches[(index + args.documents // 2) % args.documents][:args.prefix]
            cold.append(read(model, suffix)[0])
            _, state = read(model, prefix, window=args.prefix)
            save_state(state, path)
            own.append(read(model, suffix, load_state(path, model))[0])
            _, state = read(model, unrelated, window=args.prefix)
            other.append(read(model, suffix, state)[0])
    print(f"run {args.run}: {args.documents} held-out stretches, {args.prefix}-byte prefix, "
          f"{args.suffix}-byte continuation; command: python benchmarks/test_time_learning.py {args.run}")
    print("| continuation scored from | bits/byte (mean) |")
    print("|---|---|")
    print(f"| a fresh state | {statistics.mean(cold):.3f} |")
    print(f"| the state after memorizing its own beginning (saved and reloaded) | {statistics.mean(own):.3f} |")
    print(f"| the state after memorizing another document | {statistics.mean(other):.3f} |")
    better = sum(o < c for o, c in zip(own, cold))
    print(f"\nmemorizing helped on {better} of {args.documents} stretches")


if __name__ == "__main__":
    main()

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
import warnings

import torch
from side_by_side import alternating_times, print_header, print_times

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    print_header(args.threads)
    models = {name: build(spec) for name, spec in SPECS.items()}
    tokens = torch.randint(0, 256, (args.batch, 256), generator=torch.Generator().manual_seed(0))
    times = alternating_times(models, tokens, args.repeats)
    print(f"\nfwd+bwd of {args.batch} x 256 bytes, {args.repeats} repeats (median, min-max):")
    momentum, plain = print_times(times, 1, "s", 38)
    print(f"  ratio momentum / plain: {momentum / plain:.2f}")


if __name__ == "__main__":
    main()

"""Count the ATen ops of one training step (forward, backward, optimizer step) of a spec.

    python benchmarks/op_count.py specs/hope.nest --batch 4 --context 256 --dim 64

Ops are counted as they reach the dispatcher below autograd (a `TorchDispatchMode`), so each
kernel that runs is counted once, backward ones included, and composite ops are counted by what
they decompose into. The count does not depend on the machine's load, unlike a time.
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import sys

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from nestc.backends import compiled, reference
from nestc.lang import overrides
from nestc.lang.sema import analyze_source, read_source


class OpCounter(TorchDispatchMode):
    """Counts every ATen op that reaches the dispatcher inside it, by op name."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def count(spec: str, backend: str, batch: int, context: int, dim: int | None) -> collections.Counter:
    source = read_source(spec)
    assignments = [f"train.context={context}", f"train.batch={batch}"] + ([f"model.dim={dim}"] if dim else [])
    overridden = overrides.apply(source, assignments)
    result = analyze_source(overridden.main, replaced_imports=overridden.imported)
    if not result.ok:
        sys.exit("\n".join(d.message for d in result.diagnostics if d.is_error))
    torch.manual_seed(0)
    model = (compiled if backend == "compiled" else reference).build(result.program)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, model.vocab, (batch, context))

    def step() -> None:
        logits, _ = model(tokens)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # the first step allocates the optimizer's moments
    counter = OpCounter()
    with counter:
        step()
    return counter.ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("specs", nargs="+")
    parser.add_argument("--backend", choices=("compiled", "reference"), default="compiled")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--dim", type=int, help="default: the spec's")
    parser.add_argument("--top", type=int, default=12, help="how many of the most frequent ops to list")
    args = parser.parse_args()
    print("command:", " ".join([os.path.basename(sys.executable), *sys.argv]))
    print(f"machine: {platform.platform()}, torch {torch.__version__}")
    torch.set_num_threads(1)
    for spec in args.specs:
        ops = count(spec, args.backend, args.batch, args.context, args.dim)
        print(f"\n{spec} ({args.backend}, B={args.batch}, T={args.context}"
              + (f", dim {args.dim}" if args.dim else "") + f"): {sum(ops.values()):,} ATen ops per training step")
        for name, number in ops.most_common(args.top):
            print(f"  {number:>9,}  {name}")


if __name__ == "__main__":
    main()

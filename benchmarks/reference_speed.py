"""Tokens per second of the reference backend, forward + backward, for every zoo spec.

    python benchmarks/reference_speed.py [--batch 2] [--time 512] [--dim 128] [SPEC ...]

Each spec's model width is set to --dim (heads as the spec says); everything else is the spec's
own. The reference backend is the slow oracle: these numbers are the baseline that the compiled
backend is measured against, printed with the machine they were measured on.
"""

from __future__ import annotations

import argparse
import glob
import os
import platform
import re
import sys
import time

import torch
import torch.nn.functional as F

from nestc.backends.reference import build
from nestc.lang.sema import analyze_source
from nestc.lang.source import SourceFile


def with_width(path: str, dim: int) -> SourceFile:
    text = open(path, encoding="utf-8").read()
    text, count = re.subn(r"(?m)^(\s*dim\s+)\d+", rf"\g<1>{dim}", text, count=1)
    if count != 1:
        raise SystemExit(f"{path}: no `dim N` line to set")
    return SourceFile(path, text)


def measure(path: str, batch: int, length: int, dim: int) -> tuple[float, float]:
    result = analyze_source(with_width(path, dim))
    if not result.ok:
        raise SystemExit(f"{path}: does not check at dim {dim}")
    torch.manual_seed(0)
    model = build(result.program)
    tokens = torch.randint(0, model.vocab, (batch, length))
    start = time.perf_counter()
    logits, _ = model(tokens)
    F.cross_entropy(logits[:, :-1].reshape(-1, model.vocab), tokens[:, 1:].reshape(-1)).backward()
    seconds = time.perf_counter() - start
    return batch * length / seconds, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("specs", nargs="*")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--time", type=int, default=512)
    parser.add_argument("--dim", type=int, default=128)
    args = parser.parse_args()
    specs = args.specs or sorted(glob.glob("specs/*.nest"))
    print(f"# reference backend, forward+backward, B={args.batch} T={args.time} dim={args.dim}")
    print(f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, python {sys.version.split()[0]}")
    print(f"{'spec':32s} {'tokens/s':>10s} {'seconds':>9s}")
    for path in specs:
        rate, seconds = measure(path, args.batch, args.time, args.dim)
        print(f"{path:32s} {rate:10.1f} {seconds:9.1f}", flush=True)


if __name__ == "__main__":
    main()

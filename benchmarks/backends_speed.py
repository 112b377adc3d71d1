"""Reference vs compiled backend, forward + backward, side by side in one run.

    python benchmarks/backends_speed.py [--batch 2] [--dim 128] [--heads 4] [--time 256 1024]
                                        [--reference-max 256] [SPEC ...]

Each measurement runs in a fresh subprocess, so the peak resident memory it reports belongs to
that configuration alone. The reference is measured only up to --reference-max tokens (it is
the slow oracle); ratios are printed where both backends ran the same configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time

DEFAULT_SPECS = ["specs/deltanet.nest", "specs/gated_deltanet.nest", "specs/titans.nest", "specs/ttt_mlp.nest",
                 "specs/hope.nest"]


def measure(path: str, backend: str, batch: int, length: int, dim: int, heads: int) -> dict:
    import warnings

    import torch
    import torch.nn.functional as F

    from nestc.backends import compiled, reference
    from nestc.sema import analyze_source
    from nestc.source import SourceFile

    text = open(path, encoding="utf-8").read()
    text = re.sub(r"(?m)^(\s*dim\s+)\d+", rf"\g<1>{dim}", text, count=1)
    text = re.sub(r"(?m)^(\s*heads\s+)\d+", rf"\g<1>{heads}", text, count=1)
    text = re.sub(r"(?m)^(\s*context\s+)\d+", rf"\g<1>{length}", text, count=1)
    result = analyze_source(SourceFile(path, text))
    if not result.ok:
        raise SystemExit(f"{path}: does not check at dim {dim}, heads {heads}, context {length}")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = (compiled if backend == "compiled" else reference).build(result.program)
    tokens = torch.randint(0, model.vocab, (batch, length))
    start = time.perf_counter()
    logits, _ = model(tokens)
    F.cross_entropy(logits[:, :-1].reshape(-1, model.vocab), tokens[:, 1:].reshape(-1)).backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"tokens_per_second": batch * length / seconds, "seconds": seconds, "peak_mib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("specs", nargs="*")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--time", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--reference-max", type=int, default=256)
    parser.add_argument("--one", nargs=2, metavar=("BACKEND", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        backend, spec = args.one
        print(json.dumps(measure(spec, backend, args.batch, args.time[0], args.dim, args.heads)))
        return
    import torch

    print(f"# forward+backward, B={args.batch} dim={args.dim} heads={args.heads}; "
          f"command: python {' '.join(sys.argv)}")
    print(f"# machine: {platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
          f"python {sys.version.split()[0]}")
    print(f"{'spec':28s} {'T':>5s} {'backend':>9s} {'tokens/s':>10s} {'seconds':>8s} {'peak MiB':>9s} {'speed-up':>9s}")
    for spec in args.specs or DEFAULT_SPECS:
        for length in args.time:
            rates = {}
            for backend in ("reference", "compiled"):
                if backend == "reference" and length > args.reference_max:
                    continue
                command = [sys.executable, __file__, "--one", backend, spec, "--time", str(length),
                           "--batch", str(args.batch), "--dim", str(args.dim), "--heads", str(args.heads)]
                out = subprocess.run(command, capture_output=True, text=True)
                if out.returncode != 0:
                    print(f"{spec:28s} {length:5d} {backend:>9s} failed: {out.stderr.strip().splitlines()[-1]}")
                    continue
                row = json.loads(out.stdout)
                rates[backend] = row["tokens_per_second"]
                ratio = f"{rates['compiled'] / rates['reference']:8.1f}x" if len(rates) == 2 else ""
                print(f"{spec:28s} {length:5d} {backend:>9s} {row['tokens_per_second']:10.1f} {row['seconds']:8.2f} "
                      f"{row['peak_mib']:9.0f} {ratio:>9s}", flush=True)


if __name__ == "__main__":
    main()

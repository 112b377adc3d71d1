"""Reference vs compiled backend (eager and through torch.compile), forward + backward, side by side.

    python benchmarks/backends_speed.py [--batch 2] [--dim 128] [--heads 4] [--time 256 1024]
                                        [--reference-max 256] [SPEC ...]

Each measurement runs in a fresh subprocess, so the peak resident memory it reports belongs to
that configuration alone: the peak during the measured call, restarted from the resident size
just before it (Linux; elsewhere the process's peak). The reference is measured only up to
--reference-max tokens (it is the slow oracle); speed-ups are against the reference where it
ran the same configuration. Both compiled columns are timed on their second call; for
`compiled+torch.compile` the first one (a warm-up of the same shape, which pays Dynamo's tracing
and inductor's code generation) is printed separately as the compile time.
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


BACKENDS = ("reference", "compiled", "compiled+fx", "compiled+torch.compile")


def restart_peak_memory() -> None:
    """Make the resident-set peak (VmHWM) start again from the current resident size."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def peak_mib() -> float:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(path: str, backend: str, batch: int, length: int, dim: int, heads: int, device: str = "cpu") -> dict:
    import warnings

    import torch
    import torch.nn.functional as F

    from nestc.backends import compiled, reference
    from nestc.lang.sema import analyze_source
    from nestc.lang.source import SourceFile

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
        if backend == "reference":
            model = reference.build(result.program)
        else:
            from nestc.backends.fx import DEFAULT_PASSES

            model = compiled.build(result.program, torch_compile=backend == "compiled+torch.compile",
                                   graph_passes=DEFAULT_PASSES if backend == "compiled+fx" else None)
    model = model.to(device)
    tokens = torch.randint(0, model.vocab, (batch, length), device=device)
    cuda = device.startswith("cuda")

    def forward_backward() -> float:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        logits, _ = model(tokens)
        F.cross_entropy(logits[:, :-1].reshape(-1, model.vocab), tokens[:, 1:].reshape(-1)).backward()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    warm_up_seconds = forward_backward() if backend != "reference" else None
    restart_peak_memory()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    seconds = forward_backward()
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_mib()
    return {"tokens_per_second": batch * length / seconds, "seconds": seconds, "peak_mib": peak,
            "warm_up_seconds": warm_up_seconds if backend in ("compiled+torch.compile", "compiled+fx") else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("specs", nargs="*")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--time", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--reference-max", type=int, default=256)
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--device", default="cpu", help="cpu or cuda (peak memory is then the GPU's allocations)")
    parser.add_argument("--one", nargs=2, metavar=("BACKEND", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        backend, spec = args.one
        print(json.dumps(measure(spec, backend, args.batch, args.time[0], args.dim, args.heads, args.device)))
        return
    import torch

    print(f"# forward+backward, B={args.batch} dim={args.dim} heads={args.heads}; "
          f"command: python {' '.join(sys.argv)}")
    gpu = f", {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""
    print(f"# machine: {platform.machine()}, {os.cpu_count()} cpus{gpu}, torch {torch.__version__}, "
          f"python {sys.version.split()[0]}; device {args.device}")
    print(f"{'spec':28s} {'T':>5s} {'backend':>22s} {'tokens/s':>10s} {'seconds':>8s} {'peak MiB':>9s} "
          f"{'speed-up':>9s} {'warm-up s':>9s}")
    for spec in args.specs or DEFAULT_SPECS:
        for length in args.time:
            rates = {}
            for backend in args.backends:
                if backend == "reference" and length > args.reference_max:
                    continue
                command = [sys.executable, __file__, "--one", backend, spec, "--time", str(length),
                           "--batch", str(args.batch), "--dim", str(args.dim), "--heads", str(args.heads),
                           "--device", args.device]
                out = subprocess.run(command, capture_output=True, text=True)
                if out.returncode != 0:
                    print(f"{spec:28s} {length:5d} {backend:>22s} failed: {out.stderr.strip().splitlines()[-1]}")
                    continue
                row = json.loads(out.stdout)
                rates[backend] = row["tokens_per_second"]
                ratio = (f"{rates[backend] / rates['reference']:8.1f}x"
                         if "reference" in rates and backend != "reference" else "")
                warm_up = f"{row['warm_up_seconds']:9.1f}" if row["warm_up_seconds"] is not None else ""
                print(f"{spec:28s} {length:5d} {backend:>22s} {row['tokens_per_second']:10.1f} {row['seconds']:8.2f} "
                      f"{row['peak_mib']:9.0f} {ratio:>9s} {warm_up:>9s}", flush=True)


if __name__ == "__main__":
    main()

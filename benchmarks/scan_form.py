"""An Adam-like inner optimizer written as levels, in the scan form next to token by token.

    python benchmarks/scan_form.py [--repeats 7] [--threads 1]

The level: an MLP memory updated every 16 tokens with `update = -lr * adam_first /
(sqrt(adam_second) + 1e-8)` (specs/lib/optimizers.nest), which no built-in optimizer equals. The
compiled backend plans it `scan` (backends/forms/scan.py); the same model with that plan replaced
by `sequential` steps the reference kernel (the memory's forward and autograd every token). The
figure is one forward and backward pass of a batch of 2 x 64 tokens, in float64, the two
alternating after two untimed steps each; it prints the median and the range of the repeats, and
checks first that both give the same logits.
"""

from __future__ import annotations

import argparse
import warnings

import torch
from side_by_side import alternating_times, print_header, print_times

from nestc.backends import compiled
from nestc.lang.sema import analyze_source
from nestc.lang.source import SourceFile
from nestc.passes.plan import LevelPlan

SPEC = """import "lib/optimizers.nest"
level memory : mlp(depth=2, expand=2) {
    key = x |> proj |> l2norm
    value = x |> proj
    query = x |> proj |> l2norm
    lr = x |> proj |> sigmoid(max=0.02)
    retain = x |> proj(bias=true) |> sigmoid
    objective l2
    optimizer gd
    update = -lr * adam_first / (sqrt(adam_second) + 1e-8)
    every 16
    read before
}
model {
    vocab 64
    dim 16
    heads 2
    block = residual(rmsnorm |> memory)
}
"""


def build(form: str):
    # named inside specs/ so that the import finds the library
    result = analyze_source(SourceFile("specs/scan_form_benchmark.nest", SPEC))
    if not result.ok:
        raise SystemExit("\n".join(d.message for d in result.diagnostics))
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", compiled.CompileWarning)  # planned in the scan form
        model = compiled.build(result.program).double()
    assert model.plans["memory"].kernel == "scan", model.plans["memory"]
    if form == "sequential":
        model.plans["memory"] = LevelPlan("sequential", "the benchmark's comparison")
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    print_header(args.threads)
    models = {form: build(form) for form in ("sequential", "scan")}
    tokens = torch.randint(0, 64, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, actual = (model(tokens)[0] for model in models.values())
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)
    times = alternating_times(models, tokens, args.repeats)
    print(f"\nfwd+bwd of 2 x 64 tokens, float64, {args.repeats} repeats (median, min-max):")
    sequential, scan = print_times(times, 1e3, "ms", 12)
    print(f"  speed-up sequential / scan: {sequential / scan:.2f}x")


if __name__ == "__main__":
    main()

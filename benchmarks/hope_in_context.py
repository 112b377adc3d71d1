"""How much Hope's memories learn in context: the logits of specs/hope.nest at initialisation
with the memories' step size changed, as the spec is and with its retain gate starting near 1.

    python benchmarks/hope_in_context.py

Each model is lib/hope.nest with lines replaced (the lr gate's lr_max, a constant lr, the retain
gate's initial bias), built with the same seed, so every parameter is the same tensor; each row is
the largest absolute difference between two models' logits on 2 x 256 bytes of the default
corpus. A memory that forgets what it writes within a few tokens makes its step size irrelevant
to the logits.
"""

from __future__ import annotations

import warnings

import torch
from side_by_side import print_header

from nestc.backends import compiled
from nestc.lang.sema import analyze_source
from nestc.lang.sema.imports import read_source
from nestc.lang.source import SourceFile
from nestc.runtime.data import default_corpus

LIBRARY = "specs/lib/hope.nest"
LR = "lr = x |> mlr |> proj |> sigmoid(max=0.01)"
RETAIN = "retain = x |> mretain |> proj |> sigmoid"
NO_STEP = (LR, LR.replace("0.01", "1e-9"))
KEEPING = (RETAIN, RETAIN.replace("proj", "proj(bias=5)"))  # retain starts near sigmoid(5) = 0.993
COMPARISONS = {  # name: the two models' replacements
    "lr_max 0.01 against 1e-9": ([], [NO_STEP]),
    "lr_max 0.01 against 0.1": ([], [(LR, LR.replace("0.01", "0.1"))]),
    "lr_max 0.01 against a constant lr 0.5": ([], [(LR, "lr = 0.5")]),
    "retain bias 5: lr_max 0.01 against 1e-9": ([KEEPING], [KEEPING, NO_STEP]),
}


def build(replacements: list[tuple[str, str]]):
    library = read_source(LIBRARY).text
    for old, new in replacements:
        if old not in library:
            raise SystemExit(f"{LIBRARY} no longer has `{old}`")
        library = library.replace(old, new)
    result = analyze_source(read_source("specs/hope.nest"), replaced_imports={LIBRARY: SourceFile(LIBRARY, library)})
    if not result.ok:
        raise SystemExit("\n".join(d.message for d in result.diagnostics))
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", compiled.CompileWarning)
        return compiled.build(result.program)


def main() -> None:
    print_header(1)
    corpus = default_corpus()
    tokens = torch.tensor([list(corpus[:256]), list(corpus[256:512])])
    print("\nlargest |logit difference| at initialisation, 2 x 256 bytes:")
    with torch.no_grad():
        for name, (first, second) in COMPARISONS.items():
            difference = build(first)(tokens)[0] - build(second)(tokens)[0]
            print(f"  {name:42s} {difference.abs().max().item():.2e}")


if __name__ == "__main__":
    main()

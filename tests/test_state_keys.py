"""Parameter and stream-state names are part of the checkpoint format: every spec of the zoo,
the golden feature spec and a spec that nests every block combinator keep the names they had
when tests/golden/state_keys.json was written (before the backends built blocks from IR nodes).

Run `python -m pytest tests/test_state_keys.py --update-goldens` to rewrite the file after an
intended change of the checkpoint format.
"""

from __future__ import annotations

import json

import torch

import nestc
from nesttest import REPO

GOLDEN = REPO / "tests" / "golden" / "state_keys.json"
SPECS = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "specs").glob("*.nest")) + ["tests/golden/features.nest"]

# Every combinator inside every other one, so each kind of child path (`_i`, `_r`, `_m`, `_g`)
# appears below each kind of parent.
NESTED_BLOCKS = """
level a : matrix { every 1 }
level b : matrix { every 1 }
level c : matrix { every 1 }
level d : matrix { every 1 }
level mem : matrix { every 1 }
level attn : cache(window=8)
level ffn : mlp(expand=2)
model {
    vocab 16
    dim 16
    heads 2
    layers 2
    block = residual(rmsnorm |> parallel(a, gated(layernorm |> b, c), combine=learned))
        |> gated(parallel(d, identity, combine=sum), residual(rmsnorm |> ffn))
        |> mac(memory=mem, attention=attn, segment=4, persistent=2)
}
train { context 8 }
"""


def _names(spec: str) -> dict[str, list]:
    """The state_dict keys of each backend and, after two tokens, the names of the MAC caches."""
    names: dict[str, list] = {}
    for backend in nestc.api.BACKENDS:
        model = nestc.load(spec, backend=backend)
        names[backend] = sorted(model.state_dict())
        _, state = model(torch.zeros(1, 2, dtype=torch.long))
        names[f"{backend} segments"] = [sorted(segment) for segment in state.segments]
    return names


def _all_names() -> dict[str, dict[str, list]]:
    names = {path: _names(path) for path in SPECS}
    names["nested blocks"] = _names(NESTED_BLOCKS)
    return names


def test_state_names_are_unchanged(at_repo_root, update_goldens):
    actual = _all_names()
    if update_goldens:
        GOLDEN.write_text(json.dumps(actual, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        return
    expected = json.loads(GOLDEN.read_text(encoding="utf-8"))
    assert actual.keys() == expected.keys()
    for spec in expected:
        assert actual[spec] == expected[spec], f"the state names of {spec} changed: old checkpoints no longer load"

"""`normalize` (normalised linear attention, SEMANTICS §3): a read divided by the memory's read
of a value channel held at 1, by hand, through the segment forms, and refused where it has no
meaning."""

from __future__ import annotations

import pytest
import torch

import nestc
from nestc.backends.kernel import NORMALIZER_EPS, MemoryKernel
from nestc.backends.reference import run_kernel
from nestc.lang.sema import analyze_source
from nestc.lang.source import SourceFile
from test_compiled import assert_equivalent


def test_two_tokens_by_hand():
    """lr 0.5, retain 0.8, one head: z_1 = 0.5 k_1, z_2 = 0.8 z_1 + 0.5 k_2 and M likewise with
    v; each read is M_t q_t / (z_t . q_t + eps) (read after)."""
    level = nestc.check("level m : matrix {\n    objective dot\n    lr = 0.5\n    retain = 0.8\n    normalize\n"
                        "    every 1\n}\n").level("m")
    kernel = MemoryKernel(level, heads=1, key_dim=2, value_dim=1)
    k = torch.tensor([[[1.0, 0.0]], [[1.0, 2.0]]], dtype=torch.float64)[None]  # [B, T, H, dk]
    v = torch.tensor([[[3.0]], [[-1.0]]], dtype=torch.float64)[None]
    q = torch.tensor([[[2.0, 1.0]], [[0.5, 1.0]]], dtype=torch.float64)[None]
    gates = {"lr": torch.full((1, 2, 1), 0.5, dtype=torch.float64),
             "retain": torch.full((1, 2, 1), 0.8, dtype=torch.float64)}
    y, state = run_kernel(kernel, k, v, q, gates)
    # token 1: M = 0.5 * 3 * (1, 0) = (1.5, 0), z = (0.5, 0): M q = 3, z q = 1
    # token 2: M = 0.8 (1.5, 0) - 0.5 (1, 2) = (0.7, -1), z = 0.8 (0.5, 0) + 0.5 (1, 2) = (0.9, 1)
    #          M q = 0.35 - 1 = -0.65, z q = 0.45 + 1 = 1.45
    expected = torch.tensor([3 / (1 + NORMALIZER_EPS), -0.65 / (1.45 + NORMALIZER_EPS)], dtype=torch.float64)
    torch.testing.assert_close(y.flatten(), expected, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(state.weights[0][0, 0], torch.tensor([[0.7, -1.0], [0.9, 1.0]], dtype=torch.float64))


MODEL = """
level mem : matrix {{
    key = x |> proj |> elu1
    value = x |> proj
    query = x |> proj |> elu1
    objective dot
    {fields}
    normalize
}}
model {{
    vocab 9
    dim 8
    heads 2
    block = residual(rmsnorm |> mem)
}}
"""


@pytest.mark.parametrize("fields", [
    "lr = x |> proj |> sigmoid\n    retain = x |> proj |> sigmoid\n    every 1",  # anchored, per head
    "retain = x |> proj(per=channel) |> sigmoid\n    every 1",  # trajectory, per channel
    "lr = 0.5\n    optimizer momentum\n    momentum = 0.7\n    every 4\n    read before",  # chunks, momentum
], ids=["anchored", "trajectory-per-channel", "chunked-momentum-read-before"])
def test_compiled_equals_the_reference(fields):
    """Logits, final states (with the normaliser row) and outer gradients, float64, across calls."""
    assert_equivalent(nestc.check(MODEL.format(fields=fields)), length=21, split=9)


@pytest.mark.parametrize("level, message", [
    ("level m : mlp {\n    every 1\n    normalize\n}", "`normalize` has no meaning for a `mlp` level"),
    ("level m : matrix {\n    every 1\n    normalize\n}", "`normalize` has no meaning with objective `l2`"),
    ("level m : matrix {\n    objective dot\n    frozen\n    normalize\n}",
     "`normalize` has no meaning for a level not updated in the sequence"),
])
def test_refused_where_it_has_no_meaning(level, message):
    result = analyze_source(SourceFile("<normalize>", level + "\n"))
    assert [(d.code, d.message) for d in result.diagnostics] == [("N0117", message)]


def test_the_ir_of_a_level_without_it_is_unchanged():
    """`normalize` is absent from the IR of a level that does not say it (so every existing variant
    keeps its id), and present where it does."""
    from nestc.lang import ir

    plain = nestc.check("level m : matrix {\n    objective dot\n    every 1\n}\n")
    normalized = nestc.check("level m : matrix {\n    objective dot\n    every 1\n    normalize\n}\n")
    assert "normalize" not in ir.dump(plain)
    assert "    normalize  true" in ir.dump(normalized)


GENERATED = """
level gen : matrix {
    key = x |> proj |> elu1
    query = x |> proj |> elu1
    objective dot
    every 1
    read before
    normalize
}
level mem : matrix {
    key = x |> proj |> gen |> l2norm
    objective dot
    every 1
    normalize
}
level retrieval : matrix {
    key = x |> proj |> elu1
    query = x |> proj |> elu1
    objective dot
    every 1
    normalize
}
level attn : cache(window=8)
model {
    vocab 9
    dim 8
    heads 2
    block = residual(rmsnorm |> mem) |> residual(rmsnorm |> mac(memory=retrieval, attention=attn, segment=4,
                                                                persistent=2))
}
"""


@pytest.mark.parametrize("reader", ["gen", "retrieval"])
def test_generated_keys_and_memory_as_context_read_the_normalised_memory(reader):
    """A normalised level read as another's key stage (`gen`) and as the memory of `mac`
    (`retrieval`): both backends divide those reads too, and dropping that level's division
    changes the logits."""
    from nestc.backends import reference

    program = nestc.check(GENERATED)
    assert_equivalent(program, length=13, split=6)
    torch.manual_seed(0)
    model = reference.build(program).double()
    tokens = torch.randint(0, 9, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        normalised, _ = model(tokens)
        kernel = next(m for m in model.modules() if isinstance(m, MemoryKernel) and m.level.name == reader)
        kernel.normalized_read = lambda y: None if y is None else y[..., :-1]
        plain, _ = model(tokens)
    assert (normalised - plain).abs().max() > 1e-3

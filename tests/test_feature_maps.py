"""The feature maps that widen each head's channels: ATLAS's phi_p (`tensor_poly`) and Based's
Taylor map (`taylor`), by hand, through the kernel identities they are defined by, and through
every consumer of a pipeline's width (the level's state, the estimate, the checker's errors)."""

from __future__ import annotations

import math

import pytest
import torch

import nestc
from nestc.backends import reference
from nestc.backends.common import BackendError
from nestc.backends.kernel import MemoryKernel
from nestc.backends.pipelines import Pipeline
from nestc.passes.estimate import estimate


def feature_map(stage: str, heads: int, width: int) -> Pipeline:
    """The pipeline `x |> stage` on inputs of `width` channels split into `heads` heads."""
    program = nestc.check(f"level m : matrix {{\n    key = x |> {stage}\n}}\n")
    return Pipeline(program.level("m").key, width, width, heads, "key")


def apply(pipeline: Pipeline, x: torch.Tensor) -> torch.Tensor:
    return pipeline(x, 0, None, None)


@pytest.mark.parametrize("head_dim, degree", [(1, 1), (2, 2), (3, 3), (8, 2), (4, 4)])
def test_tensor_poly_has_C_of_d_plus_p_channels_per_head(head_dim, degree):
    """phi_p has one channel per monomial of degree <= p in d variables: C(d + p, p) (ATLAS
    Prop. 2); no two channels are the same monomial (each is checked against its own weight)."""
    heads = 3
    pipeline = feature_map(f"tensor_poly({degree})", heads, heads * head_dim)
    expected = math.comb(head_dim + degree, degree)
    assert pipeline.out_width == heads * expected
    x = torch.rand(2, heads * head_dim, dtype=torch.float64) + 0.5
    features = apply(pipeline, x)
    assert features.shape == (2, heads * expected)
    # x^b / sqrt(b!) at x = 2 t and at x = t differ by 2^|b|: every degree 0..p appears, each
    # as often as there are monomials of that degree, C(d - 1 + i, i)
    doubled = apply(pipeline, 2 * x) / features
    degrees = torch.log2(doubled).round().long()[0, :expected]
    assert torch.bincount(degrees, minlength=degree + 1).tolist() == [
        math.comb(head_dim - 1 + i, i) for i in range(degree + 1)]


def test_tensor_poly_of_two_channels_by_hand():
    """d = 2, p = 2: phi(a, b) = (1, a, b, a^2 / sqrt 2, a b, b^2 / sqrt 2), for each head."""
    pipeline = feature_map("tensor_poly(2)", 2, 4)
    x = torch.tensor([[3.0, -2.0, 0.5, 4.0]], dtype=torch.float64)
    r = math.sqrt(2)
    expected = torch.tensor([[1, 3, -2, 9 / r, -6, 4 / r, 1, 0.5, 4, 0.25 / r, 2, 16 / r]], dtype=torch.float64)
    torch.testing.assert_close(apply(pipeline, x), expected, rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("head_dim, degree", [(5, 1), (5, 2), (4, 3), (3, 4)])
def test_tensor_poly_is_the_truncated_exponential_kernel(head_dim, degree):
    """The weights 1/sqrt(b!) make phi(x).phi(y) = sum_{i<=p} (x.y)^i / i!, ATLAS's Taylor
    coefficients a_i = 1/i! of exp(x.y) (the multinomial theorem)."""
    pipeline = feature_map(f"tensor_poly({degree})", 1, head_dim)
    g = torch.Generator().manual_seed(degree)
    x, y = (torch.randn(4, head_dim, generator=g, dtype=torch.float64) for _ in range(2))
    dot = (x * y).sum(-1)
    expected = sum(dot ** i / math.factorial(i) for i in range(degree + 1))
    torch.testing.assert_close((apply(pipeline, x) * apply(pipeline, y)).sum(-1), expected, rtol=1e-12, atol=1e-12)


def test_taylor_of_two_channels_by_hand():
    """Based's map with d = 2: (1, x / 2^(1/4), vec(x x^T) / (sqrt(2) sqrt(2)))."""
    pipeline = feature_map("taylor", 1, 2)
    assert pipeline.out_width == 1 + 2 + 4
    x = torch.tensor([[3.0, -2.0]], dtype=torch.float64)
    q = 2 ** 0.25
    expected = torch.tensor([[1, 3 / q, -2 / q, 9 / 2, -6 / 2, -6 / 2, 4 / 2]], dtype=torch.float64)
    torch.testing.assert_close(apply(pipeline, x), expected, rtol=1e-15, atol=1e-15)


def test_taylor_is_based_second_order_kernel():
    """phi(q).phi(k) = 1 + s + s^2 / 2 with s = q.k / sqrt(d), per head (heads 2, d 6)."""
    pipeline = feature_map("taylor", 2, 12)
    assert pipeline.out_width == 2 * (1 + 6 + 36)
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(3, 12, generator=g, dtype=torch.float64) for _ in range(2))
    s = (q * k).reshape(3, 2, 6).sum(-1) / math.sqrt(6)
    features = (apply(pipeline, q) * apply(pipeline, k)).reshape(3, 2, -1).sum(-1)
    torch.testing.assert_close(features, 1 + s + s ** 2 / 2, rtol=1e-12, atol=1e-12)


LEVEL = """
level mem : matrix {{
    key = x |> proj |> l2norm |> {map}
    value = x |> proj
    query = x |> proj |> l2norm |> {map}
    retain = x |> proj(per=channel) |> sigmoid
    every 1
}}
model {{
    vocab 11
    dim 8
    heads 2
    block = residual(rmsnorm |> mem)
}}
train {{
    context 16
    batch 2
}}
"""


@pytest.mark.parametrize("feature, per_head", [("tensor_poly(3)", math.comb(4 + 3, 3)), ("taylor", 1 + 4 + 16)])
def test_the_level_state_and_the_estimate_follow_the_widened_keys(feature, per_head):
    """With 2 heads of 4 channels, keys and queries have `per_head` channels per head: the
    memory is [2, 4, per_head], the per-channel retain gate gives 2 x per_head values, the output
    projection reads the 4 value channels, and the estimate counts the same parameters and state."""
    program = nestc.check(LEVEL.format(map=feature))
    model = reference.build(program)
    kernel = next(m for m in model.modules() if isinstance(m, MemoryKernel))
    assert (kernel.key_dim, kernel.value_dim) == (per_head, 4)
    logits, state = model(torch.randint(0, 11, (2, 5)))
    memory = next(iter(state.levels[0].values()))
    assert memory.weights[0].shape == (2, 2, 4, per_head)
    gate = next(m for m in model.modules() if isinstance(m, reference.MemoryLevel)).gates["retain"]
    assert gate.pipeline.out_width == 2 * per_head
    assert logits.shape == (2, 5, 11) and torch.isfinite(logits).all()
    found = estimate(program)
    assert found.parameters == sum(p.numel() for p in model.parameters())
    assert found.state_bytes == 4 * 2 * 4 * per_head  # float32, one matrix per sequence


def test_a_feature_map_on_a_width_the_heads_do_not_divide_is_a_clear_error():
    program = nestc.check(LEVEL.format(map="tensor_poly(2)").replace("key = x |> proj |> l2norm",
                                                                      "key = x |> proj(dim=5) |> l2norm"))
    with pytest.raises(BackendError, match=r"`tensor_poly` acts on each head's channels, but 2 heads do not "
                                           r"divide its input's width 5"):
        reference.build(program)


def test_poly_stays_elementwise():
    """`poly` keeps the width: sum_i a_i x^i on each channel, a_i = 1/i! at first."""
    pipeline = feature_map("poly(2)", 2, 4)
    assert pipeline.out_width == 4
    x = torch.tensor([[3.0, -2.0, 0.5, 4.0]], dtype=torch.float64)
    torch.testing.assert_close(apply(pipeline, x).double(), 1 + x + x ** 2 / 2)


def test_the_atlas_spec_stores_pairs_of_phi_2_features():
    """specs/atlas.nest (ATLAS Prop. 2): keys and queries of 8 channels per head go through phi_2,
    so its memory's first map reads C(8 + 2, 2) = 45 channels per head and maps to 16 value channels."""
    from nesttest import REPO

    program = nestc.check(str(REPO / "specs" / "atlas.nest"))
    level = program.level("memory")
    assert level.key.stages[-1].name == level.query.stages[-1].name == "tensor_poly"
    kernel = next(m for m in reference.build(program).modules()
                  if isinstance(m, MemoryKernel) and m.level.name == "memory")
    assert (kernel.key_dim, kernel.value_dim) == (45, 16)
    assert [shape[1:] for shape in kernel._shapes] == [(180, 45), (16, 180)]

"""The MIRAS models against their papers' equations, one test per equation (issue 14, item 7).

Each expected value is the paper's update written out here by hand, for one (sequence, head)
pair, with torch autograd taking the gradient of the paper's loss as the paper states it; the
memory is MIRAS' M(x) = x + LN(W1 gelu(W2 x)). Both backends' kernels run the rule (the compiled
one in its parallel `trajectory` form) in float64. Each test also checks that the case tells the
paper's form apart from the form it replaced, so that it would fail on the old rule.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nestc.passes.plan import plan_kernel
from oracles import kernel, qkv, run, uniform

pytestmark = pytest.mark.usefixtures("kernel_backend")

B, T, H, D, EXPAND, EVERY = 2, 7, 2, 4, 2, 2
MLP = f"mlp(depth=2, expand={EXPAND}, act=gelu, residual=true, norm=layernorm)"


def memory(weights: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """MIRAS §5.3: M(x) = x + LN(W1 gelu(W2 x)), W2 the first map (hidden x d), W1 the second."""
    first, second = weights
    return x + F.layer_norm(second @ F.gelu(first @ x), (x.shape[-1],))


def gradient_wrt(weights: list[torch.Tensor], loss) -> list[torch.Tensor]:
    leaves = [w.detach().requires_grad_() for w in weights]
    return list(torch.autograd.grad(loss(leaves), leaves))


def inputs(seed: int):
    q, k, v = (x.double() for x in qkv(seed, B, T, H, D, D))
    gates = {"lr": uniform(seed + 1, B, T, H, low=0.2, high=0.6).double(),
             "retain": uniform(seed + 2, B, T, H, low=0.7, high=1.0).double()}
    return q, k, v, gates


def memory_kernel(body: str, seed: int):
    torch.manual_seed(seed)  # the meta-learned initial state A_0
    kern = kernel(body + f"\noptimizer gd\nevery {EVERY}\nread after\ninit meta", H, D, D, state=MLP).double()
    assert plan_kernel(kern, per_channel=False).kernel in ("layered", "trajectory")  # a parallel form runs it
    return kern


def by_hand(kern, q, k, v, gates, mirror, step_loss, objective_gates=()):
    """The rule for every (b, h): A_t = alpha_t A_{t-1} - eta_t g_t with g_t the gradient of
    `step_loss` at the anchor (the state at the previous chunk end, MIRAS' t' = t - mod(t, b)),
    W = mirror(A), y_t = M_{W_t}(q_t). `step_loss` also receives the token's values of the
    `objective_gates`. Returns y [B, T, H, d] and the final W."""
    ys = torch.zeros(B, T, H, D, dtype=torch.float64)
    finals = []
    for b in range(B):
        for h in range(H):
            stored = [w[h].detach().double() for w in kern.initial]
            anchor = stored
            for t in range(T):
                grads = step_loss(anchor, k[b, t, h], v[b, t, h], *(gates[role][b, t, h] for role in objective_gates))
                stored = [gates["retain"][b, t, h] * a - gates["lr"][b, t, h] * g for a, g in zip(stored, grads)]
                if (t + 1) % EVERY == 0:
                    anchor = stored
                ys[b, t, h] = memory(mirror(stored), q[b, t, h])
            finals.append(mirror(stored))
    return ys, finals


def mapped_final(kern, state) -> list[list[torch.Tensor]]:
    weights = kern.mapped(state.weights)
    return [[w[b, h] for w in weights] for b in range(B) for h in range(H)]


def assert_matches(kern, q, k, v, gates, expected_y, expected_finals):
    y, state = run(kern, k, v, q, gates)
    torch.testing.assert_close(y, expected_y, rtol=1e-10, atol=1e-10)
    for ours, theirs in zip(mapped_final(kern, state), expected_finals, strict=True):
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def lp_loss(p: float):
    return lambda prediction, value: (prediction - value).abs().pow(p).sum()


def l2_loss(prediction, value):
    return 0.5 * (prediction - value).pow(2).sum()


def at_mapped(mirror, loss):
    """The paper's gradient: with respect to the mapped weights W = mirror(A), at W."""
    return lambda anchor, key, value: gradient_wrt(mirror(anchor), lambda w: loss(memory(w, key), value))


def through_map(mirror, loss):
    """The replaced (and `gradient=stored`) gradient: of l(mirror(A)) with respect to A."""
    return lambda anchor, key, value: gradient_wrt(anchor, lambda a: loss(memory(mirror(a), key), value))


def lq_normalised(weights):
    """MIRAS eq. 25 with q = 4: W = A / ||A||_4^(4-2), each map normalised as a whole."""
    return [a / a.abs().pow(4).sum().pow(1 / 4) ** 2 for a in weights]


def row_softmax(weights):
    return [a.softmax(dim=-1) for a in weights]


def test_moneta_updates_with_the_gradient_wrt_W():
    """MIRAS eqs. 24-25: A_t = alpha_t A_{t-1} - eta_t grad l_3(W_{t-1}; k_t, v_t), W_t = A_t / ||A_t||_4^2,
    l_3 = ||M(k) - v||_3^3 and the gradient taken with respect to W."""
    q, k, v, gates = inputs(300)
    kern = memory_kernel("objective lp(p=3)\noutput normalize(q=4)", 301)
    expected_y, expected_finals = by_hand(kern, q, k, v, gates, lq_normalised, at_mapped(lq_normalised, lp_loss(3)))
    assert_matches(kern, q, k, v, gates, expected_y, expected_finals)
    replaced_y, _ = by_hand(kern, q, k, v, gates, lq_normalised, through_map(lq_normalised, lp_loss(3)))
    assert (replaced_y - expected_y).abs().max() > 1e-2  # the case separates the two forms


def test_memora_updates_with_the_gradient_wrt_W_on_the_simplex():
    """MIRAS eq. 27, written in W itself: W_t = softmax(alpha_t log W_{t-1} - eta_t grad l_2(W_anchor; k_t, v_t))
    over each row, l_2 = 1/2 ||M(k) - v||^2, the gradient taken with respect to W. (nestc keeps the
    logits A, W = softmax(A); with a retain gate that is one number per row, as here, the two agree.)"""
    q, k, v, gates = inputs(310)
    kern = memory_kernel("objective l2\noutput softmax", 311)
    ys = torch.zeros(B, T, H, D, dtype=torch.float64)
    finals = []
    for b in range(B):
        for h in range(H):
            weights = [w[h].detach().double().softmax(dim=-1) for w in kern.initial]
            anchor = weights
            for t in range(T):
                grads = gradient_wrt(anchor, lambda w: l2_loss(memory(w, k[b, t, h]), v[b, t, h]))
                weights = [(gates["retain"][b, t, h] * w.log() - gates["lr"][b, t, h] * g).softmax(dim=-1)
                           for w, g in zip(weights, grads)]
                if (t + 1) % EVERY == 0:
                    anchor = weights
                ys[b, t, h] = memory(weights, q[b, t, h])
            finals.append(weights)
    assert_matches(kern, q, k, v, gates, ys, finals)
    replaced_y, _ = by_hand(kern, q, k, v, gates, row_softmax, through_map(row_softmax, l2_loss))
    assert (replaced_y - ys).abs().max() > 1e-3


@pytest.mark.parametrize("output, mirror", [("normalize(q=4, gradient=stored)", lq_normalised),
                                            ("softmax(gradient=stored)", row_softmax)])
def test_gradient_stored_steps_with_the_gradient_through_the_map(output, mirror):
    """The alternative a spec can select: plain gradient descent on A of l(map(A))."""
    q, k, v, gates = inputs(320)
    kern = memory_kernel(f"objective lp(p=3)\noutput {output}", 321)
    expected_y, expected_finals = by_hand(kern, q, k, v, gates, mirror, through_map(mirror, lp_loss(3)))
    assert_matches(kern, q, k, v, gates, expected_y, expected_finals)


def test_yaad_switches_per_token_on_the_residual_norm():
    """MIRAS eq. 26 with a data-dependent delta_t (here a different threshold for every token):
    W_t = alpha_t W_{t-1} - eta_t grad l2(W_anchor; k_t, v_t) if ||M(k_t) - v_t|| <= delta_t, else
    W_t = alpha_t W_{t-1} - eta_t delta_t grad l1(W_anchor; k_t, v_t), l2 = 1/2 ||r||^2 (nestc's l2,
    SEMANTICS §3) and l1 = ||r||_1."""
    q, k, v, gates = inputs(330)
    gates["threshold"] = uniform(332, B, T, H, low=1.0, high=4.0).double()
    kern = memory_kernel("objective huber_token", 331)
    branches = {"l2": 0, "l1": 0, "l1 with every coordinate within delta": 0}

    def step_loss(anchor, key, value, threshold):
        residual = memory(anchor, key) - value
        if residual.norm() <= threshold:
            branches["l2"] += 1
            return gradient_wrt(anchor, lambda w: 0.5 * (memory(w, key) - value).pow(2).sum())
        branches["l1"] += 1
        # where a coordinate-wise Huber loss with the same delta would still be quadratic
        branches["l1 with every coordinate within delta"] += int(residual.abs().max() <= threshold)
        return [threshold * g for g in gradient_wrt(anchor, lambda w: (memory(w, key) - value).abs().sum())]

    ys, finals = by_hand(kern, q, k, v, gates, lambda weights: weights, step_loss, objective_gates=("threshold",))
    assert_matches(kern, q, k, v, gates, ys, finals)
    # both branches are taken, and some tokens switch on the norm alone
    assert branches["l2"] > 0 and branches["l1 with every coordinate within delta"] > 0, branches

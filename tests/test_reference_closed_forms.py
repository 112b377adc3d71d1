"""The reference backend's memory kernel against closed forms written out by hand.

Each rule below is SEMANTICS §3-4 transcribed for one (sequence, head) pair with 2-D tensors:
M is the d_v x d_k memory, k, q have d_k channels, v has d_v, t runs over tokens (0-based here, so
the anchor of token t under `every C` is the state after token C*floor(t/C) - 1, i.e. the state at
the end of the previous chunk; the state still changes every token). Nothing here calls nestc
except to build and run the kernel under test.
"""

from __future__ import annotations

import pytest
import torch

from oracles import assert_close, kernel, qkv, run, uniform

pytestmark = pytest.mark.usefixtures("kernel_backend")

B, H = 2, 2


# --- one sequence, one head ---------------------------------------------------------------------


def per_sequence(rule, k, v, q, gates: dict[str, torch.Tensor], **options):
    """Apply `rule(k[t], v[t], q[t], gates[t]) ...` to every (batch, head) slice; stack the results.

    k, q [B, T, H, dk], v [B, T, H, dv], gates [B, T, H] or [B, T, H, dk]. Returns y [B, T, H, dv]
    and the final memory with a leading [B, H]."""
    ys, finals = [], []
    for b in range(k.shape[0]):
        ys.append([])
        finals.append([])
        for h in range(k.shape[2]):
            y, final = rule(k[b, :, h], v[b, :, h], q[b, :, h], {n: g[b, :, h] for n, g in gates.items()}, **options)
            ys[-1].append(y)
            finals[-1].append(final)
    y = torch.stack([torch.stack(row, dim=1) for row in ys])  # [B, T, H, dv]
    final = torch.stack([torch.stack(row) for row in finals])
    return y, final


def outer(a, b):
    return a[:, None] * b[None, :]


def cols(M, gate):
    """gate * M for a scalar gate, M diag(gate) for a per-channel (key-side) gate."""
    return M * gate if gate.dim() == 0 else M * gate[None, :]


def anchor_refresh(t: int, every: int) -> bool:
    return (t + 1) % every == 0


def l2_grad(M, k, v):
    """d/dM 1/2 ||M k - v||^2 = (M k - v) k^T."""
    return outer(M @ k - v, k)


def dot_grad(M, k, v):
    """d/dM -<M k, v> = -v k^T."""
    return -outer(v, k)


def gd_rule(k, v, q, g, grad=l2_grad, every=1, read="after", order="grad_first"):
    """M_t = retain_t * M_{t-1} - lr_t * grad(at), at = the anchor (grad_first) or the anchor decayed by
    every retain gate since it (decay_first)."""
    M = torch.zeros(v.shape[-1], k.shape[-1])
    anchor, decay = M, torch.ones(k.shape[-1]) if g["retain"].dim() == 2 else torch.tensor(1.0)
    ys = []
    for t in range(k.shape[0]):
        lr, retain = g["lr"][t], g["retain"][t]
        y_before = anchor @ q[t]
        decay = decay * retain
        at = anchor if order == "grad_first" else cols(anchor, decay)
        M = cols(M, retain) - cols(grad(at, k[t], v[t]), lr)
        if anchor_refresh(t, every):
            anchor, decay = M, torch.ones_like(decay)
        ys.append(y_before if read == "before" else M @ q[t])
    return torch.stack(ys), M


def delta_rule(k, v, q, g):
    """DeltaNet, as in the paper: M_t = M_{t-1} - beta_t (M_{t-1} k_t - v_t) k_t^T, y_t = M_t q_t."""
    M = torch.zeros(v.shape[-1], k.shape[-1])
    ys = []
    for t in range(k.shape[0]):
        M = M - g["lr"][t] * outer(M @ k[t] - v[t], k[t])
        ys.append(M @ q[t])
    return torch.stack(ys), M


def gated_delta_rule(k, v, q, g):
    """Gated DeltaNet: M' = alpha_t M_{t-1}; M_t = M' - beta_t (M' k_t - v_t) k_t^T."""
    M = torch.zeros(v.shape[-1], k.shape[-1])
    ys = []
    for t in range(k.shape[0]):
        decayed = cols(M, g["retain"][t])
        M = decayed - cols(outer(decayed @ k[t] - v[t], k[t]), g["lr"][t])
        ys.append(M @ q[t])
    return torch.stack(ys), M


def titans_rule(k, v, q, g, every=1, read="after"):
    """Titans (linear memory): S_t = mu_t S_{t-1} - lr_t (A k_t - v_t) k_t^T; M_t = retain_t M_{t-1} + S_t,
    A the anchor (every 1: M_{t-1}); read before = A q_t."""
    M = torch.zeros(v.shape[-1], k.shape[-1])
    S = torch.zeros_like(M)
    anchor = M
    ys = []
    for t in range(k.shape[0]):
        y_before = anchor @ q[t]
        S = cols(S, g["momentum"][t]) - cols(outer(anchor @ k[t] - v[t], k[t]), g["lr"][t])
        M = cols(M, g["retain"][t]) + S
        if anchor_refresh(t, every):
            anchor = M
        ys.append(y_before if read == "before" else M @ q[t])
    return torch.stack(ys), torch.stack([M, S])


def dgd_rule(k, v, q, g, grad=l2_grad):
    """DGD: M_t = M_{t-1} (retain_t I - lr_t k_t k_t^T) - lr_t grad l(M_{t-1}; k_t, v_t)."""
    M = torch.zeros(v.shape[-1], k.shape[-1])
    eye = torch.eye(k.shape[-1])
    ys = []
    for t in range(k.shape[0]):
        lr, retain = g["lr"][t], g["retain"][t]
        M = M @ (retain * eye - lr * outer(k[t], k[t])) - lr * grad(M, k[t], v[t])
        ys.append(M @ q[t])
    return torch.stack(ys), M


def vector_rule(k, v, q, g, objective="l2"):
    """Diagonal memory y = m * q: l2 gradient (m*k - v)*k, dot gradient -v*k."""
    m = torch.zeros(k.shape[-1])
    ys = []
    for t in range(k.shape[0]):
        grad = (m * k[t] - v[t]) * k[t] if objective == "l2" else -v[t] * k[t]
        m = g["retain"][t] * m - g["lr"][t] * grad
        ys.append(m * q[t])
    return torch.stack(ys), m


def head_gate(seed, T, low=0.0, high=1.0):
    return uniform(seed, B, T, H, low=low, high=high)


def channel_gate(seed, T, d, low=0.0, high=1.0):
    return uniform(seed, B, T, H, d, low=low, high=high)


def compare(kern, k, v, q, gates, rule, what, **options):
    y, state = run(kern, k, v, q, gates)
    y_hand, final = per_sequence(rule, k, v, q, gates, **options)
    assert_close(y, y_hand, f"{what} outputs")
    return state, final


# --- linear attention: the causal sum ----------------------------------------------------------


@pytest.mark.parametrize("dk, dv", [(8, 8), (4, 6)])
def test_linear_attention_is_the_causal_sum(dk, dv):
    """y_t = sum_{s <= t} v_s k_s^T q_t, computed all at once with a causal mask (no recurrence)."""
    T = 13
    q, k, v = qkv(100, B, T, H, dk, dv, normalize_keys=False)
    scores = torch.einsum("bthd,bshd->bhts", q, k).tril()
    expected = torch.einsum("bhts,bshv->bthv", scores, v)
    y, state = run(kernel("objective dot\nlr = 1\nevery 1", H, dk, dv), k, v, q, {})
    assert_close(y, expected, "linear attention = causal sum: outputs")
    assert_close(state.weights[0], torch.einsum("bthv,bthk->bhvk", v, k), "linear attention: final state = sum v k^T")


def test_decayed_linear_attention_is_the_weighted_causal_sum():
    """RetNet / Mamba2 form: y_t = sum_{s<=t} (prod_{s<j<=t} retain_j) lr_s v_s k_s^T q_t."""
    T, dk, dv = 13, 8, 8
    q, k, v = qkv(101, B, T, H, dk, dv, normalize_keys=False)
    lr, retain = head_gate(102, T), head_gate(103, T, 0.3, 1.0)
    log_cum = retain.log().cumsum(1)  # [B, T, H]
    weights = (log_cum[:, :, None, :] - log_cum[:, None, :, :]).exp()  # [B, t, s, H] = prod_{s<j<=t}
    weights = weights * torch.ones(T, T).tril()[None, :, :, None] * lr[:, None, :, :]
    scores = torch.einsum("bthd,bshd->btsh", q, k) * weights
    expected = torch.einsum("btsh,bshv->bthv", scores, v)
    y, _ = run(kernel("objective dot\nevery 1", H, dk, dv), k, v, q, {"lr": lr, "retain": retain})
    assert_close(y, expected, "decayed linear attention = weighted causal sum: outputs")


# --- the delta rule family ----------------------------------------------------------------------


@pytest.mark.parametrize("dk, dv", [(8, 8), (4, 6)])
def test_deltanet_is_the_delta_rule_loop(dk, dv):
    T = 13
    q, k, v = qkv(110, B, T, H, dk, dv)
    gates = {"lr": head_gate(111, T)}
    state, final = compare(kernel("objective l2\noptimizer gd\nevery 1\nread after", H, dk, dv),
                           k, v, q, gates, delta_rule, "DeltaNet loop")
    assert_close(state.weights[0], final, "DeltaNet loop: final state")


@pytest.mark.parametrize("order", ["grad_first", "decay_first"])
def test_gd_with_retain_in_either_order(order):
    """grad_first: M_t = a M - lr (M k - v) k^T; decay_first: the gradient at a M (Gated DeltaNet)."""
    T, dk, dv = 13, 8, 8
    q, k, v = qkv(112, B, T, H, dk, dv)
    gates = {"lr": head_gate(113, T), "retain": head_gate(114, T, 0.2, 1.0)}
    rule = gd_rule if order == "grad_first" else gated_delta_rule
    state, final = compare(kernel(f"objective l2\nevery 1\norder {order}", H, dk, dv), k, v, q, gates, rule,
                           f"gd + retain, {order}")
    assert_close(state.weights[0], final, f"gd + retain, {order}: final state")


@pytest.mark.parametrize("dk, dv", [(8, 8), (4, 6)])
def test_gated_deltanet_is_the_gated_delta_rule_loop(dk, dv):
    T = 13
    q, k, v = qkv(115, B, T, H, dk, dv)
    retain = head_gate(117, T, 0.0, 1.0)
    retain[:, 3] = 0.0  # one token forgets everything, one keeps everything
    retain[:, 7] = 1.0
    gates = {"lr": head_gate(116, T), "retain": retain}
    state, final = compare(kernel("objective l2\nevery 1\norder decay_first", H, dk, dv), k, v, q, gates,
                           gated_delta_rule, "Gated DeltaNet loop")
    assert_close(state.weights[0], final, "Gated DeltaNet loop: final state")


@pytest.mark.parametrize("read", ["after", "before"])
def test_titans_momentum_loop(read):
    T, dk, dv = 13, 8, 6
    q, k, v = qkv(120, B, T, H, dk, dv)
    gates = {"lr": head_gate(121, T, 0.0, 0.5), "retain": head_gate(122, T, 0.5, 1.0),
             "momentum": head_gate(123, T)}
    state, final = compare(kernel(f"objective l2\noptimizer momentum\nevery 1\nread {read}", H, dk, dv),
                           k, v, q, gates, titans_rule, f"Titans momentum loop (read {read})", read=read)
    assert_close(state.weights[0], final[:, :, 0], f"Titans momentum loop (read {read}): final state")
    assert_close(state.momentum[0], final[:, :, 1], f"Titans momentum loop (read {read}): final momentum")


def test_read_before_every_1_is_the_previous_state():
    """`read before` with `every 1`: y_t = M_{t-1} q_t, i.e. the `read after` outputs shifted by one."""
    T, dk, dv = 13, 8, 8
    q, k, v = qkv(125, B, T, H, dk, dv)
    gates = {"lr": head_gate(126, T), "retain": head_gate(127, T, 0.5, 1.0)}
    after, _ = run(kernel("objective l2\nevery 1\nread after", H, dk, dv), k, v, q, gates)
    before, _ = run(kernel("objective l2\nevery 1\nread before", H, dk, dv), k, v, q, gates)
    # M_{t-1} q_t: the hand loop's state before token t, read with q_t
    y_hand, _ = per_sequence(gd_rule, k, v, q, gates, read="before")
    assert_close(before, y_hand, "read before (every 1) = M_{t-1} q_t")
    assert torch.all(before[:, 0] == 0)
    assert (after - before).abs().max() > 1e-3


@pytest.mark.parametrize("objective", ["dot", "l2"])
def test_dgd_on_a_matrix(objective):
    """DGD: M_t = M_{t-1}(retain I - lr k k^T) - lr grad. With `dot` this is the delta rule exactly
    (with retain: a M - lr (M k - v) k^T); with `l2` the k k^T decay appears twice (Hope eq. 93)."""
    T, dk, dv = 13, 8, 6
    q, k, v = qkv(130, B, T, H, dk, dv)
    gates = {"lr": head_gate(131, T, 0.0, 0.5), "retain": head_gate(132, T, 0.5, 1.0)}
    kern = kernel(f"objective {objective}\noptimizer dgd\nevery 1", H, dk, dv)
    grad = dot_grad if objective == "dot" else l2_grad
    state, final = compare(kern, k, v, q, gates, dgd_rule, f"DGD ({objective})", grad=grad)
    assert_close(state.weights[0], final, f"DGD ({objective}): final state")
    if objective == "dot":
        y_delta, _ = per_sequence(gd_rule, k, v, q, gates)  # a M - lr (M k - v) k^T: the delta rule
        y, _ = run(kern, k, v, q, gates)
        assert_close(y, y_delta, "DGD (dot) = delta rule with retain")
        plain = {"lr": gates["lr"], "retain": torch.ones_like(gates["retain"])}
        y, _ = run(kern, k, v, q, plain)
        y_delta, _ = per_sequence(delta_rule, k, v, q, plain)
        assert_close(y, y_delta, "DGD (dot, retain 1) = DeltaNet")


# --- `every C`: the gradient anchor ------------------------------------------------------------


EVERY_CASES = [
    ("gd", "after", "grad_first"),
    ("gd", "before", "grad_first"),
    ("gd", "after", "decay_first"),
    ("momentum", "after", "grad_first"),
    ("momentum", "before", "grad_first"),
]


@pytest.mark.parametrize("optimizer, read, order", EVERY_CASES, ids=["-".join(c) for c in EVERY_CASES])
def test_every_4_anchor_semantics(optimizer, read, order):
    """every 4, T = 10 (chunks 0-3, 4-7, 8-9): the gradient for token t is taken at the state at the
    end of the previous chunk (decay_first: that state times the retain gates since it), while the
    state itself changes every token; `read before` reads the anchor: y_t = M_anchor q_t."""
    T, C, dk, dv = 10, 4, 8, 6
    q, k, v = qkv(140, B, T, H, dk, dv)
    gates = {"lr": head_gate(141, T, 0.0, 0.8), "retain": head_gate(142, T, 0.5, 1.0)}
    body = f"objective l2\noptimizer {optimizer}\nevery {C}\nread {read}\norder {order}"
    if optimizer == "momentum":
        gates["momentum"] = head_gate(143, T)
        rule, options = titans_rule, {"every": C, "read": read}
    else:
        rule, options = gd_rule, {"every": C, "read": read, "order": order}
    kern = kernel(body, H, dk, dv)
    state, final = compare(kern, k, v, q, gates, rule, f"every 4 [{optimizer}, read {read}, {order}]", **options)
    final_weights = final if optimizer == "gd" else final[:, :, 0]
    assert_close(state.weights[0], final_weights, f"every 4 [{optimizer}, read {read}, {order}]: final state")
    # ... and it is a different function from every 1
    y1, _ = run(kernel(body.replace(f"every {C}", "every 1"), H, dk, dv), k, v, q, gates)
    y4, _ = run(kern, k, v, q, gates)
    assert (y1 - y4).abs().max() > 1e-3


def test_every_c_does_not_matter_for_the_dot_objective():
    """-v k^T does not depend on the state, so every C is every 1 under `objective dot`."""
    T, dk, dv = 10, 8, 8
    q, k, v = qkv(145, B, T, H, dk, dv, normalize_keys=False)
    gates = {"lr": head_gate(146, T), "retain": head_gate(147, T, 0.5, 1.0)}
    y1, s1 = run(kernel("objective dot\nevery 1", H, dk, dv), k, v, q, gates)
    y4, s4 = run(kernel("objective dot\nevery 4", H, dk, dv), k, v, q, gates)
    assert_close(y4, y1, "dot: every 4 = every 1 (outputs)")
    assert_close(s4.weights[0], s1.weights[0], "dot: every 4 = every 1 (final state)")


# --- per-channel gates --------------------------------------------------------------------------


@pytest.mark.parametrize("every", [1, 4])
@pytest.mark.parametrize("order", ["grad_first", "decay_first"])
def test_per_channel_gates_gd(order, every):
    """Per-channel lr and retain multiply M along its key (column) dimension:
    M_t = M_{t-1} diag(retain_t) - grad diag(lr_t); decay_first takes the gradient at
    M_anchor diag(prod of retain since the anchor)."""
    T, dk, dv = 10, 8, 6
    q, k, v = qkv(150, B, T, H, dk, dv)
    gates = {"lr": channel_gate(151, T, dk), "retain": channel_gate(152, T, dk, 0.1, 1.0)}
    kern = kernel(f"objective l2\nevery {every}\norder {order}", H, dk, dv)
    what = f"per-channel gates [gd, {order}, every {every}]"
    state, final = compare(kern, k, v, q, gates, gd_rule, what, every=every, order=order)
    assert_close(state.weights[0], final, f"{what}: final state")


def test_per_channel_gates_momentum():
    T, dk, dv = 13, 8, 6
    q, k, v = qkv(155, B, T, H, dk, dv)
    gates = {"lr": channel_gate(156, T, dk, 0.0, 0.5), "retain": channel_gate(157, T, dk, 0.3, 1.0),
             "momentum": channel_gate(158, T, dk)}
    kern = kernel("objective l2\noptimizer momentum\nevery 1", H, dk, dv)
    state, final = compare(kern, k, v, q, gates, titans_rule, "per-channel gates [momentum]")
    assert_close(state.weights[0], final[:, :, 0], "per-channel gates [momentum]: final state")
    assert_close(state.momentum[0], final[:, :, 1], "per-channel gates [momentum]: final momentum")


# --- vector state -------------------------------------------------------------------------------


@pytest.mark.parametrize("objective", ["l2", "dot"])
@pytest.mark.parametrize("per", ["head", "channel"])
def test_vector_state(objective, per):
    """A diagonal memory: y = m * q, m_t = retain_t m_{t-1} - lr_t grad, elementwise."""
    T, d = 13, 8
    q, k, v = qkv(160, B, T, H, d, d)
    if per == "head":
        gates = {"lr": head_gate(161, T), "retain": head_gate(162, T, 0.5, 1.0)}
    else:
        gates = {"lr": channel_gate(161, T, d), "retain": channel_gate(162, T, d, 0.5, 1.0)}
    kern = kernel(f"objective {objective}\nevery 1", H, d, d, state="vector")
    what = f"vector state [{objective}, per {per}]"
    state, final = compare(kern, k, v, q, gates, vector_rule, what, objective=objective)
    assert_close(state.weights[0], final, f"{what}: final state")


# --- an MLP memory, by autograd -----------------------------------------------------------------


def mlp_memory(W, x, act):
    """M(x) = x + W1 act(W0 x): residual depth-2 MLP (W0 the first map, W1 the second)."""
    return x + W[1] @ act(W[0] @ x)


def mlp_rule(k, v, q, g, initial, act, every, optimizer):
    """One literal step per token on 1/2 ||M(k) - v||^2 at the anchor weights, gradients by
    torch.autograd; gd: W_i = retain W_i - lr dL/dW_i; dgd (layer-local): W_i = W_i (retain I - lr x_i x_i^T)
    - lr dL/dW_i with x_i the input of map i at the anchor (x_0 = k, x_1 = act(W0 k))."""
    W = [w.clone() for w in initial]
    anchor = W
    ys = []
    for t in range(k.shape[0]):
        leaves = [w.detach().clone().requires_grad_() for w in anchor]
        with torch.enable_grad():
            loss = 0.5 * (mlp_memory(leaves, k[t], act) - v[t]).pow(2).sum()
            grads = torch.autograd.grad(loss, leaves)
        lr, retain = g["lr"][t], g["retain"][t]
        if optimizer == "gd":
            W = [retain * w - lr * grad for w, grad in zip(W, grads)]
        else:
            inputs = [k[t], act(anchor[0] @ k[t])]
            W = [w @ (retain * torch.eye(x.shape[0]) - lr * outer(x, x)) - lr * grad
                 for w, grad, x in zip(W, grads, inputs)]
        if anchor_refresh(t, every):
            anchor = W
        ys.append(mlp_memory(W, q[t], act))
    return torch.stack(ys), torch.cat([w.flatten() for w in W])


@pytest.mark.parametrize("optimizer, every", [("gd", 2), ("dgd", 1)])
def test_mlp_memory_against_autograd(optimizer, every):
    T, d, expand = 7, 4, 2
    q, k, v = qkv(170, B, T, H, d, d)
    gates = {"lr": head_gate(171, T, 0.0, 0.5), "retain": head_gate(172, T, 0.8, 1.0)}
    torch.manual_seed(173)  # the meta-learned initial weights
    kern = kernel(f"objective l2\noptimizer {optimizer}\nevery {every}\nread after", H, d, d,
                  state=f"mlp(depth=2, expand={expand}, act=tanh, residual=true)")
    assert [tuple(w.shape) for w in kern.initial] == [(H, d * expand, d), (H, d, d * expand)]
    y, state = run(kern, k, v, q, gates)
    ys, finals = [], []
    for b in range(B):
        ys.append([])
        finals.append([])
        for h in range(H):
            initial = [w[h].detach() for w in kern.initial]
            y_h, final = mlp_rule(k[b, :, h], v[b, :, h], q[b, :, h], {n: g_[b, :, h] for n, g_ in gates.items()},
                                  initial, torch.tanh, every, optimizer)
            ys[-1].append(y_h)
            finals[-1].append(final)
    y_hand = torch.stack([torch.stack(row, dim=1) for row in ys])
    what = f"mlp memory [{optimizer}, every {every}]"
    assert_close(y, y_hand, f"{what} outputs")
    ours = torch.stack([torch.stack([torch.cat([w[b, h].flatten() for w in state.weights]) for h in range(H)])
                        for b in range(B)])
    assert_close(ours, torch.stack([torch.stack(row) for row in finals]), f"{what}: final weights")


# --- the generalised delta rule (SEMANTICS §3) ---------------------------------------------------


def generalised_delta_rule(k, v, q, g, steps=1, order="decay_first", implicit=False):
    """Each token's steps j = 1..N in order, with k_j, v_j the j-th of the token's N keys and values
    and the j-th lr, erase and write gates: e = erase k_j, u = write v_j, w = lr k_j (w / (1 + w.e)
    for the implicit step), R = u - A e and M = M' + R w^T, where M' = M diag(retain_t) at the
    first step (the token's one decay) and M after; A = M' under decay_first, the undecayed M at
    the first step under grad_first."""
    dk, dv = k.shape[-1] // steps, v.shape[-1] // steps
    M = torch.zeros(dv, dk)
    ones = torch.ones(k.shape[0], steps)
    lr, erase, write = (g.get(role, ones) for role in ("lr", "erase", "write"))
    ys = []
    for t in range(k.shape[0]):
        by_step = [gate[t].reshape(steps, -1) for gate in (lr, erase, write)]
        for j in range(steps):
            key, value = k[t, j * dk:(j + 1) * dk], v[t, j * dv:(j + 1) * dv]
            step_lr, step_erase, step_write = (gate[j] for gate in by_step)
            decayed = cols(M, g["retain"][t]) if j == 0 else M
            read_at = M if (j == 0 and order == "grad_first") else decayed
            e, w = step_erase * key, step_lr * key
            if implicit:
                w = w / (1 + w @ e)
            M = decayed + outer(step_write * value - read_at @ e, w)
        ys.append(M @ q[t])
    return torch.stack(ys), M


GENERALISED_CASES = [
    # (name, body, steps, lr, erase, write and retain widths per step: 1 per head, "k" / "v" per channel)
    ("GDN-2: erase per key channel, write per value channel", "order decay_first", 1, "1", "k", "v", "k"),
    ("implicit, per-channel lr, grad_first", "optimizer gd(implicit=true)", 1, "k", "1", "1", "1"),
    ("Gated DeltaProduct, 2 steps", "order decay_first", 2, "1", None, None, "1"),
    ("3 steps, every gate, implicit", "optimizer gd(implicit=true)", 3, "k", "k", "1", "k"),
]


@pytest.mark.parametrize("body, steps, lr, erase, write, retain", [c[1:] for c in GENERALISED_CASES],
                         ids=[c[0] for c in GENERALISED_CASES])
def test_the_generalised_delta_rule_is_its_loop(body, steps, lr, erase, write, retain):
    T, dk, dv = 13, 4, 6
    q, k_all, v_all = qkv(190, B, T, H * steps, dk, dv)
    # a token's N keys side by side in each head (the layout a key pipeline gives under `substeps`)
    k, v = (x.reshape(B, T, H, steps * x.shape[-1]) for x in (k_all, v_all))
    q = q[:, :, :H]
    width = {"1": 1, "k": dk, "v": dv}

    def gate(seed, kind, low=0.0, high=1.0):
        shape = (B, T, H) if (kind == "1" and steps == 1) else (B, T, H, steps * width[kind])
        return uniform(seed, *shape, low=low, high=high)

    # retain decays the state once per token
    gates = {"lr": gate(191, lr), "retain": head_gate(192, T, 0.3, 1.0) if retain == "1" else
             channel_gate(192, T, dk, 0.3, 1.0)}
    fields = [body, f"substeps {steps}"]
    for role, kind, seed in (("erase", erase, 193), ("write", write, 194)):
        if kind is not None:
            gates[role] = gate(seed, kind, 0.2, 1.0)
            fields.append(f"{role} = x |> proj{'(per=channel)' if kind != '1' else ''} |> sigmoid")
    order = "decay_first" if "decay_first" in body else "grad_first"
    kern = kernel("\n".join(["objective l2", "every 1", *fields]), H, dk, dv)
    state, final = compare(kern, k, v, q, gates, generalised_delta_rule, body, steps=steps, order=order,
                           implicit="implicit" in body)
    assert_close(state.weights[0], final, f"{body}: final state")


def test_the_implicit_step_takes_the_residual_at_the_updated_memory():
    """gd(implicit=true) is the proximal step: M_t = M' + (u - M_t e)(lr k)^T, the residual read at
    the memory it produces (with the erase gate: e = erase k), checked at the last token of a run."""
    T, dk, dv = 6, 4, 5
    q, k, v = qkv(195, B, T, H, dk, dv, normalize_keys=False)
    gates = {"lr": head_gate(196, T, 0.5, 2.0), "retain": head_gate(197, T, 0.5, 1.0),
             "erase": channel_gate(198, T, dk, 0.5, 1.0)}
    kern = kernel("objective l2\nevery 1\norder decay_first\noptimizer gd(implicit=true)\n"
                  "erase = x |> proj(per=channel) |> sigmoid", H, dk, dv)
    _, before = run(kern, k[:, :-1], v[:, :-1], q[:, :-1], {n: g[:, :-1] for n, g in gates.items()})
    previous = before.weights[0].clone()
    _, after = run(kern, k[:, -1:], v[:, -1:], q[:, -1:], {n: g[:, -1:] for n, g in gates.items()},
                   state=before, start=T - 1)
    new = after.weights[0]
    key, value, erase_key = k[:, -1], v[:, -1], gates["erase"][:, -1] * k[:, -1]
    decayed = previous * gates["retain"][:, -1, :, None, None]
    residual_at_new = value - torch.einsum("bhvk,bhk->bhv", new, erase_key)
    expected = decayed + gates["lr"][:, -1, :, None, None] * residual_at_new[..., :, None] * key[..., None, :]
    assert_close(new, expected, "implicit step: M_t - M' = (v - M_t e)(lr k)^T")
    explicit = decayed + gates["lr"][:, -1, :, None, None] * (
        value - torch.einsum("bhvk,bhk->bhv", decayed, erase_key))[..., :, None] * key[..., None, :]
    assert (new - explicit).abs().max() > 1e-2  # the explicit step is another memory


# --- streaming: two halves equal one call --------------------------------------------------------


SPLIT_CASES = [
    ("deltanet", "objective l2\nevery 1", "matrix", 7),
    ("gd every 4, read before", "objective l2\nevery 4\nread before", "matrix", 6),
    ("decay_first every 4", "objective l2\nevery 4\norder decay_first", "matrix", 6),
    ("momentum every 4", "objective l2\noptimizer momentum\nevery 4\nread before", "matrix", 5),
    ("dgd every 1", "objective l2\noptimizer dgd\nevery 1", "matrix", 4),
    ("mlp every 2", "objective l2\nevery 2", "mlp(depth=2, expand=2, act=tanh)", 5),
]


@pytest.mark.parametrize("body, state_kind, split", [c[1:] for c in SPLIT_CASES], ids=[c[0] for c in SPLIT_CASES])
def test_two_halves_with_carried_state_equal_one_call(body, state_kind, split):
    T, d = 13, 4
    q, k, v = qkv(180, B, T, H, d, d)
    gates = {"lr": head_gate(181, T, 0.0, 0.8), "retain": head_gate(182, T, 0.5, 1.0)}
    if "momentum" in body:
        gates["momentum"] = head_gate(183, T)
    torch.manual_seed(184)
    kern = kernel(body, H, d, d, state=state_kind)
    whole, state = run(kern, k, v, q, gates)
    first, carried = run(kern, k[:, :split], v[:, :split], q[:, :split], {n: g[:, :split] for n, g in gates.items()})
    second, carried = run(kern, k[:, split:], v[:, split:], q[:, split:], {n: g[:, split:] for n, g in gates.items()},
                          state=carried, start=split)
    assert_close(torch.cat([first, second], dim=1), whole, f"two halves [{body!r}] outputs", rtol=1e-6)
    for mine, theirs in zip(carried.weights, state.weights):
        assert_close(mine, theirs, f"two halves [{body!r}] final state", rtol=1e-6)

"""The reference backend against published pure-PyTorch recurrences (fla-core 0.6.0, `naive.py`).

SEMANTICS §9: the DeltaNet / Gated DeltaNet / linear-attention specs must equal an independent
published reference implementation on random inputs. Each oracle is loaded by path from the
installed fla-core (see `oracles.fla_naive`; `fla/__init__.py` and so triton are never imported).
These tests are core: without fla-core they fail, they do not skip.

Conventions bridged here:
- fla stores the state as S [B, H, d_k, d_v] (o = S^T q); nestc's matrix memory is M [B, H, d_v, d_k]
  (y = M q), so final states are compared as M^T == S.
- fla scales q by `scale` (default d_k^-0.5) inside the recurrence; nestc reads M q with q as given,
  so the kernel gets q * scale.
- fla gives decays in log space (g, log_alpha, log_mu); nestc's gates are the factors: exp(g).

Every oracle runs with B=2, H=2, T=13 (a multiple of no chunk size in use), d_k = d_v and d_k != d_v,
and with gates at zero, random and extreme values (decays exactly 0 or 1 and very close to 0).
"""

from __future__ import annotations

import math

import pytest
import torch

from oracles import assert_close, fla_naive, kernel, qkv, run, uniform

pytestmark = pytest.mark.usefixtures("kernel_backend")

B, T, H = 2, 13, 2
SHAPES = [(8, 8), (4, 6)]  # (d_k, d_v)
SHAPE_IDS = ["dk=dv", "dk!=dv"]

DELTANET = """
    objective l2        # 1/2 ||M k - v||^2: GD on it is the delta rule
    optimizer gd
    lr = x |> proj |> sigmoid
    every 1
    read after
"""

# Gated DeltaNet as fla writes it: the state is first decayed, M' = exp(g_t) M_{t-1}, and the
# delta-rule step is then taken at M' (the gradient at the *decayed* state). The spec says so with
# `order decay_first`; `retain` is the decay factor exp(g_t).
GATED_DELTANET = DELTANET + """
    retain = x |> proj(bias=true) |> softplus |> scale(-1) |> exp
    order decay_first
"""

TITANS_LINEAR = """
    objective l2
    optimizer momentum
    lr = x |> proj |> sigmoid
    retain = x |> proj |> sigmoid
    momentum = x |> proj |> sigmoid
    every 1
    read after
"""

LINEAR_ATTENTION = """
    objective dot       # l = -<M k, v>, gradient -v k^T
    optimizer gd
    lr = 1
    every 1
"""

SIMPLE_GLA = LINEAR_ATTENTION + """
    retain = x |> proj |> sigmoid
"""

GLA = LINEAR_ATTENTION + """
    retain = x |> proj(per=channel) |> sigmoid
"""

# Kimi Delta Attention: Gated DeltaNet with a per-channel (key-side) decay, applied before the step.
KDA = DELTANET + """
    retain = x |> proj(per=channel) |> sigmoid
    order decay_first
"""


def to_bhtd(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2).contiguous()


def lr_case(name: str, seed: int, *shape) -> torch.Tensor:
    """A step-size (beta) gate: zero, one, uniform in (0, 1), or each token either 0 or 1."""
    if name == "zero":
        return torch.zeros(*shape)
    if name == "one":
        return torch.ones(*shape)
    if name == "uniform":
        return uniform(seed, *shape)
    if name == "binary":
        return (uniform(seed, *shape) < 0.5).float()
    raise ValueError(name)


def log_decay_case(name: str, seed: int, *shape) -> torch.Tensor:
    """A log decay g (the gate is exp(g)): exactly 1, typical, close to 0, exactly 0, or mixed 0 / 1."""
    if name == "keep":  # retain exactly 1
        return torch.zeros(*shape)
    if name == "uniform":  # retain in (0.5, 1)
        return uniform(seed, *shape, low=0.5, high=1.0).log()
    if name == "wide":  # retain in (0, 1) spread over many orders of magnitude
        return -uniform(seed, *shape, low=0.0, high=8.0)
    if name == "tiny":  # retain ~ 1e-13: forget almost everything
        return torch.full(shape, -30.0)
    if name == "forget":  # retain exactly 0
        return torch.full(shape, -math.inf)
    if name == "mixed":  # each token either keeps everything or forgets everything
        return torch.where(uniform(seed, *shape) < 0.5, 0.0, -math.inf)
    raise ValueError(name)


# --- DeltaNet -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dk, dv", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("beta_case", ["zero", "uniform", "one", "binary"])
def test_deltanet_equals_fla_delta_rule_recurrence(beta_case, dk, dv):
    """fla `delta_rule_recurrence` (layout [B, H, T, D], q always scaled by d_k^-0.5) is DeltaNet:
    `matrix, objective l2, optimizer gd, every 1, read after` with lr = beta."""
    naive = fla_naive("delta_rule")
    q, k, v = qkv(1, B, T, H, dk, dv)
    beta = lr_case(beta_case, 2, B, T, H)
    o, S = naive.delta_rule_recurrence(to_bhtd(q), to_bhtd(k), to_bhtd(v), beta.transpose(1, 2).contiguous(),
                                       output_final_state=True)
    kern = kernel(DELTANET, H, dk, dv)
    y, state = run(kern, k, v, q * dk ** -0.5, {"lr": beta})
    tag = f"fla delta_rule [{beta_case}, dk={dk}, dv={dv}]"
    assert_close(y, o.transpose(1, 2), f"{tag} outputs")
    assert_close(state.weights[0].transpose(-1, -2), S, f"{tag} final state")


# --- Gated DeltaNet -----------------------------------------------------------------------------


GDN_CASES = [
    ("uniform", "uniform"),
    ("uniform", "keep"),   # exp(g) = 1: plain DeltaNet
    ("uniform", "wide"),
    ("uniform", "tiny"),
    ("uniform", "forget"),  # exp(g) = 0: only the current token is remembered
    ("one", "mixed"),
    ("binary", "mixed"),
    ("zero", "uniform"),   # no writes at all: the state stays zero
]


@pytest.mark.parametrize("dk, dv", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("beta_case, g_case", GDN_CASES, ids=[f"beta={b}-g={g}" for b, g in GDN_CASES])
def test_gated_deltanet_equals_fla_naive_recurrent_gated_delta_rule(beta_case, g_case, dk, dv):
    """fla `naive_recurrent_gated_delta_rule` ([B, T, H, D]) first decays the state,
    h = exp(g_t) h, then takes the delta-rule step at the decayed state. A nestc spec expresses that
    order with `order decay_first` (the gradient at retain_t * M_{t-1}); retain = exp(g), lr = beta."""
    naive = fla_naive("gated_delta_rule")
    q, k, v = qkv(3, B, T, H, dk, dv)
    beta = lr_case(beta_case, 4, B, T, H)
    g = log_decay_case(g_case, 5, B, T, H)
    o, S = naive.naive_recurrent_gated_delta_rule(q, k, v, beta, g, output_final_state=True)
    kern = kernel(GATED_DELTANET, H, dk, dv)
    y, state = run(kern, k, v, q * dk ** -0.5, {"lr": beta, "retain": g.exp()})
    tag = f"fla gated_delta_rule [beta={beta_case}, g={g_case}, dk={dk}, dv={dv}]"
    assert_close(y, o, f"{tag} outputs")
    assert_close(state.weights[0].transpose(-1, -2), S, f"{tag} final state")


def test_gated_deltanet_decay_order_matters():
    """The same gates under `order grad_first` give a different function (so the test above
    really checks the order, not only the gates)."""
    naive = fla_naive("gated_delta_rule")
    dk = dv = 8
    q, k, v = qkv(3, B, T, H, dk, dv)
    beta, g = lr_case("uniform", 4, B, T, H), log_decay_case("wide", 5, B, T, H)
    o, _ = naive.naive_recurrent_gated_delta_rule(q, k, v, beta, g)
    grad_first = GATED_DELTANET.replace("order decay_first", "order grad_first")
    y, _ = run(kernel(grad_first, H, dk, dv), k, v, q * dk ** -0.5, {"lr": beta, "retain": g.exp()})
    assert (y - o).abs().max() > 1e-2


# --- Titans-linear: momentum and decay ----------------------------------------------------------


MOMENTUM_CASES = {
    # name: (log_alpha, log_mu, beta, eta)
    "random": ("uniform", "uniform", "varying", "uniform"),
    "constant-beta": ("uniform", "uniform", "constant", "uniform"),
    "no-decay-no-momentum": ("keep", "forget", "varying", "uniform"),  # alpha = 1, mu = 0: DeltaNet
    "full-momentum": ("keep", "keep", "constant", "small"),           # alpha = 1, mu = 1
    "forget-state": ("forget", "uniform", "varying", "uniform"),      # alpha = 0: M_t = S_t
    "tiny-decays": ("tiny", "tiny", "varying", "uniform"),
    "beta-zero": ("uniform", "uniform", "zero", "uniform"),           # no writes
    "eta-binary": ("wide", "wide", "constant", "binary"),
}


def momentum_inputs(case: str, seed: int):
    alpha_case, mu_case, beta_case, eta_case = MOMENTUM_CASES[case]
    log_alpha = log_decay_case(alpha_case, seed, B, T, H)
    log_mu = log_decay_case(mu_case, seed + 1, B, T, H)
    if beta_case == "varying":
        beta = uniform(seed + 2, B, T, H, low=0.2, high=1.0)
    elif beta_case == "constant":  # constant in time, one value per sequence and head
        beta = uniform(seed + 2, B, 1, H, low=0.2, high=1.0).expand(B, T, H).contiguous()
    else:
        beta = torch.zeros(B, T, H)
    if eta_case == "small":
        eta = uniform(seed + 3, B, T, H, low=0.0, high=0.2)
    else:
        eta = lr_case(eta_case, seed + 3, B, T, H)
    return log_alpha, log_mu, beta, eta


def titans_gates(log_alpha, log_mu, beta, eta):
    """fla's recurrence, with p = k (l2 objective at the key) and state S, momentum buffer M:
        M_t = mu_t M_{t-1} + eta_t g_t,   S_t = alpha_t S_{t-1} - beta_t M_t,   g_t = k (S_{t-1}^T k - v)^T,
    i.e. the gradient at the pre-decay state (grad_first), read after. With nestc's momentum
    S'_t := -beta_t M_t:  S'_t = (mu_t beta_t / beta_{t-1}) S'_{t-1} - beta_t eta_t g_t, so
        lr = beta * eta,  momentum = mu_t * beta_t / beta_{t-1},  retain = alpha,
    which needs beta_{t-1} != 0 wherever beta_t != 0 (the inputs use beta > 0, or beta = 0 throughout).
    """
    mu = log_mu.exp()
    ratio = torch.ones_like(beta)
    ratio[:, 1:] = torch.where(beta[:, :-1] > 0, beta[:, 1:] / beta[:, :-1].clamp_min(1e-30), 0.0)
    return {"lr": beta * eta, "retain": log_alpha.exp(), "momentum": mu * ratio}


@pytest.mark.parametrize("dk, dv", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("case", list(MOMENTUM_CASES))
def test_titans_linear_equals_fla_recurrent_momentum_delta_rule(case, dk, dv):
    """fla `recurrent_momentum_delta_rule_ref` with p = k is `matrix, objective l2,
    optimizer momentum, every 1, read after` (its output q^T S_t uses the state after step t)."""
    naive = fla_naive("momentum_delta_rule")
    q, k, v = qkv(6, B, T, H, dk, dv)
    log_alpha, log_mu, beta, eta = momentum_inputs(case, 7)
    o, final = naive.recurrent_momentum_delta_rule_ref(q, k, v, log_alpha, log_mu, k, beta=beta, eta=eta,
                                                       output_final_state=True)
    kern = kernel(TITANS_LINEAR, H, dk, dv)
    y, state = run(kern, k, v, q * dk ** -0.5, titans_gates(log_alpha, log_mu, beta, eta))
    tag = f"fla momentum_delta_rule [{case}, dk={dk}, dv={dv}]"
    assert_close(y, o, f"{tag} outputs")
    S, M = final
    assert_close(state.weights[0].transpose(-1, -2), S, f"{tag} final state")
    assert_close(state.momentum[0].transpose(-1, -2), -beta[:, -1, :, None, None] * M, f"{tag} final momentum")


def test_titans_linear_unscaled_query():
    """scale=1: the oracle reads with q as given, and so does the kernel."""
    naive = fla_naive("momentum_delta_rule")
    dk = dv = 8
    q, k, v = qkv(8, B, T, H, dk, dv)
    gates = momentum_inputs("random", 9)
    o, _ = naive.recurrent_momentum_delta_rule_ref(q, k, v, gates[0], gates[1], k, beta=gates[2], eta=gates[3],
                                                   scale=1.0)
    y, _ = run(kernel(TITANS_LINEAR, H, dk, dv), k, v, q, titans_gates(*gates))
    assert_close(y, o, "fla momentum_delta_rule [scale=1] outputs")


# --- linear attention and gated linear attention ------------------------------------------------


@pytest.mark.parametrize("dk, dv", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("scale", [None, 1.0], ids=["scale=default", "scale=1"])
def test_linear_attention_equals_fla_naive_recurrent_linear_attn(scale, dk, dv):
    """fla `naive_recurrent_linear_attn` with normalize=False (the default; the normalised form has
    no spec yet, language.md §12) scales q by `scale` (default d_k^-0.5): `objective dot, lr 1`."""
    naive = fla_naive("linear_attn")
    q, k, v = qkv(10, B, T, H, dk, dv, normalize_keys=False)
    o, S = naive.naive_recurrent_linear_attn(q, k, v, scale=scale, output_final_state=True, normalize=False)
    factor = dk ** -0.5 if scale is None else scale
    y, state = run(kernel(LINEAR_ATTENTION, H, dk, dv), k, v, q * factor, {"lr": torch.ones(B, T, H)})
    tag = f"fla linear_attn [scale={scale}, dk={dk}, dv={dv}]"
    assert_close(y, o, f"{tag} outputs")
    assert_close(state.weights[0].transpose(-1, -2), S, f"{tag} final state")


@pytest.mark.parametrize("dk, dv", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("g_case", ["keep", "uniform", "wide", "tiny", "forget", "mixed"])
def test_simple_gla_equals_fla_naive_recurrent_simple_gla(g_case, dk, dv):
    """fla `naive_recurrent_simple_gla` (one log decay per head and token, q scaled by d_k^-0.5):
    `objective dot, lr 1, retain = exp(g)` (RetNet / Mamba2-style decay)."""
    naive = fla_naive("simple_gla")
    q, k, v = qkv(11, B, T, H, dk, dv, normalize_keys=False)
    g = log_decay_case(g_case, 12, B, T, H)
    o, S = naive.naive_recurrent_simple_gla(q, k, v, g, output_final_state=True)
    y, state = run(kernel(SIMPLE_GLA, H, dk, dv), k, v, q * dk ** -0.5, {"retain": g.exp()})
    tag = f"fla simple_gla [g={g_case}, dk={dk}, dv={dv}]"
    assert_close(y, o, f"{tag} outputs")
    assert_close(state.weights[0].transpose(-1, -2), S, f"{tag} final state")


@pytest.mark.parametrize("dk, dv", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("g_case", ["keep", "uniform", "wide", "forget", "mixed"])
def test_gla_equals_fla_naive_recurrent_gla(g_case, dk, dv):
    """fla `naive_recurrent_gla`: a per-channel log decay gk [B, T, H, d_k] on the key side of the
    state (q scaled by d_k^-0.5): `objective dot, lr 1`, a per-channel `retain = exp(gk)`."""
    naive = fla_naive("gla")
    q, k, v = qkv(13, B, T, H, dk, dv, normalize_keys=False)
    gk = log_decay_case(g_case, 14, B, T, H, dk)
    o, S = naive.naive_recurrent_gla(q, k, v, gk, output_final_state=True)
    y, state = run(kernel(GLA, H, dk, dv), k, v, q * dk ** -0.5, {"retain": gk.exp()})
    tag = f"fla gla [gk={g_case}, dk={dk}, dv={dv}]"
    assert_close(y, o, f"{tag} outputs")
    assert_close(state.weights[0].transpose(-1, -2), S, f"{tag} final state")


# --- per-channel gated delta rule (KDA) ---------------------------------------------------------


@pytest.mark.parametrize("dk, dv", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("g_case", ["keep", "uniform", "wide", "mixed"])
def test_per_channel_decay_first_equals_fla_naive_recurrent_kda(g_case, dk, dv):
    """fla `naive_recurrent_kda` (Kimi Delta Attention): S = S * exp(g_t) per key channel, then the
    delta-rule step at the decayed state. In nestc: `order decay_first` with a per-channel retain,
    which multiplies M along its key (column) dimension: M' = M diag(exp(g_t))."""
    naive = fla_naive("kda")
    q, k, v = qkv(15, B, T, H, dk, dv)
    beta = lr_case("uniform", 16, B, T, H)
    g = log_decay_case(g_case, 17, B, T, H, dk)
    o, S = naive.naive_recurrent_kda(q, k, v, g, beta, output_final_state=True)
    y, state = run(kernel(KDA, H, dk, dv), k, v, q * dk ** -0.5, {"lr": beta, "retain": g.exp()})
    tag = f"fla kda [g={g_case}, dk={dk}, dv={dv}]"
    assert_close(y, o, f"{tag} outputs")
    assert_close(state.weights[0].transpose(-1, -2), S, f"{tag} final state")


# --- the generalised delta rule: vector lr, erase and write gates (DPLR) -------------------------

# The delta rule with an lr per key channel, an erase gate per key channel and a write gate per
# value channel (SEMANTICS §3): M_t = M' + (w * v - M' (b * k)) (lr * k)^T.
GENERALISED = """
    objective l2
    lr = x |> proj(per=channel) |> sigmoid
    erase = x |> proj(per=channel) |> sigmoid
    write = x |> proj(per=channel) |> sigmoid
    retain = x |> proj(per=channel) |> sigmoid
    every 1
"""


@pytest.mark.parametrize("dk, dv", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("order", ["grad_first", "decay_first"])
@pytest.mark.parametrize("g_case", ["keep", "wide", "mixed"])
def test_vector_lr_erase_and_write_equal_fla_dplr_recurrence(g_case, order, dk, dv):
    """fla `dplr_recurrence`, S_t = diag(exp(gk)) S_{t-1} + k v^T + b (a^T S_{t-1}) in fla's
    layout S = M^T: with c = lr * k, e = erase * k, u = write * v the level's step is S_t = D S + c u^T
    - c (e^T S') with S' = D S (decay_first: a = exp(gk) e) or S (grad_first: a = e), b = -c."""
    q, k, v = qkv(18, B, T, H, dk, dv)
    lr, erase = uniform(19, B, T, H, dk), uniform(20, B, T, H, dk, low=0.2, high=1.0)
    write = uniform(21, B, T, H, dv, low=0.2, high=1.0)
    g = log_decay_case(g_case, 22, B, T, H, dk)
    c, e = lr * k, erase * k
    a = g.exp() * e if order == "decay_first" else e
    o, S = fla_naive("generalized_delta_rule/dplr").dplr_recurrence(*map(to_bhtd, (q, c, write * v, a, -c, g)))
    y, state = run(kernel(GENERALISED + f"    order {order}", H, dk, dv), k, v, q * dk ** -0.5,
                   {"lr": lr, "erase": erase, "write": write, "retain": g.exp()})
    tag = f"fla dplr as the generalised delta rule [g={g_case}, {order}, dk={dk}, dv={dv}]"
    assert_close(y, to_bhtd(o), f"{tag} outputs")
    assert_close(state.weights[0].transpose(-1, -2), S, f"{tag} final state")


# --- the oracles themselves ---------------------------------------------------------------------


def test_oracles_load_without_the_fla_package():
    """The naive files come from the pinned fla-core and never import `fla` (hence never triton)."""
    import sys

    for name in ("delta_rule", "gated_delta_rule", "momentum_delta_rule", "linear_attn", "simple_gla", "gla", "kda"):
        fla_naive(name)
    assert "fla" not in sys.modules and "triton" not in sys.modules


def test_fla_chunk_forms_agree_with_their_recurrences():
    """Sanity of the oracles on the odd length used above (the chunk forms pad T to the chunk)."""
    gdn = fla_naive("gated_delta_rule")
    dk = dv = 8
    q, k, v = qkv(18, B, T, H, dk, dv)
    beta, g = lr_case("uniform", 19, B, T, H), log_decay_case("uniform", 20, B, T, H)
    recurrent, _ = gdn.naive_recurrent_gated_delta_rule(q, k, v, beta, g)
    chunk, _ = gdn.naive_chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=4)
    assert_close(chunk, recurrent, "fla gated_delta_rule chunk(4) vs recurrent", rtol=1e-4)

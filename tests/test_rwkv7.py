"""RWKV-7's write key: the generalised delta rule with the value written along a key of its own,
M_t = M' - (M_read e)(lr * k)^T + (write * v) write_key^T (SEMANTICS §3, `write_key`).

- The kernel in both backends equals fla-core 0.6.0's DPLR recurrence and its chunk form (loaded by
  path, `oracles.fla_naive`). fla's S [d_k, d_v] is M^T and S_t = diag(exp(gk_t)) S_{t-1} + k v^T +
  beta (alpha^T S_{t-1}): alpha^T S_{t-1} reads the undecayed state (nestc's grad_first), so
  alpha = -(erase * kappa), beta = lr * kappa, k = the write key, gk = log retain; fla scales q by
  d_k^-0.5, which the kernel gets already scaled.
- A write key equal to lr * key is today's rule (the same level without it), in float64.
- The compiled backend equals the reference on small models in float64, streamed in two calls.
- The combinations whose update nobody derived are refused with N0117.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import nestc
import oracles
from nestc.backends import reference
from nestc.backends.common import BackendError
from nestc.lang.formatter import format_module
from nestc.lang.source import SourceFile
from nestc.lang.syntax import parse
from nestc.passes.fusion import fusion_signature
from nestc.passes.plan import plan_level, plan_program
from nesttest import analyze, only, spec
from oracles import assert_close, fla_naive, generator, uniform
from test_compiled import assert_equivalent

B, H, DK, DV = 2, 2, 8, 6  # d_k != d_v: a transposed state or read fails on shape
CHUNK = 16  # fla's chunk size here: 13 and 67 are multiples of it neither
LENGTHS = {"T=13": (13, None), "T=67-split-29": (67, 29)}

RWKV7 = """
    key = x |> proj |> l2norm
    write_key = x |> proj
    lr = x |> proj(per=channel) |> sigmoid
    retain = x |> proj(per=channel) |> sigmoid
    objective l2
    every 1
"""
# the erase gate scales the removal key (fla's alpha) and an lr per head scales every channel alike
WITH_ERASE = """
    key = x |> proj |> l2norm
    write_key = x |> proj
    erase = x |> proj(per=channel) |> sigmoid
    lr = x |> proj |> sigmoid
    retain = x |> proj(per=channel) |> sigmoid
    objective l2
    every 1
"""
BODIES = {"rwkv7": RWKV7, "erase": WITH_ERASE}

# (lr and erase values, retain values): random, and at the ends of their ranges
CASES = {
    "uniform": (lambda shape: uniform(1, *shape), lambda shape: uniform(2, *shape, low=0.5)),
    "full-erase-near1": (lambda shape: torch.full(shape, 1.0 - 1e-6), lambda shape: torch.full(shape, 1.0 - 1e-6)),
    "tiny-erase-wide": (lambda shape: torch.full(shape, 1e-6), lambda shape: (-uniform(3, *shape, high=8.0)).exp()),
    "binary-mixed": (lambda shape: torch.where(uniform(4, *shape) < 0.5, 1e-6, 1.0 - 1e-6),
                     lambda shape: torch.where(uniform(5, *shape) < 0.5, 1e-12, 1.0 - 1e-6)),
}


def inputs(body: str, case: str, T: int):
    """q, unit keys kappa [B, T, H, d_k], v [B, T, H, d_v] and the gates (the write key among them)."""
    g = generator(T + len(body))
    q = torch.randn(B, T, H, DK, generator=g)
    kappa = F.normalize(torch.randn(B, T, H, DK, generator=g), dim=-1)
    v = torch.randn(B, T, H, DV, generator=g)
    step, decay = CASES[case]
    gates = {"write_key": torch.randn(B, T, H, DK, generator=g), "retain": decay((B, T, H, DK))}
    if body is WITH_ERASE:
        gates.update(lr=step((B, T, H)), erase=step((B, T, H, DK)))
    else:
        gates["lr"] = step((B, T, H, DK))
    return q, kappa, v, gates


def fla_dplr(q, kappa, v, gates, chunked: bool):
    """fla's DPLR on the level's inputs: reads [B, T, H, d_v] and S = M^T [B, H, d_k, d_v]."""
    lr = gates["lr"] if gates["lr"].dim() == 4 else gates["lr"][..., None]
    removal = gates["erase"] * kappa if "erase" in gates else kappa
    args = [q, gates["write_key"], v, -removal, lr * kappa, gates["retain"].log()]
    T = q.shape[1]
    dplr = fla_naive("generalized_delta_rule/dplr")
    if chunked:  # zero padding at the end (k, v, alpha, beta 0, gk 0) changes no earlier read
        extra = -T % CHUNK
        args = [F.pad(x, (0, 0, 0, 0, 0, extra)) for x in args]
        o, S = dplr.dplr_chunkwise(*(x.transpose(1, 2) for x in args), chunk_size=CHUNK)
    else:
        o, S = dplr.dplr_recurrence(*(x.transpose(1, 2) for x in args))
    return o.transpose(1, 2)[:, :T], S


def run_level(body: str, q, k, v, gates, length: str, dtype=torch.float32):
    """The level's kernel in the backend under test: reads and M^T, streamed in the length's pieces."""
    T, split = LENGTHS[length]
    kern = oracles.kernel(body, H, DK, DV)
    pieces = [slice(0, T)] if split is None else [slice(0, split), slice(split, T)]
    state, reads = None, []
    for part in pieces:
        y, state = oracles.run(kern, k[:, part].to(dtype), v[:, part].to(dtype), q[:, part].to(dtype) * DK ** -0.5,
                               {role: gate[:, part].to(dtype) for role, gate in gates.items()}, state=state,
                               start=part.start)
        reads.append(y)
    return torch.cat(reads, dim=1), state.weights[0].transpose(-1, -2)


@pytest.mark.usefixtures("kernel_backend")
@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("function", ["dplr_recurrence", "dplr_chunkwise"])
@pytest.mark.parametrize("body", BODIES)
def test_the_write_key_rule_equals_fla_dplr(body, function, case, length):
    q, k, v, gates = inputs(BODIES[body], case, LENGTHS[length][0])
    with torch.no_grad():
        expected_o, expected_S = fla_dplr(q, k, v, gates, chunked=function == "dplr_chunkwise")
    y, S = run_level(BODIES[body], q, k, v, gates, length)
    tag = f"write_key {body} | fla dplr.{function} | {oracles.backend} | {case} | {length}"
    assert_close(y, expected_o, f"{tag} | outputs")
    assert_close(S, expected_S, f"{tag} | final state")


def test_the_oracle_sees_the_write_key():
    """The comparison above depends on the write key: another one breaks the match."""
    q, k, v, gates = inputs(RWKV7, "uniform", 13)
    expected, _ = fla_dplr(q, k, v, gates, chunked=False)
    y, _ = run_level(RWKV7, q, k, v, dict(gates, write_key=gates["write_key"].flip(-1)), "T=13")
    assert (y - expected).abs().max() > 1e-2


TODAYS_RULES = {
    "grad_first": """
        key = x |> proj |> l2norm
        lr = x |> proj(per=channel) |> sigmoid
        retain = x |> proj(per=channel) |> sigmoid
        erase = x |> proj(per=channel) |> sigmoid
        write = x |> proj(per=channel) |> sigmoid
        objective l2
        every 1
    """,
    "decay_first": """
        key = x |> proj |> l2norm
        lr = x |> proj |> sigmoid
        retain = x |> proj |> sigmoid
        write = x |> proj |> sigmoid
        objective l2
        order decay_first
        every 1
    """,
}


@pytest.mark.usefixtures("kernel_backend")
@pytest.mark.parametrize("order", TODAYS_RULES)
def test_a_write_key_equal_to_lr_times_the_key_is_todays_rule(order):
    """M' - (M_read e)(lr k)^T + u (lr k)^T = M' + (u - M_read e)(lr k)^T, in float64."""
    body = TODAYS_RULES[order]
    T = 67
    g = generator(11)
    q, k = torch.randn(B, T, H, DK, generator=g, dtype=torch.float64), torch.randn(B, T, H, DK, generator=g,
                                                                                   dtype=torch.float64)
    k, v = F.normalize(k, dim=-1), torch.randn(B, T, H, DV, generator=g, dtype=torch.float64)
    per_channel = order == "grad_first"
    shape = (B, T, H, DK) if per_channel else (B, T, H)
    gates = {"lr": uniform(6, *shape).double(), "retain": uniform(7, *shape, low=0.3).double(),
             "write": uniform(8, *(shape[:3] + ((DV,) if per_channel else ()))).double()}
    if per_channel:
        gates["erase"] = uniform(9, B, T, H, DK).double()
    lr_key = (gates["lr"] if per_channel else gates["lr"][..., None]) * k
    expected_y, expected_S = run_level(body, q, k, v, gates, "T=67-split-29", torch.float64)
    y, S = run_level(body + "write_key = x |> proj", q, k, v, dict(gates, write_key=lr_key), "T=67-split-29",
                     torch.float64)
    torch.testing.assert_close(y, expected_y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(S, expected_S, rtol=1e-12, atol=1e-12)
    assert S.abs().max() > 0.1  # the rule wrote something


# --- models: the compiled backend equals the reference ---------------------------------------------

MODEL = """
level mixer : matrix {
    key = x |> proj |> l2norm
    write_key = x |> proj |> conv(4) |> silu
    value = x |> proj
    query = x |> proj
    lr = x |> proj(per=channel) |> sigmoid
    retain = x |> proj(per=channel) |> sigmoid
    %s
    objective l2
    every 1
}
model { vocab 32
    dim 16
    heads 2
    layers 2
    block = residual(rmsnorm |> mixer) }
"""


@pytest.fixture
def at_root(monkeypatch, request):
    monkeypatch.chdir(request.config.rootpath)


@pytest.mark.parametrize("extra", ["", "order decay_first\n    erase = x |> proj(per=channel) |> sigmoid\n"
                                       "    write = x |> proj |> sigmoid"], ids=["grad_first", "decay_first-gates"])
def test_compiled_equals_the_reference_in_float64(extra):
    """Logits, final states (the write key's convolution history among them) and outer gradients,
    in two calls with the state carried; the level runs in the delta form."""
    program = nestc.check(MODEL % extra)
    assert plan_level(program.level("mixer")).kernel == "delta"
    fast = assert_equivalent(program, length=70, split=29)
    assert fast is not None


def test_a_write_key_generated_by_another_level_equals_the_reference():
    """The write key's pipeline reads a level (a generator stepped first), as a key's may."""
    program = nestc.check("""
level g : matrix { objective dot; every 1; read before }
level mixer : matrix { key = x |> proj |> l2norm; write_key = x |> proj |> g; lr = x |> proj |> sigmoid
    objective l2; every 1 }
model { vocab 16
    dim 8
    heads 2
    block = mixer }
""")
    assert plan_level(program.level("mixer")).kernel == "delta"
    assert_equivalent(program, length=20, split=7)


def test_the_rwkv7_zoo_spec_runs_in_the_delta_form(at_root):
    program = nestc.check("specs/rwkv7.nest")
    assert plan_program(program).levels["mixer"].kernel == "delta"
    assert_equivalent(program, length=40, split=17)


def test_a_write_key_level_does_not_fuse():
    """The stacked call runs no write-key pipeline: such a level has no fusion signature, where the
    same level without it (read before, so that fusion would consider it) has one."""
    program = nestc.check(MODEL % "")
    level = dataclasses.replace(program.level("mixer"), read="before")
    assert fusion_signature(program, level, "delta") is None
    assert fusion_signature(program, dataclasses.replace(level, write_key=None), "delta") is not None


def test_the_write_key_carries_its_own_state_and_parameters():
    program = nestc.check(MODEL % "")
    model = reference.build(program)
    names = [name for name, _ in model.named_parameters()]
    assert any("pipelines.write_key" in name for name in names)
    _, state = model(torch.randint(0, 32, (1, 5)))
    # the convolution (the pipeline's stage 1) keeps its window - 1 last inputs, under the role's name
    assert {name: tuple(history.shape) for name, history in state.levels[0]["mixer"].buffers.items()} \
        == {"write_key.1": (1, 3, 16)}


def test_a_write_key_of_another_width_is_refused():
    program = nestc.check(MODEL.replace("write_key = x |> proj |> conv(4) |> silu", "write_key = x |> proj(dim=4)")
                          % "")
    with pytest.raises(BackendError, match="write key has width 4, but its keys have 16"):
        reference.build(program)


def test_the_formatter_writes_the_write_key_as_an_assignment():
    text = "level m : matrix {\n    write_key = x |> proj |> silu\n    every 1\n}\n"
    assert "    write_key = x |> proj |> silu\n" in format_module(parse(SourceFile("m.nest", text)))


# --- diagnostics ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fields, message, note", [
    ("objective l2; every 16", "`write_key` has no meaning for level `mixer`", "it updates every 16 tokens"),
    ("objective dot; every 1", "`write_key` has no meaning for level `mixer`", "objective `dot` is not one"),
    ("objective l2; every 1; substeps 2", "`write_key` has no meaning with `substeps`", "one explicit step"),
    ("objective l2; every 1; optimizer gd(implicit=true)", "`write_key` has no meaning with `gd(implicit=true)`",
     "one explicit step"),
    ("objective l2; every 1; meta first_order", "`write_key` has no meaning with `meta first_order`", "`meta full`"),
    ("objective l2; every 1; meta stop", "`write_key` has no meaning with `meta stop`", "`meta full`"),
])
def test_refused_combinations(fields, message, note):
    """Off the online delta rule, and where the update with a write key is not derived: N0117 at
    the field, saying why."""
    body = "key = x |> proj; write_key = x |> proj; " + fields
    diagnostic = only(analyze(spec(f"level mixer : matrix {{ {body} }}")), "N0117")
    assert diagnostic.message == message
    assert (diagnostic.span.line, diagnostic.span.column) == (1, 41)  # at `write_key`
    assert note in diagnostic.notes[0]


def test_a_write_key_on_the_online_delta_rule_checks_clean():
    result = analyze(spec("level mixer : matrix { key = x |> proj; write_key = x |> proj; objective l2; every 1 }"))
    assert result.ok and result.diagnostics == []
    assert result.program.level("mixer").write_key is not None

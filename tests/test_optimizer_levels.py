"""Optimizers written as levels (SEMANTICS §3, "Optimizers are levels"; NL §4): each library
optimizer's update checked against its paper equation written out here, the library's gd,
momentum, dgd, dgd with momentum and Muon equal to the built-ins in both backends and compiled to
their closed forms, and compositions drawn at random equal in both backends."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nestc.backends import compiled, reference
from nestc.backends.kernel import MemoryKernel
from nestc.lang import ir
from nestc.lang.sema import analyze_source
from nestc.lang.source import SourceFile
from nestc.passes.estimate import estimate
from nestc.passes.plan import plan_program
from test_compiled import assert_equivalent
from test_reference_model import _tensors

LR, RETAIN = 0.3, 0.95


def _analyze(text: str):
    # named inside specs/ so that `import "lib/optimizers.nest"` finds the library
    return analyze_source(SourceFile("specs/optimizer_probe.nest", text))


def _program(text: str) -> ir.Program:
    result = _analyze(text)
    assert result.ok, [d.message for d in result.diagnostics]
    return result.program


# --- each library optimizer against its equation ---------------------------------------------

KERNEL_SPEC = """import "lib/optimizers.nest"
level memory : matrix {{
    lr = {lr}
    retain = {retain}
    objective l2
    optimizer {rule}
    update = {update}
}}
model {{
    vocab 16
    dim 6
    block = memory
}}
"""


def _newton_schulz(x: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Muon's quintic iteration (Jordan et al.'s coefficients), written out for one matrix."""
    a, b, c = 3.4445, -4.7750, 2.0315
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def _zero(w):
    return torch.zeros_like(w)


# Each library optimizer, as its paper writes it, for one token: (W, buffers, g, k) -> (W, buffers),
# with lr = LR, retain = RETAIN and the library's constants; g = (W k - v) k^T, k the map's input;
# the buffers by the name of the library level that holds each (one with retain 0 holds none).
def _gd(w, s, g, k):  # eq. 31: W = retain W - lr g
    return RETAIN * w - LR * g, s


def _momentum(w, s, g, k):  # eq. 33: m = 0.9 m - lr g, W = retain W + m
    m = 0.9 * s.get("momentum", _zero(w)) - LR * g
    return RETAIN * w + m, {"momentum": m}


def _delta_momentum(w, s, g, k):  # eqs. 48-49: m = m (0.9 I - lr g^T g) - lr g
    m = s.get("delta_momentum", _zero(w))
    m = m @ (0.9 * torch.eye(w.shape[1], dtype=w.dtype) - LR * g.T @ g) - LR * g
    return RETAIN * w + m, {"delta_momentum": m}


def _preconditioned(w, s, g, k):  # eqs. 38-41, 46-47: v = 0.999 v + 0.001 g^2, m = 0.9 m - lr g / (sqrt v + eps)
    v = 0.999 * s.get("preconditioner", _zero(w)) + 0.001 * g * g
    m = 0.9 * s.get("preconditioned_momentum", _zero(w)) - LR * g / (v.sqrt() + 1e-8)
    return RETAIN * w + m, {"preconditioner": v, "preconditioned_momentum": m}


def _sign(w, s, g, k):  # eq. 51 with phi = sign
    m = 0.9 * s.get("sign_momentum", _zero(w)) - LR * torch.sign(g)
    return RETAIN * w + m, {"sign_momentum": m}


def _muon(w, s, g, k):  # eq. 52 with sigma = Newton-Schulz: m = 0.9 m + g, W = retain W - lr NS5(m)
    m = 0.9 * s.get("muon_momentum", _zero(w)) + g
    return RETAIN * w - LR * _newton_schulz(m), {"muon_momentum": m}


def _adam(w, s, g, k):  # App. B eqs. 101-105, as averages: W = retain W - lr M / (sqrt H + eps)
    first = 0.9 * s.get("adam_first", _zero(w)) + 0.1 * g
    second = 0.999 * s.get("adam_second", _zero(w)) + 0.001 * g * g
    return RETAIN * w - LR * first / (second.sqrt() + 1e-8), {"adam_first": first, "adam_second": second}


def _gelu(h):
    return 0.5 * h * (1 + torch.erf(h / 2 ** 0.5))


def _gelu_derivative(h):
    return 0.5 * (1 + torch.erf(h / 2 ** 0.5)) + h * torch.exp(-h * h / 2) / (2 * torch.pi) ** 0.5


def _deep_momentum(w, s, g, k):
    """eq. 50: an MLP m(x) = B gelu(A x) on the gradient's rows, one GD step of size lr on
    sum_r 1/2 ||m(g_r) + g_r||^2 with retain 0.9, then W = retain W + m(g) row by row."""
    first, second = s["deep_momentum"]
    hidden = g @ first.T  # each row r: A g_r
    error = _gelu(hidden) @ second.T + g  # m(g_r) - (-g_r)
    grad_second = error.T @ _gelu(hidden)
    grad_first = ((error @ second) * _gelu_derivative(hidden)).T @ g
    first, second = 0.9 * first - LR * grad_first, 0.9 * second - LR * grad_second
    return RETAIN * w + _gelu(g @ first.T) @ second.T, {"deep_momentum": [first, second]}


def _dgd(w, s, g, k):  # eqs. 56-57: W = W (retain I - lr k k^T) - lr g
    return w @ (RETAIN * torch.eye(w.shape[1], dtype=w.dtype) - LR * torch.outer(k, k)) - LR * g, s


def _dgd_momentum(w, s, g, k):  # Hope's Table 6: m = 0.9 m - lr g, W = W (retain I - lr k k^T) + m
    m = 0.9 * s.get("momentum", _zero(w)) - LR * g
    return w @ (RETAIN * torch.eye(w.shape[1], dtype=w.dtype) - LR * torch.outer(k, k)) + m, {"momentum": m}


LIBRARY = {  # name: (rule, update, the equation)
    "gd": ("gd", "gd_step", _gd),
    "momentum": ("gd", "momentum", _momentum),
    "delta momentum": ("gd", "delta_momentum", _delta_momentum),
    "preconditioned momentum": ("gd", "preconditioned_momentum", _preconditioned),
    "phi momentum": ("gd", "sign_momentum", _sign),
    "deep momentum": ("gd", "deep_momentum", _deep_momentum),
    "muon": ("gd", "-lr * newton_schulz(muon_momentum, steps=5)", _muon),
    "adam": ("gd", "-lr * adam_first / (sqrt(adam_second) + 1e-8)", _adam),
    "dgd": ("dgd", "gd_step", _dgd),
    "dgd with momentum": ("dgd", "momentum", _dgd_momentum),
}


def _constant_gates(level: ir.Level, tokens: int) -> dict[str, torch.Tensor]:
    """Each gate of the level and its optimizer levels, one number per token (they are constants)."""
    def full(value):
        return torch.full((1, tokens, 1), float(value), dtype=torch.float64)

    gates = {"lr": full(level.lr.value), "retain": full(level.retain.value)}
    for moment in level.update.levels:
        for role in ("lr", "retain"):
            gate = getattr(moment, role)
            if gate is not None:
                gates[f"{moment.name}.{role}"] = full(gate.value)
    return gates


@pytest.mark.parametrize("name", LIBRARY)
def test_each_library_optimizer_steps_as_its_equation(name):
    rule, update, equation = LIBRARY[name]
    level = _program(KERNEL_SPEC.format(lr=LR, retain=RETAIN, rule=rule, update=update)).level("memory")
    torch.manual_seed(0)
    kernel = MemoryKernel(level, heads=1, key_dim=3, value_dim=2).double()
    generator = torch.Generator().manual_seed(1)
    tokens = 5
    k, q = (torch.randn(1, tokens, 1, 3, generator=generator, dtype=torch.float64) for _ in range(2))
    v = torch.randn(1, tokens, 1, 2, generator=generator, dtype=torch.float64)
    reads, state = reference.run_kernel(kernel, k, v, q, _constant_gates(level, tokens))

    w, buffers = torch.zeros(2, 3, dtype=torch.float64), {}
    # a memory's learned initial state is an input of the equation (a parameter of the outer level)
    for name, maps in kernel.level_optimizer.initial.items():
        buffers[name] = [p.detach()[0] for p in maps[0]]
    for t in range(tokens):
        key, value = k[0, t, 0], v[0, t, 0]
        grad = torch.outer(w @ key - value, key)  # l2 at the previous state (every 1)
        w, buffers = equation(w, buffers, grad, key)
        torch.testing.assert_close(reads[0, t, 0], w @ q[0, t, 0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(state.weights[0][0, 0], w, rtol=1e-10, atol=1e-12)
    # the optimizer levels that keep their past hold the buffers the equation carries
    assert sorted(state.moments) == sorted(buffers)
    for name, buffer in buffers.items():
        for stored, wanted in zip(state.moments[name], buffer if isinstance(buffer, list) else [buffer], strict=True):
            torch.testing.assert_close(stored[0, 0], wanted, rtol=1e-10, atol=1e-12)
    assert w.abs().max() > 1e-3  # the memory moved


# --- equal to the built-ins, in closed form ---------------------------------------------------

MODEL_SPEC = """import "lib/optimizers.nest"
level titans_momentum extends momentum {{
    retain = x |> proj |> sigmoid
}}
{levels}level memory : {state} {{
    key = x |> proj |> l2norm
    value = x |> proj
    query = x |> proj |> l2norm
    lr = x |> proj |> sigmoid(max=0.2)
    retain = x |> proj(bias=true) |> sigmoid
    objective {objective}
{fields}
    every {every}
    read {read}
}}
model {{
    vocab 24
    dim 8
    heads 2
    block = residual(rmsnorm |> memory)
}}
train {{
    context 16
    batch 2
}}
"""

# name: (state, every, read, the library's fields, the built-in's fields, the form both plan)
BUILT_INS = {
    "gd (delta rule)": ("matrix", 1, "after", "optimizer gd\n    update = gd_step", "optimizer gd", "delta"),
    "gd (mlp)": ("mlp(depth=2, expand=2)", 4, "before", "optimizer gd\n    update = gd_step", "optimizer gd",
                 "layered"),
    "momentum": ("mlp(depth=2, expand=2)", 4, "before", "optimizer gd\n    update = titans_momentum",
                 "optimizer momentum\n    momentum = x |> proj |> sigmoid", "layered"),
    "momentum (matrix)": ("matrix", 4, "after", "optimizer gd\n    update = titans_momentum",
                          "optimizer momentum\n    momentum = x |> proj |> sigmoid", "anchored"),
    "dgd": ("mlp(depth=2, expand=2)", 4, "before", "optimizer dgd\n    update = gd_step", "optimizer dgd", "layered"),
    "dgd with momentum": ("mlp(depth=2, expand=2)", 4, "after", "optimizer dgd\n    update = titans_momentum",
                          "optimizer dgd_momentum\n    momentum = x |> proj |> sigmoid", "layered"),
    "muon": ("mlp(depth=2, expand=2)", 4, "before",
             "optimizer gd\n    update = -lr * newton_schulz(muon_momentum, steps=3)", "optimizer muon(steps=3)",
             "trajectory"),
}


def _model_spec(state: str, every: int, read: str, fields: str, objective: str = "l2", levels: str = "") -> str:
    return MODEL_SPEC.format(state=state, every=every, read=read, fields=fields, objective=objective, levels=levels)


def _library_name(name: str) -> str:
    """A built-in model's parameter name in the library model: the momentum gate is its level's retain."""
    return name.replace(".gates.momentum.", ".optimizer_gates.titans_momentum.retain.")


def _build(backend, program: ir.Program):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", compiled.CompileWarning)  # a closed form, never token by token
        return backend.build(program).double()


def _run(model, tokens):
    first, state = model(tokens[:, :9])
    second, state = model(tokens[:, 9:], state)
    logits = torch.cat([first, second], dim=1)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 24), tokens[:, 1:].reshape(-1))
    names = [n for n, _ in model.named_parameters()]
    return logits, state, dict(zip(names, torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)))


@pytest.mark.parametrize("name", BUILT_INS)
def test_the_library_equals_the_built_in_in_both_backends(name):
    state, every, read, library_fields, builtin_fields, form = BUILT_INS[name]
    library = _program(_model_spec(state, every, read, "    " + library_fields))
    builtin = _program(_model_spec(state, every, read, "    " + builtin_fields))
    assert plan_program(library).levels["memory"].kernel == plan_program(builtin).levels["memory"].kernel == form
    tokens = torch.randint(0, 24, (2, 21), generator=torch.Generator().manual_seed(3))
    for backend in (reference, compiled):
        built, composed = _build(backend, builtin), _build(backend, library)
        weights = {_library_name(n): t for n, t in built.state_dict().items()}
        unused = set(composed.state_dict()) - set(weights)  # the library model's served-level gate it does not read
        composed.load_state_dict({**composed.state_dict(), **weights})
        assert estimate(library).parameters == sum(p.numel() for p in composed.parameters())
        expected_logits, expected_state, expected_grads = _run(built, tokens)
        logits, state_, grads = _run(composed, tokens)
        torch.testing.assert_close(logits, expected_logits, rtol=1e-9, atol=1e-10)
        expected_level, level = expected_state.levels[0]["memory"], state_.levels[0]["memory"]
        for a, b in zip(_tensors(level.weights), _tensors(expected_level.weights), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
        # the built-in's momentum buffer is the optimizer level's state
        moments = [t for _, buffers in sorted(level.moments.items()) for t in buffers]
        for a, b in zip(moments, expected_level.momentum, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
        assert not level.momentum
        for parameter, grad in expected_grads.items():
            other = grads[_library_name(parameter)]
            assert (grad is None) == (other is None), parameter
            if grad is not None:
                torch.testing.assert_close(other, grad, rtol=1e-8, atol=1e-10, msg=lambda m: f"{parameter}: {m}")
        assert all(re.search(r"\.gates\.", n) for n in unused)


# --- compositions drawn at random ---------------------------------------------------------------

DRAWN_LEVELS = """level first : moment {{
    value = {value}
    retain = {retain}
{lr}}}
level second : moment {{
    value = {second_value}
    retain = 0.8
}}
"""


@settings(max_examples=12, deadline=None)
@given(value=st.sampled_from(["-grad", "grad", "-sign(grad)", "-(grad * grad) + 0.1 * param"]),
       retain=st.sampled_from(["0", "0.9", "x |> proj |> sigmoid"]),
       lr=st.sampled_from(["", "    lr = 1\n", "    lr = x |> proj |> sigmoid\n"]),
       second_value=st.sampled_from(["grad * grad", "-first"]),
       update=st.sampled_from(["first", "-lr * first", "-lr * newton_schulz(first, steps=2)", "first + 0.5 * second",
                               "-lr * first / (sqrt(abs(second)) + 1e-3)"]),
       rule=st.sampled_from(["gd", "dgd"]), state=st.sampled_from(["matrix", "mlp(depth=2, expand=2)"]),
       objective=st.sampled_from(["l2", "dot"]), every=st.sampled_from([1, 4]), read=st.sampled_from(["before", "after"]))
def test_drawn_compositions_equal_the_reference(value, retain, lr, second_value, update, rule, state, objective, every,
                                                read):
    """Whatever the compiled backend makes of a composition (a built-in's closed form where it is
    one, the scan form or token by token where not) equals the literal rule: never a different rule."""
    levels = DRAWN_LEVELS.format(value=value, retain=retain, lr=lr, second_value=second_value)
    text = _model_spec(state, every, read, f"    optimizer {rule}\n    update = {update}", objective, levels)
    result = _analyze(text)
    assert result.ok, [d.message for d in result.diagnostics]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", compiled.CompileWarning)
        assert_equivalent(result.program, length=13, split=6, diverged=lambda: None)


# --- what the checker says ------------------------------------------------------------------------

BAD = """import "lib/optimizers.nest"
level memory : matrix {{
    objective l2
{fields}
}}
{extra}
model {{
    vocab 16
    dim 8
    block = memory
}}
"""


@pytest.mark.parametrize("fields, extra, code, message", [
    ("    optimizer momentum\n    update = momentum", "", "N0117", "`update` has no meaning with optimizer `momentum`"),
    ("    update = ffn", "level ffn : mlp", "N0105", "level `ffn` is not an optimizer level"),
    ("    update = x |> proj", "", "N0105",
     "the update of level `memory` is arithmetic on `grad`, `param`, `lr`, numbers and optimizer levels"),
    ("    update = momentm", "", "N0101", "unknown name `momentm` in the update of level `memory`"),
    ("    update = loop", "level loop : moment {\n    value = -loop\n}", "N0121", "optimizer level `loop` reads itself"),
    # `every N steps` is the outer update's (tests/test_outer_optimizer_levels.py); a period in tokens never
    ("    update = odd", "level odd : moment {\n    value = -grad\n    every 4\n}", "N0117",
     "optimizer level `odd` moves with the gradient stream it serves"),
    ("    update = odd", "level odd : moment {\n    value = -grad\n    every 4 steps\n}", "N0117",
     "optimizer level `odd` moves `every 4 steps`, but level `memory` updates in-sequence"),
    ("    update = odd", "level odd : moment {\n    value = x |> proj\n}", "N0105",
     "the value of optimizer level `odd` is arithmetic on `grad`, `param` and numbers"),
    ("    update = odd", "level odd : moment {\n    key = grad\n}", "N0117", "a `dot` optimizer level reads no key"),
    ("    update = odd", "level odd : moment {\n    objective lp\n}", "N0117", "an optimizer level learns by `dot` or `l2`"),
    ("    update = odd", "level odd : moment {\n    objective l2\n    value = grad\n}", "N0105",
     "with `objective l2` the value of optimizer level `odd` is a number"),
    ("    update = odd", "level odd : moment {\n    retain = learned(per=channel)\n}", "N0117",
     "the retain of an optimizer level is one value per head"),
    ("    lr = learned(per=channel)\n    update = momentum", "", "N0117", "with `update` the lr is one value per head"),
    ("    update = rowwise", "level rowwise : vector {\n    key = grad\n}", "N0117",
     "an optimizer level's state is `moment` or a memory of rows, not `vector`"),
    ("    update = rowwise", "level rowwise : mlp {\n    key = grad\n    init nested\n}", "N0117",
     "an optimizer level starts at zero or at a learned state (`init meta`)"),
    ("    erase = 0.5\n    update = momentum", "", "N0117", "`update` has no meaning with erase"),
], ids=lambda value: value if isinstance(value, str) and value.startswith("N") else None)
def test_bad_optimizer_levels_are_reported_where_they_stand(fields, extra, code, message):
    diagnostics = [(d.code, d.message) for d in _analyze(BAD.format(fields=fields, extra=extra)).diagnostics
                   if d.is_error]
    assert (code, message) in diagnostics, diagnostics


def test_an_optimizer_level_is_not_a_block():
    text = BAD.format(fields="", extra="").replace("block = memory", "block = memory |> momentum")
    assert ("N0105", "optimizer level `momentum` is not a block") in [(d.code, d.message)
                                                                      for d in _analyze(text).diagnostics]


def test_a_state_file_keeps_the_optimizer_levels_states(tmp_path):
    """A stream saved mid-way and read back continues exactly: the optimizer levels' buffers are
    part of the memory's state."""
    from nestc.runtime.checkpoint import load_state, save_state

    program = _program(_model_spec("matrix", 4, "after", "    optimizer gd\n"
                                   "    update = -lr * adam_first / (sqrt(adam_second) + 1e-8)"))
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", compiled.CompileWarning)
        model = compiled.build(program).double()
    tokens = torch.randint(0, 24, (2, 14), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        _, state = model(tokens[:, :6])
        path = str(tmp_path / "state.safetensors")
        save_state(state, path)
        expected, expected_state = model(tokens[:, 6:], state)
        restored = load_state(path, model)
        assert sorted(restored.levels[0]["memory"].moments) == ["adam_first", "adam_second"]
        logits, final = model(tokens[:, 6:], restored)
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    for a, b in zip(_tensors(final), _tensors(expected_state), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_level_extending_another_keeps_its_update_and_they_fuse_as_the_built_in():
    """Hope's memories share one update through `extends`, and run stacked as one call of the
    built-in it equals (dgd_momentum), as levels with the built-in itself do."""
    program = _program("""import "lib/optimizers.nest"
level mk : mlp(depth=2, expand=2) {
    key = x |> proj |> l2norm
    value = x |> proj
    lr = x |> proj |> sigmoid(max=0.1)
    optimizer dgd
    update = momentum
    every 4
    read before
}
level mv extends mk
level mem extends mk {
    key = x |> mk |> l2norm
    value = x |> mv
    query = x |> proj |> l2norm
}
model {
    vocab 24
    dim 8
    heads 2
    block = residual(rmsnorm |> mem)
}
train {
    context 16
}
""")
    assert program.level("mv").update == program.level("mk").update == program.level("mem").update
    (group,) = plan_program(program).fused
    assert group.form == "layered" and set(group.levels) == {"mk", "mv"}  # the generators, stacked
    fast = assert_equivalent(program)
    assert fast.fused


def test_a_deep_momentum_counts_its_learned_initial_state_and_equals_the_reference():
    """An MLP memory of the gradient's rows (eq. 50) has maps of its own for each served weight,
    whose initial values the outer level learns: the estimate counts them, and the compiled
    backend (in the scan form: no built-in optimizer equals it) equals the reference with their
    gradients."""
    program = _program(_model_spec("mlp(depth=2, expand=2)", 4, "before", "    optimizer gd\n    update = deep_momentum")
                       .replace("sigmoid(max=0.2)", "sigmoid(max=0.02)"))
    plan = plan_program(program).levels["memory"]
    assert plan.kernel == "scan"
    model = reference.build(program)
    initial = [name for name, _ in model.named_parameters() if ".level_optimizer.initial.deep_momentum." in name]
    assert len(initial) == 4  # two maps for each of the memory's two weights
    assert estimate(program).parameters == sum(p.numel() for p in model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error", compiled.CompileWarning)
        assert_equivalent(program, length=13, split=6)


def test_the_outer_stream_takes_buffers_not_memories_of_rows():
    text = BAD.format(fields="", extra="").replace("model {", "train {\n    optimizer gd(lr=1e-3)\n"
                                                   "    update = deep_momentum\n}\nmodel {")
    assert ("N0105", "optimizer level `deep_momentum` of the train section's `update` is a `mlp` memory of rows") in [
        (d.code, d.message) for d in _analyze(text).diagnostics]

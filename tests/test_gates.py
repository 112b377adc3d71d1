"""Gate algebra (language §5.4): arithmetic and functions of gates, `let` bindings shared by a
level's fields, one constant per head, learned per-head vectors, initial biases."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nestc.backends import reference
from nestc.lang import ir
from nestc.lang.formatter import format_module
from nestc.lang.sema import analyze_source
from nestc.lang.source import SourceFile
from nestc.lang.syntax import parse
from nestc.passes.fusion import fusion_signature
from nestc.passes.estimate import estimate
from nesttest import REPO

HEADS = 2


def _spec(fields: str, state: str = "matrix") -> str:
    return (f"level mixer : {state} {{\n    key = x |> proj |> l2norm\n    value = x |> proj\n"
            f"    query = x |> proj |> l2norm\n{fields}\n    objective l2\n    every 1\n}}\n"
            f"model {{\n    vocab 32\n    dim 8\n    heads {HEADS}\n    block = residual(rmsnorm |> mixer)\n}}\n"
            "train {\n    context 16\n}\n")


def _program(fields: str) -> ir.Program:
    result = analyze_source(SourceFile("gates.nest", _spec(fields)))
    assert result.ok, [d.message for d in result.diagnostics]
    return result.program


def _errors(fields: str) -> list[tuple[str, str]]:
    result = analyze_source(SourceFile("gates.nest", _spec(fields)))
    return [(d.code, d.message) for d in result.diagnostics if d.is_error]


def _level(fields: str):
    torch.manual_seed(0)
    model = reference.build(_program(fields)).double()
    return model, model.layers[0].levels["mixer"]


def _gates(level, x):
    from nestc.backends.pipelines import compute_lets

    lets = compute_lets(level.lets, lambda gate, earlier: gate(x, 0, None, None, earlier))
    return {role: gate(x, 0, None, None, lets) for role, gate in level.gates.items()}


MAMBA = """    let dt = x |> proj(bias=[-6.907, -2.252]) |> softplus
    lr = 1 - (x |> proj |> sigmoid)
    retain = exp(-exp(learned(init=[0.0, 1.5])) * dt)"""


def test_a_binding_is_computed_once_and_its_parameters_are_shared():
    """Mamba-2's gates by hand from the level's own parameters: dt = softplus(W x + b),
    alpha = exp(-exp(A_log) dt), and lr = 1 - sigmoid(W' x)."""
    model, level = _level(MAMBA)
    # one projection for dt (with its bias), one for lr, one learned vector: nothing duplicated
    names = [name for name, _ in level.named_parameters() if name.startswith(("lets", "gates"))]
    assert names == ["lets.dt.pipeline.stages.0.linear.weight", "lets.dt.pipeline.stages.0.linear.bias",
                     "gates.lr.operands.1.pipeline.stages.0.linear.weight",
                     "gates.retain.operands.0.operands.0.operands.0.operands.0.learned"]
    dt_linear = level.lets["dt"].pipeline.stages[0].linear
    lr_linear = level.gates["lr"].operands[1].pipeline.stages[0].linear
    a_log = level.gates["retain"].operands[0].operands[0].operands[0].operands[0].learned
    x = torch.randn(5, 8, dtype=torch.float64)
    gates = _gates(level, x)
    dt = F.softplus(x @ dt_linear.weight.T + dt_linear.bias)
    torch.testing.assert_close(gates["retain"], torch.exp(-torch.exp(a_log) * dt), rtol=0, atol=1e-15)
    torch.testing.assert_close(gates["lr"], 1 - torch.sigmoid(x @ lr_linear.weight.T), rtol=0, atol=1e-15)


def test_initial_values_are_the_spec_numbers():
    level = reference.build(_program(MAMBA)).layers[0].levels["mixer"]  # float32, as built
    assert torch.equal(level.lets["dt"].pipeline.stages[0].linear.bias.detach(), torch.tensor([-6.907, -2.252]))
    assert level.gates["retain"].operands[0].operands[0].operands[0].operands[0].learned.tolist() == [0.0, 1.5]
    # Mamba-2's dt initialisation: softplus(b) = 1e-3 and 1e-1, so retain starts near exp(-dt)
    assert [round(F.softplus(torch.tensor(b)).item(), 4) for b in (-6.907, -2.252)] == [0.001, 0.1]


def test_one_constant_per_head_and_a_per_channel_gate_broadcasting_over_it():
    _, level = _level("""    retain = [0.5, 0.25] * (x |> proj(per=channel) |> sigmoid)""")
    x = torch.randn(3, 8, dtype=torch.float64)
    channel = level.gates["retain"].operands[1].pipeline.stages[0].linear
    expected = torch.tensor([0.5, 0.25], dtype=torch.float64)[None, :, None] * torch.sigmoid(
        x @ channel.weight.T).reshape(3, HEADS, -1)
    torch.testing.assert_close(_gates(level, x)["retain"], expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("fields", [
    MAMBA,
    "    retain = [0.5, 0.9]\n    lr = 0.5 * learned(init=[1.0, 0.2])",
    "    let g = x |> proj(per=channel) |> sigmoid\n    retain = g\n    lr = 1 - log(1 + g) / 2",
    "    let a = x |> proj |> softplus\n    let b = a / (1 + a)\n    retain = exp(-b)\n    lr = sigmoid(-a) * b",
], ids=["mamba2", "vectors", "channel-let", "chained-lets"])
def test_the_compiled_backend_runs_gate_expressions_exactly(fields):
    from test_compiled import assert_equivalent

    assert_equivalent(_program(fields))


def test_the_parameter_count_counts_a_binding_once():
    program = _program(MAMBA)
    model = reference.build(program)
    assert estimate(program).parameters == sum(p.numel() for p in model.parameters())


def test_levels_with_gate_expressions_or_bindings_do_not_fuse():
    for fields in (MAMBA, "    retain = 1 - (x |> proj |> sigmoid)", "    retain = [0.5, 0.9]"):
        program = _program(fields)
        assert fusion_signature(program, program.level("mixer"), "delta") is None, fields


def test_the_ir_shows_the_bindings_and_the_arithmetic():
    dumped = ir.dump(_program(MAMBA))
    assert "    let dt     x |> proj(dim=0, per=head, bias=[-6.907, -2.252]) |> softplus\n" in dumped
    assert "    retain     exp((-(exp(learned(init=[0.0, 1.5], per=head))) * dt))\n" in dumped
    assert "    lr         (1 - (x |> proj(dim=0, per=head, bias=false) |> sigmoid(max=1.0)))\n" in dumped


def test_the_formatter_keeps_bindings():
    text = _spec("    let   dt=x|>proj|>softplus\n    retain = exp(-dt)")
    formatted = format_module(parse(SourceFile("f.nest", text)))
    assert "    let dt = x |> proj |> softplus\n    retain = exp(-dt)\n" in formatted
    assert format_module(parse(SourceFile("f.nest", formatted))) == formatted


@pytest.mark.parametrize("fields, code, message", [  # each with its first error
    ("    lr = dt", "N0101", "unknown name `dt` in `lr`"),
    ("    lr = 1 - x |> proj |> sigmoid", "N0120", "`lr` must be a pipeline that starts with `x`"),
    ("    let a = b\n    let b = x |> proj\n    retain = a * b", "N0101", "unknown name `b` in `let a`"),
    ("    let dt = x |> proj\n    let dt = x |> proj\n    retain = dt", "N0116",
     "`let dt` is given twice in level `mixer`"),
    ("    let proj = x |> proj\n    retain = 1", "N0123", "`proj` is a built-in name and cannot be bound"),
    ("    let lr = x |> proj\n    retain = lr", "N0123", "`lr` is a built-in name and cannot be bound"),
    ("    let mixer = x |> proj", "N0102", "`let mixer` has the name of a level"),
    ("    retain = exp(x |> proj, 2)", "N0108", "`exp(...)` in `retain` takes one gate"),
    ("    retain = []", "N0107", "`retain` lists no number"),
    ("    retain = [0.5, choice(0.9, 0.99)]", "N0119", "the items of `retain` cannot be search-space values yet"),
    ("    retain = \"0.5\"", "N0105", "`retain` must be a number, `learned(...)`, a pipeline from `x` or arithmetic "
                                   "on gates"),
])
def test_bad_gates_are_reported_where_they_stand(fields, code, message):
    found = _errors(fields)
    assert found and found[0] == (code, message), found


def test_bindings_are_refused_with_substeps():
    text = _spec("    let dt = x |> proj |> sigmoid\n    lr = dt\n    substeps 2").replace(
        "key = x |> proj |> l2norm", "key = x |> proj(dim=16) |> l2norm").replace("value = x |> proj\n",
                                                                               "value = x |> proj(dim=16)\n")
    errors = [(d.code, d.message) for d in analyze_source(SourceFile("s.nest", text)).diagnostics if d.is_error]
    assert errors == [("N0117", "`let` has no meaning with `substeps`")]


def test_an_input_made_from_gates_has_the_level_width_per_head():
    """HGRN's tied gates: `key = 1 - forget` with `let forget` per channel, and a constant query;
    the key is 1 - sigmoid(W x) by hand, the query 1 in every channel of every head."""
    text = _spec("    let forget = x |> proj(per=channel) |> sigmoid\n    retain = forget", state="vector").replace(
        "key = x |> proj |> l2norm", "key = 1 - forget").replace("query = x |> proj |> l2norm", "query = 1").replace(
        "objective l2", "objective dot")
    result = analyze_source(SourceFile("hgrn.nest", text))
    assert result.ok, [d.message for d in result.diagnostics]
    torch.manual_seed(0)
    level = reference.build(result.program).double().layers[0].levels["mixer"]
    assert sorted(level.sources) == ["key", "query"] and sorted(level.pipelines) == ["value"]
    x = torch.randn(3, 8, dtype=torch.float64)
    from nestc.backends.pipelines import compute_lets

    lets = compute_lets(level.lets, lambda gate, earlier: gate(x, 0, None, None, earlier))
    key = level.source_heads("key", level.sources["key"](x, 0, None, None, lets))
    forget = torch.sigmoid(x @ level.lets["forget"].pipeline.stages[0].linear.weight.T).reshape(3, HEADS, -1)
    torch.testing.assert_close(key, 1 - forget, rtol=0, atol=1e-15)
    query = level.source_heads("query", level.sources["query"](x, 0, None, None, lets))
    assert query.shape == (3, HEADS, 8 // HEADS) and bool((query == 1).all())


@pytest.mark.parametrize("text, message", [
    ("level a : cache {\n    key = 1 - (x |> proj |> sigmoid)\n}\n", "a `cache` level's key is a pipeline from `x`"),
    ("level a : matrix {\n    key = 1 - (x |> proj |> sigmoid)\n    value = x |> proj(dim=16)\n    substeps 2\n"
     "    every 1\n}\n", "with `substeps` the key is a pipeline from `x`"),
])
def test_inputs_made_from_gates_are_refused_where_nothing_reads_them(text, message):
    text += "model {\n    vocab 32\n    dim 8\n    heads 2\n    block = a\n}\n"
    errors = [(d.code, d.message) for d in analyze_source(SourceFile("s.nest", text)).diagnostics if d.is_error]
    assert errors[0] == ("N0117", message), errors


def test_a_binding_no_gate_names_is_a_warning():
    result = analyze_source(SourceFile("gates.nest", _spec("    let unused = x |> proj")))
    assert result.ok
    assert [(d.code, d.message) for d in result.diagnostics] == [("N0202", "`let unused` is never used")]


def test_a_continuum_level_takes_one_number_per_gate():
    text = ("level cms : mlp {\n    objective task\n    every 4\n    lr = [0.1, 0.2]\n}\n"
            "model {\n    vocab 32\n    dim 8\n    heads 2\n    block = cms\n}\n")
    errors = [(d.code, d.message) for d in analyze_source(SourceFile("c.nest", text)).diagnostics if d.is_error]
    assert errors == [("N0117", "the lr of a level trained on the task loss is one number or `learned(...)`")]


@pytest.mark.parametrize("fields, where", [("    retain = [0.5, 0.9, 0.99]", "`retain`"),
                                            ("    lr = learned(init=[1.0, 2.0, 3.0])", "`lr`"),
                                            ("    let a = x |> proj\n    retain = a * [0.5, 0.9, 0.99]", "`retain`")])
def test_a_per_head_list_must_match_the_heads(fields, where):
    assert _errors(fields) == [("N0105", f"{where} gives 3 values, one per head, but level `mixer` has 2 heads")]


def test_gated_deltanet_starts_with_its_decay_near_one():
    """Issue 14's init fix: specs/gated_deltanet.nest's retain gate at initialisation, on inputs of
    unit RMS (what its rmsnorm gives), is exp(-softplus(b_h)) up to the projection's small term:
    0.999 to 0.905 across the heads (Mamba-2's softplus(b) in [1e-3, 1e-1]). The former line,
    exp(-softplus(w.x + b)) with torch's initialisation, started near exp(-softplus(0)) = 0.5."""
    from nestc.lang import overrides
    from nestc.lang.sema import read_source

    def retain_at_init(assignments):
        source = read_source(str(REPO / "specs" / "gated_deltanet.nest"))
        changed = overrides.apply(source, assignments)
        result = analyze_source(changed.main, replaced_imports=changed.imported)
        torch.manual_seed(0)
        level = reference.build(result.program).layers[0].levels["mixer"]
        x = torch.randn(4096, 128)
        with torch.no_grad():
            return _gates(level, x)["retain"].mean(0)

    fixed = retain_at_init([])
    assert fixed.shape == (4,) and fixed.min() > 0.85 and fixed.max() > 0.99, fixed
    former = retain_at_init(["level.mixer.retain=x |> proj(bias=true) |> softplus |> scale(-1) |> exp"])
    assert 0.4 < former.mean() < 0.6, former

"""Semantic checks, one (or a few) tests per diagnostic, each asserting the code, the place and,
where the compiler offers one, the suggestion.

Snippets are built with `spec(levels, block, train)`: the levels, then a model section whose block
is `block` (vocab 256, dim 128, heads 4), then an optional train section.
"""

from __future__ import annotations

import pytest

from nestc import graph
from nestc.lang import ir
from nesttest import analyze, caret, codes, errors, only, render, spec

# --- a valid baseline, so every failing snippet below fails for the reason it names ---------------

def test_baseline_is_clean():
    result = analyze(spec("level mixer : matrix { every 16 }"))
    assert result.ok and result.diagnostics == [], render(result)


# --- unknown names, with the right suggestion -----------------------------------------------------

@pytest.mark.parametrize("text, code, line, column, suggestion", [
    # spec(): line 1 the level, 2 blank, 3 `model {`, 4-6 vocab/dim/heads, 7 "    block = mixr" (mixr at 13)
    (spec("level mixer : matrix", "mixr"), "N0101", 7, 13, "`mixer`"),
    (spec("level mixer : matrix { evry 16 }"), "N0103", 1, 24, "`every`"),
    (spec("level mixer : mlp(dept=2)"), "N0104", 1, 19, "`depth`"),
    (spec("level mixer : matrix { key = x |> proj |> sigmod }"), "N0101", 1, 43, "`sigmoid`"),
    (spec("level mixer : matrix { objective huberr }"), "N0101", 1, 34, "`huber`"),
    (spec("level mixer : matrix { optimizer momentun }"), "N0101", 1, 34, "`momentum`"),
    (spec("level mixer : matrx"), "N0101", 1, 15, "`matrix`"),
    (spec("level mixer : matrix { read befor }"), "N0101", 1, 29, "`before`"),
    (spec("level mixer : matrix { lr = lerned }"), "N0101", 1, 29, "`learned`"),
    (spec("level mixer : matrix\nlevel b extends mixr", "mixer |> b"), "N0101", 2, 17, "`mixer`"),
    # line 8 closes the model, 9 is blank, 10 is "train { schedule cosin }" (cosin at 18)
    (spec("level mixer : matrix", train="train { schedule cosin }"), "N0101", 10, 18, "`cosine`"),
    (spec("level mixer : matrix") + "modle { dim 3 }\n", "N0103", 9, 1, "`model`"),
])
def test_unknown_name_suggests_the_intended_one(text, code, line, column, suggestion):
    diagnostic = only(analyze(text), code)
    assert (diagnostic.span.line, diagnostic.span.column) == (line, column)
    assert diagnostic.help is not None and f"did you mean {suggestion}?" in diagnostic.help


def test_unknown_constant_suggests_a_constant():
    text = "const WIDTH = 128\nlevel mixer : matrix\nmodel {\n    vocab 256\n    dim WIDHT\n    block = mixer\n}\n"
    diagnostic = only(analyze(text), "N0101")
    assert (diagnostic.span.line, diagnostic.span.column) == (5, 9)
    assert "`WIDTH`" in diagnostic.help


def test_name_of_the_wrong_kind_points_at_its_definition():
    text = spec("level mixer : matrix\nlevel other : matrix { heads mixer }", "mixer |> other")
    diagnostic = only(analyze(text), "N0105")
    assert "`mixer` is a level" in diagnostic.message
    assert (diagnostic.span.line, diagnostic.span.column) == (2, 30)
    (where,) = diagnostic.secondary
    assert (where.span.line, where.span.column) == (1, 7)


# --- arguments: names, types, ranges, counts ------------------------------------------------------

@pytest.mark.parametrize("levels, code, column", [
    ("level mixer : mlp(depth=0)", "N0106", 25),          # depth >= 1
    ("level mixer : mlp(expand=-1)", "N0106", 26),         # expand > 0
    ("level mixer : mlp(expand=0)", "N0106", 26),          # exclusive minimum
    ("level mixer : mlp(depth=1.5)", "N0105", 25),         # an integer
    ("level mixer : mlp(depth=2.0)", "N0105", 25),         # a real number, even if whole
    ("level mixer : mlp(residual=3)", "N0105", 28),        # a boolean
    ("level mixer : mlp(act=swish)", "N0101", 23),         # an enum value
    ("level mixer : mlp(act=\"gelu\")", "N0105", 23),      # a name, not a string
    ("level mixer : mlp(2, 4, gelu, true, none, 7)", "N0108", 43),  # six positionals for five params
    ("level mixer : mlp(depth=1, depth=2)", "N0116", 28),  # given twice
    ("level mixer : cache(window=-1)", "N0106", 28),
])
def test_argument_checks(levels, code, column):
    diagnostic = only(analyze(spec(levels)), code)
    assert (diagnostic.span.line, diagnostic.span.column) == (1, column)


def test_range_message_names_the_bounds():
    diagnostic = only(analyze(spec("level mixer : matrix", train="train { optimizer adamw(beta1=1.5) }")), "N0106")
    assert diagnostic.message == "`beta1` of `adamw` must be between 0 and 1"
    assert diagnostic.label == "got 1.5"


def test_integer_help_offers_the_whole_number():
    diagnostic = only(analyze(spec("level mixer : mlp(depth=2.0)")), "N0105")
    assert diagnostic.help == "write `2`"


@pytest.mark.parametrize("levels, block, fragment", [
    ("level mixer : matrix { key = x |> proj |> scale }", "mixer", "scale(factor=...)"),
    ("level mixer : matrix { init pretrained }", "mixer", "pretrained(source=...)"),
])
def test_missing_required_argument(levels, block, fragment):
    diagnostic = only(analyze(spec(levels, block)), "N0107")
    assert fragment in diagnostic.help


def test_missing_required_field():
    diagnostic = only(analyze("level mixer : matrix\nmodel {\n    dim 128\n    block = mixer\n}\n"), "N0107")
    assert "`vocab`" in diagnostic.message
    assert (diagnostic.span.line, diagnostic.span.column) == (2, 1)  # the section's name


def test_too_many_arguments_for_a_block():
    diagnostic = only(analyze(spec("level mixer : matrix", "residual(mixer, mixer)")), "N0108")
    assert "`residual` takes 1 argument" in diagnostic.help


# --- generation cycles (N0109) --------------------------------------------------------------------

CYCLE = """\
level a : mlp(depth=2) {
    key = x |> b
    objective l2
    every 16
    read %s
}
level b : mlp(depth=2) {
    key = x |> a
    objective l2
    every 16
    read before
}
"""


def test_generation_cycle_with_read_after_is_rejected():
    diagnostic = only(analyze(spec(CYCLE % "after", "a |> b")), "N0109")
    assert (diagnostic.span.line, diagnostic.span.column) == (1, 7)  # level `a`, the one reading after
    assert "`a`, `b`" in diagnostic.message
    assert diagnostic.help == "add `read before` to level `a`"


def test_the_same_cycle_reading_before_everywhere_is_accepted():
    result = analyze(spec(CYCLE % "before", "a |> b"))
    assert result.ok, render(result)
    built = graph.build(result.program)
    kinds = {(s, t): d["kind"] for s, t, d in built.edges(data=True) if d["kind"] == "generates"}
    assert kinds == {("a", "b"): "generates", ("b", "a"): "generates"}


def test_self_generation_needs_read_before():
    assert codes(analyze(spec("level mixer : matrix { key = x |> self }"))) == ["N0109"]
    assert analyze(spec("level mixer : matrix { key = x |> self; read before }")).ok


def test_every_level_reading_after_in_a_cycle_is_reported():
    text = spec(CYCLE.replace("read before", "read after") % "after", "a |> b")
    assert [(d.code, d.span.line) for d in analyze(text).diagnostics] == [("N0109", 1), ("N0109", 7)]


# --- chunk sizes and the context (N0110) ----------------------------------------------------------

def test_chunk_not_dividing_context():
    text = spec("level mixer : matrix {\n    every 24\n}", train="train {\n    context 256\n}")
    result = analyze(text)
    diagnostic = only(result, "N0110")
    assert (diagnostic.span.line, diagnostic.span.column) == (2, 11)
    (context,) = diagnostic.secondary
    assert (context.span.line, context.span.column) == (13, 13)  # "    context 256" on line 13
    assert "e.g. 16" in diagnostic.help
    assert caret(render(result), 2) == (11, 2)


def test_chunk_checked_against_the_default_context():
    assert codes(analyze(spec("level mixer : matrix { every 24 }"))) == ["N0110"]  # context defaults to 256


@pytest.mark.parametrize("every", ["1", "0", "16", "256", "4 steps"])
def test_chunks_that_divide_or_are_not_chunks(every):
    assert analyze(spec(f"level mixer : matrix {{ every {every} }}")).ok


def test_every_chunk_option_of_a_choice_is_checked():
    diagnostic = only(analyze(spec("level mixer : matrix { every choice(16, 24) }")), "N0110")
    assert "chunk size 24" in diagnostic.message


def test_every_context_option_of_a_choice_is_checked():
    text = spec("level mixer : matrix { every 64 }", train="train { context choice(256, 96) }")
    assert "context 96" in only(analyze(text), "N0110").message


# --- objective / optimizer / read rules (N0111, N0112, N0113) -------------------------------------

def test_objective_not_defined_for_state():
    diagnostic = only(analyze(spec("level mixer : vector { objective omega }")), "N0111")
    assert diagnostic.span.column == 34
    assert "omega" not in diagnostic.help.split(":")[1]


def test_optimizer_not_defined_for_state():
    diagnostic = only(analyze(spec("level mixer : vector { optimizer dgd }")), "N0112")
    assert diagnostic.span.column == 34


def test_optimizer_not_defined_for_the_task_objective():
    only(analyze(spec("level mixer : mlp { objective task; optimizer muon }")), "N0112")


SOLVE = "level mixer : matrix {{ objective l2; optimizer solve; {fields} }}"


def test_the_exact_solve_on_a_matrix_with_l2_is_clean():
    result = analyze(spec(SOLVE.format(fields="ridge = exp(learned(init=0.0, per=channel))")))
    assert result.ok and result.diagnostics == [], render(result)
    assert result.program.level("mixer").ridge is not None


def test_the_exact_solve_gets_the_default_ridge_and_other_optimizers_none():
    assert analyze(spec(SOLVE.format(fields="every 1"))).program.level("mixer").ridge == ir.Constant(value=1.0)
    assert analyze(spec("level mixer : matrix { every 1 }")).program.level("mixer").ridge is None


@pytest.mark.parametrize("text, message", [
    ("level mixer : vector { objective l2; optimizer solve }", "not defined for a `vector` state"),
    ("level mixer : matrix { objective dot; optimizer solve }", "not defined for objective `dot`"),
    (SOLVE.format(fields="every 16"), "with an update period other than `every 1`"),
    (SOLVE.format(fields="read before"), "with `read before`"),
    (SOLVE.format(fields="order decay_first"), "with `order decay_first`"),
    (SOLVE.format(fields="output softmax"), "with an output map"),
    (SOLVE.format(fields="retain = x |> proj(per=channel) |> sigmoid"), "with a per-channel retain gate"),
])
def test_the_exact_solve_is_refused_where_it_is_not_defined(text, message):
    """optimizer solve: a matrix state, objective l2, every 1, read after, no output map, per-head
    lr and retain (N0112, which the registry-drawing test in test_rules.py holds legality errors to)."""
    diagnostic = only(analyze(spec(text)), "N0112")
    assert message in diagnostic.message and "`solve`" in diagnostic.message


@pytest.mark.parametrize("ridge", ["0.0", "-1.0"])
def test_a_ridge_that_is_not_positive_is_refused(ridge):
    diagnostic = only(analyze(spec(SOLVE.format(fields=f"ridge = {ridge}"))), "N0117")
    assert "must be positive" in diagnostic.message and "exp(learned" in diagnostic.help


def test_a_ridge_without_the_exact_solve_is_refused():
    diagnostic = only(analyze(spec("level mixer : matrix { ridge = 2.0 }")), "N0117")
    assert "no effect with optimizer `gd`" in diagnostic.message and "optimizer solve" in diagnostic.help


def test_read_after_with_task_objective():
    diagnostic = only(analyze(spec("level mixer : mlp { objective task; read after }")), "N0113")
    assert diagnostic.span.column == 42  # `after`


def test_read_after_with_the_default_task_objective_of_an_mlp():
    # an mlp level without key/value pipelines learns from the task loss
    only(analyze(spec("level mixer : mlp { read after }")), "N0113")


def test_task_objective_reads_before_by_default():
    result = analyze(spec("level mixer : mlp { objective task }"))
    assert result.ok and result.program.level("mixer").read == "before"


def test_objective_choice_options_are_checked():
    """docs/language.md §9: "Every variant is checked like a spec"; omega is not defined for vector."""
    assert "N0111" in codes(analyze(spec("level mixer : vector { objective choice(l2, omega) }")))


def test_optimizer_choice_options_are_checked():
    assert "N0112" in codes(analyze(spec("level mixer : vector { optimizer choice(gd, dgd) }")))


def test_read_choice_options_are_checked_against_the_task_objective():
    assert "N0113" in codes(analyze(spec("level mixer : mlp { objective task; read choice(before, after) }")))


# --- search values (N0114, N0119) -----------------------------------------------------------------

def test_vocab_cannot_be_a_choice():
    text = "level mixer : matrix\nmodel {\n    vocab choice(256, 512)\n    dim 128\n    block = mixer\n}\n"
    result = analyze(text)
    diagnostic = only(result, "N0114")
    assert (diagnostic.span.line, diagnostic.span.column, diagnostic.span.end_column) == (3, 11, 27)
    assert caret(render(result), 3) == (11, 16)


def test_search_arguments_must_be_fixed():
    text = spec("level a : matrix\nlevel b : matrix { init pretrained(source=choice(a, a)) }", "a |> b")
    only(analyze(text), "N0114")


@pytest.mark.parametrize("field, code_fragment", [
    ("layers choice()", "at least one option"),
    ("layers range(4, 2)", "low (4) must be below high (2)"),
    ("layers range(1, 4, 0)", "step must be positive"),
    ("layers range(1, 4, 0.5)", "fractional"),
    ("layers loguniform(1, 8)", "integer"),
    ("layers choice(1, 2) * choice(1, 2)", "two search-space values"),
])
def test_bad_search_values(field, code_fragment):
    text = f"level mixer : matrix\nmodel {{\n    vocab 256\n    dim 128\n    {field}\n    block = mixer\n}}\n"
    diagnostic = only(analyze(text), "N0119")
    assert code_fragment in diagnostic.message
    assert diagnostic.span.line == 5


def test_loguniform_needs_a_positive_lower_bound():
    text = spec("level mixer : matrix", train="train { optimizer adamw(lr=loguniform(0, 1)) }")
    assert "positive lower bound" in only(analyze(text), "N0119").message


def test_empty_choice_in_a_pipeline_and_a_block():
    assert codes(analyze(spec("level mixer : matrix { key = x |> choice() }"))) == ["N0119"]
    assert codes(analyze(spec("level mixer : matrix", "choice()"))) == ["N0119"]


def test_a_valid_search_space_checks():
    text = spec("const C = choice(2, 4)\nlevel mixer : matrix { key = x |> conv(C) |> choice(silu, gelu); every choice(8, 16, name=\"chunk\") }",
                train="train { optimizer adamw(lr=loguniform(1e-4, 1e-2)); steps range(100, 300, 100) }")
    result = analyze(text)
    assert result.ok, render(result)
    assert ir.contains_search(result.program)


@pytest.mark.parametrize("gate", ["-loguniform(1e-3, 1e-1)", "-range(1, 4)", "-choice(loguniform(1e-3, 1e-1), 0.5)",
                                  "choice(range(1, 4), 2) * 2"])
def test_arithmetic_on_ranges_is_an_error_not_a_crash(gate):
    """`range(...) * 2` is N0119; the negation or a range inside a choice must be too (it raised TypeError)."""
    result = analyze(spec(f"level mixer : matrix {{ lr = {gate} }}"))
    assert not result.ok
    assert codes(result) == ["N0119"]


def test_named_choices_must_agree():
    """docs/language.md §9: `name="..."` ties search calls to one dimension; "their options must agree"."""
    text = spec('level mixer : matrix { every choice(16, 32, name="c"); heads choice(1, 2, 4, name="c") }')
    assert "N0119" in codes(analyze(text))


# --- heads (N0118) and levels used twice (N0122) --------------------------------------------------

def test_model_heads_must_divide_dim():
    text = "level mixer : matrix\nmodel {\n    vocab 256\n    dim 128\n    heads 3\n    block = mixer\n}\n"
    diagnostic = only(analyze(text), "N0118")
    assert (diagnostic.span.line, diagnostic.span.column) == (5, 11)
    assert "128" in diagnostic.message


def test_level_heads_must_divide_dim():
    diagnostic = only(analyze(spec("level mixer : matrix {\n    heads 6\n}")), "N0118")
    assert (diagnostic.span.line, diagnostic.span.column) == (2, 11)
    assert "mixer" in diagnostic.label


def test_heads_checked_for_every_dim_option():
    text = "level mixer : matrix\nmodel {\n    vocab 256\n    dim choice(96, 128)\n    heads 3\n    block = mixer\n}\n"
    assert "width 128" in only(analyze(text), "N0118").message


def test_level_used_twice():
    result = analyze(spec("level mixer : matrix", "residual(mixer) |> residual(mixer)"))
    diagnostic = only(result, "N0122")
    assert (diagnostic.span.line, diagnostic.span.column) == (7, 22)  # the first use
    assert "mixer_2 extends mixer" in diagnostic.help


def test_alternatives_of_a_choice_count_once():
    assert analyze(spec("level a : matrix\nlevel b : matrix", "choice(a, a |> b)")).ok
    assert codes(analyze(spec("level a : matrix", "choice(a, a |> a)"))) == ["N0122"]


def test_memory_as_context_with_the_same_level_twice():
    assert "N0122" in codes(analyze(spec("level a : matrix\nlevel b : cache", "mac(memory=a, attention=a)")))


# --- the remaining checks -------------------------------------------------------------------------

@pytest.mark.parametrize("levels, block, code", [
    ("level mixer : cache { objective l2 }", "mixer", "N0117"),               # attention has no objective
    ("level mixer : matrix { momentum = 0.5 }", "mixer", "N0117"),            # momentum gate without momentum
    ("level mixer : mlp { objective task; key = x |> proj }", "mixer", "N0117"),
    ("level mixer : matrix { threshold = 0.5 }", "mixer", "N0117"),           # only huber_token reads it
    ("level mixer : matrix { objective huber_token; threshold = x |> proj(per=channel) |> softplus }", "mixer",
     "N0117"),                                                                # one threshold per head
    ("level mixer : matrix { key = proj |> silu }", "mixer", "N0120"),        # pipelines start with x
    ("const A = B\nconst B = A\nlevel mixer : matrix { heads A }", "mixer", "N0121"),
    ("block b = b\nlevel mixer : matrix", "b", "N0121"),
    ("level mixer extends mixer", "mixer", "N0121"),
    ("const proj = 3\nlevel mixer : matrix", "mixer", "N0123"),               # reserved name
    ("level mixer : matrix { init pretrained(source=mixer) }", "mixer", "N0124"),
    ("level mixer : matrix { init pretrained(source=v) }\nlevel v : vector", "mixer", "N0124"),
    ("level mixer : matrix { init nested }", "mixer", "N0126"),              # not implemented yet
    ("level mixer : matrix { objective l2 steps }", "mixer", "N0125"),        # only `every` takes a unit
    ("level mixer : matrix { every 16 parsecs }", "mixer", "N0101"),
    ("level mixer : matrix { every }", "mixer", "N0015"),
    ("level mixer : matrix { every 16; frozen }", "mixer", "N0116"),
    ("level mixer : matrix { every 16; every 32 }", "mixer", "N0116"),
])
def test_other_checks(levels, block, code):
    assert code in codes(analyze(spec(levels, block)))


@pytest.mark.parametrize("body, field, column, differs", [
    ("erase = 0.5; every 4", "erase", 24, "it updates every 4 tokens"),
    ("write = x |> proj |> sigmoid; objective dot", "write", 24, "objective `dot` is not one"),
    ("substeps 2; optimizer momentum", "substeps", 24, "optimizer `momentum` is not one"),
    ("optimizer gd(implicit=true); output softmax", "gd(implicit=true)", 34, "output `softmax` is not one"),
])
def test_the_delta_rule_fields_have_no_meaning_off_the_online_delta_rule(body, field, column, differs):
    """erase, write, substeps and gd's implicit step extend the delta rule: on a level whose rules
    the delta form does not compute, each is N0117 at the field, with what differs."""
    diagnostic = only(analyze(spec(f"level mixer : matrix {{ {body} }}")), "N0117")
    assert diagnostic.message == f"`{field}` has no meaning for level `mixer`"
    assert (diagnostic.span.line, diagnostic.span.column) == (1, column)
    assert diagnostic.notes[0].endswith("; here " + differs)


def test_the_delta_rule_fields_on_a_vector_state_and_on_attention():
    assert "state `vector` is not one" in only(analyze(spec("level mixer : vector { write = 0.5 }")), "N0117").notes[0]
    assert codes(analyze(spec("level mixer : cache { substeps 2 }"))) == ["N0117"]  # not a field of attention
    assert codes(analyze(spec("level mixer : matrix { substeps 0 }"))) == ["N0106"]


def test_the_generalised_delta_rule_checks_and_fills_its_fields():
    level = analyze(spec("level mixer : matrix {\n    erase = x |> proj(per=channel) |> sigmoid\n"
                         "    write = learned(init=0.5)\n    substeps 2\n    optimizer gd(implicit=true)\n}")
                    ).program.level("mixer")
    assert level.substeps == 2 and isinstance(level.erase, ir.Pipeline) and isinstance(level.write, ir.Op)
    assert level.optimizer == ir.Op(name="gd", args=(("implicit", True),))
    plain = analyze(spec("level mixer : matrix")).program.level("mixer")
    assert (plain.erase, plain.write, plain.substeps) == (None, None, 1)


@pytest.mark.parametrize("init", ["init nested", "init choice(meta, nested)"])
def test_init_nested_is_refused_until_it_is_implemented(init):
    """`init nested` (NL eq. 72) used to train silently as `init meta`; both backends lack it."""
    text = spec(f"level base : mlp {{\n    objective task\n    every 16\n    {init}\n}}\nlevel mixer extends base",
                "base |> mixer")
    diagnostic = only(analyze(text), "N0126")  # once, though two levels have it
    assert diagnostic.message == "`init nested` is not implemented yet"
    assert (diagnostic.span.line, diagnostic.span.column) == (4, 10)
    assert diagnostic.help.startswith("use `init meta`")


def test_section_given_twice():
    text = spec("level mixer : matrix") + "model {\n    vocab 2\n}\n"
    diagnostic = only(analyze(text), "N0102")
    assert (diagnostic.secondary[0].span.line, diagnostic.span.line) == (3, 9)


def test_unused_level_is_a_warning_only():
    result = analyze(spec("level mixer : matrix\nlevel spare : vector"))
    assert result.ok
    (warning,) = result.diagnostics
    assert (warning.code, warning.severity, warning.span.line, warning.span.column) == ("N0201", "warning", 2, 7)
    assert render(result).startswith("warning[N0201]")


def test_library_without_model_gets_no_unused_warning():
    result = analyze("level a : matrix\nlevel b : vector { every 4 }\n")
    assert result.ok and result.diagnostics == []
    assert result.program.model is None
    assert result.program.level_names == ("a", "b")


def test_generators_count_as_used():
    text = spec("level mixer : matrix { key = x |> gen }\nlevel gen : matrix { every 1 }")
    result = analyze(text)
    assert result.ok and result.diagnostics == [], render(result)
    assert set(result.program.level_names) == {"mixer", "gen"}


def test_a_base_level_that_is_only_extended_is_not_unused():
    result = analyze(spec("level base : matrix { every 4 }\nlevel mixer extends base"))
    assert result.ok and result.diagnostics == [], render(result)


def test_diagnostics_come_in_source_order():
    text = spec("level mixer : mlp(depth=0) {\n    evry 1\n}", "mixr")
    result = analyze(text)
    positions = [(d.span.line, d.span.column) for d in result.diagnostics]
    assert positions == sorted(positions) and len(positions) == 3
    assert all(d.is_error for d in errors(result))


def test_extended_level_errors_are_reported_once():
    text = spec("level base : mlp(depth=0)\nlevel a extends base\nlevel b extends base", "a |> b")
    assert codes(analyze(text)) == ["N0106"]


def _extends_chain(levels: int, reverse: bool = False) -> str:
    """l1 sets the state, objective and lr; every later level extends the one before and sets `every`."""
    definitions = ["level l1 : mlp(expand=3) { objective task; lr = 0.005; every 1 }"]
    definitions += [f"level l{i} extends l{i - 1} {{ every {1 + i % 2} }}" for i in range(2, levels + 1)]
    if reverse:
        definitions.reverse()
    return spec("\n".join(definitions), f"l{levels}")


@pytest.mark.parametrize("levels, reverse", [(1000, False), (3000, False), (3000, True)])
def test_a_long_extends_chain_inherits_the_first_levels_fields(levels, reverse):
    """A chain of 1,000 levels took seconds to check (each level re-walked the chain) and raised
    RecursionError; each level is now resolved once, without recursion, in either definition order."""
    result = analyze(_extends_chain(levels, reverse))
    assert result.ok and result.diagnostics == [], render(result)
    (last,) = result.program.levels
    assert last.name == f"l{levels}"
    assert last.state.name == "mlp" and last.state.arg("expand") == 3
    assert last.objective.name == "task" and last.lr == ir.Constant(value=0.005)
    assert last.every.tokens == 1 + levels % 2  # its own `every`, not l1's


@pytest.mark.slow
def test_an_extends_chain_of_ten_thousand_levels_checks():
    result = analyze(_extends_chain(10_000, reverse=True))
    assert result.ok, render(result)
    assert result.program.levels[0].lr == ir.Constant(value=0.005)


def test_a_long_chain_of_pretrained_initial_states_checks():
    """Checking `init pretrained(source=...)` built the source level from inside its copy: a chain
    of 1,000 raised RecursionError. The state of the last link still has to match."""
    links = [f"level p{i} : matrix {{ init pretrained(source=p{i - 1}) }}" for i in range(2, 1501)]
    result = analyze(spec("\n".join(["level p1 : matrix", *links][::-1]), "p1500"))
    assert result.ok, render(result)
    assert len(result.program.levels) == 1500
    mismatched = analyze(spec("\n".join(["level p1 : vector", *links][::-1]), "p1500"))
    diagnostic = only(mismatched, "N0124")
    assert diagnostic.message == "level `p2` is initialised from `p1`, whose state differs"


def test_an_extends_cycle_is_one_error_with_its_chain():
    text = spec("level a extends b\nlevel b extends c\nlevel c extends a\nlevel d extends c", "d")
    diagnostic = only(analyze(text), "N0121")
    assert diagnostic.message == "level `a` extends itself"
    assert (diagnostic.span.line, diagnostic.span.column) == (1, 17)
    assert diagnostic.notes == ("the chain: a -> b -> c -> a",)


# --- the level graph on search spaces -------------------------------------------------------------

def test_graph_renders_a_read_choice():
    """graph.to_json crashed (TypeError: Choice is not JSON serializable) on `read choice(...)`."""
    import json

    result = analyze(spec("level mixer : matrix { read choice(before, after) }"))
    assert result.ok, render(result)
    built = graph.build(result.program)
    data = json.loads(graph.to_json(built))
    (node,) = [n for n in data["nodes"] if n["id"] == "mixer"]
    assert isinstance(node["read"], str) and "before" in node["read"] and "after" in node["read"]
    assert "Choice(" not in graph.to_text(built)  # rendered in the spec's notation, not as a repr


@pytest.mark.parametrize("memory, attention, message", [
    ("ffn", "attn", "the memory of `mac` must be a memory level, but `ffn` is not"),
    ("mem", "mem2", "the attention of `mac` must be a cache level, but `mem2` is not"),
])
def test_mac_takes_a_memory_and_a_cache(memory, attention, message):
    """A feed-forward level in the memory's place once passed the checker and crashed both
    backends (no keys to retrieve with)."""
    states = {"mem": "matrix { every 4 }", "mem2": "matrix { every 4 }", "attn": "cache", "ffn": "mlp(expand=2)"}
    levels = "".join(f"level {name} : {states[name]}\n" for name in (memory, attention))
    block = f"residual(rmsnorm |> mac(memory={memory}, attention={attention}, segment=8))"
    diagnostic = only(analyze(spec(levels, block=block)), "N0105")
    assert diagnostic.message == message
    assert (diagnostic.span.line, diagnostic.span.column) == (8, 33)  # the `mac(...)` call

"""The compiled backend equals the reference: logits, final states and outer gradients."""

from __future__ import annotations

import glob
import math
import random
import warnings

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import nestc
from nestc.search import space
from nestc.backends import compiled, reference
from nestc.backends.attention import rotary_pairs_base, rotate_pairs
from nestc.backends.forms import layered
from nestc.lang.sema import analyze_source
from nestc.lang.source import SourceFile
from test_reference_model import _tensors

ZOO = sorted(glob.glob("specs/*.nest"))


@pytest.fixture(autouse=True)
def _at_root(monkeypatch, request):
    monkeypatch.chdir(request.config.rootpath)


def _pair(program, dtype):
    torch.manual_seed(0)
    ref = reference.build(program).to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", compiled.CompileWarning)
        fast = compiled.build(program).to(dtype)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def _run(model, tokens, split):
    """Two calls with the state carried; returns logits, final state and every parameter's gradient."""
    first, state = model(tokens[:, :split])
    second, state = model(tokens[:, split:], state)
    logits = torch.cat([first, second], dim=1)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, model.vocab), tokens[:, 1:].reshape(-1))
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    return logits, state, grads


def assert_equivalent(program, dtype=torch.float64, length=37, split=20, tolerance=None, diverged=None):
    ref, fast = _pair(program, dtype)
    tokens = torch.randint(0, ref.vocab, (2, length), generator=torch.Generator().manual_seed(1))
    expected, expected_state, expected_grads = _run(ref, tokens, split)
    if diverged is not None and not torch.isfinite(expected).all():
        diverged()  # a random rule that blows up has nothing to compare
        return None
    actual, actual_state, actual_grads = _run(fast, tokens, split)
    rtol, atol = tolerance or ((1e-6, 1e-6) if dtype == torch.float64 else (1e-4, 1e-5))
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)
    for a, b in zip(_tensors(actual_state), _tensors(expected_state), strict=True):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
    for (name, _), a, b in zip(ref.named_parameters(), actual_grads, expected_grads, strict=True):
        if b is None and a is not None and fast.fused:
            # A level stacked with others (fusion) shares their graph: a parameter that does not
            # reach the loss (a generator whose chunk has not closed yet) gets zeros, not None.
            assert not a.any(), name
            continue
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
    return fast


@pytest.mark.parametrize("spec", ZOO)
def test_every_zoo_spec_equals_the_reference_in_float64(spec):
    assert_equivalent(nestc.check(spec))


@pytest.mark.parametrize("spec", ["specs/deltanet.nest", "specs/titans.nest", "specs/hope.nest",
                                  "specs/gated_deltanet.nest", "specs/cms.nest"])
def test_float32_agrees_to_1e4_relative(spec):
    assert_equivalent(nestc.check(spec), dtype=torch.float32)


@pytest.mark.parametrize("path,count", [("specs/spaces/deltanet_space.nest", 6), ("specs/spaces/hope_space.nest", 3)])
def test_space_variants_equal_the_reference(path, count):
    search = space.load(path)
    rng = random.Random(7)
    for _ in range(count):
        result = analyze_source(SourceFile(path, search.freeze(search.sample(rng))))
        assert result.ok
        assert_equivalent(result.program, length=21, split=9)


# the model around the memory `mem` of the generated specs (doubled braces: a format template)
ONE_LAYER_MODEL = """
model {{
    vocab 9
    dim 8
    heads 2
    block = residual(rmsnorm |> mem)
}}
"""

LEVEL = """
level mem : {state} {{
    key = x |> proj |> l2norm
    value = {value}
    query = x |> proj |> l2norm
    lr = x |> proj |> sigmoid(max=0.5)
    retain = {retain}
    {fields}
}}
""" + ONE_LAYER_MODEL


@settings(max_examples=30, deadline=None, derandomize=True)
@given(
    state=st.sampled_from(["matrix", "vector", "mlp(depth=1)", "mlp(depth=2, expand=2)"]),
    objective=st.sampled_from(["dot", "l2", "lp(p=3)", "huber(delta=0.5)", "huber_token"]),
    optimizer=st.sampled_from(["gd", "momentum", "dgd", "dgd_momentum"]),
    every=st.sampled_from([1, 2, 4]),
    read=st.sampled_from(["before", "after"]),
    order=st.sampled_from(["grad_first", "decay_first"]),
    retain=st.sampled_from(["1.0", "0.9", "x |> proj |> sigmoid", "learned(init=0.8)"]),
    self_target=st.booleans(),
)
def test_random_small_specs_equal_the_reference(state, objective, optimizer, every, read, order, retain,
                                                 self_target):
    fields = f"objective {objective}\n    optimizer {optimizer}\n    every {every}\n    read {read}\n    order {order}"
    if self_target:  # a self-generated target needs the level read before its update
        read = "before"
        fields = fields.replace("read after", "read before")
    text = LEVEL.format(state=state, fields=fields, retain=retain,
                        value="x |> proj |> self" if self_target else "x |> proj")
    result = analyze_source(SourceFile("<random>", text))
    if not result.ok:  # e.g. dgd on a vector: the checker refuses, nothing to compare
        assert any(d.code in ("N0112", "N0109") for d in result.diagnostics)
        return
    assert_equivalent(result.program, length=11, split=5, diverged=lambda: assume(False))


DELTA_LEVEL = """
level mem : matrix {{
    key = x |> proj |> l2norm
    value = x |> proj
    query = x |> proj |> l2norm
    lr = x |> proj{lr} |> sigmoid
    retain = x |> proj{retain} |> sigmoid
    objective l2
    order {order}
    meta {meta}
    every 1
    {fields}
}}
""" + ONE_LAYER_MODEL
PER_CHANNEL = "(per=channel)"


@pytest.mark.parametrize("lr, retain, order, meta, fields", [
    ("", PER_CHANNEL, "decay_first", "full", ""),  # KDA
    (PER_CHANNEL, "", "grad_first", "full", ""),
    (PER_CHANNEL, PER_CHANNEL, "grad_first", "first_order", ""),
    (PER_CHANNEL, PER_CHANNEL, "decay_first", "stop", ""),
    # the generalised delta rule's fields
    ("", "", "decay_first", "full", "erase = x |> proj |> sigmoid"),
    ("", PER_CHANNEL, "decay_first", "full",
     "erase = x |> proj(per=channel) |> sigmoid\n    write = x |> proj(per=channel) |> sigmoid"),  # GDN-2
    (PER_CHANNEL, "", "grad_first", "full", "write = x |> proj |> sigmoid\n    optimizer gd(implicit=true)"),
    ("", "", "decay_first", "full", "substeps 2"),  # Gated DeltaProduct
    (PER_CHANNEL, PER_CHANNEL, "grad_first", "first_order",
     "substeps 3\n    erase = learned(init=0.7)\n    write = x |> proj(per=channel) |> sigmoid\n"
     "    optimizer gd(implicit=true)"),
    ("", "", "decay_first", "stop", "substeps 2\n    erase = learned(init=0.7, per=channel)\n    write = 0.5"),
])
def test_delta_form_equals_the_reference(lr, retain, order, meta, fields):
    """The delta form (planned, not the token loop) with per-head or per-key-channel lr and retain,
    the erase and write gates, the implicit step and several steps per token: the reads, the
    state and every parameter's gradient equal the reference's in float64, over two calls whose
    segments cut the 64-token segment at 20 and at 64."""
    text = DELTA_LEVEL.format(lr=lr, retain=retain, order=order, meta=meta, fields=fields)
    fast = assert_equivalent(nestc.check(text), length=70, split=20)
    assert fast.plans["mem"].kernel == "delta"


SOLVE_LEVEL = """
level mem : matrix {{
    key = x |> proj |> l2norm
    value = x |> proj
    query = x |> proj |> l2norm
    lr = x |> proj |> sigmoid
    retain = {retain}
    objective l2
    optimizer solve
    ridge = {ridge}
    meta {meta}
    every 1
}}
""" + ONE_LAYER_MODEL


@pytest.mark.parametrize("retain, ridge, meta", [
    ("x |> proj |> sigmoid", "exp(learned(init=0.0, per=channel))", "full"),  # MesaNet
    ("x |> proj |> sigmoid", "x |> proj(per=channel) |> softplus", "first_order"),  # a ridge per token
    ("0.9", "x |> proj |> softplus", "stop"),
    ("1.0", "0.5", "full"),
])
def test_gram_form_equals_the_reference(retain, ridge, meta):
    """Optimizer solve in the gram form (planned, not the token loop), with the ridge learned per
    channel, per token and head or channel, or a constant: the reads, the state (G and H) and
    every parameter's gradient equal the reference's in float64, over two calls whose segments cut
    the 64-token segment at 20 and at 64."""
    text = SOLVE_LEVEL.format(retain=retain, ridge=ridge, meta=meta)
    fast = assert_equivalent(nestc.check(text), length=70, split=20)
    assert fast.plans["mem"].kernel == "gram"


def test_the_generalised_delta_rule_read_before_says_why_it_steps_token_by_token():
    """No form reads before an every-token update; the other forms do not compute erase or substeps."""
    text = DELTA_LEVEL.format(lr="", retain="", order="grad_first", meta="full", fields="erase = 0.5\n    read before")
    with pytest.warns(compiled.CompileWarning) as warned:
        model = compiled.build(nestc.check(text))
    reason = model.plans["mem"].reason
    assert model.plans["mem"].kernel == "sequential"
    assert "the anchored form does not compute the generalised delta rule (erase)" in reason
    assert "the delta form has no `read before` for a memory updated every token" in reason
    assert reason in str(warned[0].message)


TRAJECTORY_LEVEL = """
level mem : {state} {{
    key = x |> proj |> l2norm
    value = x |> proj
    query = x |> proj |> l2norm
    lr = x |> proj{per} |> sigmoid(max=0.5)
    retain = x |> proj{per} |> sigmoid
    momentum = {momentum}
    objective {objective}
    optimizer {optimizer}
    output {output}
    every {every}
    read {read}
}}
""" + ONE_LAYER_MODEL


@settings(max_examples=30, deadline=None, derandomize=True)
@given(
    state=st.sampled_from(["matrix", "mlp(depth=2, expand=2)", "mlp(depth=2, expand=1, norm=layernorm)"]),
    objective=st.sampled_from(["l2", "lp(p=3)", "huber(delta=0.5)", "huber_token", "omega(window=3)",
                               "omega(window=2, base=dot)"]),
    optimizer=st.sampled_from(["gd", "momentum", "muon(steps=2)"]),
    output=st.sampled_from(["none", "softmax", "normalize(q=4)", "softmax(gradient=stored)",
                            "normalize(q=4, gradient=stored)"]),
    per=st.sampled_from(["", "(per=channel)"]),
    momentum=st.sampled_from(["0.9", "x |> proj(per=channel) |> sigmoid"]),
    every=st.sampled_from([2, 4]),
    read=st.sampled_from(["before", "after"]),
)
def test_trajectory_form_equals_the_reference(state, objective, optimizer, output, per, momentum, every, read):
    """Per-channel gates, output maps, omega windows and Muon (the `trajectory` form)."""
    text = TRAJECTORY_LEVEL.format(state=state, objective=objective, optimizer=optimizer, output=output, per=per,
                                   momentum=momentum if optimizer != "gd" else "", every=every, read=read)
    if optimizer == "gd":
        text = text.replace("    momentum = \n", "")
    result = analyze_source(SourceFile("<random>", text))
    assert result.ok, [d.message for d in result.diagnostics]
    with warnings.catch_warnings():  # a token-by-token fallback would warn: make it fail instead
        warnings.simplefilter("error", compiled.CompileWarning)
        assert_equivalent(result.program, length=13, split=6, diverged=lambda: assume(False))


MAC = """
level mem : {state} {{
    key = x |> proj |> conv(3) |> l2norm
    value = x |> proj
    query = x |> proj |> conv(3) |> l2norm
    lr = x |> proj |> sigmoid(max=0.5)
    retain = x |> proj |> sigmoid
    objective l2
    optimizer {optimizer}
    every {every}
    read {read}
    init meta
}}
level attn : cache(window={window}) {{
    key = x |> proj |> conv(2) |> rope
    query = x |> proj |> rope
}}
model {{
    vocab 11
    dim 8
    heads 2
    layers 2
    block = residual(rmsnorm |> mac(memory=mem, attention=attn, segment={segment}, persistent=2))
}}
"""


@pytest.mark.parametrize("every,window,segment", [(4, 0, 8), (2, 5, 6), (8, 0, 4)])
def test_memory_as_context_blocks_equal_the_reference(every, window, segment):
    """Several MAC windows (persistent tokens again at each), chunks inside them or spanning
    them, a sliding attention window, and convolutions on the interleaved cache entries."""
    program = _mac_program(every=every, window=window, segment=segment)
    with warnings.catch_warnings():
        warnings.simplefilter("error", compiled.CompileWarning)
        fast = assert_equivalent(program, length=29, split=11)
    assert fast.segment == math.gcd(every, segment)


def _mac_program(state="mlp(depth=2, expand=2)", optimizer="momentum", read="before", every=4, window=0, segment=8):
    text = MAC.format(state=state, optimizer=optimizer, read=read, every=every, window=window, segment=segment)
    return analyze_source(SourceFile("<mac>", text)).program


@pytest.mark.parametrize("memory,optimizer,read", [("matrix", "gd", "after"),  # the `delta` form
                                                   ("matrix", "gd", "before"),
                                                   ("mlp(depth=2, expand=2)", "momentum", "before")])
def test_a_memory_stepping_every_token_inside_mac_equals_the_reference_and_streams(memory, optimizer, read):
    """Each token's retrieval reads the memory as the previous token's step left it, and that step
    learned from the previous token's attention output: nothing in a MAC window is parallel."""
    program = _mac_program(state=memory, optimizer=optimizer, read=read, every=1, window=5, segment=8)
    fast = assert_equivalent(program, length=19, split=11, tolerance=(1e-12, 1e-12))
    tokens = torch.randint(0, fast.vocab, (2, 19), generator=torch.Generator().manual_seed(2))
    whole, whole_state = fast(tokens)
    pieces, state = [], None
    for piece in torch.split(tokens, [3, 7, 9], dim=1):
        logits, state = fast(piece, state)
        pieces.append(logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, rtol=1e-12, atol=1e-12)
    for a, b in zip(_tensors(state), _tensors(whole_state), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


MAC_LEVELS = """
level mem : {mem_state} {{
    key = x |> proj |> l2norm
    value = x |> proj
    query = x |> proj |> conv(2) |> l2norm
    lr = x |> proj |> sigmoid(max=0.5)
    retain = x |> proj{mem_retain_per} |> sigmoid
    optimizer {mem_optimizer}
    every {mem_every}
    read {mem_read}
    order {mem_order}
}}
level swa : cache(window={window})
"""

# the levels a random block may use besides its `mac` block's
UNIT_LEVELS = {
    "aux": """
level aux : {aux_state} {{
    key = x |> proj |> l2norm
    value = x |> proj
    query = x |> proj |> l2norm
    lr = x |> proj |> sigmoid(max=0.5)
    every {aux_every}
}}
""",
    "local": "level local : cache(window=3)\n",
    "ffn": "level ffn : mlp(expand=2, residual=false)\n",
}

BLOCK_MODEL = """
model {{
    vocab 9
    dim 8
    heads 2
    block = {block}
}}
"""

# how two blocks combine, and how one is wrapped
JOINS = ["{} |> {}", "parallel({}, {})", "parallel({}, {}, combine=sum)", "parallel({}, {}, combine=mean)",
         "gated({}, {})"]
WRAPS = ["{}", "residual({})", "residual(rmsnorm |> {})"]


@st.composite
def blocks(draw, units: list[str]) -> str:
    """A block expression that uses each unit once, joined by the combinators."""
    if len(units) == 1:
        block = units[0]
    else:
        cut = draw(st.integers(1, len(units) - 1))
        block = draw(st.sampled_from(JOINS)).format(draw(blocks(units[:cut])), draw(blocks(units[cut:])))
    return draw(st.sampled_from(WRAPS)).format(block)


@settings(max_examples=16, deadline=None, derandomize=True)
@given(
    mem_state=st.sampled_from(["matrix", "mlp(depth=2, expand=2)"]),
    mem_optimizer=st.sampled_from(["gd", "momentum"]),
    mem_every=st.sampled_from([1, 2, 4]),
    mem_read=st.sampled_from(["before", "after"]),
    mem_order=st.sampled_from(["grad_first", "decay_first"]),
    mem_retain_per=st.sampled_from(["", "(per=channel)"]),  # with decay_first: the sequential form at every C
    aux_state=st.sampled_from(["matrix", "mlp(depth=1)"]),
    aux_every=st.sampled_from([1, 2]),
    segment=st.sampled_from([4, 6]),
    window=st.sampled_from([0, 5]),
    units=st.lists(st.sampled_from(sorted(UNIT_LEVELS)), unique=True, max_size=2),
    data=st.data(),
)
def test_random_blocks_equal_the_reference(mem_state, mem_optimizer, mem_every, mem_read, mem_order, mem_retain_per,
                                           aux_state, aux_every, segment, window, units, data):
    """`mac`, `gated`, `parallel` and `residual` around memories updated every token or every C
    tokens (C need not divide the MAC segment)."""
    mac = f"mac(memory=mem, attention=swa, segment={segment}, persistent=2)"
    block = data.draw(blocks(data.draw(st.permutations([mac, *units]))))
    fields = dict(mem_state=mem_state, mem_optimizer=mem_optimizer, mem_every=mem_every, mem_read=mem_read,
                  mem_order=mem_order, mem_retain_per=mem_retain_per, aux_state=aux_state, aux_every=aux_every,
                  window=window, block=block)
    text = "".join(template.format(**fields) for template in
                   [MAC_LEVELS, *(UNIT_LEVELS[unit] for unit in units), BLOCK_MODEL])
    result = analyze_source(SourceFile("<blocks>", text))
    assert result.ok, [d.message for d in result.diagnostics]
    assert_equivalent(result.program, length=11, split=5, diverged=lambda: assume(False))


def test_a_mac_memory_stepping_every_token_says_the_whole_model_runs_token_by_token():
    program = _mac_program(state="matrix", optimizer="gd", read="after", every=1)
    with pytest.warns(compiled.CompileWarning, match=r"<mac>:2:7: the whole model runs token by token: the anchor "
                                                     r"of level `mem`, read by its `mac` block's retrieval, moves "
                                                     r"every token"):
        model = compiled.build(program)
    assert model.plans["mem"].kernel == "delta" and model.segment == 1


@pytest.mark.parametrize("spec", ["specs/transformer.nest", "specs/titans_mag.nest"])
def test_layer_by_layer_attention_in_blocks_equals_the_reference(spec, monkeypatch):
    """A call read layer by layer attends in blocks of queries; blocks smaller than the call and
    not aligned to it must not change anything."""
    monkeypatch.setattr(compiled, "ATTENTION_BLOCK", 6)
    fast = assert_equivalent(nestc.check(spec), length=23, split=9)
    assert fast.layer_by_layer


ATTENTION_MODEL = """
level attn : cache(window={window}) {{
    key = x |> {key}
    value = x |> {value}
    query = x |> {query}
    read {read}
}}
model {{
    vocab 7
    dim 16
    heads 2
    layers 2
    block = residual(rmsnorm |> attn) |> residual(rmsnorm |> ffn)
}}
level ffn : mlp(expand=2, residual=false)
"""


@pytest.mark.parametrize("window,read,key,value,query,paired", [
    (0, "after", "proj |> rope", "proj", "proj |> rope", True),  # pairs side by side, the causal kernel
    (0, "before", "proj |> rope", "proj", "proj |> rope", True),  # the first query reads nothing
    (3, "after", "proj |> rope", "proj |> silu", "proj |> rope", True),  # a window shorter than a block
    (40, "before", "proj", "proj", "proj", False),  # a window longer than the stream
    (0, "after", "proj(bias=true) |> rope", "proj(bias=true)", "proj(bias=true) |> rope", True),
    (5, "after", "proj |> rope", "proj", "proj(bias=true) |> rope", False),  # projections of two kinds
    (0, "after", "proj |> rope(base=100)", "proj", "proj |> rope", False),  # two bases
])
def test_attention_through_sdpa_equals_the_reference_from_an_empty_and_a_carried_cache(
        window, read, key, value, query, paired, monkeypatch):
    """The first call attends from an empty cache (one causal kernel where the window holds the
    call, else blocks with masks; keys and queries `proj |> rope` with their rotation pairs side
    by side), the second over the cache the first left (masks over cache and call), in blocks not
    aligned to the calls; logits, caches and every gradient equal the reference's, in float64
    and float32."""
    monkeypatch.setattr(compiled, "ATTENTION_BLOCK", 6)
    calls = []
    attention = torch.nn.functional.scaled_dot_product_attention

    def recorded(*args, **kwargs):
        calls.append(kwargs)
        return attention(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recorded)
    text = ATTENTION_MODEL.format(window=window, read=read, key=key, value=value, query=query)
    result = analyze_source(SourceFile("<attention>", text))
    assert result.ok, [d.message for d in result.diagnostics]
    for dtype in (torch.float64, torch.float32):
        fast = assert_equivalent(result.program, dtype=dtype, length=23, split=9)
    assert (rotary_pairs_base(fast.layers[0].levels["attn"]) is not None) == paired
    whole_first_call = window == 0 or window >= 9
    assert any(call.get("is_causal") for call in calls) == whole_first_call
    assert any(call.get("attn_mask") is not None for call in calls)  # the second call reads a cache


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_rope_on_side_by_side_pairs_is_the_reference_rope_reordered(dtype):
    """`rotate_pairs` on channels reordered so that each pair (i, i + d/2) is adjacent equals the
    reference's `rotate` reordered the same way: a complex product in float32 and float64, real
    arithmetic in bfloat16, which has no complex type."""
    from nestc.backends.pipelines import rotate

    x = torch.randn(2, 5, 3, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(dtype)
    side_by_side = torch.arange(8).view(2, 4).t().flatten()  # 0, 4, 1, 5, ...
    expected = rotate(x, (7 + torch.arange(5))[:, None], 500.0)[..., side_by_side]
    actual = rotate_pairs(x[..., side_by_side], 7, 500.0)
    assert actual.dtype == dtype
    # bfloat16 takes the reference's own arithmetic; a complex product may round differently
    tolerance = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 0.0}[dtype]
    torch.testing.assert_close(actual, expected, rtol=0, atol=tolerance)


def test_layer_by_layer_only_where_layers_are_independent_within_a_segment():
    expected = {"titans": True, "deltanet": True, "transformer": True, "atlas": True,
                "hope": False,        # continuum levels learn from the last layer's logits
                "cms": False,
                "titans_mac": False}  # the retrieval reads the memory's anchor of each chunk
    for name, layer_by_layer in expected.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", compiled.CompileWarning)
            assert compiled.build(nestc.check(f"specs/{name}.nest")).layer_by_layer == layer_by_layer, name


@pytest.mark.parametrize("name,norm", [("layernorm", lambda h: torch.nn.functional.layer_norm(h, h.shape[-1:])),
                                       ("rmsnorm", lambda h: torch.nn.functional.rms_norm(h, h.shape[-1:]))])
def test_norm_backward_by_hand_equals_autograd(name, norm):
    """The memory's inner gradient goes through its norm by a closed form; autograd is the oracle,
    for the values and for the outer level's derivative of them."""
    generator = torch.Generator().manual_seed(3)
    h = (torch.randn(3, 5, 16, generator=generator, dtype=torch.float64) * 4).requires_grad_()
    error = torch.randn(3, 5, 16, generator=generator, dtype=torch.float64, requires_grad=True)
    expected, = torch.autograd.grad(norm(h), h, error, create_graph=True)
    actual = layered.through_norm(name, error, h)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
    probe = torch.randn(3, 5, 16, generator=generator, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad((actual * probe).sum(), (h, error)),
                    torch.autograd.grad((expected * probe).sum(), (h, error))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_constructs_without_a_parallel_form_say_so_with_their_span():
    text = LEVEL.format(state="matrix", fields="objective l2\n    output softmax", retain="1.0",
                        value="x |> proj")
    program = analyze_source(SourceFile("memo.nest", text)).program
    with pytest.warns(compiled.CompileWarning, match=r"memo\.nest:2:7: level `mem` runs token by token: the "
                                                     r"trajectory form needs `every C > 1` \(with objective `l2` on "
                                                     r"state `matrix` the gradient depends on the state\)"):
        compiled.build(program)


def test_parallel_plans_cover_the_zoo_memories():
    """Which zoo memories run in parallel, so a regression to token-by-token shows up here."""
    expected = {"deltanet": "delta", "gated_deltanet": "delta", "kda": "delta", "gla": "trajectory",
                "linear_attention": "anchored",
                "retnet": "anchored", "titans": "layered", "ttt_linear": "layered", "ttt_mlp": "layered",
                "memora": "trajectory", "moneta": "trajectory", "yaad": "trajectory", "atlas": "trajectory"}
    for name, kernel in expected.items():
        with warnings.catch_warnings():
            warnings.simplefilter("error", compiled.CompileWarning)
            model = compiled.build(nestc.check(f"specs/{name}.nest"))
        memory = next(n for n, plan in model.plans.items() if plan.kernel not in ("module", "frozen"))
        assert model.plans[memory].kernel == kernel
    hope = compiled.build(nestc.check("specs/hope.nest"))
    assert {hope.plans[n].kernel for n in ("mk", "mv", "mlr", "mretain", "mem")} == {"layered"}
    assert hope.segment == 16


@pytest.mark.parametrize("body", [
    "objective dot\n    every 1",
    "objective l2\n    every 4\n    lr = x |> proj |> sigmoid",
    "objective l2\n    optimizer momentum\n    every 4\n    momentum = x |> proj(per=channel) |> sigmoid\n"
    "    lr = x |> proj(per=channel) |> sigmoid",
    "objective lp(3)\n    every 2\n    read before\n    lr = 0.05",
], ids=["dot-online", "l2-chunked", "momentum", "lp-read-before"])
def test_a_diagonal_memory_with_per_channel_gates_runs_in_the_anchored_form(body):
    """A vector state's channels are memories apart under an elementwise objective, so per-channel
    gates run in the anchored form as one-channel heads (forms/anchored.py), equal to the reference."""
    text = ("level mem : vector {\n    key = x |> proj\n    value = x |> proj\n    query = x |> proj\n"
            f"    retain = x |> proj(per=channel) |> sigmoid\n    {body}\n}}\n"
            "model {\n    vocab 16\n    dim 8\n    heads 2\n    block = residual(rmsnorm |> mem)\n}\n"
            "train {\n    context 16\n}\n")
    result = analyze_source(SourceFile("vector.nest", text))
    assert result.ok, [d.message for d in result.diagnostics]
    fast = assert_equivalent(result.program)
    assert fast.plans["mem"].kernel == "anchored"

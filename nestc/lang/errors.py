"""The error index: one page per diagnostic code, shown by `nestc explain CODE`."""

from __future__ import annotations

PAGES: dict[str, tuple[str, str]] = {
    # --- syntax ---------------------------------------------------------------------------------
    "N0001": ("unexpected token", """
The parser met a token that cannot stand at this place. The message names what it expected:
"a value" (a number, a name, a string, a call, a list), "a new line" (the end of a field), `}`
(the end of a body) and so on.

    level mem : matrix {
        every 16 16        # error: a field has one value
    }
"""),
    "N0002": ("unexpected end of input", """
The file ended in the middle of an item: usually a body `{ ... }`, a call `( ... )` or a list
`[ ... ]` that is never closed. The help line says which bracket is still open.
"""),
    "N0003": ("unterminated string", """
A string starts with `"` and must end with `"` on the same line.

    import "lib/titans.nest          # error
    import "lib/titans.nest"         # ok
"""),
    "N0004": ("not the pipeline operator", """
Stages of a pipeline are joined with `|>`. `->`, `>>` and `|` are not operators of the language.

    key = x -> proj -> silu          # error
    key = x |> proj |> silu          # ok
"""),
    "N0005": ("`:` where `=` or a space belongs", """
Named arguments are written `name=value`; fields are written `name value` (settings) or
`name = value` (dataflow). `:` only separates a level's name from its state.

    state : mlp(depth: 2)            # error
    level mem : mlp(depth=2)         # ok
    dim: 128                         # error
    dim 128                          # ok
"""),
    "N0006": ("a level without a state", """
Every level declares what its state is: `matrix`, `vector`, `mlp(...)` or `cache(...)`.

    level mem { every 16 }           # error
    level mem : mlp(depth=2) { every 16 }
"""),
    "N0007": ("`//` comment", """
Comments start with `#` and run to the end of the line.
"""),
    "N0008": ("not a keyword", """
Top-level items start with `import`, `const`, `level`, `block` or a section name (`model`,
`train`). Words from other languages (`let`, `def`, `layer`, `include` ...) are not keywords,
and a misspelt keyword (`levle`, `improt`, `extnds`) is named with the keyword it is closest to.

    let D = 64                       # error
    const D = 64                     # ok
"""),
    "N0009": ("unquoted import path", """
Import paths are strings, relative to the importing file.

    import lib/titans.nest           # error
    import "lib/titans.nest"         # ok
"""),
    "N0010": ("fields not separated", """
Fields end at the end of a line; to put several on one line, separate them with `;`. Commas
separate arguments of a call, not fields.

    model { vocab 256, dim 128 }     # error
    model { vocab 256; dim 128 }     # ok
"""),
    "N0011": ("`==` or `:=` for assignment", """
Dataflow fields are assigned with a single `=`: `key = x |> proj`.
"""),
    "N0012": ("unclosed body", """
A body opened with `{` must be closed with `}`. The parser notices a missing `}` only where
something that is no field follows, often the next item, lines later, or the end of the file; the
error stands at the `{` that is never closed and names the place where the parser stopped. It is
given when adding the `}` before the first line indented no deeper than the `{`'s line (the next
item) lets the parser get further.
"""),
    "N0013": ("unmatched `}`", """
This `}` closes no body. Remove it, or add the `{` it was meant to close.
"""),
    "N0014": ("unclosed parenthesis", """
A call's arguments end with `)`, a list's items with `]`. Inside `( )` and `[ ]` new lines are
allowed, so the parser only notices the missing `)` where the next field begins; the error stands
at the `(` or `[` that is never closed and names that place.
"""),
    "N0015": ("missing value", """
Every field except a flag (`frozen`) needs a value.

    every                            # error
    every 16                         # ok
"""),
    "N0016": ("nested too deeply", """
An expression may nest at most 200 levels of the syntax tree: about 100 calls inside each other,
or 200 operators chained (`|>`, `+`). Every stage of the compiler walks expressions recursively,
so a deeper one is refused where it gets too deep. Name an inner part instead:

    block inner = residual(rmsnorm |> mixer)
    block = residual(inner) |> residual(inner2)
"""),
    # --- files ------------------------------------------------------------------------------------
    "N0100": ("cannot read file", """
The spec file named on the command line does not exist, is not readable, or is not UTF-8 text.
"""),
    "N0115": ("bad import", """
An imported file could not be read, does not end in `.nest`, or imports the file that imports
it (an import cycle). Import paths are relative to the importing file:

    # in specs/hope.nest
    import "lib/hope.nest"           # reads specs/lib/hope.nest
"""),
    # --- names ------------------------------------------------------------------------------------
    "N0101": ("unknown name", """
A name is not defined: not a constant, level or block of this file or its imports, and not a
built-in (a state, objective, optimizer, stage, block, value). The help line suggests the closest
known name of the right kind.

    block = residual(rmsnorm |> mixr)     # error: did you mean `mixer`?
"""),
    "N0102": ("defined twice", """
Constants, levels and blocks share one namespace, across the file and everything it imports.
Each name is defined once; to vary an imported level, extend it under a new name:

    level mem2 extends mem { every 64 }
"""),
    "N0103": ("unknown field or section", """
The field does not exist in this body (or the section name is unknown). Level fields: key,
value, query, lr, retain, momentum, threshold, gamma, objective, optimizer, order, output, every,
frozen, read, init, meta, heads. Model fields: vocab, dim, heads, layers, block, norm, tie_embeddings.
Train fields: optimizer, schedule, context, batch, steps, clip, seed, checkpoint_every, checkpoint_minutes,
processes.
"""),
    "N0104": ("unknown argument", """
The call has a named argument its operator does not take. `docs/language.md` lists every
operator's arguments.

    mlp(dept=2)                      # error: did you mean `depth`?
"""),
    "N0105": ("wrong kind of value", """
The value has the wrong type for its place: a name where a number is needed, a level where a
block is needed, a float where an integer is needed, and so on.

    heads 4.5                        # error: an integer
    layers = mixer                   # error: `mixer` is a level, layers must be a number
"""),
    "N0106": ("value out of range", """
The number is outside the range its field allows (for example a depth of 0, a negative window,
a beta above 1).
"""),
    "N0107": ("missing field or argument", """
A required field or argument is absent. The model needs `vocab`, `dim` and `block` (unless
`layers` lists each layer's block); a list of layers needs at least one;
`pretrained(source=LEVEL)` needs its source; `parallel` needs at least two branches.
"""),
    "N0108": ("too many arguments", """
The call has more positional arguments than its operator takes, or arguments where none are taken
(`rmsnorm(4)`).
"""),
    "N0116": ("given twice", """
A field or argument appears twice in the same body or call, a level is both `frozen` and
updated `every ...`, or the model gives both `block` and a list of the layers' blocks. Keep one.
"""),
    "N0123": ("reserved name", """
Built-in names cannot be redefined: `x`, `self`, `true`, `false`, pipeline stages (`proj`,
`conv`, ...), block combinators (`residual`, `parallel`, ...), states and search functions.
"""),
    # --- levels -----------------------------------------------------------------------------------
    "N0109": ("generation cycle that cannot be executed", """
Levels can generate each other's inputs (self-modifying Titans: `key = x |> mk`). A cycle of
generation is executable only when every level on it is read at its state *before* the update
at token t: otherwise the key at t needs the state after t, which needs the key at t.

    level a : mlp { key = x |> b; read after }      # error: a and b generate each other
    level b : mlp { key = x |> a; read before }
    # fix: `read before` on `a` too (this is what Hope does)
"""),
    "N0110": ("chunk size does not divide the training context", """
`every C` splits each training sequence into chunks of C tokens (the gradient anchor of
SEMANTICS.md section 4). C must divide `train { context }` so that every chunk is whole and the
compiled backend can reshape time into (context / C, C).

    every 24          # error with context 256
    every 16          # ok
"""),
    "N0111": ("objective not defined for this state", """
Some objectives need structure a state lacks: `omega` sums over a window of pairs and needs a
matrix or mlp state; a `cache` level (softmax attention) has no objective at all, its update is
the closed form "append (k, v)".
"""),
    "N0112": ("optimizer not defined for this state", """
`dgd` (delta gradient descent), `dgd_momentum` and `muon` act on the linear maps of a `matrix`
or `mlp` state; a `vector` state has none. Levels trained on the task loss (`objective task`) take
`gd` or `momentum`: dgd needs (key, value) pairs those levels do not have. `solve` (MesaNet's
exact solve) is defined for a `matrix` state with `objective l2` only, updated `every 1` and read
after, with no output map, no `order decay_first` (it takes no gradient) and one lr and one retain
per head (they weight and decay whole pairs).

    level m : matrix { objective l2; optimizer solve; every 16 }    # error: solve takes every token
"""),
    "N0113": ("read after with a rule that has no such form", """
A level trained on the model's own loss (`objective task`, a continuum-memory level) cannot be
read after its update: the update at token t needs the loss at t, which needs the level's output
at t. Such levels always read before their update; remove `read after`.
"""),
    "N0114": ("search-space value where a fixed one is required", """
`choice`, `range` and `loguniform` may stand wherever a literal may, except where the value must
be known before any variant exists: the vocabulary size (set by the data), import paths, a
choice's `name`, and the arguments of search functions themselves.

    vocab choice(256, 512)           # error
    dim choice(64, 128)              # ok
"""),
    "N0117": ("field has no meaning for this level", """
The field is legal in general but not for this level: an objective, an optimizer, `every` or
any gate but `retain` on a `cache` level, or a per-channel `retain` there (it biases each head's
logits: one value per head); key/value/query, `output_norm` or `output_gate` on a level trained
on the task loss (a feed-forward block has no heads' read-out); a `momentum` gate without
optimizer `momentum` or `muon`; a `gamma` gate without objective `omega`, a `threshold` gate
without objective `huber_token`, or a per-channel `threshold` (it is one value per head); an
output norm or gate on the memory of a `mac` block, or those or `retain` on its attention;
`normalize` on a level that is not a matrix memory with objective `dot` updated in the sequence; `erase`,
`write`, `write_key`, `substeps` or `gd(implicit=true)` on a level that is not the online delta rule (a
`matrix` state, objective `l2`, optimizer `gd`, `every 1`, no output map), or `write_key` with
`substeps`, `gd(implicit=true)` or a `meta` other than `full`; on an optimizer level
(docs/language.md §5.10) any field but `value`, `key`, `objective`, `lr`, `retain` (and, for a
memory of rows, `query` and `init`), a per-channel gate, or `every` in tokens; `update` with an
optimizer other than `gd` or `dgd`, with the delta rule's fields or with a per-channel `lr`.

    level m : matrix { substeps 2; every 16 }    # error: substeps are steps of the online rule
"""),
    "N0118": ("heads do not divide the width", """
The model width `dim` is split evenly across heads: `dim` must be a multiple of `heads` (for the
model and for any level that sets its own `heads`).
"""),
    "N0119": ("invalid search-space value", """
A `choice` needs at least one option and all options of one kind; a `range` needs low < high and
a positive step (integers for integer fields); `loguniform` needs 0 < low < high and a real-valued
field. Arithmetic may combine a choice with a number (`D * 4`), not two search values.
"""),
    "N0120": ("pipeline must start with x", """
A key, value, query or data-dependent gate is a pipeline that starts at the level's input `x`:

    key = proj |> silu               # error
    key = x |> proj |> silu          # ok
"""),
    "N0121": ("defined in terms of itself", """
A constant, block or `extends` chain refers back to itself, so it has no value; or an optimizer
level reads itself through its value or key (directly or through the optimizer levels it reads),
so it has nothing to step after.
"""),
    "N0122": ("level used twice", """
Each use of a level in the model's block would share one state between two places. Define a
copy under a new name: `level mixer_2 extends mixer`.
"""),
    "N0124": ("bad pretrained source", """
`init pretrained(source=L)` copies the parameters of level L: L must be another level with the
same state.
"""),
    "N0125": ("unexpected unit", """
Only `every` takes a unit: `every 16` (tokens, the default), `every 16 tokens`, `every 4 steps`
(outer-optimizer steps).
"""),
    "N0126": ("not implemented yet", """
The language has a name for this, but no backend builds it yet, so the spec is refused instead
of being run as something else. `init nested` (nested CMS, NL eq. 72: M_0 learned by the next
slower level and reset each time that level moves) used to train silently as `init meta`.

    init nested                      # error: not implemented yet
    init meta                        # ok: M_0 is learned by the outer level
"""),
    # --- warnings ---------------------------------------------------------------------------------
    "N0201": ("unused level (warning)", """
The level is defined in this file but neither used by the model's block nor generating another
level's inputs. Library files without a `model` section get no such warning.
"""),
    "N0202": ("unused binding (warning)", """
A level's `let NAME = ...` is named by none of its gates or other bindings: its projection would
be trained for nothing.

    let dt = x |> proj |> softplus
    retain = exp(-dt)                # uses it
"""),
}


def codes() -> list[str]:
    return sorted(PAGES)


def page(code: str) -> str | None:
    code = code.strip().upper()
    if code.isdigit():
        code = f"N{int(code):04d}"
    if code not in PAGES:
        return None
    title, body = PAGES[code]
    return f"{code}: {title}\n{body.rstrip()}\n"

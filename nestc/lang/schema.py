"""The vocabulary of the language: every state, objective, optimizer, pipeline stage, block
combinator, section field and their arguments, with types, defaults and ranges.

The grammar only knows names, calls and pipelines; this table gives them meaning. Semantic
analysis checks a spec against it, the formatter and the docs read it, and an unknown word is
answered with the closest entry of the right table.
"""

from __future__ import annotations

import math

from nestc import rules
from nestc.lang.operators import REQUIRED, OpSpec, Param, op_spec  # noqa: F401  (the tables' vocabulary)
from nestc.rules.states import ACTIVATIONS, NORMS  # noqa: F401  (shared with the state specs)

# The rules of memory levels are registry entries (nestc/rules/): these tables list their specs.
STATES = {name: rule.spec for name, rule in rules.STATES.items()}
OBJECTIVES = {name: rule.spec for name, rule in rules.OBJECTIVES.items()}
INNER_OPTIMIZERS = {name: rule.spec for name, rule in rules.OPTIMIZERS.items()}
OUTPUTS = {name: rule.spec for name, rule in rules.OUTPUTS.items()}

INITS = {
    s.name: s
    for s in (
        op_spec("init", "zero", doc="the state starts at zero every sequence"),
        op_spec("init", "meta", doc="the initial state is a parameter learned by the outer level"),
        op_spec("init", "nested", doc="the initial state is learned by the next slower level and reset when it moves "
                                      "(not implemented yet: the checker refuses it, N0126)"),
        op_spec("init", "pretrained", Param("source", "level", REQUIRED, fixed=True),
            doc="the initial state is copied from another level's parameters (ad-hoc level stacking)"),
    )
}

# Pipeline stages. `contexts` says where a stage may stand: in a key/value/query source, in a gate.
STAGES = {
    s.name: s
    for s in (
        op_spec("stage", "proj",
            Param("dim", "int", 0, minimum=0, doc="output width; 0 = the level's width"),
            Param("per", "enum", "head", choices=("head", "channel"), doc="gates: one value per head or per channel"),
            Param("bias", "bias", False, doc="true: a learned bias; a number (or one per output): "
                                                   "a learned bias initialised to it"),
            doc="a linear projection, trained by the outer level"),
        op_spec("stage", "conv", Param("window", "int", 4, minimum=1), doc="short causal depthwise convolution"),
        op_spec("stage", "silu"), op_spec("stage", "gelu"), op_spec("stage", "relu"), op_spec("stage", "tanh"),
        op_spec("stage", "identity"),
        op_spec("stage", "sigmoid", Param("max", "number", 1.0, minimum=0, exclusive_minimum=True),
            doc="max * sigmoid(x)"),
        op_spec("stage", "softplus"),
        op_spec("stage", "exp"),
        op_spec("stage", "scale", Param("factor", "number", REQUIRED), doc="multiply by a constant"),
        op_spec("stage", "l2norm", doc="L2 normalisation over each head's channels"),
        op_spec("stage", "layernorm"), op_spec("stage", "rmsnorm"),
        op_spec("stage", "elu1", doc="feature map elu(x) + 1"),
        op_spec("stage", "poly", Param("degree", "int", 2, minimum=1),
            doc="elementwise polynomial sum_i a_i x^i of each channel, learnable a_i (initially 1/i!); "
                "keeps the width (ATLAS's phi_p is `tensor_poly`)"),
        op_spec("stage", "tensor_poly", Param("degree", "int", 2, minimum=1),
            doc="ATLAS's polynomial feature map phi_p: every monomial x^b of degree |b| <= p of each head's d "
                "channels, weighted 1/sqrt(b!), so that phi(x).phi(y) = sum_{i<=p} (x.y)^i / i!; "
                "C(d + p, p) channels per head"),
        op_spec("stage", "taylor",
            doc="Based's 2nd-order Taylor feature map [1, x / d^(1/4), x (x) x / (sqrt(2) sqrt(d))] of each "
                "head's d channels, so that phi(q).phi(k) = 1 + q.k / sqrt(d) + (q.k)^2 / (2 d); "
                "1 + d + d^2 channels per head"),
        op_spec("stage", "square",
            doc="ReBased's feature map vec(x x^T) / sqrt(d) of each head's d channels, so that "
                "phi(q).phi(k) = (q.k)^2 / d; d^2 channels per head"),
        op_spec("stage", "rope", Param("base", "number", 10000.0, minimum=1),
            doc="rotary position embedding of each head's channels (queries and keys)"),
    )
}



# The feature maps that widen each head: channels per head out, from the d channels in and the
# stage's arguments (every other stage keeps the width but `proj`, which chooses its own).
FEATURE_WIDTHS = {
    "tensor_poly": lambda d, args: math.comb(d + args["degree"], args["degree"]),  # monomials of degree <= p
    "taylor": lambda d, args: 1 + d + d * d,
    "square": lambda d, args: d * d,
}


GATE_SOURCES = {
    "learned": op_spec("gate", "learned", Param("init", "numbers", 0.5, doc="initial value, or one per head"),
                   Param("per", "enum", "head", choices=("head", "channel")),
                   doc="a learned scalar (per head or channel), trained by the outer level"),
}

BLOCKS = {
    s.name: s
    for s in (
        op_spec("block", "residual", Param("body", "block", REQUIRED), doc="x + body(x)"),
        op_spec("block", "parallel", Param("combine", "enum", "learned", choices=("learned", "sum", "mean")),
            variadic="block", doc="branches on the same input, combined by a learned weighted sum"),
        op_spec("block", "gated", Param("main", "block", REQUIRED), Param("gate", "block", REQUIRED),
            doc="main(x) * sigmoid(norm(gate(x))) (Titans MAG)"),
        op_spec("block", "mac",
            Param("memory", "level", REQUIRED), Param("attention", "level", REQUIRED),
            Param("segment", "int", 64, minimum=1), Param("persistent", "int", 0, minimum=0),
            doc="memory as context: persistent tokens, the memory's read-out and the segment attended together"),
        op_spec("block", "rmsnorm"), op_spec("block", "layernorm"), op_spec("block", "identity"),
    )
}

SEARCH = {
    s.name: s
    for s in (
        op_spec("search", "choice", Param("name", "string", None, fixed=True), variadic="any",
            doc="one of the options; `name` ties all choices with that name to one value"),
        op_spec("search", "range", Param("low", "number", REQUIRED, fixed=True), Param("high", "number", REQUIRED, fixed=True),
            Param("step", "number", 1, fixed=True), Param("name", "string", None, fixed=True),
            doc="low, low+step, ... up to high inclusive"),
        op_spec("search", "loguniform", Param("low", "number", REQUIRED, fixed=True),
            Param("high", "number", REQUIRED, fixed=True), Param("name", "string", None, fixed=True),
            doc="a number drawn log-uniformly from [low, high]"),
    )
}

OUTER_OPTIMIZERS = {
    s.name: s
    for s in (
        op_spec("outer_optimizer", "gd", Param("lr", "number", 1e-3, minimum=0, exclusive_minimum=True),
            doc="W = W - lr g, or W = W + update with the train section's `update` (optimizer levels, SEMANTICS §8)"),
        op_spec("outer_optimizer", "adamw", Param("lr", "number", 1e-3, minimum=0, exclusive_minimum=True),
            Param("beta1", "number", 0.9, minimum=0, maximum=1), Param("beta2", "number", 0.95, minimum=0, maximum=1),
            Param("weight_decay", "number", 0.1, minimum=0), Param("eps", "number", 1e-8, minimum=0)),
        op_spec("outer_optimizer", "sgd", Param("lr", "number", 0.1, minimum=0, exclusive_minimum=True),
            Param("momentum", "number", 0.9, minimum=0, maximum=1), Param("nesterov", "bool", False),
            Param("weight_decay", "number", 0.0, minimum=0)),
        op_spec("outer_optimizer", "muon", Param("lr", "number", 0.02, minimum=0, exclusive_minimum=True),
            Param("momentum", "number", 0.95, minimum=0, maximum=1), Param("ns_steps", "int", 5, minimum=1),
            Param("adam_lr", "number", 1e-3, minimum=0, exclusive_minimum=True, doc="for embeddings, gains, biases"),
            Param("weight_decay", "number", 0.0, minimum=0)),
        op_spec("outer_optimizer", "m3", Param("lr", "number", 1e-3, minimum=0, exclusive_minimum=True),
            Param("beta1", "number", 0.9, minimum=0, maximum=1), Param("beta2", "number", 0.999, minimum=0, maximum=1),
            Param("beta3", "number", 0.5, minimum=0, maximum=1, doc="weight of the slow momentum's gradient sum"),
            Param("alpha", "number", 1.0, minimum=0, doc="weight of the slow momentum in the update"),
            Param("every", "int", 16, minimum=1, doc="the slow momentum is updated every N steps"),
            Param("ns_steps", "int", 5, minimum=1), Param("eps", "number", 1e-8, minimum=0),
            doc="Multi-scale Momentum Muon (Nested Learning, Alg. 1)"),
    )
}

# The outer optimizer whose step -lr * grad the train section's `update` replaces (SEMANTICS §8).
OUTER_TAKES_UPDATE = "gd"

SCHEDULES = {
    s.name: s
    for s in (
        op_spec("schedule", "constant", Param("warmup", "int", 0, minimum=0)),
        op_spec("schedule", "cosine", Param("warmup", "int", 0, minimum=0),
            Param("min_lr", "number", 0.1, minimum=0, maximum=1, doc="final lr as a fraction of the peak")),
        op_spec("schedule", "linear", Param("warmup", "int", 0, minimum=0)),
    )
}

OP_TABLES = {
    "state": STATES, "objective": OBJECTIVES, "optimizer": INNER_OPTIMIZERS, "output": OUTPUTS,
    "init": INITS, "stage": STAGES, "block": BLOCKS, "outer_optimizer": OUTER_OPTIMIZERS,
    "schedule": SCHEDULES,
}

KIND_WORDS = {
    "state": "state", "objective": "objective", "optimizer": "inner optimizer", "output": "output map",
    "init": "initial state", "stage": "pipeline stage", "block": "block", "outer_optimizer": "training optimizer",
    "schedule": "schedule", "source": "input pipeline", "gate": "gate", "frequency": "frequency",
    "int": "integer", "number": "number", "bool": "boolean", "string": "string", "enum": "name",
    "level": "level name", "list": "list of numbers",
}

LEVEL_FIELDS = {
    p.name: p
    for p in (
        Param("key", "source", None, doc="where the keys come from"),
        Param("value", "source", None, doc="where the values come from"),
        Param("query", "source", None, doc="where the queries come from"),
        Param("lr", "gate", None, doc="inner learning rate"),
        Param("retain", "gate", None, doc="keep factor of the old state (1 = no forgetting)"),
        Param("momentum", "gate", None, doc="decay of the inner momentum"),
        # the generalised delta rule's (SEMANTICS §3): R = write * v - M' (erase * k)
        Param("erase", "gate", None, doc="scales the key at which the delta rule reads the memory for its residual"),
        Param("write", "gate", None, doc="scales the value the delta rule writes (per head or per value channel)"),
        # RWKV-7's (SEMANTICS §3): M_t = M' - (M' e) (lr * k)^T + u write_key^T, the write's own key
        Param("write_key", "source", None,
              doc="the key the delta rule writes the value along, apart from the erase side lr * key (RWKV-7's "
                  "k~): a pipeline from x, d_k per head"),
        # the gates that only an objective reads (omega's gamma, huber_token's threshold)
        *(Param(role, "gate", None, doc=gate.doc) for role, gate in rules.OBJECTIVE_GATES.items()),
        # the gates that only an optimizer reads (solve's ridge)
        *(Param(role, "gate", None, doc=gate.doc) for role, gate in rules.OPTIMIZER_GATES.items()),
        Param("objective", "objective", None),
        Param("optimizer", "optimizer", "gd"),
        Param("order", "enum", "grad_first", choices=("grad_first", "decay_first"),
              doc="take the gradient at the undecayed state (Titans) or after decaying it (Gated DeltaNet)"),
        Param("output", "output", "none"),
        Param("every", "frequency", None, doc="update period: `every N` tokens, `every N steps`"),
        Param("frozen", "bool", False, doc="never updated inside a sequence"),
        Param("read", "enum", "after", choices=("before", "after")),
        Param("normalize", "bool", False,
              doc="divide each read by the memory's read of a value channel held at 1: y = M q / (z.q + 1e-6), "
                  "z updated as M is with every value 1 (normalised linear attention); a matrix memory with "
                  "objective dot"),
        Param("init", "init", None),
        Param("meta", "enum", None, choices=("full", "first_order", "stop"),
              doc="how outer gradients flow through the level's in-sequence updates"),
        Param("heads", "int", None, minimum=1),
        # The read-out o = norm(y) * gate(x) before the level's output projection (GDN, RetNet,
        # FoX-Pro): each head's read normalised, then multiplied by a pipeline of the level's input.
        Param("output_norm", "enum", None, choices=NORMS,
              doc="normalisation of each head's read-out, with a learned gain (GDN, RetNet)"),
        Param("output_gate", "source", None,
              doc="multiplies the read-out, channel by channel: a pipeline from x (`x |> proj |> silu`)"),
        Param("update", "update", None,
              doc="the step the retained weight gains each token, written with optimizer levels (`update = mom`); "
                  "default -lr * grad"),
        Param("substeps", "int", 1, minimum=1,
              doc="delta-rule steps per token, each with its own key, value, lr, erase and write (DeltaProduct)"),
    )
}

MODEL_FIELDS = {
    p.name: p
    for p in (
        Param("vocab", "int", REQUIRED, minimum=2, fixed=True),
        Param("dim", "int", REQUIRED, minimum=1),
        Param("heads", "int", 1, minimum=1),
        Param("layers", "layers", 1, minimum=1,
              doc="how many times `block` is repeated, or a list with each layer's block (`[a, a, b] * 2`)"),
        Param("block", "block", None, doc="the block of every layer (required unless `layers` lists them)"),
        Param("norm", "enum", "rmsnorm", choices=NORMS, doc="the final normalisation before the LM head"),
        Param("tie_embeddings", "bool", True),
    )
}

TRAIN_FIELDS = {
    p.name: p
    for p in (
        Param("optimizer", "outer_optimizer", "adamw"),
        Param("schedule", "schedule", "cosine"),
        Param("context", "int", 256, minimum=2, maximum=1 << 24,
              doc="tokens per training window: a token and the next to predict"),
        Param("batch", "int", 8, minimum=1),
        Param("steps", "int", 1000, minimum=1),
        Param("clip", "number", 1.0, minimum=0),
        Param("seed", "int", 0, minimum=0, maximum=2**32 - 1),
        Param("checkpoint_every", "int", 10, minimum=0,
              doc="steps between checkpoints (0: none by step count); not part of the variant (ir.RUN_ONLY_TRAIN_FIELDS)"),
        Param("checkpoint_minutes", "number", 10, minimum=0,
              doc="minutes between checkpoints (0: none by time); not part of the variant"),
        Param("processes", "int", 1, minimum=1, maximum=1024,
              doc="data-parallel processes `nestc run` starts, the batch split among them; not part of the "
                  "variant (the trained weights equal one process's)"),
        Param("update", "outer_update", None,
              doc="with `optimizer gd`: what each parameter gains each step, written with optimizer levels "
                  "(`update = adamw_update`); default -lr * grad"),
        Param("matrix_update", "outer_update", None,
              doc="with `optimizer gd`: the update of the weight matrices (2-D parameters but the embeddings), "
                  "which `update` then leaves to the others (Muon, M3)"),
    )
}

SECTIONS = {"model": MODEL_FIELDS, "train": TRAIN_FIELDS}

# Names with a fixed meaning inside expressions.
INPUT_NAME = "x"
SELF_NAME = "self"
BOOLEANS = {"true": True, "false": False}
FREQUENCY_UNITS = ("tokens", "steps")

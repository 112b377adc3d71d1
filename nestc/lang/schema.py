"""The vocabulary of the language: every state, objective, optimizer, pipeline stage, block
combinator, section field and their arguments, with types, defaults and ranges.

The grammar only knows names, calls and pipelines; this table gives them meaning. Semantic
analysis checks a spec against it, the formatter and the docs read it, and an unknown word is
answered with the closest entry of the right table.
"""

from __future__ import annotations

from dataclasses import dataclass

REQUIRED = object()  # marks a parameter without default


@dataclass(frozen=True, slots=True)
class Param:
    """One argument of an operator or one field of a section.

    `type` is one of: int, number, bool, string, enum (value in `choices`), level (the name of a
    level), list (of numbers), or a *kind* of operator ("objective", "stage", ...), or one of the
    structured kinds: "source" (a key/value/query pipeline), "gate", "block", "frequency".
    """

    name: str
    type: str
    default: object = REQUIRED
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    exclusive_minimum: bool = False
    fixed: bool = False  # True where a search-space value is not allowed
    doc: str = ""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


@dataclass(frozen=True, slots=True)
class OpSpec:
    name: str
    kind: str
    params: tuple[Param, ...] = ()
    variadic: str | None = None  # type of extra positional arguments (parallel(...), choice(...))
    doc: str = ""

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)


def _op(kind: str, name: str, *params: Param, variadic: str | None = None, doc: str = "") -> OpSpec:
    return OpSpec(name=name, kind=kind, params=tuple(params), variadic=variadic, doc=doc)


ACTIVATIONS = ("silu", "gelu", "relu", "tanh", "identity")
NORMS = ("none", "layernorm", "rmsnorm")

STATES = {
    s.name: s
    for s in (
        _op("state", "matrix", doc="a d_v x d_k matrix per head: y = M q"),
        _op("state", "vector", doc="a diagonal memory per head: y = m * q (elementwise)"),
        _op(
            "state", "mlp",
            Param("depth", "int", 2, minimum=1, doc="number of linear layers"),
            Param("expand", "number", 4, minimum=0, exclusive_minimum=True, doc="hidden width / input width"),
            Param("act", "enum", "gelu", choices=ACTIVATIONS, doc="activation between layers"),
            Param("residual", "bool", True, doc="M(x) = x + f(x)"),
            Param("norm", "enum", "none", choices=NORMS, doc="normalisation of f(x) before the residual"),
            doc="a multi-layer perceptron, M(x) = x + norm(W1 act(W2 x)) for depth 2",
        ),
        _op(
            "state", "cache",
            Param("window", "int", 0, minimum=0, doc="keep the last N pairs; 0 keeps all (global attention)"),
            doc="the non-parametric KV cache read by softmax attention",
        ),
    )
}

OBJECTIVES = {
    s.name: s
    for s in (
        _op("objective", "dot", doc="l = -<M(k), v> (Hebbian; linear attention)"),
        _op("objective", "l2", doc="l = 1/2 ||M(k) - v||^2 (the delta rule under gd)"),
        _op("objective", "lp", Param("p", "number", 3, minimum=1), doc="l = ||M(k) - v||_p^p (MIRAS Moneta)"),
        _op("objective", "huber", Param("delta", "number", 1.0, minimum=0, exclusive_minimum=True),
            doc="Huber loss of M(k) - v (MIRAS Yaad)"),
        _op("objective", "omega",
            Param("window", "int", 4, minimum=1, doc="number of recent pairs in the objective"),
            Param("base", "enum", "l2", choices=("l2", "dot"), doc="per-pair loss"),
            doc="sum of the base loss over the last `window` pairs, weighted by the gamma gate (ATLAS)"),
        _op("objective", "task", doc="the model's own training loss (continuum memory levels)"),
    )
}

INNER_OPTIMIZERS = {
    s.name: s
    for s in (
        _op("optimizer", "gd", doc="M = retain * M - lr * g"),
        _op("optimizer", "momentum", doc="S = momentum * S - lr * g; M = retain * M + S (Titans)"),
        _op("optimizer", "dgd", doc="delta gradient descent: W = W (retain I - lr x x^T) - lr dL/dy x^T"),
        _op("optimizer", "muon", Param("steps", "int", 5, minimum=1, doc="Newton-Schulz iterations"),
            doc="momentum, then Newton-Schulz orthogonalisation of the update (ATLAS)"),
    )
}

OUTPUTS = {
    s.name: s
    for s in (
        _op("output", "none", doc="no output map"),
        _op("output", "normalize", Param("q", "number", 4, minimum=1),
            doc="l_q normalisation of the state after each update (MIRAS Moneta)"),
        _op("output", "softmax", doc="softmax renormalisation of the state (MIRAS Memora)"),
    )
}

INITS = {
    s.name: s
    for s in (
        _op("init", "zero", doc="the state starts at zero every sequence"),
        _op("init", "meta", doc="the initial state is a parameter learned by the outer level"),
        _op("init", "nested", doc="the initial state is learned by the next slower level and reset when it moves"),
        _op("init", "pretrained", Param("source", "level", REQUIRED, fixed=True),
            doc="the initial state is copied from another level's parameters (ad-hoc level stacking)"),
    )
}

# Pipeline stages. `contexts` says where a stage may stand: in a key/value/query source, in a gate.
STAGES = {
    s.name: s
    for s in (
        _op("stage", "proj",
            Param("dim", "int", 0, minimum=0, doc="output width; 0 = the level's width"),
            Param("per", "enum", "head", choices=("head", "channel"), doc="gates: one value per head or per channel"),
            Param("bias", "bool", False),
            doc="a linear projection, trained by the outer level"),
        _op("stage", "conv", Param("window", "int", 4, minimum=1), doc="short causal depthwise convolution"),
        _op("stage", "silu"), _op("stage", "gelu"), _op("stage", "relu"), _op("stage", "tanh"),
        _op("stage", "identity"),
        _op("stage", "sigmoid", Param("max", "number", 1.0, minimum=0, exclusive_minimum=True),
            doc="max * sigmoid(x)"),
        _op("stage", "softplus"),
        _op("stage", "exp"),
        _op("stage", "scale", Param("factor", "number", REQUIRED), doc="multiply by a constant"),
        _op("stage", "l2norm", doc="L2 normalisation over each head's channels"),
        _op("stage", "layernorm"), _op("stage", "rmsnorm"),
        _op("stage", "elu1", doc="feature map elu(x) + 1"),
        _op("stage", "poly", Param("degree", "int", 2, minimum=1), doc="polynomial feature map sum_i a_i x^i, learnable a_i (ATLAS)"),
        _op("stage", "rope", Param("base", "number", 10000.0, minimum=1),
            doc="rotary position embedding of each head's channels (queries and keys)"),
    )
}

GATE_SOURCES = {
    "learned": _op("gate", "learned", Param("init", "number", 0.5),
                   Param("per", "enum", "head", choices=("head", "channel")),
                   doc="a learned scalar (per head or channel), trained by the outer level"),
}

BLOCKS = {
    s.name: s
    for s in (
        _op("block", "residual", Param("body", "block", REQUIRED), doc="x + body(x)"),
        _op("block", "parallel", Param("combine", "enum", "learned", choices=("learned", "sum", "mean")),
            variadic="block", doc="branches on the same input, combined by a learned weighted sum"),
        _op("block", "gated", Param("main", "block", REQUIRED), Param("gate", "block", REQUIRED),
            doc="main(x) * sigmoid(norm(gate(x))) (Titans MAG)"),
        _op("block", "mac",
            Param("memory", "level", REQUIRED), Param("attention", "level", REQUIRED),
            Param("segment", "int", 64, minimum=1), Param("persistent", "int", 0, minimum=0),
            doc="memory as context: persistent tokens, the memory's read-out and the segment attended together"),
        _op("block", "rmsnorm"), _op("block", "layernorm"), _op("block", "identity"),
    )
}

SEARCH = {
    s.name: s
    for s in (
        _op("search", "choice", Param("name", "string", None, fixed=True), variadic="any",
            doc="one of the options; `name` ties all choices with that name to one value"),
        _op("search", "range", Param("low", "number", REQUIRED, fixed=True), Param("high", "number", REQUIRED, fixed=True),
            Param("step", "number", 1, fixed=True), Param("name", "string", None, fixed=True),
            doc="low, low+step, ... up to high inclusive"),
        _op("search", "loguniform", Param("low", "number", REQUIRED, fixed=True),
            Param("high", "number", REQUIRED, fixed=True), Param("name", "string", None, fixed=True),
            doc="a number drawn log-uniformly from [low, high]"),
    )
}

OUTER_OPTIMIZERS = {
    s.name: s
    for s in (
        _op("outer_optimizer", "adamw", Param("lr", "number", 1e-3, minimum=0, exclusive_minimum=True),
            Param("beta1", "number", 0.9, minimum=0, maximum=1), Param("beta2", "number", 0.95, minimum=0, maximum=1),
            Param("weight_decay", "number", 0.1, minimum=0), Param("eps", "number", 1e-8, minimum=0)),
        _op("outer_optimizer", "sgd", Param("lr", "number", 0.1, minimum=0, exclusive_minimum=True),
            Param("momentum", "number", 0.9, minimum=0, maximum=1), Param("nesterov", "bool", False),
            Param("weight_decay", "number", 0.0, minimum=0)),
        _op("outer_optimizer", "muon", Param("lr", "number", 0.02, minimum=0, exclusive_minimum=True),
            Param("momentum", "number", 0.95, minimum=0, maximum=1), Param("ns_steps", "int", 5, minimum=1),
            Param("adam_lr", "number", 1e-3, minimum=0, exclusive_minimum=True, doc="for embeddings, gains, biases"),
            Param("weight_decay", "number", 0.0, minimum=0)),
        _op("outer_optimizer", "m3", Param("lr", "number", 1e-3, minimum=0, exclusive_minimum=True),
            Param("beta1", "number", 0.9, minimum=0, maximum=1), Param("beta2", "number", 0.999, minimum=0, maximum=1),
            Param("beta3", "number", 0.5, minimum=0, maximum=1, doc="weight of the slow momentum's gradient sum"),
            Param("alpha", "number", 1.0, minimum=0, doc="weight of the slow momentum in the update"),
            Param("every", "int", 16, minimum=1, doc="the slow momentum is updated every N steps"),
            Param("ns_steps", "int", 5, minimum=1), Param("eps", "number", 1e-8, minimum=0),
            doc="Multi-scale Momentum Muon (Nested Learning, Alg. 1)"),
    )
}

SCHEDULES = {
    s.name: s
    for s in (
        _op("schedule", "constant", Param("warmup", "int", 0, minimum=0)),
        _op("schedule", "cosine", Param("warmup", "int", 0, minimum=0),
            Param("min_lr", "number", 0.1, minimum=0, maximum=1, doc="final lr as a fraction of the peak")),
        _op("schedule", "linear", Param("warmup", "int", 0, minimum=0)),
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
        Param("gamma", "gate", None, doc="weights of the pairs in an omega window"),
        Param("objective", "objective", None),
        Param("optimizer", "optimizer", "gd"),
        Param("order", "enum", "grad_first", choices=("grad_first", "decay_first"),
              doc="take the gradient at the undecayed state (Titans) or after decaying it (Gated DeltaNet)"),
        Param("output", "output", "none"),
        Param("every", "frequency", None, doc="update period: `every N` tokens, `every N steps`"),
        Param("frozen", "bool", False, doc="never updated inside a sequence"),
        Param("read", "enum", "after", choices=("before", "after")),
        Param("init", "init", None),
        Param("meta", "enum", None, choices=("full", "first_order", "stop"),
              doc="how outer gradients flow through the level's in-sequence updates"),
        Param("heads", "int", None, minimum=1),
    )
}

MODEL_FIELDS = {
    p.name: p
    for p in (
        Param("vocab", "int", REQUIRED, minimum=2, fixed=True),
        Param("dim", "int", REQUIRED, minimum=1),
        Param("heads", "int", 1, minimum=1),
        Param("layers", "int", 1, minimum=1),
        Param("block", "block", REQUIRED),
        Param("norm", "enum", "rmsnorm", choices=NORMS, doc="the final normalisation before the LM head"),
        Param("tie_embeddings", "bool", True),
    )
}

TRAIN_FIELDS = {
    p.name: p
    for p in (
        Param("optimizer", "outer_optimizer", "adamw"),
        Param("schedule", "schedule", "cosine"),
        Param("context", "int", 256, minimum=1),
        Param("batch", "int", 8, minimum=1),
        Param("steps", "int", 1000, minimum=1),
        Param("clip", "number", 1.0, minimum=0),
        Param("seed", "int", 0, minimum=0),
    )
}

SECTIONS = {"model": MODEL_FIELDS, "train": TRAIN_FIELDS}

# Names with a fixed meaning inside expressions.
INPUT_NAME = "x"
SELF_NAME = "self"
BOOLEANS = {"true": True, "false": False}
FREQUENCY_UNITS = ("tokens", "steps")

"""Levels: a level's fields (following `extends`), its defaults, and the checks that need its
state, objective and optimizer together."""

from __future__ import annotations

import dataclasses

from nestc import rules
from nestc.lang import ast, ir, schema
from nestc.lang.diagnostics import Label, did_you_mean
from nestc.lang.queries import delta_extras, per_channel
from nestc.lang.schema import Param
from nestc.lang.sema.context import INVALID, Analysis, Invalid, Part, options
from nestc.lang.sema.optimizers import OptimizerLevels, is_optimizer_state, reads_stream
from nestc.lang.sema.values import Values


LET = "let"  # the key prefix under which a level's fields hold its bindings


class Levels(Part):
    """Builds each level once, when it is first asked for."""

    def __init__(self, analysis: Analysis, values: Values):
        super().__init__(analysis)
        self.values = values
        self._built: dict[str, ir.Level | Invalid] = {}
        self.chunked: list[tuple] = []  # (level, every, context, field) checked once usage is known
        self.pretrained: list[tuple] = []  # (level, state, init, field) checked once every level is built
        self._fields: dict[str, tuple[ast.Expr | None, dict[str, ast.Field]] | Invalid] = {}  # after `extends`
        self.extended: set[str] = set()  # levels that another level extends
        self.optimizers = OptimizerLevels(analysis, values, self)
        analysis.update_value = self.optimizers.update  # a level's `update` names levels this part builds
        analysis.outer_update_value = self.optimizers.outer_update  # as the train section's do

    def _level_fields(self, name: str) -> tuple[ast.Expr | None, dict[str, ast.Field]] | Invalid:
        """The state and fields of a level, following `extends` chains.

        Each level's fields are resolved once and kept, and a chain is walked in a loop, not by
        recursion: checking a chain of N levels takes time linear in N, at any depth."""
        waiting: list[str] = []  # levels whose fields need their base's, the first asked for first
        current = name
        while current not in self._fields:
            node: ast.LevelDef = self.definitions[current].node
            if node.base is None:
                self._fields[current] = (node.state, self._own_fields(current))
                break
            base = self.definitions.get(node.base)
            if base is None or base.kind != "level":
                self._fields[current] = self._bad_base(node, base)
                break
            self.extended.add(node.base)
            waiting.append(current)
            if node.base in waiting:
                self._report_cycle(waiting[waiting.index(node.base):])
                break
            current = node.base
        for child in reversed(waiting):
            if child in self._fields:  # a member of a cycle, already reported
                continue
            inherited = self._fields[self.definitions[child].node.base]
            if inherited is INVALID:
                self._fields[child] = INVALID
                continue
            state, fields = inherited
            self._fields[child] = (state, {**fields, **self._own_fields(child)})
        return self._fields[name]

    def _own_fields(self, name: str) -> dict[str, ast.Field]:
        """The level's own fields by key, and its `let` bindings under `let NAME` (a key no field
        has), so that `extends` overrides a binding by name as it overrides a field."""
        node_fields = self.definitions[name].node.fields
        fields = self.values.fields(tuple(f for f in node_fields if not f.binding), schema.LEVEL_FIELDS,
                                    f"level `{name}`")
        for binding in (f for f in node_fields if f.binding):
            key = f"{LET} {binding.key}"
            if key in fields:
                self.error("N0116", f"`let {binding.key}` is given twice in level `{name}`", binding.key_span,
                           secondary=(Label(span=fields[key].key_span, message="first given here"),))
            elif self._bad_binding_name(binding):
                continue
            fields[key] = binding
        return fields

    def _bad_binding_name(self, binding: ast.Field) -> bool:
        """A binding may not take a built-in name or the name of a definition (a gate naming it
        would be ambiguous)."""
        from nestc.lang.sema.imports import RESERVED

        definition = self.definitions.get(binding.key)
        if binding.key in RESERVED or binding.key in schema.LEVEL_FIELDS or binding.key in ir.GATE_FUNCTIONS:
            self.error("N0123", f"`{binding.key}` is a built-in name and cannot be bound", binding.key_span,
                       label="reserved", help=f"choose another name, e.g. `{binding.key}_t`")
            return True
        if definition is not None:
            self.error("N0102", f"`let {binding.key}` has the name of a {definition.kind}", binding.key_span,
                       label="already defined", secondary=(Label(span=definition.span, message="defined here"),)
                       if definition.span else (), help=f"choose another name, e.g. `{binding.key}_t`")
            return True
        return False

    def _bad_base(self, node: ast.LevelDef, base) -> Invalid:
        if base is None:
            return self.error("N0101", f"unknown level `{node.base}`", node.base_span, label="not defined",
                              help=did_you_mean(node.base, self.analysis.names("level")))
        return self.error("N0105", f"`{node.base}` is a {base.kind}; a level can only extend a level",
                          node.base_span)

    def _report_cycle(self, cycle: list[str]) -> None:
        """One error for an `extends` cycle, at its first level; every level of it is invalid."""
        first: ast.LevelDef = self.definitions[cycle[0]].node
        chain = " -> ".join(cycle + [cycle[0]])
        self.error("N0121", f"level `{cycle[0]}` extends itself", first.base_span, notes=(f"the chain: {chain}",))
        for member in cycle:
            self._fields[member] = INVALID

    def level(self, name: str):
        if name in self._built:
            return self._built[name]
        resolved = self._level_fields(name)
        if resolved is INVALID:
            self._built[name] = INVALID
            return INVALID
        state_expr, fields = resolved
        node: ast.LevelDef = self.definitions[name].node
        enclosing, self.analysis.current_level = self.analysis.current_level, name
        try:
            level = self._build_level(name, node, state_expr, fields, self.analysis.train_context)
        finally:
            self.analysis.current_level = enclosing
        self._built[name] = level
        return level

    def _build_level(self, name, node, state_expr, fields, context):
        state = self.values.op(state_expr, "state", f"the state of level `{name}`")
        if is_optimizer_state(state) or (state is not INVALID and reads_stream(self.analysis, fields)):
            return self.optimizers.optimizer_level(name, node, state, fields)
        bindings = {key.split(" ", 1)[1]: f for key, f in fields.items() if key.startswith(f"{LET} ")}
        fields = {key: f for key, f in fields.items() if not key.startswith(f"{LET} ")}
        lets = self._lets(bindings)
        self.analysis.bindings = tuple(bindings)
        try:
            values = {key: self.values.field_value(f, schema.LEVEL_FIELDS[key], f"level `{name}`")
                      for key, f in fields.items() if key != "every"}
        finally:
            self.analysis.bindings = ()
        if lets is INVALID:
            return INVALID
        every = self.frequency(fields.get("every"), values.pop("frozen", False), fields.get("frozen"), name)
        if every not in (None, INVALID) and every.tokens not in (0, 1) and context is not None:
            self.chunked.append((name, every, context, fields.get("every")))
        if state is INVALID or INVALID in values.values() or every is INVALID:
            return INVALID
        kinds = _option_names(state)
        kind = next(iter(kinds)) if len(kinds) == 1 else None
        # The state's registry entry gives the defaults; a choice of states takes the generic ones.
        state_rule = rules.STATES[kind] if kind is not None else None
        defaults = state_rule or rules.State
        is_parametric = state_rule is None or state_rule.memory
        span = node.name_span

        if not is_parametric:
            for key in sorted(set(fields) - state_rule.fields - {"every"}):
                self.error("N0117", f"`{key}` has no meaning for a `{kind}` level", fields[key].key_span,
                           label="not a field of attention",
                           notes=(f"a {kind} level is softmax attention: its update is the closed form "
                                  "'append (k, v)', with no objective, optimizer or gates other than "
                                  "`retain` (a forget gate on the attention logits)",))
            if "retain" in fields and per_channel(values.get("retain")):
                self.error("N0117", f"the retain gate of a `{kind}` level is one value per head",
                           fields["retain"].value.span, label="per channel here",
                           notes=("it biases each head's attention logits by the log of the product of the "
                                  "gates since each entry (the Forgetting Transformer)",),
                           help="drop `per=channel` from this gate")
            if "retain" in fields and isinstance(state, ir.Op) and not state_rule.takes_retain(dict(state.args)):
                self.error("N0117", "a stick-breaking cache has no `retain`", fields["retain"].key_span,
                           label="a forget gate biases softmax logits",
                           notes=("stick-breaking weights already decay with distance: each newer entry takes its "
                                  "share of the stick first",),
                           help="drop `retain`, or use `cache(weights=softmax)` (the Forgetting Transformer)")
            if "every" in fields:
                self.error("N0117", f"`every` has no meaning for a `{kind}` level", fields["every"].key_span,
                           label="attention appends every token")
        for key in ("key", "value", "query"):
            source = values.get(key)
            if key in fields and source is not None and not isinstance(source, (ir.Pipeline, ir.Choice)):
                if not is_parametric:
                    self.error("N0117", f"a `{kind}` level's {key} is a pipeline from `x`", fields[key].value.span,
                               label="gate arithmetic here", help=f"write `{key} = x |> proj`")
                elif isinstance(values.get("substeps"), int) and values["substeps"] > 1:
                    self.error("N0117", f"with `substeps` the {key} is a pipeline from `x`", fields[key].value.span,
                               label="gate arithmetic here",
                               notes=("each step's keys and values come side by side from one pipeline",))
        has_io = any(k in fields for k in ("key", "value", "query"))
        objective = values.get("objective")
        if objective is None and is_parametric and state_rule is not None:
            objective = ir.Op(name=state_rule.default_objective(has_io), args=())
        objectives = _option_names(objective)
        default_optimizer = schema.LEVEL_FIELDS["optimizer"].default
        optimizer = values.get("optimizer") or (self.values.default_op("optimizer", default_optimizer)
                                                if is_parametric else None)
        optimizers = _option_names(optimizer)
        continuum = any(rules.OBJECTIVES[o].continuum for o in objectives)
        task = bool(objectives) and all(rules.OBJECTIVES[o].continuum for o in objectives)

        if every is None:
            every = ir.Frequency(tokens=defaults.default_every_tokens, steps=1)
        if every.tokens == 0 and not is_parametric:
            every = ir.Frequency(tokens=1, steps=1)

        if continuum:
            for key in ("key", "value", "query"):
                if key in fields:
                    self.error("N0117", f"`{key}` has no meaning for a level trained on the task loss",
                               fields[key].key_span, label="the level reads its input directly",
                               notes=("with `objective task` the level is a continuum-memory block: y = M(x), "
                                      "updated with the gradient of the model's own loss",))
            for key in ("lr", "retain", "momentum"):
                gate = values.get(key)
                if key in fields and not (isinstance(gate, ir.Constant) and not isinstance(gate.value, tuple)
                                          or isinstance(gate, (ir.Op, ir.Choice))):
                    self.error("N0117", f"the {key} of a level trained on the task loss is one number or "
                               "`learned(...)`", fields[key].value.span, label="applied once per chunk",
                               notes=("a continuum-memory level steps once per chunk, with the gradient of the "
                                      "chunk's loss: its gates have no value per token or per head",))
        if bindings and (continuum or not is_parametric):
            binding = next(iter(bindings.values()))
            self.error("N0117", "`let` has no meaning for a "
                       + ("level trained on the task loss" if continuum else f"`{kind}` level"), binding.key_span,
                       label="nothing here reads per-token gates", help="remove the binding")
        for name_bound, binding in bindings.items() if is_parametric and not continuum else ():
            if not self._binding_used(name_bound, fields, bindings):
                self.warning("N0202", f"`let {name_bound}` is never used", binding.key_span, label="unused binding",
                             help=f"name it in a gate (`retain = exp(-{name_bound})`), or remove it")
        for state_kind in kinds:
            for objective_name in objectives:
                self._check_objective(state_kind, objective_name, fields, state_expr)
            for optimizer_name in optimizers:
                self._check_optimizer(state_kind, optimizer_name, objectives, fields)
        read = values.get("read", "after")
        if continuum and "after" in options(read) and "read" in fields:
            self.error("N0113", "`read after` has no form for a level trained on the task loss",
                       fields["read"].value.span, label="cannot read after this update",
                       notes=("the update at token t needs the gradient of the loss at t, which needs the output "
                              "at t: the output must be read before the update",),
                       help="remove `read after` (these levels always read before their update)")
        if task and "read" not in fields:
            read = "before"
        self._check_read_out(fields, values.get("output_gate"), task)

        momentum = values.get("momentum")
        if any(rules.OPTIMIZERS[o].keeps_momentum for o in optimizers):
            momentum = momentum or ir.Constant(value=0.9)
        elif momentum is not None and optimizers:
            first, *others = [n for n, rule in rules.OPTIMIZERS.items() if rule.keeps_momentum]
            self.error("N0117", f"a momentum gate has no effect with optimizer `{' or '.join(sorted(optimizers))}`",
                       fields["momentum"].key_span, label="unused gate",
                       help=f"use `optimizer {first}`" + (f" (or `{'`, `'.join(others)}`)" if others else "")
                       + ", or remove the gate")
        objective_gates = self._objective_gates(values, objectives, fields, lets)
        optimizer_gates = self._optimizer_gates(values, optimizers, fields)
        order = values.get("order", "grad_first")

        default_source = ir.Pipeline(stages=(self.values.default_op("stage", "proj"),))
        init = values.get("init") or ir.Op(name=defaults.default_init, args=())
        if isinstance(init, ir.Op) and init.name == "pretrained":
            self.pretrained.append((name, state, init, fields["init"]))
        if any(isinstance(option, ir.Op) and option.name == "nested" for option in options(init)):
            self._reject_nested_init(fields["init"])
        meta = values.get("meta") or ("first_order" if task else "full")
        normalize = values.get("normalize")
        if True in options(normalize):
            self._check_normalize(kinds, objectives, every, fields)
        level = ir.Level(
            name=name,
            state=state,
            key=None if task else values.get("key") or default_source,
            value=None if task else values.get("value") or default_source,
            query=None if task else values.get("query") or default_source,
            lr=values.get("lr") or (ir.Constant(value=1.0) if is_parametric else None),
            retain=values.get("retain") or (ir.Constant(value=1.0) if is_parametric else None),
            momentum=momentum,
            erase=values.get("erase"),
            write=values.get("write"),
            **objective_gates,
            objective=objective,
            optimizer=optimizer,
            order=order if is_parametric else None,
            output=values.get("output") or ir.Op(name="none"),
            every=every,
            read=read,
            init=init,
            meta=meta if is_parametric else None,
            heads=values.get("heads"),
            lets=lets,
            normalize=normalize or None,
            output_norm=values.get("output_norm"),
            output_gate=values.get("output_gate"),
            write_key=values.get("write_key"),
            substeps=values.get("substeps", 1),
            **optimizer_gates,
            span=span,
        )
        if is_parametric:
            self._check_delta_extras(level, fields)
            if any(rules.OPTIMIZERS[o].solves for o in optimizers):
                self._check_exact_solve(level, fields)
        if "update" in fields:
            level = dataclasses.replace(level, update=values["update"])
            self.optimizers.check_served(level, fields, is_parametric, task)
        if lets and isinstance(level.substeps, int) and level.substeps > 1:
            self.error("N0117", "`let` has no meaning with `substeps`", next(iter(bindings.values())).key_span,
                       label="one value per head and token",
                       notes=(f"under `substeps {level.substeps}` the lr, erase and write gates give "
                              f"{level.substeps} values per head, one per step; a binding gives one",),
                       help="write the gates out without the binding")
        return level

    def _check_delta_extras(self, level: ir.Level, fields) -> None:
        """The erase and write gates, the write key, `substeps` and gd's implicit step are parts of
        the online delta rule (SEMANTICS §3); on any other rule they would mean nothing, so they are
        refused."""
        extras = delta_extras(level)
        if not extras:
            return
        if "write_key" in extras:
            self._check_write_key(level, fields)
        # The delta rule is the rules that the `delta` segment form computes (nestc/rules/ `forms`).
        parts = (("state", rules.STATES, level.state), ("objective", rules.OBJECTIVES, level.objective),
                 ("optimizer", rules.OPTIMIZERS, level.optimizer), ("output", rules.OUTPUTS, level.output))
        differs = [f"{kind} `{name}` is not one" for kind, registry, value in parts
                   for name in sorted(_option_names(value)) if "delta" not in registry[name].forms]
        if level.every.tokens != 1:
            differs.append(f"it updates every {ir.format_value(level.every.tokens)} tokens")
        if not differs:
            return
        for extra in extras:
            field = fields["optimizer" if extra.startswith("gd(") else extra]
            span = field.value.span if extra.startswith("gd(") else field.key_span
            self.error("N0117", f"`{extra}` has no meaning for level `{level.name}`", span,
                       label="a field of the online delta rule",
                       notes=("erase, write, write_key, substeps and gd(implicit=true) extend the online delta rule: "
                              "rules that its `delta` form computes (" + _delta_rules() + "), updated `every 1`; here "
                              + ", ".join(differs),))

    def _check_write_key(self, level: ir.Level, fields) -> None:
        """A write key apart from the erase side is derived (SEMANTICS §3) for one explicit step per
        token whose outer gradient flows through the update: not for several steps, the implicit
        step (its closed form w / (1 + w . e) writes the value along w) or a cut outer gradient (the
        inner gradient -R k^T that `first_order` holds constant has no single key when the sides
        differ)."""
        span = fields["write_key"].key_span
        notes = ("with `write_key` the update is M_t = M' - (M' e) (lr * k)^T + u write_key^T (RWKV-7), "
                 "derived for one explicit step per token with `meta full`",)
        if level.substeps != 1:
            self.error("N0117", "`write_key` has no meaning with `substeps`", span,
                       label="one write key per token", notes=notes, help="remove `substeps` or `write_key`")
        optimizer = level.optimizer
        if isinstance(optimizer, ir.Op) and dict(optimizer.args).get("implicit"):
            self.error("N0117", "`write_key` has no meaning with `gd(implicit=true)`", span,
                       label="the implicit step writes along lr * key", notes=notes,
                       help="use `optimizer gd`, or remove `write_key`")
        cut = sorted(meta for meta in options(level.meta) if meta != "full")
        if cut:
            self.error("N0117", f"`write_key` has no meaning with `meta {cut[0]}`", span,
                       label="the update is no inner gradient step", notes=notes,
                       help="remove `meta` (the default, `full`, lets outer gradients through the update)")

    @staticmethod
    def _binding_used(name: str, fields: dict[str, ast.Field], bindings: dict[str, ast.Field]) -> bool:
        """Whether a field or another binding names `name` (a name in the syntax tree)."""
        others = [f.value for f in fields.values()] + [b.value for key, b in bindings.items() if key != name]
        return any(isinstance(node, ast.Name) and node.id == name for value in others for node in ast.walk(value))

    def _lets(self, bindings: dict[str, ast.Field]):
        """The bindings' values, in order: each is a gate that may name the bindings above it."""
        lets, ok = [], True
        for index, (key, binding) in enumerate(bindings.items()):
            self.analysis.bindings = tuple(bindings)[:index]
            try:
                value = self.values.gate(binding.value, f"`let {key}`")
            finally:
                self.analysis.bindings = ()
            ok = ok and value is not INVALID
            lets.append((key, value))
        return tuple(lets) if ok else INVALID

    def _check_normalize(self, kinds: set[str], objectives: set[str], every: ir.Frequency, fields) -> None:
        """The normaliser is the memory's read of a value channel held at 1, which follows
        Katharopoulos' running sum of keys only where each value channel is learned alone and
        linearly: a matrix memory on the dot objective, updated in the sequence."""
        span = fields["normalize"].key_span
        notes = ("`normalize` divides y = M q by z.q, where z is updated as M is with every value 1: with "
                 "`objective dot` that is the (decayed, lr-weighted) running sum of the keys",)
        if kinds - {"matrix"}:
            self.error("N0117", f"`normalize` has no meaning for a `{sorted(kinds - {'matrix'})[0]}` level", span,
                       label="needs a matrix memory", notes=notes)
        elif objectives - {"dot"}:
            self.error("N0117", f"`normalize` has no meaning with objective `{sorted(objectives - {'dot'})[0]}`",
                       span, label="needs objective dot", notes=notes, help="use `objective dot`")
        elif every.tokens == 0:
            self.error("N0117", "`normalize` has no meaning for a level not updated in the sequence", span,
                       label="no running sum to divide by", notes=notes, help="update the level `every N`")

    def _check_read_out(self, fields, gate, task: bool) -> None:
        """The output norm and gate act on the heads' read-out before the output projection: a
        feed-forward or task-loss level has none; the gate reads x itself, not another level."""
        if task:
            for key in ("output_norm", "output_gate"):
                if key in fields:
                    self.error("N0117", f"`{key}` has no meaning for a level trained on the task loss",
                               fields[key].key_span, label="no read-out to normalise or gate",
                               notes=("with `objective task` (or an mlp without key, value and query) the level is "
                                      "a feed-forward block y = M(x) on the full width, without heads' reads",))
        if isinstance(gate, ir.Pipeline) and any(isinstance(stage, ir.LevelRef) for stage in gate.stages):
            self.error("N0105", "the output gate cannot read a level", fields["output_gate"].value.span,
                       label="a level stage here",
                       help="build the gate from x with stages such as `x |> proj |> silu`")

    def _objective_gates(self, values: dict, objectives: set[str], fields, lets) -> dict:
        """The gates that objectives read (rules.OBJECTIVE_GATES): the declared ones, their default
        where the level gives none; an error for one that the level's objective does not read,
        or that is per channel where the objective needs one value per head."""
        gates = {}
        for role, gate in rules.OBJECTIVE_GATES.items():
            value = values.get(role)
            readers = sorted(name for name in objectives if role in rules.OBJECTIVES[name].gates)
            owner = next(name for name, rule in rules.OBJECTIVES.items() if role in rule.gates)
            if readers:
                value = value or ir.Constant(value=gate.default)
                if not gate.per_channel and per_channel(value, lets):
                    self.error("N0117", f"the {role} gate of objective `{readers[0]}` is one value per head",
                               fields[role].value.span, label="per channel here",
                               help="drop `per=channel` from this gate")
            elif value is not None and objectives:
                self.error("N0117", f"a {role} gate has no effect with objective `{' or '.join(sorted(objectives))}`",
                           fields[role].key_span, label="unused gate",
                           notes=(f"{role}: {gate.doc}, read by objective `{owner}` only",),
                           help=f"use `objective {owner}`, or remove the gate")
            gates[role] = value
        return gates

    def _optimizer_gates(self, values: dict, optimizers: set[str], fields) -> dict:
        """The gates only an optimizer reads (rules.OPTIMIZER_GATES): their default where the
        level gives none; an error for one the level's optimizer does not read, or a constant
        that is not positive (solve's ridge keeps H + diag(ridge) positive definite)."""
        gates = {}
        for role, gate in rules.OPTIMIZER_GATES.items():
            value = values.get(role)
            owner = next(name for name, rule in rules.OPTIMIZERS.items() if role in rule.gates)
            if not any(role in rules.OPTIMIZERS[name].gates for name in optimizers):
                if value is not None and optimizers:
                    self.error("N0117", f"a {role} gate has no effect with optimizer "
                               f"`{' or '.join(sorted(optimizers))}`", fields[role].key_span, label="unused gate",
                               notes=(f"{role}: {gate.doc}, read by optimizer `{owner}` only",),
                               help=f"use `optimizer {owner}`, or remove the gate")
                gates[role] = None
                continue
            value = value or ir.Constant(value=gate.default)
            constants = value.value if isinstance(value, ir.Constant) else ()
            if any(not isinstance(c, (int, float)) or c <= 0 for c in
                   (constants if isinstance(constants, tuple) else (constants,))):
                self.error("N0117", f"the {role} gate of optimizer `{owner}` must be positive",
                           fields[role].value.span, label="not positive",
                           notes=(f"{role}: {gate.doc}",),
                           help=f"give a positive number, or learn it positive: `{role} = "
                                "exp(learned(init=0.0, per=channel))`")
            gates[role] = value
        return gates

    def _check_exact_solve(self, level: ir.Level, fields) -> None:
        """Optimizer `solve` reads its memory after each token's exact solve: it is defined only
        for an online level (`every 1`, read after) without an output map, with one lr and one
        retain per head (they weight and decay whole pairs k k^T, v k^T), and takes no gradient,
        so `order decay_first` would mean nothing."""
        notes = ("optimizer `solve` (MesaNet) keeps H = sum lr k k^T and G = sum lr v k^T, decayed by retain, "
                 "and reads y = G (H + diag(ridge))^-1 q after each token's update",)
        problems = []  # (field, what, label)
        if level.every.tokens != 1:
            problems.append(("frozen" if "frozen" in fields else "every", "an update period other than `every 1`",
                             "the statistics take every token"))
        if "before" in options(level.read):
            problems.append(("read", "`read before`", "the read is after each token's update"))
        if "decay_first" in options(level.order):
            problems.append(("order", "`order decay_first`", "no gradient is taken"))
        if any(not rules.OUTPUTS[name].identity for name in _option_names(level.output)):
            problems.append(("output", "an output map", "the read is the solve itself"))
        for role in ("lr", "retain"):
            if per_channel(getattr(level, role), level.lets):
                problems.append((role, f"a per-channel {role} gate", "one value per head"))
        for field, what, label in problems:
            span = fields[field].key_span if field in fields else level.span
            self.error("N0112", f"optimizer `solve` is not defined with {what}", span, label=label, notes=notes)

    def frequency(self, f: ast.Field | None, frozen, frozen_field: ast.Field | None, level: str):
        if frozen and f is not None:
            self.error("N0116", f"level `{level}` is both `frozen` and updated `every ...`", f.key_span,
                       secondary=(Label(span=frozen_field.key_span, message="frozen here"),))
            return INVALID
        if frozen:
            return ir.Frequency(tokens=0, steps=1, span=frozen_field.span)
        if f is None:
            return None
        if f.value is None:
            return self.error("N0015", "`every` needs a period", f.key_span, label="missing value",
                              help="write `every 16` (tokens) or `every 4 steps` (outer optimizer steps)")
        unit = f.unit or "tokens"
        if unit not in schema.FREQUENCY_UNITS:
            return self.error("N0101", f"unknown unit `{unit}`", f.unit_span, label="not a unit",
                              help=did_you_mean(unit, schema.FREQUENCY_UNITS))
        period = self.values.value(f.value, Param("every", "int", minimum=0 if unit == "tokens" else 1), "the period")
        if period is INVALID:
            return INVALID
        if unit == "steps":
            return ir.Frequency(tokens=0, steps=period, span=f.span)
        return ir.Frequency(tokens=period, steps=1, span=f.span)

    def _check_objective(self, kind: str, objective: str, fields, state_expr) -> None:
        """The objective's registry entry lists the states it is defined on."""
        if rules.STATES[kind].memory and kind not in rules.OBJECTIVES[objective].states:
            self.error("N0111", f"objective `{objective}` is not defined for a `{kind}` state",
                       fields["objective"].value.span if "objective" in fields else state_expr.span,
                       label="no such objective for this state",
                       help="use one of: " + ", ".join(sorted(n for n, rule in rules.OBJECTIVES.items()
                                                               if kind in rule.states)))

    def _check_optimizer(self, kind: str, optimizer: str, objectives: set[str], fields) -> None:
        """What the optimizer's registry entry needs: weight maps in the state, (key, value) pairs."""
        span = fields["optimizer"].value.span if "optimizer" in fields else None
        rule = rules.OPTIMIZERS[optimizer]
        if rule.needs_weight_maps and not rules.STATES[kind].weight_maps:
            on_maps = " and ".join(n for n, other in rules.OPTIMIZERS.items() if other.needs_weight_maps)
            with_maps = " or ".join(n for n, state in rules.STATES.items() if state.weight_maps)
            elementwise = " or ".join(n for n, other in rules.OPTIMIZERS.items() if not other.needs_weight_maps)
            self.error("N0112", f"optimizer `{optimizer}` is not defined for a `{kind}` state", span,
                       label="needs weight matrices",
                       help=f"{on_maps} act on the linear maps of a {with_maps} state; use {elementwise}")
        if rule.states is not None and kind not in rule.states and rules.STATES[kind].memory:
            self.error("N0112", f"optimizer `{optimizer}` is not defined for a `{kind}` state", span,
                       label=f"needs a {' or '.join(sorted(rule.states))} state",
                       help=f"use a {' or '.join(sorted(rule.states))} state, or another optimizer")
        # an objective outside the optimizer's set (a continuum one is refused below as needing pairs)
        others = sorted(o for o in objectives if not rules.OBJECTIVES[o].continuum)
        unsolved = [o for o in others if rule.objectives is not None and o not in rule.objectives]
        if unsolved:
            self.error("N0112", f"optimizer `{optimizer}` is not defined for objective `{unsolved[0]}`", span,
                       label=f"solves objective {' or '.join(sorted(rule.objectives))} only",
                       help=f"use `objective {sorted(rule.objectives)[0]}`, or another optimizer",
                       notes=(f"{optimizer}: {rule.spec.doc}",))
        continuum = [o for o in objectives if rules.OBJECTIVES[o].continuum]
        if continuum and rule.needs_pairs:
            without_pairs = " or ".join(n for n, other in rules.OPTIMIZERS.items() if not other.needs_pairs)
            self.error("N0112", f"optimizer `{optimizer}` is not defined for the {continuum[0]} objective", span,
                       label=f"continuum-memory levels use {without_pairs}",
                       help=f"{optimizer} needs the level's (key, value) pairs, which task-loss levels do not have")

    def _reject_nested_init(self, init_field: ast.Field) -> None:
        """Nested CMS (NL eq. 72) has no implementation in either backend yet; it used to train
        silently as `init meta`, so it is refused rather than run as something else."""
        self.error("N0126", "`init nested` is not implemented yet", init_field.value.span,
                   label="no backend builds a nested initial state",
                   notes=("nested CMS (NL eq. 72): M_0 is learned by the next slower level and reset each time "
                          "that level moves; neither backend does this yet",),
                   help="use `init meta` (M_0 learned by the outer level, as in sequential CMS, NL eq. 73)")

    def check_pretrained(self) -> None:
        """Once every level is built: each `init pretrained(source=...)` copies a level with the same
        state. (Building the source from inside its copy recursed once per link of a long chain.)"""
        for name, state, init, init_field in self.pretrained:
            source = init.arg("source")
            if source == name:
                self.error("N0124", f"level `{name}` cannot be initialised from itself", init_field.value.span)
                continue
            other = self._built.get(source, INVALID)
            if other is not INVALID and isinstance(state, ir.Op) and other.state != state:
                self.error("N0124", f"level `{name}` is initialised from `{source}`, whose state differs",
                           init_field.value.span,
                           label=f"{ir.format_value(other.state)} vs {ir.format_value(state)}",
                           help="pretrained initial states copy parameters: both levels need the same state")


def _delta_rules() -> str:
    """The rules the `delta` form computes, by kind, as the registries list them."""
    registries = (("state", rules.STATES), ("objective", rules.OBJECTIVES), ("optimizer", rules.OPTIMIZERS),
                  ("output", rules.OUTPUTS))
    return "; ".join(f"{kind} " + " or ".join(f"`{name}`" for name, rule in registry.items() if "delta" in rule.forms)
                     for kind, registry in registries)


def _option_names(value) -> set[str]:
    """The operator names a value may take: one for an operator, each option's for a choice."""
    return {option.name for option in options(value) if isinstance(option, ir.Op)}

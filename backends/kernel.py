"""A memory level's rule token by token: `MemoryKernel` updates and reads one level's state for
one token, as docs/design/SEMANTICS.md §3 states it (the inner gradient by autograd at the anchor).
The reference backend's levels step it; the compiled backend's forms equal it a segment at a time."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from nestc import rules
from nestc.lang import ir
from nestc.backends.common import BackendError, concrete, op_args
from nestc.backends.optimizers import LevelOptimizer
from nestc.backends.state import LevelState
from nestc.lang.queries import delta_extras
from nestc.passes.optimizers import closed_form
from nestc.rules.optimizers import solve_read

# --- memory functions ------------------------------------------------------------------------

# Added to a normalised read's denominator z.q (Katharopoulos et al.'s implementation, fla's based):
# a read before any write, or of a query orthogonal to every key, is 0 rather than nan.
NORMALIZER_EPS = 1e-6


class MemoryKernel(nn.Module):
    """The update and read rule of one memory level, on per-head tensors.

    k [B, H, dk], v [B, H, dv], q [B, H, dk]; gates [B, H] (per head) or [B, H, dk] (per channel).
    `step` takes one token; the anchor (the gradient's evaluation point) is refreshed every
    `every` tokens, counted from the start of the stream.
    """

    def __init__(self, level: ir.Level, heads: int, key_dim: int, value_dim: int):
        super().__init__()
        self.level = level
        self.heads, self.key_dim, self.value_dim = heads, key_dim, value_dim
        # The level's rules, as registry entries (nestc/rules/), each with its arguments.
        self.state, self.state_args = rules.STATES[level.state.name], op_args(level.state)
        self.objective, self.objective_args = rules.OBJECTIVES[level.objective.name], op_args(level.objective)
        self.optimizer, self.optimizer_args = rules.OPTIMIZERS[level.optimizer.name], op_args(level.optimizer)
        # An `update` written with optimizer levels: the reference steps it literally (`level_optimizer`,
        # following `retention`, the level's own rule); the segment forms run the built-in it equals
        # (`closed_form`) as `optimizer`, or, where none does, the plan steps it token by token and
        # `update_obstacle` says why (nestc/passes/optimizers.py).
        self.level_optimizer = self.closed_form = None
        self.update_obstacle = ""
        if level.update is not None:
            self.retention, self.retention_args = self.optimizer, self.optimizer_args
            self.closed_form, self.update_obstacle = closed_form(level)
            if self.closed_form is not None:
                self.optimizer = rules.OPTIMIZERS[self.closed_form.optimizer.name]
                self.optimizer_args = op_args(self.closed_form.optimizer)
        self.output, self.output_args = rules.OUTPUTS[level.output.name], op_args(level.output)
        self.every = concrete(level.every.tokens)
        self.read = level.read
        self.order = level.order
        self.meta = level.meta
        # the generalised delta rule (SEMANTICS §3): `_delta_step` steps it, the delta form solves it
        self.delta_extras = tuple(delta_extras(level))
        self.substeps = concrete(level.substeps)
        self.implicit = bool(self.optimizer_args.get("implicit", False))
        self.init_kind = level.init.name
        # A normalised memory stores one more value row, the normaliser z: its read of a value
        # channel held at 1 (SEMANTICS §3).
        self.normalized = bool(concrete(level.normalize))
        shapes = self.state.weight_shapes(self.state_args, heads, key_dim, value_dim + self.normalized)
        if self.init_kind in ("meta", "nested", "pretrained"):
            self.initial = nn.ParameterList(nn.Parameter(self._initial_value(s, i, len(shapes)))
                                            for i, s in enumerate(shapes))
        else:
            self.initial = None
        self._shapes = shapes
        if level.update is not None:
            self.level_optimizer = LevelOptimizer(level.update, level.meta, shapes)
        problem = self.state.width_error(self.state_args, key_dim, value_dim)
        if problem:
            raise BackendError(f"level `{level.name}`: {problem}")

    def _initial_value(self, shape, index: int, count: int) -> Tensor:
        return self.state.initial_value(self.state_args, shape, index, count)

    def initial_state(self, batch: int, like: Tensor) -> LevelState:
        if self.initial is not None:
            weights = [w.to(like.dtype).unsqueeze(0).expand(batch, *w.shape) for w in self.initial]
        else:
            weights = [like.new_zeros((batch,) + s) for s in self._shapes]
        state = LevelState(weights=weights, anchor=list(weights))
        if self.level_optimizer is not None:
            state.moments = self.level_optimizer.initial_moments(weights)
        elif self.optimizer.keeps_momentum:
            state.momentum = [torch.zeros_like(w) for w in weights]
        if self.optimizer.solves:
            state.gram = like.new_zeros((batch, self.heads, self.key_dim, self.key_dim))
        return state

    # the memory as a function of its weights

    def mapped(self, weights: list[Tensor]) -> list[Tensor]:
        """The output map (mirror map) applied to the stored weights before any use."""
        return self.output.map(self.output_args, weights)

    def evaluate(self, weights: list[Tensor], x: Tensor, inputs: list[Tensor] | None = None) -> Tensor:
        """The memory's read M(x) at `weights` (not named `apply`, which would hide nn.Module.apply
        from the tools that walk a model's modules with it, as transformers' weight loading does)."""
        return self.state.apply(self.state_args, self.mapped(weights), x, inputs)

    def gradient(self, at: list[Tensor], k: Tensor, v: Tensor, window, gates: dict[str, Tensor]
                 ) -> tuple[list[Tensor], list[Tensor]]:
        """The inner gradient at the stored weights `at` and the input of each linear map (for DGD);
        `gates` are the token's gates, of which the objective reads its own.

        With an output map it is the gradient with respect to the mapped weights map(at), which
        the optimizer applies to the stored ones (MIRAS eqs. 24-27); `gradient=stored` takes it
        through the map instead, with respect to `at`."""
        through_map = self.output.gradient_through_map(self.output_args)
        points = at if through_map else self.mapped(at)

        def predict(weights: list[Tensor], x: Tensor, inputs: list[Tensor] | None = None) -> Tensor:
            return self.evaluate(weights, x, inputs) if through_map else self.state.apply(self.state_args, weights, x,
                                                                                       inputs)

        # The gradient is taken with respect to the memory inside M(k) only: keys and values a level
        # generates from its own state (`self`) are inputs of the objective, so differentiate at
        # new aliases of the state that they do not depend on. A view keeps the outer graph; under
        # no_grad, where tensors may claim requires_grad without a graph, use fresh leaves.
        outer = torch.is_grad_enabled()
        leaves = [w.view_as(w) if (outer and w.requires_grad) else w.detach().requires_grad_() for w in points]
        inputs: list[Tensor] = []
        with torch.enable_grad():
            if self.objective.windowed:
                pair = self.objective.per_pair(self.objective_args)
                total = sum(pair.pair_loss({}, predict(leaves, k_i), v_i, {})
                            .mul(gamma_i if gamma_i.dim() == 2 else gamma_i.mean(-1)).sum()
                            for k_i, v_i, gamma_i in window)
                predict(leaves, k, inputs)
            else:
                # summed over (batch, head): each slice's gradient is its own
                own = {role: gates[role] for role in self.objective.gates}
                total = self.objective.pair_loss(self.objective_args, predict(leaves, k, inputs), v, own).sum()
            grads = torch.autograd.grad(total, leaves, create_graph=self.meta == "full" and outer)
        if self.meta != "full":
            grads = [g.detach() for g in grads]
            inputs = [i.detach() for i in inputs]
        return list(grads), inputs

    # the normaliser

    def with_unit_value(self, v: Tensor) -> Tensor:
        """v [..., dv] with the normaliser's value channel, 1, after it (a normalised memory)."""
        return torch.cat([v, v.new_ones(v.shape[:-1] + (1,))], dim=-1) if self.normalized else v

    def normalized_read(self, y: Tensor | None) -> Tensor | None:
        """The read M q [..., dv + 1] of a normalised memory divided by its last channel z.q."""
        if y is None or not self.normalized:
            return y
        return y[..., :-1] / (y[..., -1:] + NORMALIZER_EPS)

    # one token

    def step(self, state: LevelState, k: Tensor, v: Tensor, q: Tensor | None, gates: dict[str, Tensor],
             position: int) -> Tensor | None:
        """Update `state` with the pair (k, v) of the token at `position`; return the read of q."""
        return self.normalized_read(self._step(state, k, self.with_unit_value(v), q, gates, position))

    def _step(self, state: LevelState, k: Tensor, v: Tensor, q: Tensor | None, gates: dict[str, Tensor],
              position: int) -> Tensor | None:
        if self.optimizer.solves:
            return self._solve_step(state, k, v, q, gates)
        anchor_before = state.anchor
        output_before = self.evaluate(anchor_before, q) if (q is not None and self.read == "before") else None
        window = None
        if self.objective.windowed:
            state.window = (state.window + [(k, v, gates["gamma"])])[-self.objective_args["window"]:]
            window = state.window
        if self.delta_extras:  # updated every token (the checker's condition): the anchor is the state
            new = [self._delta_step(state.weights[0], k, v, gates)]
        else:
            new = self._gradient_step(state, k, v, window, gates)
        if self.meta == "stop":
            new = [w.detach() for w in new]
        state.weights = new
        if (position + 1) % self.every == 0:
            state.anchor = list(new)
            state.retain_product = None
        if q is None:
            return None
        return output_before if self.read == "before" else self.evaluate(state.weights, q)

    def _solve_step(self, state: LevelState, k: Tensor, v: Tensor, q: Tensor | None,
                    gates: dict[str, Tensor]) -> Tensor | None:
        """Optimizer `solve` (MesaNet), updated every token and read after: the statistics G
        (the weight) and H take the token's pair, and the read solves (H + diag(ridge)) x = q."""
        values, gram = self.optimizer.accumulate(state.weights[0], state.gram, k, v, gates, self._scale)
        if self.meta == "stop":
            values, gram = values.detach(), gram.detach()
        state.weights, state.gram = [values], gram
        state.anchor = list(state.weights)
        return None if q is None else solve_read(values, gram, gates["ridge"], q)

    def _gradient_step(self, state: LevelState, k, v, window, gates) -> list[Tensor]:
        """The optimizer's step on the objective's gradient at the anchor (autograd), weight by weight."""
        if self.order == "decay_first":
            # Gradient at the anchor decayed by the retain gates accumulated since the anchor
            # (a per-channel gate keeps its channels: the product has the gate's own shape).
            retain = gates["retain"]
            state.retain_product = retain if state.retain_product is None else state.retain_product * retain
            at = [self._scale(w, state.retain_product) for w in state.anchor]
        else:
            at = state.anchor
        grads, inputs = self.gradient(at, k, v, window, gates)
        new = []
        for index, (weight, grad) in enumerate(zip(state.weights, grads)):
            map_input = inputs[index] if index < len(inputs) else None
            if self.level_optimizer is not None:
                update = self.level_optimizer.step(state.moments, index, weight, grad, gates)
                new.append(self.retention.retained(self.retention_args, weight, map_input, gates, self._scale) + update)
                continue
            weight, momentum = self.optimizer.step(
                self.optimizer_args, weight, grad, map_input,
                state.momentum[index] if self.optimizer.keeps_momentum else None, gates, self._scale)
            if momentum is not None:
                state.momentum[index] = momentum
            new.append(weight)
        return new

    def _delta_step(self, weight: Tensor, k: Tensor, v: Tensor, gates: dict[str, Tensor]) -> Tensor:
        """One token of the generalised delta rule (SEMANTICS §3), written out: for each of its N
        steps j, with e = erase * k_j and w = lr_j * k_j (divided by 1 + w.e for the implicit step),
        R = write * v_j - M' e and M = M' + R w^T. M' is the state decayed by retain before the
        first step (decay_first), or the undecayed one, decayed in the update (grad_first); later
        steps read the state the previous one left. k [B, H, N * dk], v [B, H, N * dv]; the
        per-step gates hold N values (or N * channels) per head, retain one per token. A write
        key ([B, H, dk] in the gates, one step: sema's condition) writes the value along itself
        instead: M = M' - (M' e) w^T + (write * v) write_key^T (RWKV-7)."""
        batch, heads = k.shape[:2]
        steps = self.substeps

        def per_step(x: Tensor) -> Tensor:  # [B, H], [B, H, N] or [B, H, N * d] -> [B, H, N, 1 or d]
            return x[:, :, None, None].expand(batch, heads, steps, 1) if x.dim() == 2 else x.reshape(batch, heads,
                                                                                                       steps, -1)

        keys, values, lrs = per_step(k), per_step(v), per_step(gates["lr"])
        erases = per_step(gates["erase"]) if "erase" in gates else None
        writes = per_step(gates["write"]) if "write" in gates else None
        write_key = gates.get("write_key")
        for j in range(steps):
            key = keys[:, :, j]
            erase_key = key if erases is None else erases[:, :, j] * key
            target = values[:, :, j] if writes is None else writes[:, :, j] * values[:, :, j]
            lr = lrs[:, :, j]
            if self.implicit:  # the residual at the updated memory: lr / (1 + (lr k).e)
                lr = lr / (1.0 + (lr * key * erase_key).sum(-1, keepdim=True))
            decayed = self._scale(weight, gates["retain"]) if j == 0 else weight
            read_at = decayed if (self.order == "decay_first" or j > 0) else weight
            erased = torch.einsum("bhvk,bhk->bhv", read_at, erase_key)
            if write_key is not None:
                weight = decayed - erased[..., :, None] * (lr * key)[..., None, :] \
                    + target[..., :, None] * write_key[..., None, :]
            else:
                residual = target - erased
                if self.meta != "full":  # as the gradient is under first_order: a constant of the outer level
                    residual, key = residual.detach(), key.detach()
                weight = decayed + residual[..., :, None] * (lr * key)[..., None, :]
        return weight

    def _scale(self, weight: Tensor, gate: Tensor) -> Tensor:
        """gate * weight, a per-head gate broadcast, a per-channel gate along the key side."""
        if gate.dim() == 2:
            return weight * gate.reshape(gate.shape + (1,) * (weight.dim() - 2))
        if weight.dim() == 3:  # vector state: [B, H, d]
            return weight * gate
        if weight.shape[-1] == gate.shape[-1]:
            return weight * gate[..., None, :]
        if weight.shape[-2] == gate.shape[-1]:
            return weight * gate[..., :, None]
        return weight * gate.mean(-1).reshape(gate.shape[:2] + (1, 1))

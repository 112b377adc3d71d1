"""The outer level's multi-rate updates: levels declared `every N steps` are stepped by the
training optimizer only every N optimizer steps, with the gradients of the steps in between
accumulated (the Nested Learning paper's gradient-accumulation reading of slow levels)."""

from __future__ import annotations

import torch
from torch import nn

from nestc.backends.common import concrete


def update_periods(model: nn.Module) -> dict[str, int]:
    """Parameter name -> outer update period in optimizer steps (1 for everything by default)."""
    periods = {name: 1 for name, _ in model.named_parameters()}
    for layer_index, layer in enumerate(getattr(model, "layers", [])):
        for level_name, level in layer.levels.items():
            steps = concrete(model.program.level(level_name).every.steps)
            for name, _ in level.named_parameters():
                periods[f"layers.{layer_index}.levels.{level_name}.{name}"] = steps
    return periods


class MultiRateStepper:
    """Wraps a torch optimizer: `step(k)` updates only the parameters whose period divides k+1
    and keeps accumulating the gradients of the others until their turn."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module):
        self.optimizer = optimizer
        periods = update_periods(model)
        self.period = {id(p): periods[name] for name, p in model.named_parameters()}

    def any_due(self, step_index: int) -> bool:
        """Whether step `step_index` updates any parameter; if not, it only accumulates gradients
        (and data-parallel processes need not exchange them yet)."""
        return any((step_index + 1) % period == 0 for period in self.period.values())

    def step(self, step_index: int) -> None:
        held = {}
        for group in self.optimizer.param_groups:
            for parameter in group["params"]:
                if (step_index + 1) % self.period.get(id(parameter), 1):
                    held[parameter] = parameter.grad
                    parameter.grad = None  # torch optimizers skip parameters without a gradient
        self.optimizer.step()
        for group in self.optimizer.param_groups:
            for parameter in group["params"]:
                if parameter in held:
                    parameter.grad = held[parameter]
                else:
                    parameter.grad = None

"""The outer optimizers of nestc/runtime/optim.py against their documented formulas
(docs/language.md §8), in float64, and their state through a file."""

from __future__ import annotations

import pytest
import torch

from nestc.runtime.checkpoint import load_tree, save_tree
from nestc.runtime.optim import M3, Muon

LR, MOMENTUM, NS_STEPS, ADAM_LR, WEIGHT_DECAY = 0.02, 0.95, 5, 1e-3, 0.1


def _newton_schulz(matrix: torch.Tensor, steps: int) -> torch.Tensor:
    """The quintic iteration as documented: on the wide orientation of the matrix, divided by
    its Frobenius norm + 1e-7, X <- a X + (b G + c G^2) X with G = X X^T."""
    a, b, c = 3.4445, -4.7750, 2.0315
    tall = matrix.shape[0] > matrix.shape[1]
    x = matrix.T if tall else matrix
    x = x / (torch.linalg.matrix_norm(x) + 1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def _parameters():
    """Weight matrices tall and wide, an embedding (2-D, but AdamW's) and a gain."""
    generator = torch.Generator().manual_seed(0)
    shapes = {"layers.0.tall": (12, 5), "layers.0.wide": (4, 9), "embedding.weight": (10, 4), "norm.gain": (4,)}
    return {name: torch.nn.Parameter(torch.randn(*shape, generator=generator, dtype=torch.float64))
            for name, shape in shapes.items()}


def _gradients(parameters, count: int):
    generator = torch.Generator().manual_seed(1)
    return [{name: torch.randn(p.shape, generator=generator, dtype=torch.float64) for name, p in parameters.items()}
            for _ in range(count)]


def test_muon_is_the_documented_rule_in_float64():
    """Momentum B = mu B + g and W = (1 - lr wd) W - lr sqrt(max(1, rows/cols)) NS(B) for the
    weight matrices; AdamW (betas 0.9, 0.999, eps 1e-8) at adam_lr for the rest; a schedule's
    change of each group's lr reaches both."""
    parameters = _parameters()
    optimizer = Muon(parameters.items(), LR, MOMENTUM, NS_STEPS, ADAM_LR, WEIGHT_DECAY)
    expected = {name: p.detach().clone() for name, p in parameters.items()}
    momenta = {name: torch.zeros_like(p) for name, p in expected.items()}
    first, second = ({name: torch.zeros_like(p) for name, p in expected.items()} for _ in range(2))
    rates = [1.0, 1.0, 0.5]
    for step, (gradients, rate) in enumerate(zip(_gradients(parameters, 3), rates), start=1):
        for group, base in zip(optimizer.param_groups, (LR, ADAM_LR)):
            group["lr"] = base * rate
        for name, p in parameters.items():
            p.grad = gradients[name].clone()
        optimizer.step()
        for name, g in gradients.items():
            if name.startswith("layers."):
                momenta[name] = MOMENTUM * momenta[name] + g
                scale = max(1.0, g.shape[0] / g.shape[1]) ** 0.5
                expected[name] = (1 - LR * rate * WEIGHT_DECAY) * expected[name] \
                    - LR * rate * scale * _newton_schulz(momenta[name], NS_STEPS)
            else:
                first[name] = 0.9 * first[name] + 0.1 * g
                second[name] = 0.999 * second[name] + 0.001 * g * g
                unbiased = first[name] / (1 - 0.9 ** step)
                spread = (second[name] / (1 - 0.999 ** step)).sqrt()
                expected[name] = (1 - ADAM_LR * rate * WEIGHT_DECAY) * expected[name] \
                    - ADAM_LR * rate * unbiased / (spread + 1e-8)
        for name, p in parameters.items():
            torch.testing.assert_close(p.detach(), expected[name], rtol=1e-12, atol=1e-14, msg=f"{name}, step {step}")


def test_torch_muon_orthogonalises_in_bfloat16_so_it_is_not_the_rule():
    """Why optim.Muon is not torch.optim.Muon (SEMANTICS §8): with every argument set to the rule
    (plain momentum, the "original" shape scaling), torch's update is about 1% away in float64.
    Should this fail, torch's Muon may now reproduce the rule: use it in optim.Muon."""
    start = torch.randn(16, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    weight = torch.nn.Parameter(start.clone())
    optimizer = torch.optim.Muon([weight], lr=LR, weight_decay=0.0, momentum=MOMENTUM, nesterov=False,
                                 ns_steps=NS_STEPS, adjust_lr_fn="original")
    weight.grad = torch.randn(16, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    optimizer.step()
    rule = -LR * 2 ** 0.5 * _newton_schulz(weight.grad, NS_STEPS)
    relative = torch.linalg.matrix_norm(weight.detach() - start - rule) / torch.linalg.matrix_norm(rule)
    assert relative > 1e-3, relative


@pytest.mark.parametrize("make", [
    lambda named: Muon(named, LR, MOMENTUM, NS_STEPS, ADAM_LR, WEIGHT_DECAY),
    lambda named: M3(named, 1e-3, 0.9, 0.999, 0.5, 1.0, 2, NS_STEPS, 1e-8),
    lambda named: torch.optim.AdamW([p for _, p in named], lr=1e-3, weight_decay=0.1),
], ids=["muon", "m3", "adamw"])
def test_an_optimizer_state_saved_to_a_file_continues_exactly(make, tmp_path):
    """Muon's momenta and its inner AdamW's moments and step counts, M3's moments and step count:
    an optimizer rebuilt from the file takes the very step the original takes."""
    parameters = _parameters()
    assert_continues_from_a_file(make, parameters, _gradients(parameters, 4), tmp_path)


def assert_continues_from_a_file(make, parameters: dict, gradients: list[dict], tmp_path, check=None) -> None:
    """Three steps of `make(named parameters)`, its state through a file into a second one built
    on copies of the parameters, then the fourth step of each: the two take the very same step.
    `check(optimizer)` runs before the state is saved."""
    optimizer = make(list(parameters.items()))
    for step in gradients[:3]:
        for name, p in parameters.items():
            p.grad = step[name].clone()
        optimizer.step()
    if check is not None:
        check(optimizer)
    path = str(tmp_path / "optimizer.safetensors")
    save_tree(optimizer.state_dict(), path, "optimizer")
    copies = {name: torch.nn.Parameter(p.detach().clone()) for name, p in parameters.items()}
    restored = make(list(copies.items()))
    restored.load_state_dict(load_tree(path, "optimizer", "optimizer state"))
    for twin in (parameters, copies):
        for name, p in twin.items():
            p.grad = gradients[3][name].clone()
    optimizer.step()
    restored.step()
    for name in parameters:
        assert torch.equal(parameters[name].detach(), copies[name].detach()), name

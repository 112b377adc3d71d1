"""The continuum-level step, written once and run by both backends and by the standalone module,
which `fx.standalone` gives these functions' source.

The continuum functions use nothing but `torch`: their source is pasted verbatim into the
standalone module, which must run where nestc is not installed.
"""

from __future__ import annotations

import torch


def continuum_gradients(pending: torch.Tensor, weights: list, create_graph: bool) -> list:
    """The gradients of a continuum level's loss, summed over its chunk, with respect to its fast
    weights (None where a weight did not reach the loss)."""
    if not pending.requires_grad:
        # The chunk's predictions were made before the state was saved and reloaded: no gradient left.
        return [None] * len(weights)
    return list(torch.autograd.grad(pending, weights, retain_graph=True, create_graph=create_graph,
                                    allow_unused=True))


def continuum_step(weights: list, momenta: list, grads: list, momentum_of_steps: bool, lr, retain, momentum,
                   full: bool, stop: bool, keep_graph: bool) -> tuple[list, list]:
    """One step of a continuum level's fast weights at the end of its chunk: gradient descent, or
    with `momentum_of_steps` (the optimizer's registry flag: Titans momentum) a momentum of the
    steps, with the retain (decay) gate; the gates are numbers or scalar tensors. Returns the new weights
    and momenta. The step itself is differentiated only under `meta full`; `meta stop` cuts the
    new weights from the outer graph, and without an outer graph to keep (`keep_graph` false:
    inference) the next chunk starts cut from this one, so the graph never grows beyond one chunk
    however long the stream."""
    new_weights, new_momenta = [], list(momenta)
    for index, (weight, grad) in enumerate(zip(weights, grads)):
        grad = torch.zeros_like(weight) if grad is None else grad
        if not full:
            grad = grad.detach()
        if momentum_of_steps:
            new_momenta[index] = momentum * momenta[index] - lr * grad
            new_weights.append(retain * weight + new_momenta[index])
        else:
            new_weights.append(retain * weight - lr * grad)
    if stop or not keep_graph:
        new_weights = [w.detach() for w in new_weights]
    if not keep_graph:
        new_momenta = [m.detach() for m in new_momenta]
    return new_weights, new_momenta

"""Exact per-example gradients of a model output, for any model.

``torch.func`` computes a batch's per-example gradients in one vectorized call
(``vmap(grad(functional_call))``). Some models cannot be vectorized: Hugging Face
transformers, for one, inspect their attention masks with data-dependent Python
control flow. For those the same gradients come from one ordinary backward pass
per example: slower, equal. The switch happens once, at the first batch that
``vmap`` refuses, and is logged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn
from torch.func import grad, vmap

from fedtrak.data.inputs import Batch, call_model, call_one, take

log = logging.getLogger(__name__)

#: ``(x, y) -> {parameter name: (b, *shape) gradient}``.
GradientFn = Callable[[Batch, torch.Tensor], dict[str, torch.Tensor]]


def per_example_gradients(model: nn.Module, names: list[str],
                          output_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> GradientFn:
    """Per-example gradients of ``output_fn(logits, y)`` with respect to the parameters ``names`` (the
    rest held fixed), vectorized where the model allows and one example at a time where it does not."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    fixed = {n: p for n, p in params.items() if n not in names}

    def single(sub, x, y):
        logits = call_one(model, ({**fixed, **sub}, buffers), x)
        return output_fn(logits, y.unsqueeze(0)).squeeze(0)

    vectorized = vmap(grad(single), in_dims=(None, 0, 0))
    live = dict(model.named_parameters())
    looped = False

    def one_by_one(x: Batch, y: torch.Tensor) -> dict[str, torch.Tensor]:
        wanted = [live[n] for n in names]
        rows = []
        with torch.enable_grad():
            for i in range(len(y)):
                total = output_fn(call_model(model, take(x, slice(i, i + 1))), y[i : i + 1]).sum()
                found = torch.autograd.grad(total, wanted, allow_unused=True)
                rows.append([torch.zeros_like(p) if g is None else g for p, g in zip(wanted, found)])
        return {n: torch.stack([row[j] for row in rows]) for j, n in enumerate(names)}

    def run(x: Batch, y: torch.Tensor) -> dict[str, torch.Tensor]:
        nonlocal looped
        if not looped:
            try:
                return vectorized({n: params[n] for n in names}, x, y)
            except RuntimeError as exc:
                if "vmap" not in str(exc):
                    raise
                looped = True
                log.info("%s cannot be vectorized over examples (%s): its per-example gradients come from one "
                         "backward pass per example", type(model).__name__, str(exc).split(".")[0])
        return one_by_one(x, y)

    return run

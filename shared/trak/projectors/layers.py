"""The layers the factorized projector reads from hooks, and how it reads each.

:func:`discover` finds them in a model: Linear (and Hugging Face's ``Conv1D``, a Linear stored
transposed), ungrouped zero-padded Conv2d, Embedding, LayerNorm and RMSNorm, with a weight tied
between an LM head and its embedding as one layer of two uses. :class:`Layer` holds a layer's
parameters, side dimensions and (once the projector sets them) its two sign matrices;
:func:`norm_grads` forms a norm's small per-example gradient from its hooks, and
:func:`positions` folds a projected side's position axes into one. See
:mod:`fedtrak.trak.projectors.factorized` for the projection itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Use:
    """One module applying a layer's weight: its kind, and whether its sides are the layer's swapped
    (its output gradients sit on the layer's input side: an LM head tied to an embedding)."""

    module: nn.Module
    kind: str
    swapped: bool = False


@dataclass
class Layer:
    """One factorized layer: its module, parameter names, side dimensions and projection shape."""

    index: int
    name: str
    module: nn.Module
    params: list[str]
    out_dim: int
    in_dim: int  # including the bias column when there is a bias
    has_bias: bool
    kind: str = "linear"  # linear, conv, embedding or norm
    transposed: bool = False  # the weight is stored (in, out): an Embedding's, a Conv1D's
    uses: list[Use] = field(default_factory=list)  # the modules applying the weight; the first is ``module``
    proj_dim: int = 0
    k_out: int = 0
    k_in: int = 0
    p_out: torch.Tensor | None = None
    p_in: torch.Tensor | None = None

    @property
    def num_params(self) -> int:
        return self.out_dim * self.in_dim


def is_conv1d(module: nn.Module) -> bool:
    """A Hugging Face ``Conv1D``: ``x @ W + b`` with ``W`` stored ``(in, out)``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None \
        and module.weight.ndim == 2


def layer_kind(module: nn.Module) -> str | None:
    """How the factorized projector reads a module's per-example gradient from hooks (``None``:
    it cannot, and the module's trainable parameters take the exact fallback path)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or not weight.requires_grad:
        return None
    if isinstance(module, nn.Linear) or is_conv1d(module):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv" if module.groups == 1 and module.padding_mode == "zeros" else None
    if isinstance(module, nn.Embedding):
        return "embedding" if module.max_norm is None and not module.scale_grad_by_freq and not module.sparse \
            else None
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return "norm"
    return None


def grads_on_rows(use: Use) -> bool:
    """Whether the use's output gradients index its stored weight's rows (a Linear's ``(out, in)``,
    a convolution's), not its columns (an Embedding's ``(vocab, d)``, a Conv1D's ``(in, out)``)."""
    return use.kind == "conv" or (use.kind == "linear" and not is_conv1d(use.module))


def discover(model: nn.Module) -> list[Layer]:
    """The layers the factorized projector reads from hooks, in module order. A weight held by
    several modules is one layer with several uses when every use is a Linear, Conv1D or
    Embedding and only the first has a trainable bias; otherwise its modules are left out (their
    parameters take the exact fallback path)."""
    groups: dict[int, list[tuple[str, nn.Module, str]]] = {}
    shared: dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            shared[id(param)] = shared.get(id(param), 0) + 1
    for mod_name, module in model.named_modules():
        kind = layer_kind(module)
        if kind is not None:
            groups.setdefault(id(module.weight), []).append((mod_name, module, kind))
    layers: list[Layer] = []
    for uses in groups.values():
        name, first, kind = uses[0]
        bias = getattr(first, "bias", None)
        if shared[id(first.weight)] != len(uses) or (isinstance(bias, torch.Tensor) and shared[id(bias)] > 1):
            continue  # also applied by a module read otherwise, or a bias tied on its own
        if len(uses) > 1 and not all(
                k in ("linear", "embedding") and (i == 0 or not trainable_bias(m)) for i, (_, m, k) in enumerate(uses)):
            continue
        layer = describe_layer(len(layers), name, first, kind)
        head = Use(first, kind)
        layer.uses = [head] + [Use(m, k, grads_on_rows(Use(m, k)) != grads_on_rows(head)) for _, m, k in uses[1:]]
        layers.append(layer)
    return layers


def trainable_bias(module: nn.Module) -> bool:
    bias = getattr(module, "bias", None)
    return isinstance(bias, torch.Tensor) and bias.requires_grad


def factorizes(model: nn.Module) -> bool:
    """Whether every trainable parameter of ``model`` sits in a layer the factorized projector
    projects without the dense fallback (Linear and Hugging Face Conv1D; Conv2d, ungrouped with
    zero padding; Embedding; LayerNorm and RMSNorm; weights tied between a Linear and an Embedding)."""
    covered = {name for layer in discover(model) for name in layer.params}
    return all(name in covered for name, p in model.named_parameters() if p.requires_grad)


def describe_layer(index: int, mod_name: str, module: nn.Module, kind: str) -> Layer:
    """One factorized layer's parameters and side dimensions (see :func:`layer_kind`)."""
    prefix = f"{mod_name}." if mod_name else ""
    weight, bias = module.weight, getattr(module, "bias", None)
    has_bias = isinstance(bias, torch.Tensor) and bias.requires_grad
    params = [prefix + "weight"] + ([prefix + "bias"] if has_bias else [])
    if kind == "norm":  # one row holding the weight's and the bias's gradients
        return Layer(index, mod_name, module, params, 1, weight.numel() + (bias.numel() if has_bias else 0),
                      False, kind)
    if kind == "embedding":
        return Layer(index, mod_name, module, params, weight.shape[1], weight.shape[0], False, kind, True)
    if is_conv1d(module):
        return Layer(index, mod_name, module, params, weight.shape[1], weight.shape[0] + int(has_bias), has_bias,
                      kind, True)
    return Layer(index, mod_name, module, params, weight.shape[0], int(np.prod(weight.shape[1:])) + int(has_bias),
                  has_bias, kind)


def positions(side: torch.Tensor) -> torch.Tensor:
    """A projected side as ``(b, k)``, or ``(b, positions, k)`` with every position axis in one."""
    return side.reshape(len(side), -1, side.shape[-1]) if side.ndim > 3 else side


def norm_grads(layer: Layer, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """A LayerNorm's or RMSNorm's per-example gradients ``(b, weight [+ bias])`` from its input and
    output gradient: ``sum_t g_t * x^_t`` for the weight, ``sum_t g_t`` for the bias."""
    module = layer.module
    shape = tuple(module.normalized_shape)
    if isinstance(module, nn.LayerNorm):
        normed = F.layer_norm(a, shape, eps=module.eps)
    else:
        normed = F.rms_norm(a, shape, eps=module.eps)
    width = math.prod(shape)
    parts = [(g * normed).reshape(len(a), -1, width).sum(1)]
    if len(layer.params) == 2:
        parts.append(g.reshape(len(a), -1, width).sum(1))
    return torch.cat(parts, dim=1)

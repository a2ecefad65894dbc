"""Factorized (per-layer Kronecker) random projection, LoGra-style: no per-example gradient is formed.

For a Linear layer ``y = W a + b`` the per-example gradient of the output is
``g a'^T`` (``g`` the gradient at the layer's output, ``a' = [a, 1]`` its
input with a 1 for the bias); for a Conv2d layer it is ``sum_t g_t a'_t^T``
over output positions ``t`` (``a'_t`` the unfolded input patch). fedtrak
projects each side with its own small seeded Rademacher matrix and forms

    phi_l = vec(P_out^T (sum_t g_t a'_t^T) P_in) = sum_t (P_out^T g_t) kron (P_in^T a'_t),

which equals the dense projection of the layer's flattened gradient with
``P_l = P_out kron P_in`` (tested). Only ``(batch, k_out)`` and ``(batch, k_in)``
arrays are made from hooks on one batched forward and backward pass.

Layout: the projection dimension ``k`` is split over the layers in
proportion to their parameter counts (each at most its own count), and each
layer's ``k_l`` takes the first ``k_l`` of the ``k_out x k_in`` Kronecker
coordinates (``k_out k_in >= k_l``, as square as the layer allows), scaled by
``1 / sqrt(k_l)`` so that ``E[P_l P_l^T] = I``. Trainable parameters outside
Linear and Conv2d layers (and grouped convolutions) fall back to the exact
path: their per-example gradients from ``torch.func``, projected by a dense
seeded Rademacher block projector of the remaining dimension.

Seed contract: layer ``l``'s ``P_in`` comes from ``SeedSequence([seed, l, 0])``,
its ``P_out`` from ``SeedSequence([seed, l, 1])`` (Philox, unscaled +-1); the
fallback projector uses ``derive_seed(seed, FALLBACK_STREAM)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, vmap

from fedtrak.config.seeds import derive_seed
from fedtrak.data.inputs import call_model, call_one
from fedtrak.errors import FedtrakError
from fedtrak.trak.projectors.base import Projector
from fedtrak.trak.projectors.dense import RademacherProjector

#: Seed stream of the dense projector of parameters outside supported layers.
FALLBACK_STREAM = 1_000_003


@dataclass
class _Layer:
    """One factorized layer: its module, parameter names, side dimensions and projection shape."""

    index: int
    name: str
    module: nn.Module
    params: list[str]
    out_dim: int
    in_dim: int  # including the bias column when there is a bias
    has_bias: bool
    proj_dim: int = 0
    k_out: int = 0
    k_in: int = 0
    p_out: torch.Tensor | None = None
    p_in: torch.Tensor | None = None

    @property
    def num_params(self) -> int:
        return self.out_dim * self.in_dim


def _signs(seed: int, layer: int, side: int, rows: int, cols: int) -> torch.Tensor:
    rng = np.random.Generator(np.random.Philox(np.random.SeedSequence([seed, layer, side])))
    bits = rng.integers(0, 2, size=(rows, cols), dtype=np.int8)
    return torch.from_numpy(bits.astype(np.float32) * 2.0 - 1.0)


def _supported(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return module.weight.requires_grad
    if isinstance(module, nn.Conv2d):
        return module.weight.requires_grad and module.groups == 1 and module.padding_mode == "zeros"
    return False


def factorizes(model: nn.Module) -> bool:
    """Whether every trainable parameter of ``model`` sits in a layer the factorized projector
    projects without the dense fallback (Linear; Conv2d, ungrouped with zero padding)."""
    return all(_supported(module) for module in model.modules()
               if any(p.requires_grad for p in module.parameters(recurse=False)))


def _split(total: int, sizes: list[int]) -> list[int]:
    """``total`` split in proportion to ``sizes`` (largest remainders), each in ``[1, size]``."""
    if total > sum(sizes):
        raise FedtrakError(f"projection dimension {total} exceeds the {sum(sizes)} parameters")
    if total < len(sizes):
        raise FedtrakError(f"projection dimension {total} is below the {len(sizes)} parameter groups "
                           "the factorized projector needs one coordinate each")
    share = [total * s / sum(sizes) for s in sizes]
    out = [min(s, max(1, math.floor(x))) for s, x in zip(sizes, share)]
    order = sorted(range(len(sizes)), key=lambda i: share[i] - math.floor(share[i]), reverse=True)
    while sum(out) < total:
        for i in order:
            if sum(out) < total and out[i] < sizes[i]:
                out[i] += 1
    while sum(out) > total:
        for i in reversed(order):
            if sum(out) > total and out[i] > 1:
                out[i] -= 1
    return out


def _factor(k: int, out_dim: int, in_dim: int) -> tuple[int, int]:
    """``(k_out, k_in)`` with ``k_out <= out_dim``, ``k_in <= in_dim``, product at least ``k``, near square."""
    k_out = min(out_dim, math.ceil(math.sqrt(k)))
    k_in = min(in_dim, math.ceil(k / k_out))
    k_out = min(out_dim, math.ceil(k / k_in))
    return k_out, k_in


class FactorizedProjector(Projector):
    """Per-layer Kronecker projection of a model's per-example gradients (see the module doc)."""

    kind = "factorized"

    def __init__(self, model: nn.Module, proj_dim: int, seed: int) -> None:
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        counts = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
        super().__init__(sum(counts.values()), proj_dim, seed)
        self.order = names
        self.sizes = counts
        self.layers: list[_Layer] = []
        covered: set[str] = set()
        for mod_name, module in model.named_modules():
            if not _supported(module):
                continue
            prefix = f"{mod_name}." if mod_name else ""
            params = [prefix + "weight"]
            bias = getattr(module, "bias", None)
            has_bias = bias is not None and bias.requires_grad
            if has_bias:
                params.append(prefix + "bias")
            weight = module.weight
            in_dim = int(np.prod(weight.shape[1:])) + int(has_bias)
            self.layers.append(_Layer(len(self.layers), mod_name, module, params, weight.shape[0], in_dim,
                                      has_bias))
            covered.update(params)
        self.fallback_names = [n for n in names if n not in covered]
        fallback_dim = sum(counts[n] for n in self.fallback_names)
        sizes = [layer.num_params for layer in self.layers] + ([fallback_dim] if fallback_dim else [])
        if not self.layers:
            raise FedtrakError("the factorized projector needs at least one Linear or Conv2d layer; use "
                               "--projector rademacher for this model")
        dims = _split(self.proj_dim, sizes)
        for layer, k in zip(self.layers, dims):
            layer.proj_dim = k
            layer.k_out, layer.k_in = _factor(k, layer.out_dim, layer.in_dim)
            layer.p_in = _signs(self.seed, layer.index, 0, layer.in_dim, layer.k_in)
            layer.p_out = _signs(self.seed, layer.index, 1, layer.out_dim, layer.k_out)
        self.fallback = (RademacherProjector(fallback_dim, dims[-1], derive_seed(self.seed, FALLBACK_STREAM),
                                             cache_bytes=0) if fallback_dim else None)

    def describe(self) -> dict:
        """The base description plus each layer's ``(k_out, k_in) -> k_l``."""
        out = super().describe()
        out["scale"] = "1/sqrt(k_l) per layer"
        out["layers"] = [{"layer": layer.name or "(model)", "k_out": layer.k_out, "k_in": layer.k_in,
                          "k": layer.proj_dim} for layer in self.layers]
        out["fallback_params"] = self.fallback_names
        return out

    # -- the dense view: for equality tests and for callers that already hold gradients --

    def _slices(self) -> dict[str, slice]:
        """Where each trainable parameter sits in a flattened gradient."""
        out, start = {}, 0
        for name in self.order:
            out[name] = slice(start, start + self.sizes[name])
            start += self.sizes[name]
        return out

    def _layer_grad(self, grads: torch.Tensor, layer: _Layer, slices: dict[str, slice]) -> torch.Tensor:
        """``(b, out, in')`` gradient of one layer from flattened gradients."""
        w = grads[:, slices[layer.params[0]]].reshape(len(grads), layer.out_dim, -1)
        if layer.has_bias:
            w = torch.cat([w, grads[:, slices[layer.params[1]]].unsqueeze(2)], dim=2)
        return w

    def _combine(self, g_proj: torch.Tensor, a_proj: torch.Tensor, layer: _Layer,
                 out: torch.Tensor | None = None) -> torch.Tensor:
        """``(b, k_l)`` from projected output gradients ``(b, [T,] k_out)`` and inputs ``(b, [T,] k_in)``
        (written into ``out`` when given)."""
        a_proj = a_proj * (1.0 / math.sqrt(layer.proj_dim))  # the scale on the small side
        if g_proj.ndim == 2 and out is not None:  # straight into out: full rows of k_in, then the rest
            rows, rest = divmod(layer.proj_dim, layer.k_in)
            torch.mul(g_proj[:, :rows, None], a_proj[:, None, :], out=out[:, : rows * layer.k_in].unflatten(1, (
                rows, layer.k_in)))
            if rest:
                torch.mul(g_proj[:, rows, None], a_proj[:, :rest], out=out[:, rows * layer.k_in:])
            return out
        if g_proj.ndim == 2:
            kron = g_proj[:, :, None] * a_proj[:, None, :]
        else:
            kron = torch.bmm(g_proj.transpose(1, 2), a_proj)
        coords = kron.reshape(len(kron), -1)[:, : layer.proj_dim]
        return coords if out is None else out.copy_(coords)

    def project(self, grads: torch.Tensor, more_to_come: bool = True) -> torch.Tensor:
        """Project flattened per-example gradients ``(b, p)`` (the dense equivalent of the hooks)."""
        self._check_input(grads)
        grads = grads.to(torch.float32)
        slices = self._slices()
        parts = []
        for layer in self.layers:
            w = self._layer_grad(grads, layer, slices)
            proj = torch.einsum("boi,oa,ic->bac", w, layer.p_out, layer.p_in)
            parts.append(proj.reshape(len(w), -1)[:, : layer.proj_dim] * (1.0 / math.sqrt(layer.proj_dim)))
        if self.fallback is not None:
            parts.append(self.fallback.project(torch.cat([grads[:, slices[n]] for n in self.fallback_names], 1),
                                               more_to_come))
        return torch.cat(parts, dim=1)

    def matrix(self) -> torch.Tensor:
        """The dense ``(p, k)`` matrix ``P`` the factorized projection equals (small models only)."""
        eye = torch.eye(self.grad_dim)
        return torch.cat([self.project(eye[i : i + 512]) for i in range(0, self.grad_dim, 512)])

    # -- the fast path: hooks on one batched forward and backward --

    @staticmethod
    def _in_side(layer: _Layer, a: torch.Tensor) -> torch.Tensor:
        """``P_in^T a'`` for a layer's inputs: ``(b, k_in)``, or ``(b, T, k_in)`` over a convolution's
        output positions. For a convolution the unfolded patches are never formed: projecting every
        patch with ``P_in`` is the convolution of the input with ``P_in``'s columns as filters."""
        p_in = layer.p_in
        weights, bias_row = (p_in[:-1], p_in[-1]) if layer.has_bias else (p_in, None)
        if isinstance(layer.module, nn.Conv2d):
            m = layer.module
            filters = weights.T.reshape(layer.k_in, *m.weight.shape[1:]).contiguous()
            out = F.conv2d(a, filters, None, m.stride, m.padding, m.dilation).flatten(2).transpose(1, 2)
        else:
            out = a @ weights
        return out if bias_row is None else out + bias_row

    @staticmethod
    def _out_side(layer: _Layer, g: torch.Tensor) -> torch.Tensor:
        """``P_out^T g`` for the gradients at a layer's output: ``(b, k_out)`` or ``(b, T, k_out)``."""
        if isinstance(layer.module, nn.Conv2d):
            g = g.flatten(2).transpose(1, 2)
        return g @ layer.p_out

    def features(self, model: nn.Module, output_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 x: torch.Tensor, y: torch.Tensor,
                 fallback_grads: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """``(b, k)`` features of a batch, from layer inputs and output gradients.

        ``output_fn(logits, y)`` gives the per-example model output (``(b,)``);
        ``fallback_grads(x, y)`` the flattened per-example gradients of the
        fallback parameters (needed only when there are some).
        """
        return self.features_and_logits(model, output_fn, x, y, fallback_grads)[0]

    def features_and_logits(self, model: nn.Module, output_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                            x: torch.Tensor, y: torch.Tensor,
                            fallback_grads: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                            out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`features` written into ``out`` (``(b, k)``, when given: no concatenation), and the
        batch's logits from the same forward pass (detached), for the out-to-loss weights."""
        inputs: dict[int, torch.Tensor] = {}
        outputs: dict[int, torch.Tensor] = {}
        handles = []
        for layer in self.layers:
            def hook(module, args, out, i=layer.index):
                inputs[i] = args[0].detach()
                outputs[i] = out
            handles.append(layer.module.register_forward_hook(hook))
        try:
            with torch.enable_grad():
                logits = call_model(model, x)
                total = output_fn(logits, y).sum()
                grads = torch.autograd.grad(total, [outputs[layer.index] for layer in self.layers])
        finally:
            for h in handles:
                h.remove()
        if self.fallback is not None and fallback_grads is None:
            raise FedtrakError("this model has parameters outside Linear/Conv2d layers: the factorized "
                               "projector needs their per-example gradients")
        if out is None:
            out = torch.empty((len(y), self.proj_dim), dtype=torch.float32)
        start = 0
        with torch.no_grad():
            for layer, g in zip(self.layers, grads):
                self._combine(self._out_side(layer, g), self._in_side(layer, inputs[layer.index]), layer,
                              out[:, start:start + layer.proj_dim])
                start += layer.proj_dim
        if self.fallback is not None:
            out[:, start:] = self.fallback.project(fallback_grads(x, y), more_to_come=True)
        return out, logits.detach()


def fallback_gradient_fn(model: nn.Module, names: list[str],
                         output_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
                         ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Per-example gradients of ``output_fn`` with respect to the parameters ``names`` only."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    fixed = {n: p for n, p in params.items() if n not in names}

    def single(sub, x, y):
        logits = call_one(model, ({**fixed, **sub}, buffers), x)
        return output_fn(logits, y.unsqueeze(0)).squeeze(0)

    per_example = vmap(grad(single), in_dims=(None, 0, 0))

    def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        g = per_example({n: params[n] for n in names}, x, y)
        return torch.cat([g[n].reshape(len(y), -1) for n in names], dim=1)

    return run

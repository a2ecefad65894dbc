"""Factorized (per-layer Kronecker) random projection, LoGra-style: no per-example gradient is formed.

For a Linear layer ``y = W a + b`` the per-example gradient of the output is
``g a'^T`` (``g`` the gradient at the layer's output, ``a' = [a, 1]`` its
input with a 1 for the bias); for a Conv2d layer it is ``sum_t g_t a'_t^T``
over output positions ``t`` (``a'_t`` the unfolded input patch). fedtrak
projects each side with its own small seeded Rademacher matrix and forms

    phi_l = vec(P_out^T (sum_t g_t a'_t^T) P_in) = sum_t (P_out^T g_t) kron (P_in^T a'_t),

which equals the dense projection of the layer's flattened gradient with
``P_l = P_out kron P_in`` (tested). Only ``(batch, k_out)`` and ``(batch, k_in)``
arrays are made from hooks on one batched forward and backward pass. Over a
sequence (a transformer block's Linear layers see ``(batch, positions, d)``) the
sum runs over positions, ``sum_t (P_out^T g_t) kron (P_in^T a'_t)``, so a text costs
``O(T (d_in k_in + d_out k_out))`` per layer whatever the layer's size.

The other layers of a transformer are read from hooks too. An Embedding's
gradient is ``sum_t g_t e_{id_t}^T``: its input side is the row ``P_in[id_t]``. A
Hugging Face ``Conv1D`` (GPT-2's Linear, weight stored transposed) is a Linear.
A LayerNorm's (or RMSNorm's) per-example gradient is small (``sum_t g_t * x^_t``
and ``sum_t g_t``, ``x^`` the normalized input): it is formed from the hooks and
projected as one input side with a one-row output side. A layer applied to a
tensor shared by the batch (position ids of shape ``(1, T)``) has its output
expanded to the batch in the hook, so each example's gradient is its own.

Layout: the projection dimension ``k`` is split over the layers in
proportion to their parameter counts (each at most its own count), and each
layer's ``k_l`` takes the first ``k_l`` of the ``k_out x k_in`` Kronecker
coordinates (``k_out k_in >= k_l``, as square as the layer allows), scaled by
``1 / sqrt(k_l)`` so that ``E[P_l P_l^T] = I``. Trainable parameters outside
the layers read from hooks (BatchNorm, grouped convolutions) fall back to the exact
path: their per-example gradients from ``torch.func``, projected by a dense
seeded Rademacher block projector of the remaining dimension. A weight shared
by two layers (an LM head tied to its token embedding) is one layer with two
uses: each use's sides are projected with the same two matrices, the head's
with its sides swapped (its output side is the embedding's input side), and the
uses' terms add up as their gradients do.

Which layers are read, and how each is described: :mod:`fedtrak.trak.projectors.layers`.

Seed contract: layer ``l``'s ``P_in`` comes from ``SeedSequence([seed, l, 0])``,
its ``P_out`` from ``SeedSequence([seed, l, 1])`` (Philox, unscaled +-1); the
fallback projector uses ``derive_seed(seed, FALLBACK_STREAM)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedtrak.config.seeds import derive_seed
from fedtrak.data.inputs import call_model
from fedtrak.errors import FedtrakError
from fedtrak.trak.per_example import per_example_gradients
from fedtrak.trak.projectors.base import Projector
from fedtrak.trak.projectors.dense import RademacherProjector
from fedtrak.trak.projectors.layers import Layer, Use, discover, norm_grads, positions

#: Seed stream of the dense projector of parameters outside supported layers.
FALLBACK_STREAM = 1_000_003


def _signs(seed: int, layer: int, side: int, rows: int, cols: int) -> torch.Tensor:
    rng = np.random.Generator(np.random.Philox(np.random.SeedSequence([seed, layer, side])))
    bits = rng.integers(0, 2, size=(rows, cols), dtype=np.int8)
    return torch.from_numpy(bits.astype(np.float32) * 2.0 - 1.0)


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
        self.layers: list[Layer] = discover(model)
        covered = {name for layer in self.layers for name in layer.params}
        self.fallback_names = [n for n in names if n not in covered]
        fallback_dim = sum(counts[n] for n in self.fallback_names)
        sizes = [layer.num_params for layer in self.layers] + ([fallback_dim] if fallback_dim else [])
        if not self.layers:
            raise FedtrakError("the factorized projector needs at least one Linear, Conv2d, Embedding or LayerNorm "
                               "layer; use --projector rademacher for this model")
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

    def _layer_grad(self, grads: torch.Tensor, layer: Layer, slices: dict[str, slice]) -> torch.Tensor:
        """``(b, out, in')`` gradient of one layer from flattened gradients."""
        if layer.kind == "norm":  # one row: the weight's gradient, then the bias's
            return torch.cat([grads[:, slices[name]] for name in layer.params], dim=1).unsqueeze(1)
        w = grads[:, slices[layer.params[0]]]
        w = (w.reshape(len(grads), -1, layer.out_dim).transpose(1, 2) if layer.transposed
             else w.reshape(len(grads), layer.out_dim, -1))
        if layer.has_bias:
            w = torch.cat([w, grads[:, slices[layer.params[1]]].unsqueeze(2)], dim=2)
        return w

    def _combine(self, g_proj: torch.Tensor, a_proj: torch.Tensor, layer: Layer,
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
    def _sides(layer: Layer, use: Use, a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(P_out^T g, P_in^T a')`` of one use of a layer: ``(b, k_out)`` and ``(b, k_in)``, or
        ``(b, T, .)`` over a sequence's or a convolution's positions. For a convolution the
        unfolded patches are never formed: projecting every patch with ``P_in`` is the convolution
        of the input with ``P_in``'s columns as filters. An Embedding's id side is the row of its
        matrix at each token id (none at its padding id); a norm's input side is its per-example
        gradient, projected, beside its one-row output side. A swapped use (a head tied to an
        embedding) projects its output gradients on the layer's input side and its inputs on the
        output side."""
        p_out, p_in = (layer.p_in, layer.p_out) if use.swapped else (layer.p_out, layer.p_in)
        if use.kind == "norm":
            return g.new_ones((len(g), 1)) @ p_out, norm_grads(layer, a, g) @ p_in
        if use.kind == "embedding":
            rows = p_in[a.long()]
            if use.module.padding_idx is not None:  # torch gives the padding row no gradient
                rows = rows * (a != use.module.padding_idx).unsqueeze(-1).to(rows.dtype)
            out_side, in_side = positions(g @ p_out), positions(rows)
        elif use.kind == "conv":
            m = use.module
            weights, bias_row = (p_in[:-1], p_in[-1]) if layer.has_bias else (p_in, None)
            filters = weights.T.reshape(layer.k_in, *m.weight.shape[1:]).contiguous()
            in_side = F.conv2d(a, filters, None, m.stride, m.padding, m.dilation).flatten(2).transpose(1, 2)
            out_side = g.flatten(2).transpose(1, 2) @ p_out
            in_side = in_side if bias_row is None else in_side + bias_row
        else:
            weights, bias_row = (p_in[:-1], p_in[-1]) if layer.has_bias and not use.swapped else (p_in, None)
            out_side, in_side = positions(g @ p_out), positions(a @ weights)
            in_side = in_side if bias_row is None else in_side + bias_row
        return (in_side, out_side) if use.swapped else (out_side, in_side)

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
        inputs: dict[tuple[int, int], torch.Tensor] = {}
        outputs: dict[tuple[int, int], torch.Tensor] = {}
        handles = []
        batch = len(y)
        for layer in self.layers:
            for u, use in enumerate(layer.uses):
                def hook(module, args, out, key=(layer.index, u), name=layer.name):
                    if key in outputs:
                        raise FedtrakError(f"layer {name or '(model)'} runs more than once in a forward pass: the "
                                           "factorized projector reads one call per layer; use --projector rademacher")
                    a, shared = args[0], batch > 1 and out.shape[0] == 1 and args[0].shape[0] == 1
                    if shared:  # applied to a tensor the batch shares (position ids): a copy per example
                        a, out = a.expand(batch, *a.shape[1:]), out.expand(batch, *out.shape[1:]).contiguous()
                    inputs[key], outputs[key] = a.detach(), out
                    return out if shared else None
                handles.append(use.module.register_forward_hook(hook))
        try:
            with torch.enable_grad():
                logits = call_model(model, x)
                total = output_fn(logits, y).sum()
                for key, value in outputs.items():
                    if value.shape[0] != batch:
                        raise FedtrakError(f"layer {self.layers[key[0]].name or '(model)'} returns {tuple(value.shape)} "
                                           f"for a batch of {batch}: the factorized projector needs the batch first")
                found = torch.autograd.grad(total, list(outputs.values()), allow_unused=True)
        finally:
            for h in handles:
                h.remove()
        grads = dict(zip(outputs, found))
        if self.fallback is not None and fallback_grads is None:
            raise FedtrakError("this model has parameters outside Linear/Conv2d layers: the factorized "
                               "projector needs their per-example gradients")
        if out is None:
            out = torch.empty((len(y), self.proj_dim), dtype=torch.float32)
        start = 0
        with torch.no_grad():
            for layer in self.layers:
                part = out[:, start:start + layer.proj_dim]
                sides = [self._sides(layer, use, inputs[(layer.index, u)], grads[(layer.index, u)])
                         for u, use in enumerate(layer.uses) if grads.get((layer.index, u)) is not None]
                if not sides:  # the layer did not run, or the output does not depend on it
                    part.zero_()
                elif len(sides) == 1:
                    self._combine(*sides[0], layer, part)
                else:  # every use's positions in one sum
                    per_position = [(o if o.ndim == 3 else o[:, None], i if i.ndim == 3 else i[:, None]) for o, i in sides]
                    self._combine(torch.cat([o for o, _ in per_position], 1), torch.cat([i for _, i in per_position], 1),
                                  layer, part)
                start += layer.proj_dim
        if self.fallback is not None:
            out[:, start:] = self.fallback.project(fallback_grads(x, y), more_to_come=True)
        return out, logits.detach()


def fallback_gradient_fn(model: nn.Module, names: list[str],
                         output_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
                         ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Flattened per-example gradients ``(b, p')`` of ``output_fn`` with respect to the parameters
    ``names`` only (:func:`~fedtrak.trak.per_example.per_example_gradients`)."""
    gradients = per_example_gradients(model, names, output_fn)

    def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        g = gradients(x, y)
        return torch.cat([g[n].reshape(len(y), -1) for n in names], dim=1)

    return run

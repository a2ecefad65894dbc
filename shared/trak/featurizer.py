"""TRAK features: projected per-example gradients of the model output, out-to-loss and curvature weights.

Per-example gradients come from ``torch.func`` (``vmap(grad(functional_call))``),
batched; they are gathered into chunks of at most ``chunk_bytes`` of gradient
memory and projected chunk by chunk, so memory is bounded by the chunk, never
by the size of the data set. The model runs in eval mode (BatchNorm uses its
running statistics, dropout is off).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedtrak.data.inputs import call_model, take, to_tensors
from fedtrak.data.modelout import ModelOutput
from fedtrak.errors import FedtrakError
from fedtrak.trak.per_example import per_example_gradients
from fedtrak.trak.projectors import Projector
from fedtrak.trak.projectors.factorized import FactorizedProjector, fallback_gradient_fn

#: Default gradient memory per projected chunk.
DEFAULT_CHUNK_BYTES = 256 << 20


@dataclass
class FeatureChunk:
    """Features of examples ``[start, start + len(out_to_loss))`` of the input."""

    start: int
    features: np.ndarray  # (b, k) float32
    out_to_loss: np.ndarray  # (b,) float32
    curvature: np.ndarray  # (b,) float32


@dataclass
class Features:
    """Features of a whole data set for one checkpoint, with each example's out-to-loss weight
    and curvature weight (see :mod:`fedtrak.data.modelout`)."""

    features: np.ndarray  # (n, k) float32
    out_to_loss: np.ndarray  # (n,) float32
    curvature: np.ndarray | None = None  # (n,) float32; None: every weight 1


def trainable_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters TRAK differentiates (those with ``requires_grad``), detached."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


class Featurizer:
    """Computes TRAK features of one model (one checkpoint) with one projector.

    Args:
        model: the model at the checkpoint's parameters.
        output: the model output function.
        projector: maps flattened gradients to ``k`` dims; its ``grad_dim``
            must equal the number of trainable parameters.
        batch_size: examples per ``vmap`` call.
        chunk_bytes: gradient memory gathered before one projection call.
    """

    def __init__(
        self,
        model: nn.Module,
        output: ModelOutput,
        projector: Projector,
        batch_size: int = 256,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> None:
        self.model = model.eval()
        self.output = output
        self.projector = projector
        self.params = trainable_params(model)
        self.grad_dim = sum(p.numel() for p in self.params.values())
        if projector.grad_dim != self.grad_dim:
            raise FedtrakError(
                f"projector was built for {projector.grad_dim} parameters, the model has {self.grad_dim}"
            )
        if batch_size < 1:
            raise FedtrakError(f"batch size must be positive, got {batch_size}")
        self.batch_size = int(batch_size)
        per_example = self.grad_dim * 4
        self.chunk_examples = max(self.batch_size, int(chunk_bytes) // per_example)
        self._factorized = isinstance(projector, FactorizedProjector)
        self._fallback = None
        if self._factorized:  # no per-example gradient is formed: chunks are bounded by the features
            self.chunk_examples = max(self.batch_size, int(chunk_bytes) // (projector.proj_dim * 4 * 8))
            if projector.fallback_names:
                self._fallback = fallback_gradient_fn(self.model, projector.fallback_names, self.output.output)

        self._per_example_grad = per_example_gradients(self.model, list(self.params), self.output.output)

    def per_example_grads(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Flattened per-example gradients of the model output: ``(b, p)`` float32."""
        grads = self._per_example_grad(x, y)
        return torch.cat([g.reshape(len(y), -1) for g in grads.values()], dim=1)

    def _grads_into(self, out: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> None:
        """Write a batch's flattened per-example gradients into ``out`` parameter by parameter."""
        grads = self._per_example_grad(x, y)
        col = 0
        for name in list(grads):
            g = grads.pop(name)  # freed as soon as it is copied
            out[:, col : col + g[0].numel()] = g.reshape(len(y), -1)
            col += g[0].numel()

    @torch.no_grad()
    def out_to_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Out-to-loss weights ``q`` of a batch: ``(b,)``."""
        return self.output.out_to_loss(call_model(self.model, x), y)

    @torch.no_grad()
    def weights(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Out-to-loss and curvature weights of a batch in one forward pass: ``(b, 2)``."""
        return self._weights_of(call_model(self.model, x), y)

    @torch.no_grad()
    def _weights_of(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.output.out_to_loss(logits, y), self.output.curvature(logits, y)], dim=1)

    def _batch_weights(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.weights(take(x, slice(i, i + self.batch_size)), y[i : i + self.batch_size])
                          for i in range(0, len(y), self.batch_size)])

    def _factorized_chunk(self, x: torch.Tensor, y: torch.Tensor, start: int,
                          out: np.ndarray | None = None) -> FeatureChunk:
        """Features of one chunk from layer inputs and output gradients (hooks), batch by batch
        (into ``out``, ``(len(y), k)`` float32, when given)."""
        phi_all = (torch.empty((len(y), self.projector.proj_dim), dtype=torch.float32) if out is None
                   else torch.from_numpy(out))
        qw = torch.empty((len(y), 2), dtype=torch.float32)
        for i in range(0, len(y), self.batch_size):  # written in place: no concatenation
            xb, yb = take(x, slice(i, i + self.batch_size)), y[i : i + self.batch_size]
            _, logits = self.projector.features_and_logits(self.model, self.output.output, xb, yb, self._fallback,
                                                           out=phi_all[i : i + self.batch_size])
            qw[i : i + self.batch_size] = self._weights_of(logits, yb)  # the same forward pass's logits
        _check_finite(phi_all, qw, start)
        return _chunk(start, phi_all, qw)

    def iter_chunks(self, x: np.ndarray, y: np.ndarray, first: int = 0,
                    out: np.ndarray | None = None) -> Iterator[FeatureChunk]:
        """Yield features chunk by chunk, in input order, from example ``first`` on (a resumed run);
        with ``out`` (``(n, k)`` float32), the factorized projector writes them into it.

        Raises:
            FedtrakError: if a gradient or out-to-loss weight is NaN or infinite
                (names the offending example positions).
        """
        n = len(y)
        for start in range(first, n, self.chunk_examples):
            stop = min(n, start + self.chunk_examples)
            xc, yc = to_tensors(x[start:stop], y[start:stop])
            if self._factorized:
                yield self._factorized_chunk(xc, yc, start, None if out is None else out[start:stop])
                continue
            grads = torch.empty((stop - start, self.grad_dim), dtype=torch.float32)  # filled in place: no
            for i in range(0, stop - start, self.batch_size):  # second copy of the chunk, as a cat would make
                self._grads_into(grads[i : i + self.batch_size], take(xc, slice(i, i + self.batch_size)),
                                 yc[i : i + self.batch_size])
            qw = self._batch_weights(xc, yc)
            _check_finite(grads, qw, start)
            phi = self.projector.project(grads, more_to_come=n > self.chunk_examples)
            del grads  # before the next chunk's buffer is allocated: one chunk in memory at a time
            yield _chunk(start, phi, qw)

    def featurize(
        self, x: np.ndarray, y: np.ndarray, progress: Callable[[int], None] | None = None
    ) -> Features:
        """Features of all examples: ``(n, k)`` and ``(n,)`` arrays.

        ``progress`` (e.g. a tqdm bar's ``update``) is called with the number
        of examples finished after each chunk.
        """
        n = len(y)
        feats = np.empty((n, self.projector.proj_dim), dtype=np.float32)
        q, w = np.empty(n, dtype=np.float32), np.empty(n, dtype=np.float32)
        for chunk in self.iter_chunks(x, y, out=feats):
            b = len(chunk.out_to_loss)
            if not np.shares_memory(chunk.features, feats):  # the factorized projector wrote in place
                feats[chunk.start : chunk.start + b] = chunk.features
            q[chunk.start : chunk.start + b] = chunk.out_to_loss
            w[chunk.start : chunk.start + b] = chunk.curvature
            if progress is not None:
                progress(b)
        return Features(feats, q, w)


def _chunk(start: int, phi: torch.Tensor, qw: torch.Tensor) -> FeatureChunk:
    weights = qw.numpy().astype(np.float32)
    return FeatureChunk(start, phi.numpy(), np.ascontiguousarray(weights[:, 0]), np.ascontiguousarray(weights[:, 1]))


def _check_finite(grads: torch.Tensor, qw: torch.Tensor, offset: int) -> None:
    # A row sum is finite only if every entry is (or it overflows, itself a diverged gradient);
    # torch.isfinite on the whole chunk would allocate temporaries 1.5 times its size.
    bad = (~torch.isfinite(grads.sum(dim=1))) | (~torch.isfinite(qw).all(dim=1))
    if bool(bad.any()):
        rows = (torch.nonzero(bad).flatten() + offset).tolist()
        shown = ", ".join(str(r) for r in rows[:5]) + (" ..." if len(rows) > 5 else "")
        raise FedtrakError(
            f"non-finite gradient or output for {len(rows)} example(s) (positions {shown}): "
            "the checkpoint may have diverged or the inputs contain NaN"
        )

"""Model output functions: what TRAK differentiates, its out-to-loss weight and its curvature weight.

A :class:`ModelOutput` maps a batch of logits and labels to one scalar per
example (the quantity whose gradient becomes the TRAK feature), to the
out-to-loss weight ``q`` that multiplies the kernel term in the score, and to
the curvature weight ``w``: the second derivative of the loss along the
output, which weights each example's term of the curvature-weighted kernel
``sum_i w_i phi_i phi_i^T`` (the Gauss-Newton curvature TRAK's derivation
starts from). ``curvature_bound`` bounds ``w``; it scales the sensitivity of
a weighted Gram release under differential privacy.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class ModelOutput(ABC):
    """Per-example model output ``f(z; theta)`` and out-to-loss weight ``q``."""

    name: str = "abstract"

    @abstractmethod
    def output(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Return ``f`` for each example: shape ``(batch,)``.

        Args:
            logits: model outputs of shape ``(batch, classes)``.
            labels: integer labels of shape ``(batch,)``.
        """

    @abstractmethod
    def out_to_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Return the out-to-loss weight ``q`` for each example: shape ``(batch,)``."""

    #: The largest curvature weight the output can give (the weighted Gram's sensitivity factor).
    curvature_bound: float = 1.0

    def curvature(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Return the curvature weight ``w`` in ``[0, curvature_bound]`` for each example: shape
        ``(batch,)``. The default is 1 for every example (no weighting)."""
        return torch.ones(logits.shape[0], dtype=logits.dtype)


class ClassificationMargin(ModelOutput):
    """The TRAK margin for multiclass classification.

    ``f = logit_y - logsumexp(logits without y)`` (the log-odds of the true
    class) and ``q = 1 - p_y``, the derivative of the cross-entropy loss with
    respect to ``-f``. Same definitions as traker's ``ImageClassificationModelOutput``.
    """

    name = "classification-margin"

    def output(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Margin ``logit_y - logsumexp_{c != y} logit_c`` per example."""
        true = logits.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)
        mask = torch.arange(logits.shape[-1], device=logits.device) == labels.long().unsqueeze(-1)
        others = logits.masked_fill(mask, float("-inf"))
        return true - torch.logsumexp(others, dim=-1)

    def out_to_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``1 - softmax(logits)_y`` per example."""
        return 1.0 - self._true_prob(logits, labels)

    #: ``p (1 - p) <= 1/4``.
    curvature_bound = 0.25

    def curvature(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``p (1 - p)`` with ``p = softmax(logits)_y``: the cross-entropy loss is
        ``log(1 + exp(-f))`` of the margin ``f``, whose second derivative in ``f`` this is."""
        p = self._true_prob(logits, labels)
        return p * (1.0 - p)

    @staticmethod
    def _true_prob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits, dim=-1)
        return probs.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)

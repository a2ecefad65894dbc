"""Model output functions: what TRAK differentiates, and the out-to-loss weight.

A :class:`ModelOutput` maps a batch of logits and labels to one scalar per
example (the quantity whose gradient becomes the TRAK feature) and to the
out-to-loss weight ``q`` that multiplies the kernel term in the score.
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
        probs = torch.softmax(logits, dim=-1)
        return 1.0 - probs.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)

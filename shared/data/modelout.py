"""Model output functions: what TRAK differentiates, its out-to-loss weight and its curvature weight.

A :class:`ModelOutput` maps a batch of logits and labels to one scalar per
example (the quantity whose gradient becomes the TRAK feature), to the
out-to-loss weight ``q`` that multiplies the kernel term in the score, and to
the curvature weight ``w``: the second derivative of the loss along the
output, which weights each example's term of the curvature-weighted kernel
``sum_i w_i phi_i phi_i^T`` (the Gauss-Newton curvature TRAK's derivation
starts from). ``curvature_bound`` bounds ``w``; it scales the sensitivity of
a weighted Gram release under differential privacy.

An output also says what its labels are (class indices, or real values for a
regression), the loss fedtrak trains checkpoints with, and how good a model is on
a labelled set (accuracy, or R^2). :class:`ClassificationMargin` is TRAK's choice
for classifiers, :class:`Regression` the squared error's.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import numpy as np
import torch
import torch.nn.functional as F

from fedtrak.errors import FedtrakError


class ModelOutput(ABC):
    """Per-example model output ``f(z; theta)`` and out-to-loss weight ``q``.

    A subclass defines :meth:`output` and :meth:`out_to_loss`; the defaults of the rest are those
    of a classifier trained with cross-entropy (labels are class indices).
    """

    name: str = "abstract"
    #: Whether labels are class indices in ``[0, num_classes)`` (else real values).
    classes: bool = True
    #: The largest ``|q|`` can be (``None``: unbounded). Releases whose size depends on ``q`` (owner
    #: summaries and values, features mode) are differentially private only with a bound.
    out_to_loss_bound: float | None = 1.0

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

    def check_outputs(self, logits: torch.Tensor, num_classes: int) -> None:
        """Refuse a model whose outputs (for a batch) do not fit this output function; the default
        takes ``(batch, num_classes)`` logits.

        Raises:
            FedtrakError: naming the shape it got and the one it needs.
        """
        if logits.ndim != 2 or logits.shape[1] != num_classes:
            hint = (": a model with one output is a regression (give output=fedtrak.Regression())"
                    if logits.shape[-1] == 1 or logits.ndim == 1 else "")
            raise FedtrakError(f"the model returns shape {tuple(logits.shape)}, expected (batch, {num_classes}) "
                               f"logits{hint}")

    def check_private(self, task_name: str) -> None:
        """Refuse differential privacy for an output whose out-to-loss weights have no bound.

        Raises:
            FedtrakError: naming the task and its output.
        """
        if self.out_to_loss_bound is None:
            raise FedtrakError(f"task {task_name}: its output ({self.name}) has out-to-loss weights without a "
                               "bound, so its releases cannot be differentially private: run it without "
                               "epsilon and noise_multiplier (differential privacy supports classification "
                               "outputs)")

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The mean training loss of a batch (checkpoints, FedAvg and DP-SGD train with it);
        default: cross-entropy."""
        return F.cross_entropy(logits, labels.long())

    @torch.no_grad()
    def quality(self, logits: torch.Tensor, labels: torch.Tensor) -> float:
        """How good the model is on a labelled set, higher is better (default: top-1 accuracy)."""
        return float((logits.argmax(-1) == labels).double().mean())

    def labels(self, y: np.ndarray, num_classes: int, what: str) -> np.ndarray:
        """``y`` as this output's labels: class indices in ``[0, num_classes)`` as int64.

        Raises:
            FedtrakError: naming ``what`` if they are not.
        """
        y = np.asarray(y)
        if y.ndim != 1:
            raise FedtrakError(f"{what}: labels must be one number per example, got shape {y.shape} (a causal "
                               "language model's token labels: give output=fedtrak.SequenceMargin())")
        if not np.issubdtype(y.dtype, np.integer):
            raise FedtrakError(f"{what}: labels must be integer class indices, got {y.dtype} (for real-valued "
                               "targets give output=fedtrak.Regression())")
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise FedtrakError(f"{what}: labels outside [0, {num_classes})")
        return np.ascontiguousarray(y, dtype=np.int64)


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


class Regression(ModelOutput):
    """Squared-error regression: the model's one output is the prediction.

    ``f`` is the prediction itself, the loss ``(f - y)^2 / 2``, so the out-to-loss weight is
    ``q = -dL/df = y - f`` (the residual: an example the model under-predicts pulls predictions
    up) and the curvature weight ``d^2 L / df^2 = 1``. Labels are real values. The residual
    has no bound, so the releases that carry ``q`` are not differentially private for a
    regression (:attr:`ModelOutput.out_to_loss_bound`): a private run refuses it by name.
    """

    name = "regression"
    classes = False
    out_to_loss_bound = None

    @staticmethod
    def _prediction(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if logits.ndim == 2 and logits.shape[1] == 1:
            return logits[:, 0]
        if logits.ndim == 1:
            return logits
        raise FedtrakError(f"a regression model returns one value per example, got shape {tuple(logits.shape)}")

    def check_outputs(self, logits: torch.Tensor, num_classes: int) -> None:
        """A regression model returns one value per example (``(batch,)`` or ``(batch, 1)``)."""
        self._prediction(logits, torch.zeros(len(logits)))

    def output(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The prediction per example."""
        return self._prediction(logits, labels)

    def out_to_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The residual ``y - f`` per example."""
        return labels.to(logits.dtype) - self._prediction(logits, labels)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Half the mean squared error."""
        return 0.5 * F.mse_loss(self._prediction(logits, labels), labels.to(logits.dtype))

    @torch.no_grad()
    def quality(self, logits: torch.Tensor, labels: torch.Tensor) -> float:
        """The coefficient of determination R^2 (1: perfect, 0: the labels' mean)."""
        y = labels.double()
        residual = float(((y - self._prediction(logits, labels).double()) ** 2).sum())
        spread = float(((y - y.mean()) ** 2).sum())
        return 1.0 - residual / spread if spread > 0 else (1.0 if residual == 0 else -math.inf)

    def labels(self, y: np.ndarray, num_classes: int, what: str) -> np.ndarray:
        """``y`` as finite real values (float32).

        Raises:
            FedtrakError: naming ``what`` if they are not finite numbers.
        """
        y = np.asarray(y)
        if y.ndim != 1:
            raise FedtrakError(f"{what}: regression targets must be one number per example, got shape {y.shape}")
        if not np.issubdtype(y.dtype, np.number) or not np.all(np.isfinite(y)):
            raise FedtrakError(f"{what}: regression targets must be finite numbers")
        return np.ascontiguousarray(y, dtype=np.float32)


#: Label of a position a sequence output skips (padding, a prompt): Hugging Face's ignore index.
IGNORE = -100


class SequenceMargin(ModelOutput):
    """A causal language model's output: the log-odds of a text's tokens, decomposed per token.

    Labels are token ids aligned with the inputs, as Hugging Face takes them (``labels =
    input_ids``, :data:`IGNORE` where a position is not predicted: padding, a prompt); the logits
    at position ``t`` predict the label at ``t + 1``. Each predicted token ``t`` has TRAK's
    classification margin ``m_t = logit_{y_t} - logsumexp(other logits)`` (the log-odds
    ``log(p_t / (1 - p_t))``) and out-to-loss term ``1 - p_t``. The output differentiated is the
    continuation's ``f = sum_t m_t``; the example's out-to-loss weight ``q`` is the mean of its
    tokens' terms, and its curvature weight the mean of ``p_t (1 - p_t)``: one feature per text,
    so a text costs one gradient whatever its length (per-token weights would need one gradient
    per token). The training loss is the mean cross-entropy over predicted tokens.
    """

    name = "sequence-margin"
    curvature_bound = 0.25

    @staticmethod
    def _aligned(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(logits, targets, mask)`` of the predicted positions: ``(b, T-1, V)``, ``(b, T-1)``, ``(b, T-1)``."""
        targets = labels[:, 1:].long()
        mask = targets != IGNORE
        return logits[:, :-1], targets.clamp(min=0), mask

    def _tokens(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per predicted token: margin, probability of the true token, mask."""
        logits, targets, mask = self._aligned(logits, labels)
        true = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        others = logits.masked_fill(torch.arange(logits.shape[-1], device=logits.device) == targets.unsqueeze(-1),
                                    float("-inf"))
        margin = true - torch.logsumexp(others, dim=-1)  # log(p_t / (1 - p_t))
        return margin, torch.sigmoid(margin), mask

    @staticmethod
    def _mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        count = mask.sum(dim=1).clamp(min=1)
        return (values * mask).sum(dim=1) / count

    def check_outputs(self, logits: torch.Tensor, num_classes: int) -> None:
        """A causal LM returns ``(batch, positions, vocabulary)`` logits."""
        if logits.ndim != 3 or logits.shape[2] != num_classes:
            raise FedtrakError(f"the model returns shape {tuple(logits.shape)}, a causal language model's output "
                               f"needs (batch, positions, {num_classes}) logits over its vocabulary (give "
                               f"num_classes=the vocabulary size)")

    def output(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The sum of the predicted tokens' margins per text."""
        margin, _, mask = self._tokens(logits, labels)
        return (margin * mask).sum(dim=1)

    def out_to_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The mean of ``1 - p_t`` over each text's predicted tokens."""
        _, p, mask = self._tokens(logits, labels)
        return self._mean(1.0 - p, mask)

    def curvature(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The mean of ``p_t (1 - p_t)`` over each text's predicted tokens."""
        _, p, mask = self._tokens(logits, labels)
        return self._mean(p * (1.0 - p), mask)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy over the predicted tokens."""
        logits, targets, mask = self._aligned(logits, labels)
        per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
        return (per_token * mask.reshape(-1)).sum() / mask.sum().clamp(min=1)

    @torch.no_grad()
    def quality(self, logits: torch.Tensor, labels: torch.Tensor) -> float:
        """Next-token accuracy over the predicted tokens."""
        logits, targets, mask = self._aligned(logits, labels)
        hits = (logits.argmax(-1) == targets) & mask
        return float(hits.sum()) / max(1, int(mask.sum()))

    def labels(self, y: np.ndarray, num_classes: int, what: str) -> np.ndarray:
        """``y`` as ``(n, positions)`` int64 token ids in ``[0, num_classes)`` or :data:`IGNORE`.

        Raises:
            FedtrakError: naming ``what`` if they are not.
        """
        y = np.asarray(y)
        if y.ndim != 2 or not np.issubdtype(y.dtype, np.integer):
            raise FedtrakError(f"{what}: a language model's labels are (texts, positions) integer token ids, got "
                               f"{y.dtype} of shape {y.shape}")
        kept = y[y != IGNORE]
        if kept.size and (kept.min() < 0 or kept.max() >= num_classes):
            raise FedtrakError(f"{what}: token ids outside [0, {num_classes}) (mark skipped positions {IGNORE})")
        return np.ascontiguousarray(y, dtype=np.int64)

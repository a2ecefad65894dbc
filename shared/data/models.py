"""Model factories of the built-in tasks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def count_params(model: nn.Module) -> int:
    """Number of trainable parameters (those TRAK differentiates): the gradient dimension p."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def frozen_keys(model: nn.Module) -> frozenset[str]:
    """The ``state_dict`` keys of parameters that do not train (``requires_grad=False``: a pretrained
    base under LoRA adapters, frozen blocks), a tied weight under each of its names. FedAvg keeps
    them as the global model has them rather than averaging copies of them."""
    return frozenset(k for k, v in model.state_dict(keep_vars=True).items()
                     if isinstance(v, nn.Parameter) and not v.requires_grad)


def logistic_regression(in_features: int, num_classes: int) -> nn.Module:
    """Multinomial logistic regression: one linear layer on flattened inputs."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, num_classes))


def mlp(in_features: int, hidden: tuple[int, ...], num_classes: int) -> nn.Module:
    """A ReLU multilayer perceptron on flattened inputs."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def small_cnn(num_classes: int) -> nn.Module:
    """A two-convolution network for 1x28x28 images (18,378 parameters)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, kernel_size=5),  # 24x24
        nn.ReLU(),
        nn.MaxPool2d(2),  # 12x12
        nn.Conv2d(16, 32, kernel_size=5),  # 8x8
        nn.ReLU(),
        nn.MaxPool2d(2),  # 4x4
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, num_classes),
    )


class _Block(nn.Module):
    """A pre-norm transformer block: causal self-attention and an MLP, every projection an
    ``nn.Linear`` (so the factorized projector reads each one from its input and output)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, t, d = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5  # written out: vmap batches it
        future = torch.ones(t, t, dtype=torch.bool, device=h.device).triu(1)
        attn = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1) @ v
        h = h + self.proj(attn.transpose(1, 2).reshape(b, t, d))
        return h + self.down(F.gelu(self.up(self.norm2(h))))


class ByteTransformer(nn.Module):
    """A small causal transformer over byte tokens (id 0 pads; see :mod:`fedtrak.data.text`).

    With ``num_classes`` unset it is a language model: ``(batch, positions)`` ids give
    ``(batch, positions, vocab)`` next-token logits. With ``num_classes`` it classifies a text:
    the mean of its last hidden states over the text's (non-padding) positions, then a linear head.
    """

    def __init__(self, vocab: int, context: int, width: int = 64, layers: int = 2, heads: int = 2,
                 num_classes: int | None = None) -> None:
        super().__init__()
        self.embed, self.position = nn.Embedding(vocab, width), nn.Embedding(context, width)
        self.blocks = nn.ModuleList(_Block(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes or vocab)
        self.classify = num_classes is not None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.long()
        positions = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)  # per text: each
        h = self.embed(ids) + self.position(positions)  # example's own embedding gradient, read from hooks
        for block in self.blocks:
            h = block(h)
        h = self.norm(h)
        if not self.classify:
            return self.head(h)
        mask = (ids != 0).unsqueeze(-1).to(h.dtype)
        return self.head((h * mask).sum(1) / mask.sum(1).clamp(min=1.0))

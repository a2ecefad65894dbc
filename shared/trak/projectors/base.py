"""What every projector is: the interface and the seed contract of the dense ones."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from fedtrak.errors import FedtrakError

#: Rows per generated block. Part of the seed contract: changing it changes P.
BLOCK_ROWS = 4096


def check_fits(proj_dim: int, grad_dim: int) -> None:
    """Refuse a random projection to more dimensions than the gradient has.

    Raises:
        FedtrakError: naming k and the parameter count.
    """
    if proj_dim > grad_dim:
        raise FedtrakError(f"--proj-dim {proj_dim} exceeds the model's {grad_dim} parameters: "
                           "use a smaller k or the identity projector")


class Projector(ABC):
    """Maps per-example gradients ``(batch, p)`` to features ``(batch, k)``."""

    kind: str = "abstract"

    def __init__(self, grad_dim: int, proj_dim: int, seed: int) -> None:
        if grad_dim < 1:
            raise FedtrakError(f"gradient dimension must be positive, got {grad_dim}")
        if proj_dim < 1:
            raise FedtrakError(f"projection dimension must be positive, got {proj_dim}")
        self.grad_dim = int(grad_dim)
        self.proj_dim = int(proj_dim)
        self.seed = int(seed)

    @abstractmethod
    def project(self, grads: torch.Tensor, more_to_come: bool = True) -> torch.Tensor:
        """Project a float32 batch of flattened gradients: ``(b, p) -> (b, k)``.

        ``more_to_come=False`` tells the projector this is the only call it will
        see for a while, so building a cache for later calls cannot pay off.
        """

    @abstractmethod
    def matrix(self) -> torch.Tensor:
        """The whole ``(p, k)`` matrix, materialized (tests and small models only)."""

    def release(self) -> None:
        """Free any memory the projector holds (no-op by default)."""

    def describe(self) -> dict:
        """JSON-ready description: kind, dimensions, seed, block size."""
        return {
            "kind": self.kind,
            "grad_dim": self.grad_dim,
            "proj_dim": self.proj_dim,
            "seed": self.seed,
            "block_rows": BLOCK_ROWS,
            "scale": "1/sqrt(k)" if self.kind != "identity" else "1",
        }

    def _check_input(self, grads: torch.Tensor) -> None:
        if grads.ndim != 2 or grads.shape[1] != self.grad_dim:
            raise FedtrakError(
                f"projector expects gradients of shape (batch, {self.grad_dim}), got {tuple(grads.shape)}"
            )

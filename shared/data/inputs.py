"""Model inputs: one array per example, or named fields as Hugging Face models take them.

A task's inputs are a numpy array: float32, or int64 for integer inputs (token ids), or, for a
model called with keyword arguments (``model(input_ids=..., attention_mask=...)``), a structured
array with one field per argument (:func:`numeric_array` builds it from a dict of equal-length
arrays). Indexing, partitioning, saving a device's data file and shipping a task work on it as on
any array. Torch sees a tensor, or a dict of tensors (:func:`to_tensors`); :func:`take` slices
either and :func:`call_model` calls the model either way, taking the logits out of a Hugging Face
output object.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from fedtrak.errors import FedtrakError

#: What a model is called with: a tensor, or a dict of named tensors.
Batch = torch.Tensor | dict[str, torch.Tensor]


def _numbers(x: Any, what: str) -> np.ndarray:
    x = np.asarray(x)
    if np.issubdtype(x.dtype, np.integer):
        return np.ascontiguousarray(x, dtype=np.int64)
    if np.issubdtype(x.dtype, np.floating) or x.dtype == np.bool_:
        return np.ascontiguousarray(x, dtype=np.float32)
    raise FedtrakError(f"{what} must be numbers, got an array of {x.dtype}")


def numeric_array(x: Any) -> np.ndarray:
    """Inputs or labels as a model takes them: integers (token ids, class indices) as int64, every
    other number as float32 (contiguous; no copy when they already are); a dict of equal-length
    arrays (or a structured array) as a structured array of such fields.

    Raises:
        FedtrakError: if they are not numbers, or named fields of different lengths.
    """
    if isinstance(x, np.ndarray) and x.dtype.names and x.flags.c_contiguous and all(
            x.dtype[k].base in (np.dtype(np.int64), np.dtype(np.float32)) for k in x.dtype.names):
        return x  # named inputs already as they are kept: no copy per chunk of the featurizer
    if isinstance(x, Mapping) or (isinstance(x, np.ndarray) and x.dtype.names):
        fields = {str(k): _numbers(x[k], f"input field {k!r}") for k in (x if isinstance(x, Mapping) else x.dtype.names)}
        lengths = {k: len(v) for k, v in fields.items()}
        if not fields or len(set(lengths.values())) != 1:
            raise FedtrakError(f"named inputs need one or more fields of one length each, got {lengths}")
        out = np.empty(next(iter(lengths.values())), dtype=[(k, v.dtype, v.shape[1:]) for k, v in fields.items()])
        for k, v in fields.items():
            out[k] = v
        return out
    return _numbers(x, "inputs")


def finite(x: np.ndarray) -> bool:
    """Whether every number of ``x`` (every field's, for named inputs) is finite."""
    return all(bool(np.all(np.isfinite(x[k]))) for k in x.dtype.names) if x.dtype.names else bool(np.all(np.isfinite(x)))


def to_tensors(x: np.ndarray, y: np.ndarray) -> tuple[Batch, torch.Tensor]:
    """Inputs (a tensor, or a dict of tensors for named inputs) and labels as torch, their kind kept
    (:func:`numeric_array`), sharing memory where the arrays allow."""
    x = numeric_array(x)
    inputs = ({k: torch.from_numpy(np.ascontiguousarray(x[k])) for k in x.dtype.names} if x.dtype.names
              else torch.from_numpy(x))
    return inputs, torch.from_numpy(numeric_array(y))


def take(batch: Batch, index: Any) -> Batch:
    """Rows ``index`` (a slice, indices or a mask) of a batch, named or not."""
    return {k: v[index] for k, v in batch.items()} if isinstance(batch, dict) else batch[index]


def call_model(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The model's outputs for ``batch``: ``model(**batch)`` for named inputs, else ``model(batch)``;
    from a Hugging Face output object, its ``logits``."""
    out = model(**batch) if isinstance(batch, dict) else model(batch)
    return out.logits if hasattr(out, "logits") else out


def call_one(model: nn.Module, tensors: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]],
             example: Batch) -> torch.Tensor:
    """The outputs for one example (a batch of one) with the model's parameters and buffers replaced
    by ``tensors`` (``torch.func.functional_call``; what per-example gradients differentiate)."""
    if isinstance(example, dict):
        out = functional_call(model, tensors, (), {k: v.unsqueeze(0) for k, v in example.items()})
    else:
        out = functional_call(model, tensors, (example.unsqueeze(0),))
    return out.logits if hasattr(out, "logits") else out

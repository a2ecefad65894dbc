"""A client featurizes its own data into its local store and computes its Gram matrices.

Features never leave the device in private mode: they are written, chunk by
chunk, to the memory-mapped :class:`fedtrak.client.store.FeatureStore`, and only
``Phi_c,m^T Phi_c,m`` (computed from the store in row chunks) is released.
A checkpoint already in the store from the same weights, projection and
data is not recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping

import numpy as np
import torch

from fedtrak.client.data import ClientData
from fedtrak.client.store import FeatureStore
from fedtrak.data.tasks import Task
from fedtrak.privacy.mechanisms import DPSettings, clip_scales
from fedtrak.trak.kernel import GramAccumulator
from fedtrak.trak.per_checkpoint import checkpoint_featurizer
from fedtrak.wire.job import Job

log = logging.getLogger("fedtrak.client")

#: Rows of the stored features per Gram update.
GRAM_ROWS = 8192


def fingerprint(job: Job, m: int, state: Mapping[str, torch.Tensor], data: ClientData) -> str:
    """What checkpoint ``m``'s features depend on: the projection, the weights and the data."""
    h = hashlib.sha256()
    s = job.settings
    spec = {"task": s.task.task, "projector": job.resolved.projector, "proj_dim": job.resolved.proj_dim,
            "seed": s.task.seed, "m": m}
    h.update(json.dumps(spec, sort_keys=True).encode())
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    h.update(data.digest.encode())
    return h.hexdigest()


def featurize_into_store(
    task: Task,
    data: ClientData,
    job: Job,
    checkpoints: Mapping[int, Mapping[str, torch.Tensor]],
    store: FeatureStore,
) -> dict[int, bool]:
    """Featurize ``data`` under every checkpoint into ``store``, chunk by chunk.

    A finished checkpoint is reused; an interrupted one continues from its
    last finished chunk. Returns, per checkpoint index, the rows computed now
    (0: reused whole).
    """
    computed = {}
    for m, state in sorted(checkpoints.items()):
        fp = fingerprint(job, m, state, data)
        if store.has(m, fp):
            log.info("checkpoint %d: reusing the stored features", m)
            computed[m] = 0
            continue
        featurizer = checkpoint_featurizer(task, dict(state), m, job.settings, job.resolved.projection)
        dim = featurizer.projector.proj_dim
        done = store.resume_point(m, len(data.y), dim, fp)
        if done:
            log.info("checkpoint %d: resuming after %d stored rows of %d", m, done, len(data.y))
        chunks = ((c.start, c.features, c.out_to_loss, c.curvature)
                  for c in featurizer.iter_chunks(data.x, data.y, done))
        store.write_chunks(m, len(data.y), dim, chunks, fp)
        featurizer.projector.release()
        computed[m] = len(data.y) - done
    return computed


def stored_gram(store: FeatureStore, m: int, scales: np.ndarray | None = None,
                weighted: bool = False, weight_bound: float = np.inf) -> tuple[np.ndarray, int]:
    """``(Phi^T Phi, n)`` of checkpoint ``m`` from the store, reading it in row chunks; each row
    multiplied by ``scales`` (clipping) where given; ``weighted``: ``Phi^T diag(w) Phi`` with the
    stored curvature weights, clamped to ``[0, weight_bound]`` (under DP, the bound the Gram's
    sensitivity assumes, whatever a task's output function returned)."""
    features, _ = store.read(m)
    curvature = store.read_curvature(m) if weighted else None
    acc = GramAccumulator(features.shape[1])
    for start in range(0, features.shape[0], GRAM_ROWS):
        block = np.asarray(features[start : start + GRAM_ROWS])
        if scales is not None:
            block = block * scales[start : start + GRAM_ROWS, None].astype(block.dtype)
        acc.add(block, None if curvature is None else np.clip(curvature[start : start + GRAM_ROWS], 0.0, weight_bound))
    return acc.matrix, acc.count


def _norms(store: FeatureStore, ms: list[int]) -> np.ndarray:
    """``(M, n)`` L2 norms of the stored features of checkpoints ``ms``, read in row chunks."""
    norms = []
    for m in ms:
        features, _ = store.read(m)
        norms.append(np.concatenate([np.linalg.norm(np.asarray(features[s : s + GRAM_ROWS], np.float64), axis=1)
                                     for s in range(0, features.shape[0], GRAM_ROWS)]))
    return np.stack(norms)


def stored_clip_scales(store: FeatureStore, ms: list[int], dp: DPSettings) -> dict[int, np.ndarray]:
    """Per-example factors that clip the stored features of checkpoints ``ms`` to ``dp.clip_norm``
    (per checkpoint or jointly); the store itself keeps the unclipped features."""
    return dict(zip(ms, clip_scales(_norms(store, ms), dp.clip_norm, dp.clip_mode)))


def stored_norms(store: FeatureStore, ms: list[int], clip_mode: str) -> np.ndarray:
    """One norm per example, the one clipping would act on: the largest over checkpoints
    (per-checkpoint clipping) or the joint norm (joint clipping)."""
    norms = _norms(store, ms)
    return np.sqrt((norms**2).sum(axis=0)) if clip_mode == "joint" else norms.max(axis=0)

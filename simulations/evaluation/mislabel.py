"""Mislabel detection: do flipped labels rank high in self-influence?

A run made with label flips (``--flip-fraction``) knows which examples were
flipped (``flipped.npy``) and, where released, every example's
self-influence (``self_influence.npy``: its score for itself as the query).
Mislabeled examples are hard to fit, so they have high self-influence.
Reported per example (AUROC; recall among the top ``flip rate`` fraction)
and per owner (each owner's mean self-influence, flipped owners against
clean ones).
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score

from fedtrak.errors import FedtrakError


def detection(scores: np.ndarray, positive: np.ndarray) -> dict:
    """AUROC of ``scores`` for the ``positive`` items and recall among the top
    ``positive.sum()`` items (recall at the flip rate), with the random baselines.

    Raises:
        FedtrakError: if shapes differ or one class is empty.
    """
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    if scores.shape != positive.shape or scores.ndim != 1:
        raise FedtrakError(f"scores {scores.shape} and labels {positive.shape} must be equal vectors")
    num_pos = int(positive.sum())
    if num_pos in (0, len(positive)):
        raise FedtrakError("detection needs both flipped and clean items")
    top = np.argsort(-scores, kind="stable")[:num_pos]
    return {"auroc": float(roc_auc_score(positive, scores)),
            "recall_at_flip_rate": float(positive[top].mean()),
            "num_flipped": num_pos, "num_items": len(positive),
            "random_auroc": 0.5, "random_recall": num_pos / len(positive)}


def mislabel_report(self_influence: np.ndarray | None, example_index: np.ndarray | None,
                    owner_self_influence: np.ndarray | None, owner_partition: np.ndarray,
                    flipped: np.ndarray, flip_clients: list[int]) -> dict:
    """Per-example and per-owner detection of the flipped labels, where the run released the data.

    ``example_index`` gives each self-influence entry's dataset index;
    ``owner_partition`` each owner column's simulation partition.
    """
    out: dict = {}
    if self_influence is not None and example_index is not None:
        out["examples"] = detection(self_influence, np.isin(example_index, flipped))
    if owner_self_influence is not None:
        flagged = np.isin(owner_partition, flip_clients)
        if 0 < flagged.sum() < len(flagged):
            out["owners"] = detection(owner_self_influence, flagged)
        else:
            out["owners"] = {"skipped": "every owner or no owner has flipped labels"}
    if not out:
        raise FedtrakError("the run released no self-influence (run it with --self-influence or label flips)")
    return out

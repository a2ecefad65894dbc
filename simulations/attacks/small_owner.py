"""Inverting a small client from its Gram or its owner summary.

Without secure aggregation the server sees each client's Gram ``Phi^T Phi``
(noised under DP). Its top ``n`` eigenvectors span the client's ``n``
features (exactly without noise; ``n`` is the released count): one example's
Gram is ``phi phi^T``, its feature up to sign. The attack optimizes inputs
whose features lie in that span (:func:`.inversion.invert_span`), a few per
label, and answers with the n that fit it best; each true example is then
paired with one of them (the pairing that maximizes the summed SSIM).

With secure aggregation the server sees only the sum of all Grams, but still
each owner's summary ``s = sum_i qbar_i phi_i`` (the DP release; without DP
the per-query totals ``U s``, from which s follows by least squares when the
queries span R^k: the attack takes s itself, the worst case). The span is then
one vector: a one-example owner's feature up to scale.
"""

from __future__ import annotations

import numpy as np
import torch

from fedtrak.simulations.attacks.inversion import DEFAULT_INVERSION, InversionSettings, invert_span
from fedtrak.simulations.attacks.view import Releases, ServerView

#: Two reconstructions whose features' directions in the span have |cos| above this are one answer.
DISTINCT_COS = 0.95


def span_of_release(rel: Releases, secure_agg: bool) -> np.ndarray:
    """The orthonormal basis ``(k, r)`` the server reads off a client's releases: its Gram's top
    eigenvectors, or its owner summary's direction where it sees no Gram of the client (secure
    aggregation, or a public kernel)."""
    if secure_agg or rel.gram is None:
        s = np.asarray(rel.summary, dtype=np.float64)
        return (s / max(np.linalg.norm(s), 1e-300))[:, None]
    n = int(min(max(1, round(float(rel.count))), len(rel.gram)))
    vals, vecs = np.linalg.eigh(np.asarray(rel.gram, dtype=np.float64))
    return vecs[:, np.argsort(vals)[::-1][:n]]


def invert_owner(view: ServerView, rel: Releases, secure_agg: bool, restarts_per_label: int = 1,
                 settings: InversionSettings = DEFAULT_INVERSION) -> np.ndarray:
    """The attacker's answer from one client's releases: as many reconstructions as the span
    has dimensions ``(r, *input_shape)``, those that fit it best (lowest share outside) among
    ``restarts_per_label`` optimizations per label and basis vector, skipping any whose feature
    points the same way in the span as one already chosen. The server picks them by its own
    criterion; the truth is used only to score them."""
    basis = span_of_release(rel, secure_agg)
    per_label = max(1, restarts_per_label * basis.shape[1])
    labels = np.repeat(np.arange(view.task.num_classes), per_label)
    x, loss = invert_span(view, basis, labels, settings)
    with torch.no_grad():
        coords = (view.features(torch.as_tensor(x), torch.as_tensor(labels)).to(torch.float64)
                  @ torch.as_tensor(basis)).numpy()
    coords /= np.maximum(np.linalg.norm(coords, axis=1, keepdims=True), 1e-300)
    chosen: list[int] = []
    for i in np.argsort(loss, kind="stable"):  # best fit first, skipping repeats of a chosen one
        if len(chosen) == basis.shape[1]:
            break
        if all(abs(float(coords[i] @ coords[j])) < DISTINCT_COS for j in chosen):
            chosen.append(int(i))
    return x[chosen]

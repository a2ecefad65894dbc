"""A client scores its own examples from the server's preconditioned queries.

The client keeps its features ``Phi_c,m`` and weights ``q_c,m`` for every
checkpoint; the server sends ``U_m = phi_m(Q) K_m^{-1}``. The client's score
matrix is the same TRAK ensemble as the centralized one, restricted to its
columns: ``S_c = [mean_m U_m Phi_c,m^T] * qbar_c`` (``qbar`` is per example,
so nothing but ``U_m`` is needed from outside).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from shared.errors import FedtrakError
from shared.scoring import ScoreEnsemble, kernel_term, self_kernel_term


def score_own_examples(
    features: Sequence[np.ndarray],
    out_to_loss: Sequence[np.ndarray],
    preconditioned: Sequence[np.ndarray],
    kernel_inverses: Sequence[np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """``(Q, n_c)`` scores of a client's examples, one entry per checkpoint in each sequence.

    With ``kernel_inverses`` (the server's ``K_m^{-1}``, one per checkpoint)
    also each example's self-influence ``(n_c,)``; otherwise ``None``.
    """
    if not len(features) == len(out_to_loss) == len(preconditioned) >= 1:
        raise FedtrakError(
            f"need one feature matrix, weight vector and query matrix per checkpoint, got "
            f"{len(features)}/{len(out_to_loss)}/{len(preconditioned)}"
        )
    if kernel_inverses is not None and len(kernel_inverses) != len(features):
        raise FedtrakError(f"need one kernel inverse per checkpoint, got {len(kernel_inverses)}")
    ensemble = ScoreEnsemble(preconditioned[0].shape[0], features[0].shape[0])
    for m, (f, q, u) in enumerate(zip(features, out_to_loss, preconditioned)):
        self_terms = None if kernel_inverses is None else self_kernel_term(f, kernel_inverses[m])
        ensemble.add(kernel_term(f, u), np.asarray(q, dtype=np.float64), self_terms)
    return ensemble.scores(), ensemble.self_influence()

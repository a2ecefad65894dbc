"""A client scores its own examples from the server's preconditioned queries.

The client keeps its features ``Phi_c,m`` and weights ``q_c,m`` for every
checkpoint; the server sends ``U_m = phi_m(Q) K_m^{-1}``. The client's score
matrix is the same TRAK ensemble as the centralized one, restricted to its
columns: ``S_c = [mean_m U_m Phi_c,m^T] * qbar_c`` (``qbar`` is per example,
so nothing but ``U_m`` is needed from outside).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedtrak.errors import FedtrakError
from fedtrak.privacy.mechanisms import clip_rows, owner_summaries, value_contributions
from fedtrak.trak.scoring import ScoreEnsemble, kernel_term, self_kernel_term, top_k


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


#: Stored rows scored at a time: peak memory is set by this, Q and k, not by the client's data size.
SCORE_ROWS = 8192


@dataclass
class ChunkedScores:
    """What a client keeps of its scores after a pass over its store in row chunks.

    ``totals`` ``(Q,)``: the owner totals; ``mean_out_to_loss`` ``(n,)``;
    ``summaries`` ``(M, k)``: ``sum_i qbar_i phi_m,i`` of the clipped features; ``scores`` ``(Q, n)``
    only when kept; ``self_influence`` ``(n,)`` with kernel inverses, and ``self_influence_sum``
    its sum over the clipped features (what an owner's release is made of); ``values`` ``(G,)``
    the owner's values over query groups (each example's contribution clipped where asked);
    ``proponents``/``opponents``: ``(indices, values)`` ``(Q, topk)`` when asked; ``suspects``: how
    many examples' self-influence exceeds the suspect threshold (when one is given).
    """

    totals: np.ndarray
    mean_out_to_loss: np.ndarray
    summaries: np.ndarray
    scores: np.ndarray | None = None
    self_influence: np.ndarray | None = None
    self_influence_sum: float | None = None
    values: np.ndarray | None = None
    proponents: tuple[np.ndarray, np.ndarray] | None = None
    opponents: tuple[np.ndarray, np.ndarray] | None = None
    suspects: int = 0


def _merge_top(best: tuple[np.ndarray, np.ndarray] | None, values: np.ndarray, offset: int,
               k: int) -> tuple[np.ndarray, np.ndarray]:
    idx, val = top_k(values, k)
    idx = idx + offset
    if best is not None:
        idx, val = np.concatenate([best[0], idx], axis=1), np.concatenate([best[1], val], axis=1)
        pos, val = top_k(val, k)
        idx = np.take_along_axis(idx, pos, axis=1)
    return idx, val


def score_in_chunks(
    features: Sequence[np.ndarray],
    out_to_loss: Sequence[np.ndarray],
    preconditioned: Sequence[np.ndarray],
    kernel_inverses: Sequence[np.ndarray] | None = None,
    scales: Sequence[np.ndarray] | None = None,
    keep_scores: bool = False,
    topk: int = 0,
    rows: int = SCORE_ROWS,
    groups: Sequence[np.ndarray] | None = None,
    value_clip: float = 0.0,
    suspect_threshold: float = 0.0,
) -> ChunkedScores:
    """:func:`score_own_examples` over stored (memory-mapped) features, ``rows`` at a time.

    ``scales``: per-checkpoint per-example clip factors (under DP). Per-example scores, owner
    totals and self-influence use the features as they are: they stay on the device (or, with
    ``full``, serve evaluation). What an owner releases, its summaries and its summed
    self-influence, is made of the clipped features. Running top-k lists are accumulated; the
    ``(Q, n)`` scores are kept only if asked. With ``groups`` (``Ubar_m`` ``(G, k)`` per checkpoint)
    the owner's values are summed too, each example's contribution clipped to ``value_clip`` (> 0);
    ``suspect_threshold`` (> 0): the examples whose self-influence exceeds it are counted as
    suspects (the owner's screening release under DP); otherwise, under DP, the summed
    self-influence is of the clipped features.
    """
    n = features[0].shape[0]
    nq = preconditioned[0].shape[0]
    totals = np.zeros(nq)
    summaries = np.zeros((len(features), features[0].shape[1]))
    qbar = np.empty(n)
    kept = np.empty((nq, n)) if keep_scores else None
    self_infl = np.empty(n) if kernel_inverses is not None else None
    self_sum, suspects = 0.0, 0
    values = None if groups is None else np.zeros(groups[0].shape[0])
    pro = opp = None
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        chunk = [np.asarray(f[start:stop], dtype=np.float32) for f in features]
        clipped = chunk if scales is None else [c * s[start:stop, None].astype(np.float32)
                                                for c, s in zip(chunk, scales)]
        weights = [np.asarray(q[start:stop]) for q in out_to_loss]
        scores, si = score_own_examples(chunk, weights, preconditioned, kernel_inverses)
        q_chunk = np.mean([np.asarray(w, dtype=np.float64) for w in weights], axis=0)
        qbar[start:stop] = q_chunk
        summaries += owner_summaries(clipped, q_chunk)
        totals += scores.sum(axis=1)
        if values is not None:
            contrib = value_contributions(chunk, q_chunk, groups)
            values += (clip_rows(contrib, value_clip) if value_clip > 0 else contrib).sum(axis=0)
        if kept is not None:
            kept[:, start:stop] = scores
        if self_infl is not None:
            self_infl[start:stop] = si
            if suspect_threshold > 0:
                suspects += int(np.count_nonzero(si > suspect_threshold))
            elif scales is not None:  # the released sum: of the clipped features
                si = np.mean([self_kernel_term(c, kinv) for c, kinv in zip(clipped, kernel_inverses)],
                             axis=0) * q_chunk
            self_sum += float(si.sum())
        if topk:
            pro = _merge_top(pro, scores, start, topk)
            opp = _merge_top(opp, -scores, start, topk)
    if opp is not None:
        opp = (opp[0], -opp[1])
    return ChunkedScores(totals, qbar, summaries, kept, self_infl, None if self_infl is None else self_sum,
                         values, pro, opp, suspects)

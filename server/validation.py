"""The server checks every client release before using it.

Clients are trusted to compute honestly on their own data, which nothing
here can verify (the threat model: honest-but-curious server, clients trusted to compute
honestly), but a release that
breaks the protocol is refused: a missing or mis-shaped array, a
non-finite value, a Gram that is not symmetric or (with no noise added) not
positive semi-definite, a count that disagrees with the arrays, and, under
differential privacy (where features are clipped), a release larger than
clipped features and its noise can make it (:mod:`fedtrak.privacy.bounds`):
a Gram's diagonal, trace, entries and smallest eigenvalue, an owner
summary's norm, a suspect count, owner values. Each check
raises :class:`FedtrakError` naming the client; the server then excludes
that client and goes on with the others.

Every size bound is relative to the example count the client itself reports:
a client that claims a million times its examples may send releases a
million times larger. Only the operator can close that: where it declares the
most examples any one device holds, :func:`check_example_count` refuses a
larger claim (plus, under DP, the count noise's tail allowance).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import scipy.linalg
from flwr.app import RecordDict
from threadpoolctl import ThreadpoolController

from fedtrak import wire
from fedtrak.errors import FedtrakError
from fedtrak.privacy.bounds import GramLimits, OwnerLimits, count_ceiling
from fedtrak.privacy.mechanisms import DPSettings
from fedtrak.wire.codecs import diagonal_positions, unpack_upper, upper_indices
from fedtrak.wire.compat import check_compatible

#: Relative diagonal jitter under which a noiseless Gram must factorize.
PSD_JITTER = 1e-9
#: Relative slack of the 2 x 2 minor test (its bound is computed in float32).
MINOR_TOLERANCE = 1e-5


def read_info(content: RecordDict, source: str, fingerprint: str = "", max_examples: int | None = None,
              dp: DPSettings | None = None, counted: bool = True) -> wire.ClientInfo:
    """The info record of a reply; with ``fingerprint``, the client's protocol version and task
    fingerprint must match this server's; with ``max_examples``, its count must not exceed the
    operator's declaration (:func:`check_example_count`, under ``dp``). A ``counted`` reply releases
    the client's count (at least 1); one that is not (secure aggregation's keys) reports 0."""
    info = wire.decode_info(content, source)
    if (info.num_examples < 1) if counted else (info.num_examples != 0):
        raise FedtrakError(f"{source}: reports {info.num_examples} examples"
                           + ("" if counted else " with its keys, which carry no count"))
    if fingerprint:
        check_compatible(info.protocol_version, info.task_fingerprint, fingerprint, source)
    check_example_count(info.num_examples, max_examples, dp, source)
    return info


def check_example_count(count: float, max_examples: int | None, dp: DPSettings | None, source: str) -> None:
    """Refuse a client's reported example count above ``max_examples``, the most examples the
    operator declares any one device holds (``None``: no declaration, nothing to check), plus,
    under DP (``dp`` active), the tail allowance of the count's noise
    (:func:`fedtrak.privacy.bounds.count_ceiling`: ``TAIL`` standard deviations).

    Every size bound of :mod:`fedtrak.privacy.bounds` grows with the count a client reports, so
    without a declaration a client may claim a larger count and send releases as much larger.

    Raises:
        FedtrakError: naming ``source`` and the declaration, or naming the declaration itself if it
            is not a whole number >= 1.
    """
    if max_examples is None:
        return
    if isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 1:
        raise FedtrakError(f"max-client-examples must be a whole number >= 1, got {max_examples!r}")
    dp = dp if dp is not None else DPSettings()
    ceiling = count_ceiling(dp, float(max_examples))
    if count > ceiling:
        noise = f" plus {ceiling - max_examples:.4g} for the count's noise" if ceiling > max_examples else ""
        raise FedtrakError(f"{source}: reports {count:g} examples, above the {max_examples} the operator declares "
                           f"any one device holds (max-client-examples){noise}")


def _finite(array: np.ndarray, what: str, source: str) -> np.ndarray:
    if not np.issubdtype(array.dtype, np.floating) and not np.issubdtype(array.dtype, np.integer):
        raise FedtrakError(f"{source}: {what} has dtype {array.dtype}, expected numbers")
    if not np.all(np.isfinite(array)):
        raise FedtrakError(f"{source}: {what} contains NaN or infinity")
    return array


def check_psd(matrix: np.ndarray, what: str, source: str, tolerance: float = 0.0, overwrite: bool = False) -> None:
    """Refuse a Gram that is not positive semi-definite (within float round-off, plus ``tolerance``:
    a bound on the spectral norm of any known error, such as fixed-point rounding). ``overwrite``:
    factorize ``matrix`` in place (a scratch copy the caller no longer needs)."""
    jitter = PSD_JITTER * max(float(np.abs(np.diag(matrix)).max(initial=0.0)), 1e-300) + tolerance
    work = matrix if overwrite else matrix.copy()
    work[np.diag_indices_from(work)] += jitter
    try:
        with _blas().limit(limits=1, user_api="blas"):
            scipy.linalg.cholesky(work, lower=True, check_finite=False, overwrite_a=True)
    except np.linalg.LinAlgError:
        raise FedtrakError(f"{source}: {what} is not positive semi-definite, so it is no Gram matrix") from None


@lru_cache(maxsize=1)
def _blas() -> ThreadpoolController:
    """The BLAS libraries loaded (scipy's among them). The server factorizes on one thread: it
    checks a batch while replies arrive (beside a simulation's clients on the same cores), and a
    team of BLAS threads left waiting spins on every other core, costing more CPU than it saves."""
    return ThreadpoolController()


def check_gram_size(matrix: np.ndarray, limits: GramLimits, what: str, source: str, overwrite: bool = False) -> None:
    """Refuse a Gram (or sum of Grams) outside the range clipped features and their noise allow:
    its diagonal, trace, largest entry and smallest eigenvalue (``overwrite``: as :func:`check_psd`)."""
    _check_size(np.diag(matrix), float(np.abs(matrix).max(initial=0.0)), limits, what, source)
    check_psd(matrix, what, source, limits.eig_slack, overwrite)


def _check_size(diag: np.ndarray, largest: float, limits: GramLimits, what: str, source: str) -> None:
    if diag.min(initial=0.0) < limits.diag_low or diag.max(initial=0.0) > limits.diag_high:
        raise FedtrakError(f"{source}: {what} has diagonal entries in [{diag.min():.4g}, {diag.max():.4g}], "
                           f"outside [{limits.diag_low:.4g}, {limits.diag_high:.4g}] that its count, the clip "
                           "norm and the noise allow")
    if diag.sum() > limits.trace_high:
        raise FedtrakError(f"{source}: {what} has trace {diag.sum():.4g}, above the {limits.trace_high:.4g} "
                           "its count, the clip norm and the noise allow")
    if largest > limits.entry_high:
        raise FedtrakError(f"{source}: {what} has an entry of size {largest:.4g}, above the "
                           f"{limits.entry_high:.4g} its count, the clip norm and the noise allow")


def check_minors(packed: np.ndarray, dim: int, what: str, source: str) -> None:
    """Refuse a noiseless Gram (its packed upper triangle) with a negative diagonal entry or an
    entry larger than the geometric mean of its two diagonal entries (a 2 x 2 principal minor
    below 0): necessary for PSD, and O(k^2) where the full test is a factorization."""
    diag = packed[diagonal_positions(dim)]
    if np.any(diag < 0):
        raise FedtrakError(f"{source}: {what} has a negative diagonal entry")
    root = np.sqrt(diag).astype(np.float32)  # float32: a quarter of the memory traffic, tolerance 1e-5
    root *= np.float32(np.sqrt(1 + MINOR_TOLERANCE))
    _, cols = upper_indices(dim)
    bound = np.repeat(root, np.arange(dim, 0, -1))  # row i holds entries (i, i..k-1)
    bound *= root[cols]
    bound += np.float32(PSD_JITTER * float(diag.max(initial=0.0)))
    entries = packed.astype(np.float32)
    np.abs(entries, out=entries)
    if np.any(entries > bound):
        raise FedtrakError(f"{source}: {what} has an entry larger than its two diagonal entries allow, so it "
                           "is not positive semi-definite and no Gram matrix")


def histogram_release(content: RecordDict, bins: int, source: str) -> np.ndarray:
    """The clip-norm round's noised histogram ``(bins,)`` of a reply, validated."""
    hist = wire.decode_histogram(content, source)
    if hist is None or hist.shape != (bins,) or not np.issubdtype(hist.dtype, np.number) or \
            not np.all(np.isfinite(hist)):
        raise FedtrakError(f"{source}: norm histogram missing, mis-shaped or not finite")
    return hist


def packed_gram_release(content: RecordDict, checkpoints: Sequence[int], dim: int, source: str,
                        noiseless: bool = True, limits: GramLimits | None = None) -> dict[int, np.ndarray]:
    """The packed upper triangle ``(dim (dim + 1) / 2,)`` of every checkpoint's Gram from a
    featurize reply, given the O(k^2) checks: shape, finiteness; without noise the diagonal and
    the 2 x 2 minors (:func:`check_minors`); with ``limits`` (under DP) the diagonal, trace and
    entries. Positive semi-definiteness is left to the caller (:func:`gram_release`, or a
    batch's sum: :mod:`fedtrak.server.gram_fold`)."""
    arrays = wire.decode_grams(content, source)
    want = dim * (dim + 1) // 2
    out = {}
    for m in checkpoints:
        if m not in arrays:
            raise FedtrakError(f"{source}: no Gram for checkpoint {m}")
        packed = _finite(np.asarray(arrays[m]), f"Gram of checkpoint {m}", source)
        if packed.ndim == 2 and packed.shape[0] == packed.shape[1]:
            what = "a full matrix" if np.allclose(packed, packed.T) else "not symmetric"
            raise FedtrakError(f"{source}: Gram of checkpoint {m} is {what} of shape {packed.shape}; "
                               f"expected its packed upper triangle of {want} values")
        if packed.ndim != 1 or packed.shape[0] != want:
            raise FedtrakError(f"{source} checkpoint {m}: Gram upper triangle has shape {packed.shape}, expected "
                               f"({want},) for k={dim}")
        packed = packed.astype(np.float64, copy=False)
        if noiseless:  # a noised Gram may have negative entries anywhere
            check_minors(packed, dim, f"Gram of checkpoint {m}", source)
        if limits is not None:
            _check_size(packed[diagonal_positions(dim)], float(np.abs(packed).max(initial=0.0)), limits,
                        f"Gram of checkpoint {m}", source)
        out[m] = packed
    return out


def gram_release(content: RecordDict, checkpoints: Sequence[int], dim: int, source: str,
                 noiseless: bool = True, limits: GramLimits | None = None) -> dict[int, np.ndarray]:
    """The ``(dim, dim)`` Gram of every checkpoint from a featurize reply, given every check:
    :func:`packed_gram_release`'s, then positive semi-definiteness (under DP within the noise's
    allowance)."""
    out = {}
    for m, packed in packed_gram_release(content, checkpoints, dim, source, noiseless, limits).items():
        g = unpack_upper(packed, dim, source=f"{source} checkpoint {m}")
        if noiseless or limits is not None:
            check_psd(g, f"Gram of checkpoint {m}", source, 0.0 if limits is None else limits.eig_slack)
        out[m] = g
    return out


def features_release(content: RecordDict, checkpoints: Sequence[int], dim: int, num: int, source: str,
                     weight_bound: float | None = None
                     ) -> tuple[np.ndarray, dict[int, tuple[np.ndarray, np.ndarray, np.ndarray | None]]]:
    """``(example indices, {m: (features (num, dim), out-to-loss (num,), curvature (num,) or None)})``
    from a features reply; with ``weight_bound`` (a weighted kernel), curvature weights in
    ``[0, weight_bound]`` are required."""
    indices, arrays = wire.decode_features(content, checkpoints, source)
    indices = np.asarray(indices if indices is not None else np.zeros(0))
    if indices.shape != (num,) or not np.issubdtype(indices.dtype, np.integer):
        raise FedtrakError(f"{source}: example indices have shape {indices.shape}, expected ({num},) integers")
    out = {}
    for m in checkpoints:
        f, q, w = arrays[m]
        if f is None or q is None:
            raise FedtrakError(f"{source}: no features for checkpoint {m}")
        if f.shape != (num, dim) or q.shape != (num,):
            raise FedtrakError(f"{source}: checkpoint {m} features {f.shape} / weights {q.shape}, "
                               f"expected ({num}, {dim}) / ({num},)")
        _finite(f, f"features of checkpoint {m}", source)
        _finite(q, f"out-to-loss weights of checkpoint {m}", source)
        if np.any(q < 0) or np.any(q > 1):
            raise FedtrakError(f"{source}: out-to-loss weights of checkpoint {m} leave [0, 1]")
        if weight_bound is not None:
            if w is None or w.shape != (num,):
                raise FedtrakError(f"{source}: curvature weights of checkpoint {m} have shape "
                                   f"{None if w is None else w.shape}, expected ({num},)")
            _finite(w, f"curvature weights of checkpoint {m}", source)
            if np.any(w < 0) or np.any(w > weight_bound * (1 + 1e-6)):
                raise FedtrakError(f"{source}: curvature weights of checkpoint {m} leave [0, {weight_bound:g}]")
        out[m] = (f, q, w if weight_bound is not None else None)
    return indices.astype(np.int64), out


def score_release(content: RecordDict, policy: str, num_queries: int, num: int,
                  source: str, self_influence: bool = False, noised: bool = False,
                  preconditioned: Sequence[np.ndarray] = (), groups: np.ndarray | None = None,
                  limits: OwnerLimits | None = None, summarized: bool = False,
                  totals_complete: bool = True) -> wire.ScoreRelease:
    """What a score reply releases under ``policy``, validated: owner totals ``(Q,)``, plus
    scores ``(Q, num)`` and indices ``(num,)`` for ``full``; with ``self_influence``, the owner's
    screening statistic ``(1,)`` (its summed self-influence or count of suspects) and, for ``full``, each example's ``(num,)``. ``noised`` (DP): the
    owner releases its noised summaries ``(M, k)`` instead of totals, and the totals are derived
    from them with the ``preconditioned`` queries ``U_m``; the totals are then not checked against
    the scores, and since the released count is noised too, ``num`` is taken from the scores.
    ``groups`` ``(G, Q)`` bool: the owner's values ``(G,)`` are required (without noise, the sums of
    its totals over each group). ``limits``: the range of honest releases under DP
    (:func:`fedtrak.privacy.bounds.owner_limits`), checked for the summaries, the suspect count
    and the values. ``summarized`` (implied by ``noised``): the reply carries owner summaries
    instead of totals (the summary route). ``totals_complete=False`` (one batch of the queries):
    the values are checked against the totals only once every batch is in
    (:func:`check_values_agree`)."""
    r = wire.decode_score_reply(content, source)
    values = None
    if groups is not None:
        values = r.owner_values
        if values is None or values.shape != (len(groups),):
            raise FedtrakError(f"{source}: owner values have shape {None if values is None else values.shape}, "
                               f"expected ({len(groups)},)")
        _finite(values, "owner values", source)
        if limits is not None and np.linalg.norm(values) > limits.values_norm:
            raise FedtrakError(f"{source}: owner values have norm {np.linalg.norm(values):.4g}, above the "
                               f"{limits.values_norm:.4g} its count, the bound per example and the noise allow")
    totals = r.owner_totals
    if noised or summarized:  # owner summaries (noised under DP); the totals are derived from them
        summaries = r.owner_summaries
        if summaries is None or summaries.ndim != 2 or len(preconditioned) != summaries.shape[0] or \
                summaries.shape[1] != preconditioned[0].shape[1]:
            raise FedtrakError(f"{source}: owner summaries have shape "
                               f"{None if summaries is None else summaries.shape}, expected "
                               f"({len(preconditioned)}, {preconditioned[0].shape[1]})")
        _finite(summaries, "owner summaries", source)
        norms = np.linalg.norm(summaries, axis=1)
        if limits is not None and norms.max() > limits.summary_norm:
            raise FedtrakError(f"{source}: an owner summary has norm {norms.max():.4g}, above the "
                               f"{limits.summary_norm:.4g} its count, the clip norm and the noise allow")
        totals = np.mean([u @ s for u, s in zip(preconditioned, summaries)], axis=0)
    if totals is None or totals.shape != (num_queries,):
        shape = None if totals is None else totals.shape
        raise FedtrakError(f"{source}: owner totals have shape {shape}, expected ({num_queries},)")
    totals = _finite(totals, "owner totals", source)
    total = None
    if self_influence:
        total = r.screening
        if total is None or total.shape != (1,):
            raise FedtrakError(f"{source}: owner screening statistic missing or not one number")
        _finite(total, "owner screening statistic", source)
        if limits is not None and limits.suspects is not None and not \
                limits.suspects[0] <= total[0] <= limits.suspects[1]:
            raise FedtrakError(f"{source}: suspect count {total[0]:.4g} outside the [{limits.suspects[0]:.4g}, "
                               f"{limits.suspects[1]:.4g}] its count and the noise allow")
    if values is not None and not noised and totals_complete:
        check_values_agree(values, groups, totals, source)
    if policy != "full":
        return wire.ScoreRelease(owner_totals=totals, screening=total, owner_values=values)
    scores, idx, own = r.scores, r.indices, None
    if noised and scores is not None and scores.ndim == 2:
        num = scores.shape[1]
    if self_influence:
        own = r.self_influence
        if own is None or own.shape != (num,):
            raise FedtrakError(f"{source}: self-influence has shape {None if own is None else own.shape}, "
                               f"expected ({num},)")
        _finite(own, "self-influence", source)
        if not noised and not np.isclose(own.sum(), total[0], rtol=1e-6, atol=1e-12):
            raise FedtrakError(f"{source}: owner self-influence sum disagrees with the released values")
    if scores is None or scores.shape != (num_queries, num):
        raise FedtrakError(f"{source}: scores have shape {None if scores is None else scores.shape}, "
                           f"expected ({num_queries}, {num})")
    if idx is None or idx.shape != (num,) or not np.issubdtype(idx.dtype, np.integer):
        raise FedtrakError(f"{source}: example indices missing or not ({num},) integers")
    _finite(scores, "scores", source)
    if not noised and not np.allclose(scores.sum(axis=1), totals, rtol=1e-6,
                                      atol=1e-9 * max(1.0, np.abs(totals).max())):
        raise FedtrakError(f"{source}: owner totals disagree with the released scores")
    return wire.ScoreRelease(owner_totals=totals, screening=total, scores=scores,
                             indices=idx.astype(np.int64), self_influence=own, owner_values=values)


def check_values_agree(values: np.ndarray, groups: np.ndarray, totals: np.ndarray, source: str) -> None:
    """Refuse an owner's values (without noise) that are not the sums of its totals over each
    query group (``groups`` ``(G, Q)``).

    Raises:
        FedtrakError: naming ``source``.
    """
    if not np.allclose(values, groups @ totals, rtol=1e-6, atol=1e-9 * max(1.0, np.abs(totals).sum())):
        raise FedtrakError(f"{source}: owner values disagree with its owner totals")

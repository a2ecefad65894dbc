"""The server checks every client release before using it.

Clients are trusted to compute honestly on their own data, which nothing
here can verify (DESIGN.md section 4, threat model), but a release that
breaks the protocol is refused: a missing or mis-shaped array, a
non-finite value, a Gram that is not symmetric or (with no noise added) not
positive semi-definite, a count that disagrees with the arrays. Each check
raises :class:`FedtrakError` naming the client; the server then excludes
that client and goes on with the others.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.linalg
from flwr.app import RecordDict

from shared.codecs import unpack_upper
from shared.compat import check_compatible
from shared.errors import FedtrakError
from shared.protocol import INFO_KEY, record_arrays, record_config

#: Relative diagonal jitter under which a noiseless Gram must factorize.
PSD_JITTER = 1e-9


@dataclass(frozen=True)
class ClientInfo:
    """Who a client says it is and how many examples it holds."""

    owner: str
    partition_id: int
    num_examples: int


def read_info(content: RecordDict, source: str, fingerprint: str = "") -> ClientInfo:
    """The ``info`` record of a reply; with ``fingerprint``, the client's protocol version and task
    fingerprint must match this server's."""
    info = record_config(content, INFO_KEY, source)
    try:
        owner, pid, n = str(info["owner"]), int(info["partition-id"]), int(info["num-examples"])
        version, theirs = int(info["protocol-version"]), str(info["task-fingerprint"])
    except (KeyError, TypeError, ValueError) as exc:
        raise FedtrakError(f"{source}: malformed info record: {exc}") from exc
    if n < 1:
        raise FedtrakError(f"{source}: reports {n} examples")
    if fingerprint:
        check_compatible(version, theirs, fingerprint, source)
    return ClientInfo(owner, pid, n)


def _finite(array: np.ndarray, what: str, source: str) -> np.ndarray:
    if not np.issubdtype(array.dtype, np.floating) and not np.issubdtype(array.dtype, np.integer):
        raise FedtrakError(f"{source}: {what} has dtype {array.dtype}, expected numbers")
    if not np.all(np.isfinite(array)):
        raise FedtrakError(f"{source}: {what} contains NaN or infinity")
    return array


def check_psd(matrix: np.ndarray, what: str, source: str, tolerance: float = 0.0) -> None:
    """Refuse a Gram that is not positive semi-definite (within float round-off, plus ``tolerance``:
    a bound on the spectral norm of any known error, such as fixed-point rounding)."""
    jitter = PSD_JITTER * max(float(np.abs(np.diag(matrix)).max(initial=0.0)), 1e-300) + tolerance
    try:
        scipy.linalg.cholesky(matrix + jitter * np.eye(len(matrix)), lower=True, check_finite=False)
    except np.linalg.LinAlgError:
        raise FedtrakError(f"{source}: {what} is not positive semi-definite, so it is no Gram matrix") from None


def gram_release(content: RecordDict, checkpoints: Sequence[int], dim: int, source: str,
                 noiseless: bool = True) -> dict[int, np.ndarray]:
    """The ``(dim, dim)`` Gram of every checkpoint from a featurize reply, validated."""
    arrays = record_arrays(content, "grams", source)
    out = {}
    for m in checkpoints:
        if str(m) not in arrays:
            raise FedtrakError(f"{source}: no Gram for checkpoint {m}")
        packed = _finite(np.asarray(arrays[str(m)]), f"Gram of checkpoint {m}", source)
        if packed.ndim == 2 and packed.shape[0] == packed.shape[1]:
            what = "a full matrix" if np.allclose(packed, packed.T) else "not symmetric"
            raise FedtrakError(f"{source}: Gram of checkpoint {m} is {what} of shape {packed.shape}; "
                               f"expected its packed upper triangle of {dim * (dim + 1) // 2} values")
        g = unpack_upper(packed, dim, source=f"{source} checkpoint {m}")
        if noiseless:  # a noised Gram may have negative entries anywhere
            if np.any(np.diag(g) < 0):
                raise FedtrakError(f"{source}: Gram of checkpoint {m} has a negative diagonal entry")
            check_psd(g, f"Gram of checkpoint {m}", source)
        out[m] = g
    return out


def features_release(content: RecordDict, checkpoints: Sequence[int], dim: int, num: int,
                     source: str) -> tuple[np.ndarray, dict[int, tuple[np.ndarray, np.ndarray]]]:
    """``(example indices, {m: (features (num, dim), out-to-loss (num,))})`` from a features reply."""
    arrays = record_arrays(content, "features", source)
    indices = np.asarray(arrays.get("indices", np.zeros(0)))
    if indices.shape != (num,) or not np.issubdtype(indices.dtype, np.integer):
        raise FedtrakError(f"{source}: example indices have shape {indices.shape}, expected ({num},) integers")
    out = {}
    for m in checkpoints:
        f, q = arrays.get(f"features-{m}"), arrays.get(f"out-to-loss-{m}")
        if f is None or q is None:
            raise FedtrakError(f"{source}: no features for checkpoint {m}")
        if f.shape != (num, dim) or q.shape != (num,):
            raise FedtrakError(f"{source}: checkpoint {m} features {f.shape} / weights {q.shape}, "
                               f"expected ({num}, {dim}) / ({num},)")
        _finite(f, f"features of checkpoint {m}", source)
        _finite(q, f"out-to-loss weights of checkpoint {m}", source)
        if np.any(q < 0) or np.any(q > 1):
            raise FedtrakError(f"{source}: out-to-loss weights of checkpoint {m} leave [0, 1]")
        out[m] = (f, q)
    return indices.astype(np.int64), out


def score_release(content: RecordDict, policy: str, num_queries: int, num: int,
                  source: str, self_influence: bool = False, noised: bool = False,
                  preconditioned: Sequence[np.ndarray] = ()) -> dict[str, np.ndarray]:
    """What a score reply releases under ``policy``, validated: ``owner-totals`` ``(Q,)``,
    plus ``scores`` ``(Q, num)`` and ``indices`` ``(num,)`` for ``full``; with
    ``self_influence``, ``owner-self-influence-sum`` ``(1,)`` and, for ``full``,
    ``self-influence`` ``(num,)``. ``noised`` (DP): the owner releases its noised summaries
    ``(M, k)`` instead of totals, and ``owner-totals`` is derived from them with the
    ``preconditioned`` queries ``U_m``; the totals are then not checked against the scores,
    and since the released count is noised too, ``num`` is taken from the scores."""
    arrays = record_arrays(content, "released", source)
    totals = arrays.get("owner-totals")
    if noised:  # under DP the owner releases its noised summaries; the totals are derived from them
        summaries = arrays.get("owner-summaries")
        if summaries is None or summaries.ndim != 2 or len(preconditioned) != summaries.shape[0] or \
                summaries.shape[1] != preconditioned[0].shape[1]:
            raise FedtrakError(f"{source}: owner summaries have shape "
                               f"{None if summaries is None else summaries.shape}, expected "
                               f"({len(preconditioned)}, {preconditioned[0].shape[1]})")
        _finite(summaries, "owner summaries", source)
        totals = np.mean([u @ s for u, s in zip(preconditioned, summaries)], axis=0)
    if totals is None or totals.shape != (num_queries,):
        shape = None if totals is None else totals.shape
        raise FedtrakError(f"{source}: owner totals have shape {shape}, expected ({num_queries},)")
    out = {"owner-totals": _finite(totals, "owner totals", source)}
    if self_influence:
        total = arrays.get("owner-self-influence-sum")
        if total is None or total.shape != (1,):
            raise FedtrakError(f"{source}: owner self-influence sum missing or not one number")
        out["owner-self-influence-sum"] = _finite(total, "owner self-influence sum", source)
    if policy == "full" and noised and arrays.get("scores") is not None and arrays["scores"].ndim == 2:
        num = arrays["scores"].shape[1]
    if policy == "full" and self_influence:
        own = arrays.get("self-influence")
        if own is None or own.shape != (num,):
            raise FedtrakError(f"{source}: self-influence has shape {None if own is None else own.shape}, "
                               f"expected ({num},)")
        out["self-influence"] = _finite(own, "self-influence", source)
        if not noised and not np.isclose(own.sum(), total[0], rtol=1e-6, atol=1e-12):
            raise FedtrakError(f"{source}: owner self-influence sum disagrees with the released values")
    if policy == "full":
        scores, idx = arrays.get("scores"), arrays.get("indices")
        if scores is None or scores.shape != (num_queries, num):
            raise FedtrakError(f"{source}: scores have shape {None if scores is None else scores.shape}, "
                               f"expected ({num_queries}, {num})")
        if idx is None or idx.shape != (num,) or not np.issubdtype(idx.dtype, np.integer):
            raise FedtrakError(f"{source}: example indices missing or not ({num},) integers")
        out["scores"] = _finite(scores, "scores", source)
        out["indices"] = idx.astype(np.int64)
        if not noised and not np.allclose(scores.sum(axis=1), totals, rtol=1e-6,
                                          atol=1e-9 * max(1.0, np.abs(totals).max())):
            raise FedtrakError(f"{source}: owner totals disagree with the released scores")
    return out

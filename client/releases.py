"""What a client releases at each step, clipped and noised under differential privacy.

Each function computes one release from the client's store, the noise beside
it (:mod:`fedtrak.privacy.mechanisms`), and keeps a noised release in the
store, so a step the server sends again gets the same release back instead
of fresh noise the accountant would not have counted.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from fedtrak.client.device import write_strip
from fedtrak.client.featurize import stored_clip_scales, stored_gram, stored_norms
from fedtrak.client.local_scoring import ChunkedScores, score_in_chunks
from fedtrak.client.node import Local
from fedtrak.codecs import pack_upper, unpack_upper
from fedtrak.errors import FedtrakError
from fedtrak.privacy.budget import HISTOGRAM
from fedtrak.privacy.mechanisms import (
    noise_rng,
    noised_curvature,
    noised_features,
    noised_gram,
    noised_owner_summaries,
    noised_owner_values,
    noised_self_influence_sum,
    noised_suspect_count,
    owner_values,
)
from fedtrak.privacy.quantile import noised_histogram, norm_histogram
from fedtrak.scoring import top_k
from fedtrak.wire import ScoreRelease, ScoreRequest

#: Queries drawn in the device's PNG strip of its top examples.
STRIP_QUERIES = 6


def released_grams(local: Local, checkpoints: list[int]) -> dict[int, np.ndarray]:
    """Each checkpoint's Gram upper triangle: of the clipped features plus Gaussian noise under DP;
    none when the run's kernel is public (the server builds it from its own data)."""
    dp, store, weighted = local.dp, local.store, local.weighted
    if local.job.resolved.kernel_source == "public":
        return {}
    if not dp.active:
        return {m: pack_upper(stored_gram(store, m, weighted=weighted)[0]) for m in checkpoints}
    scales, rng = stored_clip_scales(store, checkpoints, dp), noise_rng()

    def noised(m: int) -> np.ndarray:
        g = stored_gram(store, m, scales[m], weighted, dp.gram_weight)[0]
        return pack_upper(noised_gram(g, dp, rng))

    return {m: store.released(f"gram-{m}", lambda m=m: noised(m)) for m in checkpoints}


def released_histogram(local: Local, checkpoints: list[int]) -> np.ndarray:
    """The clip-norm round's noised histogram of the feature norms (under DP only).

    Raises:
        FedtrakError: if the run adds no noise (the histogram is a DP release).
    """
    dp = local.dp
    if not dp.active:
        raise FedtrakError("a norm histogram is released only under differential privacy")
    return local.store.released("norm-histogram", lambda: noised_histogram(
        norm_histogram(stored_norms(local.store, checkpoints, dp.clip_mode)), dp.sigma(HISTOGRAM), noise_rng()))


def released_features(local: Local, checkpoints: list[int]
                      ) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """Trusted-server mode: each checkpoint's features, out-to-loss weights and (for the weighted
    kernel) curvature weights; under DP clipped and noised per value: weak, as each example's
    presence is not hidden."""
    dp, store = local.dp, local.store
    scales = stored_clip_scales(store, checkpoints, dp) if dp.active else {}
    rng = noise_rng()
    out = {}
    for m in checkpoints:
        f, q = (np.asarray(a) for a in store.read(m))
        w = np.asarray(store.read_curvature(m)) if local.weighted else None
        if dp.active:
            both = store.released(f"features-{m}", lambda f=f, q=q, m=m: np.column_stack(
                noised_features(f * scales[m][:, None], q, dp, rng)))
            f, q = np.ascontiguousarray(both[:, :-1]), np.ascontiguousarray(both[:, -1])
            if w is not None:
                w = store.released(f"curvature-{m}", lambda w=w: noised_curvature(w, dp, rng))
        out[m] = (f, q, w)
    return out


def released_scores(local: Local, request: ScoreRequest, allow_full: bool) -> ScoreRelease:
    """Score this client's examples with the server's preconditioned queries and release what the
    policy allows: owner totals (under DP: noised owner summaries instead; on the
    :attr:`~fedtrak.wire.ScoreRequest.summary_route`, exact summaries), the owner's summed
    screening statistic (its summed self-influence; under DP with the server's threshold, its noised
    count of suspects), its values over the server's query groups where asked, and with ``full``
    every score; ``topk`` keeps the best examples on the device.

    Raises:
        FedtrakError: if the policy is ``full`` and this node does not allow it, or the store does
            not hold this client's data.
    """
    policy, data, store, dp = request.policy, local.data, local.store, local.dp
    if policy == "full" and not allow_full:
        raise FedtrakError("release policy 'full' is refused: the run config does not set allow-full")
    ms = sorted(request.queries)
    stored = [store.read(m) for m in ms]
    if stored[0][0].shape[0] != len(data.y):
        raise FedtrakError(f"local store holds {stored[0][0].shape[0]} examples, the data {len(data.y)}")
    dim = stored[0][0].shape[1]
    inverses = None
    if request.inverses is not None:
        inverses = [unpack_upper(request.inverses[m], dim, f"kernel inverse {m}") for m in ms]
    scales = None
    if dp.active:  # what is released is made of clipped features; the scores themselves stay here
        clip = stored_clip_scales(store, ms, dp)
        scales = [clip[m] for m in ms]
    topk = request.topk if policy == "topk" else 0
    groups = None if request.groups is None else [request.groups[m] for m in ms]
    value_clip, threshold = (request.value_clip, request.suspect_threshold) if dp.active else (0.0, 0.0)
    # under DP each out-to-loss weight must lie in [0, 1], as the releases' sensitivities assume
    weights = [np.clip(q, 0.0, 1.0) if dp.active else q for _, q in stored]
    local_scores = score_in_chunks([f for f, _ in stored], weights, [request.queries[m] for m in ms],
                                   inverses, scales, keep_scores=policy == "full", topk=topk, groups=groups,
                                   value_clip=value_clip, suspect_threshold=threshold)
    rng = noise_rng()
    totals, summaries, self_sum = local_scores.totals, None, None
    if dp.active:  # the noised owner summaries instead: the server derives the totals from them
        totals, summaries = None, store.released("owner-summaries-" + "-".join(map(str, ms)),
                                                 lambda: noised_owner_summaries(local_scores.summaries, dp, rng))
    elif request.summary_route:  # no queries sent: the summaries, from which the server derives the totals
        totals, summaries = None, local_scores.summaries
    self_infl = local_scores.self_influence
    if self_infl is not None:
        total = float(local_scores.self_influence_sum)
        if dp.active and threshold > 0:
            total = float(store.released("suspect-count", lambda: np.array(
                [noised_suspect_count(local_scores.suspects, dp, rng)]))[0])
        elif dp.active:
            total = float(store.released("self-influence-sum", lambda: np.array(
                [noised_self_influence_sum(total, inverses, dp, rng)]))[0])
        self_sum = np.array([total])
    values = None
    if groups is not None:  # the owner's value per query group: its contributions clipped, or its summaries
        values = local_scores.values if value_clip > 0 or not dp.active else owner_values(local_scores.summaries,
                                                                                           groups)
        if dp.active:
            values = store.released("owner-values-" + "-".join(map(str, ms)),
                                    lambda: noised_owner_values(values, groups, dp, rng, value_clip))
    if policy == "topk":
        keep_topk_on_device(local, local_scores, topk, request.query_offset if request.batched else None)
    full = policy == "full"
    return ScoreRelease(owner_totals=totals, owner_summaries=summaries, screening=self_sum,
                        scores=local_scores.scores if full else None, indices=data.indices if full else None,
                        self_influence=self_infl if full else None, owner_values=values)


def keep_topk_on_device(local: Local, scores: ChunkedScores, k: int, offset: int | None = None) -> Path:
    """Write this client's top proponents and opponents per query to its local results folder,
    and, with self-influence, its ``k`` most self-influential examples (likely mislabeled); for
    image tasks also ``topk.png``, the examples themselves for the first queries.

    ``offset``: the scores are one batch of the queries, starting at that row; each batch is kept
    in ``topk-batches/`` (the first one clears it) and ``topk.npz`` holds the batches received so
    far from row 0 on. Nothing of it is released: it is for the data's owner. Returns the ``.npz`` file.
    """
    data, store = local.data, local.store
    (pro_idx, pro_val), (opp_idx, opp_val) = scores.proponents, scores.opponents
    rows = {"proponent_ids": data.indices[pro_idx], "proponent_scores": pro_val,
            "opponent_ids": data.indices[opp_idx], "opponent_scores": opp_val}
    extra = {}
    if scores.self_influence is not None:
        sus_idx, sus_val = top_k(scores.self_influence[None, :], k)
        extra = {"suspect_ids": data.indices[sus_idx[0]], "suspect_self_influence": sus_val[0]}
    store.results_dir.mkdir(parents=True, exist_ok=True)
    path = store.results_dir / "topk.npz"
    if offset is not None:
        rows, extra = _joined_batches(store.results_dir / "topk-batches", offset, rows, extra)
    np.savez(path, **rows, **extra)
    if offset:  # the strip shows the first queries: drawn with the first batch
        return path
    shown = min(STRIP_QUERIES, len(pro_idx))
    rows = [row for q in range(shown) for row in ((f"query {q} +", pro_idx[q], pro_val[q]),
                                                    (f"query {q} -", opp_idx[q], opp_val[q]))]
    if scores.self_influence is not None:
        rows.append(("self-infl.", sus_idx[0], sus_val[0]))
    write_strip(store.results_dir / "topk.png", data.x, rows)
    return path


def _joined_batches(folder: Path, offset: int, rows: dict[str, np.ndarray], extra: dict[str, np.ndarray]
                    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Keep one batch's top-k rows (and, from the first batch, the suspects) in ``folder``; return
    the rows of every batch kept there that follows on from row 0, in order, and the suspects."""
    if offset == 0:
        shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / f"rows-{offset:010d}.npz", **rows)
    if extra:
        np.savez(folder / "suspects.npz", **extra)
    parts, start = [], 0
    for path in sorted(folder.glob("rows-*.npz")):
        if int(path.stem.split("-")[1]) != start:
            break
        with np.load(path) as part:
            parts.append({key: part[key] for key in rows})
        start += len(parts[-1]["proponent_ids"])
    if not parts:
        raise FedtrakError(f"query batch at offset {offset} came before the first batch (offset 0): this device "
                           "keeps no top-k rows to join it to")
    kept = folder / "suspects.npz"
    if not extra and kept.exists():
        with np.load(kept) as part:
            extra = {key: part[key] for key in part.files}
    return {key: np.concatenate([p[key] for p in parts]) for key in rows}, extra

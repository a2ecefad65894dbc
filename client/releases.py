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

from fedtrak.client.contract import SCORES
from fedtrak.client.device import write_strip
from fedtrak.client.featurize import stored_clip_scales, stored_gram, stored_norms
from fedtrak.client.local_scoring import ChunkedScores, score_in_chunks
from fedtrak.client.node import Local
from fedtrak.config.settings import releases_gram
from fedtrak.errors import FedtrakError, Refused
from fedtrak.privacy.kinds import COUNT, FEATURES, GRAM, HISTOGRAM, SUMMARY, SUSPECTS, VALUE
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
from fedtrak.privacy.sampling import NoiseSource
from fedtrak.trak.scoring import top_k
from fedtrak.wire import ScoreRelease, ScoreRequest
from fedtrak.wire.codecs import pack_upper, unpack_upper

#: Queries drawn in the device's PNG strip of its top examples.
STRIP_QUERIES = 6


def released_grams(local: Local, checkpoints: list[int]) -> dict[int, np.ndarray]:
    """Each checkpoint's Gram upper triangle: of the clipped features plus Gaussian noise under DP;
    none when the run's kernel is public (the server builds it from its own data).

    Raises:
        Refused: when the bound job releases no Gram, or sums Grams with secure aggregation.
    """
    dp, store, weighted = local.dp, local.store, local.weighted
    if not releases_gram(local.job.resolved.kernel_source):
        local.contract.items(COUNT)  # private mode: the count is all that leaves here
        local.contract.check_checkpoints(checkpoints)
        return {}
    local.contract.allow_plain_gram()
    if not dp.active:
        return local.release(GRAM, checkpoints, lambda: {
            m: pack_upper(stored_gram(store, m, weighted=weighted)[0]) for m in checkpoints})

    def noised() -> dict[int, np.ndarray]:
        scales, rng = stored_clip_scales(store, checkpoints, dp), noise_rng()
        return {m: pack_upper(noised_gram(stored_gram(store, m, scales[m], weighted, dp.gram_weight)[0], dp, rng))
                for m in checkpoints}

    return local.release(GRAM, checkpoints, noised)


def released_histogram(local: Local, checkpoints: list[int]) -> np.ndarray:
    """The clip-norm round's noised histogram of the feature norms (under DP only).

    Raises:
        Refused: if the run adds no noise or sets no clip quantile (the histogram is a DP release
            of a clip-quantile run only).
    """
    dp = local.dp
    if not dp.active:
        raise Refused("a norm histogram is released only under differential privacy")
    local.contract.items(HISTOGRAM, checkpoints)
    return local.release(HISTOGRAM, None, lambda: noised_histogram(
        norm_histogram(stored_norms(local.store, checkpoints, dp.clip_mode)), dp.sigma(HISTOGRAM), noise_rng()))


def released_features(local: Local, checkpoints: list[int]
                      ) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """Trusted-server mode: each checkpoint's features, out-to-loss weights and (for the weighted
    kernel) curvature weights; under DP clipped and noised per value: weak, as each example's
    presence is not hidden.

    Raises:
        Refused: unless the bound job is in features mode.
    """
    dp, store, weighted = local.dp, local.store, local.weighted

    def exact(m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        f, q = (np.asarray(a) for a in store.read(m))
        return f, q, np.asarray(store.read_curvature(m)) if weighted else None

    if not dp.active:
        return local.release(FEATURES, checkpoints, lambda: {m: exact(m) for m in checkpoints})

    def noised() -> dict[int, np.ndarray]:
        scales, rng, out = stored_clip_scales(store, checkpoints, dp), noise_rng(), {}
        for m in checkpoints:
            f, q, w = exact(m)
            f, q = noised_features(f * scales[m][:, None], q, dp, rng)
            columns = [f, q[:, None]] + ([noised_curvature(w, dp, rng)[:, None]] if w is not None else [])
            out[m] = np.column_stack(columns)
        return out

    dim = local.job.resolved.proj_dim
    kept = local.release(FEATURES, checkpoints, noised)
    return {m: (np.ascontiguousarray(a[:, :dim]), np.ascontiguousarray(a[:, dim]),
                np.ascontiguousarray(a[:, dim + 1]) if weighted else None) for m, a in kept.items()}


def released_scores(local: Local, request: ScoreRequest) -> ScoreRelease:
    """Score this client's examples with the server's preconditioned queries and release what the
    policy allows: owner totals (under DP: noised owner summaries instead; on the
    :attr:`~fedtrak.wire.ScoreRequest.summary_route`, exact summaries), the owner's summed
    screening statistic (its summed self-influence; under DP with the server's threshold, its noised
    count of suspects), its values over the server's query groups where asked, and with ``full``
    every score; ``topk`` keeps the best examples on the device. Each release is one the bound job
    plans (:mod:`fedtrak.client.contract`), charged as it leaves.

    Raises:
        Refused: for a release outside the bound job's plan (the ``full`` policy where this node
            does not serve it, self-influence or owner values the job does not ask for, checkpoints
            other than the job's).
        FedtrakError: if the store does not hold this client's data.
    """
    policy, data, store, dp, contract = request.policy, local.data, local.store, local.dp, local.contract
    ms = sorted(request.queries)
    contract.items(SUMMARY, ms)  # the checkpoints are the job's, and owner-level results are planned
    if policy != local.job.settings.release.policy:
        raise Refused(f"the request asks for policy {policy!r}; the job this run bound has "
                      f"{local.job.settings.release.policy!r}")
    if policy == "full":
        contract.allow(SCORES)
    wants_self = request.inverses is not None
    if wants_self and not local.job.settings.wants_self_influence:
        raise Refused("the job does not screen for mislabeled data: no self-influence is released")
    if request.groups is not None:
        contract.allow(VALUE)
    stored = [store.read(m) for m in ms]
    if stored[0][0].shape[0] != len(data.y):
        raise FedtrakError("the local store does not match this device's data: featurize again")
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
        totals = None
        kept = local.release(SUMMARY, ms, lambda: dict(zip(ms, noised_owner_summaries(local_scores.summaries, dp,
                                                                                        rng))))
        summaries = np.stack([kept[m] for m in ms])
    else:
        local.release(SUMMARY, ms, dict)  # exact owner totals or summaries: charged as unbounded
        if request.summary_route:  # no queries sent: the summaries, from which the server derives the totals
            totals, summaries = None, local_scores.summaries
    self_infl = local_scores.self_influence
    if self_infl is not None:
        self_sum = np.array([_screening(local, local_scores, inverses, threshold, rng)])
    values = None
    if groups is not None:  # the owner's value per query group: its contributions clipped, or its summaries
        values = local_scores.values if value_clip > 0 or not dp.active else owner_values(local_scores.summaries,
                                                                                           groups)
        exact_values = values
        values = local.release(VALUE, None, lambda: noised_owner_values(exact_values, groups, dp, rng, value_clip)
                               if dp.active else exact_values)
    if policy == "topk":
        keep_topk_on_device(local, local_scores, topk, request.query_offset if request.batched else None)
    full = policy == "full"
    if full:
        local.release(SCORES, None, lambda: np.zeros(0))
    return ScoreRelease(owner_totals=totals, owner_summaries=summaries, screening=self_sum,
                        scores=local_scores.scores if full else None, indices=data.indices if full else None,
                        self_influence=self_infl if full else None, owner_values=values)


def _screening(local: Local, scores: ChunkedScores, inverses: list[np.ndarray] | None, threshold: float,
               rng: NoiseSource) -> float:
    """The owner's screening statistic, one release of kind ``suspects`` per run: under DP its noised
    suspect count (with the server's threshold) or noised summed self-influence, whichever the first
    request asked for (a later request for the other is refused); otherwise the summed self-influence."""
    dp = local.dp
    if not dp.active:
        return float(local.release(SUSPECTS, None, lambda: np.array([scores.self_influence_sum, 0.0]))[0])
    counted = threshold > 0
    kept = local.release(SUSPECTS, None, lambda: np.array([
        noised_suspect_count(scores.suspects, dp, rng) if counted else
        noised_self_influence_sum(float(scores.self_influence_sum), inverses, dp, rng), float(counted)]))
    if bool(kept[1]) != counted:
        raise Refused("this run's screening statistic was released as "
                      f"{'a suspect count' if kept[1] else 'a summed self-influence'}; the other is refused")
    return float(kept[0])


def keep_topk_on_device(local: Local, scores: ChunkedScores, k: int, offset: int | None = None) -> Path:
    """Write this client's top proponents and opponents per query to its local results folder,
    and, with self-influence, its ``k`` most self-influential examples (likely mislabeled); for
    text tasks the kept examples' texts beside their ids; for other tasks whose inputs draw as
    images also ``topk.png``, the examples themselves for the first queries.

    ``offset``: the scores are one batch of the queries, starting at that row; each batch is kept
    in ``topk-batches/`` (the first one clears it) and ``topk.npz`` holds the batches received so
    far from row 0 on. Nothing of it is released: it is for the data's owner. Returns the ``.npz`` file.
    """
    data, store = local.data, local.store
    (pro_idx, pro_val), (opp_idx, opp_val) = scores.proponents, scores.opponents
    rows = {"proponent_ids": data.indices[pro_idx], "proponent_scores": pro_val,
            "opponent_ids": data.indices[opp_idx], "opponent_scores": opp_val}
    task = local.task
    if task.as_text is not None:  # text inputs: the owner reads its own texts beside the ids
        rows["proponent_texts"], rows["opponent_texts"] = (
            np.array([[task.text_of(data.x[i]) or "" for i in row] for row in idx], dtype=str).reshape(idx.shape)
            for idx in (pro_idx, opp_idx))
    extra = {}
    if scores.self_influence is not None:
        sus_idx, sus_val = top_k(scores.self_influence[None, :], k)
        extra = {"suspect_ids": data.indices[sus_idx[0]], "suspect_self_influence": sus_val[0]}
    store.results_dir.mkdir(parents=True, exist_ok=True)
    path = store.results_dir / "topk.npz"
    if offset is not None:
        rows, extra = _joined_batches(store.results_dir / "topk-batches", offset, rows, extra)
    np.savez(path, **rows, **extra)
    if offset or task.as_text is not None:  # the strip shows the first queries' images: drawn with the first batch
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

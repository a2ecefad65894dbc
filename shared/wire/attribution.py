"""The attribution steps' messages: FedAvg training, featurize (Grams, norm histogram), features, score."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedtrak.errors import FedtrakError
from fedtrak.wire.job import Job
from fedtrak.wire.records import (
    JOB,
    array_record,
    arrays_to_record,
    config_record,
    decode_job,
    encode_job,
    has_config,
    is_count,
    job_of,
    record_to_state,
    state_to_record,
)
from fedtrak.wire.secagg import SECAGG, secagg_context_record

INFO = "fedtrak.info"
CKPT_PREFIX = "fedtrak.ckpt-"
#: A featurize request that asks only for the noised norm histogram (the clip-norm round).
CLIP = "fedtrak.clip"
GRAMS = "fedtrak.grams"
HISTOGRAM, COUNTS = "fedtrak.norm-histogram", "counts"
FEATURES, INDICES = "fedtrak.features", "indices"
SCORE_CONFIG, POLICY, TOPK, VALUE_CLIP, SUSPECT_THRESHOLD = ("fedtrak.score", "policy", "topk", "value-clip",
                                                              "suspect-threshold")
QUERY_OFFSET, QUERY_COUNT = "query-offset", "query-count"
QUERIES, INVERSES, GROUPS = "fedtrak.queries", "fedtrak.kernel-inverses", "fedtrak.owner-value-groups"
RELEASED = "fedtrak.released"
#: The record keys Flower's FedAvg strategy is told to use, the key it weights updates by, and the
#: config keys of a train message (``server-round`` is Flower's own).
ARRAYS, CONFIG, METRICS, NUM_EXAMPLES = "fedtrak.weights", "fedtrak.train", "fedtrak.metrics", "num-examples"
CHECKPOINT, SERVER_ROUND = "checkpoint", "server-round"
#: Every record key of the attribution steps' messages (message types and record keys).
RECORD_KEYS = (INFO, CKPT_PREFIX, CLIP, GRAMS, HISTOGRAM, FEATURES, SCORE_CONFIG, QUERIES, INVERSES, GROUPS, RELEASED,
               ARRAYS, CONFIG, METRICS)
FEDAVG_KEYS = {"arrayrecord_key": ARRAYS, "configrecord_key": CONFIG, "weighted_by_key": NUM_EXAMPLES}


@dataclass(frozen=True)
class ClientInfo:
    """Who a client says it is, how many examples it holds (noised under DP), and its install."""

    owner: str
    partition_id: int
    num_examples: int
    protocol_version: int
    task_fingerprint: str


#: The most examples a client may report (a larger count is malformed, not a data set).
MAX_EXAMPLES = 10**12

_INFO_KEYS = {"owner": "owner", "partition_id": "partition-id", "num_examples": "num-examples",
              "protocol_version": "protocol-version", "task_fingerprint": "task-fingerprint"}


def _info_record(info: ClientInfo) -> ConfigRecord:
    return ConfigRecord({key: getattr(info, name) for name, key in _INFO_KEYS.items()})


def decode_info(content: RecordDict, source: str) -> ClientInfo:
    """The info record of a reply.

    Raises:
        FedtrakError: naming ``source`` if it is missing or malformed.
    """
    record = config_record(content, INFO, source)
    values = {}
    for name, key in _INFO_KEYS.items():
        value = record.get(key)
        want = str if name in ("owner", "task_fingerprint") else int
        if not isinstance(value, want) or isinstance(value, bool):
            raise FedtrakError(f"{source}: malformed info record: {key} is {value!r}, expected {want.__name__}")
        values[name] = value
    if not 0 <= values["num_examples"] <= MAX_EXAMPLES:
        raise FedtrakError(f"{source}: reports {values['num_examples']} examples, outside [0, {MAX_EXAMPLES:.0e}]")
    return ClientInfo(**values)


def claimed_owner(content: RecordDict) -> str:
    """The owner a reply names, even if the rest of its info is malformed ("" if none)."""
    record = content.config_records.get(INFO) if hasattr(content, "config_records") else None
    owner = record.get("owner") if record is not None else None
    return "" if owner in (None, "") else str(owner)


@dataclass(frozen=True)
class FeaturizeRequest:
    """A featurize (or features) request: the job, every checkpoint's weights, and which round."""

    job: Job
    states: dict[int, dict[str, torch.Tensor]]
    clip_round: bool = False
    secagg_context: str | None = None


def encode_featurize_request(job: Job, states: Sequence[Mapping[str, torch.Tensor]], clip_round: bool = False,
                             secagg_context: str | None = None) -> RecordDict:
    """The job and every checkpoint's weights; ``clip_round`` asks for the norm histogram only,
    ``secagg_context`` for secure aggregation's signed keys instead of Grams."""
    content = RecordDict({JOB: encode_job(job)})
    for m, state in enumerate(states):
        content[f"{CKPT_PREFIX}{m}"] = state_to_record(state)
    if clip_round:
        content[CLIP] = ConfigRecord({"norms-only": True})
    if secagg_context is not None:
        content[SECAGG] = secagg_context_record(secagg_context)
    return content


def decode_featurize_request(content: RecordDict, source: str = "server message") -> FeaturizeRequest:
    """Back from :func:`encode_featurize_request`."""
    states = {}
    for key, record in content.array_records.items():
        if key.startswith(CKPT_PREFIX):
            try:
                states[int(key[len(CKPT_PREFIX):])] = record_to_state(record)
            except ValueError as exc:
                raise FedtrakError(f"{source}: bad checkpoint key {key!r}") from exc
    if not states:
        raise FedtrakError(f"{source}: request carries no checkpoint")
    context = str(config_record(content, SECAGG, source).get("context", "")) if has_config(content, SECAGG) else None
    return FeaturizeRequest(job_of(content, source), dict(sorted(states.items())), has_config(content, CLIP),
                            context)


def encode_grams_reply(grams: Mapping[int, np.ndarray], info: ClientInfo) -> RecordDict:
    """One packed Gram upper triangle per checkpoint, and the client's info."""
    return RecordDict({GRAMS: arrays_to_record({str(m): g for m, g in grams.items()}), INFO: _info_record(info)})


def decode_grams(content: RecordDict, source: str) -> dict[int, np.ndarray]:
    """The packed Grams of a featurize reply, by checkpoint (unchecked: see the server's validation;
    read-only views over the message's bytes)."""
    return _by_checkpoint(array_record(content, GRAMS, source, view=True), source, "Gram")


def encode_histogram_reply(counts: np.ndarray, info: ClientInfo) -> RecordDict:
    """The clip-norm round's reply: the noised norm histogram."""
    return RecordDict({HISTOGRAM: arrays_to_record({COUNTS: counts}), INFO: _info_record(info)})


def decode_histogram(content: RecordDict, source: str) -> np.ndarray | None:
    """The norm histogram of a clip-norm reply (``None`` if it has none)."""
    return array_record(content, HISTOGRAM, source).get(COUNTS)


def add_info(content: RecordDict, info: ClientInfo) -> RecordDict:
    """``content`` with the client's info added."""
    content[INFO] = _info_record(info)
    return content


def encode_features_reply(indices: np.ndarray,
                          features: Mapping[int, tuple[np.ndarray, np.ndarray, np.ndarray | None]],
                          info: ClientInfo) -> RecordDict:
    """Trusted-server mode: the example indices, and each checkpoint's features, out-to-loss
    weights and (for the weighted kernel) curvature weights."""
    arrays = {INDICES: indices}
    for m, (f, q, w) in features.items():
        arrays[f"features-{m}"], arrays[f"out-to-loss-{m}"] = f, q
        if w is not None:
            arrays[f"curvature-{m}"] = w
    return RecordDict({FEATURES: arrays_to_record(arrays), INFO: _info_record(info)})


def decode_features(content: RecordDict, checkpoints: Sequence[int], source: str
                    ) -> tuple[np.ndarray | None, dict[int, tuple[np.ndarray | None, ...]]]:
    """The indices and, per checkpoint, the features, out-to-loss and curvature weights of a
    features reply (``None`` where missing)."""
    arrays = array_record(content, FEATURES, source)
    return arrays.get(INDICES), {m: (arrays.get(f"features-{m}"), arrays.get(f"out-to-loss-{m}"),
                                     arrays.get(f"curvature-{m}")) for m in checkpoints}


@dataclass(frozen=True)
class ScoreRequest:
    """The score step: the preconditioned queries ``U_m``, the release policy, (for
    self-influence) the packed kernel inverses the queries used, and (for owner values) each
    query group's summed preconditioned queries ``Ubar_m`` ``(G, k)``.

    Queries in batches: ``queries`` holds rows ``query_offset ..`` of the run's ``query_count``
    (0: all of them, one request). Only the first batch (offset 0) carries the kernel inverses and
    query groups, and asks for what does not depend on the queries (screening, owner values)."""

    job: Job
    policy: str
    topk: int
    queries: dict[int, np.ndarray]
    inverses: dict[int, np.ndarray] | None = None
    groups: dict[int, np.ndarray] | None = None
    value_clip: float = 0.0  # under DP: each example's contribution to the owner values is clipped to it
    suspect_threshold: float = 0.0  # under DP: the owner counts its examples whose self-influence exceeds it
    query_offset: int = 0
    query_count: int = 0

    @property
    def batched(self) -> bool:
        """Whether this request holds one batch of the run's queries, not all of them."""
        return self.query_count > 0

    @property
    def summary_route(self) -> bool:
        """Whether owner summaries are asked for instead of totals: an ``owner-totals`` request that
        carries no query rows (the server has at least k queries, so the totals would determine the
        summaries anyway, and the clients need no queries)."""
        return self.policy == "owner-totals" and next(iter(self.queries.values())).shape[0] == 0


def encode_score_request(request: ScoreRequest) -> RecordDict:
    """The score request's records. The preconditioned queries travel as float32 (half the bytes;
    the scores move by about 1e-8 of their largest value: ``tests/test_kernel_scores.py``); kernel
    inverses and query groups stay float64."""
    content = RecordDict({JOB: encode_job(request.job),
                          SCORE_CONFIG: ConfigRecord({POLICY: request.policy, TOPK: request.topk,
                                                      VALUE_CLIP: float(request.value_clip),
                                                      SUSPECT_THRESHOLD: float(request.suspect_threshold),
                                                      QUERY_OFFSET: request.query_offset,
                                                      QUERY_COUNT: request.query_count}),
                          QUERIES: arrays_to_record({str(m): np.asarray(u, dtype=np.float32)
                                                     for m, u in request.queries.items()})})
    if request.inverses:
        content[INVERSES] = arrays_to_record({str(m): k for m, k in request.inverses.items()})
    if request.groups:
        content[GROUPS] = arrays_to_record({str(m): g for m, g in request.groups.items()})
    return content


def decode_score_request(content: RecordDict, source: str = "server message") -> ScoreRequest:
    """Back from :func:`encode_score_request`."""
    cfg = config_record(content, SCORE_CONFIG, source)
    inverses = (_by_checkpoint(array_record(content, INVERSES, source), source, "kernel inverse")
                if INVERSES in content.array_records else None)
    groups = (_by_checkpoint(array_record(content, GROUPS, source), source, "query group")
              if GROUPS in content.array_records else None)
    bounds = cfg.get(VALUE_CLIP), cfg.get(SUSPECT_THRESHOLD)
    if not all(isinstance(b, float) and math.isfinite(b) and b >= 0 for b in bounds):
        raise FedtrakError(f"{source}: share bounds {bounds} must be finite and >= 0")
    policy, topk = cfg.get(POLICY), cfg.get(TOPK)
    if not isinstance(policy, str) or not is_count(topk):
        raise FedtrakError(f"{source}: score config has policy {policy!r} and topk {topk!r}")
    offset, count = cfg.get(QUERY_OFFSET), cfg.get(QUERY_COUNT)
    if not (is_count(offset) and is_count(count)):
        raise FedtrakError(f"{source}: score config has query offset {offset!r} and count {count!r}, "
                           "expected integers >= 0")
    request = ScoreRequest(job_of(content, source), policy, topk,
                           _by_checkpoint(array_record(content, QUERIES, source), source, "query"), inverses,
                           groups, *bounds, offset, count)
    _check_score_arrays(request, source)
    rows = next(iter(request.queries.values())).shape[0]
    if (count == 0 and offset > 0) or (count > 0 and (rows == 0 or offset + rows > count)) or \
            (offset > 0 and (inverses is not None or groups is not None)):
        raise FedtrakError(f"{source}: a batch of {rows} queries at offset {offset} of {count} "
                           f"{'with kernel inverses or query groups ' if offset else ''}does not fit the run's "
                           "queries (only the first batch carries inverses and groups)")
    return request


def _check_score_arrays(request: ScoreRequest, source: str) -> None:
    """The request's arrays, one per checkpoint and each finite floats of its shape: queries
    ``(Q, k)``, packed kernel inverses ``(k (k + 1) / 2,)``, query groups ``(G, k)``."""
    k = request.job.resolved.proj_dim
    checkpoints = sorted(request.queries)
    num_queries = {u.shape[0] for u in request.queries.values() if u.ndim == 2}
    shapes = {"query": (request.queries, (max(num_queries, default=0), k))}
    if request.inverses is not None:
        shapes["kernel inverse"] = (request.inverses, (k * (k + 1) // 2,))
    if request.groups is not None:
        rows = {g.shape[0] for g in request.groups.values() if g.ndim == 2}
        shapes["query group"] = (request.groups, (max(rows, default=0), k))
    for what, (arrays, shape) in shapes.items():
        if sorted(arrays) != checkpoints or not checkpoints:
            raise FedtrakError(f"{source}: {what} arrays for checkpoints {sorted(arrays)}, queries for {checkpoints}")
        for m, a in arrays.items():
            if a.shape != shape or len(num_queries) > 1 or not np.issubdtype(a.dtype, np.floating) or \
                    not np.all(np.isfinite(a)):
                raise FedtrakError(f"{source}: {what} of checkpoint {m} has shape {a.shape} and dtype {a.dtype}, "
                                   f"expected finite floats of shape {shape}")


@dataclass(frozen=True)
class ScoreRelease:
    """What a client releases in the score step; which fields are set depends on the policy.
    ``screening`` ``(1,)``: the owner's mislabel screening statistic, its summed self-influence, or
    under DP with the server's suspect threshold its (noised) count of suspects."""

    owner_totals: np.ndarray | None = None
    owner_summaries: np.ndarray | None = None
    screening: np.ndarray | None = None
    scores: np.ndarray | None = None
    indices: np.ndarray | None = None
    self_influence: np.ndarray | None = None
    owner_values: np.ndarray | None = None


def encode_score_reply(release: ScoreRelease, info: ClientInfo) -> RecordDict:
    """The released arrays (the fields that are set) and the client's info."""
    arrays = {f.name: getattr(release, f.name) for f in fields(release) if getattr(release, f.name) is not None}
    return RecordDict({RELEASED: arrays_to_record(arrays), INFO: _info_record(info)})


def decode_score_reply(content: RecordDict, source: str) -> ScoreRelease:
    """Back from :func:`encode_score_reply` (shapes unchecked: see the server's validation)."""
    arrays = array_record(content, RELEASED, source)
    known = {f.name for f in fields(ScoreRelease)}
    unknown = sorted(set(arrays) - known)
    if unknown:
        raise FedtrakError(f"{source}: score reply releases unknown arrays {unknown}")
    return ScoreRelease(**arrays)


def train_config(job: Job, checkpoint: int) -> ConfigRecord:
    """The config record of checkpoint ``checkpoint``'s FedAvg rounds (Flower adds the round)."""
    return ConfigRecord({**encode_job(job), CHECKPOINT: checkpoint})


def decode_train_request(content: RecordDict, source: str = "server message"
                         ) -> tuple[Job, int, int, dict[str, torch.Tensor]]:
    """The job, checkpoint index, FedAvg round and global weights of a train message."""
    cfg = config_record(content, CONFIG, source)
    job_values = {k: v for k, v in cfg.items() if k not in (CHECKPOINT, SERVER_ROUND)}
    checkpoint, server_round = cfg.get(CHECKPOINT), cfg.get(SERVER_ROUND)
    if not all(is_count(v) for v in (checkpoint, server_round)):
        raise FedtrakError(f"{source}: train config has checkpoint {checkpoint!r} and round {server_round!r}, "
                           "expected integers >= 0")
    if ARRAYS not in content.array_records:
        raise FedtrakError(f"{source}: train message has no weights")
    return decode_job(job_values, source), checkpoint, server_round, record_to_state(content.array_records[ARRAYS])


def encode_train_reply(state: Mapping[str, torch.Tensor], num_examples: int) -> RecordDict:
    """The updated weights and the example count FedAvg weights them by."""
    return RecordDict({ARRAYS: state_to_record(state), METRICS: MetricRecord({NUM_EXAMPLES: num_examples})})


def _by_checkpoint(arrays: Mapping[str, np.ndarray], source: str, what: str) -> dict[int, np.ndarray]:
    try:
        return {int(m): a for m, a in arrays.items()}
    except ValueError:
        raise FedtrakError(f"{source}: {what} arrays must be keyed by checkpoint index, got "
                           f"{sorted(arrays)}") from None

"""fedtrak's Flower ClientApp: one thin handler per protocol step.

Each handler decodes the server's message (:mod:`shared.protocol`), calls
the client's pure functions on its own data, and encodes the reply. A
handler that fails replies with a Flower error naming the problem; the
server excludes that client and goes on.

Settings a node reads (node config first, then the run config):

``store-dir``   root of the local feature store (default ``~/.cache/fedtrak/store``)
``allow-full``  whether the ``full`` release policy may be served (run config; default false)
``data-path``, ``owner``, ``task``  see :mod:`client.data`
"""

from __future__ import annotations

import functools
import logging
import re
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.data import ClientData, job_task, load_client_data
from client.device import write_strip
from client.featurize import featurize_into_store, stored_clip_scales, stored_gram, stored_norms
from client.local_scoring import ChunkedScores, score_in_chunks
from client.secure_aggregation import (
    encoded_grams,
    forget_state,
    identity_key,
    load_state,
    save_state,
)
from client.store import FeatureStore
from shared.checkpoints import fedavg_local_seed, model_from_state, sgd_epochs
from shared.codecs import pack_upper, unpack_upper
from shared.compat import PROTOCOL_VERSION
from shared.errors import FedtrakError
from shared.privacy.mechanisms import (
    DPSettings,
    gram_noise,
    noise_rng,
    noised_count,
    noised_features,
    noised_owner_summaries,
    noised_self_influence_sum,
)
from shared.privacy.quantile import noised_histogram, norm_histogram
from shared.privacy.training import dp_sgd_epochs
from shared.protocol import (
    CLIP_KEY,
    INFO_KEY,
    JOB_KEY,
    SCORE_KEY,
    TIMING_KEY,
    JobSpec,
    arrays_to_record,
    checkpoint_indices,
    checkpoint_key,
    record_arrays,
    record_config,
    record_to_state,
    state_to_record,
)
from shared.scoring import top_k
from shared.secagg.messages import (
    ADVERT_KEY,
    SECAGG_KEY,
    advert_record,
    masked_content,
    read_adverts,
    read_sealed,
    read_survivors,
    revealed_content,
    sealed_content,
)
from shared.secagg.protocol import Client, raw_public, secagg_context
from shared.timing import peak_memory_mb

log = logging.getLogger("fedtrak.client")


def _owner_visible_logging() -> None:
    """fedtrak's client messages (reused work, refusals) on the SuperNode's output, at INFO."""
    logger = logging.getLogger("fedtrak")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("fedtrak %(levelname)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


_owner_visible_logging()

DEFAULT_STORE = Path.home() / ".cache" / "fedtrak" / "store"
#: Error code of a fedtrak handler failure in a Flower error reply.
HANDLER_ERROR = 1001

Handler = Callable[[Message, Context], Message]


def _guard(step: str, timed: bool = True) -> Callable[[Handler], Handler]:
    """Turn any exception of a handler into an error reply that names it; with ``timed``, add the
    handler's seconds to the reply (``timing`` record, key ``handler``), for the server's account
    of where a run's time goes."""

    def wrap(fn: Handler) -> Handler:
        @functools.wraps(fn)
        def handler(msg: Message, ctx: Context) -> Message:
            start = time.perf_counter()
            try:
                reply = fn(msg, ctx)
                if timed and not reply.has_error():
                    timing = reply.content.metric_records.get(TIMING_KEY) or MetricRecord()
                    timing["handler"] = time.perf_counter() - start
                    timing["peak-mb"] = peak_memory_mb()  # of this ClientApp process so far
                    reply.content[TIMING_KEY] = timing
                return reply
            except FedtrakError as exc:
                reason = f"{step}: {exc}"
            except Exception as exc:  # noqa: BLE001 - reported to the server, not swallowed
                reason = f"{step}: {type(exc).__name__}: {exc}\n{traceback.format_exc(limit=5)}"
            log.error("node %s: %s", ctx.node_id, reason)
            return Message(Error(HANDLER_ERROR, reason), reply_to=msg)

        return handler

    return wrap


def _setting(ctx: Context, defaults: Mapping[str, Any], key: str, fallback: Any) -> Any:
    for source in (ctx.node_config, ctx.run_config, defaults):
        if key in source and source[key] not in ("", None):
            return source[key]
    return fallback


def _store(ctx: Context, defaults: Mapping[str, Any], data: ClientData, run_id: str) -> FeatureStore:
    root = Path(str(_setting(ctx, defaults, "store-dir", DEFAULT_STORE))).expanduser()
    who = f"partition-{data.partition_id}" if data.partition_id >= 0 else "owner-" + re.sub(
        r"[^A-Za-z0-9_.-]", "_", data.owner)
    return FeatureStore(root / who, run_id)


def _info(job: JobSpec, data: ClientData, count: int | None = None) -> ConfigRecord:
    """Who this client is, its example count (``count``: the released, noised one under DP), and
    its protocol version and task fingerprint."""
    return ConfigRecord({"owner": data.owner, "partition-id": data.partition_id,
                         "num-examples": len(data.y) if count is None else count,
                         "protocol-version": PROTOCOL_VERSION,
                         "task-fingerprint": job.fingerprint(job_task(job))})


def _released_count(store: FeatureStore, data: ClientData, dp: DPSettings) -> int | None:
    """Under DP the count is a release of its own: noised once per run and kept in the store."""
    if not dp.active:
        return None
    return store.released_count(lambda: noised_count(len(data.y), dp, noise_rng()))


def _job_and_data(msg: Message, ctx: Context, key: str = JOB_KEY) -> tuple[JobSpec, ClientData]:
    job = JobSpec.from_record(record_config(msg.content, key, "server message"))
    job.check_node(job_task(job))
    return job, load_client_data(job, ctx.node_config, ctx.node_id)


def build_client_app(defaults: Mapping[str, Any] | None = None) -> ClientApp:
    """The ClientApp, with ``defaults`` for settings that neither node nor run config give.

    ``fedtrak simulate`` passes its run settings here (Flower's Python
    simulation entry point leaves the run config empty); ``flwr run`` uses the
    module-level :data:`app`.
    """
    defaults = dict(defaults or {})
    app = ClientApp()

    @app.train()
    @_guard("train", timed=False)  # Flower's FedAvg reads this reply: keep it to its two records
    def train(msg: Message, ctx: Context) -> Message:
        """One FedAvg round: local SGD epochs on this client's data from the global weights."""
        job, data = _job_and_data(msg, ctx, key="config")
        cfg = msg.content.config_records["config"]
        task = job_task(job)
        model = model_from_state(task, record_to_state(msg.content.array_records["arrays"]), "global model")
        seed = fedavg_local_seed(job.seed, int(cfg["checkpoint"]), int(cfg["server-round"]),
                                 data.partition_id)
        if job.dp_train_noise > 0:  # DP-SGD (Opacus); accounted by the server, apart from attribution
            dp_sgd_epochs(task, model, data.x, data.y, int(cfg["local-epochs"]), seed, job.dp_train_noise,
                          job.dp_train_clip)
        else:
            sgd_epochs(task, model, data.x, data.y, int(cfg["local-epochs"]), seed)
        return Message(RecordDict({"arrays": state_to_record(model.state_dict()),
                                   "metrics": MetricRecord({"num-examples": len(data.y)})}), reply_to=msg)

    def featurized(msg: Message, ctx: Context) -> tuple[JobSpec, ClientData, FeatureStore, list[int]]:
        job, data = _job_and_data(msg, ctx)
        indices = checkpoint_indices(msg.content)
        states = {m: record_to_state(msg.content.array_records[checkpoint_key(m)]) for m in indices}
        store = _store(ctx, defaults, data, job.run_id)
        featurize_into_store(job_task(job), data, job, states, store)
        return job, data, store, indices

    @app.query("featurize")
    @_guard("featurize")
    def featurize(msg: Message, ctx: Context) -> Message:
        """Featurize local data under every checkpoint; release Grams (upper triangles) and the count."""
        start = time.perf_counter()
        job, data, store, indices = featurized(msg, ctx)
        seconds = time.perf_counter() - start
        dp = job.dp()
        rng = noise_rng()
        if CLIP_KEY in msg.content.config_records:  # the clip-norm round: only the noised norm histogram
            if not dp.active:
                raise FedtrakError("a norm histogram is released only under differential privacy")
            hist = store.released("norm-histogram", lambda: noised_histogram(
                norm_histogram(stored_norms(store, indices, dp.clip_mode)), dp.noise_multiplier, rng))
            return Message(RecordDict({"norm-histogram": arrays_to_record({"counts": hist}),
                                       INFO_KEY: _info(job, data, _released_count(store, data, dp))}), reply_to=msg)
        if SECAGG_KEY in msg.content.config_records:  # secure aggregation: advertise keys, no Gram yet
            reply = _advertise(msg, ctx, job, store, data, _released_count(store, data, dp))
            reply.content[TIMING_KEY] = MetricRecord({"featurize": seconds})
            return reply
        scales = stored_clip_scales(store, indices, dp) if dp.active else {}
        grams = {}
        for m in indices:
            def noised_gram(m: int = m) -> np.ndarray:
                g = stored_gram(store, m, scales[m])[0]
                return pack_upper(g + gram_noise(g.shape[0], dp, rng))

            grams[str(m)] = (store.released(f"gram-{m}", noised_gram) if dp.active
                             else pack_upper(stored_gram(store, m)[0]))
        info = _info(job, data, _released_count(store, data, dp))
        return Message(RecordDict({"grams": arrays_to_record(grams), INFO_KEY: info}), reply_to=msg)

    def secagg_step(msg: Message, ctx: Context) -> tuple[JobSpec, ClientData, FeatureStore, Client]:
        job, data = _job_and_data(msg, ctx)
        store = _store(ctx, defaults, data, job.run_id)
        context = secagg_context(job.run_id)
        return job, data, store, load_state(store, identity_key(store.dir.parent), context)

    def _advertise(msg: Message, ctx: Context, job: JobSpec, store: FeatureStore, data: ClientData,
                   count: int | None) -> Message:
        """Round 1 of secure aggregation: fresh key pairs, signed with this client's identity key."""
        cfg = record_config(msg.content, SECAGG_KEY, "server message")
        if str(cfg.get("context", "")) != job.run_id:
            raise FedtrakError("secure-aggregation context does not match the run")
        identity = identity_key(store.dir.parent)
        client = Client(int(ctx.node_id), identity, secagg_context(job.run_id))
        save_state(store, client)
        return Message(RecordDict({ADVERT_KEY: advert_record(client.advertise(),
                                                             raw_public(identity.public_key())),
                                   INFO_KEY: _info(job, data, count)}), reply_to=msg)

    @app.query("secagg_share")
    @_guard("secagg_share")
    def secagg_share(msg: Message, ctx: Context) -> Message:
        """Round 2: check the neighbours' signatures; seal shares of this client's secrets to each."""
        _, _, store, client = secagg_step(msg, ctx)
        adverts, threshold = read_adverts(msg.content, "server message")
        identities = {a.client: Ed25519PublicKey.from_public_bytes(key) for a, key in adverts}
        own = identities.get(client.client)
        if own is None or raw_public(own) != raw_public(client.identity.public_key()):
            raise FedtrakError("the share request does not carry this client's own identity key")
        sealed = client.share([a for a, _ in adverts], identities, threshold)
        save_state(store, client)
        return Message(sealed_content(sealed), reply_to=msg)

    @app.query("secagg_input")
    @_guard("secagg_input")
    def secagg_input(msg: Message, ctx: Context) -> Message:
        """Round 3: the masked vector of this client's (noised) Grams and count."""
        job, data, store, client = secagg_step(msg, ctx)
        sealed = read_sealed(msg.content, "server message")
        cfg = record_config(msg.content, SECAGG_KEY, "server message")
        checkpoints = [int(m) for m in cfg["checkpoints"]]
        dp = job.dp()
        count = _released_count(store, data, dp)
        values, seconds = encoded_grams(store, checkpoints, len(data.y) if count is None else count, dp,
                                        client.threshold, int(cfg["fraction-bits"]))
        start = time.perf_counter()
        masked = client.masked_input(sealed, values)
        seconds["mask"] = time.perf_counter() - start
        save_state(store, client)
        content = masked_content(masked)
        content[TIMING_KEY] = MetricRecord(seconds)
        return Message(content, reply_to=msg)

    @app.query("secagg_unmask")
    @_guard("secagg_unmask")
    def secagg_unmask(msg: Message, ctx: Context) -> Message:
        """Round 4: reveal one share per peer (self-mask seed if it survived, mask key if not);
        then forget the secrets."""
        _, _, store, client = secagg_step(msg, ctx)
        revealed = client.unmask(read_survivors(msg.content, "server message"))
        forget_state(store)
        return Message(revealed_content(revealed), reply_to=msg)

    @app.query("features")
    @_guard("features")
    def features(msg: Message, ctx: Context) -> Message:
        """Trusted-server mode: release the features and out-to-loss weights themselves."""
        job, data, store, indices = featurized(msg, ctx)
        dp = job.dp()
        scales = stored_clip_scales(store, indices, dp) if dp.active else {}
        rng = noise_rng()
        arrays: dict[str, np.ndarray] = {"indices": data.indices}
        for m in indices:
            f, q = (np.asarray(a) for a in store.read(m))
            if dp.active:  # weak: each example's values are noised, its presence is not hidden
                both = store.released(f"features-{m}", lambda f=f, q=q, m=m: np.column_stack(
                    noised_features(f * scales[m][:, None], q, dp, rng)))
                f, q = np.ascontiguousarray(both[:, :-1]), np.ascontiguousarray(both[:, -1])
            arrays[f"features-{m}"] = f
            arrays[f"out-to-loss-{m}"] = q
        return Message(RecordDict({"features": arrays_to_record(arrays), INFO_KEY: _info(job, data)}), reply_to=msg)

    @app.query("score")
    @_guard("score")
    def score(msg: Message, ctx: Context) -> Message:
        """Score own examples from the preconditioned queries; release what the policy allows."""
        job, data = _job_and_data(msg, ctx)
        cfg = record_config(msg.content, SCORE_KEY, "server message")
        policy = str(cfg["policy"])
        if policy == "full" and not bool(_setting(ctx, defaults, "allow-full", False)):
            raise FedtrakError("release policy 'full' is refused: the run config does not set allow-full")
        queries = record_arrays(msg.content, "queries", "server message")
        ms = sorted(int(m) for m in queries)
        store = _store(ctx, defaults, data, job.run_id)
        stored = [store.read(m) for m in ms]
        if stored[0][0].shape[0] != len(data.y):
            raise FedtrakError(f"local store holds {stored[0][0].shape[0]} examples, the data {len(data.y)}")
        dim = stored[0][0].shape[1]
        inverses = None
        if "kernel-inverses" in msg.content.array_records:
            packed = record_arrays(msg.content, "kernel-inverses", "server message")
            inverses = [unpack_upper(packed[str(m)], dim, f"kernel inverse {m}") for m in ms]
        dp = job.dp()
        scales = None
        if dp.active:  # score the clipped features the Grams were made of
            clip = stored_clip_scales(store, ms, dp)
            scales = [clip[m] for m in ms]
        us = [queries[str(m)] for m in ms]
        topk = int(cfg["topk"]) if policy == "topk" else 0
        local = score_in_chunks([f for f, _ in stored], [q for _, q in stored], us, inverses, scales,
                                keep_scores=policy == "full", topk=topk)
        rng = noise_rng()
        released: dict[str, np.ndarray] = {"owner-totals": local.totals}
        if dp.active:  # the noised owner summaries instead: the server derives the totals from them
            released = {"owner-summaries": store.released("owner-summaries-" + "-".join(map(str, ms)),
                                                          lambda: noised_owner_summaries(local.summaries, dp, rng))}
        self_infl = local.self_influence
        if self_infl is not None:
            total_self = float(self_infl.sum())
            if dp.active:
                total_self = float(store.released("self-influence-sum", lambda: np.array(
                    [noised_self_influence_sum(total_self, inverses, dp, rng)]))[0])
            released["owner-self-influence-sum"] = np.array([total_self])
        if policy == "full":
            released.update(scores=local.scores, indices=data.indices)
            if self_infl is not None:
                released["self-influence"] = self_infl
        elif policy == "topk":
            keep_topk_on_device(store, data, local, topk)
        info = _info(job, data, _released_count(store, data, dp))
        return Message(RecordDict({"released": arrays_to_record(released), INFO_KEY: info}), reply_to=msg)

    return app


#: Queries drawn in the device's PNG strip of its top examples.
STRIP_QUERIES = 6


def keep_topk_on_device(store: FeatureStore, data: ClientData, local: ChunkedScores, k: int) -> Path:
    """Write this client's top proponents and opponents per query to its local results folder,
    and, with self-influence, its ``k`` most self-influential examples (likely mislabeled); for
    image tasks also ``topk.png``, the examples themselves for the first queries.

    Nothing of it is released: it is for the data's owner. Returns the ``.npz`` file.
    """
    (pro_idx, pro_val), (opp_idx, opp_val) = local.proponents, local.opponents
    extra = {}
    if local.self_influence is not None:
        sus_idx, sus_val = top_k(local.self_influence[None, :], k)
        extra = {"suspect_ids": data.indices[sus_idx[0]], "suspect_self_influence": sus_val[0]}
    store.results_dir.mkdir(parents=True, exist_ok=True)
    path = store.results_dir / "topk.npz"
    np.savez(path, proponent_ids=data.indices[pro_idx], proponent_scores=pro_val,
             opponent_ids=data.indices[opp_idx], opponent_scores=opp_val, **extra)
    shown = min(STRIP_QUERIES, len(pro_idx))
    rows = [row for q in range(shown) for row in ((f"query {q} +", pro_idx[q], pro_val[q]),
                                                    (f"query {q} -", opp_idx[q], opp_val[q]))]
    if local.self_influence is not None:
        rows.append(("self-infl.", sus_idx[0], sus_val[0]))
    write_strip(store.results_dir / "topk.png", data.x, rows)
    return path


#: The ClientApp that ``flwr run`` loads (``client.app:app`` in pyproject.toml).
app = build_client_app()

"""fedtrak's Flower ClientApp: one thin handler per protocol step.

Each handler decodes the server's message (:mod:`fedtrak.wire`), calls the
client's steps on its own data (featurizing, the privacy releases of
:mod:`fedtrak.client.releases`, secure aggregation's rounds), and encodes the
reply. A handler that fails replies with a Flower error naming the problem;
the server excludes that client and goes on. The settings a node reads are
listed in :mod:`fedtrak.client.node`.
"""

from __future__ import annotations

import functools
import logging
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from fedtrak import wire
from fedtrak.client import secure_aggregation as secagg
from fedtrak.client.data import owner_label
from fedtrak.client.featurize import featurize_into_store
from fedtrak.client.node import Local
from fedtrak.client.node_settings import without_local_paths
from fedtrak.client.releases import (
    released_features,
    released_grams,
    released_histogram,
    released_scores,
)
from fedtrak.client.training import released_update
from fedtrak.data.shipping import receive_task
from fedtrak.data.tasks import registered_tasks
from fedtrak.errors import FedtrakError, Refused
from fedtrak.logs import visible_logging
from fedtrak.privacy.training import trains_privately
from fedtrak.timing import peak_memory_mb
from fedtrak.wire import secagg as secagg_wire

log = logging.getLogger("fedtrak.client")

#: Error code of a fedtrak handler failure in a Flower error reply.
HANDLER_ERROR = 1001

Handler = Callable[[Message, Context], Message]


def _private(msg: Message) -> bool:
    """Whether the message's run adds DP noise to what devices release: its attribution, or for a train
    message (whose job travels in its train config) its FedAvg training too (or the job cannot be
    read: then assume it does)."""
    try:
        if msg.metadata.message_type == "train":
            job = wire.decode_train_request(msg.content)[0]
            return job.dp().active or trains_privately(job.settings)
        return wire.job_of(msg.content).dp().active
    except Exception:  # noqa: BLE001 - a broken message: its privacy is unknown, so assumed
        return True


def _guard(step: str, timed: bool = True) -> Callable[[Handler], Handler]:
    """Turn any exception of a handler into an error reply that names it; with ``timed``, add the
    handler's seconds and the process's peak memory to the reply, for the server's account of
    where a run's time goes, except under DP: then no timing or memory figure leaves the device
    (they grow with its example count, outside any accountant)."""

    def wrap(fn: Handler) -> Handler:
        @functools.wraps(fn)
        def handler(msg: Message, ctx: Context) -> Message:
            start = time.perf_counter()
            try:
                reply = fn(msg, ctx)
                if not reply.has_error() and timed and _private(msg):  # untimed: no figure to drop
                    wire.drop_timing(reply.content)
                elif timed and not reply.has_error():
                    wire.add_handler_timing(reply.content, time.perf_counter() - start, peak_memory_mb())
                return reply
            except Refused as exc:  # decided from the job and the node's settings: says nothing of the data
                reason = sent = f"{step}: {exc}"
            except FedtrakError as exc:  # a data file's error keeps its path for the log (``local``)
                reason, sent = f"{step}: {getattr(exc, 'local', exc)}", f"{step}: {exc}"
                sent = _generic(step, exc) if _private(msg) else sent
            except Exception as exc:  # noqa: BLE001 - reported to the server, not swallowed
                sent = f"{step}: {type(exc).__name__}: {exc}"  # the traceback, with the code's paths, stays here
                reason = f"{sent}\n{traceback.format_exc(limit=5)}"
                sent = _generic(step, exc) if _private(msg) else sent
            log.error("node %s: %s", ctx.node_id, reason)
            sent, owner = without_local_paths(sent, ctx.node_config), owner_label(ctx.node_config, None)
            sent = wire.error_reason(owner, sent) if owner else sent  # the server names a refusal by owner
            return Message(Error(HANDLER_ERROR, sent), reply_to=msg)

        return handler

    return wrap


def _generic(step: str, exc: Exception) -> str:
    """The reason a private run's server is told for a failure that may depend on the device's data
    (a count, a shape, a path): its step and kind only; the whole reason stays in the device's log."""
    return (f"{step}: the device failed ({type(exc).__name__}); under differential privacy the reason stays in "
            "the device's own log")


def _reply(msg: Message, content: RecordDict) -> Message:
    return Message(content, reply_to=msg)


@_guard("train", timed=False)  # Flower's FedAvg reads this reply: keep it to its two records
def train(msg: Message, ctx: Context) -> Message:
    """One FedAvg round: local SGD epochs on this client's data from the global weights."""
    job, checkpoint, server_round, state = wire.decode_train_request(msg.content)
    local = Local.open(job, ctx)
    update = released_update(local, checkpoint, server_round, state)  # charged to the ledger as it leaves
    return _reply(msg, wire.encode_train_reply(update, local.fedavg_weight()))


def _featurized(msg: Message, ctx: Context) -> tuple[wire.FeaturizeRequest, Local, float]:
    request = wire.decode_featurize_request(msg.content)
    local = Local.open(request.job, ctx)
    start = time.perf_counter()
    featurize_into_store(local.task, local.data, request.job, request.states, local.store)
    return request, local, time.perf_counter() - start


@_guard("featurize")
def featurize(msg: Message, ctx: Context) -> Message:
    """Featurize local data under every checkpoint; release Grams (upper triangles) and the count,
    or, in the clip-norm round, the noised norm histogram, or, under secure aggregation, keys."""
    request, local, seconds = _featurized(msg, ctx)
    ms = list(request.states)
    if request.clip_round:
        return _reply(msg, wire.encode_histogram_reply(released_histogram(local, ms), local.info()))
    if request.secagg_context is not None:  # keys only: the count leaves with the masked input
        local.contract.check_checkpoints(ms)
        content = secagg_wire.advert_reply(*secagg.advertise(local, request.secagg_context))
        wire.add_timing(content, {"featurize": seconds})
        return _reply(msg, wire.add_info(content, local.info(count=0)))
    return _reply(msg, wire.encode_grams_reply(released_grams(local, ms), local.info()))


@_guard("features")
def features(msg: Message, ctx: Context) -> Message:
    """Trusted-server mode: release the features and out-to-loss weights themselves."""
    request, local, _ = _featurized(msg, ctx)
    released = released_features(local, list(request.states))
    return _reply(msg, wire.encode_features_reply(local.data.indices, released, local.info(len(local.data.y))))


@_guard("score")
def score(msg: Message, ctx: Context) -> Message:
    """Score own examples from the preconditioned queries; release what the policy allows."""
    request = wire.decode_score_request(msg.content)
    local = Local.open(request.job, ctx)
    release = released_scores(local, request)
    return _reply(msg, wire.encode_score_reply(release, local.info()))


@_guard("secagg_share")
def secagg_share(msg: Message, ctx: Context) -> Message:
    """Secure aggregation, round 2: seal shares of this client's secrets to each neighbour."""
    local = Local.open(secagg_wire.request_job(msg.content), ctx)
    adverts, threshold = secagg_wire.read_adverts(msg.content, "server message")
    return _reply(msg, secagg_wire.sealed_content(secagg.share(local, adverts, threshold)))


@_guard("secagg_input")
def secagg_input(msg: Message, ctx: Context) -> Message:
    """Secure aggregation, round 3: the masked vector of this client's (noised) Grams and count."""
    local = Local.open(secagg_wire.request_job(msg.content), ctx)
    sealed, checkpoints, fraction_bits = secagg_wire.read_input_request(msg.content)
    masked, seconds, rejected = secagg.masked_input(local, sealed, checkpoints, fraction_bits)
    content = secagg_wire.masked_content(masked, rejected)
    wire.add_timing(content, seconds)
    return _reply(msg, wire.add_info(content, local.info()))


@_guard("secagg_unmask")
def secagg_unmask(msg: Message, ctx: Context) -> Message:
    """Secure aggregation, round 4: reveal one share per peer, then forget the secrets."""
    local = Local.open(secagg_wire.request_job(msg.content), ctx)
    return _reply(msg, secagg_wire.revealed_content(
        secagg.unmask(local, secagg_wire.read_survivors(msg.content, "server message"))))


#: The query handlers by action (``query.<action>`` message types).
QUERIES: dict[str, Handler] = {"featurize": featurize, "features": features, "score": score,
                               "secagg_share": secagg_share, "secagg_input": secagg_input,
                               "secagg_unmask": secagg_unmask}


def node_defaults(defaults: Mapping[str, Any], tasks: Mapping[str, bytes]) -> Callable:
    """A Flower mod that gives every handler ``defaults`` for node settings its node config lacks,
    and registers ``tasks`` (name -> :func:`fedtrak.data.shipping.task_payload`) in the process
    that runs it."""

    def mod(msg: Message, ctx: Context, call_next: Handler) -> Message:
        known = registered_tasks()
        for name, payload in tasks.items():
            if name not in known:  # once per process: registering again would drop its loaded copy
                try:
                    receive_task(payload)
                except FedtrakError as exc:  # a reply naming it, not an exception Flower logs twice
                    log.error("node %s: %s", ctx.node_id, exc)
                    return Message(Error(HANDLER_ERROR, without_local_paths(f"task {name!r}: {exc}", ctx.node_config)),
                                   reply_to=msg)
        for key, value in defaults.items():
            if key not in ctx.node_config:
                ctx.node_config[key] = value
        return call_next(msg, ctx)

    return mod


def client_app(defaults: Mapping[str, Any] | None = None,
               tasks: Mapping[str, bytes] | None = None,
               handlers: Mapping[str, Handler] | None = None) -> ClientApp:
    """A ClientApp with fedtrak's handlers.

    ``defaults`` are node settings for nodes whose config lacks them and ``tasks`` user tasks (name ->
    :func:`fedtrak.data.shipping.task_payload`) to register where the app runs: :func:`fedtrak.simulate`
    passes both (Flower's Python simulation entry point leaves the run config empty, and its virtual
    clients run in other processes).
    ``handlers`` replaces some query handlers (tests use faulty ones).
    """
    mods = [node_defaults(dict(defaults or {}), dict(tasks or {}))] if defaults or tasks else []
    app = ClientApp(mods=mods)
    app.train()(train)
    for action, handler in {**QUERIES, **(handlers or {})}.items():
        app.query(action)(handler)
    return app


visible_logging()

#: The ClientApp that ``flwr run`` and SuperNodes load (``fedtrak.client.app:app`` in pyproject.toml).
app = client_app()

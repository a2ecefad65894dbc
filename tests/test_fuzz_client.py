"""Fuzzing the client handlers: 1,000 broken server messages at each. Every one gets an error
reply that is the handler's clear refusal (a FedtrakError, no traceback), never a release."""

from __future__ import annotations

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import Metadata
from fuzzing import ROUNDS, K, array_junk, config_junk, structural

from fedtrak import wire
from fedtrak.client.app import QUERIES, train
from fedtrak.config.settings import Settings
from fedtrak.server.preflight import preflight
from fedtrak.wire.job import Job


def _job(run_id: str, ckpt_dir, **settings) -> Job:
    s = Settings().replaced(clients=3, checkpoints=1, proj_dim=K, epsilon=1.0, checkpoint_dir=str(ckpt_dir),
                            **settings)
    plan = preflight(s)
    return Job(run_id, s, plan.resolved).fingerprinted(plan.task)


def _context(store, node: int, partition: int) -> Context:
    return Context(run_id=1, node_id=node, node_config={"store-dir": str(store), "partition-id": partition,
                                                        "num-partitions": 3}, state=RecordDict(), run_config={})


def _message(step: str, node: int, content: RecordDict) -> Message:
    meta = Metadata(run_id=1, message_id="f", src_node_id=1, dst_node_id=node, reply_to_message_id="",
                    group_id="", created_at=0.0, ttl=3600.0, message_type=step if step == "train" else f"query.{step}")
    return Message(metadata=meta, content=content)


def _refused(reply: Message, step: str, what: str) -> None:
    assert reply.has_error(), f"{what} was served"
    reason = reply.error.reason
    assert "Traceback" not in reason and reason.startswith(f"{step}: "), f"{what}: {reason}"


def test_fuzz_client_handlers(tmp_path, logreg_ckpt_dir, logreg_states):
    """featurize, features, score and FedAvg's train, given broken server messages."""
    job, states = _job("fuzz", logreg_ckpt_dir), logreg_states[:1]
    # each step under a job that plans it (a job is bound to its run id at first contact)
    features_job = _job("fuzz-features", logreg_ckpt_dir, mode="features")
    trained = Settings().replaced(clients=3, checkpoints=1, rounds=1, proj_dim=K, epsilon=1.0)
    train_job = Job("fuzz-train", trained, preflight(trained).resolved).fingerprinted(preflight(trained).task)
    ctx = _context(tmp_path, 7, 0)
    queries = {0: np.random.default_rng(0).normal(size=(4, K))}
    train_content = RecordDict({wire.attribution.ARRAYS: wire.state_to_record(states[0]),
                                wire.attribution.CONFIG: ConfigRecord({**wire.train_config(train_job, 0),
                                                                      wire.attribution.SERVER_ROUND: 1})})
    bases = {"featurize": (QUERIES["featurize"], wire.encode_featurize_request(job, states)),
             "features": (QUERIES["features"], wire.encode_featurize_request(features_job, states)),
             "score": (QUERIES["score"], wire.encode_score_request(wire.ScoreRequest(job, "owner-totals", 0, queries))),
             "train": (train, train_content)}
    mutations = [structural, config_junk, array_junk]
    for seed, (step, (handler, valid)) in enumerate(bases.items()):
        reply = handler(_message(step, 7, valid), ctx)
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        rng = np.random.default_rng(100 + seed)
        for i in range(ROUNDS):
            mutate = mutations[int(rng.integers(len(mutations)))]
            _refused(handler(_message(step, 7, mutate(valid, rng)), ctx), step,
                     f"{step} round {i}: a message broken by {mutate.__name__}")


def test_fuzz_client_secure_aggregation_handlers(tmp_path, logreg_ckpt_dir, logreg_states):
    """The three secure-aggregation handlers of a real client in a real 3-client protocol run, given
    share, input and unmask requests with a field of the wrong type, reply with errors."""
    from fedtrak.wire import secagg as sw

    job = _job("fuzz-secagg", logreg_ckpt_dir, kernel_source="private", secure_agg=True)
    nodes = (7, 8, 9)
    ctxs = {n: _context(tmp_path, n, p) for p, n in enumerate(nodes)}

    def call(step: str, node: int, content: RecordDict) -> Message:
        return QUERIES[step](_message(step, node, content), ctxs[node])

    def served(step: str, node: int, content: RecordDict) -> RecordDict:
        reply = call(step, node, content)
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        return reply.content

    request = wire.encode_featurize_request(job, logreg_states[:1], secagg_context=job.run_id)
    adverts = [sw.read_advert_reply(served("featurize", n, request), "c") for n in nodes]
    share = sw.with_job(sw.adverts_content(adverts, 2), job)
    sealed = [s for n in nodes for s in sw.read_sealed(served("secagg_share", n, share), "c")]
    inputs = {n: sw.input_request([s for s in sealed if s.recipient == n], [0], 10, job) for n in nodes}
    for n in nodes:
        served("secagg_input", n, inputs[n])
    bases = {"secagg_share": share, "secagg_input": inputs[7],
             "secagg_unmask": sw.with_job(sw.survivors_content(list(nodes)), job)}
    for seed, (step, valid) in enumerate(bases.items()):
        served(step, 7, valid)  # a resent input request gets the same vector back
        rng = np.random.default_rng(200 + seed)
        for i in range(ROUNDS):
            _refused(call(step, 7, config_junk(valid, rng)), step, f"{step} round {i}: a broken message")

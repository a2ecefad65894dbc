"""Crafted server messages and fresh device contexts, as a SuperNode hands them to the real handlers."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import Metadata

from fedtrak import wire
from fedtrak.config.settings import Settings
from fedtrak.server import preflight as preflight_module
from fedtrak.server.preflight import preflight
from fedtrak.wire.job import Job

K = 64


def job(run_id: str, epsilon: float | None, ckpt_dir=None, **more) -> Job:
    """A job as the server makes it: 3 clients, k = 64, one checkpoint unless ``more`` says otherwise,
    from ``ckpt_dir``'s checkpoints (``None``: the run trains its own)."""
    settings = Settings().replaced(**{"clients": 3, "checkpoints": 1, "proj_dim": K, "epsilon": epsilon,
                                      "checkpoint_dir": str(ckpt_dir) if ckpt_dir else None, **more})
    plan = preflight(settings)
    return Job(run_id, settings, plan.resolved).fingerprinted(plan.task)


def message(step: str, content: RecordDict, node: int = 7) -> Message:
    """A server message of ``step`` (``train`` or a query action) to ``node``."""
    meta = Metadata(run_id=1, message_id="m", src_node_id=1, dst_node_id=node, reply_to_message_id="",
                    group_id="", created_at=0.0, ttl=3600.0,
                    message_type=step if step == "train" else f"query.{step}")
    return Message(metadata=meta, content=content)


def featurize(j: Job, states, **extra) -> Message:
    """A featurize request for ``j`` with checkpoint weights ``states``."""
    return message("featurize", wire.encode_featurize_request(j, states, **extra))


def score(j: Job, checkpoints: list[int], queries: int = 0, **fields) -> Message:
    """A score request for ``j`` over ``checkpoints`` (``queries`` rows of random preconditioned queries)."""
    us = {m: np.random.default_rng(m).normal(size=(queries, K)) for m in checkpoints}
    return message("score", wire.encode_score_request(
        wire.ScoreRequest(j, fields.pop("policy", j.settings.release.policy), 0, us, **fields)))


def train(j: Job, state, checkpoint: int = 0, server_round: int = 1) -> Message:
    """A FedAvg train message for ``j`` from the global weights ``state``."""
    keys = wire.attribution
    config = ConfigRecord({**wire.train_config(j, checkpoint), keys.SERVER_ROUND: server_round})
    return message("train", RecordDict({keys.ARRAYS: wire.state_to_record(state), keys.CONFIG: config}))


def device(store, budget: float | None = None, partition: int = 0, node: int = 7, **config) -> Context:
    """A freshly started device: a new context over the same store folder."""
    node_config = {"store-dir": str(store), "partition-id": partition, "num-partitions": 3, **config}
    if budget is not None:
        node_config["privacy-budget"] = budget
    return Context(run_id=1, node_id=node, node_config=node_config, state=RecordDict(), run_config={})


def served(reply: Message) -> RecordDict:
    """A reply's content, asserting that it is no error."""
    assert not reply.has_error(), reply.error.reason
    return reply.content


def refused(reply: Message, *words: str) -> str:
    """A reply's error reason, asserting that it is an error naming ``words``."""
    assert reply.has_error(), "served"
    for w in words:
        assert w in reply.error.reason, reply.error.reason
    return reply.error.reason


@contextmanager
def counted_preflights() -> Iterator[list]:
    """Count :func:`fedtrak.server.preflight.preflight`'s calls (one entry per call, its settings) in
    every fedtrak module that imported it, for the duration."""
    real, calls = preflight_module.preflight, []

    def spy(settings: Settings):
        calls.append(settings)
        return real(settings)

    with pytest.MonkeyPatch.context() as patch:
        for module in [m for name, m in sys.modules.items() if name.startswith("fedtrak")]:
            if getattr(module, "preflight", None) is real:
                patch.setattr(module, "preflight", spy)
        yield calls

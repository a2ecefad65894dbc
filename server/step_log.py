"""What the ServerApp's log says while a run goes on (the operator follows it with ``flwr run
--stream``): each protocol step as it starts, each client as it replies, and the FedAvg rounds.

A step of up to :data:`EVERY_REPLY_UP_TO` clients gets a line per reply; a larger one a line per
tenth of its clients, so that a thousand clients do not flood the log.
"""

from __future__ import annotations

import logging
import time

from fedtrak import wire

log = logging.getLogger("fedtrak.server")
#: What each message type does, as the log names the step.
STEPS = {wire.TRAIN: "FedAvg training", wire.FEATURIZE: "featurize", wire.FEATURES: "features",
         wire.SCORE: "score", wire.SECAGG_SHARE: "secure aggregation 2/4 (key shares)",
         wire.SECAGG_INPUT: "secure aggregation 3/4 (masked Grams)",
         wire.SECAGG_UNMASK: "secure aggregation 4/4 (unmasking)"}
#: Steps of at most this many clients log every reply.
EVERY_REPLY_UP_TO = 20


def step_name(message_type: str) -> str:
    """How the log names the step of ``message_type``."""
    return STEPS.get(message_type, message_type)


def who(owner: str, node: int) -> str:
    """How the log names a client: by its owner where it named one, else by its node id."""
    return f"owner {owner!r}" if owner else f"node {node}"


class StepLog:
    """The log lines of one exchange with ``total`` clients, named ``label``."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total, self.done = label, total, 0
        self.start = time.monotonic()
        log.info("%s: asked %d client%s", label, total, "" if total == 1 else "s")

    def replied(self, name: str, failed: bool = False) -> None:
        """One more reply, from the client ``name`` (:func:`who`); ``failed``: an error reply."""
        self.done += 1
        every = 1 if self.total <= EVERY_REPLY_UP_TO else max(1, self.total // 10)
        if failed or self.done % every == 0 or self.done == self.total:
            log.info("%s: %s %s (%d of %d, %.0f s)", self.label, name, "failed" if failed else "replied",
                     self.done, self.total, time.monotonic() - self.start)

    def close(self, timeout: float) -> None:
        """The end of the exchange: a line if some clients never replied within ``timeout`` seconds."""
        if self.done < self.total:
            log.warning("%s: %d of %d clients replied; no reply from the others within %g s", self.label,
                        self.done, self.total, timeout)


def fedavg_round(checkpoint: int, checkpoints: int, server_round: int, rounds: int, seconds: float) -> None:
    """Log one finished FedAvg round (``checkpoint`` counted from 0; ``checkpoints`` 1: a single run)."""
    run = f" for checkpoint {checkpoint + 1}/{checkpoints}" if checkpoints > 1 else ""
    log.info("FedAvg training%s: round %d/%d done (%.0f s)", run, server_round, rounds, seconds)

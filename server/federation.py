"""The server's view of the clients of one run: messages out, replies in, who was excluded and why.

Every protocol step goes through :meth:`Federation.broadcast`: it sends one
message per active client, waits up to the run's timeout, counts the bytes
each way per client, and excludes (with a logged reason) a client that
replied with an error or not at all. :meth:`Federation.accept` then runs a
validator on each reply and excludes a client whose release it refuses.
Excluded clients take no further part; the summary lists them.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import TypeVar

from flwr.app import Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from fedtrak import wire
from fedtrak.errors import FedtrakError
from fedtrak.server.validation import read_info

log = logging.getLogger("fedtrak.server")
T = TypeVar("T")
#: Flower errors that mean the node went away (not that fedtrak's handler refused the step).
REJOIN_CODES = {ErrorCode.NODE_UNAVAILABLE, ErrorCode.CLIENT_APP_CRASHED}
#: Seconds between looks for a node that went away.
REJOIN_POLL = 2.0


@dataclass
class ClientRecord:
    """What the server knows about one client."""

    node_id: int
    owner: str = ""
    partition_id: int = -1
    num_examples: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    excluded: str | None = None
    rejoined: int = 0


class CountingGrid:
    """A Flower Grid that counts the payload bytes of every message, per node and per step.

    Everything goes through it, Flower's FedAvg strategy included, so the
    summary's bytes cover the whole run. ``step`` names what is counted now.
    """

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.step = "setup"
        self.bytes: dict[int, dict[str, int]] = defaultdict(lambda: {"sent": 0, "received": 0})
        self.steps: dict[str, dict[str, int]] = defaultdict(lambda: {"sent": 0, "received": 0})
        self.client_seconds: dict[str, float] = defaultdict(float)
        self.client_peak_mb: dict[str, float] = defaultdict(float)

    def __getattr__(self, name: str) -> object:
        return getattr(self._grid, name)

    def _count(self, node: int, way: str, content: RecordDict) -> None:
        size = wire.payload_bytes(content)
        self.bytes[node][way] += size
        self.steps[self.step][way] += size

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """Flower's ``send_and_receive``, counting what goes out and what comes back."""
        messages = list(messages)
        for msg in messages:
            self._count(msg.metadata.dst_node_id, "sent", msg.content)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            if not reply.has_error():
                self._count(reply.metadata.src_node_id, "received", reply.content)
                seconds, peak_mb = wire.read_handler_timing(reply.content)
                self.client_seconds[self.step] += seconds
                if peak_mb is not None:
                    self.client_peak_mb[self.step] = max(self.client_peak_mb[self.step], peak_mb)
        return replies


def wait_for_nodes(grid: Grid, wanted: int, timeout: float, poll: float = 1.0) -> list[int]:
    """The connected node ids once ``wanted`` are connected.

    Raises:
        FedtrakError: if fewer than ``wanted`` connect within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= wanted:
            return nodes
        if time.monotonic() > deadline:
            raise FedtrakError(f"only {len(nodes)} of {wanted} clients connected within {timeout:g} s")
        time.sleep(poll)


class Federation:
    """Clients of one run and the messages exchanged with them."""

    def __init__(self, grid: CountingGrid, node_ids: Iterable[int], timeout: float, fingerprint: str = "",
                 rejoin_wait: float = 0.0) -> None:
        self.grid = grid
        self.timeout = timeout
        self.fingerprint = fingerprint
        self.rejoin_wait = rejoin_wait
        self.clients = {n: ClientRecord(n) for n in node_ids}

    def active(self) -> list[int]:
        """Node ids of clients still taking part."""
        return [n for n, c in self.clients.items() if c.excluded is None]

    def exclude(self, node: int, reason: str) -> None:
        """Drop a client from the rest of the run, logging why."""
        record = self.clients[node]
        if record.excluded is None:
            record.excluded = reason
            log.warning("excluding client %s (node %d): %s", record.owner or "?", node, reason)

    def broadcast(self, message_type: str, content_for: Callable[[int], RecordDict]) -> dict[int, RecordDict]:
        """Send ``content_for(node)`` to every active client; return the replies that arrived.

        A client whose SuperNode went away mid-step (Flower reports the node
        unavailable or its ClientApp crashed) and comes back within
        ``rejoin_wait`` seconds gets the message once more: a restarted node
        reuses its finished work from its store. Others are excluded.
        """
        self.grid.step = message_type
        replies, failed = self._exchange(message_type, content_for, self.active())
        gone = [n for n, (code, _) in failed.items() if code in REJOIN_CODES]
        deadline = time.monotonic() + self.rejoin_wait
        while gone and time.monotonic() < deadline:
            online = set(self.grid.get_node_ids())
            back = [n for n in gone if n in online]
            if not back:
                time.sleep(REJOIN_POLL)
                continue
            log.warning("%s: resending to %s, back after going away", message_type,
                        ", ".join(self.source(n) for n in back))
            gone = [n for n in gone if n not in back]
            again, failed_again = self._exchange(message_type, content_for, back)
            replies.update(again)
            failed.update(failed_again)
            for n in again:
                failed.pop(n, None)
                self.clients[n].rejoined += 1
        for node, (_, reason) in failed.items():
            self.exclude(node, reason)
        return replies

    def _exchange(self, message_type: str, content_for: Callable[[int], RecordDict],
                  nodes: list[int]) -> tuple[dict[int, RecordDict], dict[int, tuple[int | None, str]]]:
        """One send and receive: the replies, and per failed node its Flower error code and a reason."""
        messages = [Message(content_for(node), dst_node_id=node, message_type=message_type) for node in nodes]
        replies: dict[int, RecordDict] = {}
        failed: dict[int, tuple[int | None, str]] = {}
        received = self.grid.send_and_receive(messages, timeout=self.timeout)
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}  # ids set when pushed
        for reply in received:
            node = reply.metadata.src_node_id
            if node not in self.clients:  # the SuperLink answers for a node that went away
                node = sent_to.get(reply.metadata.reply_to_message_id, node)
            if node not in self.clients:
                log.warning("ignoring a reply from unknown node %d", node)
                continue
            if reply.has_error():
                failed[node] = (reply.error.code, f"{message_type} failed: {reply.error.reason}")
                continue
            replies[node] = reply.content
        for node in nodes:
            if node not in replies and node not in failed:
                failed[node] = (None, f"no reply to {message_type} within {self.timeout:g} s")
        return replies, failed

    def accept(self, replies: dict[int, RecordDict], validate: Callable[[int, RecordDict], T]) -> dict[int, T]:
        """Validate each reply; exclude the clients whose reply is refused."""
        accepted = {}
        for node, content in replies.items():
            try:
                accepted[node] = validate(node, content)
            except FedtrakError as exc:
                self.exclude(node, str(exc))
        return accepted

    def note_info(self, replies: dict[int, RecordDict]) -> None:
        """Record who each replying client is and its count; exclude (and drop the reply of)
        a client whose info record is malformed or names another protocol version or task."""
        for node, content in list(replies.items()):
            claimed = wire.claimed_owner(content)
            if claimed:
                self.clients[node].owner = claimed  # so that a refusal names the client
            try:
                info = read_info(content, self.source(node), self.fingerprint)
            except FedtrakError as exc:
                self.exclude(node, str(exc))
                del replies[node]
                continue
            rec = self.clients[node]
            rec.owner, rec.partition_id, rec.num_examples = info.owner, info.partition_id, info.num_examples

    def require_clients(self, step: str) -> list[int]:
        """The active clients in owner order; an error listing every exclusion if none is left."""
        nodes = self.ordered()
        if not nodes:
            raise FedtrakError(f"no client is left after {step}: " + "; ".join(
                f"node {c.node_id}: {c.excluded}" for c in self.clients.values()))
        return nodes

    def source(self, node: int) -> str:
        """How errors name a client."""
        owner = self.clients[node].owner
        return f"client {owner} (node {node})" if owner else f"node {node}"

    def ordered(self) -> list[int]:
        """Active clients in owner order: by partition id, then owner label."""
        def key(node: int) -> tuple:
            c = self.clients[node]
            label = c.owner
            return (c.partition_id < 0, c.partition_id, not label.isdigit(), int(label) if label.isdigit() else 0, label)

        return sorted(self.active(), key=key)

    def report(self) -> dict:
        """The clients part of the run summary (bytes: payloads of every message of the run)."""
        for node, c in self.clients.items():
            c.bytes_sent, c.bytes_received = self.grid.bytes[node]["sent"], self.grid.bytes[node]["received"]
        clients = [asdict(c) for c in self.clients.values()]
        excluded = [{"node_id": c["node_id"], "owner": c["owner"], "reason": c["excluded"]}
                    for c in clients if c["excluded"] is not None]
        total = {"sent": sum(c["bytes_sent"] for c in clients),
                 "received": sum(c["bytes_received"] for c in clients)}
        return {"clients": clients, "excluded": excluded, "complete_federation": not excluded,
                "bytes": {**total, "per_step": dict(self.grid.steps)},
                "client_seconds": {step: round(s, 3) for step, s in self.grid.client_seconds.items()},
                "client_peak_memory_mb": dict(self.grid.client_peak_mb)}

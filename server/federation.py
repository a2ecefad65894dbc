"""The server's view of the clients of one run: messages out, replies in, who was excluded and why.

Every protocol step goes through :meth:`Federation.broadcast`: it sends one
message per active client, at most ``in-flight`` of them out at once
(:meth:`CountingGrid.stream`: Flower's push and pull), hands each reply to
the caller as soon as it arrives (large releases are checked and folded into
running sums there, so the server never holds every client's reply at
once), counts the bytes each way per client, and excludes (with a logged
reason) a client that replied with an error or not at all within the run's
timeout. :meth:`Federation.accept` runs a validator on collected replies and
excludes a client whose release it refuses. Excluded clients take no
further part; the summary lists them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import TypeVar

from flwr.app import Message, RecordDict
from flwr.common.constant import ErrorCode

from fedtrak import wire
from fedtrak.errors import FedtrakError
from fedtrak.logs import progress_bar
from fedtrak.privacy.mechanisms import DPSettings
from fedtrak.results.summary import Clients, Excluded
from fedtrak.server.grid import CountingGrid
from fedtrak.server.step_log import StepLog, step_name, who
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


class Federation:
    """Clients of one run and the messages exchanged with them."""

    def __init__(self, grid: CountingGrid, node_ids: Iterable[int], timeout: float, fingerprint: str = "",
                 rejoin_wait: float = 0.0, in_flight: int = 0, progress: bool = False,
                 max_examples: int | None = None, dp: DPSettings | None = None) -> None:
        self.grid = grid
        self.max_examples, self.dp = max_examples, dp  # the operator's declared most examples per device
        self.timeout = timeout
        self.fingerprint = fingerprint
        self.rejoin_wait = rejoin_wait
        self.in_flight = in_flight
        self.progress = progress
        self.clients = {n: ClientRecord(n) for n in node_ids}

    def active(self) -> list[int]:
        """Node ids of clients still taking part."""
        return [n for n, c in self.clients.items() if c.excluded is None]

    def exclude(self, node: int, reason: str) -> None:
        """Drop a client from the rest of the run, logging why."""
        record = self.clients[node]
        if record.excluded is None:
            record.excluded = reason
            log.warning("excluding %s (node %d): %s", who(record.owner, node) if record.owner else "a client",
                        node, reason)

    def broadcast(self, message_type: str, content_for: Callable[[int], RecordDict],
                  on_reply: Callable[[int, RecordDict], None] | None = None, label: str = ""
                  ) -> dict[int, RecordDict]:
        """Send ``content_for(node)`` to every active client; return the replies that arrived. The
        log names the step ``label`` (default: :func:`~fedtrak.server.step_log.step_name`) and each
        client as it replies.

        With ``on_reply``, each reply is handed to it as it arrives and not kept (the returned
        dict is empty): it checks and folds the reply, and may exclude its client. A client
        whose SuperNode went away mid-step (Flower reports the node unavailable or its
        ClientApp crashed) and comes back within ``rejoin_wait`` seconds gets the message once
        more: a restarted node reuses its finished work from its store. Others are excluded.
        """
        self.grid.step = message_type
        label = label or step_name(message_type)
        replies, failed = self._exchange(message_type, content_for, self.active(), on_reply, label)
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
            again, failed_again = self._exchange(message_type, content_for, back, on_reply, label)
            replies.update(again)
            failed.update(failed_again)
            for n in set(back) - set(failed_again):
                failed.pop(n, None)
                self.clients[n].rejoined += 1
        for node, (_, reason) in failed.items():
            self.exclude(node, reason)
        return replies

    def ask(self, message_type: str, content_for: Callable[[int], RecordDict], nodes: list[int]
            ) -> dict[int, RecordDict]:
        """One exchange with ``nodes`` alone, outside a step: the replies that arrived (no resend,
        nobody excluded)."""
        return self._exchange(message_type, content_for, nodes, label=f"{step_name(message_type)} (asked again)")[0]

    def _exchange(self, message_type: str, content_for: Callable[[int], RecordDict], nodes: list[int],
                  on_reply: Callable[[int, RecordDict], None] | None = None, label: str = ""
                  ) -> tuple[dict[int, RecordDict], dict[int, tuple[int | None, str]]]:
        """One streamed send and receive: the replies (none kept with ``on_reply``), and per failed
        node its Flower error code and a reason (an error reply that names its owner names it so)."""
        messages = (Message(content_for(node), dst_node_id=node, message_type=message_type) for node in nodes)
        replies: dict[int, RecordDict] = {}
        failed: dict[int, tuple[int | None, str]] = {}
        answered: set[int] = set()
        steps = StepLog(label or step_name(message_type), len(nodes))
        with progress_bar(self.progress, len(nodes), steps.label, unit="client", leave=False) as bar:
            for node, reply in self.grid.stream(messages, self.timeout, self.in_flight):
                bar.update()
                answered.add(node)
                self._note_reply(node, reply, steps)
                if reply is None:
                    lost = f"{message_type} lost: the node connected again after it was sent"
                    failed[node] = (ErrorCode.NODE_UNAVAILABLE, lost)
                elif reply.has_error():
                    failed[node] = (reply.error.code, f"{message_type} failed: {wire.error_owner(reply.error.reason)[1]}")
                elif on_reply is None:
                    replies[node] = reply.content
                else:
                    on_reply(node, reply.content)
        steps.close(self.timeout)
        for node in nodes:
            if node not in answered:
                failed[node] = (None, f"no reply to {message_type} within {self.timeout:g} s")
        return replies, failed

    def _note_reply(self, node: int, reply: Message | None, steps: StepLog) -> None:
        """Log a reply by the owner it names (an error reply's too: a device that refuses a job names
        its owner, and is excluded by that name)."""
        record = self.clients[node]
        if reply is not None and reply.has_error():
            record.owner = record.owner or wire.error_owner(reply.error.reason)[0]
        elif reply is not None:
            record.owner = record.owner or wire.claimed_owner(reply.content)
        steps.replied(who(record.owner, node), reply is None or reply.has_error())

    def accept(self, replies: dict[int, RecordDict], validate: Callable[[int, RecordDict], T]) -> dict[int, T]:
        """Validate each reply; exclude the clients whose reply is refused."""
        accepted = {}
        for node, content in replies.items():
            try:
                accepted[node] = validate(node, content)
            except FedtrakError as exc:
                self.exclude(node, str(exc))
        return accepted

    def note_info(self, replies: dict[int, RecordDict], counted: bool = True) -> None:
        """:meth:`note_one` for every reply; a reply whose info is refused is dropped."""
        for node, content in list(replies.items()):
            if not self.note_one(node, content, counted):
                del replies[node]

    def note_one(self, node: int, content: RecordDict, counted: bool = True) -> bool:
        """Record who a replying client is and (``counted``: the reply releases it) its count; exclude
        it (and return False) if its info record is malformed or names another protocol version or
        task. A reply that releases no count (secure aggregation's keys) reports 0."""
        claimed = wire.claimed_owner(content)
        if claimed:
            self.clients[node].owner = claimed  # so that a refusal names the client
        try:
            info = read_info(content, self.source(node), self.fingerprint, self.max_examples, self.dp, counted)
        except FedtrakError as exc:
            self.exclude(node, str(exc))
            return False
        rec = self.clients[node]
        rec.owner, rec.partition_id = info.owner, info.partition_id
        if counted:
            rec.num_examples = info.num_examples
        return True

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

    def report(self) -> Clients:
        """The clients part of the run summary (bytes: payloads of every message of the run)."""
        for node, c in self.clients.items():
            c.bytes_sent, c.bytes_received = self.grid.bytes[node]["sent"], self.grid.bytes[node]["received"]
        clients = tuple(self.clients.values())
        return Clients(tuple(asdict(c) for c in clients),
                       tuple(Excluded(c.node_id, c.owner, c.excluded) for c in clients if c.excluded is not None),
                       sum(c.bytes_sent for c in clients), sum(c.bytes_received for c in clients),
                       dict(self.grid.steps),
                       {step: round(s, 3) for step, s in self.grid.client_seconds.items()},
                       dict(self.grid.client_peak_mb))

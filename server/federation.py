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
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import TypeVar

from flwr.app import Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from fedtrak import wire
from fedtrak.errors import FedtrakError
from fedtrak.logs import progress_bar
from fedtrak.privacy.mechanisms import DPSettings
from fedtrak.results.summary import Clients, Excluded
from fedtrak.server.validation import read_info

log = logging.getLogger("fedtrak.server")
T = TypeVar("T")
#: Flower errors that mean the node went away (not that fedtrak's handler refused the step).
REJOIN_CODES = {ErrorCode.NODE_UNAVAILABLE, ErrorCode.CLIENT_APP_CRASHED}
#: Seconds between looks for a node that went away.
REJOIN_POLL = 2.0
#: Shortest and longest pause between pulls while no reply arrives (the pause doubles up to the longest).
PULL_PAUSE = (0.02, 1.0)
#: The longest pause in a simulation, whose pulls read the server's own memory (Flower's in-memory
#: grid polls every 0.1 s itself): a reply is seen 0.05 s after it arrives on average, not 0.5 s.
SIMULATION_PULL_PAUSE = 0.1
#: Most replies asked for in one pull (a deployed SuperLink refuses an oversized pull response).
PULL_AT_ONCE = 64
#: Seconds between looks at the SuperNodes' activation times while replies are awaited.
ACTIVATION_CHECK = 5.0


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
    """A Flower Grid that counts the payload bytes of every message, per node and per step (and
    each step's largest message out).

    Everything goes through it, Flower's FedAvg strategy included, so the
    summary's bytes cover the whole run. ``step`` names what is counted now. ``longest_pause``:
    the longest pause between pulls while :meth:`stream` awaits replies.
    """

    def __init__(self, grid: Grid, longest_pause: float = PULL_PAUSE[1]) -> None:
        self._grid = grid
        self.longest_pause = longest_pause
        self.step = "setup"
        self.bytes: dict[int, dict[str, int]] = defaultdict(lambda: {"sent": 0, "received": 0})
        self.steps: dict[str, dict[str, int]] = defaultdict(lambda: {"sent": 0, "received": 0, "largest_sent": 0})
        self.client_seconds: dict[str, float] = defaultdict(float)
        self.client_peak_mb: dict[str, float] = defaultdict(float)

    def __getattr__(self, name: str) -> object:
        return getattr(self._grid, name)

    def _count(self, node: int, way: str, content: RecordDict) -> None:
        size = wire.payload_bytes(content)
        self.bytes[node][way] += size
        step = self.steps[self.step]
        step[way] += size
        if way == "sent":
            step["largest_sent"] = max(step["largest_sent"], size)

    def _received(self, node: int, reply: Message) -> None:
        if not reply.has_error():
            self._count(node, "received", reply.content)
            seconds, peak_mb = wire.read_handler_timing(reply.content)
            self.client_seconds[self.step] += seconds
            if peak_mb is not None:
                self.client_peak_mb[self.step] = max(self.client_peak_mb[self.step], peak_mb)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """Flower's ``send_and_receive``, counting what goes out and what comes back (Flower's
        strategies call it; fedtrak's own steps use :meth:`stream`)."""
        messages = list(messages)
        for msg in messages:
            self._count(msg.metadata.dst_node_id, "sent", msg.content)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            self._received(reply.metadata.src_node_id, reply)
        return replies

    def _activations(self) -> dict[int, str]:
        """When each SuperNode last (re)connected, where the SuperLink says (a deployment)."""
        try:
            return {int(n.node_id): str(n.last_activated_at or "") for n in self._grid.get_nodes()}
        except Exception:  # noqa: BLE001 - a grid without node details: nothing to compare
            return {}

    def stream(self, messages: Iterable[Message], timeout: float, in_flight: int = 0
               ) -> Iterator[tuple[int, Message | None]]:
        """Push ``messages`` (consumed lazily) at most ``in_flight`` out at once (0: all at once)
        and yield ``(destination node, reply)`` for each reply as soon as it is pulled. A message
        still unanswered ``timeout`` seconds after it was pushed is given up; its node gets no
        reply from this generator. A node that connects again after its message was pushed (a
        restarted SuperNode; Flower does not deliver the message to it again) gets ``None``
        instead of a reply, so that the caller can send the message again."""
        source = iter(messages)
        exhausted = False
        waiting: dict[str, tuple[float, int, str]] = {}  # message id -> (deadline, destination, activation)
        pause, cursor = PULL_PAUSE[0], 0
        activations: dict[int, str] = {}
        checked = time.monotonic()
        while True:
            batch: list[Message] = []
            while not exhausted and (in_flight <= 0 or len(waiting) + len(batch) < in_flight):
                msg = next(source, None)
                if msg is None:
                    exhausted = True
                else:
                    batch.append(msg)
            if batch:
                for msg in batch:
                    self._count(msg.metadata.dst_node_id, "sent", msg.content)
                deadline = time.monotonic() + timeout
                activations = activations or self._activations()
                ids = set(self._grid.push_messages(batch))  # Flower sets each message's id as it pushes
                for msg in batch:
                    if msg.metadata.message_id in ids:
                        dst = msg.metadata.dst_node_id
                        waiting[msg.metadata.message_id] = (deadline, dst, activations.get(dst, ""))
            if not waiting:
                if exhausted:
                    return
                continue
            keys = list(waiting)
            start = cursor % len(keys)
            cursor = start + PULL_AT_ONCE
            replies = list(self._grid.pull_messages((keys[start:] + keys[:start])[:PULL_AT_ONCE]))
            for reply in replies:
                entry = waiting.pop(reply.metadata.reply_to_message_id, None)
                if entry is None:
                    continue
                self._received(entry[1], reply)
                yield entry[1], reply
            now = time.monotonic()
            for mid in [m for m, (deadline, _, _) in waiting.items() if deadline < now]:
                del waiting[mid]
            # only where the SuperLink gives activation times (a deployment; a simulation's grid gives none)
            if now - checked >= ACTIVATION_CHECK and any(before for _, _, before in waiting.values()):
                checked, activations = now, self._activations()
                for mid, (_, node, before) in list(waiting.items()):
                    if before and activations.get(node, before) != before:
                        del waiting[mid]
                        yield node, None
            if replies:
                pause = PULL_PAUSE[0]
            else:
                time.sleep(pause)
                pause = min(2 * pause, self.longest_pause)


#: Seconds between "waiting for N more" log lines while the server waits for SuperNodes.
WAIT_LOG_EVERY = 10.0
#: Seconds before the server's second look for SuperNodes (the pause then doubles up to a second).
FIRST_POLL = 0.05


def wait_for_nodes(grid: Grid, wanted: int, timeout: float, poll: float = 1.0, at_least: bool = False
                   ) -> list[int]:
    """The node ids the run uses: ``wanted`` of the connected ones once that many are connected
    (with ``at_least``: every connected one). Logs how many it still waits for every
    :data:`WAIT_LOG_EVERY` seconds. It looks again after :data:`FIRST_POLL` seconds, the pause
    doubling up to ``poll`` (a simulation's virtual nodes connect within a fraction of a second of
    the ServerApp's start; a deployment's SuperNodes may take minutes).

    Raises:
        FedtrakError: if fewer than ``wanted`` connect within ``timeout`` seconds.
    """
    start = time.monotonic()
    logged, pause = start, min(FIRST_POLL, poll)
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= wanted:
            if len(nodes) > wanted and not at_least:
                log.warning("%d SuperNodes are connected, the run config's clients=%d: using %d of them "
                            "(all-connected=true uses every connected one)", len(nodes), wanted, wanted)
                return nodes[:wanted]
            return nodes
        now = time.monotonic()
        if now - start > timeout:
            raise FedtrakError(f"only {len(nodes)} of {wanted} clients (SuperNodes) connected within {timeout:g} s: "
                               "start more SuperNodes, or lower the run config's clients (with all-connected=true "
                               "it is a minimum)")
        if now - logged >= WAIT_LOG_EVERY:
            log.info("waiting for %d more of %d SuperNodes (%d connected, %.0f s of %g)", wanted - len(nodes),
                     wanted, len(nodes), now - start, timeout)
            logged = now
        time.sleep(pause)
        pause = min(2 * pause, poll)


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
            log.warning("excluding client %s (node %d): %s", record.owner or "?", node, reason)

    def broadcast(self, message_type: str, content_for: Callable[[int], RecordDict],
                  on_reply: Callable[[int, RecordDict], None] | None = None) -> dict[int, RecordDict]:
        """Send ``content_for(node)`` to every active client; return the replies that arrived.

        With ``on_reply``, each reply is handed to it as it arrives and not kept (the returned
        dict is empty): it checks and folds the reply, and may exclude its client. A client
        whose SuperNode went away mid-step (Flower reports the node unavailable or its
        ClientApp crashed) and comes back within ``rejoin_wait`` seconds gets the message once
        more: a restarted node reuses its finished work from its store. Others are excluded.
        """
        self.grid.step = message_type
        replies, failed = self._exchange(message_type, content_for, self.active(), on_reply)
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
            again, failed_again = self._exchange(message_type, content_for, back, on_reply)
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
        return self._exchange(message_type, content_for, nodes)[0]

    def _exchange(self, message_type: str, content_for: Callable[[int], RecordDict], nodes: list[int],
                  on_reply: Callable[[int, RecordDict], None] | None = None
                  ) -> tuple[dict[int, RecordDict], dict[int, tuple[int | None, str]]]:
        """One streamed send and receive: the replies (none kept with ``on_reply``), and per failed
        node its Flower error code and a reason."""
        messages = (Message(content_for(node), dst_node_id=node, message_type=message_type) for node in nodes)
        replies: dict[int, RecordDict] = {}
        failed: dict[int, tuple[int | None, str]] = {}
        answered: set[int] = set()
        with progress_bar(self.progress, len(nodes), message_type, unit="client", leave=False) as bar:
            for node, reply in self.grid.stream(messages, self.timeout, self.in_flight):
                bar.update()
                answered.add(node)
                if reply is None:
                    lost = f"{message_type} lost: the node connected again after it was sent"
                    failed[node] = (ErrorCode.NODE_UNAVAILABLE, lost)
                elif reply.has_error():
                    failed[node] = (reply.error.code, f"{message_type} failed: {reply.error.reason}")
                elif on_reply is None:
                    replies[node] = reply.content
                else:
                    on_reply(node, reply.content)
        for node in nodes:
            if node not in answered:
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

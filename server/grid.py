"""The server's side of Flower's messaging: a Grid that counts every message's bytes and streams
replies as they arrive (:class:`CountingGrid`), and the wait for a run's SuperNodes to connect
(:func:`wait_for_nodes`)."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fedtrak import wire
from fedtrak.errors import FedtrakError

log = logging.getLogger("fedtrak.server")

#: Shortest and longest pause between pulls while no reply arrives (the pause doubles up to the longest).
PULL_PAUSE = (0.02, 1.0)
#: The longest pause in a simulation, whose pulls read the server's own memory (Flower's in-memory
#: grid polls every 0.1 s itself): a reply is seen 0.05 s after it arrives on average, not 0.5 s.
SIMULATION_PULL_PAUSE = 0.1
#: Most replies asked for in one pull (a deployed SuperLink refuses an oversized pull response).
PULL_AT_ONCE = 64
#: Seconds between looks at the SuperNodes' activation times while replies are awaited.
ACTIVATION_CHECK = 5.0


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

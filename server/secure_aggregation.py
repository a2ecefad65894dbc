"""The server's side of secure aggregation: the four rounds as Flower query messages, and the sum.

:func:`secure_gram_sum` replaces the plain featurize round of private mode
when a run sets ``secure-agg``. The server relays advertisements and sealed
shares, receives only masked vectors, and unmasks their sum with the shares
the survivors reveal (:mod:`fedtrak.secagg.protocol`); it never holds one
client's Gram. What it can still check is checked on the sum: positive semi-definiteness when no noise was added, and that the
securely summed counts equal the counts the survivors reported. Too few
advertised keys end the run right after the first round
(:func:`check_advertised`), before any client is asked for shares or a masked
input; the run folder records why (:class:`fedtrak.errors.RunFailed`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from flwr.app import RecordDict

from fedtrak import wire
from fedtrak.errors import FedtrakError, RunFailed
from fedtrak.privacy.bounds import gram_limits
from fedtrak.privacy.distributed import DistributedNoise, noise_fraction_bits
from fedtrak.secagg import fixedpoint, graph
from fedtrak.secagg.protocol import (
    Advertisement,
    MaskedTotal,
    SealedShares,
    check_revealed,
    secagg_context,
    unmask_sum,
    verify_advert,
)
from fedtrak.server.federation import Federation
from fedtrak.server.validation import check_gram_size, check_psd
from fedtrak.timing import PhaseTimer
from fedtrak.wire.codecs import unpack_upper
from fedtrak.wire.job import Job
from fedtrak.wire.secagg import (
    Revealed,
    adverts_content,
    input_request,
    read_advert_reply,
    read_masked,
    read_rejected,
    read_revealed,
    read_sealed,
    survivors_content,
    with_job,
)

ROUNDS = (wire.FEATURIZE, wire.SECAGG_SHARE, wire.SECAGG_INPUT, wire.SECAGG_UNMASK)
#: The fewest clients a secure sum runs with: its share threshold (at least 2) cannot protect fewer.
MIN_CLIENTS = 3


@dataclass
class SecureSum:
    """The unmasked sum: one ``(k, k)`` Gram per checkpoint, the summed count, who is in it,
    the threshold the shares needed, and the protocol's account for the summary."""

    grams: list[np.ndarray]
    count: float
    survivors: list[int]
    noise: DistributedNoise
    report: dict

    @property
    def threshold(self) -> int:
        """Shares needed to rebuild a client's secrets, and the survivors the DP noise is sized for."""
        return self.noise.threshold


def secure_gram_sum(fed: Federation, job: Job, states: list, checkpoints: list[int],
                    timer: PhaseTimer) -> SecureSum:
    """Featurize with secure aggregation: advertise, share, masked input, unmask.

    The job's ``secagg-threshold`` sets the share threshold
    (:func:`fedtrak.secagg.graph.threshold`); under DP the clients add
    distributed Skellam noise sized for that threshold, and the sum is not
    checked for being PSD.

    Raises:
        RunFailed: when too few clients advertised keys (:func:`check_advertised`):
            no client was asked for shares or a masked input.
        FedtrakError: with fewer survivors than the threshold, or a sum that
            fails its checks; no sum is returned then.
    """
    context = secagg_context(job.run_id)
    dim, dp, fraction = job.resolved.proj_dim, job.dp(), job.settings.secagg.secagg_threshold
    with timer.phase("featurize_round"):
        request = wire.encode_featurize_request(job, states, secagg_context=job.run_id)
        replies = fed.broadcast(wire.FEATURIZE, lambda node: RecordDict(request),
                                label="secure aggregation 1/4 (featurize, keys)")
    fed.note_info(replies, counted=False)  # the keys carry no count: it leaves with the masked input
    client_seconds = {n: wire.read_timing(c) for n, c in replies.items() if wire.read_timing(c)}
    adverts = fed.accept(replies, lambda node, c: _checked_advert(c, node, context, fed.source(node)))
    check_advertised(fed, job, adverts)  # before any client is asked for shares or a masked input
    nodes = fed.require_clients("the secure-aggregation advertisements")
    threshold = graph.threshold(len(nodes), fraction)
    noise = DistributedNoise(dim, len(checkpoints), threshold,
                             noise_fraction_bits(dim, len(checkpoints), threshold, dp))
    hood = {u: sorted({u, *vs}) for u, vs in graph.neighbours(nodes).items()}

    with timer.phase("secagg_share_round"):
        replies = fed.broadcast(wire.SECAGG_SHARE, lambda node: with_job(
            adverts_content([adverts[v] for v in hood[node] if v in adverts], threshold), job))
    sealed = fed.accept(replies, lambda node, c: _checked_sealed(
        c, node, [v for v in hood[node] if v in adverts], fed.source(node)))
    shared = [u for u in fed.active() if u in sealed]

    delivered = {u: [v for v in hood[u] if v in sealed] for u in shared}
    length = len(checkpoints) * dim * (dim + 1) // 2 + 1
    sent = {u: list(peers) for u, peers in delivered.items()}  # each request as first sent, to ask again

    def request(node: int) -> RecordDict:
        return input_request([sealed[v][node] for v in sent[node]], checkpoints, noise.fraction_bits, job)

    masked, rejected = MaskedTotal(length), {}

    def fold(node: int, content: RecordDict) -> None:  # the server never holds more than one input
        try:
            vector, rejected[node] = read_masked(content, length, fed.source(node)), read_rejected(
                content, fed.source(node))
        except FedtrakError as exc:
            fed.exclude(node, str(exc))
            return
        if not fed.note_one(node, content):  # the client's count leaves with its masked input, not its keys
            return
        masked.add(node, vector)
        client_seconds.setdefault(node, {}).update(wire.read_timing(content))

    with timer.phase("secagg_input_round"):
        fed.broadcast(wire.SECAGG_INPUT, request, on_reply=fold)
    _exclude_accused(fed, rejected, delivered, masked, request, length)
    survivors = sorted(masked.members)
    if len(survivors) < threshold:
        raise FedtrakError(f"only {len(survivors)} masked inputs for a threshold of {threshold}: "
                           "the sum cannot be unmasked (no result)")

    with timer.phase("secagg_unmask_round"):
        replies = fed.broadcast(wire.SECAGG_UNMASK, lambda node: with_job(survivors_content(survivors), job))
    revealed = fed.accept(replies, lambda node, c: _checked_revealed(c, delivered[node], survivors, fed.source(node)))
    start = time.perf_counter()
    with timer.phase("secagg_unmask"):
        total = unmask_sum([adverts[u][0] for u in shared], masked, revealed, threshold, length, context,
                           {u: delivered[u] for u in survivors})
    unmask_seconds = time.perf_counter() - start
    grams, count = decoded_sum(total, dim, len(checkpoints), noise.fraction_bits)
    reported = sum(fed.clients[n].num_examples for n in survivors)
    if abs(count - reported) > 0.5:
        raise FedtrakError(f"the securely summed count {count:.1f} differs from the {reported} examples the "
                           "survivors reported: a client's masked input is not what it claims (no result)")
    rounding = fixedpoint.quantization_bound(len(survivors), noise.fraction_bits)
    if not dp.active:  # rounding moves each entry by at most the bound: spectral norm at most k times it
        for m, g in zip(checkpoints, grams):
            check_psd(g, f"secure sum of the Grams of checkpoint {m}", "secure aggregation", dim * rounding)
    else:  # one client's oversized input spoils the sum, and the protocol cannot tell whose it is
        limits = gram_limits(dp, count, dim, len(survivors) / threshold, rounding, counts=len(survivors))
        for m, g in zip(checkpoints, grams):
            try:
                check_gram_size(g, limits, f"secure sum of the Grams of checkpoint {m}", "secure aggregation")
            except FedtrakError as exc:
                raise FedtrakError(f"{exc}: a client's masked input is larger than clipped features and their "
                                   "noise can make it (no result)") from None
    report = _report(fed, adverts, shared, survivors, noise, hood, length, client_seconds, unmask_seconds, timer)
    return SecureSum(grams, count, survivors, noise, report)


def advertisement_shortfall(advertised: int, threshold: int) -> str | None:
    """Why ``advertised`` clients are too few for a secure sum whose job announced the share
    ``threshold``, or ``None`` when they are enough: at least :data:`MIN_CLIENTS`, and at least the
    threshold the job announced (the one each device admitted the run at, against its
    ``min-secagg-threshold``): fewer would sum at a lower threshold than the devices agreed to."""
    if advertised < MIN_CLIENTS:
        return f"fewer than the {MIN_CLIENTS} a secure sum needs"
    if advertised < threshold:
        return f"fewer than the run's share threshold {threshold}"
    return None


def clients_for_dropouts(fraction: float, dropouts: int = 1) -> int:
    """The fewest clients a secure sum at the share-threshold ``fraction`` can be planned with so
    that it still runs after ``dropouts`` of them refuse the job or go away before advertising keys
    (:func:`advertisement_shortfall` of the rest against the planned threshold)."""
    n = MIN_CLIENTS + dropouts
    while advertisement_shortfall(n - dropouts, graph.threshold(n, fraction)) is not None:
        n += 1
    return n


def check_advertised(fed: Federation, job: Job, adverts: dict[int, tuple[Advertisement, bytes]]) -> None:
    """End the run when too few clients advertised keys (:func:`advertisement_shortfall`), right
    after the advertisement round: before any client is asked for shares or a masked input, so no
    client has sent anything of its data.

    Raises:
        RunFailed: naming how many of the run's clients advertised keys, what the sum needs, and each
            excluded client with its reason; its ``failure`` holds the same for the run folder.
    """
    threshold, fraction = job.resolved.threshold, job.settings.secagg.secagg_threshold
    advertised = [n for n in fed.ordered() if n in adverts]
    why = advertisement_shortfall(len(advertised), threshold)
    if why is None:
        return
    excluded = [{"node_id": n, "owner": c.owner, "reason": c.excluded}
                for n, c in fed.clients.items() if c.excluded is not None]
    names = "; ".join(f"{fed.source(e['node_id'])} ({(e['reason'].splitlines() or [''])[0]})" for e in excluded)
    need, slack = max(MIN_CLIENTS, threshold), clients_for_dropouts(fraction)
    message = (f"secure aggregation: {len(advertised)} of {len(fed.clients)} clients advertised keys, {why}; "
               f"excluded: {names or 'none'}. No client was asked for shares or a masked input (no result); "
               f"plan at least {slack} clients (secagg-threshold {fraction:g}), so that one can drop out")
    raise RunFailed(message, {"step": "secure aggregation: advertisements", "clients": len(fed.clients),
                              "advertised": [fed.source(n) for n in advertised], "needed": need,
                              "threshold": threshold, "clients_for_one_dropout": slack, "excluded": excluded})


def decoded_sum(total: np.ndarray, dim: int, checkpoints: int, fraction_bits: int) -> tuple[list[np.ndarray], float]:
    """The summed Grams (``fraction_bits``) and example count (an integer slot) of an unmasked sum."""
    size = dim * (dim + 1) // 2
    values = fixedpoint.decode(total[:-1], fraction_bits)
    grams = [unpack_upper(values[i * size:(i + 1) * size], dim, "secure sum") for i in range(checkpoints)]
    return grams, float(fixedpoint.decode(total[-1:], fixedpoint.COUNT_FRACTION_BITS)[0])


def _exclude_accused(fed: Federation, rejected: dict[int, list[int]], delivered: dict[int, list[int]],
                     masked: MaskedTotal, request: Callable[[int], RecordDict], length: int) -> None:
    """Exclude each client whose sealed shares did not open at a peer it sealed them to (that peer
    masked without it) and take its input out of the sum, which is then unmasked as if it had
    dropped out. Its input was folded in on arrival: the client is asked for it again (a client
    gives the same stored input to the same request) and it must match what was folded in.

    Raises:
        FedtrakError: if an accused client's input cannot be taken out (no result).
    """
    accusers: dict[int, list[int]] = {}
    for u, peers in rejected.items():
        for v in peers:
            if v in delivered.get(u, []) and v != u:
                delivered[u].remove(v)
                accusers.setdefault(v, []).append(u)
    for v, by in accusers.items():
        fed.exclude(v, "its sealed shares did not open (failed authentication or malformed) at "
                       + ", ".join(fed.source(u) for u in sorted(by)))
        if v not in masked.members:
            continue
        again = fed.ask(wire.SECAGG_INPUT, request, [v]).get(v)
        try:
            if again is None:
                raise FedtrakError(f"{fed.source(v)} did not send its masked input again")
            masked.remove(v, read_masked(again, length, fed.source(v)))
        except FedtrakError as exc:
            raise FedtrakError(f"{exc}: its input cannot be taken out of the sum (no result)") from None


def _checked_revealed(content: RecordDict, delivered: list[int], survivors: list[int], source: str) -> Revealed:
    """A client's revealed shares: one per peer whose shares it was given, of the kind that peer's
    survival calls for (``b`` for a survivor, ``s`` for a dropped one)."""
    revealed = read_revealed(content, source)
    check_revealed(revealed, delivered, set(survivors), source)
    return revealed


def _checked_advert(content: RecordDict, node: int, context: bytes, source: str) -> tuple[Advertisement, bytes]:
    advert, identity = read_advert_reply(content, source)
    if advert.client != node:
        raise FedtrakError(f"{source}: advertises keys as client {advert.client}")
    try:
        verify_advert(advert, {node: Ed25519PublicKey.from_public_bytes(identity)}, context)
    except (FedtrakError, ValueError) as exc:  # ValueError: bytes that are no Ed25519 key
        raise FedtrakError(f"{source}: {exc}") from None
    return advert, identity


def _checked_sealed(content: RecordDict, node: int, hood: list[int], source: str) -> dict[int, SealedShares]:
    """One sealed share per member of ``hood`` (the client included), all from ``node``."""
    sealed = read_sealed(content, source)
    by_recipient = {s.recipient: s for s in sealed}
    if any(s.sender != node for s in sealed) or len(by_recipient) != len(sealed):
        raise FedtrakError(f"{source}: sealed shares name another sender or repeat a recipient")
    if set(by_recipient) != set(hood):
        raise FedtrakError(f"{source}: sealed shares for {sorted(by_recipient)}, expected its neighbourhood "
                           f"{hood}")
    return by_recipient


def _report(fed: Federation, adverts: dict, shared: list[int], survivors: list[int], noise: DistributedNoise,
            hood: dict[int, list[int]], length: int, client_seconds: dict[int, dict], unmask_seconds: float,
            timer: PhaseTimer) -> dict:
    n = len(adverts)
    phases = {wire.FEATURIZE: "featurize_round", wire.SECAGG_SHARE: "secagg_share_round",
              wire.SECAGG_INPUT: "secagg_input_round", wire.SECAGG_UNMASK: "secagg_unmask_round"}
    rounds = {step: {"seconds": round(timer.seconds[phases[step]], 3),
                     "bytes_sent": fed.grid.steps[step]["sent"], "bytes_received": fed.grid.steps[step]["received"]}
              for step in ROUNDS}
    keys = sorted({k for c in client_seconds.values() for k in c})
    per_client = {k: round(float(np.mean([c[k] for c in client_seconds.values() if k in c])), 4) for k in keys}
    degree = len(next(iter(hood.values()))) - 1
    return {
        "protocol": "Bonawitz et al. (CCS 2017) with the SecAgg+ neighbour graph; X25519, HKDF-SHA256, "
                    "ChaCha20 masks, AES-GCM share channels, Ed25519 signatures, Shamir over 2^521-1",
        "clients": n, "graph": "complete" if degree == n - 1 else "random regular (Harary, random order)",
        "degree": degree, "threshold": noise.threshold,
        "shared_keys": len(shared), "survivors": len(survivors),
        "dropped": sorted(set(adverts) - set(survivors)),
        "fraction_bits": noise.fraction_bits,
        "quantization_bound": fixedpoint.quantization_bound(len(survivors), noise.fraction_bits),
        "vector_length": length,
        "rounds": rounds,
        "client_seconds_mean": per_client,
        "server_unmask_seconds": round(unmask_seconds, 3),
    }

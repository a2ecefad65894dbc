"""Misbehaving clients, for testing that the server excludes them and goes on.

:func:`faulty_client_app` wraps fedtrak's real ClientApp: the client of a
chosen simulation partition computes its honest reply and then breaks it in
one named way (or raises outright). It lives in the package, not in the
tests, because Ray workers must be able to import it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace

import numpy as np
from flwr.app import Context, Error, Message, RecordDict

from fedtrak import wire
from fedtrak.client.app import HANDLER_ERROR, QUERIES, Handler
from fedtrak.secagg.fixedpoint import FRACTION_BITS
from fedtrak.wire import secagg as secagg_wire

#: Fault name -> (the step it breaks, what it does).
FAULTS = {
    "raise": ("featurize", "the ClientApp raises an exception"),
    "refuse": ("featurize", "the client refuses the job by name, as a device whose budget cannot pay does"),
    "gram-shape": ("featurize", "the Gram upper triangle of checkpoint 0 loses its last value"),
    "gram-nan": ("featurize", "a Gram entry is NaN"),
    "gram-asym": ("featurize", "the Gram is sent as a full matrix that is not symmetric"),
    "gram-not-psd": ("featurize", "an off-diagonal Gram entry is inflated past positive semi-definiteness"),
    "gram-scaled": ("featurize", "the Gram of checkpoint 0 is multiplied by 1e6 (still PSD)"),
    "gram-negative": ("featurize", "the Gram of checkpoint 0 is -1e12 times the identity"),
    "score-shape": ("score", "the owner totals have one value too many"),
    "summary-huge": ("score", "under DP: every owner summary entry is 1e12"),
    "score-raise": ("score", "the ClientApp crashes when scoring"),
    "score-nan": ("score", "an owner total is infinite"),
    "old-protocol": ("featurize", "the reply says it speaks protocol version 1"),
    "other-task": ("featurize", "the reply carries another task fingerprint"),
    "secagg-forged": ("featurize", "secure aggregation: the advertisement's signature has one bit flipped"),
    "secagg-drop-input": ("secagg_input", "secure aggregation: the client crashes after sharing its keys"),
    "secagg-short": ("secagg_input", "secure aggregation: the masked vector loses its last value"),
    "secagg-count": ("secagg_input", "secure aggregation: the masked vector claims 100 more examples"),
    "secagg-inflate": ("secagg_input", "secure aggregation: the first Gram entry grows by 1e6 (fixed point)"),
    "secagg-drop-unmask": ("secagg_unmask", "secure aggregation: the client crashes before revealing shares"),
    "secagg-garbage-shares": ("secagg_share", "secure aggregation: the shares sealed to one peer are garbled"),
    "secagg-bad-reveal": ("secagg_unmask", "secure aggregation: one revealed share is of the wrong kind"),
}


def _break_gram(fault: str, grams: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    g = np.array(grams[0], dtype=np.float64)
    k = int((np.sqrt(8 * len(g) + 1) - 1) / 2)
    if fault == "gram-shape":
        g = g[:-1]
    elif fault == "gram-nan":
        g[1] = np.nan
    elif fault == "gram-asym":
        full = np.zeros((k, k))
        full[np.triu_indices(k)] = g
        full[1, 0] = full[0, 1] + 1.0
        g = full
    elif fault == "gram-not-psd":
        g[1] = 10 * np.sqrt(g[0] * g[k]) + 1.0  # entry (0, 1) against diagonals (0, 0) and (1, 1)
    elif fault == "gram-scaled":
        g = g * 1e6
    elif fault == "gram-negative":
        g = np.where(np.triu(np.eye(k, dtype=bool))[np.triu_indices(k)], -1e12, 0.0)
    return {**grams, 0: g}


#: Faults that refuse the step as fedtrak's handlers refuse a job (a Flower error reply naming why).
REFUSALS = {"refuse": "injected refusal: this node's privacy budget cannot pay for the run: the job is refused"}
#: Faults that crash the client at their step, and what the crash says.
CRASHES = {"raise": "this client crashed", "score-raise": "this client crashed while scoring",
           "secagg-drop-input": "this client crashed after sharing its keys",
           "secagg-drop-unmask": "this client crashed before revealing its shares"}


def _corrupt_featurize(fault: str, content: RecordDict) -> RecordDict:
    info = wire.decode_info(content, "honest reply")
    if fault == "old-protocol":
        return wire.add_info(content, replace(info, protocol_version=1))
    if fault == "other-task":
        return wire.add_info(content, replace(info, task_fingerprint="0" * 16))
    if fault == "secagg-forged":
        advert, identity = secagg_wire.read_advert_reply(content, "honest reply")
        forged = replace(advert, signature=bytes([advert.signature[0] ^ 1]) + advert.signature[1:])
        return wire.add_info(secagg_wire.advert_reply(forged, identity), info)
    return wire.encode_grams_reply(_break_gram(fault, wire.decode_grams(content, "honest reply")), info)


def _corrupt_masked(fault: str, content: RecordDict) -> RecordDict:
    vector = np.array(secagg_wire.masked_vector(content, "honest reply"))
    if fault == "secagg-short":
        vector = vector[:-1]
    elif fault == "secagg-inflate":  # the first value is the Gram's entry (0, 0)
        vector[0] += np.uint64(10**6 << FRACTION_BITS)
    else:  # the count is the last value, an integer
        vector[-1] += np.uint64(100)
    return wire.add_info(secagg_wire.masked_content(vector), wire.decode_info(content, "honest reply"))


def _corrupt_sealed(fault: str, content: RecordDict) -> RecordDict:
    sealed = secagg_wire.read_sealed(content, "honest reply")
    victim = next(i for i, s in enumerate(sealed) if s.recipient != s.sender)
    garbled = bytes([sealed[victim].ciphertext[0] ^ 1]) + sealed[victim].ciphertext[1:]
    sealed[victim] = replace(sealed[victim], ciphertext=garbled)
    return secagg_wire.sealed_content(sealed)


def _corrupt_revealed(fault: str, content: RecordDict) -> RecordDict:
    revealed = secagg_wire.read_revealed(content, "honest reply")
    peer = min(revealed)
    kind, share = revealed[peer]
    revealed[peer] = ("s" if kind == "b" else "b", share)
    return secagg_wire.revealed_content(revealed)


def _corrupt_score(fault: str, content: RecordDict) -> RecordDict:
    release = wire.decode_score_reply(content, "honest reply")
    if fault == "summary-huge":
        release = replace(release, owner_summaries=np.full_like(release.owner_summaries, 1e12))
        return wire.encode_score_reply(release, wire.decode_info(content, "honest reply"))
    totals = np.array(release.owner_totals, dtype=np.float64)
    if fault == "score-shape":
        totals = np.append(totals, 0.0)
    else:
        totals[0] = np.inf
    return wire.encode_score_reply(replace(release, owner_totals=totals), wire.decode_info(content, "honest reply"))


def faulty_handlers(faults: Mapping[int, str]) -> dict[str, Handler]:
    """fedtrak's query handlers, except that partition ``p`` misbehaves as ``faults[p]`` (see
    :data:`FAULTS`); for :func:`fedtrak.simulations.simulate.run_simulation`'s ``handlers``."""
    unknown = set(faults.values()) - set(FAULTS)
    if unknown:
        raise ValueError(f"unknown faults {sorted(unknown)}; known: {sorted(FAULTS)}")

    def step(name: str, corrupt: Callable[[str, RecordDict], RecordDict] | None = None) -> Callable:
        honest = QUERIES[name]

        def handler(msg: Message, ctx: Context) -> Message:
            fault = faults.get(int(ctx.node_config.get("partition-id", -1)))
            fault = fault if fault and FAULTS[fault][0] == name else None
            if fault in CRASHES:
                raise RuntimeError(f"injected fault: {CRASHES[fault]}")
            if fault in REFUSALS:
                return Message(Error(HANDLER_ERROR, f"{name}: {REFUSALS[fault]}"), reply_to=msg)
            reply = honest(msg, ctx)
            if fault and corrupt and not reply.has_error():
                return Message(corrupt(fault, reply.content), reply_to=msg)
            return reply

        return handler

    corrupters = {"featurize": _corrupt_featurize, "secagg_share": _corrupt_sealed, "secagg_input": _corrupt_masked,
                  "secagg_unmask": _corrupt_revealed, "score": _corrupt_score}
    return {name: step(name, corrupters.get(name)) for name in QUERIES}

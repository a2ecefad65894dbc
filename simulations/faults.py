"""Misbehaving clients, for testing that the server excludes them and goes on.

:func:`faulty_client_app` wraps fedtrak's real ClientApp: the client of a
chosen simulation partition computes its honest reply and then breaks it in
one named way (or raises outright). It lives in the package, not in the
tests, because Ray workers must be able to import it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from client.app import build_client_app
from shared.protocol import INFO_KEY, arrays_to_record
from shared.secagg.fixedpoint import FRACTION_BITS
from shared.secagg.messages import ADVERT_KEY, MASKED_KEY

#: Fault name -> (the step it breaks, what it does).
FAULTS = {
    "raise": ("featurize", "the ClientApp raises an exception"),
    "gram-shape": ("featurize", "the Gram upper triangle of checkpoint 0 loses its last value"),
    "gram-nan": ("featurize", "a Gram entry is NaN"),
    "gram-asym": ("featurize", "the Gram is sent as a full matrix that is not symmetric"),
    "gram-not-psd": ("featurize", "an off-diagonal Gram entry is inflated past positive semi-definiteness"),
    "score-shape": ("score", "the owner totals have one value too many"),
    "score-raise": ("score", "the ClientApp crashes when scoring"),
    "score-nan": ("score", "an owner total is infinite"),
    "old-protocol": ("featurize", "the reply says it speaks protocol version 1"),
    "other-task": ("featurize", "the reply carries another task fingerprint"),
    "secagg-forged": ("featurize", "secure aggregation: the advertisement's signature has one bit flipped"),
    "secagg-drop-input": ("secagg_input", "secure aggregation: the client crashes after sharing its keys"),
    "secagg-short": ("secagg_input", "secure aggregation: the masked vector loses its last value"),
    "secagg-count": ("secagg_input", "secure aggregation: the masked vector claims 100 more examples"),
    "secagg-drop-unmask": ("secagg_unmask", "secure aggregation: the client crashes before revealing shares"),
}


def _break_gram(fault: str, grams: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    g = np.array(grams["0"], dtype=np.float64)
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
    return {**grams, "0": g}


def _break_score(fault: str, released: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    totals = np.array(released["owner-totals"], dtype=np.float64)
    if fault == "score-shape":
        totals = np.append(totals, 0.0)
    else:
        totals[0] = np.inf
    return {**released, "owner-totals": totals}


#: Faults that crash the client at their step, and what the crash says.
CRASHES = {"raise": "this client crashed", "score-raise": "this client crashed while scoring",
           "secagg-drop-input": "this client crashed after sharing its keys",
           "secagg-drop-unmask": "this client crashed before revealing its shares"}


def _corrupt_featurize(fault: str, content: RecordDict) -> None:
    if fault in ("old-protocol", "other-task"):
        info = content.config_records[INFO_KEY]
        if fault == "old-protocol":
            info["protocol-version"] = 1
        else:
            info["task-fingerprint"] = "0" * 16
    elif fault == "secagg-forged":
        advert = content.config_records[ADVERT_KEY]
        signature = bytes(advert["signature"])
        advert["signature"] = bytes([signature[0] ^ 1]) + signature[1:]
    else:
        grams = {k: a.numpy() for k, a in content.array_records["grams"].items()}
        content["grams"] = arrays_to_record(_break_gram(fault, grams))


def _corrupt_masked(fault: str, content: RecordDict) -> None:
    vector = np.array(content.array_records[MASKED_KEY]["vector"].numpy())
    if fault == "secagg-short":
        vector = vector[:-1]
    else:  # the count is the last value, in fixed point
        vector[-1] += np.uint64(100 << FRACTION_BITS)
    content[MASKED_KEY] = arrays_to_record({"vector": vector})


def _corrupt_score(fault: str, content: RecordDict) -> None:
    released = {k: a.numpy() for k, a in content.array_records["released"].items()}
    content["released"] = arrays_to_record(_break_score(fault, released))


def faulty_client_app(faults: Mapping[int, str], defaults: Mapping[str, Any] | None = None) -> ClientApp:
    """fedtrak's ClientApp in which partition ``p`` misbehaves as ``faults[p]`` (see :data:`FAULTS`)."""
    unknown = set(faults.values()) - set(FAULTS)
    if unknown:
        raise ValueError(f"unknown faults {sorted(unknown)}; known: {sorted(FAULTS)}")
    honest = build_client_app(defaults)
    app = ClientApp()

    def step(name: str, corrupt: Callable[[str, RecordDict], None] | None = None) -> Callable:
        def handler(msg: Message, ctx: Context) -> Message:
            fault = faults.get(int(ctx.node_config.get("partition-id", -1)))
            fault = fault if fault and FAULTS[fault][0] == name else None
            if fault in CRASHES:
                raise RuntimeError(f"injected fault: {CRASHES[fault]}")
            reply = honest(msg, ctx)
            if fault and corrupt and not reply.has_error():
                corrupt(fault, reply.content)
            return reply

        return handler

    app.train()(step("train"))
    for name, corrupt in (("featurize", _corrupt_featurize), ("secagg_share", None),
                          ("secagg_input", _corrupt_masked), ("secagg_unmask", None), ("features", None),
                          ("score", _corrupt_score)):
        app.query(name)(step(name, corrupt))
    return app

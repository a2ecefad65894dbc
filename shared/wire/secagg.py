"""How the secure-aggregation rounds travel on Flower messages; both sides use only this module.

=======================  ==============================================  ===========================
message type             server -> client                                client -> server
=======================  ==============================================  ===========================
``query.featurize``      the job, checkpoints and ``secagg`` (context)   info and its advertisement
``query.secagg_share``   neighbours' advertisements, threshold           shares sealed per neighbour
``query.secagg_input``   the shares sealed to this client                its masked vector (uint64),
                                                                         peers whose shares failed
``query.secagg_unmask``  the survivors                                   one revealed share per peer
=======================  ==============================================  ===========================

Client ids are Flower node ids, carried as decimal strings (a node id may
not fit a signed 64-bit config value). Every decoder raises
:class:`FedtrakError` naming the message's source and what is wrong.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from fedtrak.errors import FedtrakError
from fedtrak.secagg.protocol import Advertisement, SealedShares
from fedtrak.wire.job import Job
from fedtrak.wire.records import (
    JOB,
    array_record,
    arrays_to_record,
    config_record,
    encode_job,
    is_count,
    job_of,
)

SECAGG = "fedtrak.secagg"
ADVERT = "fedtrak.secagg-advert"
MASKED = "fedtrak.secagg-masked"
ADVERT_PREFIX = "fedtrak.advert-"
SEALED_PREFIX = "fedtrak.sealed-"
REVEALED_PREFIX = "fedtrak.revealed-"
REJECTED = "fedtrak.secagg-rejected"
#: Every record key of the secure-aggregation messages.
RECORD_KEYS = (SECAGG, ADVERT, MASKED, ADVERT_PREFIX, SEALED_PREFIX, REVEALED_PREFIX, REJECTED)
#: Bytes of a Shamir share's y value over the prime 2^521 - 1.
SHARE_BYTES = 66

Revealed = dict[int, tuple[str, tuple[int, int]]]


def _id(value: object, what: str, source: str) -> int:
    try:
        out = int(str(value))
    except ValueError:
        raise FedtrakError(f"{source}: {what} {value!r} is not a client id") from None
    if out < 0:
        raise FedtrakError(f"{source}: {what} {out} is not a client id")
    return out


def _bytes(record: Mapping, key: str, source: str, length: int | None = None) -> bytes:
    value = record.get(key)
    if not isinstance(value, bytes) or (length is not None and len(value) != length):
        want = f"{length} bytes" if length else "bytes"
        raise FedtrakError(f"{source}: {key!r} must be {want}, got {type(value).__name__}"
                           + (f" of {len(value)}" if isinstance(value, bytes) else ""))
    return value


def secagg_context_record(context: str) -> ConfigRecord:
    """The featurize request's mark that the run sums Grams securely, with the protocol's context."""
    return ConfigRecord({"context": context})


def advert_reply(advert: Advertisement, identity: bytes) -> RecordDict:
    """Round 1's reply (the client's info is added by the caller)."""
    return RecordDict({ADVERT: advert_record(advert, identity)})


def read_advert_reply(content: RecordDict, source: str) -> tuple[Advertisement, bytes]:
    """Back from :func:`advert_reply`."""
    return read_advert(config_record(content, ADVERT, source), source)


def with_job(content: RecordDict, job: Job) -> RecordDict:
    """A secure-aggregation request with the run's job, which every step's handler checks."""
    content[JOB] = encode_job(job)
    return content


def request_job(content: RecordDict, source: str = "server message") -> Job:
    """The job a secure-aggregation request carries."""
    return job_of(content, source)


def input_request(sealed: Sequence[SealedShares], checkpoints: Sequence[int], fraction_bits: int,
                  job: Job) -> RecordDict:
    """Round 3's request: the shares sealed to this client, which checkpoints' Grams to mask, at how
    many fixed-point fraction bits."""
    content = sealed_content(sealed)
    content[SECAGG] = ConfigRecord({"checkpoints": list(checkpoints), "fraction-bits": fraction_bits})
    return with_job(content, job)


def read_input_request(content: RecordDict, source: str = "server message"
                       ) -> tuple[list[SealedShares], list[int], int]:
    """Back from :func:`input_request`: the sealed shares, the checkpoints and the fraction bits."""
    cfg = config_record(content, SECAGG, source)
    checkpoints, bits = cfg.get("checkpoints"), cfg.get("fraction-bits")
    if not isinstance(checkpoints, list) or not all(is_count(m) for m in checkpoints) or \
            not isinstance(bits, int) or isinstance(bits, bool):
        raise FedtrakError(f"{source}: malformed masked-input request: checkpoints {checkpoints!r}, "
                           f"fraction bits {bits!r}")
    return read_sealed(content, source), list(checkpoints), bits


def advert_record(advert: Advertisement, identity: bytes) -> ConfigRecord:
    """An advertisement and its signer's Ed25519 public key as a ConfigRecord."""
    return ConfigRecord({"client": str(advert.client), "identity": identity, "c-public": advert.c_public,
                         "s-public": advert.s_public, "signature": advert.signature})


def read_advert(record: Mapping, source: str) -> tuple[Advertisement, bytes]:
    """Back from :func:`advert_record`: the advertisement and the identity key's raw bytes."""
    advert = Advertisement(_id(record.get("client"), "client", source), _bytes(record, "c-public", source, 32),
                           _bytes(record, "s-public", source, 32), _bytes(record, "signature", source, 64))
    return advert, _bytes(record, "identity", source, 32)


def adverts_content(adverts: Sequence[tuple[Advertisement, bytes]], threshold: int) -> RecordDict:
    """The share request: the neighbourhood's advertisements and the threshold."""
    content = RecordDict({SECAGG: ConfigRecord({"threshold": threshold})})
    for advert, identity in adverts:
        content[f"{ADVERT_PREFIX}{advert.client}"] = advert_record(advert, identity)
    return content


def read_adverts(content: RecordDict, source: str) -> tuple[list[tuple[Advertisement, bytes]], int]:
    """The advertisements and threshold of a share request."""
    threshold = config_record(content, SECAGG, source).get("threshold")
    if not isinstance(threshold, int) or isinstance(threshold, bool):
        raise FedtrakError(f"{source}: share request has no integer threshold")
    adverts = [read_advert(rec, source) for key, rec in content.config_records.items()
               if key.startswith(ADVERT_PREFIX)]
    return adverts, threshold


def sealed_content(sealed: Sequence[SealedShares]) -> RecordDict:
    """Sealed shares, one ConfigRecord each (keyed by sender and recipient)."""
    return RecordDict({f"{SEALED_PREFIX}{s.sender}-{s.recipient}": ConfigRecord(
        {"sender": str(s.sender), "recipient": str(s.recipient), "nonce": s.nonce, "ciphertext": s.ciphertext})
        for s in sealed})


def read_sealed(content: RecordDict, source: str) -> list[SealedShares]:
    """Back from :func:`sealed_content`."""
    out = []
    for key, rec in content.config_records.items():
        if key.startswith(SEALED_PREFIX):
            out.append(SealedShares(_id(rec.get("sender"), "sender", source),
                                    _id(rec.get("recipient"), "recipient", source),
                                    _bytes(rec, "nonce", source, 12), _bytes(rec, "ciphertext", source)))
    return out


def masked_content(vector: np.ndarray, rejected: Sequence[int] = ()) -> RecordDict:
    """A masked input vector, and the peers whose sealed shares did not open at this client."""
    content = RecordDict({MASKED: arrays_to_record({"vector": np.asarray(vector, dtype=np.uint64)})})
    if rejected:
        content[REJECTED] = ConfigRecord({"peers": [str(v) for v in rejected]})
    return content


def read_rejected(content: RecordDict, source: str) -> list[int]:
    """The peers a masked-input reply says sent it shares that do not open."""
    if REJECTED not in content.config_records:
        return []
    listed = content.config_records[REJECTED].get("peers")
    if not isinstance(listed, list):
        raise FedtrakError(f"{source}: rejected peers are not a list")
    return [_id(v, "rejected peer", source) for v in listed]


def masked_vector(content: RecordDict, source: str) -> np.ndarray:
    """A masked input's vector as it came (unchecked)."""
    vector = array_record(content, MASKED, source).get("vector")
    if vector is None:
        raise FedtrakError(f"{source}: masked input has no vector")
    return vector


def read_masked(content: RecordDict, length: int, source: str) -> np.ndarray:
    """A client's masked vector, checked for its length and dtype."""
    vector = array_record(content, MASKED, source).get("vector")
    if vector is None or vector.dtype != np.uint64 or vector.shape != (length,):
        got = "nothing" if vector is None else f"shape {vector.shape} and dtype {vector.dtype}"
        raise FedtrakError(f"{source}: masked input has {got}, expected ({length},) uint64")
    return vector


def survivors_content(survivors: Sequence[int]) -> RecordDict:
    """The unmask request: who sent a masked input."""
    return RecordDict({SECAGG: ConfigRecord({"survivors": [str(s) for s in survivors]})})


def read_survivors(content: RecordDict, source: str) -> list[int]:
    """Back from :func:`survivors_content`."""
    listed = config_record(content, SECAGG, source).get("survivors")
    if not isinstance(listed, list):
        raise FedtrakError(f"{source}: unmask request lists no survivors")
    return [_id(s, "survivor", source) for s in listed]


def revealed_content(revealed: Revealed) -> RecordDict:
    """Revealed shares: for each peer, which secret (``b`` or ``s``) and the share ``(x, y)``."""
    return RecordDict({f"{REVEALED_PREFIX}{peer}": ConfigRecord(
        {"peer": str(peer), "kind": kind, "x": x, "y": y.to_bytes(SHARE_BYTES, "big")})
        for peer, (kind, (x, y)) in revealed.items()})


def read_revealed(content: RecordDict, source: str) -> Revealed:
    """Back from :func:`revealed_content`."""
    out: Revealed = {}
    for key, rec in content.config_records.items():
        if not key.startswith(REVEALED_PREFIX):
            continue
        kind, x = rec.get("kind"), rec.get("x")
        if kind not in ("b", "s") or not isinstance(x, int) or isinstance(x, bool) or x < 1:
            raise FedtrakError(f"{source}: revealed share {key!r} is malformed")
        out[_id(rec.get("peer"), "peer", source)] = (kind, (x, int.from_bytes(
            _bytes(rec, "y", source, SHARE_BYTES), "big")))
    return out

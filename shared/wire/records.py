"""Message types, the job record, timing, model weights, and reading records out of a message.

The building blocks the messages of :mod:`fedtrak.wire.attribution` and
:mod:`fedtrak.wire.secagg` are made of.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import fields
from io import BytesIO

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common.constant import SType

from fedtrak.config.settings import Settings
from fedtrak.errors import FedtrakError
from fedtrak.privacy.budget import Scales
from fedtrak.wire.compat import PROTOCOL_VERSION
from fedtrak.wire.job import JOB_SECTIONS, Job, Resolved

FEATURIZE = "query.featurize"
FEATURES = "query.features"
SCORE = "query.score"
SECAGG_SHARE = "query.secagg_share"
SECAGG_INPUT = "query.secagg_input"
SECAGG_UNMASK = "query.secagg_unmask"
TRAIN = "train"

#: Record keys of the contents every step shares (every record key of the wire format starts
#: with ``fedtrak.``, so that no other module can spell one by accident: a test checks).
JOB = "fedtrak.wire.job"
TIMING = "fedtrak.timing"
#: The timing record's entries of every handler: its seconds and its process's peak memory.
HANDLER_SECONDS, PEAK_MB = "handler", "peak-mb"
#: Job record keys besides the settings' own.
RUN_ID, VERSION, FINGERPRINT = "run-id", "protocol-version", "task-fingerprint"
#: Job record keys of the resolved values (``resolved-proj-dim``, ...).
RESOLVED_PREFIX = "resolved-"
#: How each resolved value is read back, by its annotation.
RESOLVED_TYPES = {"int": int, "float": float, "str": str, "Scales": lambda text: Scales.parse(_text(text))}


def _text(value: object) -> str:
    """``value`` if it is text (the budget scales' field), else a TypeError."""
    if not isinstance(value, str):
        raise TypeError(f"expected text, got {type(value).__name__}")
    return value


def encode_job(job: Job) -> ConfigRecord:
    """The job as one flat ConfigRecord: the settings' run-config keys, the resolved values
    (prefixed ``resolved-``), the run id, protocol version and task fingerprint."""
    resolved = {f"{RESOLVED_PREFIX}{k.replace('_', '-')}": v for k, v in job.resolved.describe().items()}
    return ConfigRecord({**job.settings.flat(JOB_SECTIONS), **resolved, RUN_ID: job.run_id,
                         VERSION: job.protocol_version, FINGERPRINT: job.task_fingerprint})


def decode_job(record: Mapping, source: str = "server message") -> Job:
    """Back from :func:`encode_job`, with a clear error for an older server or a malformed field."""
    if VERSION not in record:
        raise FedtrakError(f"{source}: the job carries no protocol version: the server runs an older fedtrak "
                           f"than this node (protocol {PROTOCOL_VERSION})")
    values = dict(record)
    try:
        meta = (str(values.pop(RUN_ID)), int(values.pop(VERSION)), str(values.pop(FINGERPRINT)))
        resolved = Resolved(**{f.name: RESOLVED_TYPES[f.type](values.pop(RESOLVED_PREFIX + f.name.replace("_", "-")))
                               for f in fields(Resolved)})
    except KeyError as exc:
        raise FedtrakError(f"{source}: the job lacks field {exc.args[0]!r}") from None
    except (TypeError, ValueError, OverflowError, FedtrakError) as exc:
        raise FedtrakError(f"{source}: malformed job field: {exc}") from None
    missing = sorted(s.key for s in Settings.specs().values() if s.section in JOB_SECTIONS and s.key not in values)
    if missing:
        raise FedtrakError(f"{source}: the job lacks setting(s) {missing}")
    settings = Settings().updated(values)
    job = Job(meta[0], settings, resolved, task_fingerprint=meta[2], protocol_version=meta[1])
    _check_round_trip(record, job, source)
    return job


def _check_round_trip(record: Mapping, job: Job, source: str) -> None:
    """Refuse a job record that is not exactly what :func:`encode_job` makes of the job it decodes
    to (a value of the wrong type coerced on the way, a bool for a number) or holds NaN or infinity."""
    again = encode_job(job)
    for key, value in record.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise FedtrakError(f"{source}: job field {key!r} is {value}")
        other = again.get(key)
        if type(value) is not type(other) or value != other:
            raise FedtrakError(f"{source}: malformed job field {key!r}: {value!r}")


def job_of(content: RecordDict, source: str = "server message") -> Job:
    """The job a server message carries."""
    return decode_job(config_record(content, JOB, source), source)


def add_timing(content: RecordDict, seconds: Mapping[str, float]) -> None:
    """Add (or extend) the reply's account of the client's seconds and peak memory."""
    timing = content.metric_records.get(TIMING) or MetricRecord()
    for key, value in seconds.items():
        timing[key] = float(value)
    content[TIMING] = timing


def add_handler_timing(content: RecordDict, seconds: float, peak_mb: float) -> None:
    """Add a handler's own seconds and its process's peak memory to its reply's timing record."""
    add_timing(content, {HANDLER_SECONDS: seconds, PEAK_MB: peak_mb})


def drop_timing(content: RecordDict) -> None:
    """Remove the reply's seconds and peak memory (under DP they are a side channel: featurizing
    time grows with a client's example count)."""
    if TIMING in content:
        del content[TIMING]


def read_timing(content: RecordDict) -> dict[str, float]:
    """The seconds of each part of a client's work a reply reports (the handler's own excluded)."""
    return {k: v for k, v in _timing(content).items() if k not in (HANDLER_SECONDS, PEAK_MB)}


def read_handler_timing(content: RecordDict) -> tuple[float, float | None]:
    """A reply's handler seconds (0 if it reports none) and its process's peak memory in MB."""
    timing = _timing(content)
    return timing.get(HANDLER_SECONDS, 0.0), timing.get(PEAK_MB)


def _timing(content: RecordDict) -> dict[str, float]:
    timing = content.metric_records.get(TIMING) if hasattr(content, "metric_records") else None
    return {k: v for k, v in (timing or {}).items() if isinstance(v, float)}


def state_to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """A model ``state_dict`` as an ArrayRecord."""
    return ArrayRecord({k: Array(v.detach().cpu().numpy()) for k, v in state.items()})


def record_to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Back from :func:`state_to_record` (arrays are copied, so they are writable)."""
    return {k: torch.from_numpy(np.array(a.numpy())) for k, a in record.items()}


def with_frozen(averaged: ArrayRecord, sent: ArrayRecord, frozen: frozenset[str]) -> ArrayRecord:
    """An aggregated model record whose ``frozen`` entries are those the server ``sent`` (parameters
    that do not train: an average of equal float32 copies is not always equal to them)."""
    return ArrayRecord({k: sent[k] if k in frozen else v for k, v in averaged.items()})


def arrays_to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Named numpy arrays as an ArrayRecord."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def is_count(value: object) -> bool:
    """Whether a config value is an integer >= 0 (a bool is not one)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def array_record(content: RecordDict, key: str, source: str, view: bool = False) -> dict[str, np.ndarray]:
    """The numpy arrays of ArrayRecord ``key`` in a message, or a clear error naming ``source``.

    ``view``: read-only arrays over the message's own bytes (:func:`array_view`) instead of copies,
    for large arrays that are only read (a server folding thousands of Grams).
    """
    record = content.array_records.get(key) if hasattr(content, "array_records") else None
    if record is None:
        raise FedtrakError(f"{source}: message has no array record {key!r}")
    try:
        return {k: array_view(a) if view else a.numpy() for k, a in record.items()}
    except Exception as exc:  # a malformed payload can fail deep inside numpy
        raise FedtrakError(f"{source}: unreadable array in {key!r}: {exc}") from exc


def array_view(array: Array) -> np.ndarray:
    """A Flower Array as a read-only numpy array over its serialized bytes (no copy): the ``.npy``
    header read and checked as :func:`numpy.load` reads it, object arrays refused, the data's
    length checked against the header's shape."""
    if array.stype != SType.NUMPY:
        raise ValueError(f"serialization type {array.stype!r} is not numpy's")
    data = array.data
    stream = BytesIO(data)
    version = np.lib.format.read_magic(stream)
    read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in read_header:
        raise ValueError(f".npy format version {version} is not supported")
    shape, fortran, dtype = read_header[version](stream)
    if dtype.hasobject:
        raise ValueError(f"dtype {dtype} holds Python objects")
    count = math.prod(shape)
    if len(data) - stream.tell() != count * dtype.itemsize:
        raise ValueError(f"{len(data) - stream.tell()} bytes of data for shape {shape} of {dtype}")
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=stream.tell())
    return flat.reshape(shape, order="F" if fortran else "C")


def config_record(content: RecordDict, key: str, source: str) -> ConfigRecord:
    """ConfigRecord ``key`` of a message, or a clear error naming ``source``."""
    record = content.config_records.get(key) if hasattr(content, "config_records") else None
    if record is None:
        raise FedtrakError(f"{source}: message has no config record {key!r}")
    return record


def has_config(content: RecordDict, key: str) -> bool:
    """Whether a message carries ConfigRecord ``key``."""
    return key in content.config_records


def payload_bytes(content: RecordDict) -> int:
    """Bytes of a message's records (array data and config values; Flower's framing excluded).

    Config records are counted here as Flower counts them (keys, 8 bytes per
    number, 1 per bool, the length of a string), because flwr 1.41's
    ``ConfigRecord.count_bytes`` raises on an empty string.
    """
    total = 0
    for record in content.values():
        if isinstance(record, ConfigRecord):
            total += sum(len(k) + _config_value_bytes(v) for k, v in record.items())
        else:
            total += int(record.count_bytes())
    return total


def _config_value_bytes(value: object) -> int:
    if isinstance(value, list):
        return sum(_config_value_bytes(v) for v in value)
    if isinstance(value, (str, bytes)):
        return len(value)
    return 1 if isinstance(value, bool) else 8


#: How an error reply's reason names the replying device's owner, at its end (the public label every
#: reply of the device names in its info record), so that a refusal is reported by owner.
_OWNER_TAG = re.compile(r' \[owner ("(?:[^"\\]|\\.)*")\]\Z')


def error_reason(owner: str, reason: str) -> str:
    """An error reply's ``reason`` that names the device's ``owner`` at its end: ``... [owner "a"]``."""
    return f"{reason} [owner {json.dumps(owner)}]"


def error_owner(reason: str) -> tuple[str, str]:
    """The owner an error reply's reason names (``""`` if none) and the reason without it."""
    found = _OWNER_TAG.search(reason)
    if found is None:
        return "", reason
    try:
        owner = json.loads(found.group(1))
    except ValueError:
        return "", reason
    return str(owner), reason[:found.start()]

"""Helpers of the fuzz tests: valid payloads broken at random by mutations that always break them."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedtrak import wire
from fedtrak.errors import FedtrakError
from fedtrak.privacy.mechanisms import DPSettings
from fedtrak.wire.compat import PROTOCOL_VERSION

ROUNDS = 1000
SOURCE = "client a (node 7)"
FINGERPRINT = "ab" * 8
K, N = 16, 40
DP = DPSettings(noise_multiplier=2.0, clip_norm=1.0)
INFO = wire.ClientInfo("a", 0, N, PROTOCOL_VERSION, FINGERPRINT)
Mutation = Callable[[RecordDict, np.random.Generator], RecordDict]


def junk(rng: np.random.Generator, current: object = None) -> object:
    """A config value of a type no field of the protocol takes where it is put (of another type
    than ``current``: bytes of another length are only caught where a length is fixed; no ``True``
    for an unset optional setting, which may legitimately be a flag)."""
    choices = [[1, 2, 3], [b"x"], b"\x00" * int(rng.integers(1, 9)), float("nan"), float("inf"), -1e300, True]
    choices = [c for c in choices if type(c) is not type(current) and not (current == "" and c is True)]
    return choices[int(rng.integers(len(choices)))]


def bad_array(array: np.ndarray, rng: np.random.Generator, huge: bool = True) -> np.ndarray:
    """``array`` broken: another shape, non-finite values, another dtype or (``huge``) far too large."""
    kind = int(rng.integers(5 if huge else 4))
    a = np.array(array, dtype=np.float64)
    if kind == 0:  # one value more or fewer, or an extra axis
        return np.append(a.ravel(), rng.normal(size=int(rng.integers(1, 5)))) if rng.random() < 0.5 else a[..., None]
    if kind == 1:
        a.ravel()[int(rng.integers(a.size))] = rng.choice([np.nan, np.inf, -np.inf])
        return a
    if kind == 2:
        return np.zeros(a.shape, dtype=bool)
    if kind == 3:  # empty
        return np.zeros((0,) * max(a.ndim, 1))
    return a * 10.0 ** rng.uniform(4, 15) * rng.choice([-1, 1])


def replace_array(content: RecordDict, record: str, entry: str, value: np.ndarray) -> RecordDict:
    arrays = {k: v.numpy() for k, v in content.array_records[record].items()}
    arrays[entry] = value
    out = RecordDict(dict(content.items()))
    out[record] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    return out


def structural(content: RecordDict, rng: np.random.Generator) -> RecordDict:
    """A required record removed, replaced by the other record type, or one of its entries removed."""
    out = RecordDict(dict(content.items()))
    key = sorted(out.keys())[int(rng.integers(len(out)))]
    kind = int(rng.integers(3))
    if kind == 0:
        del out[key]
    elif kind == 1:
        out[key] = ConfigRecord({"x": 1}) if key in content.array_records else ArrayRecord({"x": Array(np.ones(2))})
    else:
        record = out[key]
        entry = sorted(record.keys())[int(rng.integers(len(record)))]
        copy = type(record)(dict(record.items()))
        del copy[entry]
        out[key] = copy
    return out


def info_mutation(content: RecordDict, rng: np.random.Generator) -> RecordDict:
    """The info record with one field of the wrong type, a count out of range or another install."""
    info = dict(content.config_records[wire.attribution.INFO].items())
    key = sorted(info)[int(rng.integers(len(info)))]
    choice = int(rng.integers(3))
    if choice == 0:
        info[key] = junk(rng)
    elif key == "num-examples":
        info[key] = int(rng.choice([-1, 0, 10**13, -(10**9)])) if choice == 1 else float(N)
    elif key == "protocol-version":
        info[key] = PROTOCOL_VERSION + int(rng.integers(1, 5)) * int(rng.choice([-1, 1]))
    elif key == "task-fingerprint":
        info[key] = "cd" * 8
    else:
        info[key] = junk(rng)
    out = RecordDict(dict(content.items()))
    out[wire.attribution.INFO] = ConfigRecord(info)
    return out


def fuzz(valid: RecordDict, validate: Callable[[RecordDict], object], mutations: list[Mutation],
          seed: int) -> None:
    validate(valid)  # the unbroken payload passes
    rng = np.random.default_rng(seed)
    for i in range(ROUNDS):
        mutate = mutations[int(rng.integers(len(mutations)))]
        payload = mutate(valid, rng)
        try:
            validate(payload)
        except FedtrakError as exc:
            assert SOURCE in str(exc), f"round {i}, {mutate.__name__}: {exc}"
            continue
        pytest.fail(f"round {i}: a payload broken by {mutate.__name__} was accepted: {payload}")


def config_junk(content: RecordDict, rng: np.random.Generator) -> RecordDict:
    """One field of one config record set to a value of the wrong type or length."""
    out = RecordDict(dict(content.items()))
    keys = sorted(content.config_records)
    key = keys[int(rng.integers(len(keys)))]
    record = dict(content.config_records[key].items())
    field = sorted(record)[int(rng.integers(len(record)))]
    record[field] = junk(rng, record[field])
    out[key] = ConfigRecord(record)
    return out

def array_junk(content: RecordDict, rng: np.random.Generator) -> RecordDict:
    """One array of one array record broken (:func:`bad_array`; a server may send any finite values)."""
    keys = sorted(content.array_records)
    key = keys[int(rng.integers(len(keys)))]
    record = content.array_records[key]
    entry = sorted(record)[int(rng.integers(len(record)))]
    return replace_array(content, key, entry, bad_array(record[entry].numpy(), rng, huge=False))

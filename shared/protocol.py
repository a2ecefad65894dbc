"""The federated protocol's messages: their types, their keys and how arrays travel.

Both the ServerApp and the ClientApp build and read messages only through
this module, so the wire format lives in one place (DESIGN.md section 3):

``query.featurize``  server -> client: the job (:class:`JobSpec`) and the
    weights of every checkpoint. Reply: one packed Gram upper triangle per
    checkpoint and the example count.
``query.features``   server -> client (trusted-server mode): same request.
    Reply: the features and out-to-loss weights themselves.
``query.score``      server -> client: the preconditioned queries ``U_m`` of
    every checkpoint and the release policy. Reply: what the policy releases.
``train``            Flower's FedAvg round: model weights in, local update out.

With secure aggregation, ``query.featurize`` replies with signed keys instead
of Grams, and three more query messages carry the protocol's rounds
(``query.secagg_share``, ``query.secagg_input``, ``query.secagg_unmask``;
their contents: :mod:`shared.secagg.messages`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from shared.compat import PROTOCOL_VERSION, check_compatible, task_fingerprint
from shared.corruption import FlipSpec
from shared.errors import FedtrakError
from shared.privacy.mechanisms import DPSettings
from shared.settings import ScoreSettings
from shared.tasks import Task

FEATURIZE = "query.featurize"
FEATURES = "query.features"
SCORE = "query.score"
SECAGG_SHARE = "query.secagg_share"
SECAGG_INPUT = "query.secagg_input"
SECAGG_UNMASK = "query.secagg_unmask"
TRAIN = "train"

#: Release policies of ``query.score``.
POLICIES = ("owner-totals", "topk", "full")
#: Attribution modes: clients release Grams and score locally, or send features.
MODES = ("private", "features")

JOB_KEY = "job"
INFO_KEY = "info"
SCORE_KEY = "score"
#: Metric record of a reply with the client's seconds (``handler``: the whole handler).
TIMING_KEY = "timing"
#: Config record of a featurize request that asks only for the noised norm histogram.
CLIP_KEY = "clip"
CKPT_PREFIX = "ckpt-"


@dataclass(frozen=True)
class JobSpec:
    """What every client needs to know to featurize its data the server's way.

    Integers of 0 stand for "the default" (``proj_dim``: the task's default
    k; ``train_size``/``query_size``: the whole split).
    """

    run_id: str
    task: str
    projector: str = "rademacher"
    proj_dim: int = 0
    seed: int = 0
    batch_size: int = 256
    train_size: int = 0
    query_size: int = 0
    partition: str = "iid"
    alpha: float = 0.5
    partition_seed: int = 0
    flip_fraction: float = 0.0
    flip_clients: str = ""
    noise_multiplier: float = 0.0
    clip_norm: float = 0.0
    clip_mode: str = "per-checkpoint"
    delta: float = 1e-5
    dp_train_noise: float = 0.0
    dp_train_clip: float = 1.0
    protocol_version: int = PROTOCOL_VERSION
    task_fingerprint: str = ""

    def check_node(self, task: Task) -> None:
        """Refuse the job if this node's protocol version or task fingerprint differs (names both)."""
        check_compatible(self.protocol_version, self.task_fingerprint, self.fingerprint(task), "the server")

    def fingerprint(self, task: Task) -> str:
        """The fingerprint of ``task`` under this job's projection settings."""
        return task_fingerprint(task, self.projector, self.proj_dim, self.seed)

    def dp(self) -> DPSettings:
        """How this client clips and noises what it releases (``noise_multiplier`` 0: it does not)."""
        dp = DPSettings(self.noise_multiplier, self.clip_norm, self.clip_mode, self.delta)
        dp.validate()
        return dp

    def flips(self) -> FlipSpec:
        """The label flips every simulated client applies to its data (none by default)."""
        try:
            clients = tuple(int(c) for c in self.flip_clients.split(",") if c)
        except ValueError:
            raise FedtrakError(f"job spec flip_clients {self.flip_clients!r} is not a list of ids") from None
        return FlipSpec(self.flip_fraction, clients, self.seed)

    def settings(self) -> ScoreSettings:
        """The featurizing part of the spec as the settings the featurizer is built from."""
        return ScoreSettings(proj_dim=self.proj_dim or None, projector=self.projector, seed=self.seed,
                             batch_size=self.batch_size)

    def to_record(self) -> ConfigRecord:
        """The spec as a Flower ConfigRecord."""
        return ConfigRecord(asdict(self))

    @classmethod
    def from_record(cls, record: Mapping) -> JobSpec:
        """Read a spec back, with a clear error for a missing or mistyped field."""
        if "protocol_version" not in record:
            raise FedtrakError("the job spec carries no protocol version: the server runs an older fedtrak "
                               f"than this node (protocol {PROTOCOL_VERSION})")
        values = {}
        for f in fields(cls):
            if f.name not in record:
                raise FedtrakError(f"job spec lacks field {f.name!r}")
            kind = {"int": int, "float": float, "str": str}[str(f.type)]
            value = record[f.name]
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise FedtrakError(f"job spec field {f.name!r} must be {kind.__name__}, got {value!r}")
            values[f.name] = value
        return cls(**values)


def state_to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """A model ``state_dict`` as an ArrayRecord."""
    return ArrayRecord({k: Array(v.detach().cpu().numpy()) for k, v in state.items()})


def record_to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Back from :func:`state_to_record` (arrays are copied, so they are writable)."""
    return {k: torch.from_numpy(np.array(a.numpy())) for k, a in record.items()}


def arrays_to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Named numpy arrays as an ArrayRecord."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def record_arrays(content: RecordDict, key: str, source: str) -> dict[str, np.ndarray]:
    """The numpy arrays of ArrayRecord ``key`` in a message, or a clear error naming ``source``."""
    record = content.array_records.get(key) if hasattr(content, "array_records") else None
    if record is None:
        raise FedtrakError(f"{source}: message has no array record {key!r}")
    try:
        return {k: a.numpy() for k, a in record.items()}
    except Exception as exc:  # a malformed payload can fail deep inside numpy
        raise FedtrakError(f"{source}: unreadable array in {key!r}: {exc}") from exc


def record_config(content: RecordDict, key: str, source: str) -> ConfigRecord:
    """ConfigRecord ``key`` of a message, or a clear error naming ``source``."""
    record = content.config_records.get(key) if hasattr(content, "config_records") else None
    if record is None:
        raise FedtrakError(f"{source}: message has no config record {key!r}")
    return record


def checkpoint_key(m: int) -> str:
    """The RecordDict key of checkpoint ``m``'s weights."""
    return f"{CKPT_PREFIX}{int(m)}"


def checkpoint_indices(content: RecordDict) -> list[int]:
    """The checkpoint indices a featurize request carries, sorted."""
    out = []
    for key in content.array_records:
        if key.startswith(CKPT_PREFIX):
            try:
                out.append(int(key[len(CKPT_PREFIX) :]))
            except ValueError as exc:
                raise FedtrakError(f"bad checkpoint key {key!r}") from exc
    if not out:
        raise FedtrakError("request carries no checkpoint")
    return sorted(out)


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

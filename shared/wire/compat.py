"""Whether a node and a server can work together: the protocol version and the task fingerprint.

Every server message carries both in its job spec, and every client reply in
its info record. A node whose fedtrak speaks another protocol version, or
whose task differs from the server's (another model architecture, parameter
count, input shape or classes, or other projection settings: the same task
name on an older or patched install), refuses the job with an error naming
the mismatch; the server excludes it, naming the node, and goes on.
"""

from __future__ import annotations

import hashlib
import json

from fedtrak.data.tasks import Task
from fedtrak.errors import FedtrakError

#: The wire protocol's version: bumped whenever a message's meaning changes.
PROTOCOL_VERSION = 8


def task_fingerprint(task: Task, projector: str, proj_dim: int, seed: int) -> str:
    """16 hex digits of SHA-256 over what features depend on besides weights and data."""
    model = task.make_model()
    spec = {"task": task.name, "architecture": str(model),
            "num_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "input_shape": list(task.input_shape), "num_classes": task.num_classes,
            "projector": projector, "proj_dim": proj_dim, "seed": seed}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def check_compatible(version: int, fingerprint: str, my_fingerprint: str, who: str) -> None:
    """Raise FedtrakError naming ``who`` if the version or the fingerprint differs from this side's."""
    if version != PROTOCOL_VERSION:
        raise FedtrakError(f"{who} speaks fedtrak protocol version {version}, this side {PROTOCOL_VERSION}: "
                           "install matching fedtrak versions")
    if fingerprint != my_fingerprint:
        raise FedtrakError(f"{who} has task fingerprint {fingerprint}, this side {my_fingerprint}: the model "
                           "architecture, parameter count, data shape or projection settings differ")

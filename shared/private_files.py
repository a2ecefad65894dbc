"""Writing secrets to disk: owner-only permissions, atomic replacement, no silent overwrite."""

from __future__ import annotations

import os
from pathlib import Path

from fedtrak.errors import FedtrakError


def write_private(path: Path, data: bytes, overwrite: bool = True) -> None:
    """Write ``data`` readable by its owner only (mode 0600), atomically (a temp file, then rename).

    Raises:
        FedtrakError: if ``path`` exists and ``overwrite`` is false.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FedtrakError(f"{path} exists; refusing to overwrite a key (pass --force to replace it)")
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)

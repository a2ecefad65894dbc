"""Writing secrets to disk: owner-only permissions, atomic replacement, no silent overwrite."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from fedtrak.errors import FedtrakError


def private_dir(path: Path) -> Path:
    """Create ``path`` (and its parents) if needed and make it the owner's only (mode 0700)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


def write_private(path: Path, data: bytes, overwrite: bool = True) -> None:
    """Write ``data`` readable by its owner only (mode 0600), atomically: a fresh temp file beside
    ``path`` (a random name, created exclusively, so no stale file or planted link is reused or
    followed), then renamed over ``path`` (which replaces a link there instead of following it).

    Raises:
        FedtrakError: if ``path`` exists and ``overwrite`` is false.
    """
    path = Path(path)
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise FedtrakError(f"{path} exists; refusing to overwrite a key (pass --force to replace it)")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fsync_dir(path: Path) -> None:
    """Make a rename in directory ``path`` durable (its entry survives a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

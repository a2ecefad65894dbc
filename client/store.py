"""A client's local store of features, memory-mapped and keyed by run and checkpoint.

``ROOT/<run_id>/ckpt_<m>/features.npy`` (float32, ``(n_c, k)``) and
``out_to_loss.npy`` (float32, ``(n_c,)``) are written into a temporary folder
and renamed into place when complete, so a restarted client finds either a
whole checkpoint or none, and never recomputes a finished one. Reading
memory-maps the arrays: a client with more data than RAM can score.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from shared.errors import FedtrakError

_RUN_ID = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


class FeatureStore:
    """Features of one run on one device, one folder per checkpoint."""

    def __init__(self, root: Path, run_id: str) -> None:
        if not _RUN_ID.match(run_id) or run_id in {".", ".."}:
            raise FedtrakError(f"run id {run_id!r} must be 1-128 characters of [A-Za-z0-9_.-]")
        self.dir = Path(root) / run_id
        self.dir.mkdir(parents=True, exist_ok=True)

    def _ckpt_dir(self, m: int) -> Path:
        if int(m) < 0:
            raise FedtrakError(f"checkpoint index must be non-negative, got {m}")
        return self.dir / f"ckpt_{int(m):03d}"

    def has(self, m: int) -> bool:
        """Whether checkpoint ``m`` is stored completely."""
        d = self._ckpt_dir(m)
        return (d / "features.npy").is_file() and (d / "out_to_loss.npy").is_file()

    def write(self, m: int, features: np.ndarray, out_to_loss: np.ndarray) -> None:
        """Store checkpoint ``m`` atomically (replacing an older copy)."""
        f = np.asarray(features, dtype=np.float32)
        q = np.asarray(out_to_loss, dtype=np.float32)
        if f.ndim != 2 or q.shape != (f.shape[0],):
            raise FedtrakError(f"features {f.shape} and out-to-loss {q.shape} do not match")
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.dir))
        try:
            np.save(tmp / "features.npy", f, allow_pickle=False)
            np.save(tmp / "out_to_loss.npy", q, allow_pickle=False)
            final = self._ckpt_dir(m)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def read(self, m: int) -> tuple[np.ndarray, np.ndarray]:
        """Memory-mapped ``(features, out_to_loss)`` of checkpoint ``m``.

        Raises:
            FedtrakError: if the checkpoint is missing or its files are corrupt.
        """
        d = self._ckpt_dir(m)
        if not self.has(m):
            raise FedtrakError(f"checkpoint {m} is not in the local store {self.dir}")
        try:
            f = np.load(d / "features.npy", mmap_mode="r", allow_pickle=False)
            q = np.load(d / "out_to_loss.npy", mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise FedtrakError(f"corrupt local store entry {d}: {exc}") from exc
        if f.ndim != 2 or q.shape != (f.shape[0],):
            raise FedtrakError(f"corrupt local store entry {d}: shapes {f.shape} and {q.shape}")
        return f, q

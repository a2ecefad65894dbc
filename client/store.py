"""A client's local store of features, memory-mapped and keyed by run and checkpoint.

``ROOT/<run_id>/ckpt_<m>/features.npy`` (float32, ``(n_c, k)``),
``out_to_loss.npy`` (float32, ``(n_c,)``) and ``fingerprint.txt`` (what the
features were computed from: checkpoint weights, projection, data) are
written chunk by chunk into a memory-mapped file in a temporary folder and
renamed into place when complete, so a restarted client finds either a
whole checkpoint or none, and never recomputes a finished one; a stored
checkpoint whose fingerprint differs from the request is recomputed.
Reading memory-maps the arrays: a client with more data than RAM can score.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
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

    @property
    def results_dir(self) -> Path:
        """Where results kept on the device for its owner go (``ROOT/<run_id>/results``)."""
        return self.dir / "results"

    def released_count(self, make: Callable[[], float]) -> int:
        """The example count this client releases in this run, at least 1.

        Made once by ``make`` (a noised count under differential privacy) and
        kept in ``released_count.txt``, so every later message repeats the same
        release instead of drawing fresh noise (which would cost privacy again).
        """
        path = self.dir / "released_count.txt"
        if path.is_file():
            try:
                return int(path.read_text())
            except ValueError:
                pass  # a torn write: make it again
        value = max(1, round(make()))
        tmp = path.with_suffix(".tmp")
        tmp.write_text(str(value))
        os.replace(tmp, path)
        return value

    def has(self, m: int, fingerprint: str | None = None) -> bool:
        """Whether checkpoint ``m`` is stored completely (and, if given, from ``fingerprint``)."""
        d = self._ckpt_dir(m)
        if not ((d / "features.npy").is_file() and (d / "out_to_loss.npy").is_file()):
            return False
        if fingerprint is None:
            return True
        stored = d / "fingerprint.txt"
        return stored.is_file() and stored.read_text() == fingerprint

    def write(self, m: int, features: np.ndarray, out_to_loss: np.ndarray, fingerprint: str = "") -> None:
        """Store checkpoint ``m`` atomically (replacing an older copy)."""
        f = np.asarray(features, dtype=np.float32)
        q = np.asarray(out_to_loss, dtype=np.float32)
        if f.ndim != 2 or q.shape != (f.shape[0],):
            raise FedtrakError(f"features {f.shape} and out-to-loss {q.shape} do not match")
        self.write_chunks(m, f.shape[0], f.shape[1], [(0, f, q)], fingerprint)

    def write_chunks(
        self,
        m: int,
        num: int,
        dim: int,
        chunks: Iterable[tuple[int, np.ndarray, np.ndarray]],
        fingerprint: str = "",
    ) -> None:
        """Store checkpoint ``m`` from ``(start, features, out_to_loss)`` chunks covering ``num`` rows.

        Only one chunk is in memory at a time; the result appears atomically.

        Raises:
            FedtrakError: if the chunks do not cover the rows exactly once with ``dim`` columns.
        """
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.dir))
        try:
            f = np.lib.format.open_memmap(tmp / "features.npy", mode="w+", dtype=np.float32, shape=(num, dim))
            q = np.lib.format.open_memmap(tmp / "out_to_loss.npy", mode="w+", dtype=np.float32, shape=(num,))
            filled = 0
            for start, feats, weights in chunks:
                if start != filled or feats.shape[1:] != (dim,) or weights.shape != (len(feats),):
                    raise FedtrakError(
                        f"feature chunk at row {start} with shapes {feats.shape}/{weights.shape} does "
                        f"not continue rows 0..{filled} of a ({num}, {dim}) store"
                    )
                if filled + len(feats) > num:
                    raise FedtrakError(f"feature chunks exceed the {num} rows of checkpoint {m}")
                f[start : start + len(feats)] = feats
                q[start : start + len(feats)] = weights
                filled += len(feats)
            if filled != num:
                raise FedtrakError(f"feature chunks cover {filled} of {num} rows of checkpoint {m}")
            f.flush()
            q.flush()
            del f, q
            (tmp / "fingerprint.txt").write_text(fingerprint)
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

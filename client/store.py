"""A client's local store of features, memory-mapped and keyed by run and checkpoint.

``ROOT/<run_id>/ckpt_<m>/features.npy`` (float32, ``(n_c, k)``),
``out_to_loss.npy`` and ``curvature.npy`` (float32, ``(n_c,)``: each example's out-to-loss
and curvature weights) and ``fingerprint.txt`` (what the
features were computed from: checkpoint weights, projection, data) are
written chunk by chunk into ``ckpt_<m>.partial/``, with the rows done recorded
after each chunk, and renamed into place when complete. A restarted client
finds whole checkpoints, which it never recomputes, and at most one partial
one, which it continues from its last finished chunk; a stored or partial
checkpoint whose fingerprint differs from the request is recomputed.
Reading memory-maps the arrays: a client with more data than RAM can score.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Self

import numpy as np

from fedtrak.errors import FedtrakError
from fedtrak.private_files import private_dir, write_private

_RUN_ID = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
#: The arrays stored per checkpoint (``NAME.npy``).
ARRAYS = ("features", "out_to_loss", "curvature")
#: Progress of a checkpoint being written: its fingerprint, shape and rows done.
PROGRESS_FILE = "progress.json"


class _Appender:
    """Writes a float32 ``.npy`` file of a known shape row block by row block, from row ``start``
    (the rows before it are kept): plain file writes, so written rows do not stay in memory."""

    def __init__(self, path: Path, shape: tuple[int, ...], start: int) -> None:
        self.path, self.shape, self.start = path, shape, start

    def __enter__(self) -> Self:
        self.file = open(self.path, "r+b" if self.start else "wb")
        np.lib.format.write_array_header_1_0(self.file, {"descr": "<f4", "fortran_order": False,
                                                         "shape": self.shape})
        self.row_bytes = 4 * int(np.prod(self.shape[1:], dtype=np.int64))
        self.file.seek(self.file.tell() + self.start * self.row_bytes)
        self.file.truncate()
        return self

    def append(self, rows: np.ndarray) -> None:
        """Append rows and make them durable."""
        self.file.write(np.ascontiguousarray(rows, dtype="<f4").tobytes())
        self.file.flush()
        os.fsync(self.file.fileno())

    def __exit__(self, *exc: object) -> None:
        self.file.close()


class FeatureStore:
    """Features of one run on one device, one folder per checkpoint."""

    def __init__(self, root: Path, run_id: str) -> None:
        if not _RUN_ID.match(run_id) or run_id in {".", ".."}:
            raise FedtrakError(f"run id {run_id!r} must be 1-128 characters of [A-Za-z0-9_.-]")
        private_dir(Path(root))  # the device's data, features and releases: its owner's only
        self.dir = private_dir(Path(root) / run_id)

    def _ckpt_dir(self, m: int) -> Path:
        if int(m) < 0:
            raise FedtrakError(f"checkpoint index must be non-negative, got {m}")
        return self.dir / f"ckpt_{int(m):03d}"

    @property
    def results_dir(self) -> Path:
        """Where results kept on the device for its owner go (``ROOT/<run_id>/results``)."""
        return self.dir / "results"

    def released_count(self, make: Callable[[], float], charge: Callable[[], None] = lambda: None) -> int:
        """The example count this client releases in this run, at least 1.

        Made once by ``make`` (a noised count under differential privacy), charged once by
        ``charge`` (before it is kept) and kept in ``released_count.txt``, so every later message
        repeats the same release instead of drawing fresh noise (which would cost privacy again).
        """
        path = self.dir / "released_count.txt"
        if path.is_file():
            try:
                return int(path.read_text())
            except ValueError:
                pass  # a torn write: make it again
        value = max(1, round(make()))
        charge()
        write_private(path, str(value).encode())
        return value

    def has_release(self, name: str) -> bool:
        """Whether release ``name`` of this run is kept (it has left the device before)."""
        return (self.dir / "released" / f"{name}.npy").is_file()

    def released(self, name: str, make: Callable[[], np.ndarray]) -> np.ndarray:
        """A noised release of this run (a Gram, features, owner summaries), made once by ``make``
        and kept in ``released/NAME.npy``: a step the server sends again (a node that lost its
        connection after replying, a resumed run) gets the same release back instead of fresh
        noise, which would cost privacy again."""
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,128}", name):
            raise FedtrakError(f"release name {name!r} must be 1-128 characters of [A-Za-z0-9_.-]")
        folder = private_dir(self.dir / "released")
        path = folder / f"{name}.npy"
        if path.is_file():  # written atomically: unreadable means damaged, and fresh noise would cost again
            try:
                return np.load(path, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise FedtrakError(f"kept release {path} is unreadable ({exc}): it may already have been sent, "
                                   "so the device will not draw fresh noise; restore or remove it") from exc
        value = np.asarray(make())
        buffer = io.BytesIO()
        np.save(buffer, value)
        write_private(path, buffer.getvalue())
        return value

    def has(self, m: int, fingerprint: str | None = None) -> bool:
        """Whether checkpoint ``m`` is stored completely (and, if given, from ``fingerprint``)."""
        d = self._ckpt_dir(m)
        if not all((d / f"{name}.npy").is_file() for name in ARRAYS):
            return False
        if fingerprint is None:
            return True
        stored = d / "fingerprint.txt"
        return stored.is_file() and stored.read_text() == fingerprint

    def write(self, m: int, features: np.ndarray, out_to_loss: np.ndarray, curvature: np.ndarray | None = None,
              fingerprint: str = "") -> None:
        """Store checkpoint ``m`` atomically (replacing an older copy); ``curvature`` defaults to 1s."""
        f = np.asarray(features, dtype=np.float32)
        q = np.asarray(out_to_loss, dtype=np.float32)
        w = np.ones_like(q) if curvature is None else np.asarray(curvature, dtype=np.float32)
        if f.ndim != 2 or q.shape != (f.shape[0],) or w.shape != q.shape:
            raise FedtrakError(f"features {f.shape}, out-to-loss {q.shape} and curvature {w.shape} do not match")
        self.write_chunks(m, f.shape[0], f.shape[1], [(0, f, q, w)], fingerprint)

    def _partial_dir(self, m: int) -> Path:
        return self.dir / f"{self._ckpt_dir(m).name}.partial"

    def resume_point(self, m: int, num: int, dim: int, fingerprint: str = "") -> int:
        """Rows of checkpoint ``m`` already written by an interrupted run from the same
        ``fingerprint`` and shape (0 if none; a partial copy that does not match is deleted)."""
        part = self._partial_dir(m)
        try:
            meta = json.loads((part / PROGRESS_FILE).read_text())
            rows = int(meta["rows"])
            sizes = [(part / f"{name}.npy").stat().st_size for name in ARRAYS]
            if (meta["fingerprint"] == fingerprint and meta["shape"] == [num, dim]
                    and sizes[0] >= rows * dim * 4 and min(sizes[1:]) >= rows * 4):
                return rows
        except (OSError, ValueError, KeyError, TypeError):
            pass
        shutil.rmtree(part, ignore_errors=True)
        return 0

    def write_chunks(
        self,
        m: int,
        num: int,
        dim: int,
        chunks: Iterable[tuple[int, np.ndarray, np.ndarray, np.ndarray]],
        fingerprint: str = "",
    ) -> None:
        """Store checkpoint ``m`` from ``(start, features, out_to_loss, curvature)`` chunks covering
        ``num`` rows.

        The chunks start where :meth:`resume_point` says an interrupted run
        stopped (row 0 for a fresh one). Each chunk is appended to the files
        and made durable, and the progress recorded, before the next is
        taken, so a client stopped at any point loses at most the chunk in
        hand; only one chunk is in memory at a time, and the finished
        checkpoint appears atomically.

        Raises:
            FedtrakError: if the chunks do not continue the rows exactly once with ``dim`` columns.
        """
        part = self._partial_dir(m)
        filled = self.resume_point(m, num, dim, fingerprint)
        part.mkdir(parents=True, exist_ok=True)
        try:
            with _Appender(part / "features.npy", (num, dim), filled) as f, \
                    _Appender(part / "out_to_loss.npy", (num,), filled) as q, \
                    _Appender(part / "curvature.npy", (num,), filled) as w:
                self._progress(part, fingerprint, num, dim, filled)
                for start, feats, weights, curvature in chunks:
                    if start != filled or feats.shape[1:] != (dim,) or weights.shape != (len(feats),) \
                            or curvature.shape != weights.shape:
                        raise FedtrakError(
                            f"feature chunk at row {start} with shapes {feats.shape}/{weights.shape}/"
                            f"{curvature.shape} does not continue rows 0..{filled} of a ({num}, {dim}) store"
                        )
                    if filled + len(feats) > num:
                        raise FedtrakError(f"feature chunks exceed the {num} rows of checkpoint {m}")
                    f.append(feats)
                    q.append(weights)
                    w.append(curvature)
                    filled += len(feats)
                    self._progress(part, fingerprint, num, dim, filled)
            if filled != num:
                raise FedtrakError(f"feature chunks cover {filled} of {num} rows of checkpoint {m}")
            (part / "fingerprint.txt").write_text(fingerprint)
            (part / PROGRESS_FILE).unlink()
            final = self._ckpt_dir(m)
            if final.exists():
                shutil.rmtree(final)
            os.replace(part, final)
        except FedtrakError:
            shutil.rmtree(part, ignore_errors=True)  # wrong chunks: nothing of it can be resumed
            raise

    @staticmethod
    def _progress(part: Path, fingerprint: str, num: int, dim: int, rows: int) -> None:
        tmp = part / (PROGRESS_FILE + ".tmp")
        tmp.write_text(json.dumps({"fingerprint": fingerprint, "shape": [num, dim], "rows": rows}))
        os.replace(tmp, part / PROGRESS_FILE)

    def read_curvature(self, m: int) -> np.ndarray:
        """Memory-mapped curvature weights ``(n_c,)`` of checkpoint ``m``.

        Raises:
            FedtrakError: if the checkpoint is missing or the file is corrupt.
        """
        features, _ = self.read(m)
        d = self._ckpt_dir(m)
        try:
            w = np.load(d / "curvature.npy", mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise FedtrakError(f"corrupt local store entry {d}: {exc}") from exc
        if w.shape != (features.shape[0],):
            raise FedtrakError(f"corrupt local store entry {d}: curvature shape {w.shape}")
        return w

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

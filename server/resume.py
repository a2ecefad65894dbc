"""A server run's saved progress, so that a run whose process died can be resumed from its run folder.

As a private-mode run goes, the server keeps in ``OUT/.resume/``: the job
(``run.json``: its run id, so the clients find their feature stores again,
and the resolved settings such as a DP clip norm) and, once the Grams are
summed, the summed kernel of every checkpoint with the participants it
covers (``kernels.npz``, ``kernels.json``). A later run with the same run
config and ``resume=true`` reuses the job, the trained checkpoints and the
kernels (no featurize round), scores, and says what it reused in its summary.
The folder is removed when the run's results are committed.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fedtrak import wire
from fedtrak.data.checkpoints import atomic_write_json
from fedtrak.errors import FedtrakError
from fedtrak.privacy.distributed import DistributedNoise
from fedtrak.server.secure_aggregation import SecureSum
from fedtrak.wire.job import Job

STATE_DIR = ".resume"
#: Run-config keys that may differ between a run and its resumption.
FREE_KEYS = {"resume", "timeout", "wait-for-nodes", "rejoin-wait"}


@dataclass
class SavedKernels:
    """The summed Grams of every checkpoint, the count they rest on, the noise copies in them
    (for the lambda floor), the participants by owner, and the secure-aggregation account."""

    grams: list[np.ndarray]
    total: int
    copies: float
    participants: list[dict]
    secure: dict | None = None


class RunState:
    """The ``OUT/.resume`` folder of one run."""

    def __init__(self, out_dir: Path) -> None:
        self.dir = Path(out_dir) / STATE_DIR

    def save_job(self, job: Job, config: dict) -> None:
        """Keep the job and the run config that made it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.dir / "run.json", {"job": dict(wire.encode_job(job)), "config": config})

    def saved_job(self, config: dict) -> Job | None:
        """The saved job if there is one for this run config (``None`` if nothing was saved).

        Raises:
            FedtrakError: if the saved run had other settings (naming them) or its file is corrupt.
        """
        path = self.dir / "run.json"
        if not path.is_file():
            return None
        try:
            saved = json.loads(path.read_text())
            job = wire.decode_job(saved["job"], str(path))
        except (ValueError, KeyError, TypeError) as exc:
            raise FedtrakError(f"cannot resume: {path} is corrupt ({exc})") from exc
        differ = sorted(k for k in set(config) | set(saved["config"])
                        if k not in FREE_KEYS and config.get(k) != saved["config"].get(k))
        if differ:
            raise FedtrakError(f"cannot resume from {self.dir.parent}: the saved run had other settings for "
                               f"{differ}; use the same run config (or another out folder)")
        return job

    def save_kernels(self, kernels: SavedKernels) -> None:
        """Keep the summed kernels (written atomically: arrays first, then their description)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / "kernels.tmp.npz"
        np.savez(tmp, *kernels.grams)
        tmp.replace(self.dir / "kernels.npz")
        atomic_write_json(self.dir / "kernels.json", {"total": kernels.total, "copies": kernels.copies,
                                                      "participants": kernels.participants,
                                                      "checkpoints": len(kernels.grams),
                                                      "secure": kernels.secure})

    def saved_kernels(self) -> SavedKernels | None:
        """The saved kernels, or ``None`` if the run died before they were summed."""
        meta_path, arrays_path = self.dir / "kernels.json", self.dir / "kernels.npz"
        if not (meta_path.is_file() and arrays_path.is_file()):
            return None
        try:
            meta = json.loads(meta_path.read_text())
            with np.load(arrays_path, allow_pickle=False) as data:
                grams = [np.asarray(data[f"arr_{m}"]) for m in range(int(meta["checkpoints"]))]
        except (ValueError, KeyError, OSError) as exc:
            raise FedtrakError(f"cannot resume: saved kernels in {self.dir} are corrupt ({exc})") from exc
        return SavedKernels(grams, int(meta["total"]), float(meta["copies"]), meta["participants"],
                            meta.get("secure"))

    def clear(self) -> None:
        """Forget the saved progress (the run's results are committed)."""
        shutil.rmtree(self.dir, ignore_errors=True)


def saved_secure_sum(secure: SecureSum) -> dict:
    """What a resumed run needs of a secure sum: its account, its noise and its survivors."""
    return {"report": secure.report, "noise": asdict(secure.noise), "survivors": list(secure.survivors)}


def restored_secure_sum(saved: SavedKernels) -> SecureSum | None:
    """The secure sum of saved kernels (``None`` if they were summed in the clear)."""
    if saved.secure is None:
        return None
    return SecureSum(saved.grams, float(saved.total), saved.secure["survivors"],
                     DistributedNoise(**saved.secure["noise"]), saved.secure["report"])

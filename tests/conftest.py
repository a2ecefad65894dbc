"""Shared fixtures: the digits task and checkpoints trained once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fedtrak.checkpoints import load_checkpoints, train_checkpoints
from fedtrak.datasets import FMNIST_DIR
from fedtrak.tasks import Task, load_task


def fmnist_available() -> bool:
    """Whether Debian's Fashion-MNIST files are installed here."""
    root = Path(os.environ.get("FEDTRAK_FMNIST_DIR", FMNIST_DIR))
    return (root / "train-images-idx3-ubyte.gz").is_file()


@pytest.fixture(scope="session")
def require_fmnist() -> None:
    """Skip Fashion-MNIST tests locally when the files are missing; fail in CI."""
    if not fmnist_available():
        if os.environ.get("CI"):
            pytest.fail("Fashion-MNIST files missing in CI: .ci/run must install dataset-fashion-mnist")
        pytest.skip("dataset-fashion-mnist not installed")


@pytest.fixture(scope="session")
def digits_logreg() -> Task:
    """The default built-in task."""
    return load_task("digits-logreg")


@pytest.fixture(scope="session")
def logreg_ckpt_dir(tmp_path_factory: pytest.TempPathFactory, digits_logreg: Task) -> Path:
    """Three digits-logreg checkpoints (seeds 0, 1, 2), trained once per session."""
    out = tmp_path_factory.mktemp("ckpts") / "checkpoints"
    train_checkpoints(digits_logreg, 3, out, base_seed=0)
    return out


@pytest.fixture(scope="session")
def logreg_states(digits_logreg: Task, logreg_ckpt_dir: Path) -> list:
    """State dicts of the three session checkpoints."""
    return [state for _, state in load_checkpoints(digits_logreg, logreg_ckpt_dir)]

"""Shared fixtures: the digits task and checkpoints trained once per test session."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fedtrak.data.checkpoints import load_checkpoints, train_checkpoints
from fedtrak.data.datasets import FMNIST_DIR
from fedtrak.data.tasks import Task, load_task


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
def require_fortunes() -> None:
    """Skip the text tests locally when Debian's fortunes package is missing; fail in CI."""
    from fedtrak.data.text import FORTUNES

    if not FORTUNES.is_dir():
        if os.environ.get("CI"):
            pytest.fail("the fortunes package is missing in CI: .ci/run must install fortunes")
        pytest.skip("fortunes not installed")


@pytest.fixture(scope="session", autouse=True)
def one_ray_runtime() -> Iterator[Callable[[], None] | None]:
    """One Ray runtime for the whole session. Flower's Ray backend starts Ray only when it is not
    running (``ray.is_initialized``) and shuts it down after every simulation, which costs every
    simulation a Ray start-up. Here ``ray.shutdown`` waits for the end of the session, so each
    simulation still creates and kills its own actors, on one runtime. Yields the real shutdown."""
    try:
        import ray
    except ImportError:  # an install without Flower's simulation engine
        yield None
        return
    real = ray.shutdown
    ray.shutdown = lambda *args, **kwargs: None
    try:
        yield real
    finally:
        ray.shutdown = real
        if ray.is_initialized():
            real()


@pytest.fixture
def own_ray_lifecycle(one_ray_runtime: Callable[[], None] | None) -> Iterator[None]:
    """For a test of simulate's own clean-up: the session's Ray runtime is shut down, and
    ``ray.shutdown`` is the real one while the test runs."""
    import ray

    if one_ray_runtime is None:
        yield
        return
    if ray.is_initialized():
        one_ray_runtime()
    shared = ray.shutdown
    ray.shutdown = one_ray_runtime
    try:
        yield
    finally:
        ray.shutdown = shared


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

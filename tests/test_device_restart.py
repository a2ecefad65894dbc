"""``fedtrak device start`` on a real SuperLink (loopback, TLS, node authentication): a SuperNode that
crashed (its launcher and it killed with SIGKILL) and is started again at once is refused while the
SuperLink still holds its node, is started again until it activates (Flower 1.42 holds a node 60 s
after its last heartbeat), and says a crash is the likely cause; one whose key is not registered is
given up after ``--activation-wait`` with the register command named. Every process is stopped.
Takes about as long as the SuperLink holds a crashed node (a minute)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fedtrak.client.launcher import ACTIVATION_WAIT, HOLD_SECONDS
from fedtrak.simulations.bench.deploy import Deployment, free_port

pytestmark = [pytest.mark.flower, pytest.mark.slow, pytest.mark.deployment]


def _launch(dep: Deployment, name: str, key: Path, wait: float | None = None) -> None:
    """``fedtrak device start`` as step 4 of the deploy docs runs it, with a data file of its own."""
    data = dep.work / f"{name}.npz"
    np.savez(data, x=np.zeros((8, 64), np.float32), y=np.arange(8) % 10)
    home = dep.work / f"flwr-home-{name}"
    home.mkdir(exist_ok=True)
    dep.start(name, [str(Path(sys.executable).with_name("fedtrak")), "device", "start",
                     *(["--activation-wait", str(wait)] if wait else []), "--",
                     "--superlink", dep.address, "--root-certificates", str(dep.certs / "ca.crt"),
                     "--auth-supernode-private-key", str(key), "--port", str(free_port()),
                     "--node-config", f"data-path='{data}' owner='{name}' store-dir='{dep.work / 'store'}'"],
              {**dep.env, "FLWR_HOME": str(home)})


def _wait_for(log: Path, text: str, seconds: float) -> float:
    start = time.monotonic()
    while not (log.exists() and text in log.read_text()):
        assert time.monotonic() - start < seconds, log.read_text()[-3000:] if log.exists() else "no log"
        time.sleep(0.5)
    return time.monotonic() - start


def _wait_for_file(path: Path, seconds: float) -> None:
    start = time.monotonic()
    while not path.exists():
        assert time.monotonic() - start < seconds, f"no {path}"
        time.sleep(0.2)


def test_a_crashed_supernode_started_again_at_once_activates_once_the_superlink_lets_it_go(tmp_path):
    with Deployment(tmp_path) as dep:
        _launch(dep, "unregistered", dep.keys("unregistered", False), wait=10)
        key = dep.keys("a")
        _launch(dep, "a", key)
        _wait_for(tmp_path / "a.log", "SuperNode ID", 90)
        marker = Path(f"{key}.last-active")  # the launcher's note that it saw its SuperNode active
        _wait_for_file(marker, 30)
        dep.kill("a")  # power loss: the launcher's whole process group
        killed = time.monotonic()
        dep.restart("a")
        log = tmp_path / "a-restarted.log"
        _wait_for(log, "SuperNode ID", ACTIVATION_WAIT + 30)
        took = time.monotonic() - killed
        said = log.read_text()
        assert took < ACTIVATION_WAIT + 30, took  # back within the launcher's wait
        if "Failed to activate SuperNode" in said:  # held by the SuperLink (as measured: 49-59 s), then let go
            assert "did not stop cleanly (a crash)" in said and took > HOLD_SECONDS / 4, (took, said[-3000:])
        else:  # let go at once (seen once on a loaded CI box): the launcher had nothing to explain
            assert "did not stop cleanly" not in said and "is not registered" not in said, said[-3000:]
        _wait_for(tmp_path / "unregistered.log", "its key is not registered", 90)
    assert not dep.procs
    assert f"flwr supernode register {tmp_path / 'keys' / 'unregistered'}.pub" in \
        (tmp_path / "unregistered.log").read_text()

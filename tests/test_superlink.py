"""Integration: fedtrak on a real Flower deployment on 127.0.0.1, with TLS and node authentication.

Creates a CA and a SuperLink certificate with ``fedtrak certs`` and a key pair
per SuperNode with ``fedtrak keys``, starts ``flower-superlink`` with TLS and
``--enable-supernode-auth``, registers three SuperNodes' keys with ``flwr
supernode register`` and starts them, each with its own data file named in
its node config, plus two intruders: one whose key is not registered and one
that trusts another CA. Runs the app with ``flwr run`` with secure
aggregation on (each message runs in a fresh process there, so the clients'
protocol state must live on their disks), reads the run's status (``flwr
run`` exits 0 even when the run fails), checks the result against the
centralized path and that the intruders took no part, and stops every process
it started.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from shared.partition import partition
from shared.settings import ScoreSettings
from simulations.attribute import AttributeConfig, run_attribute
from simulations.cli import main

pytestmark = [pytest.mark.flower, pytest.mark.slow, pytest.mark.deployment]

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FEDERATION = "fedtrak-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"process exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    pytest.fail(f"nothing listens on port {port} after {timeout} s:\n{log.read_text()[-3000:]}")


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:  # each runs in its own session: stop its whole process group
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 15
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    for p in procs:  # children (SuperExec, app processes) are gone too
        for _ in range(50):
            try:
                os.killpg(p.pid, 0)
            except ProcessLookupError:
                break
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"process group {p.pid} survived")


def _run_status(env: dict, run_id: str, timeout: float = 400) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run([str(BIN / "flwr"), "ls", FEDERATION, "--format", "json"], env=env,
                             capture_output=True, text=True, timeout=60, check=False)
        runs = json.loads(out.stdout).get("runs", []) if out.stdout.strip().startswith("{") else []
        for run in runs:
            if str(run["run-id"]) == run_id and run["status"].startswith("finished"):
                return run
        time.sleep(2)
    pytest.fail(f"run {run_id} did not finish within {timeout} s")


def _fedtrak(*args: str) -> None:
    assert main(list(args)) == 0


def test_flwr_run_with_tls_and_node_authentication(tmp_path, digits_logreg, logreg_ckpt_dir):
    home = tmp_path / "flwr-home"
    home.mkdir()
    port = _free_port()
    certs, other_ca = tmp_path / "certs", tmp_path / "other-ca"
    _fedtrak("certs", "--out", str(certs), "--host", "127.0.0.1", "--host", "localhost")
    _fedtrak("certs", "--out", str(other_ca), "--host", "127.0.0.1")
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{FEDERATION}"\n\n'
        f'[superlink.{FEDERATION}]\naddress = "127.0.0.1:{port}"\nroot-certificates = "{certs / "ca.crt"}"\n'
    )
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "FLWR_HOME": str(home),
           "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    parts = partition(digits_logreg.y_train, 3, "iid", 0.5, 1)
    procs: list[subprocess.Popen] = []
    logs = []

    def start(name: str, cmd: list[str]) -> subprocess.Popen:
        log = tmp_path / f"{name}.log"
        logs.append(log)
        procs.append(subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                      start_new_session=True))
        return procs[-1]

    def supernode(name: str, c: int, ca: Path) -> None:
        data = tmp_path / f"{name}.npz"
        np.savez(data, x=digits_logreg.x_train[parts.clients[c]], y=digits_logreg.y_train[parts.clients[c]])
        node_config = f"data-path='{data}' owner='{name}' store-dir='{tmp_path / f'store-{name}'}'"
        start(name, [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{port}",
                     "--root-certificates", str(ca / "ca.crt"),
                     "--auth-supernode-private-key", str(tmp_path / "keys" / name),
                     "--port", str(_free_port()), "--node-config", node_config])

    try:
        link = start("superlink", [str(BIN / "flower-superlink"), "--port", str(port),
                                   "--ssl-ca-certfile", str(certs / "ca.crt"),
                                   "--ssl-certfile", str(certs / "server.pem"),
                                   "--ssl-keyfile", str(certs / "server.key"), "--enable-supernode-auth",
                                   "--disable-runtime-dependency-installation"])
        _wait_for_port(port, link, logs[0])
        for name in ("0", "1", "2", "unregistered", "wrong-ca"):
            _fedtrak("keys", "--out", str(tmp_path / "keys"), "--name", name)
        for name in ("0", "1", "2", "wrong-ca"):  # the wrong-CA node's key is registered: TLS alone stops it
            reg = subprocess.run([str(BIN / "flwr"), "supernode", "register", str(tmp_path / "keys" / f"{name}.pub"),
                                  FEDERATION], env=env, capture_output=True, text=True, timeout=60, check=False)
            assert reg.returncode == 0, reg.stdout + reg.stderr
        for c in range(3):
            supernode(str(c), c, certs)
        supernode("unregistered", 0, certs)
        supernode("wrong-ca", 1, other_ca)
        out = tmp_path / "run"
        run_config = (f"clients=3 checkpoint-dir='{logreg_ckpt_dir}' out='{out}' proj-dim=128 "
                      f"wait-for-nodes=120.0 secure-agg=true")
        launched = subprocess.run([str(BIN / "flwr"), "run", str(ROOT), FEDERATION, "--run-config", run_config],
                                  env=env, capture_output=True, text=True, timeout=180, check=False)
        assert launched.returncode == 0, launched.stdout + launched.stderr
        run_id = re.search(r"run (\d+)", launched.stdout + launched.stderr)
        assert run_id, launched.stdout + launched.stderr
        status = _run_status(env, run_id.group(1))
        detail = "\n".join(f"== {p.name}\n" + p.read_text()[-2000:] for p in logs)
        assert status["status"] == "finished:completed", f"{status}\n{detail}"
    finally:
        _stop(procs)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["excluded"] == []
    assert [o["owner"] for o in summary["owners"]] == ["0", "1", "2"]  # the intruders took no part
    assert len(summary["clients"]) == 3
    assert all(c["bytes_received"] > 0 for c in summary["clients"])
    secure = summary["secure_aggregation"]
    assert secure["survivors"] == 3 and secure["threshold"] == 2 and secure["dropped"] == []
    intruders = {name: (tmp_path / f"{name}.log").read_text() for name in ("unregistered", "wrong-ca")}
    assert not (tmp_path / "store-unregistered").exists() and not (tmp_path / "store-wrong-ca").exists(), intruders
    assert "Failed to activate SuperNode" in intruders["unregistered"]  # the SuperLink refused its key
    assert "CERTIFICATE_VERIFY_FAILED" in intruders["wrong-ca"]  # it could not trust the SuperLink
    central = tmp_path / "central"
    run_attribute(AttributeConfig(out=central, clients=3, partition_seed=1, checkpoint_dir=logreg_ckpt_dir,
                                  progress=False, score=ScoreSettings(proj_dim=128)))
    want = np.load(central / "owner_scores.npy")
    np.testing.assert_allclose(np.load(out / "owner_scores.npy"), want, rtol=1e-4,
                               atol=1e-4 * np.abs(want).max())

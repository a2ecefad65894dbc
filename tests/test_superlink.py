"""Integration: fedtrak on a real Flower deployment on 127.0.0.1.

Starts ``flower-superlink`` and three ``flower-supernode`` processes (insecure
loopback; TLS and node authentication are a later issue), each node with its
own data file named in its node config, runs the app with ``flwr run`` with
secure aggregation on (each message runs in a fresh process there, so the
clients' protocol state must live on their disks), reads the run's status
(``flwr run`` exits 0 even when the run fails), checks the result against the
centralized path, and stops every process it started.
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

pytestmark = [pytest.mark.flower, pytest.mark.slow]

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


def test_flwr_run_on_a_local_superlink(tmp_path, digits_logreg, logreg_ckpt_dir):
    home = tmp_path / "flwr-home"
    home.mkdir()
    port = _free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{FEDERATION}"\n\n'
        f'[superlink.{FEDERATION}]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "FLWR_HOME": str(home),
           "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    parts = partition(digits_logreg.y_train, 3, "iid", 0.5, 1)
    procs: list[subprocess.Popen] = []
    logs = []
    try:
        log = tmp_path / "superlink.log"
        logs.append(log)
        procs.append(subprocess.Popen(
            [str(BIN / "flower-superlink"), "--insecure", "--port", str(port),
             "--disable-runtime-dependency-installation"],
            cwd=tmp_path, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True))
        _wait_for_port(port, procs[0], log)
        for c, idx in enumerate(parts.clients):
            data = tmp_path / f"device{c}.npz"
            np.savez(data, x=digits_logreg.x_train[idx], y=digits_logreg.y_train[idx])
            log = tmp_path / f"supernode{c}.log"
            logs.append(log)
            node_config = f"data-path='{data}' owner='{c}' store-dir='{tmp_path / f'store{c}'}'"
            procs.append(subprocess.Popen(
                [str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}",
                 "--port", str(_free_port()), "--node-config", node_config],
                cwd=tmp_path, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                start_new_session=True))
        out = tmp_path / "run"
        run_config = (f"clients=3 checkpoint-dir='{logreg_ckpt_dir}' out='{out}' proj-dim=128 "
                      f"wait-for-nodes=120.0 secure-agg=true")
        launched = subprocess.run([str(BIN / "flwr"), "run", str(ROOT), FEDERATION, "--run-config", run_config],
                                  env=env, capture_output=True, text=True, timeout=180, check=False)
        assert launched.returncode == 0, launched.stdout + launched.stderr
        run_id = re.search(r"run (\d+)", launched.stdout + launched.stderr)
        assert run_id, launched.stdout + launched.stderr
        status = _run_status(env, run_id.group(1))
        detail = "\n".join(p.read_text()[-2000:] for p in logs)
        assert status["status"] == "finished:completed", f"{status}\n{detail}"
    finally:
        _stop(procs)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["excluded"] == []
    assert [o["owner"] for o in summary["owners"]] == ["0", "1", "2"]
    assert all(c["bytes_received"] > 0 for c in summary["clients"])
    secure = summary["secure_aggregation"]
    assert secure["survivors"] == 3 and secure["threshold"] == 2 and secure["dropped"] == []
    central = tmp_path / "central"
    run_attribute(AttributeConfig(out=central, clients=3, partition_seed=1, checkpoint_dir=logreg_ckpt_dir,
                                  progress=False, score=ScoreSettings(proj_dim=128)))
    want = np.load(central / "owner_scores.npy")
    np.testing.assert_allclose(np.load(out / "owner_scores.npy"), want, rtol=1e-4,
                               atol=1e-4 * np.abs(want).max())

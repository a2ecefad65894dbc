"""A simulation on an existing Ray cluster: a head and a second node started with ``ray start`` on
127.0.0.1, one CPU each, and ``run_simulation(..., ray_address=...)``: the virtual clients run on
both nodes and the run is the one a local simulation gives."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fedtrak.client.app import QUERIES
from fedtrak.config.settings import Settings
from fedtrak.simulations.attribute import run_attribute
from fedtrak.simulations.simulate import run_simulation

pytestmark = [pytest.mark.flower, pytest.mark.slow]
RAY = Path(sys.executable).parent / "ray"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def two_node_cluster(own_ray_lifecycle: None) -> Iterator[str]:
    """A Ray head and one more node on 127.0.0.1 (one CPU each, a resource naming each node);
    every process of theirs is stopped afterwards, by the cluster's own temp folder, even on
    failure (``ray stop`` would stop every Ray on the machine)."""
    temp = tempfile.mkdtemp(prefix="fr", dir="/tmp")  # Ray's socket paths must stay short
    port = _free_port()
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--object-store-memory=100000000",
              "--disable-usage-stats"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    groups = []  # each `ray start` leads its own process group, which its daemons inherit

    def start(*args: str) -> None:
        proc = subprocess.Popen([str(RAY), "start", *args, *common], env=env, start_new_session=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        groups.append(proc.pid)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out.decode(errors="replace")[-2000:]

    try:
        start("--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={temp}",
              "--resources={\"head_node\": 1}")
        start(f"--address=127.0.0.1:{port}", "--resources={\"second_node\": 1}")
        yield f"127.0.0.1:{port}"
    finally:
        _stop_cluster(temp, groups)
        shutil.rmtree(temp, ignore_errors=True)


def _stop_cluster(temp: str, groups: list[int]) -> None:
    """Stop the cluster's process groups, the processes whose command line names ``temp`` (head,
    raylets) and those started by those raylets (which name it in ``RAY_RAYLET_PID``)."""
    def processes() -> dict[int, tuple[str, str]]:
        found = {}
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                try:
                    found[int(proc.name)] = ((proc / "cmdline").read_bytes().decode(errors="replace"),
                                             (proc / "environ").read_bytes().decode(errors="replace"))
                except OSError:
                    continue
        return found

    def cluster() -> set[int]:
        procs = processes()
        named = {pid for pid, (cmd, _) in procs.items() if temp in cmd}
        owned = {pid for pid, (_, env) in procs.items()
                 if any(f"RAY_RAYLET_PID={raylet}\0" in env + "\0" for raylet in named)}
        return named | owned

    seen: set[int] = set()

    def alive() -> bool:
        """Whether a process of the cluster's (seen so far, or in its process groups) still runs."""
        seen.update(cluster())
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                state, _, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
            except (OSError, ValueError):
                continue
            if state != "Z" and (int(stat.parent.name) in seen or int(group) in groups):
                return True
        return False

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in cluster():  # by what names them now: a pid seen before may be another process's by now
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        for group in groups:
            try:
                os.killpg(group, sig)
            except OSError:
                pass
        deadline = time.monotonic() + 2  # at most as long as it always waited before
        while alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        if not alive():
            return


def _where_handlers(record: Path) -> dict:
    """fedtrak's handlers, the featurize step also noting which Ray node ran it."""
    honest = QUERIES["featurize"]

    def featurize(msg, ctx):
        import ray

        (record / f"{ctx.node_config['partition-id']}-{ray.get_runtime_context().get_node_id()}").touch()
        return honest(msg, ctx)

    return {**QUERIES, "featurize": featurize}


def test_clients_run_on_both_nodes_of_a_ray_cluster(tmp_path, two_node_cluster, logreg_ckpt_dir):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import tests/
    record = tmp_path / "where"
    record.mkdir()
    settings = Settings.from_flat({"clients": 4, "checkpoints": 3, "checkpoint-dir": str(logreg_ckpt_dir),
                                   "proj-dim": 256, "out": str(tmp_path / "run")})
    summary = run_simulation(settings, handlers=_where_handlers(record), ray_address=two_node_cluster)
    ran = [p.name.split("-", 1) for p in record.iterdir()]
    assert sorted(int(p) for p, _ in ran) == [0, 1, 2, 3]
    assert len({node for _, node in ran}) == 2  # both nodes ran clients
    assert not summary.clients.excluded and len(summary.owners) == 4
    run_attribute(settings.replaced(out=str(tmp_path / "central")))
    got, want = (np.load(tmp_path / d / "owner_scores.npy") for d in ("run", "central"))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())

"""Deployment across hosts, with the user's own Flower app: the SuperLink in one network namespace,
two SuperNodes in another, joined by a veth pair with addresses of their own (no loopback between
them), the SuperLink listening on every interface (``--host 0.0.0.0``, as the deploy docs say), TLS
and node authentication, and ``examples/own_flower_app`` (a wine classifier of the user's, not a
built-in task) shipped by the operator's ``flwr run --stream`` from the SuperLink's side. The owner
totals equal the centralized path's on the same checkpoints. The namespaces (and the veth pair with
them) are removed afterwards, even on failure. Needs root (``ip netns``); skipped, saying so, where
it is not allowed."""

from __future__ import annotations

import ipaddress
import json
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fedtrak.config.settings import Settings
from fedtrak.data.checkpoints import train_checkpoints
from fedtrak.data.partition import partition
from fedtrak.data.tasks import load_task, register_task
from fedtrak.simulations.attribute import run_attribute
from fedtrak.simulations.bench.deploy import Deployment, in_namespace

pytestmark = [pytest.mark.flower, pytest.mark.slow, pytest.mark.deployment]
APP = Path(__file__).resolve().parents[1] / "examples" / "own_flower_app"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def two_hosts() -> Iterator[tuple[str, str, str, str]]:
    """Two network namespaces joined by a veth pair: ``(link namespace, node namespace, link
    address, node address)``, addresses from a random 10.x.y.0/24."""
    tag = secrets.token_hex(3)
    link, node = f"fedtrak-link-{tag}", f"fedtrak-node-{tag}"
    net = ipaddress.ip_network(f"10.{secrets.randbelow(200) + 20}.{secrets.randbelow(250)}.0/24")
    link_ip, node_ip = str(net[1]), str(net[2])
    try:
        _ip("netns", "add", link)
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        pytest.skip(f"cannot make network namespaces here (needs root and iproute2): {exc}")
    try:
        _ip("netns", "add", node)
        _ip("link", "add", f"vl{tag}", "type", "veth", "peer", "name", f"vn{tag}")
        for ns, dev, addr in ((link, f"vl{tag}", link_ip), (node, f"vn{tag}", node_ip)):
            _ip("link", "set", dev, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield link, node, link_ip, node_ip
    finally:
        for ns in (link, node):  # removing a namespace removes its end of the veth pair, and so the pair
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def wine() -> str:
    """The example app's task, registered in this process by its own name."""
    sys.path.insert(0, str(APP))
    try:
        from wineapp.task import TASK, wine_task
    finally:
        sys.path.remove(str(APP))
    register_task(TASK, wine_task)
    return TASK


def test_the_users_flower_app_on_two_hosts_with_tls_and_node_authentication(tmp_path, two_hosts, wine):
    link_ns, node_ns, link_ip, node_ip = two_hosts
    task = load_task(wine)
    ckpts = tmp_path / "ckpts"
    train_checkpoints(task, 2, ckpts)
    parts = partition(task.y_train, 2, "iid", 0.5, 1)
    out = tmp_path / "run"
    with Deployment(tmp_path, host=link_ip, link_ns=link_ns, node_ns=node_ns, listen="0.0.0.0", app=APP) as dep:
        assert not ipaddress.ip_address(dep.host).is_loopback
        for c in range(2):
            dep.supernode(str(c), task.x_train[parts.clients[c]], task.y_train[parts.clients[c]], dep.keys(str(c)))
        dep.run(f"clients=2 checkpoints=2 checkpoint-dir='{ckpts}' out='{out}'")
        # the SuperNodes' side reaches the SuperLink only through the veth pair: not on its own loopback
        probe = f"import socket; print(socket.socket().connect_ex(('127.0.0.1', {dep.port})))"
        reach = subprocess.run([*in_namespace(node_ns), sys.executable, "-c", probe], capture_output=True,
                               text=True, timeout=30, check=True)
        assert reach.stdout.strip() != "0"
    assert not dep.procs
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == wine and summary["complete"] and summary["excluded"] == []
    assert [o["owner"] for o in summary["owners"]] == ["0", "1"]
    stream = (tmp_path / "flwr-run.log").read_text()  # what the operator sees: each step's owners, where results went
    assert "fedtrak INFO: featurize (2 checkpoints): owner '" in stream and "' replied (2 of 2, " in stream, stream
    assert f"results: {out} on the SuperLink host" in stream
    assert "fedtrak INFO: the results cover 2 owners: '0', '1'\n" in stream, stream
    assert f"INFO [uvicorn.access] {node_ip}:" in (tmp_path / "superlink.log").read_text()  # nodes came over the veth
    central = tmp_path / "central"
    run_attribute(Settings().replaced(task=wine, out=str(central), clients=2, partition_seed=1, checkpoints=2,
                                      checkpoint_dir=str(ckpts), proj_dim=64), progress=False)
    want = np.load(central / "owner_scores.npy")
    np.testing.assert_allclose(np.load(out / "owner_scores.npy"), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())

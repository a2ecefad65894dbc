"""Integration: fedtrak on a real Flower deployment on 127.0.0.1, with TLS and node authentication.

Creates a CA and a SuperLink certificate with ``fedtrak certs`` and a key pair
per SuperNode with ``fedtrak keys``, starts ``flower-superlink`` with TLS and
``--enable-supernode-auth``, registers three SuperNodes' keys with ``flwr
supernode register`` and starts them, each with its own data file named in
its node config, a fourth registered one that refuses the job (its own floor,
``max-proj-dim``, is below the run's k), plus two intruders: one whose key is
not registered (started through ``fedtrak device start``, which names the likely cause when it
gives up) and one that trusts another CA. Runs the app with ``flwr run`` with secure
aggregation on (each message runs in a fresh process there, so the clients'
protocol state must live on their disks), reads the run's status (``flwr
run`` exits 0 even when the run fails), checks the result against the
centralized path and that the intruders took no part, checks what the
operator's stream (``flwr run --stream``) showed: each step of secure
aggregation with its clients as they replied, the refusing device excluded by
its owner's name, which owners the results cover, and no line twice; and stops
every process it started (:class:`fedtrak.simulations.bench.deploy.Deployment`).
"""

from __future__ import annotations

import json
import re
import threading
import time

import numpy as np
import pytest

from fedtrak.client.launcher import ACTIVATION_WAIT
from fedtrak.config.settings import Settings
from fedtrak.data.checkpoints import load_checkpoints, train_checkpoints
from fedtrak.data.partition import partition
from fedtrak.data.tasks import load_task
from fedtrak.simulations.attribute import central_scores, run_attribute
from fedtrak.simulations.bench.deploy import Deployment
from fedtrak.simulations.cli import main

pytestmark = [pytest.mark.flower, pytest.mark.slow, pytest.mark.deployment]


def test_flwr_run_with_tls_and_node_authentication(tmp_path, digits_logreg, logreg_ckpt_dir):
    parts = partition(digits_logreg.y_train, 3, "iid", 0.5, 1)
    x, y = digits_logreg.x_train, digits_logreg.y_train
    other_ca = tmp_path / "other-ca"
    assert main(["certs", "--out", str(other_ca), "--host", "127.0.0.1"]) == 0
    out = tmp_path / "run"
    with Deployment(tmp_path) as dep:
        for c in range(3):
            dep.supernode(str(c), x[parts.clients[c]], y[parts.clients[c]], dep.keys(str(c)))
        dep.supernode("refuser", x[parts.clients[0]], y[parts.clients[0]], dep.keys("refuser"), node_config="max-proj-dim=64")
        dep.supernode("unregistered", x[parts.clients[0]], y[parts.clients[0]], dep.keys("unregistered", False),
                      launcher_wait=10)  # through fedtrak device start, which gives up after 10 s
        # the wrong-CA node's key is registered: TLS alone keeps it out
        dep.supernode("wrong-ca", x[parts.clients[1]], y[parts.clients[1]], dep.keys("wrong-ca"), other_ca / "ca.crt")
        dep.run(f"clients=4 checkpoint-dir='{logreg_ckpt_dir}' out='{out}' proj-dim=128 wait-for-nodes=120.0 "
                "secure-agg=true")
    assert not dep.procs  # every process it started is stopped

    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and [e["owner"] for e in summary["excluded"]] == ["refuser"]
    assert "above this node's max-proj-dim 64" in summary["excluded"][0]["reason"]
    assert [o["owner"] for o in summary["owners"]] == ["0", "1", "2"]  # the intruders took no part
    assert len(summary["clients"]) == 4
    assert all(c["bytes_received"] > 0 for c in summary["clients"] if c["owner"] != "refuser")
    stream = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in (tmp_path / "flwr-run.log").read_text().splitlines()]
    assert "fedtrak INFO: secure aggregation 1/4 (featurize, keys): asked 4 clients" in stream, stream
    for step in ("1/4 (featurize, keys)", "2/4 (key shares)", "3/4 (masked Grams)", "4/4 (unmasking)"):
        assert any(f"secure aggregation {step}: owner '" in line and "' replied (" in line for line in stream), step
    excluded = summary["excluded"][0]["node_id"]
    assert any(f"excluding owner 'refuser' (node {excluded}): " in line for line in stream), stream
    assert "fedtrak WARNING: 1 client(s) excluded: results cover only the 3 listed owners" in stream
    assert ("fedtrak INFO: the results cover 3 owners: '0', '1', '2'; excluded: owner 'refuser' "
            f"(node {excluded})") in stream, stream
    said = [line.split(":", 1)[1].strip() for line in stream if re.match(r"(fedtrak )?(INFO|WARNING|ERROR)", line)]
    said = [line for line in said if line]
    assert len(said) == len(set(said)), [line for line in said if said.count(line) > 1]  # each line once
    assert not any(re.match(r"\d\d/\d\d/\d{4} ", line) for line in stream), stream  # no second copy of Flower's
    secure = summary["secure_aggregation"]
    assert secure["survivors"] == 3 and secure["threshold"] == 2 and secure["dropped"] == []
    intruders = {name: (tmp_path / f"{name}.log").read_text() for name in ("unregistered", "wrong-ca")}
    assert not (tmp_path / "store-unregistered").exists() and not (tmp_path / "store-wrong-ca").exists(), intruders
    assert "Failed to activate SuperNode" in intruders["unregistered"]  # the SuperLink refused its key
    # and its launcher, after retrying for 10 s, names the likely cause and the operator's command
    assert "its key is not registered (the operator runs: flwr supernode register " \
           f"{tmp_path / 'keys' / 'unregistered'}.pub" in intruders["unregistered"], intruders["unregistered"]
    assert "CERTIFICATE_VERIFY_FAILED" in intruders["wrong-ca"]  # it could not trust the SuperLink
    central = tmp_path / "central"
    run_attribute(Settings().replaced(out=str(central), clients=3, partition_seed=1,
                                      checkpoint_dir=str(logreg_ckpt_dir), proj_dim=128), progress=False)
    want = np.load(central / "owner_scores.npy")
    np.testing.assert_allclose(np.load(out / "owner_scores.npy"), want, rtol=1e-4,
                               atol=1e-4 * np.abs(want).max())


def test_a_supernode_killed_mid_featurize_comes_back_and_a_lost_one_is_reported(tmp_path):
    """Three SuperNodes on digits-mlp (k = 2048, dense: featurizing takes seconds). When node 1
    has stored its first checkpoint, nodes 1 and 2 lose power. Node 1 is started again at once
    through ``fedtrak device start``, which retries until the SuperLink lets the crashed node go
    (saying a crash is the likely cause): the server resends the step, node 1 reuses its finished
    work (its log says so) and the run finishes; node 2 never comes back and is reported by id, the results
    covering the other two owners, equal to the centralized scores on their data.

    The run waits ``rejoin-wait`` seconds for node 2 after the SuperLink reports both gone (Flower's
    heartbeats take 40-60 s to do that), so the test's cost grows with it: 25 s leaves node 1, which
    its launcher starts again every 5 s, room to come back."""
    task = load_task("digits-mlp")
    ckpts = tmp_path / "ckpts"
    train_checkpoints(task, 2, ckpts)
    parts = partition(task.y_train, 3, "iid", 0.5, 1)
    out = tmp_path / "run"
    with Deployment(tmp_path) as dep:
        for c in range(3):  # started as the deploy docs start them: through fedtrak device start
            dep.supernode(str(c), task.x_train[parts.clients[c]], task.y_train[parts.clients[c]], dep.keys(str(c)),
                          launcher_wait=ACTIVATION_WAIT)
        run = threading.Thread(target=lambda: dep.run(
            f"task='digits-mlp' clients=3 checkpoints=2 checkpoint-dir='{ckpts}' out='{out}' proj-dim=2048 "
            "wait-for-nodes=120.0 timeout=300.0 rejoin-wait=25.0"), daemon=True)
        run.start()
        deadline = time.monotonic() + 180
        while not list(tmp_path.glob("store-1/*/*/ckpt_000")):  # STORE/owner-1/RUN/ckpt_000
            assert time.monotonic() < deadline, dep.log_tails()
            time.sleep(0.2)
        dep.kill("1")  # the launcher and its SuperNode
        dep.kill("2")
        # Started again at once: the SuperLink holds the crashed node online for up to a minute, and
        # the launcher starts the SuperNode again until it lets it go. Flower never delivers the lost
        # message to the node again; the server notices the node's new activation and resends it.
        dep.restart("1")
        run.join(timeout=400)
        assert not run.is_alive(), dep.log_tails()
    assert (out / "summary.json").is_file(), dep.log_tails()
    summary = json.loads((out / "summary.json").read_text())
    restarted = (tmp_path / "1-restarted.log").read_text()
    assert "checkpoint 0: reusing the stored features" in restarted
    if "Failed to activate SuperNode" in restarted:  # held by the SuperLink: the launcher says why, and retries
        assert "did not stop cleanly (a crash)" in restarted, restarted[-3000:]
    assert [o["owner"] for o in summary["owners"]] == ["0", "1"]
    lost = [e for e in summary["excluded"] if e["node_id"] == dep.node_ids["2"]]
    assert lost and "query.featurize failed" in lost[0]["reason"] and "warning" in summary
    assert next(c for c in summary["clients"] if c["owner"] == "1")["rejoined"] == 1
    idx = np.concatenate([parts.clients[0], parts.clients[1]])
    states = [s for _, s in load_checkpoints(task, ckpts, 2)]
    ref, _, _ = central_scores(task, states, task.x_train[idx], task.y_train[idx], Settings().replaced(proj_dim=2048))
    n0 = len(parts.clients[0])
    want = np.stack([ref[:, :n0].sum(axis=1), ref[:, n0:].sum(axis=1)], axis=1)
    np.testing.assert_allclose(np.load(out / "owner_scores.npy"), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


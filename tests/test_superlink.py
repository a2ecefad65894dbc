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
it started (:class:`simulations.deployment.LoopbackDeployment`).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from shared.partition import partition
from shared.settings import ScoreSettings
from simulations.attribute import AttributeConfig, run_attribute
from simulations.cli import main
from simulations.deployment import LoopbackDeployment

pytestmark = [pytest.mark.flower, pytest.mark.slow, pytest.mark.deployment]


def test_flwr_run_with_tls_and_node_authentication(tmp_path, digits_logreg, logreg_ckpt_dir):
    parts = partition(digits_logreg.y_train, 3, "iid", 0.5, 1)
    x, y = digits_logreg.x_train, digits_logreg.y_train
    other_ca = tmp_path / "other-ca"
    assert main(["certs", "--out", str(other_ca), "--host", "127.0.0.1"]) == 0
    out = tmp_path / "run"
    with LoopbackDeployment(tmp_path) as dep:
        for c in range(3):
            dep.supernode(str(c), x[parts.clients[c]], y[parts.clients[c]], dep.keys(str(c)))
        dep.supernode("unregistered", x[parts.clients[0]], y[parts.clients[0]], dep.keys("unregistered", False))
        # the wrong-CA node's key is registered: TLS alone keeps it out
        dep.supernode("wrong-ca", x[parts.clients[1]], y[parts.clients[1]], dep.keys("wrong-ca"), other_ca / "ca.crt")
        dep.run(f"clients=3 checkpoint-dir='{logreg_ckpt_dir}' out='{out}' proj-dim=128 wait-for-nodes=120.0 "
                "secure-agg=true")
    assert not dep.procs  # every process it started is stopped

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

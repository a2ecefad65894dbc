"""A run the server ends on purpose: how few advertised keys are too few for secure aggregation,
how many clients leave room for one to drop out, and the record a failed run leaves in its folder."""

from __future__ import annotations

import json

import numpy as np
import pytest

import fedtrak
from fedtrak.errors import FedtrakError, RunFailed
from fedtrak.results.folder import SUMMARY, ResultWriter
from fedtrak.results.summary import RunSummary
from fedtrak.secagg.graph import threshold
from fedtrak.server.secure_aggregation import (
    MIN_CLIENTS,
    advertisement_shortfall,
    clients_for_dropouts,
)
from fedtrak.simulations.run_folder import RunFolder


def test_a_secure_sum_needs_three_keys_and_the_planned_threshold():
    assert advertisement_shortfall(2, 2) == "fewer than the 3 a secure sum needs"
    assert advertisement_shortfall(0, 2) == "fewer than the 3 a secure sum needs"
    assert advertisement_shortfall(3, 2) is None and advertisement_shortfall(3, 3) is None
    # 4 clients planned at secagg-threshold 1.0 (threshold 4): 3 keys would sum at a threshold of 3
    assert advertisement_shortfall(3, threshold(4, 1.0)) == "fewer than the run's share threshold 4"
    assert advertisement_shortfall(9, threshold(10, 0.6)) is None


@pytest.mark.parametrize(("fraction", "clients"), [(0.51, 4), (0.6, 4), (0.75, 4), (0.9, 10), (1.0, 21)])
def test_the_clients_that_leave_room_for_one_dropout(fraction, clients):
    assert clients_for_dropouts(fraction) == clients
    assert advertisement_shortfall(clients - 1, threshold(clients, fraction)) is None
    if clients > MIN_CLIENTS + 1:  # one client fewer has no room
        assert advertisement_shortfall(clients - 2, threshold(clients - 1, fraction)) is not None


def test_a_failed_run_leaves_a_record_that_readers_refuse_by_its_reason(tmp_path):
    old = ResultWriter(tmp_path)
    old.add_array("owner_scores", np.zeros((2, 3)))
    old.commit(RunSummary({"task": "digits-logreg"}))
    assert RunFolder.open(tmp_path).summary.complete is True
    failed = RunFailed("secure aggregation: 2 of 3 clients advertised keys", {"step": "secure aggregation"})
    assert isinstance(failed, FedtrakError) and fedtrak.RunFailed is RunFailed
    assert failed.failure == {"reason": "secure aggregation: 2 of 3 clients advertised keys",
                              "step": "secure aggregation"}
    writer = ResultWriter(tmp_path)
    writer.add_array("owner_scores", np.ones((2, 3)))  # staged, never committed
    path = writer.fail(RunSummary({"failure": failed.failure, "task": "digits-logreg"}))
    assert path == tmp_path / SUMMARY and not list(tmp_path.glob(".staging-*"))
    record = json.loads(path.read_text())
    assert record["complete"] is False and record["failure"]["step"] == "secure aggregation"
    assert np.load(tmp_path / "owner_scores.npy").sum() == 0  # nothing of the failed run landed
    with pytest.raises(FedtrakError, match="records a run that ended without results: secure aggregation: 2 of 3"):
        RunFolder.open(tmp_path)
    with pytest.raises(FedtrakError, match="records a run that ended without results"):
        fedtrak.Result.load(tmp_path)

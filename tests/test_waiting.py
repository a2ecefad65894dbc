"""The ServerApp waiting for SuperNodes: how many it still waits for, an exact count against
``all-connected`` (a minimum), and the error that says what to do; and what its log says while it
waits for replies: each step's clients by owner, never a flood, a refusing device by its owner."""

from __future__ import annotations

import logging

import pytest

from fedtrak import wire
from fedtrak.errors import FedtrakError
from fedtrak.server import grid
from fedtrak.server.grid import wait_for_nodes
from fedtrak.server.step_log import EVERY_REPLY_UP_TO, StepLog, who


class Arrivals:
    """What a Flower Grid tells the server about its nodes: ``get_node_ids``, one more node
    connecting at each look until ``last`` are there."""

    def __init__(self, first: int, last: int) -> None:
        self.connected, self.last = first, last

    def get_node_ids(self) -> list[int]:
        ids = list(range(100, 100 + self.connected))
        self.connected = min(self.last, self.connected + 1)
        return ids


def test_it_says_how_many_it_waits_for_and_uses_exactly_clients_of_them(monkeypatch, caplog):
    monkeypatch.setattr(grid, "WAIT_LOG_EVERY", 0.0)
    with caplog.at_level(logging.INFO, logger="fedtrak.server"):
        nodes = wait_for_nodes(Arrivals(1, 5), 3, timeout=30, poll=0.01)
    assert nodes == [100, 101, 102]
    assert "waiting for 2 more of 3 SuperNodes (1 connected" in caplog.text


def test_more_nodes_than_clients_use_clients_of_them_unless_all_connected(caplog):
    with caplog.at_level(logging.WARNING, logger="fedtrak.server"):
        assert wait_for_nodes(Arrivals(5, 5), 3, timeout=30, poll=0.01) == [100, 101, 102]
    assert "5 SuperNodes are connected, the run config's clients=3: using 3 of them" in caplog.text
    assert wait_for_nodes(Arrivals(5, 5), 3, timeout=30, poll=0.01, at_least=True) == [100, 101, 102, 103, 104]


def test_too_few_nodes_fail_with_what_to_do():
    with pytest.raises(FedtrakError, match=r"only 2 of 3 clients \(SuperNodes\) connected within 0.05 s: start more "
                                           r"SuperNodes, or lower the run config's clients"):
        wait_for_nodes(Arrivals(2, 2), 3, timeout=0.05, poll=0.01)


class NoNodes:
    """A Flower Grid to which no SuperNode ever connects."""

    def get_node_ids(self) -> list[int]:
        return []


def test_a_deployed_server_preflights_once_and_a_given_plan_is_not_preflighted_again(tmp_path):
    """``flwr run``'s ServerApp resolves its run config itself, exactly once; a simulation hands
    its plan over (its simulated run's count is in test_federated)."""
    from crafted import counted_preflights

    from fedtrak.config.settings import Settings
    from fedtrak.server.preflight import preflight
    from fedtrak.server.run import run_federated

    settings = Settings().replaced(out=str(tmp_path / "run"), wait_for_nodes=0.01, clients=2)
    with counted_preflights() as calls, pytest.raises(FedtrakError, match="only 0 of 2 clients"):
        run_federated(NoNodes(), settings, "flower")
    assert calls == [settings]
    plan = preflight(settings)
    with counted_preflights() as calls:
        with pytest.raises(FedtrakError, match="only 0 of 2 clients"):
            run_federated(NoNodes(), settings, "simulation", plan=plan)
        with pytest.raises(FedtrakError, match="resolved from other settings"):
            run_federated(NoNodes(), settings.replaced(clients=3), "simulation", plan=plan)
    assert calls == []


def test_a_step_logs_each_reply_by_owner_and_a_large_one_every_tenth(caplog):
    with caplog.at_level(logging.INFO, logger="fedtrak.server"):
        small = StepLog("secure aggregation 2/4 (key shares)", 3)
        for owner, node in (("clinic-a", 1), ("", 2)):
            small.replied(who(owner, node))
        small.close(timeout=5)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "secure aggregation 2/4 (key shares): asked 3 clients"
    assert lines[1].startswith("secure aggregation 2/4 (key shares): owner 'clinic-a' replied (1 of 3, ")
    assert lines[2].startswith("secure aggregation 2/4 (key shares): node 2 replied (2 of 3, ")
    assert lines[3] == ("secure aggregation 2/4 (key shares): 2 of 3 clients replied; no reply from the others "
                        "within 5 s")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fedtrak.server"):
        large = StepLog("score", 1000)
        for node in range(1000):
            large.replied(who(str(node), node), failed=node == 7)
        large.close(timeout=5)
    assert 1000 > 10 * EVERY_REPLY_UP_TO and len(caplog.records) == 1 + 10 + 1  # start, tenths, the failure
    assert "owner '7' failed (8 of 1000" in caplog.text and "(1000 of 1000, " in caplog.text


def test_an_error_reply_names_its_owner_and_the_reason_reads_without_it():
    reason = wire.error_reason('clinic "b"', "featurize: the run projects to k = 128, above max-proj-dim 64")
    assert wire.error_owner(reason) == ('clinic "b"', "featurize: the run projects to k = 128, above max-proj-dim 64")
    assert wire.error_owner("featurize: the device failed") == ("", "featurize: the device failed")

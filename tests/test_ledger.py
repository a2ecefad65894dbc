"""The device's privacy ledger (odometer): each release is charged once, as it leaves, across
restarts, and a job the owner's budget cannot pay for is refused before anything is released.

The ClientApp's real featurize handler is called with real Flower messages and contexts, as a
SuperNode calls it; a "restart" is a fresh context and fresh objects over the same disk.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict
from flwr.common import Metadata

from fedtrak import wire
from fedtrak.client.app import featurize, score, train
from fedtrak.client.ledger import LEDGER_FILE, Budget, PrivacyLedger, describe_ledger
from fedtrak.config.settings import Settings
from fedtrak.errors import FedtrakError
from fedtrak.privacy.mechanisms import noise_rng, noised_count
from fedtrak.server.preflight import preflight
from fedtrak.simulations.cli import main
from fedtrak.wire.job import Job


def _job(run_id: str, epsilon: float | None, ckpt_dir, **more) -> Job:
    settings = Settings().replaced(clients=3, checkpoints=1, proj_dim=64, epsilon=epsilon,
                                   checkpoint_dir=str(ckpt_dir) if ckpt_dir else None, **more)
    plan = preflight(settings)
    return Job(run_id, settings, plan.resolved).fingerprinted(plan.task)


def _message(job: Job, states) -> Message:
    meta = Metadata(run_id=1, message_id="m", src_node_id=1, dst_node_id=7, reply_to_message_id="",
                    group_id="", created_at=0.0, ttl=3600.0, message_type="query.featurize")
    return Message(metadata=meta, content=wire.encode_featurize_request(job, states))


def _score_message(job: Job, queries: int = 0) -> Message:
    """The score step as the server sends it (under DP: owner summaries, no query rows)."""
    meta = Metadata(run_id=1, message_id="s", src_node_id=1, dst_node_id=7, reply_to_message_id="",
                    group_id="", created_at=0.0, ttl=3600.0, message_type="query.score")
    us = {m: np.random.default_rng(m).normal(size=(queries, 64)) for m in range(job.settings.training.checkpoints)}
    return Message(metadata=meta, content=wire.encode_score_request(
        wire.ScoreRequest(job, job.settings.release.policy, 0, us)))


def _device(store, budget: float | None = 2.0) -> Context:
    """A freshly started device: a new context over the same store folder."""
    config = {"store-dir": str(store), "partition-id": 0, "num-partitions": 3}
    if budget is not None:
        config["privacy-budget"] = budget
    return Context(run_id=1, node_id=7, node_config=config, state=RecordDict(), run_config={})


def test_a_budget_of_two_pays_for_two_runs_at_one_and_refuses_the_third(tmp_path, logreg_ckpt_dir, logreg_states):
    store, states = tmp_path / "store", logreg_states[:1]
    first, second, third = (_job(f"run-{i}", 1.0, logreg_ckpt_dir) for i in range(3))
    ledger = PrivacyLedger(store / "partition-0" / LEDGER_FILE)

    reply = featurize(_message(first, states), _device(store))
    assert not reply.has_error()
    (bound,) = ledger.charges()  # bound at first contact, charged only the count that left
    assert bound.planned_epsilon == pytest.approx(1.0, abs=1e-6) and 0 < bound.epsilon < 0.9
    assert [r["item"] for r in bound.releases] == ["count"]
    again = featurize(_message(first, states), _device(store))  # the step sent again, after a restart
    assert not again.has_error() and ledger.charges() == [bound]  # nothing new left: nothing new charged
    assert wire.decode_info(again.content, "c").num_examples == wire.decode_info(reply.content, "c").num_examples
    assert not score(_score_message(first), _device(store)).has_error()
    assert ledger.charges()[0].epsilon == pytest.approx(1.0, abs=1e-6)  # the whole run, once it all left

    assert not featurize(_message(second, states), _device(store)).has_error()  # a restarted device
    assert not score(_score_message(second), _device(store)).has_error()
    spent, delta = ledger.spent()
    assert spent == pytest.approx(2.0, abs=1e-6) and delta == pytest.approx(2e-5)

    refused = featurize(_message(third, states), _device(store))
    assert refused.has_error()
    reason = refused.error.reason
    assert "privacy budget: run run-2 would cost epsilon 1" in reason and "spent epsilon 2" in reason
    assert "leaving epsilon 0" in reason and "refused" in reason
    assert [c.run_id for c in ledger.charges()] == ["run-0", "run-1"]  # the refused run cost nothing
    assert not (store / "partition-0" / "run-2" / "released").exists()  # and released nothing

    shown = describe_ledger(ledger, Budget(2.0))
    assert [r["run_id"] for r in shown["runs"]] == ["run-0", "run-1"] and shown["left_epsilon"] < 1e-6
    assert shown["runs"][0]["releases"] == ["count", "summary-0"]  # public kernel: no Gram


def test_a_run_without_noise_is_refused_under_any_budget_and_recorded_without_one(tmp_path, logreg_ckpt_dir,
                                                                                   logreg_states):
    store, job = tmp_path / "store", _job("exact", None, logreg_ckpt_dir)
    refused = featurize(_message(job, logreg_states[:1]), _device(store, budget=100.0))
    assert refused.has_error() and "unbounded epsilon (it adds no noise)" in refused.error.reason
    assert not featurize(_message(job, logreg_states[:1]), _device(store, budget=None)).has_error()
    (charge,) = PrivacyLedger(store / "partition-0" / LEDGER_FILE).charges()
    assert charge.epsilon is None and math.isinf(charge.eps) and charge.delta == 0


def test_the_ledger_refuses_to_guess_and_device_check_shows_it(tmp_path, logreg_ckpt_dir, capsys):
    from fedtrak.privacy.accountant import Release, sigma_for_epsilon

    path = tmp_path / LEDGER_FILE
    ledger = PrivacyLedger(path)
    gram = Release("Gram", sigma_for_epsilon(4.0, 1, 1e-5), 1, kind="gram")
    ledger.bind("a", "digest-a", [gram], 1e-5, "private", Budget(5.0))
    assert ledger.charge("a", {"gram-0": gram}, Budget(5.0)).epsilon == pytest.approx(4.0, abs=1e-6)
    with pytest.raises(FedtrakError, match="would cost epsilon 4"):
        ledger.bind("b", "digest-b", [gram], 1e-5, "private", Budget(5.0))
    with pytest.raises(FedtrakError, match="run a was bound at first contact to another job"):
        ledger.bind("a", "digest-changed", [gram], 1e-5, "private", Budget(5.0))
    with pytest.raises(FedtrakError, match="privacy budget must have epsilon > 0"):
        Budget(0.0)
    data = tmp_path / "device.npz"
    np.savez(data, x=np.random.default_rng(0).random((20, 64)).astype(np.float32), y=np.arange(20) % 10)
    report = tmp_path / "report.json"
    assert main(["device", "check", "--task", "digits-logreg", "--data", str(data), "--ledger", str(tmp_path),
                 "--privacy-budget", "5", "--json", str(report)]) == 0
    assert "privacy ledger" in capsys.readouterr().out
    shown = json.loads(report.read_text())["ledger"]
    assert [r["run_id"] for r in shown["runs"]] == ["a"] and shown["left_epsilon"] == pytest.approx(1.0, abs=1e-6)
    path.write_text("{not json")
    with pytest.raises(FedtrakError, match="unreadable"):
        ledger.charges()


def _train_message(job: Job, state) -> Message:
    meta = Metadata(run_id=1, message_id="t", src_node_id=1, dst_node_id=7, reply_to_message_id="",
                    group_id="", created_at=0.0, ttl=3600.0, message_type="train")
    keys = wire.attribution
    config = wire.train_config(job, 0)
    config[keys.SERVER_ROUND] = 1
    return Message(metadata=meta, content=RecordDict({keys.ARRAYS: wire.state_to_record(state),
                                                      keys.CONFIG: config}))


def test_under_dp_no_timing_leaves_the_device_and_fedavg_weights_by_the_noised_count(tmp_path, logreg_ckpt_dir,
                                                                                     logreg_states):
    """Seconds and peak memory grow with a client's data: under DP no reply carries them. FedAvg's
    weight is then the run's noised count (charged to the ledger), with DP-SGD alone 1, and the
    exact count only without any DP."""
    store, states = tmp_path / "store", logreg_states[:1]
    # jobs that train their checkpoints (train messages are refused by a job that does not)
    private, exact = _job("private", 1.0, None, rounds=1), _job("exact", None, None, rounds=1)
    plain = featurize(_message(exact, states), _device(store, None))
    assert wire.read_handler_timing(plain.content)[1] is not None  # without DP the server sees timing
    noised = featurize(_message(private, states), _device(store, None))
    assert not noised.has_error() and wire.read_handler_timing(noised.content) == (0.0, None)
    assert wire.read_timing(noised.content) == {}

    def weight(job: Job) -> int:
        reply = train(_train_message(job, states[0]), _device(store, None))
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        return int(reply.content.metric_records[wire.attribution.METRICS][wire.attribution.NUM_EXAMPLES])

    n = 1500 // 3
    released = wire.decode_info(noised.content, "c").num_examples
    # the count is noised (one draw may still land on n: it did once in CI, so look at 20 draws)
    assert len({noised_count(n, private.dp(), noise_rng()) for _ in range(20)}) > 1
    assert weight(private) == released  # the same release, not a fresh draw
    assert weight(exact) == n
    dp_sgd = Job("dp-sgd", exact.settings.replaced(dp_train_noise=1.0), exact.resolved,
                 exact.task_fingerprint)
    assert weight(dp_sgd) == 1


def test_a_device_holds_runs_to_its_own_floors_before_it_loads_anything(tmp_path, logreg_ckpt_dir, logreg_states):
    """Node-config floors on sigma, secure aggregation's threshold, k and C refuse a job before
    anything is loaded or released; a task import path runs only if the node config names it."""
    from fedtrak.client.node import Local
    from fedtrak.client.policy import NodePolicy

    store, states = tmp_path / "store", logreg_states[:1]
    private = _job("floors", 1.0, logreg_ckpt_dir)

    def refused(job: Job, **floors) -> str:
        ctx = _device(store, None)
        ctx.node_config.update(floors)
        reply = featurize(_message(job, states), ctx)
        assert reply.has_error()
        return reply.error.reason

    assert "below this node's min-noise-multiplier 100" in refused(private, **{"min-noise-multiplier": 100.0})
    assert "adds no noise, below this node's min-noise-multiplier" in refused(
        _job("exact", None, logreg_ckpt_dir), **{"min-noise-multiplier": 0.5})
    assert "k = 64, above this node's max-proj-dim 32" in refused(private, **{"max-proj-dim": 32})
    assert "does not use secure aggregation, below this node's min-secagg-threshold 3" in refused(
        private, **{"min-secagg-threshold": 3})
    assert "node config: max-clip-norm must be a number, got 'lots'" in refused(private, **{"max-clip-norm": "lots"})
    assert not (store / "partition-0").exists()  # nothing was loaded, charged or released
    ctx = _device(store, None)
    ctx.node_config.update({"min-noise-multiplier": 0.1, "max-proj-dim": 64})
    assert not featurize(_message(private, states), ctx).has_error()  # within the floors
    with pytest.raises(FedtrakError, match="share threshold of 2, below this node's min-secagg-threshold 4"):
        NodePolicy(min_threshold=4).check_threshold(2)

    foreign = Job("foreign", private.settings.replaced(task="os:getcwd"), private.resolved, private.task_fingerprint)
    with pytest.raises(FedtrakError, match="imports a task's code only when its node config names it"):
        Local.open(foreign, _device(store, None))


def test_out_to_loss_weights_above_one_are_clamped_under_dp(tmp_path, logreg_ckpt_dir, logreg_states):
    """A task whose output function gives q > 1 would break the summaries' sensitivity: under DP
    the client scores with q clamped to [0, 1] (the full scores show it exactly)."""
    from fedtrak.client.app import score

    store, states = tmp_path / "store", logreg_states[:1]
    job = _job("clamped", 1.0, logreg_ckpt_dir, policy="full", allow_full=True)
    ctx = _device(store, None)
    ctx.node_config["serve-full"] = True
    assert not featurize(_message(job, states), ctx).has_error()
    ckpt = store / "partition-0" / "clamped" / "ckpt_000" / "out_to_loss.npy"
    queries = {0: np.random.default_rng(0).normal(size=(3, 64))}
    content = wire.encode_score_request(wire.ScoreRequest(job, "full", 0, queries))
    meta = Metadata(run_id=1, message_id="s", src_node_id=1, dst_node_id=7, reply_to_message_id="",
                    group_id="", created_at=0.0, ttl=3600.0, message_type="query.score")

    def scores(q: float) -> np.ndarray:
        weights = np.load(ckpt)
        np.save(ckpt, np.full_like(weights, q))
        reply = score(Message(metadata=meta, content=content), ctx)
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        return wire.decode_score_reply(reply.content, "c").scores

    np.testing.assert_array_equal(scores(1.5), scores(1.0))
    assert not np.array_equal(scores(0.5), scores(1.0))


def test_a_client_contributes_one_noised_input_to_a_runs_secure_sum(tmp_path, logreg_ckpt_dir, logreg_states):
    """Secure aggregation under DP, 3 real clients: a resent input request gets the same masked vector;
    a second attempt at the run's sum (new keys, as after a server restart) is refused, since its
    fresh noise would make a second noised sum the ledger does not count."""
    from fedtrak.client import secure_aggregation as secagg
    from fedtrak.client.featurize import featurize_into_store
    from fedtrak.client.node import Local

    store = tmp_path / "store"
    settings = Settings().replaced(clients=3, checkpoints=1, proj_dim=64, epsilon=1.0, kernel_source="private",
                                   secure_agg=True, checkpoint_dir=str(logreg_ckpt_dir))
    plan = preflight(settings)
    job = Job("secure", settings, plan.resolved).fingerprinted(plan.task)
    assert job.resolved.threshold == 2  # 3 clients

    def open_client(p: int) -> Local:
        config = {"store-dir": str(store), "partition-id": p, "num-partitions": 3}
        local = Local.open(job, Context(run_id=1, node_id=100 + p, node_config=config, state=RecordDict(),
                                        run_config={}))
        featurize_into_store(local.task, local.data, job, {0: logreg_states[0]}, local.store)
        return local

    def attempt() -> tuple[dict[int, Local], dict[int, list]]:
        clients = {100 + p: open_client(p) for p in range(3)}
        adverts = [secagg.advertise(local, job.run_id) for local in clients.values()]
        sealed = [s for local in clients.values() for s in secagg.share(local, adverts, 2)]
        return clients, {u: [s for s in sealed if s.recipient == u] for u in clients}

    clients, inbox = attempt()
    first = {u: secagg.masked_input(local, inbox[u], [0], 20) for u, local in clients.items()}
    assert all(rejected == [] for _, _, rejected in first.values())
    again, _, _ = secagg.masked_input(clients[100], inbox[100], [0], 20)  # the same request, resent
    np.testing.assert_array_equal(again, first[100][0])
    clients, inbox = attempt()  # the server starts the sum over: fresh keys, fresh shares
    with pytest.raises(FedtrakError, match="already contributed a noised input to run secure's secure sum"):
        secagg.masked_input(clients[100], inbox[100], [0], 20)
    assert len(PrivacyLedger(store / "partition-0" / LEDGER_FILE).charges()) == 1  # one run, charged once
    # a server that puts its own identity key in the place of client 101's is refused by client 100
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from fedtrak.secagg.protocol import Client, raw_public, secagg_context
    fake = Ed25519PrivateKey.generate()
    adverts = [secagg.advertise(local, job.run_id) for local in clients.values()]
    adverts[1] = (Client(101, fake, secagg_context(job.run_id)).advertise(), raw_public(fake.public_key()))
    with pytest.raises(FedtrakError, match=r"identity key of client\(s\) 101 differs"):
        secagg.share(clients[100], adverts, 2)


def test_a_peers_identity_key_is_pinned_on_first_use_and_a_substituted_one_refused(tmp_path):
    """The server relays identity keys; a device pins each peer's key by node id and refuses to seal
    shares to a peer whose key changed, as when the server substitutes its own."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from fedtrak.client.secure_aggregation import PINS_FILE, pin_identities
    from fedtrak.secagg.protocol import raw_public

    keys = {n: raw_public(Ed25519PrivateKey.generate().public_key()) for n in (101, 102)}
    pin_identities(tmp_path, keys)
    pin_identities(tmp_path, keys)  # the same keys again: fine
    pin_identities(tmp_path, {**keys, 103: raw_public(Ed25519PrivateKey.generate().public_key())})  # a new peer
    forged = {**keys, 102: raw_public(Ed25519PrivateKey.generate().public_key())}
    with pytest.raises(FedtrakError, match="identity key of client\\(s\\) 102 differs from the one this device pinned"):
        pin_identities(tmp_path, forged)
    assert json.loads((tmp_path / PINS_FILE).read_text())["102"] == keys[102].hex()  # the pin stands

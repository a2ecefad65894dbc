"""The device's contract, replayed as the privacy audit did it: crafted server messages to the real
ClientApp handlers. Each finding is refused, or charged exactly what left the device (the ledger's
epsilon equals the epsilon recomputed from the releases sent)."""

from __future__ import annotations

import math
import multiprocessing
from dataclasses import replace

import crafted
import numpy as np
import pytest

from fedtrak import wire
from fedtrak.client.app import features, featurize, score, train
from fedtrak.client.ledger import LEDGER_FILE, Budget, PrivacyLedger
from fedtrak.privacy.accountant import Release, epsilon
from fedtrak.privacy.plan import run_release_plan
from fedtrak.wire.codecs import pack_upper
from fedtrak.wire.job import Job


def _ledger(store, partition: int = 0) -> PrivacyLedger:
    return PrivacyLedger(store / f"partition-{partition}" / LEDGER_FILE)


def test_a_run_is_bound_to_its_first_job_and_a_changed_job_is_refused(tmp_path, logreg_ckpt_dir, logreg_states):
    """Finding 1: a job at epsilon 0.05 charged first; the same run id then came at epsilon 8 with more
    checkpoints and releases. It is refused by name, and nothing more is charged."""
    store, states = tmp_path / "s", logreg_states
    first = crafted.job("run", 0.05, logreg_ckpt_dir)
    crafted.served(featurize(crafted.featurize(first, states[:1]), crafted.device(store)))
    before = _ledger(store).charges()
    greedy = crafted.job("run", 8.0, logreg_ckpt_dir, checkpoints=3, self_influence=True, owner_value="all")
    crafted.refused(featurize(crafted.featurize(greedy, states), crafted.device(store)),
                    "run run was bound at first contact to another job")
    crafted.refused(score(crafted.score(greedy, [0, 1, 2]), crafted.device(store)), "bound at first contact")
    assert _ledger(store).charges() == before  # no Gram, no summary of the greedy job left


def test_only_the_planned_releases_leave_and_each_is_charged_once(tmp_path, logreg_ckpt_dir, logreg_states):
    """Finding 2: more checkpoints than planned, subsets of the planned ones, both screening
    statistics, features in private mode, a histogram without clip-quantile, owner values the job
    does not plan: each refused. A whole legitimate run is charged exactly its plan's epsilon."""
    store, states = tmp_path / "s", logreg_states
    one = crafted.job("one", 1.0, logreg_ckpt_dir, kernel_source="private", secure_agg=False)
    crafted.refused(featurize(crafted.featurize(one, states), crafted.device(store)),
                    "names checkpoints [0, 1, 2]", "checkpoints 0..0")
    crafted.refused(features(crafted.message("features", wire.encode_featurize_request(one, states[:1])),
                             crafted.device(store)), "features leave only in features mode")
    crafted.refused(featurize(crafted.featurize(one, states[:1], clip_round=True), crafted.device(store)),
                    "sets no clip-quantile")
    crafted.served(featurize(crafted.featurize(one, states[:1]), crafted.device(store)))
    groups = {0: np.ones((2, crafted.K))}
    crafted.refused(score(crafted.score(one, [0], groups=groups), crafted.device(store)), "no value release")
    inverses = {0: pack_upper(np.eye(crafted.K))}
    crafted.refused(score(crafted.score(one, [0], inverses=inverses), crafted.device(store)),
                    "does not screen for mislabeled data")

    # a legitimate run of 3 checkpoints with screening and owner values, asked again in subsets
    three = crafted.job("three", 1.0, logreg_ckpt_dir, checkpoints=3, kernel_source="private", secure_agg=False,
                        self_influence=True, owner_value="all")
    ctx = crafted.device(store)
    crafted.served(featurize(crafted.featurize(three, states), ctx))
    ms = [0, 1, 2]
    full = {"inverses": {m: pack_upper(np.eye(crafted.K)) for m in ms},
            "groups": {m: np.ones((2, crafted.K)) for m in ms}, "suspect_threshold": 1.0, "value_clip": 1.0}
    first = wire.decode_score_reply(crafted.served(score(crafted.score(three, ms, **full), ctx)), "c")
    for subset in ([0], [0, 1]):
        crafted.refused(score(crafted.score(three, subset), ctx), f"names checkpoints {subset}")
    crafted.refused(score(crafted.score(three, ms, **{**full, "suspect_threshold": 0.0}), ctx),
                    "released as a suspect count; the other is refused")
    again = wire.decode_score_reply(crafted.served(score(crafted.score(three, ms, **full), ctx)), "c")
    np.testing.assert_array_equal(again.owner_summaries, first.owner_summaries)  # the stored draws
    np.testing.assert_array_equal(again.screening, first.screening)
    np.testing.assert_array_equal(again.owner_values, first.owner_values)

    run = next(c for c in _ledger(store).charges() if c.run_id == "three")
    plan = run_release_plan(three.settings, three.dp(), crafted.K, source="private")
    assert sorted(r["item"] for r in run.releases) == ["count", "gram-0", "gram-1", "gram-2", "summary-0",
                                                       "summary-1", "summary-2", "suspects", "value"]
    assert run.epsilon == pytest.approx(epsilon(plan, three.dp().delta), rel=1e-9)
    assert run.epsilon == pytest.approx(1.0, abs=1e-6)  # exactly the job's whole plan


def test_the_weight_bound_is_the_devices_own_and_a_secure_job_never_releases_a_plain_gram(
        tmp_path, logreg_ckpt_dir, logreg_states):
    """Findings 3 and 4: a server-chosen weight bound of 0.01 with weighting=none (noise 100x too
    small) is refused by name; a secure-aggregation job answered with a plain featurize request is
    refused, with the node's min-secagg-threshold or without it."""
    store, states = tmp_path / "s", logreg_states[:1]
    honest = crafted.job("w", 1.0, logreg_ckpt_dir, kernel_source="private", secure_agg=False, weighting="none")
    assert honest.resolved.weight_bound == 1.0
    crafted_bound = replace(honest, resolved=replace(honest.resolved, weight_bound=0.01))
    crafted.refused(featurize(crafted.featurize(crafted_bound, states), crafted.device(store)),
                    "weight bound 0.01 is not 1", "weighting=none")
    assert not _ledger(store).path.exists()  # refused before anything was bound or released

    secure = crafted.job("sec", 1.0, logreg_ckpt_dir, kernel_source="private", secure_agg=True)
    for config in ({}, {"min-secagg-threshold": 2}):
        crafted.refused(featurize(crafted.featurize(secure, states), crafted.device(store, **config)),
                        "never releases its Gram in the clear")
    # the keys round carries no count: a run that ends after it has released nothing
    advert = crafted.served(featurize(crafted.featurize(secure, states, secagg_context=secure.run_id),
                                      crafted.device(store)))
    assert wire.decode_info(advert, "c").num_examples == 0
    (bound,) = [c for c in _ledger(store).charges() if c.run_id == "sec"]
    assert bound.releases == [] and bound.epsilon == 0.0


def test_training_is_a_release_charged_to_the_ledger(tmp_path, logreg_states):
    """Finding 5: an unnoised train message to a device with a budget is refused; under a private
    run each round's DP-SGD update is charged as it leaves, once (a resent round gets the kept update)."""
    store, state = tmp_path / "s", logreg_states[0]
    plain = crafted.job("plain", None, rounds=1)
    crafted.refused(train(crafted.train(plain, state), crafted.device(store, budget=1.0)),
                    "unbounded epsilon (it adds no noise)")
    private = crafted.job("dp", 1.0, rounds=2)
    ctx = crafted.device(store, budget=1.0)
    first = crafted.served(train(crafted.train(private, state), ctx))
    again = crafted.served(train(crafted.train(private, state), ctx))
    w = wire.attribution.ARRAYS
    np.testing.assert_array_equal(first[w]["1.weight"].numpy(), again[w]["1.weight"].numpy())
    crafted.refused(train(crafted.train(private, state, server_round=3), ctx), "round 3 is not one of them")
    run = next(c for c in _ledger(store).charges() if c.run_id == "dp")
    assert sorted(r["item"] for r in run.releases) == ["count", "update-0-1"]
    update = next(Release(**{k: v for k, v in r.items() if k != "item"}) for r in run.releases
                  if r["item"] == "update-0-1")
    assert update.mechanism == "subsampled-gaussian" and update.sigma > 1 and 0 < run.epsilon < 1
    assert run.planned_epsilon == pytest.approx(1.0, abs=1e-3)  # training and attribution: the whole run


def _charge_many(path: str, worker: int, n: int) -> None:
    ledger = PrivacyLedger(path)
    unit = Release("count", 50.0, 1, kind="count")
    for i in range(n):
        ledger.charge("run", {f"item-{worker}-{i}": unit}, Budget(100.0))


def test_two_processes_charging_at_once_lose_no_charge(tmp_path):
    """Finding 6: two processes making 40 charges each recorded 44 of 80; under the lock, all 80."""
    path = tmp_path / LEDGER_FILE
    PrivacyLedger(path).bind("run", "d", [], 1e-5, "private", None)
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_charge_many, args=(str(path), w, 40)) for w in range(2)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(120)
    assert all(p.exitcode == 0 for p in workers)
    (run,) = PrivacyLedger(path).charges()
    assert len(run.releases) == 80
    assert run.epsilon == pytest.approx(epsilon([Release("count", 50.0, 80)], 1e-5), rel=1e-9)


def test_under_dp_a_failure_names_its_step_not_the_devices_counts_or_paths(tmp_path, logreg_ckpt_dir):
    """Finding 10: "local store holds 500 examples, the data 342" and local paths reached the server;
    under DP a failure that may depend on the data names its step and kind only."""
    store = tmp_path / "a-very-private-folder"
    private = crafted.job("p", 1.0, logreg_ckpt_dir)
    reason = crafted.refused(score(crafted.score(private, [0]), crafted.device(store)), "score: the device failed")
    assert "a-very-private-folder" not in reason and "examples" not in reason and "500" not in reason
    exact = crafted.job("e", None, logreg_ckpt_dir)  # without DP the reason is said, its local paths not
    said = crafted.refused(score(crafted.score(exact, [0]), crafted.device(store)))
    assert "checkpoint 0 is not in the local store <store-dir>/" in said and "a-very-private-folder" not in said


def test_a_secure_sum_input_is_charged_as_the_secure_release_when_it_leaves(tmp_path, logreg_ckpt_dir,
                                                                            logreg_states):
    """Secure aggregation: the Grams are charged when the masked input is made, at the Skellam noise
    this device's share guarantees with the threshold's survivors; keys and shares cost nothing."""
    from fedtrak.client import secure_aggregation as secagg
    from fedtrak.client.featurize import featurize_into_store
    from fedtrak.client.node import Local

    store = tmp_path / "s"
    job = crafted.job("secure", 1.0, logreg_ckpt_dir, kernel_source="private", secure_agg=True)
    clients = {}
    for p in range(3):
        local = Local.open(job, crafted.device(store, partition=p, node=100 + p))
        featurize_into_store(local.task, local.data, job, {0: logreg_states[0]}, local.store)
        clients[100 + p] = local
    adverts = [secagg.advertise(local, job.run_id) for local in clients.values()]
    sealed = [s for local in clients.values() for s in secagg.share(local, adverts, 2)]
    assert all(c.releases == [] for c in _ledger(store).charges())  # keys and shares: nothing charged
    secagg.masked_input(clients[100], [s for s in sealed if s.recipient == 100], [0], 20)
    (run,) = _ledger(store).charges()
    assert sorted(r["item"] for r in run.releases) == ["count", "gram-0"]
    gram = next(r for r in run.releases if r["item"] == "gram-0")
    assert gram["mechanism"] == "skellam" and math.isfinite(run.eps)


def test_a_changed_clip_norm_of_a_clip_quantile_run_is_the_same_job(tmp_path, logreg_ckpt_dir):
    """The clip norm a clip-quantile run resolves after its histogram round is the one field that may
    change after first contact; any other change is a different job."""
    from fedtrak.client.contract import job_digest

    q = crafted.job("q", 1.0, logreg_ckpt_dir, clip_quantile=0.5)
    later = replace(q, resolved=replace(q.resolved, clip_norm=3.5))
    assert job_digest(later) == job_digest(q)
    other: Job = replace(q, resolved=replace(q.resolved, noise_multiplier=q.resolved.noise_multiplier / 2))
    assert job_digest(other) != job_digest(q)

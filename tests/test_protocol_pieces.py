"""The federated pieces without a Flower runtime: where a client finds its data, its local
store reuse, the run config and job spec, and the server's checks of client releases."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
from flwr.app import RecordDict

from fedtrak import wire
from fedtrak.client.data import load_client_data
from fedtrak.client.featurize import featurize_into_store, stored_gram
from fedtrak.client.store import FeatureStore
from fedtrak.config.settings import Settings
from fedtrak.data.tasks import cached_task
from fedtrak.errors import FedtrakError
from fedtrak.server.query_batches import batch_request, batch_rows, joined_releases
from fedtrak.server.validation import features_release, gram_release, read_info, score_release
from fedtrak.trak.kernel import gram
from fedtrak.trak.per_checkpoint import checkpoint_featurizer
from fedtrak.wire.codecs import pack_upper
from fedtrak.wire.compat import PROTOCOL_VERSION
from fedtrak.wire.job import Job, Resolved

JOB = Job("r1", Settings().replaced(proj_dim=64, partition="dirichlet", partition_seed=3), Resolved(64))


def test_simulation_client_takes_its_partition():
    data = load_client_data(JOB, {"partition-id": 2, "num-partitions": 4}, node_id=7)
    assert data.owner == "2" and data.partition_id == 2
    again = load_client_data(JOB, {"partition-id": 2, "num-partitions": 4}, node_id=8)
    np.testing.assert_array_equal(data.indices, again.indices)
    others = [load_client_data(JOB, {"partition-id": p, "num-partitions": 4}, 0).indices for p in range(4)]
    assert sorted(np.concatenate(others).tolist()) == list(range(1500))


@pytest.mark.parametrize("arrays, message", [
    ({"x": np.zeros((5, 63)), "y": np.zeros(5, int)}, "x has shape"),
    ({"x": np.full((5, 64), np.nan), "y": np.zeros(5, int)}, "finite"),
    ({"x": np.zeros((5, 64)), "y": np.full(5, 10)}, r"labels outside \[0, 10\)"),
    ({"x": np.zeros((5, 64)), "y": np.full(5, 1.5)}, r"labels must be integer class indices, got float64"),
    ({"x": np.zeros((5, 64)), "y": np.zeros(4, int)}, "y has shape"),
    ({"x": np.zeros((5, 64))}, "lacks"),
])
def test_device_data_is_validated(tmp_path, arrays, message):
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    with pytest.raises(FedtrakError, match=message):
        load_client_data(JOB, {"data-path": str(path)}, node_id=1)


def test_device_data_errors_name_the_source(tmp_path):
    with pytest.raises(FedtrakError, match="names no data"):
        load_client_data(JOB, {}, node_id=1)
    with pytest.raises(FedtrakError, match="does not exist"):
        load_client_data(JOB, {"data-path": str(tmp_path / "none.npz")}, node_id=1)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(FedtrakError, match="cannot read data file"):
        load_client_data(JOB, {"data-path": str(tmp_path / "bad.npz")}, node_id=1)
    with pytest.raises(FedtrakError, match="holds data for task 'fmnist-mlp'"):
        load_client_data(JOB, {"task": "fmnist-mlp", "partition-id": 0, "num-partitions": 2}, 1)
    with pytest.raises(FedtrakError, match="outside"):
        load_client_data(JOB, {"partition-id": 5, "num-partitions": 2}, 1)
    good = tmp_path / "good.npz"
    np.savez(good, x=np.zeros((3, 64)), y=np.array([0, 1, 2]))
    data = load_client_data(JOB, {"data-path": str(good), "owner": "clinic-a"}, node_id=1)
    assert data.owner == "clinic-a" and data.partition_id == -1 and data.x.dtype == np.float32


def test_restarted_client_reuses_its_store_and_recomputes_on_new_weights(tmp_path, logreg_states):
    data = load_client_data(JOB, {"partition-id": 0, "num-partitions": 3}, node_id=1)
    task_states = {0: logreg_states[0], 1: logreg_states[1]}
    from fedtrak.data.tasks import cached_task

    task = cached_task("digits-logreg")
    n = len(data.y)
    first = featurize_into_store(task, data, JOB, task_states, FeatureStore(tmp_path, "r1"))
    assert first == {0: n, 1: n}
    store = FeatureStore(tmp_path, "r1")  # a new process finds the finished checkpoints
    assert featurize_into_store(task, data, JOB, task_states, store) == {0: 0, 1: 0}
    features, _ = store.read(0)
    g, n = stored_gram(store, 0)
    np.testing.assert_allclose(g, gram(np.asarray(features)), rtol=1e-12)
    assert n == len(data.y)
    changed = {0: {k: v * 1.5 for k, v in logreg_states[0].items()}, 1: logreg_states[1]}
    assert featurize_into_store(task, data, JOB, changed, store) == {0: n, 1: 0}


def test_a_client_stopped_mid_checkpoint_resumes_after_its_last_finished_chunk(tmp_path, logreg_states,
                                                                              monkeypatch):
    import fedtrak.client.featurize as cf
    from fedtrak.data.tasks import cached_task

    task = cached_task("digits-logreg")
    data = load_client_data(JOB, {"partition-id": 0, "num-partitions": 2}, node_id=1)
    seen: list[int] = []
    stop_after = {"chunks": 2}

    def small_chunks(task, state, m, settings, projection):
        featurizer = checkpoint_featurizer(task, state, m, settings, projection)
        featurizer.chunk_examples = 128
        inner = featurizer.iter_chunks

        def chunks(x, y, first=0):
            for c in inner(x, y, first):
                if len(seen) == stop_after["chunks"]:
                    raise KeyboardInterrupt  # the device is switched off mid-checkpoint
                seen.append(c.start)
                yield c

        featurizer.iter_chunks = chunks
        return featurizer

    monkeypatch.setattr(cf, "checkpoint_featurizer", small_chunks)
    store = FeatureStore(tmp_path, "r1")
    with pytest.raises(KeyboardInterrupt):
        featurize_into_store(task, data, JOB, {0: logreg_states[0]}, store)
    assert seen == [0, 128] and not store.has(0)
    stop_after["chunks"] = 10**6
    restarted = FeatureStore(tmp_path, "r1")
    done = featurize_into_store(task, data, JOB, {0: logreg_states[0]}, restarted)
    assert done == {0: len(data.y) - 256} and seen[2] == 256  # it went on from the third chunk
    fresh = FeatureStore(tmp_path / "fresh", "r1")
    monkeypatch.setattr(cf, "checkpoint_featurizer", checkpoint_featurizer)
    featurize_into_store(task, data, JOB, {0: logreg_states[0]}, fresh)
    for a, b in zip(restarted.read(0), fresh.read(0)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not list(restarted.dir.glob("*.partial"))


def test_a_node_refuses_a_job_of_another_protocol_or_task(digits_logreg):
    from dataclasses import replace

    job = JOB.fingerprinted(digits_logreg)
    job.check_node(digits_logreg)  # the same task and settings: accepted
    with pytest.raises(FedtrakError, match=f"protocol version 1, this side {PROTOCOL_VERSION}"):
        replace(job, protocol_version=1).check_node(digits_logreg)
    with pytest.raises(FedtrakError, match="task fingerprint .* projection settings differ"):
        replace(job, resolved=Resolved(128)).check_node(digits_logreg)  # the server's fingerprint is for k = 64
    with pytest.raises(FedtrakError, match="task fingerprint"):
        job.check_node(cached_task("digits-mlp"))  # another model under the same job
    old = {k: v for k, v in wire.encode_job(job).items() if k not in ("protocol-version", "task-fingerprint")}
    with pytest.raises(FedtrakError, match="carries no protocol version: the server runs an older fedtrak"):
        wire.decode_job(old)


def test_job_and_state_round_trip(logreg_states):
    assert wire.decode_job(wire.encode_job(JOB)) == JOB
    with pytest.raises(FedtrakError, match=r"lacks setting\(s\) \['task'\]"):
        wire.decode_job({k: v for k, v in wire.encode_job(JOB).items() if k != "task"})
    with pytest.raises(FedtrakError, match="proj-dim must be an integer, got '64'"):
        wire.decode_job({**wire.encode_job(JOB), "proj-dim": "64"})
    back = wire.record_to_state(wire.state_to_record(logreg_states[0]))
    assert all(np.array_equal(back[k].numpy(), v.numpy()) for k, v in logreg_states[0].items())


@pytest.mark.parametrize("config, message", [
    ({"rounds": 0}, "rounds must be an integer >= 1, got 0"),
    ({"mode": "trusted"}, "mode='trusted'"),
    ({"proj-dim": "512"}, "proj-dim must be an integer"),
    ({"allow-full": "yes"}, "allow-full must be true or false"),
    ({"porj-dim": 5}, "unknown setting"),
    ({"secure-agg": True, "clients": 2}, "secure-agg needs mode=private and at least 3 clients"),
    ({"flip-fraction": 0.1, "flip-clients": "0,12"}, r"flip-clients \[12\] are not client ids"),
])
def test_run_config_errors_name_the_key(config, message):
    with pytest.raises(FedtrakError, match=message):
        Settings.from_flat(config)


def test_server_checks_of_client_releases():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(20, 4))
    g = gram(f)
    info = wire.ClientInfo("a", 0, 20, PROTOCOL_VERSION, "ab" * 8)
    ok = wire.encode_grams_reply({0: pack_upper(g)}, info)
    np.testing.assert_allclose(gram_release(ok, [0], 4, "client a")[0], g)
    assert read_info(ok, "client a", "ab" * 8).num_examples == 20
    with pytest.raises(FedtrakError, match="client a has task fingerprint abab"):
        read_info(ok, "client a", "cd" * 8)
    with pytest.raises(FedtrakError, match="client a: no Gram for checkpoint 1"):
        gram_release(ok, [0, 1], 4, "client a")
    with pytest.raises(FedtrakError, match="message has no array record"):
        gram_release(RecordDict(), [0], 4, "client a")
    bad_diag = g.copy()
    bad_diag[2, 2] = -1.0
    with pytest.raises(FedtrakError, match="negative diagonal"):
        gram_release(wire.encode_grams_reply({0: pack_upper(bad_diag)}, info), [0], 4, "client a")
    with pytest.raises(FedtrakError, match="reports 0 examples"):
        read_info(wire.add_info(RecordDict(), wire.ClientInfo("a", 0, 0, PROTOCOL_VERSION, "ab" * 8)), "a")

    feats = wire.encode_features_reply(np.arange(3), {0: (np.ones((3, 4), np.float32),
                                                          np.array([0.1, 1.5, 0.2], np.float32), None)}, info)
    with pytest.raises(FedtrakError, match="leave \\[0, 1\\]"):
        features_release(feats, [0], 4, 3, "client a")
    with pytest.raises(FedtrakError, match=r"example indices have shape \(3,\), expected \(5,\)"):
        features_release(feats, [0], 4, 5, "client a")

    totals = np.array([1.0, 2.0])
    scores = np.array([[0.5, 0.5, 0.0], [1.0, 1.0, 0.5]])
    full = wire.encode_score_reply(wire.ScoreRelease(owner_totals=totals, scores=scores, indices=np.arange(3)), info)
    with pytest.raises(FedtrakError, match="owner totals disagree"):
        score_release(full, "full", 2, 3, "client a")
    assert score_release(full, "owner-totals", 2, 3, "client a").owner_totals.tolist() == [1.0, 2.0]
    with pytest.raises(FedtrakError, match=r"scores have shape \(2, 3\), expected \(2, 4\)"):
        score_release(full, "full", 2, 4, "client a")


def test_score_request_round_trip_and_bad_share_bounds():
    u = {0: np.arange(128.0).reshape(2, 64)}
    groups = {0: np.ones((1, 64))}
    request = wire.ScoreRequest(JOB, "owner-totals", 5, u, None, groups, value_clip=0.5, suspect_threshold=0.25)
    back = wire.decode_score_request(wire.encode_score_request(request))
    assert (back.value_clip, back.suspect_threshold, back.policy, back.topk) == (0.5, 0.25, "owner-totals", 5)
    np.testing.assert_array_equal(back.groups[0], groups[0])
    for bad in (float("nan"), -1.0, float("inf")):
        content = wire.encode_score_request(wire.ScoreRequest(JOB, "owner-totals", 5, u, value_clip=bad))
        with pytest.raises(FedtrakError, match="share bounds"):
            wire.decode_score_request(content)


def test_query_batches_split_join_and_refuse_what_does_not_fit():
    """Batches of rows cover the queries once (by bytes by default); a batch request round-trips
    with its offset; one that claims rows past the run's queries, or inverses after the first
    batch, is refused; the server joins each client's batches and drops a client whose example
    indices change between them."""
    assert batch_rows(10, 64, 1, 4) == [(0, 4), (4, 8), (8, 10)]
    assert batch_rows(0, 64, 1) == [(0, 0)]
    rows = batch_rows(20_000, 2048, 2)  # 64 MiB of float32 over two checkpoints: 4,096 rows a batch
    assert rows[0] == (0, 4096) and rows[-1][1] == 20_000 and len(rows) == 5
    u = {0: np.arange(640.0).reshape(10, 64)}
    whole = wire.ScoreRequest(JOB, "topk", 3, u, {0: np.zeros(64 * 65 // 2)})
    second = batch_request(whole, 4, 8, 10)
    assert second.inverses is None and second.batched
    back = wire.decode_score_request(wire.encode_score_request(second))
    assert (back.query_offset, back.query_count) == (4, 10)
    np.testing.assert_array_equal(back.queries[0], u[0][4:8])
    first = wire.decode_score_request(wire.encode_score_request(batch_request(whole, 0, 4, 10)))
    assert first.inverses is not None and first.query_offset == 0
    for bad in (dataclasses.replace(second, query_count=6),
                dataclasses.replace(second, inverses=whole.inverses),
                dataclasses.replace(second, query_count=0)):
        with pytest.raises(FedtrakError, match="does not fit the run's queries"):
            wire.decode_score_request(wire.encode_score_request(bad))
    rel = wire.ScoreRelease
    parts = [{1: rel(owner_totals=np.array([1.0, 2.0]), scores=np.ones((2, 3)), indices=np.arange(3),
                     screening=np.array([5.0])),
              2: rel(owner_totals=np.zeros(2), scores=np.zeros((2, 3)), indices=np.arange(3))},
             {1: rel(owner_totals=np.array([3.0]), scores=np.full((1, 3), 2.0), indices=np.arange(3)),
              2: rel(owner_totals=np.zeros(1), scores=np.zeros((1, 3)), indices=np.arange(1, 4))}]
    excluded = []
    joined = joined_releases(parts, lambda n: f"client {n}", lambda n, why: excluded.append((n, why)))
    assert list(joined) == [1] and joined[1].owner_totals.tolist() == [1.0, 2.0, 3.0]
    assert joined[1].scores.shape == (3, 3) and joined[1].screening.tolist() == [5.0]
    assert excluded == [(2, "client 2: its example indices change between query batches")]


def test_release_sizes_are_bounded_by_clipping_and_noise():
    """Under DP an honest noised Gram, summary, suspect count and owner values pass; a Gram scaled
    by 1e6, -1e12 I, a summary of 1e12 and a suspect count above the owner's count are refused."""
    from fedtrak.privacy.bounds import gram_limits, owner_limits
    from fedtrak.privacy.mechanisms import DPSettings, noised_gram, noised_owner_summaries

    rng = np.random.default_rng(1)
    dp = DPSettings(noise_multiplier=2.0, clip_norm=1.0)
    n, k = 50, 32
    f = rng.normal(size=(n, k))
    f /= np.linalg.norm(f, axis=1, keepdims=True)  # clipped to C = 1: n C^2 = 50
    info = wire.ClientInfo("a", 0, n, PROTOCOL_VERSION, "ab" * 8)
    limits = gram_limits(dp, n, k)
    for _ in range(20):  # honest releases, fresh noise each time
        honest = noised_gram(gram(f), dp, rng)
        gram_release(wire.encode_grams_reply({0: pack_upper(honest)}, info), [0], k, "client a", False, limits)
    for bad, message in ((gram(f) * 1e6, "diagonal entries"), (-1e12 * np.eye(k), "diagonal entries"),
                         (gram(f) + 45.0 * (np.ones((k, k)) - np.eye(k)), "not positive semi-definite")):
        with pytest.raises(FedtrakError, match=f"client a: .*{message}"):
            gram_release(wire.encode_grams_reply({0: pack_upper(bad)}, info), [0], k, "client a", False, limits)

    us = [rng.normal(size=(3, k))]
    groups = np.ones((1, 3), dtype=bool)
    summed = [groups.astype(float) @ us[0]]
    owner = owner_limits(dp, n, k, summed, value_clip=0.5, suspect_count=True)
    honest = noised_owner_summaries(f.sum(axis=0, keepdims=True), dp, rng)

    def reply(summaries: np.ndarray, suspects: float = 3.0, values: float = 2.0) -> RecordDict:
        return wire.encode_score_reply(wire.ScoreRelease(owner_summaries=summaries, screening=np.array([suspects]),
                                                         owner_values=np.array([values])), info)

    ok = score_release(reply(honest), "owner-totals", 3, n, "client a", True, True, us, groups, owner)
    np.testing.assert_allclose(ok.owner_totals, us[0] @ honest[0])
    for bad, message in ((reply(np.full((1, k), 1e12)), "an owner summary has norm"),
                         (reply(honest, suspects=n + 1e3), "suspect count"),
                         (reply(honest, values=1e9), "owner values have norm")):
        with pytest.raises(FedtrakError, match=f"client a: {message}"):
            score_release(bad, "owner-totals", 3, n, "client a", True, True, us, groups, owner)


def test_grams_are_read_without_a_copy_and_broken_bytes_are_refused():
    """The server reads Grams as views over the message's bytes: the same values, read-only; a
    truncated payload or an object array (a pickle) is refused by name, as numpy's own reader does."""
    g = pack_upper(gram(np.random.default_rng(1).normal(size=(5, 4))))
    info = wire.ClientInfo("a", 0, 5, PROTOCOL_VERSION, "ab" * 8)
    reply = wire.encode_grams_reply({0: g}, info)
    view = wire.decode_grams(reply, "client a")[0]
    np.testing.assert_array_equal(view, g)
    assert not view.flags.writeable
    array = reply.array_records[wire.attribution.GRAMS]["0"]
    array.data = array.data[:-8]
    with pytest.raises(FedtrakError, match=r"client a: unreadable array in 'fedtrak.grams': 72 bytes of data"):
        wire.decode_grams(reply, "client a")
    buf = io.BytesIO()
    np.save(buf, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    array.data = buf.getvalue()
    with pytest.raises(FedtrakError, match="client a: unreadable array .* holds Python objects"):
        wire.decode_grams(reply, "client a")


def test_a_device_joins_its_topk_batches_by_offset(tmp_path):
    """Each batch's top-k rows are kept; the joined file holds the rows that follow on from row 0
    (a batch that arrives early waits for the one before it); a later batch with no first batch kept
    is refused by name."""
    from fedtrak.client.releases import _joined_batches

    def rows(start: int, n: int) -> dict:
        ids = np.arange(start, start + n)[:, None].repeat(2, axis=1)
        return {"proponent_ids": ids, "proponent_scores": ids * 1.0, "opponent_ids": -ids, "opponent_scores": -ids * 1.0}

    folder = tmp_path / "topk-batches"
    with pytest.raises(FedtrakError, match="query batch at offset 3 came before the first batch"):
        _joined_batches(folder, 3, rows(3, 2), {})
    joined, extra = _joined_batches(folder, 0, rows(0, 3), {"suspect_ids": np.arange(4)})
    assert joined["proponent_ids"][:, 0].tolist() == [0, 1, 2] and extra["suspect_ids"].tolist() == [0, 1, 2, 3]
    joined, _ = _joined_batches(folder, 5, rows(5, 1), {})  # rows 3-4 not here yet
    assert joined["proponent_ids"][:, 0].tolist() == [0, 1, 2]
    joined, extra = _joined_batches(folder, 3, rows(3, 2), {})
    assert joined["opponent_ids"][:, 0].tolist() == [0, -1, -2, -3, -4, -5] and extra["suspect_ids"].size == 4


def test_an_integer_for_a_float_setting_survives_the_job_round_trip():
    """``epsilon=1`` from Python (an int where a float is meant) once made every client refuse the job
    as malformed; the settings hold it as 1.0, and the job decodes to the same settings."""
    from fedtrak.config.settings import PrivacySettings, Settings
    from fedtrak.wire import decode_job, encode_job
    from fedtrak.wire.job import Job, Resolved

    settings = Settings().replaced(epsilon=1, clip_norm=5, delta=1e-5)
    assert isinstance(settings.privacy.epsilon, float) and isinstance(settings.privacy.clip_norm, float)
    job = Job("r", settings, Resolved(64))
    assert decode_job(encode_job(job)).settings == settings
    built = Settings(privacy=PrivacySettings(epsilon=1, clip_norm=5))  # built section by section
    assert type(built.privacy.epsilon) is float and decode_job(encode_job(Job("r", built, Resolved(64)))).settings == built

"""The core invariant at the array level: splitting the computation between clients
and a server (clients featurize their own data and release only Grams; the server
sums them, preconditions its queries; clients score their own examples) gives the
centralized scores. The Flower apps move exactly these arrays."""

from __future__ import annotations

import numpy as np
import pytest

from fedtrak.client.local_scoring import score_own_examples
from fedtrak.config.seeds import derive_seed
from fedtrak.config.settings import Settings
from fedtrak.data.checkpoints import model_from_state
from fedtrak.data.partition import partition
from fedtrak.errors import FedtrakError
from fedtrak.simulations.attribute import central_scores
from fedtrak.trak.featurizer import Featurizer
from fedtrak.trak.kernel import Kernel, gram, precondition, resolve_lambda
from fedtrak.trak.projectors import make_projector
from fedtrak.wire.codecs import pack_upper, unpack_upper

K = 128


@pytest.mark.parametrize("clients, scheme", [(1, "iid"), (3, "iid"), (3, "dirichlet"),
                                             (10, "iid"), (10, "dirichlet")])
def test_split_computation_equals_central(digits_logreg, logreg_states, clients, scheme):
    task = digits_logreg
    parts = partition(task.y_train, clients, scheme, alpha=0.5, seed=1)
    local = {c: {"F": [], "q": []} for c in range(clients)}
    preconditioned = []
    for m, state in enumerate(logreg_states):
        model = model_from_state(task, state, f"checkpoint {m}")
        proj = make_projector("rademacher", task.num_params, K, derive_seed(0, m))
        feat = Featurizer(model, task.output, proj)
        g, n = np.zeros((K, K)), 0
        for c, idx in enumerate(parts.clients):  # on each device, its own data only
            f = feat.featurize(task.x_train[idx], task.y_train[idx])
            local[c]["F"].append(f.features)
            local[c]["q"].append(f.out_to_loss)
            g += unpack_upper(pack_upper(gram(f.features, f.curvature)), K)  # what travels (curvature-
            # weighted, the default kernel), summed on the server
            n += len(idx)
        lam = resolve_lambda("auto", g, n, task.num_params, task.training.weight_decay)
        preconditioned.append(precondition(feat.featurize(task.x_query, task.y_query).features,
                                           Kernel(g, lam.value)))
    split = np.concatenate(
        [score_own_examples(local[c]["F"], local[c]["q"], preconditioned)[0] for c in range(clients)], axis=1
    )
    order = parts.order()
    central, _, _ = central_scores(task, logreg_states, task.x_train[order], task.y_train[order],
                                Settings().replaced(proj_dim=K, projector="rademacher"))
    np.testing.assert_allclose(split, central, rtol=1e-4, atol=1e-4 * np.abs(central).max())


def test_gram_codec_round_trip_and_errors():
    np.testing.assert_array_equal(unpack_upper(pack_upper(np.array([[1.0, 2.0], [2.0, 5.0]])), 2),
                                  [[1.0, 2.0], [2.0, 5.0]])
    with pytest.raises(FedtrakError, match="not symmetric"):
        pack_upper(np.array([[1.0, 2.0], [0.0, 1.0]]))
    with pytest.raises(FedtrakError, match="client b: Gram upper triangle has shape"):
        unpack_upper(pack_upper(np.eye(3))[:-1], 3, source="client b")


def test_scoring_in_row_chunks_equals_scoring_at_once():
    """The client's chunked pass (totals, kept scores, top-k, self-influence, owner summaries)
    gives what scoring every example at once gives."""
    from fedtrak.client.local_scoring import score_in_chunks
    from fedtrak.privacy.mechanisms import owner_summaries
    from fedtrak.trak.scoring import top_k

    rng = np.random.default_rng(4)
    feats = [rng.standard_normal((50, 6)).astype(np.float32) for _ in range(2)]
    qs = [rng.uniform(0, 1, 50).astype(np.float32) for _ in range(2)]
    us = [rng.standard_normal((5, 6)) for _ in range(2)]
    invs = [np.eye(6) * (m + 1) for m in range(2)]
    scales = [rng.uniform(0.5, 1, 50) for _ in range(2)]
    clipped = [f * s[:, None].astype(np.float32) for f, s in zip(feats, scales)]
    scores, self_infl = score_own_examples(feats, qs, us, invs)  # on the device: the features as they are
    clipped_self = score_own_examples(clipped, qs, us, invs)[1]  # what is released: of clipped features
    local = score_in_chunks(feats, qs, us, invs, scales, keep_scores=True, topk=4, rows=7)
    np.testing.assert_allclose(local.scores, scores, rtol=1e-10)
    np.testing.assert_allclose(local.totals, scores.sum(axis=1), rtol=1e-10)
    np.testing.assert_allclose(local.self_influence, self_infl, rtol=1e-10)
    assert local.self_influence_sum == pytest.approx(clipped_self.sum(), rel=1e-10)
    assert not np.isclose(clipped_self.sum(), self_infl.sum())
    threshold = float(np.quantile(self_infl, 0.8))  # suspects: counted from the device's exact self-influence
    counted = score_in_chunks(feats, qs, us, invs, scales, rows=7, suspect_threshold=threshold)
    assert counted.suspects == int((self_infl > threshold).sum()) == 10
    np.testing.assert_allclose(local.summaries, owner_summaries(clipped, np.mean(qs, axis=0)), rtol=1e-6)
    for got, values in ((local.proponents, scores), (local.opponents, -scores)):
        idx, val = top_k(values, 4)
        np.testing.assert_array_equal(got[0], idx)
        np.testing.assert_allclose(np.abs(got[1]), np.abs(val), rtol=1e-12)

"""The secure-aggregation protocol as pure steps: exact sums for 3, 10 and 50 clients, dropouts up
to the threshold and a clear failure beyond it, tampered or replayed messages refused by name."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from scipy.stats import chisquare

from fedtrak.config.settings import DEFAULT_SECAGG_THRESHOLD as F
from fedtrak.errors import FedtrakError
from fedtrak.secagg import fixedpoint, graph
from fedtrak.secagg.protocol import Client, unmask_sum

CONTEXT = b"run-7|checkpoint-0"
LENGTH = 64 * 65 // 2  # a Gram upper triangle at k = 64


def _setup(n: int, threshold: int, context: bytes = CONTEXT, graph: dict[int, list[int]] | None = None):
    """Rounds 1-2; with ``graph``, each client shares only with its neighbours (SecAgg+)."""
    identities = {i: Ed25519PrivateKey.generate() for i in range(n)}
    public = {i: k.public_key() for i, k in identities.items()}
    clients = [Client(i, identities[i], context) for i in range(n)]
    adverts = [c.advertise() for c in clients]
    hood = {i: sorted({i, *graph[i]}) if graph else list(range(n)) for i in range(n)}
    sealed = [s for c in clients for s in c.share([adverts[v] for v in hood[c.client]], public, threshold)]
    return clients, adverts, sealed, public


def _run(n: int, threshold: int, drop_before_input: set[int], drop_before_unmask: set[int] = frozenset(),
         graph: dict[int, list[int]] | None = None):
    clients, adverts, sealed, _ = _setup(n, threshold, graph=graph)
    x = np.random.default_rng(n).uniform(-100, 100, size=(n, LENGTH))
    inputs = {c.client: c.masked_input([s for s in sealed if s.recipient == c.client],
                                       fixedpoint.encode(x[c.client]))
              for c in clients if c.client not in drop_before_input}
    delivered = {u: {s.sender for s in sealed if s.recipient == u} for u in inputs}
    replies = {u: clients[u].unmask(sorted(inputs)) for u in inputs if u not in drop_before_unmask}
    total = unmask_sum(adverts, inputs, replies, threshold, LENGTH, CONTEXT, delivered)
    return fixedpoint.decode(total), x[sorted(inputs)].sum(axis=0), inputs


@pytest.mark.parametrize("n, threshold", [(3, 2), (10, 6), (50, 26)])
def test_sum_equals_the_float_sum_within_the_quantization_bound(n, threshold):
    got, want, _ = _run(n, threshold, set())
    assert np.abs(got - want).max() <= fixedpoint.quantization_bound(n) + 1e-9


@pytest.mark.parametrize("drop_inputs, drop_unmask", [({3}, set()), ({1, 2, 3, 4}, set()), (set(), {0, 5}),
                                                      ({9}, {0, 1, 2})])
def test_dropouts_up_to_the_threshold_keep_the_survivors_sum_exact(drop_inputs, drop_unmask):
    got, want, inputs = _run(10, 6, drop_inputs, drop_unmask)
    assert len(inputs) == 10 - len(drop_inputs)
    assert np.abs(got - want).max() <= fixedpoint.quantization_bound(10) + 1e-9


def test_the_neighbour_graph_is_complete_when_small_and_sparse_regular_when_large():
    assert graph.neighbours(range(10))[3] == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    for n in (50, 200):
        g = graph.neighbours(range(n))
        d = graph.degree(n)
        assert d < n - 1 and d % 2 == 0 and d <= 2 * np.ceil(1.5 * np.log2(n))
        assert all(len(vs) == d and c not in vs for c, vs in g.items())
        assert all(c in g[v] for c, vs in g.items() for v in vs)  # symmetric
    assert graph.neighbours(range(50)) != graph.neighbours(range(50))  # a fresh random graph per run
    assert graph.threshold(3, F) == 2 and graph.threshold(10, F) == 6 and graph.threshold(50, F) == 12
    with pytest.raises(FedtrakError, match="at least 3 clients"):
        graph.threshold(2, F)


@pytest.mark.parametrize("drop_inputs, drop_unmask", [(set(), set()), ({0, 7, 33}, set()), ({5}, {6, 40})])
def test_sparse_graph_of_50_clients_sums_exactly_with_dropouts(drop_inputs, drop_unmask):
    g = graph.neighbours(range(50))
    t = graph.threshold(50, F)
    got, want, inputs = _run(50, t, drop_inputs, drop_unmask, graph=g)
    assert len(inputs) == 50 - len(drop_inputs)
    assert np.abs(got - want).max() <= fixedpoint.quantization_bound(50) + 1e-9


def test_sparse_graph_fails_by_name_when_a_neighbourhood_loses_too_many():
    g = graph.neighbours(range(50))
    t = graph.threshold(50, F)
    victim = 0
    gone = set(g[victim][: len(g[victim]) + 1 - t + 1])  # leaves victim with t - 1 holders of its shares
    with pytest.raises(FedtrakError, match=f"shares of client {victim} for a threshold of {t}"):
        _run(50, t, set(), gone, graph=g)


def test_a_client_refuses_to_unmask_for_too_few_survivors():
    clients, _, sealed, _ = _setup(5, 4)
    for c in clients:
        c.masked_input([s for s in sealed if s.recipient == c.client], fixedpoint.encode(np.zeros(LENGTH)))
    with pytest.raises(FedtrakError, match="client 0: only 3 survivors for a threshold of 4"):
        clients[0].unmask([0, 1, 2])


@pytest.mark.parametrize("drop_inputs, drop_unmask", [({0, 1, 2, 3, 4}, set()), ({0, 1}, {2, 3, 4})])
def test_dropouts_beyond_the_threshold_fail_without_a_result(drop_inputs, drop_unmask):
    with pytest.raises(FedtrakError, match="threshold of 6"):
        _run(10, 6, drop_inputs, drop_unmask)


def test_tampered_and_replayed_messages_are_refused_by_name():
    clients, adverts, _, public = _setup(4, 3)
    forged = dataclasses.replace(adverts[2], s_public=adverts[1].s_public)
    with pytest.raises(FedtrakError, match="client 2: advertisement signature is invalid"):
        clients[0].share([adverts[0], adverts[1], forged, adverts[3]], public, 3)
    # an advertisement from another round of the same run does not verify in this one
    other = Client(3, Ed25519PrivateKey.generate(), b"run-7|checkpoint-1")
    public_other = {**public, 3: other.identity.public_key()}
    with pytest.raises(FedtrakError, match="client 3: advertisement signature is invalid"):
        clients[0].share([*adverts[:3], dataclasses.replace(other.advertise(), signature=adverts[3].signature)],
                         public_other, 3)
    replayed = Client(3, other.identity, b"run-7|checkpoint-1").advertise()
    with pytest.raises(FedtrakError, match="client 3: advertisement signature is invalid"):
        clients[0].share([*adverts[:3], replayed], public_other, 3)
    # a masked vector of the wrong length is refused, naming its sender
    clients, adverts, sealed, _ = _setup(3, 2)
    inputs = {c.client: c.masked_input([s for s in sealed if s.recipient == c.client],
                                       fixedpoint.encode(np.zeros(LENGTH))) for c in clients}
    inputs[1] = inputs[1][:-1]
    replies = {u: clients[u].unmask(sorted(inputs)) for u in inputs}
    with pytest.raises(FedtrakError, match="client 1: masked input has shape"):
        unmask_sum(adverts, inputs, replies, 2, LENGTH, CONTEXT)
    # shares tampered in transit fail authentication at their recipient when they arrive: it names
    # the sender, masks without it and reveals nothing for it, but still reveals for the others
    clients, adverts, sealed, _ = _setup(3, 2)
    bad = [dataclasses.replace(s, ciphertext=bytes([s.ciphertext[0] ^ 1]) + s.ciphertext[1:])
           if (s.sender, s.recipient) == (2, 0) else s for s in sealed]
    assert clients[0].receive([s for s in bad if s.recipient == 0]) == [2]
    assert sorted(clients[0].unmask([0, 1, 2])) == [0, 1]
    with pytest.raises(FedtrakError, match="client 0: the shares of client 2 fail authentication"):
        clients[0]._open(next(s for s in bad if (s.sender, s.recipient) == (2, 0)))
    # a revealed share of a client that never shared keys is refused by name, not a KeyError
    clients, adverts, sealed, _ = _setup(3, 2)
    inputs = {c.client: c.masked_input([s for s in sealed if s.recipient == c.client],
                                       fixedpoint.encode(np.zeros(LENGTH))) for c in clients}
    replies = {u: clients[u].unmask(sorted(inputs)) for u in inputs}
    replies[1][99] = ("s", (1, 5))
    with pytest.raises(FedtrakError, match="client 1 revealed a share of client 99, whose shares it was not given"):
        unmask_sum(adverts, inputs, replies, 2, LENGTH, CONTEXT)


def test_a_single_masked_vector_looks_uniform_and_hides_the_input():
    _, _, inputs = _run(10, 6, set())
    x0 = fixedpoint.encode(np.random.default_rng(10).uniform(-100, 100, size=(10, LENGTH))[0])
    y0 = inputs[0]
    assert chisquare(np.bincount(y0.view(np.uint8), minlength=256)).pvalue > 1e-4
    assert chisquare(np.bincount(x0.view(np.uint8), minlength=256)).pvalue < 1e-12
    # what the server holds of client 0 alone (its masked vector) is no closer to x0 than chance
    agree = np.mean(y0 == x0)
    assert agree < 1e-3

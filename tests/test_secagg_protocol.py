"""The secure-aggregation protocol as pure steps: exact sums for 3, 10 and 50 clients, dropouts up
to the threshold and a clear failure beyond it, tampered or replayed messages refused by name."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from scipy.stats import chisquare

from shared.errors import FedtrakError
from shared.secagg import fixedpoint
from shared.secagg.protocol import Client, unmask_sum

CONTEXT = b"run-7|checkpoint-0"
LENGTH = 64 * 65 // 2  # a Gram upper triangle at k = 64


def _setup(n: int, threshold: int, context: bytes = CONTEXT):
    identities = {i: Ed25519PrivateKey.generate() for i in range(n)}
    public = {i: k.public_key() for i, k in identities.items()}
    clients = [Client(i, identities[i], context) for i in range(n)]
    adverts = [c.advertise() for c in clients]
    sealed = [s for c in clients for s in c.share(adverts, public, threshold)]
    return clients, adverts, sealed, public


def _run(n: int, threshold: int, drop_before_input: set[int], drop_before_unmask: set[int] = frozenset()):
    clients, adverts, sealed, _ = _setup(n, threshold)
    x = np.random.default_rng(n).uniform(-100, 100, size=(n, LENGTH))
    inputs = {c.client: c.masked_input([s for s in sealed if s.recipient == c.client],
                                       fixedpoint.encode(x[c.client]))
              for c in clients if c.client not in drop_before_input}
    replies = {u: clients[u].unmask(sorted(inputs)) for u in inputs if u not in drop_before_unmask}
    total = unmask_sum(adverts, inputs, replies, threshold, LENGTH, CONTEXT)
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
    # shares tampered in transit fail authentication at their recipient
    clients, adverts, sealed, _ = _setup(3, 2)
    bad = [dataclasses.replace(s, ciphertext=bytes([s.ciphertext[0] ^ 1]) + s.ciphertext[1:])
           if (s.sender, s.recipient) == (2, 0) else s for s in sealed]
    clients[0].masked_input([s for s in bad if s.recipient == 0], fixedpoint.encode(np.zeros(LENGTH)))
    with pytest.raises(FedtrakError, match="client 0: the shares of client 2 fail authentication"):
        clients[0].unmask([0, 1, 2])


def test_a_single_masked_vector_looks_uniform_and_hides_the_input():
    _, _, inputs = _run(10, 6, set())
    x0 = fixedpoint.encode(np.random.default_rng(10).uniform(-100, 100, size=(10, LENGTH))[0])
    y0 = inputs[0]
    assert chisquare(np.bincount(y0.view(np.uint8), minlength=256)).pvalue > 1e-4
    assert chisquare(np.bincount(x0.view(np.uint8), minlength=256)).pvalue < 1e-12
    # what the server holds of client 0 alone (its masked vector) is no closer to x0 than chance
    agree = np.mean(y0 == x0)
    assert agree < 1e-3

"""Secure-aggregation building blocks: fixed-point sums mod 2^64 within the stated quantization
bound, Shamir t-of-n sharing, pairwise masks that cancel, masked vectors that look uniform."""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from scipy.stats import chisquare

from fedtrak.errors import FedtrakError
from fedtrak.secagg import fixedpoint, masks, shamir


@pytest.mark.parametrize("clients", [3, 10, 50])
def test_fixed_point_sum_is_within_the_quantization_bound(clients):
    rng = np.random.default_rng(clients)
    values = rng.uniform(-1000, 1000, size=(clients, 64 * 65 // 2))  # Gram upper triangles, k = 64
    total = np.zeros(values.shape[1], dtype=np.uint64)
    for v in values:
        total = total + fixedpoint.encode(v)
    err = np.abs(fixedpoint.decode(total) - values.sum(axis=0)).max()
    assert err <= fixedpoint.quantization_bound(clients) + 1e-9 * np.abs(values.sum(axis=0)).max()
    with pytest.raises(FedtrakError, match="NaN"):
        fixedpoint.encode(np.array([np.nan]))
    with pytest.raises(FedtrakError, match="does not fit"):
        fixedpoint.encode(np.array([1e15]))


def test_shamir_threshold():
    secret = bytes(range(32))
    shares = shamir.split(secret, num_shares=10, threshold=6)
    rng = np.random.default_rng(0)
    for _ in range(5):
        pick = [shares[i] for i in rng.choice(10, size=6, replace=False)]
        assert shamir.combine(pick, 32) == secret
    few = shares[:5]
    try:
        assert shamir.combine(few, 32) != secret
    except FedtrakError:
        pass  # or it does not even fit 32 bytes
    with pytest.raises(FedtrakError, match="threshold"):
        shamir.split(secret, 3, 4)
    with pytest.raises(FedtrakError, match="distinct"):
        shamir.combine([shares[0], shares[0]], 32)


def test_pairwise_masks_cancel_and_masked_vectors_look_uniform():
    n, length = 10, 4096
    keys = [X25519PrivateKey.generate() for _ in range(n)]
    context = b"run-1|checkpoint-0"
    seed_01 = masks.agreed_seed(keys[0], keys[1].public_key(), context)
    assert seed_01 == masks.agreed_seed(keys[1], keys[0].public_key(), context)
    assert seed_01 != masks.agreed_seed(keys[0], keys[1].public_key(), b"other round")
    rng = np.random.default_rng(1)
    values = rng.uniform(-50, 50, size=(n, length))
    self_seeds = [rng.bytes(32) for _ in range(n)]
    sent = []
    for i in range(n):
        pair = [masks.pairwise_mask(i, j, masks.agreed_seed(keys[i], keys[j].public_key(), context), length)
                for j in range(n) if j != i]
        sent.append(masks.masked(fixedpoint.encode(values[i]), self_seeds[i], pair))
    total = np.zeros(length, dtype=np.uint64)
    for s in sent:
        total = total + s
    for seed in self_seeds:  # the self masks, once their seeds are revealed
        total = total - masks.expand(seed, length)
    err = np.abs(fixedpoint.decode(total) - values.sum(axis=0)).max()
    assert err <= fixedpoint.quantization_bound(n) + 1e-12
    # one client's masked vector: its bytes are uniform; its plain encoding's are not
    observed = np.bincount(sent[0].view(np.uint8), minlength=256)
    assert chisquare(observed).pvalue > 1e-4
    plain = np.bincount(fixedpoint.encode(values[0]).view(np.uint8), minlength=256)
    assert chisquare(plain).pvalue < 1e-12

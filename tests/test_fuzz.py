"""Fuzzing: 1,000 random malformed or oversized payloads at each server-side validator and each
client handler. None crashes, none is accepted, and every rejection is a clear error naming the
payload's sender (the server's validators name the client; a client's error reply is its
handler's refusal of the server's message).

Each payload starts from a valid one and is broken by a mutation drawn at random from families
that always break it (a record or entry removed, an array of another shape or dtype, NaN or
infinity, values far beyond what clipping and noise allow, a field of the wrong type, ids and
keys that are not what the protocol says), with random positions, sizes and magnitudes.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict
from fuzzing import (
    DP,
    FINGERPRINT,
    INFO,
    SOURCE,
    K,
    N,
    bad_array,
    config_junk,
    fuzz,
    info_mutation,
    replace_array,
    structural,
)

from fedtrak import wire
from fedtrak.privacy.bounds import gram_limits, owner_limits
from fedtrak.privacy.mechanisms import noised_gram, noised_owner_summaries
from fedtrak.server.validation import features_release, gram_release, read_info, score_release
from fedtrak.trak.kernel import gram
from fedtrak.wire.codecs import pack_upper


def _rows(rng: np.random.Generator) -> np.ndarray:
    f = rng.normal(size=(N, K))
    return f / np.linalg.norm(f, axis=1, keepdims=True)  # clipped to C = 1


def test_fuzz_gram_releases():
    rng = np.random.default_rng(0)
    g = noised_gram(gram(_rows(rng)), DP, rng)
    valid = wire.encode_grams_reply({0: pack_upper(g)}, INFO)
    limits = gram_limits(DP, N, K)

    def validate(content: RecordDict) -> object:
        read_info(content, SOURCE, FINGERPRINT)
        return gram_release(content, [0], K, SOURCE, noiseless=False, limits=limits)

    def bad_gram(content: RecordDict, rng: np.random.Generator) -> RecordDict:
        packed = wire.decode_grams(content, SOURCE)[0]
        return replace_array(content, wire.attribution.GRAMS, "0", bad_array(packed, rng))

    def not_a_gram(content: RecordDict, rng: np.random.Generator) -> RecordDict:
        scale = 10.0 ** rng.uniform(3, 12)
        matrix = rng.choice([-1.0, 1.0]) * scale * (np.eye(K) if rng.random() < 0.5 else np.ones((K, K)) - np.eye(K))
        return replace_array(content, wire.attribution.GRAMS, "0", pack_upper(matrix))

    def other_checkpoint(content: RecordDict, rng: np.random.Generator) -> RecordDict:
        arrays = {str(int(rng.integers(1, 9))): pack_upper(g)} if rng.random() < 0.5 else {"x": pack_upper(g)}
        out = RecordDict(dict(content.items()))
        out[wire.attribution.GRAMS] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
        return out

    fuzz(valid, validate, [bad_gram, not_a_gram, other_checkpoint, structural, info_mutation], 1)


def test_fuzz_score_releases_under_dp():
    rng = np.random.default_rng(2)
    us = [rng.normal(size=(3, K))]
    groups = np.ones((1, 3), dtype=bool)
    limits = owner_limits(DP, N, K, [groups.astype(float) @ us[0]], value_clip=0.5, suspect_count=True)
    release = wire.ScoreRelease(owner_summaries=noised_owner_summaries(_rows(rng).sum(axis=0, keepdims=True), DP, rng),
                                screening=np.array([3.0]), owner_values=np.array([1.0]))
    valid = wire.encode_score_reply(release, INFO)

    def validate(content: RecordDict) -> object:
        read_info(content, SOURCE, FINGERPRINT)
        return score_release(content, "owner-totals", 3, N, SOURCE, True, True, us, groups, limits)

    def bad_field(content: RecordDict, rng: np.random.Generator) -> RecordDict:
        name = str(rng.choice(["owner_summaries", "screening", "owner_values"]))
        return replace_array(content, wire.attribution.RELEASED, name, bad_array(getattr(release, name), rng))

    def unknown_field(content: RecordDict, rng: np.random.Generator) -> RecordDict:
        return replace_array(content, wire.attribution.RELEASED, f"extra_{int(rng.integers(99))}", np.ones(2))

    fuzz(valid, validate, [bad_field, unknown_field, structural, info_mutation], 3)


def test_fuzz_features_releases():
    rng = np.random.default_rng(4)
    f = _rows(rng).astype(np.float32)
    q = rng.uniform(0, 1, N).astype(np.float32)
    w = rng.uniform(0, 0.25, N).astype(np.float32)
    valid = wire.encode_features_reply(np.arange(N), {0: (f, q, w)}, INFO)

    def validate(content: RecordDict) -> object:
        read_info(content, SOURCE, FINGERPRINT)
        return features_release(content, [0], K, N, SOURCE, weight_bound=0.25)

    def bad_field(content: RecordDict, rng: np.random.Generator) -> RecordDict:
        name, value = [("features-0", f), ("out-to-loss-0", q), ("curvature-0", w), ("indices", np.arange(N))][
            int(rng.integers(4))]
        broken = bad_array(value, rng, huge=name != "features-0")
        if name == "indices" and broken.dtype == np.float64 and broken.shape == (N,):
            broken = broken.astype(np.float32)  # indices must be integers
        return replace_array(content, wire.attribution.FEATURES, name, broken)

    def weights_out_of_range(content: RecordDict, rng: np.random.Generator) -> RecordDict:
        name, top = ("out-to-loss-0", 1.0) if rng.random() < 0.5 else ("curvature-0", 0.25)
        broken = rng.uniform(0, top, N).astype(np.float32)
        broken[int(rng.integers(N))] = rng.choice([-1.0, 1.0]) * top * rng.uniform(1.01, 1e6)
        return replace_array(content, wire.attribution.FEATURES, name, broken)

    fuzz(valid, validate, [bad_field, weights_out_of_range, structural, info_mutation], 5)


def test_fuzz_secure_aggregation_messages():
    """The server's checks of advertisements, sealed shares, masked inputs and revealed shares."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from fedtrak.secagg.protocol import Client, raw_public
    from fedtrak.server.secure_aggregation import (
        _checked_advert,
        _checked_revealed,
        _checked_sealed,
    )
    from fedtrak.wire import secagg as sw

    context = b"fuzz"
    clients = [Client(n, Ed25519PrivateKey.generate(), context) for n in (7, 8, 9)]
    adverts = [(c.advertise(), raw_public(c.identity.public_key())) for c in clients]
    identities = {c.client: c.identity.public_key() for c in clients}
    sealed = {c.client: c.share([a for a, _ in adverts], identities, 2) for c in clients}
    inbox = {u: [s for ss in sealed.values() for s in ss if s.recipient == u] for u in identities}
    length = 50
    masked = {c.client: c.masked_input(inbox[c.client], np.zeros(length, dtype=np.uint64)) for c in clients}
    revealed = clients[0].unmask([7, 8])  # 9 dropped: its s share, the others' b shares

    def flipped_signature(content: RecordDict, rng: np.random.Generator) -> RecordDict:
        advert, identity = sw.read_advert_reply(content, SOURCE)
        i = int(rng.integers(len(advert.signature)))
        signature = advert.signature[:i] + bytes([advert.signature[i] ^ int(rng.integers(1, 256))]) + advert.signature[i + 1:]
        return sw.advert_reply(Advertisement(advert.client, advert.c_public, advert.s_public, signature), identity)

    def other_client(content: RecordDict, rng: np.random.Generator) -> RecordDict:
        advert, identity = sw.read_advert_reply(content, SOURCE)
        return sw.advert_reply(Advertisement(int(rng.integers(10, 10**9)), advert.c_public, advert.s_public,
                                             advert.signature), identity)

    from fedtrak.secagg.protocol import Advertisement

    fuzz(sw.advert_reply(*adverts[0]), lambda c: _checked_advert(c, 7, context, SOURCE),
          [flipped_signature, other_client, structural, config_junk], 6)

    def misaddressed(content: RecordDict, rng: np.random.Generator) -> RecordDict:
        shares = sw.read_sealed(content, SOURCE)
        i = int(rng.integers(len(shares)))
        field = "sender" if rng.random() < 0.5 else "recipient"
        shares[i] = dataclasses.replace(shares[i], **{field: int(rng.integers(10, 10**6))})
        return sw.sealed_content(shares)

    import dataclasses

    fuzz(sw.sealed_content(sealed[7]), lambda c: _checked_sealed(c, 7, [7, 8, 9], SOURCE),
          [misaddressed, structural, config_junk], 7)

    def bad_vector(content: RecordDict, rng: np.random.Generator) -> RecordDict:
        vector = sw.masked_vector(content, SOURCE)
        kind = int(rng.integers(3))
        broken = (vector[: int(rng.integers(length))] if kind == 0 else
                  np.append(vector, vector[: int(rng.integers(1, 5))]) if kind == 1 else vector.astype(np.float64))
        return replace_array(content, sw.MASKED, "vector", broken)

    fuzz(sw.masked_content(masked[7]), lambda c: sw.read_masked(c, length, SOURCE), [bad_vector, structural], 8)

    def wrong_share(content: RecordDict, rng: np.random.Generator) -> RecordDict:
        shares = sw.read_revealed(content, SOURCE)
        peer = sorted(shares)[int(rng.integers(len(shares)))]
        kind, share = shares[peer]
        if rng.random() < 0.5:
            shares[peer] = ("s" if kind == "b" else "b", share)
        else:
            shares[int(rng.integers(10, 10**6))] = shares.pop(peer)
        return sw.revealed_content(shares)

    fuzz(sw.revealed_content(revealed), lambda c: _checked_revealed(c, [7, 8, 9], [7, 8], SOURCE),
          [wrong_share, config_junk], 9)


def test_fuzz_norm_histograms():
    from fedtrak.server.validation import histogram_release

    valid = wire.encode_histogram_reply(np.arange(8.0), INFO)

    def bad_histogram(content: RecordDict, rng: np.random.Generator) -> RecordDict:
        counts = wire.decode_histogram(content, SOURCE)
        return replace_array(content, wire.attribution.HISTOGRAM, wire.attribution.COUNTS,
                              bad_array(counts, rng, huge=False))

    def validate(content: RecordDict) -> object:
        read_info(content, SOURCE, FINGERPRINT)
        return histogram_release(content, 8, SOURCE)

    fuzz(valid, validate, [bad_histogram, structural, info_mutation], 10)

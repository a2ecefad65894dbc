"""Pairwise and self masks over uint64 vectors, expanded from seeds with ChaCha20.

Two clients derive the same 32-byte seed from X25519 key agreement and
HKDF-SHA256 (bound to a context string, e.g. the run and round); the seed is
expanded into a uint64 mask stream with the ChaCha20 keystream. Client i adds
``+mask(i, j)`` for every neighbour j > i and ``-mask(j, i)`` for j < i, so the
pairwise masks cancel in the sum mod 2^64; a self mask from its own random
seed hides the vector until the seed is revealed.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SEED_BYTES = 32


def agreed_seed(private: X25519PrivateKey, peer: X25519PublicKey, context: bytes) -> bytes:
    """The 32-byte seed two clients share: HKDF-SHA256 of their X25519 shared secret."""
    shared = private.exchange(peer)
    return HKDF(algorithm=hashes.SHA256(), length=SEED_BYTES, salt=None,
                info=b"fedtrak secagg pairwise mask|" + context).derive(shared)


def expand(seed: bytes, length: int) -> np.ndarray:
    """``length`` uint64 values of the ChaCha20 keystream of ``seed`` (nonce 0: one stream per seed)."""
    cipher = Cipher(algorithms.ChaCha20(seed, b"\x00" * 16), mode=None).encryptor()
    return np.frombuffer(cipher.update(b"\x00" * (8 * length)), dtype="<u8").astype(np.uint64)


def pairwise_mask(me: int, peer: int, seed: bytes, length: int) -> np.ndarray:
    """What client ``me`` adds for its pair with ``peer``: ``+stream`` if ``me < peer``, else ``-stream``."""
    stream = expand(seed, length)
    return stream if me < peer else (np.uint64(0) - stream)


def masked(values: np.ndarray, self_seed: bytes, pair_masks: list[np.ndarray]) -> np.ndarray:
    """``values + self mask + sum of pairwise masks`` mod 2^64."""
    out = np.asarray(values, dtype=np.uint64) + expand(self_seed, len(values))
    for m in pair_masks:
        out = out + m
    return out

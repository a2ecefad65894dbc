"""Building blocks of secure aggregation (Bonawitz et al., CCS 2017).

Vetted primitives from the ``cryptography`` package only (X25519, HKDF-SHA256,
ChaCha20, AES-GCM, Ed25519), composed: fixed-point encoding mod 2^64
(``fixedpoint``), Shamir t-of-n secret sharing (``shamir``), pairwise and self
masks expanded from agreed seeds (``masks``), the four protocol rounds as
pure client and server steps (``protocol``), the SecAgg+ neighbour graph
(``graph``) and the rounds' Flower message contents (``messages``). The
handlers that run them are in ``fedtrak.client.app`` / ``fedtrak.client.secure_aggregation``
and ``fedtrak.server.secure_aggregation``; the distributed DP noise is in
``fedtrak.privacy.distributed``.
"""

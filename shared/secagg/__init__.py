"""Building blocks of secure aggregation (Bonawitz et al., CCS 2017; DESIGN.md section 5).

Vetted primitives from the ``cryptography`` package only (X25519, HKDF-SHA256,
ChaCha20), composed: fixed-point encoding mod 2^64 (``fixedpoint``), Shamir
t-of-n secret sharing (``shamir``) and pairwise and self masks expanded from
agreed seeds (``masks``). The protocol rounds on Flower messages are not built
yet.
"""

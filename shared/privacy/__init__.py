"""Differential privacy: clipping, noised releases and their accounting.

``mechanisms`` holds every noised release a client can make, each beside the
ledger entry that accounts for it; ``accountant`` composes a run's entries
into (epsilon, delta) and inverts that for a target epsilon.
"""

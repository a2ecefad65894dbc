"""How a run's privacy budget is split between its kinds of release.

A run's releases compose: under Gaussian differential privacy each
mechanism of noise multiplier ``sigma_r`` spends ``1 / sigma_r^2`` of the
budget ``mu^2`` (``epsilon = eps_from_mu(mu, delta)``). The rule: every
*kind* of release present in the run (Grams, owner summaries, owner values,
the suspect count, ...) gets a share of ``mu^2`` in proportion to its
weight, and its mechanisms (one per checkpoint for Grams and summaries)
split that share equally. A kind of ``count`` mechanisms with share ``w``
then has the noise multiplier ``s sqrt(count / w)``, where ``s`` is the
run's *base* noise multiplier (the sigma one release would need alone to
spend the whole budget): the server resolves ``s`` from the target epsilon,
the clients receive the per-kind multipliers.

The default weight is 1 for every kind but the suspect count's, 3: equal shares
per kind, rather than per mechanism, keep a single number (an owner value, a
suspect count) from being drowned by the ``M`` checkpoints' summaries and
Grams. The example count gets a full share too: owners' fractions and means
divide by their noised counts, and a count of 150 noised at a small share's
sigma (tens of examples) made clean owners look like mislabeled ones in our
measurements. The suspect count (released only by a run that screens for
mislabeled data) gets three: its signal is the few flipped examples an owner
holds, and on digits-logreg (10 owners of 150, 10% flipped on half of them,
epsilon 1, 6 noise draws each) owner screening AUROC was 0.94 on average at
weight 1, 0.95 at 2 and 0.98 at 3, while the owner summaries keep a fifth of
the budget. A run made for one purpose says so with ``budget``:
``suspects=8`` gives mislabel screening 8 times the weight of each other
release, ``suspects=1`` equal shares.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from fedtrak.errors import FedtrakError
from fedtrak.privacy.kinds import (  # noqa: F401 - the kinds' names, re-exported
    BUDGET_KINDS,
    COUNT,
    FEATURES,
    GRAM,
    HISTOGRAM,
    SUMMARY,
    SUSPECTS,
    VALUE,
)
from fedtrak.privacy.kinds import KINDS as KIND_REGISTRY

#: The kinds of release a run's budget is split over, as ``budget`` names them (:mod:`fedtrak.privacy.kinds`).
KINDS = BUDGET_KINDS

#: Every kind's default weight: equal shares, three for the suspect count (module docstring).
DEFAULT_WEIGHTS = {name: KIND_REGISTRY[name].weight for name in KINDS}


def parse_pairs(text: str, what: str) -> dict[str, float]:
    """``"kind=number,kind=number"`` as a dict, every kind known and every number finite and >= 0.

    Raises:
        FedtrakError: naming the malformed pair, the unknown kind or the bad number.
    """
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        kind, sep, value = part.partition("=")
        kind = kind.strip()
        if not sep or kind not in KINDS:
            raise FedtrakError(f"{what}: {part!r} is not KIND=NUMBER with KIND one of {', '.join(KINDS)}")
        try:
            number = float(value)
        except ValueError:
            raise FedtrakError(f"{what}: {part!r}: {value.strip()!r} is not a number") from None
        if not (math.isfinite(number) and number >= 0):
            raise FedtrakError(f"{what}: {part!r}: the number must be finite and >= 0")
        out[kind] = number
    return out


def budget_weights(budget: str | None) -> dict[str, float]:
    """The default weights with the user's ``budget`` (``"suspects=8,count=2"``) over them."""
    return {**DEFAULT_WEIGHTS, **parse_pairs(budget or "", "budget")}


def kind_scales(counts: Mapping[str, int], weights: Mapping[str, float]) -> dict[str, float]:
    """Each present kind's noise multiplier relative to the base: ``sqrt(count / share)``, with
    ``share`` its weight over the present kinds' total weight (``counts``: mechanisms per kind).

    Raises:
        FedtrakError: if a kind the run releases has weight 0.
    """
    present = {k: c for k, c in counts.items() if c > 0}
    zero = sorted(k for k in present if not weights[k] > 0)
    if zero:
        raise FedtrakError(f"budget: the run releases {', '.join(zero)}, whose weight is 0")
    total = sum(weights[k] for k in present)
    return {k: math.sqrt(c * total / weights[k]) for k, c in present.items()}


@dataclass(frozen=True)
class Scales:
    """Each kind of release's noise multiplier relative to the run's base one (:func:`kind_scales`),
    kinds in sorted order; a kind not named gets 1. Hashable, so a :class:`DPSettings` holding it
    stays a cache key. Text (``"gram=4.5,count=20.1"``) only at the wire and in the run summary:
    :meth:`text` and :meth:`parse`."""

    pairs: tuple[tuple[str, float], ...] = ()

    @classmethod
    def of(cls, scales: Mapping[str, float]) -> Scales:
        """The scales of a ``{kind: scale}`` mapping."""
        return cls(tuple(sorted((k, float(v)) for k, v in scales.items())))

    @classmethod
    def parse(cls, text: str) -> Scales:
        """Back from :meth:`text`.

        Raises:
            FedtrakError: naming a malformed pair, an unknown kind or a bad number.
        """
        return cls.of(parse_pairs(text, "budget scales"))

    def text(self) -> str:
        """The ``"kind=number,..."`` text a job record and the run summary carry (full float precision)."""
        return ",".join(f"{k}={v!r}" for k, v in self.pairs)

    def get(self, kind: str) -> float:
        """The scale of ``kind`` (1 where it is not named)."""
        return dict(self.pairs).get(kind, 1.0)

    def __bool__(self) -> bool:
        return bool(self.pairs)


#: No split: every kind of release gets the base noise multiplier.
EQUAL_SCALES = Scales()


def kinds_of(counts: Iterable[tuple[str, int]]) -> dict[str, int]:
    """Mechanisms per kind, summed over ``(kind, count)`` entries."""
    out: dict[str, int] = {}
    for kind, count in counts:
        out[kind] = out.get(kind, 0) + count
    return out

"""Every kind of release a device can make, each described once: one object per kind.

A :class:`ReleaseKind` holds what the rest of fedtrak derives its privacy
handling from: the kind's name (as ``budget`` and the device's ledger name
it), its default budget weight, the noise it carries and the sensitivity that
noise is scaled to (computed on the device from what the device itself knows),
the mechanism its accountant composes, whether it is made once per checkpoint,
the message field it travels in and the server's size check. The release plan
(:func:`fedtrak.privacy.mechanisms.release_plan`), the budget's kinds
(:mod:`fedtrak.privacy.budget`), the device's allowed releases and ledger items
(:mod:`fedtrak.client.contract`) and the release table of the docs
(:func:`release_table`) are all read from :data:`KINDS`.

A new kind of release touches four files: this one (its entry in :data:`KINDS`
and the line of :func:`planned_counts` that says when a run makes it), the
device's function that computes and noises it (:mod:`fedtrak.client.releases`,
through :meth:`fedtrak.client.node.Local.release`, which checks it against the
bound job and charges it), its field in the wire format
(:class:`fedtrak.wire.ScoreRelease` or the featurize reply) and the server's
check of it (:mod:`fedtrak.server.validation`).
"""

from __future__ import annotations

from dataclasses import dataclass

from fedtrak.errors import FedtrakError


@dataclass(frozen=True)
class ReleaseKind:
    """One kind of release.

    Attributes:
        name: the budget's and the ledger's name for it (``gram``, ``summary``, ...).
        title: how the ledger and the run summary name one release of it.
        weight: its default share of a run's budget (:mod:`fedtrak.privacy.budget`); 0 for a
            kind outside the attribution budget (training's model updates).
        noise: the noise it carries, in words.
        sensitivity: how far one example can move it (the noise's scale), in words.
        mechanism: the accountant that composes it (:data:`fedtrak.privacy.accountant.MECHANISMS`).
        per_checkpoint: made once per checkpoint (once for all of them under joint clipping);
            otherwise once per run.
        wire: the message field it travels in.
        server_check: what the server checks before it uses one.
    """

    name: str
    title: str
    weight: float
    noise: str
    sensitivity: str
    mechanism: str
    per_checkpoint: bool
    wire: str
    server_check: str

    @property
    def budgeted(self) -> bool:
        """Whether a run's attribution budget is split over this kind."""
        return self.weight > 0


GRAM, COUNT, SUMMARY, VALUE, SUSPECTS, HISTOGRAM, FEATURES, UPDATE = (
    "gram", "count", "summary", "value", "suspects", "histogram", "features", "update")

#: Every kind of release, by name (see the module docstring).
KINDS: dict[str, ReleaseKind] = {k.name: k for k in (
    ReleaseKind(HISTOGRAM, "norm histogram (clip quantile)", 1.0, "sigma per bin", "1", "gaussian", False,
                "query.featurize reply, fedtrak.norm-histogram", "bin count and finiteness"),
    ReleaseKind(GRAM, "Gram", 1.0, "sigma C^2 w on the upper triangle, mirrored (secure sum: Skellam)",
                "C^2 w (w: the kernel's weight bound, computed on the device from its task)", "gaussian", True,
                "query.featurize reply, fedtrak.grams (or the masked secure-sum input)",
                "shape, symmetry, diagonal, trace and entries within n C^2 w plus the noise's tail"),
    ReleaseKind(COUNT, "example count", 1.0, "sigma", "1", "gaussian", False,
                "every reply's fedtrak.info num-examples (and the secure sum's last slot)",
                "an integer in [0, 1e12]; the secure sum's count equals the survivors' counts"),
    ReleaseKind(SUMMARY, "owner summary", 1.0, "sigma C per coordinate", "C (qbar <= 1, ||phi|| <= C)",
                "gaussian", True, "query.score reply, fedtrak.released owner_summaries",
                "norm at most n C plus the noise's tail"),
    ReleaseKind(SUSPECTS, "suspect count", 3.0, "sigma (self-influence sum: sigma C^2 mean_m ||K_m^-1||_2)",
                "1: each example is one suspect or none (self-influence sum: C^2 mean_m ||K_m^-1||_2)",
                "gaussian", False, "query.score reply, fedtrak.released screening",
                "within [0, n] plus the noise's tail"),
    ReleaseKind(VALUE, "owner value", 1.0, "sigma B per group", "B, each example's share clipped to the server's "
                "bound (else C mean_m ||Ubar_m||_2)", "gaussian", False,
                "query.score reply, fedtrak.released owner_values", "norm at most n B plus the noise's tail"),
    ReleaseKind(FEATURES, "features", 1.0, "sigma C per coordinate; weights sigma, clamped to [0, 1]",
                "2C per checkpoint (replace one example); weights 1", "gaussian", True,
                "query.features reply, fedtrak.features", "shapes and finiteness"),
    ReleaseKind(UPDATE, "model update (DP-SGD round)", 0.0, "sigma_train x clip on each summed batch gradient "
                "(Opacus)", "the DP-SGD clip norm per step, Poisson-sampled at batch / n", "subsampled-gaussian",
                False, "train reply, fedtrak.weights", "Flower FedAvg: array shapes"),
)}

#: The kinds a run's attribution budget is split over, as ``budget`` names them.
BUDGET_KINDS = tuple(name for name, kind in KINDS.items() if kind.budgeted)


def planned_counts(mode: str, checkpoints: int, joint: bool, self_influence: bool, clip_quantile: bool = False,
                   gram_released: bool = True, owner_value: bool = False) -> dict[str, int]:
    """How many releases of each kind  one run makes, per client:
    per-checkpoint kinds once per checkpoint (once for all under ``joint`` clipping), the others once.
    Attribution only; training's model updates are planned by :mod:`fedtrak.privacy.training`."""
    per_checkpoint = 1 if joint else checkpoints
    counts = {HISTOGRAM: int(clip_quantile)}
    if mode == "features":  # the count and indices leave exactly (replace-one adjacency)
        return {**counts, FEATURES: checkpoints}
    return {**counts, GRAM: per_checkpoint if gram_released else 0, COUNT: 1, SUMMARY: per_checkpoint,
            SUSPECTS: int(self_influence), VALUE: int(owner_value)}


def kind(name: str) -> ReleaseKind:
    """The kind called ``name``.

    Raises:
        FedtrakError: naming an unknown kind and the known ones.
    """
    try:
        return KINDS[name]
    except KeyError:
        raise FedtrakError(f"unknown kind of release {name!r}; known: {', '.join(KINDS)}") from None


def release_table() -> str:
    """The release table of the docs (Markdown), made from :data:`KINDS`."""
    rows = ["| release | name | noise | sensitivity | accountant | made | travels in | server checks |",
            "|---|---|---|---|---|---|---|---|"]
    for k in KINDS.values():
        made = "per checkpoint" if k.per_checkpoint else "once per run" if k.name != UPDATE else "per round"
        cells = [k.title, f"`{k.name}`", k.noise, k.sensitivity, k.mechanism, made, k.wire, k.server_check]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows) + "\n"

"""The end of a run's output: its answer, in a few lines a person reads.

For the first queries, the owners that drove the prediction most and their share of it, and the
top training examples where the run released scores; then the privacy line and the next commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from fedtrak.results.summary import RunSummary

#: Queries shown, and owners and examples per query.
QUERIES, OWNERS, EXAMPLES = 3, 3, 3


def owner_shares(totals: np.ndarray) -> np.ndarray:
    """Each owner's share of a query's positive attribution (its positive total over the sum of all
    owners' positive totals; 0 where no owner has a positive total)."""
    positive = np.maximum(np.asarray(totals, dtype=np.float64), 0.0)
    return positive / positive.sum() if positive.sum() > 0 else positive


def answer_lines(out: Path, summary: RunSummary) -> list[str]:
    """The answer of the run in ``out`` (its ``summary``), as lines of text."""
    lines = []
    totals = np.load(out / "owner_scores.npy") if (out / "owner_scores.npy").is_file() else None
    names = [o.owner for o in summary.owners]
    top_idx = np.load(out / "topk_indices.npy") if (out / "topk_indices.npy").is_file() else None
    ids = np.load(out / "example_ids.npy") if (out / "example_ids.npy").is_file() else None
    if totals is not None:
        names = names if len(names) == totals.shape[1] else [str(i) for i in range(totals.shape[1])]
        lines.append("top owners per query (share of the positive attribution):")
        for q in range(min(QUERIES, totals.shape[0])):
            shares = owner_shares(totals[q])
            best = [i for i in np.argsort(-totals[q], kind="stable")[:OWNERS] if shares[i] > 0]
            owners = ", ".join(f"owner {names[i]} {shares[i]:.0%}" for i in best) or "no owner raises it"
            examples = ""
            if top_idx is not None and ids is not None:
                cols = top_idx[q][:EXAMPLES]
                examples = "; top examples: " + ", ".join(
                    f"#{int(ids['index'][c])} (owner {names[int(ids['client'][c])] if int(ids['client'][c]) < len(names) else int(ids['client'][c])})"
                    for c in cols)
            lines.append(f"  query {q}: {owners}{examples}")
    lines.append(privacy_line(summary))
    lines.append(f"next: fedtrak report {out} | fedtrak evaluate {out} | fedtrak attack {out}")
    return lines


def privacy_line(summary: RunSummary) -> str:
    """The run's privacy in one line: its epsilon, or that nothing was noised."""
    privacy = summary.privacy
    if privacy is not None and privacy.dp:
        eps = "unbounded" if privacy.epsilon is None else f"{privacy.epsilon:.3g}"
        return (f"privacy: epsilon {eps} at delta {privacy.delta:g} for the whole run (sigma "
                f"{privacy.noise_multiplier:.3g}, clip {privacy.clip_norm:g}; not covered: "
                f"{'; '.join(privacy.not_covered) or 'nothing'})")
    if summary.mode == "central":
        return "privacy: none (the centralized reference: all data in one place)"
    return ("privacy: no noise (every release is exact; --epsilon E, or epsilon=E in a run config, makes the "
            "run E-differentially private)")

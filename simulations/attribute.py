"""The centralized reference path: TRAK on the pooled training data.

``fedtrak attribute`` trains (or loads) M checkpoints, featurizes every
training example in global-id order (the same owners the federated runs
use), builds one kernel per checkpoint, scores the task's query set and
writes the run folder described in :mod:`shared.results`. The federated
modes must reproduce its numbers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from server.scoring import score_features
from shared.checkpoints import load_checkpoints, train_checkpoints
from shared.corruption import FlipSpec, corrupted, flip_spec, flipped_indices
from shared.featurizer import Features, Featurizer
from shared.partition import partition
from shared.projectors import make_projector
from shared.results import ResultWriter, add_score_arrays, add_self_influence, flips_block
from shared.scoring import owner_means, owner_totals
from shared.settings import ScoreSettings
from shared.tasks import DEFAULT_TASK, Task, load_task
from shared.timing import PhaseTimer, peak_memory_mb


@dataclass
class AttributeConfig:
    """Settings of one attribution run (the CLI flags of ``fedtrak attribute``).

    ``seed`` is the base seed of both training (checkpoint m: ``seed + m``) and
    projection; ``score`` holds how features are made and combined.
    """

    out: Path
    task: str = DEFAULT_TASK
    clients: int = 10
    partition: str = "iid"
    alpha: float = 0.5
    partition_seed: int = 0
    checkpoints: int = 3
    checkpoint_dir: Path | None = None
    epochs: int | None = None
    train_size: int | None = None
    query_size: int | None = None
    topk: int = 10
    progress: bool = True
    score: ScoreSettings = field(default_factory=ScoreSettings)
    self_influence: bool = False
    flip_fraction: float = 0.0
    flip_clients: str = ""

    @property
    def seed(self) -> int:
        """The run's base seed (the projection seed of ``score``)."""
        return self.score.seed

    def flips(self) -> FlipSpec:
        """The label flips of a mislabel experiment (as :meth:`server.config.RunConfig.flips`)."""
        return flip_spec(self.flip_fraction, self.flip_clients, self.clients, self.seed)


def obtain_checkpoints(task: Task, cfg: AttributeConfig, timer: PhaseTimer) -> list:
    """Load checkpoints from ``cfg.checkpoint_dir`` or train them into ``OUT/checkpoints``."""
    if cfg.checkpoint_dir is not None:
        with timer.phase("load_checkpoints"):
            return load_checkpoints(task, Path(cfg.checkpoint_dir), cfg.checkpoints)
    ckpt_dir = Path(cfg.out) / "checkpoints"
    with timer.phase("train"), tqdm(
        total=cfg.checkpoints, desc="train checkpoints", disable=not cfg.progress
    ) as bar:
        train_checkpoints(task, cfg.checkpoints, ckpt_dir, base_seed=cfg.seed, epochs=cfg.epochs,
                          progress=bar.update)
    return load_checkpoints(task, ckpt_dir, cfg.checkpoints)


def central_scores(
    task: Task,
    states: list,
    x_train: np.ndarray,
    y_train: np.ndarray,
    settings: ScoreSettings,
    timer: PhaseTimer | None = None,
    progress: bool = False,
    self_influence: bool = False,
) -> tuple[np.ndarray, list[dict], np.ndarray | None]:
    """TRAK scores of the task's queries against ``(x_train, y_train)`` on pooled data.

    ``states`` are the checkpoints' state dicts (checkpoint m projects with
    ``derive_seed(settings.seed, m)``). Returns ``(scores (Q, n), per-checkpoint
    records, self-influence (n,) or None)``.
    """

    def featurize(m: int, featurizer: Featurizer) -> Features:
        with tqdm(total=len(y_train), desc=f"featurize ckpt {m}", unit="ex", disable=not progress) as bar:
            return featurizer.featurize(x_train, y_train, progress=bar.update)

    return score_features(task, states, len(y_train), featurize, settings, timer, self_influence)


def run_attribute(cfg: AttributeConfig) -> dict:
    """Run the centralized reference attribution and write its run folder.

    Returns the summary written to ``summary.json``.

    Raises:
        FedtrakError: on any bad input; no result files are left in that case
            (checkpoints already trained are kept for reuse).
    """
    timer = PhaseTimer()
    with timer.phase("load_task"):
        task = load_task(cfg.task, cfg.train_size, cfg.query_size)
        parts = partition(task.y_train, cfg.clients, cfg.partition, cfg.alpha, cfg.partition_seed)
        order = parts.order()
        flips = cfg.flips()
        flips.validate(parts.num_clients)
        flipped = flipped_indices(task.y_train, parts, flips)
        task = corrupted(task, parts, flips)
        # Check the projection settings before spending time on training.
        make_projector(cfg.score.projector, task.num_params, cfg.score.proj_dim, cfg.seed, cache_bytes=0,
                       model=task.make_model())
    checkpoints = obtain_checkpoints(task, cfg, timer)
    writer = ResultWriter(Path(cfg.out))
    try:
        self_wanted = cfg.self_influence or flips.active
        scores, records, self_infl = central_scores(
            task, [state for _, state in checkpoints], task.x_train[order], task.y_train[order],
            cfg.score, timer, cfg.progress, self_wanted,
        )
        for rec, (info, _) in zip(records, checkpoints):
            rec["file"] = info.file
        with timer.phase("write"):
            add_score_arrays(writer, scores, parts.example_ids(),
                             owner_totals(scores, parts.owners(), parts.num_clients), cfg.topk)
            add_self_influence(writer, self_infl, None if self_infl is None else
                               owner_means(self_infl, parts.owners(), parts.num_clients))
            if flips.active:
                writer.add_array("flipped", flipped)
        summary = {
            "mode": "central",
            "task": task.name,
            "num_train": len(order),
            "num_queries": len(task.y_query),
            "num_params": records[0]["num_params"],
            "proj_dim": records[0]["proj_dim"],
            "projector": cfg.score.projector,
            "num_checkpoints": len(checkpoints),
            "normalization": cfg.score.normalize,
            "ensemble": "mean kernel term x mean out-to-loss (TRAK Algorithm 1)",
            "score_sign": "positive = training example raises the query's margin",
            "lambda": [r["lambda"] for r in records],
            "checkpoints": records,
            "partition": parts.describe(),
            **flips_block(flips, flipped),
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
            "seconds": timer.report(),
            "peak_memory_mb": peak_memory_mb(),
        }
        writer.commit(summary)
        return summary
    except BaseException:
        writer.discard()
        raise

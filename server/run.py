"""The server's side of one federated attribution run (DESIGN.md section 3).

1. Wait for the clients; obtain M checkpoints (FedAvg through Flower,
   centralized training in simulation, or a checkpoint folder).
2. ``private`` mode: ``query.featurize`` sends every checkpoint; clients
   reply with Gram matrices (with ``secure-agg``, signed keys, then three
   more rounds deliver only their masked sum: :mod:`server.secure_aggregation`),
   which the server sums into ``K_m`` (kept in ``OUT/.resume`` so that a run
   that dies can be resumed: :mod:`server.resume`), solves and uses to
   precondition its queries; ``query.score`` sends ``U_m`` and
   clients release what the policy allows (owner totals; with ``full``, their
   score matrices).
   ``features`` mode: ``query.features``; clients send their features and
   the server scores centrally.
3. Write the run folder in the centralized path's format, with per-phase
   seconds, bytes per client and the clients that were excluded.
"""

from __future__ import annotations

import logging
import math
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, RecordDict
from flwr.serverapp import Grid

from server.config import RunConfig
from server.federation import CountingGrid, Federation, wait_for_nodes
from server.resume import RunState, SavedKernels
from server.scoring import score_features, solve_checkpoint
from server.secure_aggregation import SecureSum, secure_gram_sum
from server.training import train_fedavg_checkpoints, training_privacy
from server.validation import features_release, gram_release, score_release
from shared.checkpoints import CheckpointInfo, load_checkpoints, train_checkpoints
from shared.codecs import pack_upper
from shared.corruption import corrupted, flipped_indices
from shared.errors import FedtrakError
from shared.featurizer import Features, Featurizer
from shared.partition import example_ids, partition
from shared.privacy.accountant import epsilon, prv_epsilon
from shared.privacy.distributed import DistributedNoise
from shared.privacy.mechanisms import NOISE_FLOOR_FACTOR, DPSettings, noise_floor
from shared.privacy.quantile import NORM_EDGES, quantile_from_histogram
from shared.projectors import make_projector
from shared.protocol import (
    CLIP_KEY,
    FEATURES,
    FEATURIZE,
    JOB_KEY,
    SCORE,
    SCORE_KEY,
    JobSpec,
    arrays_to_record,
    checkpoint_key,
    record_arrays,
    state_to_record,
)
from shared.results import ResultWriter, add_score_arrays, add_self_influence, flips_block
from shared.scoring import owner_means, owner_totals
from shared.settings import checkpoint_featurizer
from shared.tasks import Task, cached_task
from shared.timing import PhaseTimer, peak_memory_mb

log = logging.getLogger("fedtrak.server")

States = list[dict[str, torch.Tensor]]


def obtain_checkpoints(grid: CountingGrid, task: Task, cfg: RunConfig, job: JobSpec, num_nodes: int,
                       timer: PhaseTimer, reuse: bool = False) -> list[tuple[CheckpointInfo, dict[str, torch.Tensor]]]:
    """Load ``cfg.checkpoint_dir`` or train checkpoints into ``OUT/checkpoints`` (with ``reuse``,
    a resumed run, those already there are loaded instead when all of them are)."""
    if cfg.checkpoint_dir:
        with timer.phase("load_checkpoints"):
            return load_checkpoints(task, Path(cfg.checkpoint_dir).expanduser(), cfg.checkpoints)
    ckpt_dir = cfg.out_dir / "checkpoints"
    if reuse and (ckpt_dir / "manifest.json").is_file():
        try:
            with timer.phase("load_checkpoints"):
                return load_checkpoints(task, ckpt_dir, cfg.checkpoints)
        except FedtrakError as exc:
            log.warning("not reusing %s: %s", ckpt_dir, exc)
    with timer.phase("train"):
        if cfg.train == "fedavg":
            return train_fedavg_checkpoints(grid, task, cfg, job, num_nodes, ckpt_dir)
        train_checkpoints(task, cfg.checkpoints, ckpt_dir, base_seed=cfg.seed, epochs=cfg.epochs or None)
    return load_checkpoints(task, ckpt_dir, cfg.checkpoints)


def _request(job: JobSpec, states: States) -> RecordDict:
    content = RecordDict({JOB_KEY: job.to_record()})
    for m, state in enumerate(states):
        content[checkpoint_key(m)] = state_to_record(state)
    return content


@dataclass
class Outcome:
    """What a run produced: scores (where released), owner totals, ids, per-checkpoint
    records and, where asked, self-influence (per example where released, per owner)."""

    scores: np.ndarray | None
    owner_totals: np.ndarray
    ids: np.ndarray | None
    records: list[dict]
    self_influence: np.ndarray | None = None
    owner_self_influence: np.ndarray | None = None
    secure: SecureSum | None = None


def plain_gram_sum(fed: Federation, job: JobSpec, states: States, ms: list[int], dim: int, dp: DPSettings,
                   timer: PhaseTimer) -> tuple[list[np.ndarray], int, float]:
    """Featurize without secure aggregation: every client's Gram arrives, checked, and is summed.
    Returns the sums, the total count and the noise copies (clients) in them."""
    with timer.phase("featurize_round"):
        replies = fed.broadcast(FEATURIZE, lambda node: _request(job, states))
    fed.note_info(replies)
    sums = [np.zeros((dim, dim)) for _ in ms]

    def add_grams(node: int, content: RecordDict) -> None:
        for m, g in gram_release(content, ms, dim, fed.source(node), noiseless=not dp.active).items():
            sums[m] += g  # only after every checkpoint's Gram of this client passed

    with timer.phase("gram_sum"):  # summed in owner order, so a rerun gives the same bits
        fed.accept({n: replies[n] for n in fed.ordered() if n in replies}, add_grams)
    nodes = fed.require_clients("featurize")
    return sums, sum(fed.clients[n].num_examples for n in nodes), float(len(nodes))


def run_private(fed: Federation, task: Task, cfg: RunConfig, job: JobSpec, states: States,
                timer: PhaseTimer, state: RunState | None = None, saved: SavedKernels | None = None) -> Outcome:
    """Private mode: Grams in, preconditioned queries (and, for self-influence, the
    kernel inverses) out, owner totals (or, with ``full``, scores) back.

    The summed kernels are kept in ``state`` as soon as they exist; with
    ``saved`` kernels (a resumed run) there is no featurize round."""
    settings = cfg.score_settings()
    featurizers = [checkpoint_featurizer(task, s, m, settings) for m, s in enumerate(states)]
    dim = featurizers[0].projector.proj_dim
    ms = list(range(len(states)))
    dp = job.dp()
    secure = None
    if saved is not None:
        sums, total, copies = saved.grams, saved.total, saved.copies
        secure = restored_secure_sum(saved)
    elif cfg.secure_agg:
        secure = secure_gram_sum(fed, lambda node: _request(job, states), job, ms, dim, cfg.secagg_threshold,
                                 dp, timer)
        sums, total, copies = secure.grams, round(secure.count), len(secure.survivors) / secure.threshold
        fed.require_clients("secure aggregation")
    else:
        sums, total, copies = plain_gram_sum(fed, job, states, ms, dim, dp, timer)
    if state is not None and saved is None:
        state.save_kernels(SavedKernels(sums, total, copies, [
            {"owner": fed.clients[n].owner, "partition_id": fed.clients[n].partition_id,
             "num_examples": fed.clients[n].num_examples} for n in fed.ordered()],
            None if secure is None else saved_secure_sum(secure)))
    floor = noise_floor(dp, dim, copies) if dp.active else 0.0
    us, records, inverses = [], [], {}
    for m in ms:
        u, record, kinv = solve_checkpoint(task, featurizers[m], sums[m], total, settings, m, timer,
                                           with_inverse=cfg.wants_self_influence, noise_floor=floor)
        featurizers[m].projector.release()
        us.append(u)
        records.append(record)
        if kinv is not None:
            inverses[str(m)] = pack_upper(kinv)
    score_cfg = ConfigRecord({"policy": cfg.policy, "topk": cfg.topk})
    content = {JOB_KEY: job.to_record(), SCORE_KEY: score_cfg,
               "queries": arrays_to_record({str(m): u for m, u in enumerate(us)})}
    if inverses:
        content["kernel-inverses"] = arrays_to_record(inverses)
    with timer.phase("score_round"):
        replies = fed.broadcast(SCORE, lambda node: RecordDict(content))
    if saved is not None:  # no featurize round: who is who comes with the score replies
        fed.note_info(replies)
        kernel_owners = {p["owner"] for p in saved.participants}
        for node in [n for n in replies if fed.clients[n].owner not in kernel_owners]:
            fed.exclude(node, "its owner is not among the participants of the saved kernels")
            del replies[node]
    nq = len(task.y_query)
    released = fed.accept(replies, lambda node, c: score_release(
        c, cfg.policy, nq, fed.clients[node].num_examples, fed.source(node), bool(inverses), dp.active, us))
    nodes = [n for n in fed.require_clients("score") if n in released]
    out = Outcome(None, np.stack([released[n]["owner-totals"] for n in nodes], axis=1), None, records,
                  secure=secure)
    if inverses:  # each owner's mean: its released sum over its released count
        out.owner_self_influence = np.array([released[n]["owner-self-influence-sum"][0]
                                             / fed.clients[n].num_examples for n in nodes])
    if cfg.policy == "full":
        out.scores = np.concatenate([released[n]["scores"] for n in nodes], axis=1)
        out.ids = example_ids([released[n]["indices"] for n in nodes])
        if inverses:
            out.self_influence = np.concatenate([released[n]["self-influence"] for n in nodes])
    return out


def saved_secure_sum(secure: SecureSum) -> dict:
    """What a resumed run needs of a secure sum: its account, its noise and its survivors."""
    return {"report": secure.report, "noise": asdict(secure.noise), "survivors": list(secure.survivors)}


def restored_secure_sum(saved: SavedKernels) -> SecureSum | None:
    """The secure sum of saved kernels (``None`` if they were summed in the clear)."""
    if saved.secure is None:
        return None
    return SecureSum(saved.grams, float(saved.total), saved.secure["survivors"],
                     DistributedNoise(**saved.secure["noise"]), saved.secure["report"])


def run_features(fed: Federation, task: Task, cfg: RunConfig, job: JobSpec, states: States,
                 timer: PhaseTimer) -> Outcome:
    """Trusted-server mode: clients send features, the server scores them."""
    settings = cfg.score_settings()
    dim = checkpoint_featurizer(task, states[0], 0, settings).projector.proj_dim
    ms = list(range(len(states)))
    with timer.phase("features_round"):
        replies = fed.broadcast(FEATURES, lambda node: _request(job, states))
    fed.note_info(replies)
    received = fed.accept(replies, lambda node, c: features_release(
        c, ms, dim, fed.clients[node].num_examples, fed.source(node)))
    nodes = [n for n in fed.require_clients("features") if n in received]

    def gathered(m: int, featurizer: Featurizer) -> Features:
        return Features(np.concatenate([received[n][1][m][0] for n in nodes]),
                        np.concatenate([received[n][1][m][1] for n in nodes]))

    total = sum(fed.clients[n].num_examples for n in nodes)
    scores, records, self_infl = score_features(task, states, total, gathered, settings, timer,
                                                self_influence=cfg.wants_self_influence)
    ids = example_ids([received[n][0] for n in nodes])
    return Outcome(scores, owner_totals(scores, ids["client"], len(nodes)), ids, records, self_infl,
                   None if self_infl is None else owner_means(self_infl, ids["client"], len(nodes)))


def preflight(cfg: RunConfig) -> tuple[Task, DPSettings, int]:
    """Load the task and check the projection and privacy settings, before anything is trained or sent.

    Returns the task, the resolved privacy settings and the projection dimension k.

    Raises:
        FedtrakError: naming the bad setting.
    """
    task = cached_task(cfg.task, cfg.train_size, cfg.query_size)
    proj = make_projector(cfg.projector, task.num_params, cfg.proj_dim or None, cfg.seed, cache_bytes=0,
                          model=task.make_model())
    dp = cfg.dp_settings(task, proj.proj_dim)
    if not cfg.clip_quantile:  # otherwise C, and with it the floor, is known only after the clients' histograms
        check_lambda_against_noise(cfg, dp, proj.proj_dim)
    return task, dp, proj.proj_dim


def estimate_clip_norm(fed: Federation, job: JobSpec, states: States, quantile: float,
                       timer: PhaseTimer) -> float:
    """The clip norm at ``quantile`` of all clients' feature norms, from their noised histograms
    (:mod:`shared.privacy.quantile`); clients featurize into their stores on the way."""
    with timer.phase("clip_round"):
        replies = fed.broadcast(FEATURIZE, lambda node: RecordDict(
            {**_request(job, states), CLIP_KEY: ConfigRecord({"norms-only": True})}))
    fed.note_info(replies)
    total = np.zeros(len(NORM_EDGES) - 1)

    def add(node: int, content: RecordDict) -> None:
        nonlocal total
        hist = record_arrays(content, "norm-histogram", fed.source(node)).get("counts")
        if hist is None or hist.shape != total.shape or not np.all(np.isfinite(hist)):
            raise FedtrakError(f"{fed.source(node)}: norm histogram missing, mis-shaped or not finite")
        total = total + hist

    fed.accept({n: replies[n] for n in fed.ordered() if n in replies}, add)
    fed.require_clients("the clip-norm round")
    return quantile_from_histogram(total, quantile)


def check_lambda_against_noise(cfg: RunConfig, dp: DPSettings, dim: int) -> None:
    """Refuse, before any computation, a fixed lambda that the Gram noise would leave indefinite."""
    if not dp.active or cfg.mode != "private":
        return
    try:
        fixed = float(cfg.lam)
    except ValueError:
        return  # a rule: raised to the noise floor when it falls below
    floor = noise_floor(dp, dim, noise_copies(cfg, cfg.clients))
    if fixed < floor:
        raise FedtrakError(
            f"lambda {fixed:g} is below the DP noise floor {floor:.4g} ({NOISE_FLOOR_FACTOR} sigma C^2 "
            f"sqrt(k x noise copies)): the noised kernel would be indefinite; use a larger lambda or a rule")


def noise_copies(cfg: RunConfig, clients: int) -> float:
    """The summed Gram noise's variance in units of ``(sigma C^2)^2``: one per client, or, under
    secure aggregation, survivors over the threshold the distributed noise is sized for."""
    return clients / cfg.planned_threshold if cfg.secure_agg else clients


def _json_number(value: float) -> float | None:
    """``None`` (JSON null: unbounded) for an infinite epsilon, which strict JSON cannot hold."""
    return None if math.isinf(value) else value


def privacy_block(cfg: RunConfig, dp: DPSettings, dim: int, secure: SecureSum | None = None) -> dict:
    """The summary's account of what was released and what it cost (``secure``: the secure sum,
    whose survivors set the Grams' noise)."""
    if not dp.active:
        return {"dp": False, "note": "no noise: nothing released is differentially private"}
    plan = cfg.release_plan(dp, dim, *(() if secure is None else (secure.noise, len(secure.survivors))))
    rule = (f"DP quantile {cfg.clip_quantile:g} of the feature norms" if cfg.clip_quantile
            else "given" if cfg.clip_norm else "the task's default")
    block = {"dp": True, "adjacency": "add or remove one training example",
             "noise_multiplier": dp.noise_multiplier, "clip_norm": dp.clip_norm, "clip_norm_rule": rule,
             "clip_mode": dp.clip_mode,
             "delta": dp.delta, "target_epsilon": cfg.epsilon or None,
             "epsilon": _json_number(epsilon(plan, dp.delta)),
             "epsilon_prv": _json_number(prv_epsilon(plan, dp.delta)),
             "accountant": "mu-GDP composition of Gaussian mechanisms at sample rate 1 (opacus gdp); "
                           "PRV cross-check",
             "ledger": [r.describe() for r in plan], "secure_aggregation": secure is not None,
             "noise_per_client": "full sigma (no secure aggregation)", "not_covered": []}
    if secure is not None:
        at_threshold = cfg.release_plan(dp, dim)
        block.update(
            accountant="Renyi DP: Skellam bound (Agarwal, Kairouz and Liu 2021) for the securely summed Grams, "
                       "Gaussian for the rest, converted with opacus get_privacy_spent; PRV cross-check treats "
                       "the Skellam noise as Gaussian of the same variance",
            noise_per_client=f"Skellam, variance (sigma l2)^2 / {secure.threshold} per Gram coordinate (integer "
                             f"units): the threshold's {secure.threshold} honest survivors alone reach sigma",
            survivors=len(secure.survivors),
            gram_sigma_effective=secure.noise.effective_sigma(dp, len(secure.survivors)),
            fraction_bits=secure.noise.fraction_bits,
            epsilon_if_only_threshold_honest=_json_number(epsilon(at_threshold, dp.delta)))
    if cfg.mode == "features":
        block["not_covered"].append("the number of examples each client sends (features mode hides values, "
                                    "not presence)")
    if cfg.policy == "full" and cfg.mode == "private":
        block["not_covered"].append("policy full: example scores (and self-influence) are released without "
                                    "noise, for simulation and evaluation only")
    return block


def run_federated(flower_grid: Grid, cfg: RunConfig) -> dict:
    """Run one federated attribution and write its run folder; returns the summary.

    Raises:
        FedtrakError: on bad settings, too few clients, or no client left;
            no result files are written then (trained checkpoints are kept).
    """
    timer = PhaseTimer()
    grid = CountingGrid(flower_grid)
    with timer.phase("load_task"):
        task, dp, dim = preflight(cfg)
        flips = cfg.flips()
        flipped = np.zeros(0, dtype=np.int64)
        if flips.active:  # a mislabel experiment: central training sees the flipped labels too
            parts = partition(task.y_train, cfg.clients, cfg.partition, cfg.alpha, cfg.partition_seed)
            flipped = flipped_indices(task.y_train, parts, flips)
            task = corrupted(task, parts, flips)
    state = RunState(cfg.out_dir)
    resumed = state.saved_job(cfg.to_mapping()) if cfg.resume else None
    if resumed is not None:
        job, dp = resumed, replace(dp, clip_norm=resumed.clip_norm)
        log.warning("resuming run %s from %s", job.run_id, state.dir)
    else:
        state.clear()  # a fresh run: nothing of an older one may be resumed into it
        job = cfg.job(f"{cfg.out_dir.name or 'run'}-{uuid.uuid4().hex[:12]}", dp, task)
    run_id = job.run_id
    with timer.phase("wait_for_clients"):
        nodes = wait_for_nodes(grid, cfg.clients, cfg.wait_for_nodes)
    grid.step = "train"
    checkpoints = obtain_checkpoints(grid, task, cfg, job, len(nodes), timer, reuse=resumed is not None)
    states = [s for _, s in checkpoints]
    fed = Federation(grid, sorted(grid.get_node_ids()), cfg.timeout, job.task_fingerprint, cfg.rejoin_wait)
    if dp.active and cfg.clip_quantile and resumed is None:
        clip = estimate_clip_norm(fed, job, states, cfg.clip_quantile, timer)
        dp, job = replace(dp, clip_norm=clip), replace(job, clip_norm=clip)
        check_lambda_against_noise(cfg, dp, dim)
    saved = state.saved_kernels() if resumed is not None else None
    reused = ["the job (run id, resolved settings)", "checkpoints"] if resumed is not None else []
    if saved is not None:
        reused.append(f"the summed kernels of {len(saved.participants)} owners (no featurize round)")
    writer = ResultWriter(cfg.out_dir)
    try:
        if cfg.mode == "private":
            state.save_job(job, cfg.to_mapping())
            outcome = run_private(fed, task, cfg, job, states, timer, state, saved)
        else:
            outcome = run_features(fed, task, cfg, job, states, timer)
        records = outcome.records
        for rec, (info, _) in zip(records, checkpoints):
            rec.update(file=info.file, algorithm=info.algorithm, accuracy=info.accuracy)
        nodes = fed.ordered()
        with timer.phase("write"):
            add_score_arrays(writer, outcome.scores, outcome.ids, outcome.owner_totals, cfg.topk)
            add_self_influence(writer, outcome.self_influence, outcome.owner_self_influence)
            if flips.active:
                writer.add_array("flipped", flipped)
        pids = [fed.clients[n].partition_id for n in nodes]
        clients = fed.report()
        summary = {
            "mode": cfg.mode,
            "release_policy": cfg.policy if cfg.mode == "private" else "features",
            "task": task.name,
            "run_id": run_id,
            "num_train": sum(fed.clients[n].num_examples for n in nodes),
            "num_queries": len(task.y_query),
            "num_params": records[0]["num_params"],
            "proj_dim": records[0]["proj_dim"],
            "projector": cfg.projector,
            "num_checkpoints": len(states),
            "normalization": cfg.normalize,
            "ensemble": "mean kernel term x mean out-to-loss (TRAK Algorithm 1)",
            "score_sign": "positive = training example raises the query's margin",
            "lambda": [r["lambda"] for r in records],
            "checkpoints": records,
            "owners": [{"column": i, "owner": fed.clients[n].owner, "node_id": n,
                        "partition_id": fed.clients[n].partition_id,
                        "num_examples": fed.clients[n].num_examples} for i, n in enumerate(nodes)],
            **clients,
            **({"partition": {"scheme": cfg.partition, "alpha": cfg.alpha if cfg.partition == "dirichlet"
                              else None, "seed": cfg.partition_seed, "num_clients": cfg.clients}}
               if min(pids) >= 0 else {}),
            **flips_block(flips, flipped),
            "privacy": privacy_block(cfg, dp, dim, outcome.secure),
            **({"secure_aggregation": outcome.secure.report} if outcome.secure else {}),
            "training_privacy": training_privacy(cfg, task, {fed.clients[n].owner: fed.clients[n].num_examples
                                                             for n in nodes}),
            "config": cfg.to_mapping(),
            "seconds": timer.report(),
            "peak_memory_mb": peak_memory_mb(),
        }
        if not clients["complete_federation"]:
            summary["warning"] = (f"{len(clients['excluded'])} client(s) excluded: results cover only the "
                                  f"{len(nodes)} listed owners")
        if resumed is not None:
            summary["resumed"] = {"run_id": run_id, "reused": reused}
        writer.commit(summary)
        state.clear()
        log.info("fedtrak: wrote %s", cfg.out_dir)
        return summary
    except BaseException:
        writer.discard()
        raise

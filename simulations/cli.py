"""The ``fedtrak`` command line.

Subcommands: ``attribute`` (the centralized reference run), ``simulate`` (the
federated protocol on Flower's simulation engine), ``train`` (only the
checkpoints), ``evaluate`` (LDS, owner-level LDS, mislabel detection),
``report`` (an HTML page of a run) and ``bench featurize``. Bad input ends with one line,
``fedtrak: error: ...``, and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from server.config import TRAINING
from shared.errors import FedtrakError
from shared.kernel import NORMALIZATIONS
from shared.privacy.mechanisms import CLIP_MODES
from shared.projectors import PROJECTOR_KINDS
from shared.protocol import MODES, POLICIES
from shared.secagg.graph import THRESHOLD_FRACTION
from shared.tasks import BUILTIN_TASKS, DEFAULT_TASK


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {value}")
    return value


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise FedtrakError(f"{flag} must be comma-separated positive integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise FedtrakError(f"{flag} must be comma-separated positive integers, got {text!r}")
    return values


def _add_attribution_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--partition", choices=("iid", "dirichlet"), default="iid")
    p.add_argument("--alpha", type=_positive_float, default=0.5, help="Dirichlet concentration")
    p.add_argument("--partition-seed", type=int, default=0)
    p.add_argument("--checkpoint-dir", type=Path, default=None,
                   help="reuse the checkpoints in this folder instead of training")
    p.add_argument("--proj-dim", type=_positive_int, default=None,
                   help="projection dimension k (default 512; the parameter count for identity)")
    p.add_argument("--projector", choices=PROJECTOR_KINDS, default="rademacher")
    p.add_argument("--lambda", dest="lam", default="auto",
                   help="ridge lambda: auto (default), wd (n*weight_decay*p/k), rel:X (X times "
                        "the mean diagonal of Phi^T Phi) or a positive number")
    p.add_argument("--normalize", choices=NORMALIZATIONS, default="none",
                   help="per-checkpoint scaling of K^-1 before ensembling (traker: by its mean "
                        "absolute entry)")
    p.add_argument("--batch-size", type=_positive_int, default=256, help="examples per vmap call")
    p.add_argument("--topk", type=_positive_int, default=10, help="top examples kept per query")
    p.add_argument("--self-influence", action="store_true",
                   help="also score every training example for itself (mislabel detection); "
                        "on whenever labels are flipped")
    p.add_argument("--flip-fraction", type=_fraction, default=0.0,
                   help="mislabel experiment: flip this fraction of the labels of --flip-clients")
    p.add_argument("--flip-clients", default="",
                   help="comma-separated client ids whose labels are flipped (default: the first half)")


def _epsilon(text: str) -> float:
    if text.strip().lower() in ("inf", "infinity"):
        return 0.0  # no noise: the run config's "unset"
    return _positive_float(text)


def _delta(text: str) -> float:
    value = _positive_float(text)
    if not value < 1:
        raise argparse.ArgumentTypeError(f"expected a delta in (0, 1), got {value}")
    return value


def _add_privacy_args(p: argparse.ArgumentParser) -> None:
    dp = p.add_argument_group("differential privacy (off unless --epsilon or --noise-multiplier)")
    dp.add_argument("--epsilon", type=_epsilon, default=0.0,
                    help="target epsilon of the whole run (its noise multiplier is derived; inf: no noise)")
    dp.add_argument("--delta", type=_delta, default=1e-5, help="delta of the guarantee (default 1e-5)")
    dp.add_argument("--noise-multiplier", type=float, default=0.0,
                    help="sigma of every release, instead of --epsilon (0: no noise)")
    dp.add_argument("--clip-norm", type=_positive_float, default=None,
                    help="L2 clip norm C of projected features (default: the task's)")
    dp.add_argument("--clip-mode", choices=CLIP_MODES, default="per-checkpoint",
                    help="clip each checkpoint's feature, or all checkpoints' jointly (one Gram release)")
    dp.add_argument("--clip-quantile", type=_fraction, default=0.0,
                    help="choose C as this quantile of the feature norms, from the clients' noised "
                         "histograms (one more release), instead of --clip-norm")
    dp.add_argument("--dp-train-noise", type=float, default=0.0,
                    help="DP-SGD (Opacus) noise multiplier for the clients' FedAvg training (0: plain SGD)")
    dp.add_argument("--dp-train-clip", type=_positive_float, default=1.0,
                    help="DP-SGD per-example gradient clip norm")


def _add_task_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", default=DEFAULT_TASK,
                   help=f"built-in task ({', '.join(BUILTIN_TASKS)}) or package.module:function "
                        f"(default {DEFAULT_TASK})")
    p.add_argument("--train-size", type=_positive_int, default=None,
                   help="use a fixed random subset of this many training examples")
    p.add_argument("--query-size", type=_positive_int, default=None,
                   help="use a fixed random subset of this many queries")
    p.add_argument("--checkpoints", type=_positive_int, default=3, help="number of checkpoints M")
    p.add_argument("--epochs", type=_positive_int, default=None,
                   help="training epochs per checkpoint (default: the task's)")
    p.add_argument("--seed", type=int, default=0,
                   help="base seed: checkpoint m trains with seed+m, projects with a seed derived from (seed, m)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


class _OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line: ``fedtrak: error: ...``."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"fedtrak: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="fedtrak", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineParser)

    att = sub.add_parser("attribute", help="centralized TRAK attribution (the reference path)")
    _add_task_args(att)
    att.add_argument("--out", type=Path, default=Path("runs/central"), help="run folder")
    att.add_argument("--clients", type=_positive_int, default=10,
                     help="number of owners the training set is split over")
    _add_attribution_args(att)

    sim = sub.add_parser("simulate", help="federated attribution on Flower's simulation engine")
    _add_task_args(sim)
    sim.add_argument("--out", type=Path, default=Path("runs/sim"), help="run folder")
    sim.add_argument("--clients", type=_positive_int, default=10, help="number of virtual clients")
    _add_attribution_args(sim)
    sim.add_argument("--mode", choices=MODES, default="private",
                     help="private: clients release Grams and score locally; features: trusted server")
    sim.add_argument("--policy", choices=POLICIES, default="owner-totals",
                     help="what clients release in the score step (full: whole score matrices, "
                          "simulation and evaluation only)")
    sim.add_argument("--train", choices=TRAINING, default="fedavg",
                     help="how checkpoints are trained when --checkpoint-dir is not given")
    sim.add_argument("--rounds", type=_positive_int, default=10, help="FedAvg rounds per checkpoint")
    sim.add_argument("--local-epochs", type=_positive_int, default=3, help="local epochs per FedAvg round")
    sim.add_argument("--timeout", type=_positive_float, default=600.0,
                     help="seconds to wait for clients' replies in each step")
    sim.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    sim.add_argument("--secure-agg", action="store_true",
                     help="sum the Grams with secure aggregation: the server never sees one client's Gram "
                          "(private mode, 3 clients or more)")
    sim.add_argument("--secagg-threshold", type=float, default=THRESHOLD_FRACTION,
                     help="share threshold as a fraction of each neighbourhood, in (0.5, 1] "
                          f"(default {THRESHOLD_FRACTION})")
    _add_privacy_args(sim)

    train = sub.add_parser("train", help="train checkpoints only")
    _add_task_args(train)
    train.add_argument("--out", type=Path, required=True, help="checkpoint folder to write")

    ev = sub.add_parser("evaluate", help="LDS, owner-level LDS and mislabel detection of a run")
    ev.add_argument("run_dir", type=Path, help="a run folder written by attribute or simulate")
    ev.add_argument("--lds", action="store_true", help="LDS of the example scores")
    ev.add_argument("--owner-lds", action="store_true", help="LDS of the owner totals")
    ev.add_argument("--mislabel", action="store_true", help="flipped-label detection by self-influence")
    ev.add_argument("--subsets", type=_positive_int, default=100, help="retrained models for LDS")
    ev.add_argument("--owner-subsets", type=_positive_int, default=100,
                    help="retrained models for owner-level LDS")
    ev.add_argument("--alpha", type=_fraction, default=0.5, help="fraction of examples (owners) per subset")
    ev.add_argument("--eval-seed", type=int, default=0, help="seed of the subsets and their training")
    ev.add_argument("--cache-dir", type=Path, default=None,
                    help="ground-truth cache (default ~/.cache/fedtrak/groundtruth)")
    ev.add_argument("--workers", type=_positive_int, default=None, help="training processes (default: cores)")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")

    rep = sub.add_parser("report", help="a self-contained HTML page with figures of a run")
    rep.add_argument("run_dir", type=Path, help="a run folder")
    rep.add_argument("--out", type=Path, default=None, help="HTML file (default RUN_DIR/report.html)")
    rep.add_argument("--queries", type=_positive_int, default=4, help="queries shown in the figures")

    sw = sub.add_parser("sweep", help="attribution quality against epsilon, per mode (privacy/utility)")
    sw.add_argument("--task", default=DEFAULT_TASK)
    sw.add_argument("--epsilons", default="0.5,1,2,4,8,inf", help="comma-separated; inf: no noise")
    sw.add_argument("--modes", default="private,features", help="comma-separated modes")
    sw.add_argument("--clients", type=_positive_int, default=10)
    sw.add_argument("--checkpoints", type=_positive_int, default=3)
    sw.add_argument("--proj-dim", type=_positive_int, default=512)
    sw.add_argument("--train-size", type=_positive_int, default=None)
    sw.add_argument("--query-size", type=_positive_int, default=None)
    sw.add_argument("--flip-fraction", type=_fraction, default=0.1,
                    help="labels flipped on the first half of the clients (mislabel detection)")
    sw.add_argument("--subsets", type=_positive_int, default=100, help="retrained models per LDS")
    sw.add_argument("--clip-mode", choices=CLIP_MODES, default="per-checkpoint")
    sw.add_argument("--attack-targets", type=_positive_int, default=8,
                    help="examples attacked at each point (feature inversion)")
    sw.add_argument("--seed", type=int, default=0)
    sw.add_argument("--cache-dir", type=Path, default=None)
    sw.add_argument("--out", type=Path, required=True, help="folder for the runs, table and plot")

    aud = sub.add_parser("audit", help="canary audit: an empirical epsilon lower bound of the Gram release")
    aud.add_argument("--task", default=DEFAULT_TASK)
    aud.add_argument("--noise-multiplier", type=_positive_float, default=1.0)
    aud.add_argument("--clip-norm", type=_positive_float, default=None, help="default: the task's")
    aud.add_argument("--proj-dim", type=_positive_int, default=512)
    aud.add_argument("--releases", type=_positive_int, default=20, help="noised Grams (k canaries each)")
    aud.add_argument("--clients", type=_positive_int, default=10, help="the audited client is 1 of these")
    aud.add_argument("--delta", type=_delta, default=1e-5)
    aud.add_argument("--seed", type=int, default=0)
    aud.add_argument("--json", type=Path, default=None, help="also write the result as JSON")

    atk = sub.add_parser("attack", help="attacks of a curious server on a run's releases (inversion, membership)")
    atk.add_argument("run_dir", type=Path)
    atk.add_argument("--kind", action="append", choices=["inversion", "small-owner", "membership"],
                     help="attack to run (repeatable; default: every one that applies to the run's mode)")
    atk.add_argument("--targets", type=_positive_int, default=8, help="examples attacked")
    atk.add_argument("--trials", type=_positive_int, default=400, help="membership games")
    atk.add_argument("--steps", type=_positive_int, default=300, help="optimization steps per inversion")
    atk.add_argument("--restarts", type=_positive_int, default=4, help="random starts per label tried")
    atk.add_argument("--label-candidates", type=_positive_int, default=2, help="labels tried per target")
    certs = sub.add_parser("certs", help="TLS certificates for a SuperLink: a CA and a server certificate")
    certs.add_argument("--out", type=Path, required=True, help="folder for ca.crt, ca.key, server.pem, server.key")
    certs.add_argument("--host", action="append", default=[], required=True,
                       help="the SuperLink's host name or IP address (repeat for several)")
    certs.add_argument("--force", action="store_true", help="replace existing keys")
    keys = sub.add_parser("keys", help="a SuperNode's authentication key pair (Flower's format)")
    keys.add_argument("--out", type=Path, required=True, help="folder for NAME and NAME.pub")
    keys.add_argument("--name", default="supernode", help="file name of the key pair (default supernode)")
    keys.add_argument("--force", action="store_true", help="replace an existing key pair")

    device = sub.add_parser("device", help="a device owner's view: what it would send, what it kept")
    dsub = device.add_subparsers(dest="device", required=True, parser_class=_OneLineParser)
    dc = dsub.add_parser("check", help="load the data, featurize one batch, list what would leave the device")
    dc.add_argument("--task", default=DEFAULT_TASK)
    dc.add_argument("--data", type=Path, required=True, help="the device's .npz with x and y")
    dc.add_argument("--proj-dim", type=_positive_int, default=None)
    dc.add_argument("--projector", choices=PROJECTOR_KINDS, default="rademacher")
    dc.add_argument("--checkpoints", type=_positive_int, default=3)
    dc.add_argument("--queries", type=_positive_int, default=None,
                    help="queries the server will score (default 297, the digits query set)")
    dc.add_argument("--noise-multiplier", type=float, default=0.0)
    dc.add_argument("--clip-norm", type=_positive_float, default=None)
    dc.add_argument("--secure-agg", action="store_true")
    dc.add_argument("--policy", choices=POLICIES, default="owner-totals")
    dc.add_argument("--json", type=Path, default=None, help="also write the report as JSON")
    dr = dsub.add_parser("results", help="print what a topk run kept on this device")
    dr.add_argument("folder", type=Path, help="the store's run folder, its results folder or the store root")
    dr.add_argument("--queries", type=_positive_int, default=5)

    bench = sub.add_parser("bench", help="benchmarks (run by hand)")
    bsub = bench.add_subparsers(dest="bench", required=True, parser_class=_OneLineParser)
    feat = bsub.add_parser("featurize", help="featurize throughput, fedtrak vs traker")
    feat.add_argument("--task", default="digits-mlp")
    feat.add_argument("--proj-dim", type=_positive_int, default=2048)
    feat.add_argument("--examples", type=_positive_int, default=1500)
    feat.add_argument("--traker-examples", type=_positive_int, default=128)
    feat.add_argument("--projectors", default="factorized,rademacher,gaussian",
                      help="comma-separated fedtrak projectors to measure")
    feat.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    bl = bsub.add_parser("lds", help="LDS across k and M on one task (the README's baseline table)")
    bl.add_argument("--task", default=DEFAULT_TASK)
    bl.add_argument("--out", type=Path, required=True, help="folder for checkpoints and runs")
    bl.add_argument("--proj-dims", default="512,2048",
                    help="comma-separated k values; 'identity' for no projection")
    bl.add_argument("--checkpoints", default="1,5", help="comma-separated M values")
    bl.add_argument("--projectors", default="rademacher", help="comma-separated projectors (each k, M)")
    bl.add_argument("--subsets", type=_positive_int, default=100)
    bl.add_argument("--train-size", type=_positive_int, default=None)
    bl.add_argument("--query-size", type=_positive_int, default=None)
    bl.add_argument("--cache-dir", type=Path, default=None)
    bl.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    bm = bsub.add_parser("memory", help="peak memory of featurizing N examples into a store")
    bm.add_argument("--task", default="fmnist-mlp")
    bm.add_argument("--sizes", default="10000,60000", help="comma-separated numbers of examples")
    bm.add_argument("--proj-dim", type=_positive_int, default=2048)
    bm.add_argument("--projectors", default="factorized,rademacher")
    bm.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    bsc = bsub.add_parser("scale", help="fedtrak simulate with 10, 100 and 1,000 clients")
    bsc.add_argument("--task", default="fmnist-mlp")
    bsc.add_argument("--out", type=Path, required=True, help="folder for checkpoints and runs")
    bsc.add_argument("--clients", default="10,100,1000", help="comma-separated client counts")
    bsc.add_argument("--proj-dim", type=_positive_int, default=1024)
    bsc.add_argument("--projector", choices=PROJECTOR_KINDS, default="factorized")
    bsc.add_argument("--query-size", type=_positive_int, default=500)
    bsc.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    bd = bsub.add_parser("deploy", help="a loopback deployment with TLS and node authentication")
    bd.add_argument("--out", type=Path, required=True, help="working folder (certificates, logs, run)")
    bd.add_argument("--task", default="fmnist-mlp")
    bd.add_argument("--nodes", type=_positive_int, default=1)
    bd.add_argument("--examples", type=_positive_int, default=6000, help="examples per SuperNode")
    bd.add_argument("--proj-dim", type=_positive_int, default=2048)
    bd.add_argument("--projector", choices=PROJECTOR_KINDS, default="factorized")
    bd.add_argument("--secure-agg", action="store_true")
    bd.add_argument("--json", type=Path, default=None, help="also write the result as JSON")
    ba = bsub.add_parser("attacks", help="what a curious server recovers, per mode, k, epsilon and client size")
    ba.add_argument("--task", default=DEFAULT_TASK)
    ba.add_argument("--proj-dims", default="64,512,identity", help="comma-separated k values of features mode")
    ba.add_argument("--epsilons", default="inf,8,1")
    ba.add_argument("--targets", type=_positive_int, default=8)
    ba.add_argument("--steps", type=_positive_int, default=300)
    ba.add_argument("--restarts", type=_positive_int, default=4, help="random starts per label tried")
    ba.add_argument("--label-candidates", type=_positive_int, default=2, help="labels tried per target")
    ba.add_argument("--owner-sizes", default="1,2,4,16,64", help="client sizes of the small-owner attack")
    ba.add_argument("--figure", type=Path, default=None, help="also draw true and rebuilt examples (PNG)")
    ba.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    bs = bsub.add_parser("secagg", help="cost of secure aggregation in a simulation, against the plain run")
    bs.add_argument("--task", default="digits-mlp")
    bs.add_argument("--out", type=Path, required=True, help="folder for checkpoints and both runs")
    bs.add_argument("--clients", type=_positive_int, default=10)
    bs.add_argument("--proj-dim", type=_positive_int, default=2048)
    bs.add_argument("--checkpoints", type=_positive_int, default=1)
    bs.add_argument("--epsilon", type=_epsilon, default=0.0, help="with distributed DP noise (default: none)")
    bs.add_argument("--json", type=Path, default=None, help="also write the result as JSON")
    return parser


def _run(args: argparse.Namespace) -> int:
    if args.command == "attribute":
        from shared.settings import ScoreSettings
        from simulations.attribute import AttributeConfig, run_attribute

        cfg = AttributeConfig(
            out=args.out, task=args.task, clients=args.clients, partition=args.partition,
            alpha=args.alpha, partition_seed=args.partition_seed, checkpoints=args.checkpoints,
            checkpoint_dir=args.checkpoint_dir, epochs=args.epochs, train_size=args.train_size,
            query_size=args.query_size, topk=args.topk, progress=not args.quiet,
            self_influence=args.self_influence, flip_fraction=args.flip_fraction,
            flip_clients=args.flip_clients,
            score=ScoreSettings(proj_dim=args.proj_dim, projector=args.projector, seed=args.seed,
                                lam=args.lam, normalize=args.normalize, batch_size=args.batch_size),
        )
        summary = run_attribute(cfg)
        print(f"wrote {args.out}: {summary['num_queries']} queries x {summary['num_train']} examples, "
              f"M={summary['num_checkpoints']}, k={summary['proj_dim']}, "
              f"{summary['seconds']['total']:.1f} s, peak {summary['peak_memory_mb']} MiB")
    elif args.command == "simulate":
        from simulations.simulate import run_simulation, simulation_config

        cfg = simulation_config({
            "task": args.task, "train-size": args.train_size or 0, "query-size": args.query_size or 0,
            "clients": args.clients, "partition": args.partition, "alpha": args.alpha,
            "partition-seed": args.partition_seed, "mode": args.mode, "policy": args.policy,
            "allow-full": args.policy == "full", "topk": args.topk, "checkpoints": args.checkpoints,
            "train": args.train, "checkpoint-dir": str(args.checkpoint_dir or ""), "rounds": args.rounds,
            "local-epochs": args.local_epochs, "epochs": args.epochs or 0, "proj-dim": args.proj_dim or 0,
            "projector": args.projector, "seed": args.seed, "lambda": str(args.lam),
            "normalize": args.normalize, "batch-size": args.batch_size, "out": str(args.out),
            "timeout": args.timeout, "self-influence": args.self_influence,
            "flip-fraction": args.flip_fraction, "flip-clients": args.flip_clients,
            "epsilon": args.epsilon, "delta": args.delta, "noise-multiplier": args.noise_multiplier,
            "clip-norm": args.clip_norm or 0.0, "clip-mode": args.clip_mode, "clip-quantile": args.clip_quantile,
            "dp-train-noise": args.dp_train_noise, "dp-train-clip": args.dp_train_clip,
            "secure-agg": args.secure_agg, "secagg-threshold": args.secagg_threshold,
        })
        summary = run_simulation(cfg, verbose=args.verbose)
        _print_federated(summary, args.out)
    elif args.command == "train":
        from shared.checkpoints import train_checkpoints
        from shared.tasks import load_task

        task = load_task(args.task, args.train_size, args.query_size)
        infos = train_checkpoints(task, args.checkpoints, args.out, args.seed, args.epochs)
        for info in infos:
            print(f"{args.out / info.file}: seed {info.seed}, query accuracy {info.accuracy:.4f}")
    elif args.command == "evaluate":
        from simulations.evaluate import EvalOptions, evaluate_run, format_table
        from simulations.groundtruth import DEFAULT_CACHE

        chosen = tuple(m for m, on in (("lds", args.lds), ("owner_lds", args.owner_lds),
                                       ("mislabel", args.mislabel)) if on)
        opts = EvalOptions(chosen, args.subsets, args.owner_subsets, args.alpha, args.eval_seed,
                           args.cache_dir or DEFAULT_CACHE, args.workers, progress=not args.quiet)
        block = evaluate_run(args.run_dir, opts)
        print(format_table({k: block[k] for k in (chosen or block)}))
        print(f"wrote the evaluation block of {args.run_dir / 'summary.json'}")
    elif args.command == "report":
        from simulations.report import write_report

        print(f"wrote {write_report(args.run_dir, args.out, args.queries)}")
    elif args.command == "sweep":
        from simulations.groundtruth import DEFAULT_CACHE
        from simulations.sweep import SweepConfig, format_table, run_sweep, summary_line

        try:
            epsilons = [math.inf if e.strip().lower() == "inf" else float(e) for e in args.epsilons.split(",")]
        except ValueError:
            raise FedtrakError(f"--epsilons must be comma-separated numbers or inf, got {args.epsilons!r}") from None
        rows = run_sweep(SweepConfig(
            out=args.out, task=args.task, epsilons=epsilons, modes=[m.strip() for m in args.modes.split(",")],
            clients=args.clients, checkpoints=args.checkpoints, proj_dim=args.proj_dim,
            train_size=args.train_size, query_size=args.query_size, flip_fraction=args.flip_fraction,
            subsets=args.subsets, attack_targets=args.attack_targets, clip_mode=args.clip_mode, seed=args.seed,
            cache_dir=args.cache_dir or DEFAULT_CACHE))
        print(format_table(rows))
        print(summary_line(rows))
        print(f"wrote {args.out / 'sweep.csv'}, {args.out / 'sweep.md'} and {args.out / 'sweep.png'}")
    elif args.command == "audit":
        from simulations.audit import audit_gram

        res = audit_gram(args.task, args.noise_multiplier, args.clip_norm, args.proj_dim, args.releases,
                         args.clients, args.delta, args.seed)
        print(f"Gram release of one client ({res['client_examples']} examples, k={res['proj_dim']}, sigma "
              f"{res['noise_multiplier']:g}, C {res['clip_norm']:g}): {res['canaries']} canaries over "
              f"{res['releases']} releases")
        print(f"  empirical epsilon lower bound ({res['confidence']:.0%}): "
              f"{res['empirical_epsilon_lower_bound']:.3f}")
        print(f"  accounted epsilon of one release at delta {res['delta']:g}: "
              f"{res['accounted_epsilon_one_release']:.3f}")
        if args.json:
            args.json.write_text(json.dumps(res, indent=2))
    elif args.command == "bench" and args.bench == "lds":
        from simulations.bench_lds import bench_lds, format_table
        from simulations.groundtruth import DEFAULT_CACHE

        dims = [d if d == "identity" else _int_list(d, "--proj-dims")[0] for d in args.proj_dims.split(",")]
        rows = bench_lds(args.task, args.out, dims,
                         _int_list(args.checkpoints, "--checkpoints"), args.subsets, args.train_size,
                         args.query_size, args.cache_dir or DEFAULT_CACHE,
                         projectors=tuple(p.strip() for p in args.projectors.split(",") if p.strip()))
        print(format_table(rows))
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2))
    elif args.command == "device" and args.device == "check":
        from client.device import device_report, format_report

        if args.noise_multiplier < 0:
            raise FedtrakError(f"--noise-multiplier must be >= 0, got {args.noise_multiplier}")
        report = device_report(args.task, args.data, args.proj_dim, args.projector, args.checkpoints, args.queries,
                               args.noise_multiplier, args.clip_norm, args.secure_agg, args.policy)
        print(format_report(report))
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
    elif args.command == "device":
        from client.device import format_results, read_results

        print(format_results(read_results(args.folder), args.queries))
    elif args.command == "attack":
        from simulations.attacks.inversion import InversionSettings
        from simulations.attacks.suite import ATTACK_KINDS, attack_run, format_block

        block = attack_run(args.run_dir, tuple(args.kind or ATTACK_KINDS), args.targets, args.trials,
                           InversionSettings(steps=args.steps, restarts=args.restarts,
                                             label_candidates=args.label_candidates))
        print(format_block(block))
        print(f"wrote the attacks block of {args.run_dir / 'summary.json'}")
    elif args.command == "bench" and args.bench == "attacks":
        from simulations.attacks.bench import bench_attacks
        from simulations.attacks.bench import format_table as attack_table
        from simulations.attacks.inversion import InversionSettings

        dims = tuple(None if d.strip() == "identity" else _positive_int(d) for d in args.proj_dims.split(","))
        epsilons = tuple(math.inf if e.strip().lower() == "inf" else float(e) for e in args.epsilons.split(","))
        sizes = tuple(_positive_int(v) for v in args.owner_sizes.split(","))
        rows = bench_attacks(args.task, dims, epsilons, args.targets, sizes, inversion=InversionSettings(
            steps=args.steps, restarts=args.restarts, label_candidates=args.label_candidates), figure=args.figure)
        print(attack_table(rows))
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
    elif args.command == "certs":
        from server.certs import make_certificates

        paths = make_certificates(args.out, args.host, args.force)
        print(f"wrote {', '.join(str(p) for p in paths.values())} for {', '.join(args.host)}")
        print(f"  SuperLink: --ssl-ca-certfile {paths['ca.crt']} --ssl-certfile {paths['server.pem']} "
              f"--ssl-keyfile {paths['server.key']}")
        print(f"  SuperNodes and flwr: trust {paths['ca.crt']}; keep {paths['ca.key']} offline")
    elif args.command == "keys":
        from client.keys import make_node_keys

        private, public = make_node_keys(args.out, args.name, args.force)
        print(f"wrote {private} (private, stays on this device) and {public} (register it: "
              f"flwr supernode register {public} FEDERATION)")
    elif args.command == "bench" and args.bench in ("memory", "scale"):
        from simulations.bench_scale import bench_memory, bench_scale, format_rows

        if args.bench == "memory":
            rows = bench_memory(args.task, _int_list(args.sizes, "--sizes"), args.proj_dim,
                                tuple(p.strip() for p in args.projectors.split(",") if p.strip()))
            print(format_rows(rows, ["task", "projector", "examples", "proj_dim", "seconds", "resident_before_mb",
                                     "featurize_peak_mb", "process_peak_mb"]))
        else:
            rows = bench_scale(args.task, args.out, _int_list(args.clients, "--clients"), args.proj_dim,
                               projector=args.projector, query_size=args.query_size)
            print(format_rows(rows, ["clients", "examples_per_client", "wall_seconds", "rounds_seconds",
                                     "client_seconds_total", "server_compute_seconds",
                                     "flower_overhead_seconds", "flower_overhead_share", "peak_memory_mb"]))
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2))
    elif args.command == "bench" and args.bench == "deploy":
        from simulations.deployment import bench_deploy

        result = bench_deploy(args.out, args.task, args.nodes, args.examples, args.proj_dim, args.projector,
                              secure_agg=args.secure_agg)
        print(json.dumps(result, indent=2))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
    elif args.command == "bench" and args.bench == "secagg":
        from simulations.bench_secagg import bench_secagg, format_table

        result = bench_secagg(args.task, args.out, args.clients, args.proj_dim, args.checkpoints, args.epsilon)
        print(format_table(result))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
    elif args.command == "bench":
        from simulations.bench_featurize import bench_featurize, format_table

        kinds = tuple(k.strip() for k in args.projectors.split(",") if k.strip())
        unknown = sorted(set(kinds) - set(PROJECTOR_KINDS))
        if unknown:
            raise FedtrakError(f"--projectors: unknown {unknown}; use {', '.join(PROJECTOR_KINDS)}")
        rows = bench_featurize(args.task, args.proj_dim, args.examples, args.traker_examples, kinds)
        print(format_table(rows))
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2))
    return 0


def _print_federated(summary: dict, out: Path) -> None:
    secs = summary["seconds"]
    clients = summary["clients"]
    per_client = (summary["bytes"]["sent"] + summary["bytes"]["received"]) / max(len(clients), 1)
    print(f"wrote {out}: {summary['mode']} mode, release {summary['release_policy']}, "
          f"{len(summary['owners'])} owners, {summary['num_queries']} queries x {summary['num_train']} "
          f"examples, M={summary['num_checkpoints']}, k={summary['proj_dim']}, {secs['total']:.1f} s")
    print("  seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in secs.items() if k != "total"))
    print(f"  bytes per client (sent + received): {per_client / 1e6:.2f} MB")
    privacy = summary.get("privacy", {})
    if privacy.get("dp"):
        eps = "unbounded" if privacy["epsilon"] is None else f"{privacy['epsilon']:.3g}"
        print(f"  privacy: epsilon {eps} at delta {privacy['delta']:g} (sigma "
              f"{privacy['noise_multiplier']:.3g}, clip {privacy['clip_norm']:g}); not covered: "
              f"{'; '.join(privacy['not_covered']) or 'nothing'}")
    secure = summary.get("secure_aggregation")
    if secure:
        rounds = ", ".join(f"{k.split('.')[-1]} {v['seconds']:.2f} s" for k, v in secure["rounds"].items())
        print(f"  secure aggregation: {secure['survivors']} of {secure['clients']} clients in the sum "
              f"(threshold {secure['threshold']}, {secure['graph']} graph, degree {secure['degree']}); {rounds}")
    training = summary.get("training_privacy", {})
    if training.get("dp_sgd"):
        print(f"  training (DP-SGD, accounted apart): epsilon up to {training['epsilon_max']:.3g} per client")
    for ex in summary["excluded"]:
        print(f"  excluded: client {ex['owner'] or '?'} (node {ex['node_id']}): {ex['reason'].splitlines()[0]}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedtrak`` console script."""
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except FedtrakError as exc:
        print(f"fedtrak: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedtrak: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""``fedtrak bench ...``: the benchmarks, run by hand and reported in the docs."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path

from fedtrak.config.settings import DEFAULT_PROJ_DIM, ENSEMBLES, PROJECTORS, WEIGHTINGS
from fedtrak.errors import FedtrakError
from fedtrak.simulations.cli import OneLineParser
from fedtrak.simulations.cli.evaluate import epsilons, inversion_args
from fedtrak.simulations.cli.flags import add_json, add_settings, int_list, positive_int


def _featurize(p: argparse.ArgumentParser) -> None:
    add_settings(p, ["task", "proj-dim"], defaults={"task": "digits-mlp", "proj-dim": 2048})
    p.add_argument("--examples", type=positive_int, default=1500)
    p.add_argument("--traker-examples", type=positive_int, default=128)
    p.add_argument("--projectors", default="auto,factorized,rademacher,gaussian",
                   help="comma-separated fedtrak projectors to measure (auto: the one a run picks for the model)")


def _lds(p: argparse.ArgumentParser) -> None:
    add_settings(p, ["task", "train-size", "query-size"])
    p.add_argument("--out", type=Path, required=True, help="folder for checkpoints and runs")
    p.add_argument("--proj-dims", default="512,2048", help="comma-separated k values; 'identity' for no projection")
    p.add_argument("--checkpoints", default="1,5", help="comma-separated M values")
    p.add_argument("--projectors", default="rademacher", help="comma-separated projectors (each k, M)")
    p.add_argument("--weightings", default="curvature,none", help="comma-separated kernel weightings")
    p.add_argument("--ensembles", default="trajectory", help="comma-separated: trajectory, independent")
    p.add_argument("--subsets", type=positive_int, default=100)
    p.add_argument("--cache-dir", type=Path, default=None)


def _memory(p: argparse.ArgumentParser) -> None:
    add_settings(p, ["task", "proj-dim"], defaults={"task": "fmnist-mlp", "proj-dim": 2048})
    p.add_argument("--sizes", default="10000,60000", help="comma-separated numbers of examples")
    p.add_argument("--projectors", default="factorized,rademacher")


def _scale(p: argparse.ArgumentParser) -> None:
    add_settings(p, ["task", "proj-dim", "projector", "query-size"],
                 defaults={"task": "fmnist-mlp", "proj-dim": 1024, "projector": "factorized", "query-size": 500})
    p.add_argument("--out", type=Path, required=True, help="folder for checkpoints and runs")
    p.add_argument("--clients", default="10,100,1000,10000", help="comma-separated client counts")


def _deploy(p: argparse.ArgumentParser) -> None:
    add_settings(p, ["task", "proj-dim", "projector", "secure-agg"],
                 defaults={"task": "fmnist-mlp", "proj-dim": 2048, "projector": "factorized"})
    p.add_argument("--out", type=Path, required=True, help="working folder (certificates, logs, run)")
    p.add_argument("--nodes", type=positive_int, default=1)
    p.add_argument("--examples", type=positive_int, default=6000, help="examples per SuperNode")


def _noise(p: argparse.ArgumentParser) -> None:
    add_settings(p, ["proj-dim"], defaults={"proj-dim": 2048})
    p.add_argument("--repeats", type=positive_int, default=3)


def _attacks(p: argparse.ArgumentParser) -> None:
    add_settings(p, ["task"])
    p.add_argument("--proj-dims", default="64,512,identity", help="comma-separated k values of features mode")
    p.add_argument("--epsilons", default="inf,8,1")
    p.add_argument("--targets", type=positive_int, default=8)
    inversion_args(p)
    p.add_argument("--owner-sizes", default="1,2,4,16,64", help="client sizes of the small-owner attack")
    p.add_argument("--figure", type=Path, default=None, help="also draw true and rebuilt examples (PNG)")


def _secagg(p: argparse.ArgumentParser) -> None:
    add_settings(p, ["task", "clients", "proj-dim", "checkpoints", "epsilon"],
                 defaults={"task": "digits-mlp", "proj-dim": 2048, "checkpoints": 1})
    p.add_argument("--out", type=Path, required=True, help="folder for checkpoints and both runs")


def _lambda(p: argparse.ArgumentParser) -> None:
    add_settings(p, ["task", "proj-dim", "checkpoints"], defaults={"proj-dim": DEFAULT_PROJ_DIM, "checkpoints": 5})
    p.add_argument("--out", type=Path, required=True, help="folder for checkpoints and runs")
    p.add_argument("--factors", default="0.1,0.3,1,3,10", help="comma-separated multiples of the rule's lambda")
    p.add_argument("--weightings", default="curvature,none", help="comma-separated kernel weightings")
    p.add_argument("--subsets", type=positive_int, default=100)
    p.add_argument("--cache-dir", type=Path, default=None)


def _cli(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repeats", type=positive_int, default=5, help="runs of each command (the median is kept)")


#: Benchmark -> (its options, its help).
BENCHES: dict[str, tuple[Callable[[argparse.ArgumentParser], None], str]] = {
    "featurize": (_featurize, "featurize throughput, fedtrak vs traker"),
    "lds": (_lds, "LDS across k and M on one task (the baseline table)"),
    "memory": (_memory, "peak memory of featurizing N examples into a store"),
    "scale": (_scale, "fedtrak simulate with 10 to 10,000 clients: wall time, server work, peak memory"),
    "deploy": (_deploy, "a loopback deployment with TLS and node authentication"),
    "attacks": (_attacks, "what a curious server recovers, per mode, k, epsilon and client size"),
    "secagg": (_secagg, "cost of secure aggregation in a simulation, against the plain run"),
    "lambda": (_lambda, "LDS against lambda around the default rule's value (a diagnostic)"),
    "cli": (_cli, "seconds of fedtrak --help and fedtrak simulate --help (start-up cost)"),
    "noise": (_noise, "seconds of a noised Gram and a Skellam share from the cryptographic noise source"),
}


#: The benchmarks that show progress bars on a terminal (the others take seconds, or time themselves).
WITH_PROGRESS = ("lds", "memory", "scale", "secagg", "lambda")


def add_arguments(command: str, parser: argparse.ArgumentParser) -> None:
    """One sub-command per benchmark, each with a ``--json`` option."""
    sub = parser.add_subparsers(dest="bench", required=True, parser_class=OneLineParser)
    for name, (arguments, help_text) in BENCHES.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        arguments(p)
        if name in WITH_PROGRESS:
            p.add_argument("--quiet", action="store_true", help="no progress bars (none either when the output is "
                                                                 "not a terminal)")
        add_json(p)


def _choices(text: str, allowed: tuple[str, ...], flag: str) -> tuple[str, ...]:
    chosen = tuple(v.strip() for v in text.split(",") if v.strip())
    unknown = sorted(set(chosen) - set(allowed))
    if unknown or not chosen:
        raise FedtrakError(f"{flag}: unknown {unknown}; use {', '.join(allowed)}")
    return chosen


def _kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = sorted(set(kinds) - set(PROJECTORS))
    if unknown:
        raise FedtrakError(f"--projectors: unknown {unknown}; use {', '.join(PROJECTORS)}")
    return kinds


def _run_featurize(args: argparse.Namespace) -> tuple[object, str]:
    from fedtrak.simulations.bench.featurize import bench_featurize, format_table

    rows = bench_featurize(args.task, args.proj_dim, args.examples, args.traker_examples, _kinds(args.projectors))
    return rows, format_table(rows)


def _run_lds(args: argparse.Namespace) -> tuple[object, str]:
    from fedtrak.simulations.bench.lds import bench_lds, format_table
    from fedtrak.simulations.evaluation.groundtruth import DEFAULT_CACHE

    dims = [d if d == "identity" else int_list(d, "--proj-dims")[0] for d in args.proj_dims.split(",")]
    rows = bench_lds(args.task, args.out, dims, int_list(args.checkpoints, "--checkpoints"), args.subsets,
                     args.train_size, args.query_size, args.cache_dir or DEFAULT_CACHE,
                     projectors=_kinds(args.projectors), weightings=_choices(args.weightings, WEIGHTINGS, "--weightings"),
                     ensembles=_choices(args.ensembles, ENSEMBLES, "--ensembles"), progress=not args.quiet)
    return rows, format_table(rows)


def _run_memory(args: argparse.Namespace) -> tuple[object, str]:
    from fedtrak.simulations.bench.scale import bench_memory, format_rows

    rows = bench_memory(args.task, int_list(args.sizes, "--sizes"), args.proj_dim, _kinds(args.projectors),
                        progress=not args.quiet)
    return rows, format_rows(rows, ["task", "projector", "examples", "proj_dim", "seconds", "resident_before_mb",
                                    "featurize_peak_mb", "process_peak_mb"])


def _run_scale(args: argparse.Namespace) -> tuple[object, str]:
    from fedtrak.simulations.bench.scale import bench_scale, format_rows

    rows = bench_scale(args.task, args.out, int_list(args.clients, "--clients"), args.proj_dim,
                       projector=args.projector, query_size=args.query_size, progress=not args.quiet)
    return rows, format_rows(rows, ["clients", "examples_per_client", "wall_seconds", "rounds_seconds",
                                    "client_seconds_total", "server_compute_seconds", "flower_overhead_seconds",
                                    "flower_overhead_share", "peak_memory_mb"])


def _run_deploy(args: argparse.Namespace) -> tuple[object, str]:
    from fedtrak.simulations.bench.deploy import bench_deploy

    result = bench_deploy(args.out, args.task, args.nodes, args.examples, args.proj_dim, args.projector,
                          secure_agg=bool(args.secure_agg))
    return result, json.dumps(result, indent=2)


def _run_attacks(args: argparse.Namespace) -> tuple[object, str]:
    from fedtrak.simulations.attacks.bench import bench_attacks, format_table
    from fedtrak.simulations.attacks.inversion import InversionSettings

    dims = tuple(None if d.strip() == "identity" else positive_int(d) for d in args.proj_dims.split(","))
    sizes = tuple(positive_int(v) for v in args.owner_sizes.split(","))
    rows = bench_attacks(args.task, dims, tuple(epsilons(args.epsilons)), args.targets, sizes,
                         inversion=InversionSettings(steps=args.steps, restarts=args.restarts,
                                                     label_candidates=args.label_candidates),
                         figure=args.figure)
    return rows, format_table(rows)


def _run_secagg(args: argparse.Namespace) -> tuple[object, str]:
    from fedtrak.simulations.bench.secagg import bench_secagg, format_table

    result = bench_secagg(args.task, args.out, args.clients, args.proj_dim, args.checkpoints,
                          0.0 if args.epsilon is None or math.isinf(args.epsilon) else args.epsilon,
                          progress=not args.quiet)
    return result, format_table(result)


def _run_lambda(args: argparse.Namespace) -> tuple[object, str]:
    from fedtrak.simulations.bench.lambdas import bench_lambda, format_table
    from fedtrak.simulations.evaluation.groundtruth import DEFAULT_CACHE

    try:
        factors = [float(f) for f in args.factors.split(",") if f.strip()]
    except ValueError:
        raise FedtrakError(f"--factors must be comma-separated numbers, got {args.factors!r}") from None
    rows = bench_lambda(args.task, args.out, factors, args.checkpoints, args.proj_dim,
                        _choices(args.weightings, WEIGHTINGS, "--weightings"), args.subsets,
                        args.cache_dir or DEFAULT_CACHE, progress=not args.quiet)
    return rows, format_table(rows)


def _run_cli(args: argparse.Namespace) -> tuple[object, str]:
    from fedtrak.simulations.bench.cli import bench_cli, format_rows

    rows = bench_cli(args.repeats)
    return rows, format_rows(rows)


def _run_noise(args: argparse.Namespace) -> tuple[object, str]:
    from fedtrak.simulations.bench.noise import bench_noise, format_table

    rows = bench_noise(args.proj_dim, args.repeats)
    return rows, format_table(rows)


RUNS: dict[str, Callable[[argparse.Namespace], tuple[object, str]]] = {
    "featurize": _run_featurize, "lds": _run_lds, "memory": _run_memory, "scale": _run_scale,
    "deploy": _run_deploy, "attacks": _run_attacks, "secagg": _run_secagg, "lambda": _run_lambda, "cli": _run_cli,
    "noise": _run_noise}


def bench(args: argparse.Namespace) -> int:
    """Run one benchmark, print its table and (``--json``) write its result."""
    result, table = RUNS[args.bench](args)
    print(table)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"bench": bench}

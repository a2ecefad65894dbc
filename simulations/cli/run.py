"""``fedtrak simulate``, ``attribute`` and ``train``: the runs themselves."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from fedtrak.results.answer import answer_lines
from fedtrak.simulations.cli.flags import add_settings, flag_keys, settings_from

if TYPE_CHECKING:
    from fedtrak.results.summary import RunSummary

#: The settings each run command offers as options.
KEYS = {
    "simulate": flag_keys(("task", "partition", "training", "projection", "kernel", "privacy", "secagg",
                           "release", "run")),
    "attribute": flag_keys(("task", "partition", "training", "projection", "kernel", "release", "run"),
                           exclude=("train", "rounds", "local-epochs", "dp-train-noise", "dp-train-clip",
                                    "mode", "policy", "timeout")),
    "train": ["task", "train-size", "query-size", "seed", "checkpoints", "epochs"],
}


def add_arguments(command: str, parser: argparse.ArgumentParser) -> None:
    """The options of ``command``: its settings, and how much it prints."""
    add_settings(parser, KEYS[command])
    if command == "train":
        parser.add_argument("--out", type=Path, required=True, help="checkpoint folder to write")
        return
    parser.add_argument("--quiet", action="store_true", help="no progress bars (none either when the output "
                                                             "is not a terminal)")
    if command == "simulate":
        parser.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs and warnings")
        parser.add_argument("--ray-address", metavar="HOST:PORT", help="run the virtual clients on this running "
                            "Ray cluster (its head node's address, or auto) instead of this machine's cores")


def simulate(args: argparse.Namespace) -> int:
    """Run the federated attribution on Flower's simulation engine and print what it found."""
    from fedtrak.simulations.simulate import run_simulation

    settings = settings_from(args, KEYS["simulate"], allow_full=args.policy == "full")
    summary = run_simulation(settings, verbose=args.verbose, progress=not args.quiet, ray_address=args.ray_address)
    out = settings.out_dir("simulation")
    print_federated(summary, out)
    print("\n".join(answer_lines(out, summary)))
    return 0


def attribute(args: argparse.Namespace) -> int:
    """Run the centralized reference attribution."""
    from fedtrak.simulations.attribute import run_attribute

    settings = settings_from(args, KEYS["attribute"])
    summary = run_attribute(settings, progress=not args.quiet)
    out = settings.out_dir("central")
    print(f"wrote {out}: {summary.num_queries} queries x {summary.num_train} "
          f"examples, M={summary.num_checkpoints}, k={summary.proj_dim}, "
          f"{summary.total_seconds:.1f} s, peak {summary.peak_memory_mb} MiB")
    print("\n".join(answer_lines(out, summary)))
    return 0


def train(args: argparse.Namespace) -> int:
    """Train checkpoints only."""
    from fedtrak.data.checkpoints import train_checkpoints
    from fedtrak.data.tasks import load_task

    task = load_task(args.task, args.train_size, args.query_size)
    infos = train_checkpoints(task, args.checkpoints, args.out, args.seed, args.epochs)
    for info in infos:
        print(f"{args.out / info.file}: seed {info.seed}, query accuracy {info.accuracy:.4f}")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "simulate": simulate, "attribute": attribute, "train": train}


def print_federated(summary: RunSummary, out: Path) -> None:
    """What a federated run did: its shape, seconds, bytes, privacy and exclusions."""
    secs, clients = summary.seconds, summary.clients
    per_client = (clients.bytes_sent + clients.bytes_received) / max(len(clients.clients), 1)
    print(f"wrote {out}: {summary.mode} mode, release {summary.release_policy}, "
          f"{len(summary.owners)} owners, {summary.num_queries} queries x {summary.num_train} "
          f"examples, M={summary.num_checkpoints}, k={summary.proj_dim}, {summary.total_seconds:.1f} s")
    print("  seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in secs.items() if k != "total"))
    print(f"  bytes per client (sent + received): {per_client / 1e6:.2f} MB")
    secure = summary.secure_aggregation
    if secure:
        rounds = ", ".join(f"{k.split('.')[-1]} {v['seconds']:.2f} s" for k, v in secure["rounds"].items())
        print(f"  secure aggregation: {secure['survivors']} of {secure['clients']} clients in the sum "
              f"(threshold {secure['threshold']}, {secure['graph']} graph, degree {secure['degree']}); {rounds}")
    training = summary.training_privacy
    if training.get("dp_sgd"):
        both, alone = training.get("epsilon_with_attribution_max"), training.get("epsilon_max")
        print("  training (DP-SGD): " + (f"epsilon up to {alone:.3g} per client; " if alone is not None else "")
              + ("" if both is None else f"with the attribution releases, up to {both:.3g}"))
    for ex in clients.excluded:
        print(f"  excluded: {ex.name}: {ex.reason.splitlines()[0]}")

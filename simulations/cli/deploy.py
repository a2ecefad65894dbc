"""``fedtrak certs``, ``keys`` and ``device``: setting up a deployment and a device owner's view."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from fedtrak.client.node_settings import node_specs
from fedtrak.config.settings import Settings
from fedtrak.errors import FedtrakError
from fedtrak.simulations.cli import OneLineParser
from fedtrak.simulations.cli.flags import add_json, add_settings, positive_int


def _certs_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="folder for ca.crt, ca.key, server.pem, server.key")
    p.add_argument("--host", action="append", default=[], required=True,
                   help="the SuperLink's host name or IP address (repeat for several)")
    p.add_argument("--force", action="store_true", help="replace existing keys")


def _keys_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="folder for NAME and NAME.pub")
    p.add_argument("--name", default="supernode", help="file name of the key pair (default supernode)")
    p.add_argument("--force", action="store_true", help="replace an existing key pair")


#: The run's settings ``fedtrak device check`` takes (its options, or an ``--app``'s run config).
CHECK_KEYS = ["task", "proj-dim", "projector", "weighting", "checkpoints", "noise-multiplier", "clip-norm",
              "secure-agg", "policy", "kernel-source"]


def _check_settings(args: argparse.Namespace, app_config: dict) -> dict:
    """The check's run settings by field name: each option given, else the app's run config (``""``:
    unset there), else the setting's default."""
    out = {}
    for key, spec in Settings.specs().items():
        if key in CHECK_KEYS:
            app = app_config.get(key, "")
            out[spec.name] = getattr(args, spec.name, spec.default if app in ("", None) else spec.coerce(app))
    return out


def _device_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="device", required=True, parser_class=OneLineParser)
    check = sub.add_parser("check", help="load the data, featurize one batch, list what would leave the device")
    add_settings(check, CHECK_KEYS, defaults={"task": None})
    for action in check._actions:  # unset when not given: --app's run config comes before the defaults
        if action.dest in {Settings.specs()[k].name for k in CHECK_KEYS}:
            action.default = argparse.SUPPRESS
    next(a for a in check._actions if a.dest == "task").help += " (default: --app's task, else digits-logreg)"
    check.add_argument("--app", type=Path, default=None,
                       help="a Flower app's folder (its pyproject.toml): import its ClientApp, as a SuperNode "
                            "running it does, so that the tasks it registers load by name; its run config's "
                            "task and settings are the defaults of the options above")
    check.add_argument("--data", type=Path, required=True, help="the device's .npz with x and y")
    check.add_argument("--ledger", type=Path, default=None,
                       help="show the device's privacy ledgers: its store-dir (one ledger per owner folder in "
                            "it) or one ledger file")
    add_settings(check, ["privacy-budget", "privacy-budget-delta"], specs=node_specs())  # as in the node config
    check.add_argument("--queries", type=positive_int, default=None,
                       help="queries the server will score (default: the size of the task's query set)")
    add_json(check, "the report")
    start = sub.add_parser("start", help="run flower-supernode with the arguments after --, starting it again "
                                         "while the SuperLink still holds this device's node from before a crash")
    start.add_argument("--activation-wait", type=float, default=None,
                       help="seconds to keep starting a SuperNode whose activation is refused (default 75: the "
                            "SuperLink holds a crashed node online for 60 s after its last heartbeat)")
    start.add_argument("supernode_args", nargs=argparse.REMAINDER, metavar="-- FLOWER_SUPERNODE_ARGS",
                       help="flower-supernode's own arguments, after --")
    results = sub.add_parser("results", help="print what a topk run kept on this device")
    results.add_argument("folder", type=Path, help="the store's run folder, its results folder or the store root")
    results.add_argument("--queries", type=positive_int, default=5)


ARGUMENTS: dict[str, Callable[[argparse.ArgumentParser], None]] = {
    "certs": _certs_args, "keys": _keys_args, "device": _device_args}


def add_arguments(command: str, parser: argparse.ArgumentParser) -> None:
    """The options of ``command``."""
    ARGUMENTS[command](parser)


def certs(args: argparse.Namespace) -> int:
    """A CA and a SuperLink certificate for the given host names."""
    from fedtrak.server.certs import make_certificates

    paths = make_certificates(args.out, args.host, args.force)
    print(f"wrote {', '.join(str(p) for p in paths.values())} for {', '.join(args.host)}")
    print(f"  SuperLink: --ssl-ca-certfile {paths['ca.crt']} --ssl-certfile {paths['server.pem']} "
          f"--ssl-keyfile {paths['server.key']}")
    print(f"  SuperNodes and flwr: trust {paths['ca.crt']}; keep {paths['ca.key']} offline")
    return 0


def keys(args: argparse.Namespace) -> int:
    """A SuperNode's authentication key pair."""
    from fedtrak.client.keys import make_node_keys

    private, public = make_node_keys(args.out, args.name, args.force)
    print(f"wrote {private} (private, stays on this device) and {public} (register it: "
          f"flwr supernode register {public} FEDERATION)")
    return 0


def device(args: argparse.Namespace) -> int:
    """What a device would send in a run (``check``) or kept from one (``results``); ``start``: its
    SuperNode, started again while the SuperLink still holds it from before a crash."""
    from fedtrak.client.device import (
        describe_ledgers,
        device_report,
        format_report,
        format_results,
        load_app,
        read_results,
    )

    if args.device == "start":
        from fedtrak.client.launcher import ACTIVATION_WAIT, start_supernode

        rest = args.supernode_args[1:] if args.supernode_args[:1] == ["--"] else args.supernode_args
        if not rest:
            raise FedtrakError("give flower-supernode's arguments after --: fedtrak device start -- --superlink ...")
        return start_supernode(rest, ACTIVATION_WAIT if args.activation_wait is None else args.activation_wait)
    if args.device == "results":
        print(format_results(read_results(args.folder), args.queries))
        return 0
    # every owner's ledger in a store-dir, or the one file given; a path without any fails first
    ledgers = None if args.ledger is None else describe_ledgers(args.ledger, args.privacy_budget,
                                                                args.privacy_budget_delta)
    s = _check_settings(args, load_app(args.app) if args.app is not None else {})
    if s["noise_multiplier"] < 0:
        raise FedtrakError(f"--noise-multiplier must be >= 0, got {s['noise_multiplier']}")
    report = device_report(s["task"] or Settings().task.task, args.data, s["proj_dim"], s["projector"],
                           s["checkpoints"], args.queries, s["noise_multiplier"], s["clip_norm"],
                           bool(s["secure_agg"]), s["policy"], weighting=s["weighting"],
                           kernel_source=s["kernel_source"])
    if ledgers is not None:
        report["ledgers"] = ledgers
        if len(ledgers) == 1:  # the report's former key, for one ledger
            report["ledger"] = ledgers[0]
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"certs": certs, "keys": keys, "device": device}

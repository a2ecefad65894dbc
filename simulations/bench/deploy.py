"""A real Flower deployment: a SuperLink with TLS and node authentication, SuperNodes with their own
data files and Flower homes, and ``flwr run``; every process it starts is stopped on exit.

By default everything runs on 127.0.0.1. Given network namespaces, the SuperLink (and the
operator's ``flwr`` commands) run in one and listen on an address there, and the SuperNodes run in
another and reach it over the link between them (the deployment tests make two namespaces joined by
a veth pair). Used by the deployment tests and by ``fedtrak bench deploy``. Everything goes through
the public commands a user runs (``fedtrak certs``/``keys``, ``flower-superlink``, ``flwr supernode
register``, ``flower-supernode``, ``flwr run``, ``flwr ls``), each in its own session.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Self

import numpy as np

from fedtrak.client.keys import make_node_keys
from fedtrak.errors import FedtrakError
from fedtrak.results.summary import load as load_summary
from fedtrak.server.certs import make_certificates


def app_dir() -> Path:
    """The source checkout whose ``pyproject.toml`` declares the Flower app (``flwr run`` builds
    the app from it).

    Raises:
        FedtrakError: if fedtrak runs from an installed wheel, without its source checkout.
    """
    for folder in Path(__file__).resolve().parents:
        if (folder / "pyproject.toml").is_file() and (folder / "server" / "app.py").is_file():
            return folder
    raise FedtrakError("the loopback deployment runs `flwr run` on fedtrak's source checkout; "
                       "this fedtrak is installed without one")
BIN = Path(sys.executable).parent
FEDERATION = "fedtrak-loopback"


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def in_namespace(namespace: str | None) -> list[str]:
    """The command prefix that runs a command in a network namespace (none: here)."""
    return ["ip", "netns", "exec", namespace] if namespace else []


class Deployment:
    """One SuperLink and its SuperNodes under ``work``; use as a context manager.

    ``host``: the address devices reach the SuperLink at, which its certificate names; ``listen``:
    its ``--host`` (default ``host``; ``0.0.0.0``: every interface); ``link_ns`` and
    ``node_ns``: the network namespaces of the SuperLink (with the operator's ``flwr`` commands)
    and of the SuperNodes (``None``: this one)."""

    def __init__(self, work: Path, host: str = "127.0.0.1", link_ns: str | None = None,
                 node_ns: str | None = None, app: Path | None = None, listen: str | None = None) -> None:
        self.work = Path(work)
        self.host, self.link_ns, self.node_ns = host, link_ns, node_ns
        self.listen = listen or host  # the SuperLink's --host: its address, or 0.0.0.0 for every interface
        self.app = app
        self.port = free_port()
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        self.commands: dict[str, list[str]] = {}
        self.by_name: dict[str, subprocess.Popen] = {}
        self.envs: dict[str, dict[str, str]] = {}
        self.node_ids: dict[str, int] = {}
        self.certs = self.work / "certs"
        self.home = self.work / "flwr-home"
        self.env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                    "FLWR_HOME": str(self.home), "FLWR_TELEMETRY_ENABLED": "0",
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}

    @property
    def address(self) -> str:
        """``HOST:PORT`` of the SuperLink, as SuperNodes and ``flwr`` reach it."""
        return f"{self.host}:{self.port}"

    def __enter__(self) -> Self:
        self.home.mkdir(parents=True, exist_ok=True)
        make_certificates(self.certs, [self.host])
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{FEDERATION}"\n\n[superlink.{FEDERATION}]\n'
            f'address = "{self.address}"\nroot-certificates = "{self.certs / "ca.crt"}"\n')
        link = self.start("superlink", [*in_namespace(self.link_ns), str(BIN / "flower-superlink"),
                                        "--host", self.listen, "--port", str(self.port),
                                        "--ssl-ca-certfile", str(self.certs / "ca.crt"),
                                        "--ssl-certfile", str(self.certs / "server.pem"),
                                        "--ssl-keyfile", str(self.certs / "server.key"),
                                        "--enable-supernode-auth", "--disable-runtime-dependency-installation"])
        self._wait_for_port(link, self.logs[-1])
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start a process in its own session, its output in ``work/NAME.log``."""
        log = self.work / f"{name}.log"
        self.logs.append(log)
        self.procs.append(subprocess.Popen(cmd, cwd=self.work, env=env or self.env, stdout=log.open("w"),
                                           stderr=subprocess.STDOUT, start_new_session=True))
        self.commands.setdefault(name, cmd)
        self.envs.setdefault(name, env or self.env)
        self.by_name[name] = self.procs[-1]
        return self.procs[-1]

    def kill(self, name: str) -> None:
        """Kill a process and its children at once (SIGKILL: a device losing power)."""
        proc = self.by_name[name]
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()

    def restart(self, name: str) -> subprocess.Popen:
        """Start a killed process again with its first command; its output goes to NAME-restarted.log."""
        return self.start(f"{name}-restarted", self.commands[name], self.envs[name])

    def node_status(self, name: str) -> str:
        """The SuperLink's status of a registered SuperNode (``flwr supernode list``)."""
        out = self.flwr("supernode", "list", FEDERATION, "--format", "json")
        nodes = json.loads(out.stdout).get("nodes", []) if out.stdout.strip().startswith("{") else []
        return next((n["status"] for n in nodes if int(n["node-id"]) == self.node_ids[name]), "unknown")

    def keys(self, name: str, register: bool = True) -> Path:
        """A SuperNode key pair (``fedtrak keys``), registered with ``flwr supernode register``."""
        private, public = make_node_keys(self.work / "keys", name)
        if register:
            reg = self.flwr("supernode", "register", str(public), FEDERATION, "--format", "json")
            node_id = re.search(r'"node-id":\s*"?(\d+)', reg.stdout)
            if reg.returncode != 0 or not node_id:
                raise FedtrakError(f"flwr supernode register failed: {reg.stdout}{reg.stderr}")
            self.node_ids[name] = int(node_id.group(1))
        return private

    def flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """A ``flwr`` command of the operator's, where the SuperLink runs."""
        return subprocess.run([*in_namespace(self.link_ns), str(BIN / "flwr"), *args], env=self.env,
                              capture_output=True, text=True, timeout=timeout, check=False)

    def supernode(self, name: str, x: np.ndarray, y: np.ndarray, key: Path, ca: Path | None = None,
                  node_config: str = "", launcher_wait: float | None = None) -> None:
        """Start a SuperNode with its own data file, Flower home and store (and node key, trusting
        ``ca``, default ours); ``node_config``: more of its node config. ``launcher_wait``: start it
        through ``fedtrak device start``, which retries a refused activation for that many seconds."""
        data = self.work / f"{name}.npz"
        np.savez(data, x=x, y=y)
        config = f"data-path='{data}' owner='{name}' store-dir='{self.work / f'store-{name}'}' {node_config}"
        home = self.work / f"flwr-home-{name}"
        home.mkdir(parents=True, exist_ok=True)
        program = [str(BIN / "flower-supernode")] if launcher_wait is None else [
            str(BIN / "fedtrak"), "device", "start", "--activation-wait", f"{launcher_wait:g}", "--"]
        self.start(name, [*in_namespace(self.node_ns), *program, "--superlink", self.address,
                          "--root-certificates", str(ca or self.certs / "ca.crt"),
                          "--auth-supernode-private-key", str(key), "--port", str(free_port()),
                          "--node-config", config.strip()], {**self.env, "FLWR_HOME": str(home)})

    def run(self, run_config: str, timeout: float = 400) -> dict:
        """``flwr run --stream`` the app (the ServerApp's log goes to ``work/flwr-run.log``), wait
        for the run to finish, return its ``flwr ls`` record.

        Raises:
            FedtrakError: if it cannot be launched or does not complete (with the logs' tails).
        """
        launched = self.flwr("run", str(self.app or app_dir()), FEDERATION, "--run-config", run_config, "--stream",
                             timeout=timeout)
        log = self.work / "flwr-run.log"
        with log.open("a") as f:
            f.write(launched.stdout + launched.stderr)
        if log not in self.logs:
            self.logs.append(log)
        run_id = re.search(r"run (\d+)", launched.stdout + launched.stderr)
        if launched.returncode != 0 or not run_id:
            raise FedtrakError(f"flwr run failed: {launched.stdout}{launched.stderr}")
        status = self._run_status(run_id.group(1), timeout)
        if status["status"] != "finished:completed":
            raise FedtrakError(f"run {status}\n" + self.log_tails())
        return status

    def log_tails(self) -> str:
        """The last lines of every process's log."""
        return "\n".join(f"== {p.name}\n" + p.read_text()[-2000:] for p in self.logs if p.exists())

    def stop(self) -> None:
        """Stop every process started, whole process groups (SuperExec, app processes) included.

        Raises:
            FedtrakError: if a process group survives SIGKILL.
        """
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 15
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for p in self.procs:
            for _ in range(50):
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                raise FedtrakError(f"process group {p.pid} survived")
        self.procs = []

    def _wait_for_port(self, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        probe = f"import socket, sys; sys.exit(socket.socket().connect_ex(({self.host!r}, {self.port})))"
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise FedtrakError(f"process exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            if self.link_ns:  # reachable only from inside its namespace
                if subprocess.run([*in_namespace(self.link_ns), sys.executable, "-c", probe],
                                  check=False, timeout=30).returncode == 0:
                    return
            else:
                with socket.socket() as s:
                    if s.connect_ex((self.host, self.port)) == 0:
                        return
            time.sleep(0.3)
        raise FedtrakError(f"nothing listens on port {self.port} after {timeout} s:\n{log.read_text()[-3000:]}")

    def _run_status(self, run_id: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.flwr("ls", FEDERATION, "--format", "json")
            runs = json.loads(out.stdout).get("runs", []) if out.stdout.strip().startswith("{") else []
            for run in runs:
                if str(run["run-id"]) == run_id and run["status"].startswith("finished"):
                    return run
            time.sleep(2)
        raise FedtrakError(f"run {run_id} did not finish within {timeout} s\n" + self.log_tails())


def bench_deploy(work: Path, task_name: str = "fmnist-mlp", nodes: int = 1, examples: int = 6000,
                 proj_dim: int = 2048, projector: str = "factorized", checkpoints: int = 1,
                 secure_agg: bool = False) -> dict:
    """A loopback deployment with TLS and node authentication: seconds per protocol round and the
    SuperNodes' ClientApp peak memory (from their replies), for ``examples`` examples per node."""
    from fedtrak.data.checkpoints import train_checkpoints
    from fedtrak.data.tasks import load_task

    work = Path(work)
    task = load_task(task_name, nodes * examples, 100)
    ckpts = work / "checkpoints"
    if not (ckpts / "manifest.json").exists():
        train_checkpoints(task, checkpoints, ckpts)
    out = work / "run"
    with Deployment(work) as dep:
        for i in range(nodes):
            rows = slice(i * examples, (i + 1) * examples)
            dep.supernode(f"node{i}", task.x_train[rows], task.y_train[rows], dep.keys(f"node{i}"))
        start = time.perf_counter()
        dep.run(f"task='{task_name}' query-size=100 clients={nodes} checkpoints={checkpoints} "
                f"checkpoint-dir='{ckpts}' out='{out}' proj-dim={proj_dim} projector='{projector}' "
                f"wait-for-nodes=120.0 secure-agg={'true' if secure_agg else 'false'}")
        wall = time.perf_counter() - start
    summary = load_summary(out)
    rounds = {k: v for k, v in summary.seconds.items() if k.endswith("_round")}
    return {"task": task_name, "nodes": nodes, "examples_per_node": examples, "proj_dim": proj_dim,
            "projector": projector, "tls": True, "node_auth": True, "secure_agg": secure_agg,
            "wall_seconds": round(wall, 1), "round_seconds": rounds,
            "client_seconds": dict(summary.clients.client_seconds),
            "client_peak_memory_mb": dict(summary.clients.client_peak_memory_mb)}

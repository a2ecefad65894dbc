"""A device owner's view: what the device would send (``fedtrak device check``), validated data,
and the images of kept results."""

from __future__ import annotations

import numpy as np
import pytest

from fedtrak.client.device import device_report, format_report, image_shape, write_strip
from fedtrak.errors import FedtrakError
from fedtrak.simulations.cli import main


@pytest.fixture
def device_file(tmp_path, digits_logreg):
    path = tmp_path / "mine.npz"
    np.savez(path, x=digits_logreg.x_train[:120], y=digits_logreg.y_train[:120])
    return path


def test_device_check_lists_every_release_with_its_size(device_file, capsys):
    plain = device_report("digits-logreg", device_file, proj_dim=64, checkpoints=2, queries=10)
    assert plain["examples"] == 120 and plain["proj_dim"] == 64 and plain["batch"]["finite"]
    assert [r["bytes"] for r in plain["releases"]] == [8 * 2 * 64 * 65 // 2, 8, 8 * 10]
    assert plain["noise"] is False and plain["clip_norm"] is None and "exact" in format_report(plain)
    private = device_report("digits-logreg", device_file, proj_dim=64, checkpoints=2, noise_multiplier=1.5,
                            secure_agg=True)
    assert private["clip_norm"] == 5.0 and private["noise"]
    assert [r["what"].split(":")[0] for r in private["releases"]] == [
        "masked vector", "example count", "owner summaries (the server derives owner totals)"]
    assert private["releases"][0]["shape"] == [2 * 64 * 65 // 2 + 1]
    assert main(["device", "check", "--task", "digits-logreg", "--data", str(device_file), "--proj-dim", "64"]) == 0
    assert "this device would send:" in capsys.readouterr().out


def test_device_check_names_bad_data(tmp_path, digits_logreg):
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=digits_logreg.x_train[:5, :10], y=digits_logreg.y_train[:5])
    with pytest.raises(FedtrakError, match=r"bad.npz: the data file.s x has shape \(5, 10\), task digits-logreg expects \(N, 64\)"):
        device_report("digits-logreg", bad)
    with pytest.raises(FedtrakError, match="does not exist"):
        device_report("digits-logreg", tmp_path / "missing.npz")


def test_image_strips_for_image_tasks_only(tmp_path):
    assert image_shape(np.zeros((3, 64))) == (8, 8) and image_shape(np.zeros((3, 1, 28, 28))) == (28, 28)
    assert image_shape(np.zeros((3, 10))) is None
    x = np.random.default_rng(0).uniform(size=(10, 64))
    path = write_strip(tmp_path / "s.png", x, [("q0 +", np.array([1, 2]), np.array([0.5, 0.2]))])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert write_strip(tmp_path / "t.png", np.zeros((3, 10)), [("q", np.array([0]), np.array([1.0]))]) is None


def test_device_check_finds_every_ledger_of_a_store_and_names_a_path_without_one(tmp_path, device_file, capsys):
    """--ledger takes a ledger file, or a folder: its own ledger and one per owner folder in it (a
    store-dir's owner-<name>/ and partition-<i>/); a missing path, or a folder with no ledger in
    either place, is an error naming the path, not an empty ledger."""
    from fedtrak.client.device import find_ledgers
    from fedtrak.client.ledger import LEDGER_FILE

    store = tmp_path / "store"
    for folder in ("owner-clinic-0", "partition-1", "owner-no-ledger"):
        (store / folder).mkdir(parents=True)
    for path in (store / "owner-clinic-0" / LEDGER_FILE, store / "partition-1" / LEDGER_FILE):
        path.write_text("{}")  # only found here, not read
    assert find_ledgers(store) == [store / "owner-clinic-0" / LEDGER_FILE, store / "partition-1" / LEDGER_FILE]
    assert find_ledgers(store / "partition-1") == [store / "partition-1" / LEDGER_FILE]
    assert find_ledgers(store / "partition-1" / LEDGER_FILE) == [store / "partition-1" / LEDGER_FILE]
    (store / LEDGER_FILE).write_text("{}")
    assert find_ledgers(store)[0] == store / LEDGER_FILE and len(find_ledgers(store)) == 3
    check = ["device", "check", "--task", "digits-logreg", "--data", str(device_file), "--ledger"]
    assert main([*check, str(tmp_path / "missing")]) == 2
    assert f"--ledger {tmp_path / 'missing'} does not exist" in capsys.readouterr().err
    assert main([*check, str(store / "owner-no-ledger")]) == 2
    err = capsys.readouterr().err
    assert f"--ledger {store / 'owner-no-ledger'} holds no privacy ledger" in err and "0 run(s)" not in err


@pytest.mark.flower
def test_device_check_shows_each_owners_ledger_of_a_store_dir_after_a_run(tmp_path, device_file, logreg_ckpt_dir,
                                                                          capsys):
    """After a run without noise, each owner of the store-dir has it in its ledger at unbounded
    epsilon: device check given the store-dir shows both owners' ledgers, not an empty one."""
    import json

    from fedtrak.config.settings import Settings
    from fedtrak.simulations.simulate import run_simulation

    store = tmp_path / "store"
    summary = run_simulation(Settings.from_flat({
        "clients": 2, "partition": "iid", "checkpoint-dir": str(logreg_ckpt_dir), "checkpoints": 1,
        "proj-dim": 32, "out": str(tmp_path / "run"), "store-dir": str(store)}))
    report = tmp_path / "report.json"
    check = ["device", "check", "--task", "digits-logreg", "--data", str(device_file), "--proj-dim", "32"]
    assert main([*check, "--ledger", str(store), "--privacy-budget", "5", "--json", str(report)]) == 0
    out = capsys.readouterr().out
    for owner in ("partition-0", "partition-1"):
        assert f"privacy ledger of {owner} ({store / owner}" in out
    assert out.count("1 run(s), spent epsilon unbounded") == 2
    ledgers = json.loads(report.read_text())["ledgers"]
    assert [led["owner_folder"] for led in ledgers] == ["partition-0", "partition-1"]
    for led in ledgers:
        assert [r["run_id"] for r in led["runs"]] == [summary.run_id]
        assert led["spent_epsilon"] is None and led["left_epsilon"] == 0 and led["budget_epsilon"] == 5
    assert main([*check, "--ledger", str(store / "partition-1"), "--json", str(report)]) == 0
    shown = json.loads(report.read_text())
    assert [led["owner_folder"] for led in shown["ledgers"]] == ["partition-1"]
    assert shown["ledger"]["runs"][0]["run_id"] == summary.run_id


def _bad_file_reply(handler, step: str, content_of, settings: dict, tmp_path, digits_logreg) -> str:
    """The error reason ``handler`` replies with, as a device whose data file (``tmp_path/clinic/mine.npz``)
    has 13 columns where the task has 64, to a ``step`` message whose content ``content_of(job)`` makes
    for a job of ``settings``."""
    from flwr.app import Context, Message, RecordDict
    from flwr.common import Metadata

    from fedtrak.config.settings import Settings
    from fedtrak.server.preflight import preflight
    from fedtrak.wire.job import Job

    bad = tmp_path / "clinic" / "mine.npz"
    bad.parent.mkdir(exist_ok=True)
    np.savez(bad, x=digits_logreg.x_train[:10, :13], y=digits_logreg.y_train[:10])
    s = Settings().replaced(clients=3, checkpoints=1, proj_dim=16, **settings)
    plan = preflight(s)
    job = Job("paths", s, plan.resolved).fingerprinted(plan.task)  # the file fails before any run is bound
    meta = Metadata(run_id=1, message_id="m", src_node_id=1, dst_node_id=7, reply_to_message_id="", group_id="",
                    created_at=0.0, ttl=60.0, message_type=step)
    ctx = Context(run_id=1, node_id=7, node_config={"data-path": str(bad), "store-dir": str(tmp_path / "store")},
                  state=RecordDict(), run_config={})
    return handler(Message(metadata=meta, content=content_of(job)), ctx).error.reason


def test_an_error_reply_for_a_bad_data_file_names_the_problem_and_no_local_path(tmp_path, digits_logreg, capfd,
                                                                                  caplog):
    """A device whose data file has the wrong shape replies to the server with the problem (x's shape
    and the task's) but without the file's path or any other local path; its own log keeps the path."""
    from fedtrak import wire
    from fedtrak.client.app import QUERIES

    reason = _bad_file_reply(QUERIES["score"], "query.score", lambda job: wire.encode_score_request(
        wire.ScoreRequest(job, "owner-totals", 0, {0: np.zeros((2, 16))})), {}, tmp_path, digits_logreg)
    assert "score: the data file's x has shape (10, 13), task digits-logreg expects (N, 64)" in reason, reason
    assert str(tmp_path) not in reason and "mine.npz" not in reason and "/" not in reason and "clinic" not in reason
    bad = tmp_path / "clinic" / "mine.npz"
    logged = capfd.readouterr().err + caplog.text  # the device's log: on stderr, or where logging was sent
    assert f"data file {bad}: the data file's x has shape (10, 13)" in logged


def test_what_leaves_a_device_has_its_local_paths_taken_out(tmp_path):
    """Any text an error reply carries: the data file, the store and every other absolute path (in
    the home folder or not) become placeholders; shapes, fractions and URLs stay."""
    from pathlib import Path

    from fedtrak.client.node_settings import without_local_paths

    config = {"data-path": str(tmp_path / "mine.npz"), "store-dir": str(tmp_path / "store")}
    text = (f"cannot read {tmp_path / 'mine.npz'}; kept release {tmp_path / 'store' / 'owner-a' / 'r.npy'} "
            f"unreadable; key {Path.home() / 'keys' / 'k'}; File \"/usr/lib/python3/x.py\", line 3; "
            "shape (10, 13), 1/2, see https://flower.ai/docs")
    assert without_local_paths(text, config) == (
        "cannot read <data-path>; kept release <store-dir>/owner-a/r.npy unreadable; key <local path>; "
        "File \"<local path>\", line 3; shape (10, 13), 1/2, see https://flower.ai/docs")


def test_device_check_takes_a_flower_apps_task_by_its_name_with_its_own_query_count(tmp_path, capsys,
                                                                                    monkeypatch):
    """The own-Flower-app example: --app imports its ClientApp as a SuperNode does, so its task loads by
    the name it registers (and is the default --task, its run config's settings the defaults of the
    others); the check assumes the task's own query count (28 wines; digits: 149). Without --app the
    unknown name says how to make it known."""
    import json
    import sys
    from pathlib import Path

    app = Path(__file__).resolve().parents[1] / "examples" / "own_flower_app"
    monkeypatch.setattr(sys, "path", list(sys.path))  # the app's folder leaves with the test
    monkeypatch.delitem(sys.modules, "wineapp.client_app", raising=False)
    from fedtrak.data import tasks

    monkeypatch.setattr(tasks, "_REGISTERED", {})
    data = tmp_path / "wine.npz"
    np.savez(data, x=np.random.default_rng(0).normal(size=(30, 13)).astype(np.float32), y=np.arange(30) % 3)
    assert main(["device", "check", "--task", "wine-mlp", "--data", str(data)]) == 2
    assert "--app APP_FOLDER" in capsys.readouterr().err
    report = tmp_path / "r.json"
    assert main(["device", "check", "--app", str(app), "--data", str(data), "--json", str(report)]) == 0
    shown = json.loads(report.read_text())
    assert shown["task"] == "wine-mlp" and shown["queries"] == 28 and shown["releases"][-1]["shape"] == [28]
    assert shown["proj_dim"] == 64 and shown["checkpoints"] == 3  # the app's run config, not k = 512
    assert main(["device", "check", "--app", str(app), "--task", "wine-mlp", "--data", str(data),
                 "--proj-dim", "32", "--json", str(report)]) == 0  # an option given comes first
    assert "task wine-mlp: 30 examples" in capsys.readouterr().out and json.loads(report.read_text())["proj_dim"] == 32
    assert device_report("digits-logreg", _digits_file(tmp_path), proj_dim=16)["queries"] == 149


def _digits_file(tmp_path):
    from fedtrak.data.tasks import load_task

    task = load_task("digits-logreg")
    np.savez(tmp_path / "digits.npz", x=task.x_train[:20], y=task.y_train[:20])
    return tmp_path / "digits.npz"


def test_a_task_offered_by_an_installed_apps_entry_point_loads_by_name(tmp_path, monkeypatch):
    """An app installed with a ``fedtrak.tasks`` entry point (the example's pyproject declares one) is
    found by name, with no --app: a package's metadata on the path, as pip installs it."""
    import sys
    from pathlib import Path

    from fedtrak.data.tasks import load_task

    app = Path(__file__).resolve().parents[1] / "examples" / "own_flower_app"
    assert '[project.entry-points."fedtrak.tasks"]\nwine-mlp = "wineapp.task:wine_task"' in \
        (app / "pyproject.toml").read_text()
    info = tmp_path / "wine_attribution-1.0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: wine-attribution\nVersion: 1.0.0\n")
    (info / "entry_points.txt").write_text('[fedtrak.tasks]\nwine-mlp = wineapp.task:wine_task\n')
    monkeypatch.setattr(sys, "path", [str(tmp_path), str(app), *sys.path])
    task = load_task("wine-mlp")
    assert task.name == "wine-mlp" and task.input_shape == (13,) and len(task.y_query) == 28


FAKE_SUPERNODE = """
import sys, time
from pathlib import Path
count = Path(sys.argv[1])
n = int(count.read_text()) if count.exists() else 0
count.write_text(str(n + 1))
if n < int(sys.argv[2]):
    print("Failed to initialize the connection to the SuperLink.")
    print("[code: 2004] Failed to activate SuperNode.", flush=True)
    sys.exit(1)
if sys.argv[2] == "-1":
    print("CERTIFICATE_VERIFY_FAILED", flush=True)
    sys.exit(1)
print("SuperNode ID: 7", flush=True)
time.sleep(0.3)
"""


def test_device_start_retries_a_refused_activation_and_names_the_likely_cause(tmp_path, monkeypatch):
    """fedtrak device start runs flower-supernode (here a stand-in refused a given number of times),
    starts it again while the SuperLink refuses to activate it, says which cause is likely from the
    key's last sign of life, and gives up after the wait naming the registration command."""
    import io
    import sys
    import time

    from fedtrak.client import launcher

    monkeypatch.setattr(launcher, "RETRY_SECONDS", 0.05)
    script = tmp_path / "fake.py"
    script.write_text(FAKE_SUPERNODE)
    key = tmp_path / "keys" / "supernode"
    key.parent.mkdir()

    def start(refusals: int, wait: float = 30.0) -> tuple[int, str, list[str]]:
        out, said = io.StringIO(), []
        (tmp_path / "count").unlink(missing_ok=True)
        rc = launcher.start_supernode(["--auth-supernode-private-key", str(key)], wait,
                                      [sys.executable, str(script), str(tmp_path / "count"), str(refusals)],
                                      out, said.append)
        return rc, out.getvalue(), said

    rc, out, said = start(2)  # never seen active: either cause
    assert rc == 0 and out.count("Failed to activate SuperNode") == 2 and "SuperNode ID: 7" in out
    assert len(said) == 1 and "either this key is not registered" in said[0]
    state, when = (tmp_path / "keys" / "supernode.last-active").read_text().split()
    assert state == "stopped" and abs(float(when) - time.time()) < 30  # it exited cleanly
    (tmp_path / "keys" / "supernode.last-active").write_text(f"alive {time.time() - 12:.1f}\n")  # a crash
    rc, _, said = start(1)
    assert rc == 0 and "was alive 12 s ago and did not stop cleanly (a crash)" in said[0]
    assert f"until {launcher.HOLD_SECONDS} s after its last heartbeat" in said[0]
    rc, out, said = start(1000, wait=0.3)  # never activated within the wait
    assert rc == 2 and "less than it holds a crashed node (60 s after its last heartbeat): if it crashed" in said[-1]
    assert f"its key is not registered (the operator runs: flwr supernode register {key}.pub FEDERATION)" in said[-1]
    monkeypatch.setattr(launcher, "HOLD_SECONDS", 0.1)  # a wait longer than the hold: the key, most likely
    rc, out, said = start(1000, wait=0.3)
    assert rc == 2 and "longer than it holds a crashed node (0.1 s after its last heartbeat): most likely its key " \
        "is not registered" in said[-1]
    rc, out, said = start(-1)  # another failure: no retry, its own message
    assert rc == 1 and said == [] and out.count("CERTIFICATE_VERIFY_FAILED") == 1


def test_device_start_passes_what_follows_the_dashes_to_flower_supernode(monkeypatch, capsys):
    from fedtrak.client import launcher

    calls = []
    monkeypatch.setattr(launcher, "start_supernode", lambda args, wait: calls.append((args, wait)) or 0)
    assert main(["device", "start", "--", "--superlink", "h:9093", "--node-config", "owner='a'"]) == 0
    assert main(["device", "start", "--activation-wait", "30", "--", "--insecure"]) == 0
    assert calls == [(["--superlink", "h:9093", "--node-config", "owner='a'"], 75), (["--insecure"], 30.0)]
    assert main(["device", "start"]) == 2 and "after --" in capsys.readouterr().err


def test_the_supernode_dies_with_its_launcher(tmp_path):
    """kill -9 of fedtrak device start (supernode.pid) is a crash of its SuperNode, not an orphan."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "node.py"
    script.write_text("import os, time\nprint('SuperNode ID:', os.getpid(), flush=True)\ntime.sleep(60)\n")
    code = ("import sys; from fedtrak.client import launcher; "
            f"launcher.start_supernode([], 5, [sys.executable, {str(script)!r}])")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    node = int(proc.stdout.readline().split()[-1])
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(node, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(node, signal.SIGKILL)
    raise AssertionError("the SuperNode outlived its launcher")


def test_a_train_error_reply_says_why_unless_the_run_is_private(tmp_path, digits_logreg):
    """A FedAvg train message carries its job in its train config: a run without noise is told the
    reason (without the path), a private one only the step and the kind (the data's shape holds its
    example count), with no claim of differential privacy where there is none."""
    from flwr.app import ConfigRecord, RecordDict

    from fedtrak import wire
    from fedtrak.client.app import train
    from fedtrak.data.checkpoints import seeded_model

    def content_of(job):
        return RecordDict({wire.attribution.ARRAYS: wire.state_to_record(seeded_model(digits_logreg, 0).state_dict()),
                           wire.attribution.CONFIG: ConfigRecord({**wire.train_config(job, 0),
                                                                 wire.attribution.SERVER_ROUND: 1})})

    reasons = [_bad_file_reply(train, "train", content_of, {"rounds": 1, **extra}, tmp_path, digits_logreg)
               for extra in ({}, {"epsilon": 4.0})]
    assert "train: the data file's x has shape (10, 13), task digits-logreg expects (N, 64)" in reasons[0], reasons
    assert "train: the device failed (DataFileError); under differential privacy" in reasons[1], reasons
    assert all(str(tmp_path) not in r for r in reasons)


def test_a_task_whose_query_set_is_not_on_the_device_asks_for_queries(monkeypatch):
    from fedtrak.client import device
    from fedtrak.data.tasks import load_task

    def absent(name, *args, **kwargs):
        raise FedtrakError("no Fashion-MNIST here")

    task = load_task("fmnist-mlp", data=False)
    monkeypatch.setattr(device, "load_task", absent)
    with pytest.raises(FedtrakError, match=r"task fmnist-mlp's query set is not on this device .*give --queries"):
        device.task_queries(task)

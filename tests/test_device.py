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
    with pytest.raises(FedtrakError, match=r"x has shape \(5, 10\), task digits-logreg needs \(n, 64\)"):
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

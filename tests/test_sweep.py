"""``fedtrak sweep`` end to end on a small setting: every (mode, epsilon) point is a real
federated run with DP, evaluated; the table, CSV and plot are written."""

from __future__ import annotations

import csv
import math

import pytest

from fedtrak.simulations.cli import main
from fedtrak.simulations.sweep import Variant, keeps_fraction, variants


@pytest.mark.flower
@pytest.mark.slow
def test_small_sweep_writes_table_and_plot(tmp_path, capsys, monkeypatch):
    out = tmp_path / "sweep"
    args = ["sweep", "--task", "digits-logreg", "--train-size", "400", "--query-size", "60",
            "--clients", "4", "--checkpoints", "1", "--projector", "rademacher", "--proj-dim", "64", "--epsilons", "2,inf",
            "--modes", "private", "--subsets", "12", "--cache-dir", str(tmp_path / "gt"),
            "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    # under DP the default kernel is the public one; without noise the clients' exact Grams
    assert "| private (public) | 2 |" in printed and "| private (private) | inf | 0 |" in printed
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert [(r["mode"], r["kernel_source"], r["epsilon"]) for r in rows] == [
        ("private", "public", "2"), ("private", "private", "inf")]
    assert float(rows[0]["sigma"]) > 0 and float(rows[1]["sigma"]) == 0
    for r in rows:
        for key in ("lds", "owner_lds", "mislabel_auroc"):
            assert math.isfinite(float(r[key]))
    assert float(rows[1]["mislabel_auroc"]) > 0.8  # no noise: flipped labels stand out
    # the third measure: a one-example client's Gram gives its digit away without noise; at epsilon 2
    # (public kernel: no Gram) its noised owner summary does not
    assert float(rows[1]["attack_recovered"]) == 1.0 and float(rows[0]["attack_recovered"]) == 0.0
    assert float(rows[0]["attack_psnr"]) < float(rows[0]["attack_baseline_psnr"])
    assert float(rows[0]["membership_epsilon"]) < 2.0
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "sweep.md").read_text().startswith("| mode (kernel) | epsilon |")
    # run again: finished points are reused, not measured again (the simulation is not called)
    table = (out / "sweep.md").read_text()
    monkeypatch.setattr("fedtrak.simulations.sweep.run_simulation",
                        lambda settings: pytest.fail("a finished point was simulated again"))
    assert main(args) == 0
    assert (out / "sweep.md").read_text() == table


def test_keeps_fraction_finds_the_smallest_epsilon():
    rows = [{"mode": "private", "epsilon": e, "lds": v} for e, v in
            [(1.0, 0.2), (4.0, 0.5), (16.0, 0.58), (math.inf, 0.7)]]
    assert keeps_fraction(rows, "private", 0.8) == 16.0
    assert keeps_fraction(rows, "private", 0.7) == 4.0
    assert keeps_fraction(rows, "private", 0.9) is None
    assert keeps_fraction(rows, "features", 0.8) is None


def test_sweep_lines_cover_kernel_sources_and_secure_aggregation():
    """Private mode gets a line per kernel source and secure aggregation choice (a public kernel
    releases no Gram, so it is never forced through secure aggregation); features mode one line."""
    lines = variants(["private", "features"], ["private", "public", "hybrid"], [True, False])
    assert [v.label for v in lines] == ["private private secagg", "private private no-secagg",
                                        "private public no-secagg", "private hybrid secagg",
                                        "private hybrid no-secagg", "features"]
    assert Variant("private").label == "private" and Variant("private", "hybrid", True).slug == "private-hybrid-secagg"
    rows = [{"line": "private public", "mode": "private", "epsilon": e, "lds": v} for e, v in
            [(1.0, 0.6), (math.inf, 0.7)]] + [{"mode": "private", "epsilon": math.inf, "lds": 0.9}]
    assert keeps_fraction(rows, "private public") == 1.0 and keeps_fraction(rows, "private") is None


def test_sweep_refuses_bad_epsilons(tmp_path, capsys):
    assert main(["sweep", "--epsilons", "1,zero", "--out", str(tmp_path)]) == 2
    assert "--epsilons must be comma-separated" in capsys.readouterr().err
    assert main(["sweep", "--epsilons", "-1", "--out", str(tmp_path)]) == 2
    assert "epsilons must be positive" in capsys.readouterr().err
    assert main(["sweep", "--modes", "private,secret", "--out", str(tmp_path)]) == 2
    assert "secret" in capsys.readouterr().err
    assert main(["sweep", "--secure-agg", "maybe", "--out", str(tmp_path)]) == 2
    assert "--secure-agg 'maybe': use a comma-separated list of default, on, off" in capsys.readouterr().err
    assert main(["sweep", "--kernel-sources", "secret", "--out", str(tmp_path)]) == 2
    assert "kernel sources ['secret']" in capsys.readouterr().err

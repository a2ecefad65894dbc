"""``fedtrak sweep`` end to end on a small setting: every (mode, epsilon) point is a real
federated run with DP, evaluated; the table, CSV and plot are written; at a terminal it shows a bar."""

from __future__ import annotations

import csv
import math
import subprocess
import sys

import pytest
from terminal import in_pty

from fedtrak.simulations.cli import main
from fedtrak.simulations.evaluation.sweep_text import (
    PUBLIC_FLAT,
    closing,
    keep_sentence,
    keeps_fraction,
    not_measured,
    point_line,
    row_name,
    start_line,
)
from fedtrak.simulations.sweep import Variant, variants, write_table


@pytest.mark.flower
@pytest.mark.slow
def test_small_sweep_writes_table_and_plot(tmp_path, capsys, monkeypatch):
    out = tmp_path / "sweep"
    args = ["sweep", "--task", "digits-logreg", "--train-size", "400", "--query-size", "60",
            "--clients", "4", "--checkpoints", "1", "--projector", "rademacher", "--proj-dim", "64", "--epsilons", "2,inf",
            "--modes", "private", "--subsets", "12", "--cache-dir", str(tmp_path / "gt"),
            "--out", str(out)]
    assert main(args + ["--quiet"]) == 0
    printed = capsys.readouterr().out
    # under DP the default kernel is the public one; without noise the clients' exact Grams
    assert "| private mode (public kernel) | 2 |" in printed and "| private mode (private kernel) | inf | 0 |" in printed
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    lines = printed.splitlines()
    # what it is about to do, then one line per point as it finishes, before the table
    assert lines[0] == ("sweep: 2 points, 1 line (private mode) at epsilon 2 and inf; each point is a federated "
                        "run, then evaluated and attacked, and printed here when done")
    assert lines[1].startswith("private mode (public kernel), epsilon 2: LDS ")
    assert lines[2].startswith("private mode (private kernel), epsilon inf: LDS ")
    # the transcript ends with the conclusion: the share of the non-private LDS kept at epsilon 2 (the verb
    # follows the numbers), why the public kernel's line is flat, and what was not measured, with reasons
    lds, exact = float(rows[0]["lds"]), float(rows[1]["lds"])
    verb = "keeps at least" if lds >= 0.8 * exact else "is below"
    assert lines[-3] == (f"Private mode: LDS {lds:.3f} at epsilon 2 {verb} 80% of its non-private value "
                         f"({exact:.3f} at epsilon inf).")
    assert lines[-2].startswith(PUBLIC_FLAT) and ("because a public sample" in lines[-2]) == (lds < exact)
    assert lines[-1].startswith("Not measured: the seed-noise ceiling (a sweep retrains each subset once;")
    assert "mislabel" not in lines[-1] and "reconstruction" not in lines[-1]
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
    assert (out / "sweep.md").read_text().startswith("| line (kernel) | epsilon |")
    # run again: finished points are reused, not measured again (the simulation is not called)
    table = (out / "sweep.md").read_text()
    monkeypatch.setattr("fedtrak.simulations.sweep.run_simulation",
                        lambda settings: pytest.fail("a finished point was simulated again"))
    assert main(args + ["--quiet"]) == 0
    assert (out / "sweep.md").read_text() == table
    assert capsys.readouterr().out.splitlines()[1].endswith("(measured before, reused)")
    # at a terminal (a pseudo-terminal of no set size) the sweep shows its bar beside the points' lines;
    # piped, the same lines and no bar (both reuse the finished points)
    command = [sys.executable, "-m", "fedtrak.simulations.cli", *args]
    code, text = in_pty(command)
    assert code == 0 and "sweep: 100%|" in text and "2/2" in text, text
    assert "private mode (public kernel), epsilon 2: LDS " in text and "\x1b[0m" not in text, text
    piped = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert piped.returncode == 0, piped.stderr
    assert "%|" not in piped.stdout + piped.stderr and "\r" not in piped.stdout + piped.stderr, piped.stderr
    assert "private mode (public kernel), epsilon 2: LDS " in piped.stdout
    # fedtrak attack on the epsilon-2 point (a small budget): what was rebuilt at epsilon 2, then the attacks
    # that do not apply, with why
    point = out / "private-eps-2"
    assert main(["attack", str(point), "--targets", "2", "--trials", "50", "--steps", "20", "--restarts", "1",
                 "--label-candidates", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("    an owner holding 1 example: PSNR ") for line in lines)
    assert lines[-3].startswith("At epsilon 2 a curious server reading an owner's releases (its owner summary) "
                                "rebuilt ") and "membership inference, telling the owner's examples from others, reached" in lines[-3]
    assert lines[-2:] == [
        "Feature inversion was not run: private mode releases no per-example features.",
        "The attack on a client's Gram was not run: public kernel: clients release no Gram, there is none to attack."]


def test_keeps_fraction_finds_the_smallest_epsilon():
    rows = [{"mode": "private", "epsilon": e, "lds": v} for e, v in
            [(1.0, 0.2), (4.0, 0.5), (16.0, 0.58), (math.inf, 0.7)]]
    assert keeps_fraction(rows, "private", 0.8) == 16.0
    assert keeps_fraction(rows, "private", 0.7) == 4.0
    assert keeps_fraction(rows, "private", 0.9) is None
    assert keeps_fraction(rows, "features", 0.8) is None


def test_sweep_lines_cover_kernel_sources_and_secure_aggregation():
    """Private mode gets a line per kernel source and secure aggregation choice (a public kernel
    releases no Gram, so it is never forced through secure aggregation); features mode one line.
    Each name says each choice once, and the folders keep the names earlier sweeps gave them."""
    lines = variants(["private", "features"], ["private", "public", "hybrid"], [True, False])
    assert [v.label for v in lines] == ["private mode, private kernel, secagg", "private mode, private kernel, no secagg",
                                        "private mode, public kernel, no secagg", "private mode, hybrid kernel, secagg",
                                        "private mode, hybrid kernel, no secagg", "features mode"]
    assert Variant("private").label == "private mode" and Variant("private", "hybrid", True).slug == "private-hybrid-secagg"
    assert Variant("private", "private", False).slug == "private-private-no-secagg" and Variant("features").slug == "features"
    rows = [{"line": "private mode, public kernel", "mode": "private", "epsilon": e, "lds": v} for e, v in
            [(1.0, 0.6), (math.inf, 0.7)]] + [{"mode": "private", "epsilon": math.inf, "lds": 0.9}]
    assert keeps_fraction(rows, "private mode, public kernel") == 1.0 and keeps_fraction(rows, "private") is None


def _row(line: str, eps: float, lds: float, kernel: str = "private", **more: float) -> dict:
    nan = float("nan")
    return {"line": line, "mode": line.split()[0], "kernel_source": kernel, "secure_aggregation": False,
            "epsilon": eps, "lds": lds, "mislabel_auroc": 0.9, "mislabel_auroc_owners": 1.0,
            "attack_recovered": 0.0, "membership_epsilon": nan, **more}


def test_row_names_say_each_choice_once():
    assert row_name(_row("private mode", 1.0, 0.5, "public")) == "private mode (public kernel)"
    assert row_name({**_row("private mode", 1.0, 0.5, "hybrid"), "secure_aggregation": True}) == (
        "private mode (hybrid kernel, secagg)")
    assert row_name({**_row("private mode, hybrid kernel, secagg", 1.0, 0.5, "hybrid"), "secure_aggregation": True}) == (
        "private mode, hybrid kernel, secagg")
    assert row_name(_row("features mode", 1.0, 0.5)) == "features mode"


@pytest.mark.parametrize(("points", "sentence"), [
    ([(2.0, 0.55), (math.inf, 0.79)],
     "Private mode: LDS 0.550 at epsilon 2 is below 80% of its non-private value (0.790 at epsilon inf)."),
    ([(2.0, 0.70), (math.inf, 0.79)],
     "Private mode: LDS 0.700 at epsilon 2 keeps at least 80% of its non-private value (0.790 at epsilon inf)."),
    ([(1.0, 0.1), (4.0, 0.7), (8.0, 0.75), (math.inf, 0.8)],
     ("Private mode: LDS keeps 80% of its non-private value (0.800 at epsilon inf) from epsilon 4 up, not below: "
     "0.100 at epsilon 1, 0.700 at epsilon 4, 0.750 at epsilon 8.")),
    ([(1.0, 0.7), (4.0, 0.5), (math.inf, 0.8)],
     ("Private mode: LDS keeps 80% of its non-private value (0.800 at epsilon inf) only at epsilon 1: "
     "0.700 at epsilon 1, 0.500 at epsilon 4.")),
    ([(1.0, 0.7), (4.0, 0.75), (math.inf, 0.8)],
     ("Private mode: LDS keeps at least 80% of its non-private value (0.800 at epsilon inf) at every epsilon "
     "measured: 0.700 at epsilon 1, 0.750 at epsilon 4.")),
    ([(1.0, 0.1), (4.0, 0.2), (math.inf, 0.8)],
     ("Private mode: LDS stays below 80% of its non-private value (0.800 at epsilon inf) at every epsilon "
     "measured: 0.100 at epsilon 1, 0.200 at epsilon 4.")),
    ([(math.inf, 0.8)], "Private mode: LDS 0.800 without noise; no epsilon under noise was measured."),
    ([(1.0, 0.3), (2.0, 0.4)],
     ("Private mode: LDS 0.300 at epsilon 1, 0.400 at epsilon 2; without a point at epsilon inf there is no "
     "non-private LDS to compare with (add inf to --epsilons).")),
    ([(1.0, 0.1), (math.inf, -0.05)],
     "Private mode: LDS 0.100 at epsilon 1; its non-private LDS, -0.050, is not positive, so no share of it is kept."),
])
def test_the_closing_sentence_fits_every_case(points, sentence):
    """No point keeps 80%, all do, some do (from an epsilon up, or not), one epsilon, no non-private point."""
    assert keep_sentence([_row("private mode", e, v) for e, v in points], "private mode") == sentence


def test_the_closing_explains_the_public_kernel_and_names_what_was_not_measured():
    rows = [_row("private mode", 2.0, 0.55, "public"), _row("private mode", math.inf, 0.79)]
    text = closing(rows).splitlines()
    assert text[0].startswith("Private mode: LDS 0.550 at epsilon 2 is below")
    assert text[1].startswith(PUBLIC_FLAT) and text[1].endswith(
        "below the exact kernel (the clients' Grams without noise, LDS 0.790) because a public sample only "
        "estimates the training data's second moment.")
    assert text[2] == ("Not measured: the seed-noise ceiling (a sweep retrains each subset once; fedtrak evaluate "
                       "on a point's folder measures it).")
    above = [_row("private mode", 2.0, 0.85, "public"), _row("private mode", math.inf, 0.79)]
    assert "because a public sample" not in closing(above)  # said only where it is so
    assert PUBLIC_FLAT not in closing([_row("private mode", 2.0, 0.5, "hybrid"), _row("private mode", math.inf, 0.8)])
    nan = float("nan")
    tokens = [_row("private mode", 1.0, 0.2, mislabel_auroc=nan, mislabel_auroc_owners=nan, attack_recovered=nan),
              _row("features mode", 1.0, 0.3, mislabel_auroc=nan, mislabel_auroc_owners=nan, attack_recovered=nan)]
    assert not_measured(tokens) == (
        "Not measured: the seed-noise ceiling (a sweep retrains each subset once; fedtrak evaluate on a point's "
        "folder measures it); mislabel detection (no labels were flipped: --flip-fraction 0); the reconstruction "
        "attacks (they rebuild continuous inputs, which this task does not have); membership inference in "
        "features mode (it hides feature values, not their presence).")


def test_sweep_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        main(["sweep", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("(default 0.5,1,2,4,8,inf)", "(default private,features)", "(default auto)", "(default 100)",
                  "(default 8)", "(default ~/.cache/fedtrak/groundtruth)", "(default digits-logreg)"):
        assert shown in text


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


def test_the_table_takes_rows_of_older_sweeps_without_the_newer_columns(tmp_path):
    """A point reused from a sweep before ``point_seconds`` beside one measured now: both in the CSV."""
    old = {**_row("private mode", 2.0, 0.5, "public"), "sigma": 1.0, "lds_ci_low": 0.4, "lds_ci_high": 0.6,
           "owner_lds": 0.1, "owner_lds_ci_low": 0.0, "owner_lds_ci_high": 0.2, "attack_psnr": 5.0,
           "attack_baseline_psnr": 7.0, "seconds": 30.0}
    write_table([old, {**old, "epsilon": math.inf, "point_seconds": 41.0}], tmp_path)
    rows = list(csv.DictReader((tmp_path / "sweep.csv").open()))
    assert [(r["epsilon"], r["point_seconds"]) for r in rows] == [("2", ""), ("inf", "41.0")]
    assert (tmp_path / "sweep.md").read_text().splitlines()[2].startswith("| private mode (public kernel) | 2 | 1 |")


def test_a_finished_point_is_one_line():
    nan = float("nan")
    done = {**_row("private mode", 2.0, 0.406, "public"), "owner_lds": 0.083, "mislabel_auroc": 0.996,
            "attack_psnr": 5.1, "membership_epsilon": 0.0, "seconds": 30.0, "point_seconds": 42.0}
    assert point_line(done) == ("private mode (public kernel), epsilon 2: LDS 0.406, owner-level LDS 0.083, mislabel "
                                "AUROC 0.996, the example of an owner holding 1 not rebuilt (PSNR 5.1 dB), membership "
                                "epsilon >= 0.00 (42 s)")
    features = {**done, "line": "features mode", "mode": "features", "attack_recovered": 0.5,
                "membership_epsilon": nan}
    assert point_line(features, reused=True) == (
        "features mode, epsilon 2: LDS 0.406, owner-level LDS 0.083, mislabel AUROC 0.996, inversion rebuilt 50% "
        "of the attacked examples (PSNR 5.1 dB) (measured before, reused)")

    assert start_line(["private mode, public kernel, no secagg", "features mode"], [1.0, math.inf]) == (
        "sweep: 4 points, 2 lines (private mode, public kernel, no secagg; features mode) at epsilon 1 and inf; each "
        "point is a federated run, then evaluated and attacked, and printed here when done")

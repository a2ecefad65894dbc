"""``fedtrak report``: a self-contained HTML page (no network needed) with the run's figures."""

from __future__ import annotations

import base64
import re

from fedtrak.simulations.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)]


def test_report_of_an_evaluated_mislabel_run(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["attribute", "--flip-fraction", "0.1", "--checkpoints", "1", "--out", str(run), "--quiet"]) == 0
    assert main(["evaluate", str(run), "--mislabel", "--quiet"]) == 0
    assert main(["report", str(run), "--queries", "3"]) == 0
    assert "report.html" in capsys.readouterr().out
    page = (run / "report.html").read_text()
    images = _images(page)
    assert len(images) == 3  # proponents, owners, mislabel; LDS not measured yet
    assert all(img.startswith(PNG_MAGIC) for img in images)
    assert "Run fedtrak evaluate on this folder" in page and "mislabel detection (examples)" in page
    # self-contained: no scripts, style sheets, fonts or anything fetched over the network
    assert not re.search(r"<script|<link|@import|url\(|https?://", page)
    assert sorted(p.name for p in (run / "report").iterdir()) == ["figure-1.png", "figure-2.png",
                                                                 "figure-4.png"]
    assert (run / "report" / "figure-1.png").read_bytes() == images[0]


def test_report_without_released_scores_shows_no_examples(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["attribute", "--checkpoints", "1", "--out", str(run), "--quiet"]) == 0
    (run / "scores.npy").unlink()  # as a private run with owner totals only
    out = tmp_path / "elsewhere" / "page.html"
    assert main(["report", str(run), "--out", str(out)]) == 0
    page = out.read_text()
    assert len(_images(page)) == 1  # owner-level attribution only
    assert "a deployed run&#x27;s examples never leave their devices" in page
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "is not a run folder" in capsys.readouterr().err

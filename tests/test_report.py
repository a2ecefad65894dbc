"""``fedtrak report``: a self-contained HTML page (no network needed) with the run's figures."""

from __future__ import annotations

import base64
import html
import json
import os
import re
import shutil
import subprocess

import pytest

from fedtrak.simulations.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)]


@pytest.fixture(scope="module")
def mislabel_run(tmp_path_factory):
    """An evaluated mislabel run and its report."""
    run = tmp_path_factory.mktemp("report") / "run"
    assert main(["attribute", "--flip-fraction", "0.1", "--checkpoints", "1", "--out", str(run), "--quiet"]) == 0
    assert main(["evaluate", str(run), "--mislabel", "--quiet"]) == 0
    assert main(["report", str(run), "--queries", "3"]) == 0
    return run


def test_report_of_an_evaluated_mislabel_run(mislabel_run):
    run = mislabel_run
    page = (run / "report.html").read_text()
    images = _images(page)
    assert len(images) == 3  # proponents, owners, mislabel; LDS not measured yet
    assert all(img.startswith(PNG_MAGIC) for img in images)
    assert "Run fedtrak evaluate on this folder" in page and "mislabel detection (examples)" in page
    # self-contained: no scripts, style sheets, fonts or anything fetched over the network
    assert not re.search(r"<script|<link|@import|url\(|https?://", page)
    # each figure's file is named by its content (no LDS figure: LDS not measured yet)
    assert sorted(p.name for p in (run / "report").iterdir()) == ["mislabel.png", "owners.png", "proponents.png"]
    assert [(run / "report" / n).read_bytes() for n in ("proponents.png", "owners.png", "mislabel.png")] == images
    # the run's settings, one per row: "checkpoints (M)" 1, "projection" the projector and k = 512
    assert "<tr><th>checkpoints (M)</th><td>1</td></tr>" in page
    assert re.search(r"<tr><th>projection</th><td>[a-z-]+, k = 512</td></tr>", page)
    assert "checkpoints M, projection k" not in page


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


def test_report_of_a_task_whose_examples_are_not_images_has_a_table(tmp_path):
    """A user's tabular task: top proponents and opponents as a table of index, label and score; the
    owner bars name each query's label."""
    import numpy as np
    from torch import nn

    import fedtrak

    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 5)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    fedtrak.register_task("report-tabular", fedtrak.task_from_model(
        "report-tabular", nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2)), train=(x[:100], y[:100]),
        query=(x[100:], y[100:]), training=fedtrak.TrainConfig(epochs=5, batch_size=20, lr=0.1)))
    run = tmp_path / "run"
    assert main(["attribute", "--task", "report-tabular", "--clients", "2", "--checkpoints", "1", "--proj-dim",
                 "32", "--out", str(run), "--quiet"]) == 0
    assert main(["report", str(run), "--queries", "2"]) == 0
    page = (run / "report.html").read_text()
    assert "<th>training index</th><th>label</th><th>score</th>" in page
    scores = np.load(run / "scores.npy")
    best = int(np.argmax(scores[0]))
    index = int(np.load(run / "example_ids.npy")["index"][best])
    assert f"<td>0</td><td>{y[100]}</td><td>proponent</td><td>{index}</td>" in page  # query 0's best example
    assert "Not available for this run" not in page.split("<h2>Owner-level")[0]
    assert len(_images(page)) == 1  # the owner bars


#: What the probe copy of the page records once it has loaded: each figure's state and sizes, and
#: every resource the page fetched (the Performance API lists them; data URIs are not fetched).
PROBE = ("<script>window.addEventListener('load',()=>{document.body.setAttribute('data-probe',JSON.stringify({"
         "figures:[...document.images].map(i=>[i.complete,i.naturalWidth,i.naturalHeight,i.width,i.height]),"
         "fetched:performance.getEntriesByType('resource').map(e=>e.name)}))});</script>")


@pytest.mark.slow
def test_the_report_renders_in_a_headless_browser(mislabel_run, tmp_path):
    """Debian's chromium, headless, loads the page with no external request, shows every figure at
    its natural size in a 1600-pixel window, and takes a screenshot of it."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("CI installs Debian's chromium for this test")
        pytest.skip("no chromium here (apt-get install chromium)")
    probe = tmp_path / "probe.html"
    probe.write_text((mislabel_run / "report.html").read_text().replace("</body>", PROBE + "</body>"))
    browser = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1600,2400", "--no-first-run",
               f"--user-data-dir={tmp_path / 'profile'}", "--disable-background-networking", "--virtual-time-budget=5000"]
    dom = subprocess.run([*browser, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120,
                         check=False)
    found = re.search(r'data-probe="([^"]*)"', dom.stdout)
    assert found, dom.stderr[-2000:]
    seen = json.loads(html.unescape(found.group(1)))
    assert seen["fetched"] == []  # nothing fetched: every figure is inline, nothing else is loaded
    assert len(seen["figures"]) == 3
    for complete, natural_w, natural_h, width, height in seen["figures"]:
        assert complete and natural_w > 0 and (width, height) == (natural_w, natural_h)
    shot = tmp_path / "report.png"
    subprocess.run([*browser, f"--screenshot={shot}", (mislabel_run / "report.html").as_uri()],
                   capture_output=True, timeout=120, check=False)
    assert shot.read_bytes().startswith(PNG_MAGIC)

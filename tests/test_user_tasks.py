"""Four tasks a user brings (issue 32's acceptance), through the documented API only, in a script
without a main guard (tests/scripts/four_user_tasks.py): a tabular regression, an integer-token
sequence model, a 4-class tabular MLP private at ``epsilon=1`` (an int) with ``public=`` data, and
checkpoints the user trained with their own loop. For each, federated scores equal the centralized
ones (relative 1e-6) on the same examples, evaluate returns an LDS, and nothing prints a traceback or
a terminal escape. The token model's class lives in the script's ``__main__``: Flower's virtual
clients get it by value (this test covers tests/test_own_scripts.py's simulation of a script's own
model class too)."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "scripts" / "four_user_tasks.py"


@pytest.mark.flower
@pytest.mark.slow
def test_four_user_tasks_from_an_unguarded_script(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True,
                          check=False, timeout=900, cwd=tmp_path)
    said = done.stdout + done.stderr
    assert done.returncode == 0, said[-4000:]
    assert "Traceback" not in said and said.count("script body starts") == 1, said[-4000:]
    assert "\x1b[" not in said, said[-4000:]
    found = {m.group(1): m for m in re.finditer(r"TASK (\S+) rel (\S+) lds (\S+)(?: private-epsilon (\S+) kernel "
                                                 r"(\S+))?", done.stdout)}
    assert sorted(found) == ["four-class", "own-checkpoints", "regression", "tokens"], done.stdout
    for name, m in found.items():
        assert float(m.group(2)) <= 1e-6, f"{name}: federated differs from central by {m.group(2)}"
        assert math.isfinite(float(m.group(3))), f"{name}: no LDS"
    private = found["four-class"]
    assert float(private.group(4)) == pytest.approx(1.0, abs=0.02) and private.group(5) == "public"

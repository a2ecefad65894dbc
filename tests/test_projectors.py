"""Seeded block projections (acceptance (b))."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from fedtrak.config.seeds import derive_seed
from fedtrak.errors import FedtrakError
from fedtrak.trak.projectors import BLOCK_ROWS, make_projector

P_DIM = 2 * BLOCK_ROWS + 123  # three blocks, the last one partial


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_blockwise_projection_equals_materialized_matrix(kind):
    g = torch.from_numpy(np.random.default_rng(0).standard_normal((9, P_DIM), dtype=np.float32))
    blockwise = make_projector(kind, P_DIM, 96, seed=7, cache_bytes=0)
    cached = make_projector(kind, P_DIM, 96, seed=7)
    matrix = blockwise.matrix()
    assert matrix.shape == (P_DIM, 96)
    assert torch.equal(matrix, torch.cat([blockwise.block(j) for j in range(blockwise.num_blocks)]))
    want = (g.double() @ matrix.double()).float()
    torch.testing.assert_close(blockwise.project(g), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cached.project(g), want, rtol=1e-4, atol=1e-4)
    assert torch.equal(cached.matrix(), matrix)


def test_entries_have_the_documented_distribution():
    k = 256
    rad = make_projector("rademacher", P_DIM, k, seed=1).matrix().numpy()
    assert set(np.unique(rad * np.sqrt(k)).round(6)) == {-1.0, 1.0}
    assert abs(rad.mean() * np.sqrt(k)) < 0.01
    gau = make_projector("gaussian", P_DIM, k, seed=1).matrix().numpy() * np.sqrt(k)
    assert abs(gau.mean()) < 0.01 and abs(gau.std() - 1.0) < 0.01


def test_seeds_give_distinct_matrices():
    a = make_projector("rademacher", P_DIM, 32, seed=derive_seed(0, 0)).matrix()
    b = make_projector("rademacher", P_DIM, 32, seed=derive_seed(0, 1)).matrix()
    assert not torch.equal(a, b)
    assert derive_seed(0, 1) == derive_seed(0, 1) != derive_seed(1, 0)


_HASH_SCRIPT = """
import hashlib, sys
from fedtrak.trak.projectors import make_projector
for kind in ("rademacher", "gaussian"):
    m = make_projector(kind, {p}, 64, seed=12345, cache_bytes=0).matrix().numpy()
    print(kind, hashlib.sha256(m.tobytes()).hexdigest())
"""


@pytest.mark.slow
def test_bit_identical_across_processes():
    """Server and clients rebuild P from the seed alone: two fresh processes agree bit for bit."""
    outs = [
        subprocess.run([sys.executable, "-c", _HASH_SCRIPT.format(p=P_DIM)], check=True,
                       capture_output=True, text=True).stdout
        for _ in range(2)
    ]
    mine = "".join(
        f"{kind} {hashlib.sha256(make_projector(kind, P_DIM, 64, seed=12345).matrix().numpy().tobytes()).hexdigest()}\n"
        for kind in ("rademacher", "gaussian")
    )
    assert outs[0] == outs[1] == mine


def test_rademacher_contract_is_pinned():
    """The first entries of P for seed 0 are part of the protocol: pin them."""
    head = np.sign(make_projector("rademacher", 100, 8, seed=0).matrix()[0].numpy())
    rng = np.random.Generator(np.random.Philox(np.random.SeedSequence([0, 0])))
    word = int(rng.bit_generator.random_raw(1)[0])
    bits = [(word >> i) & 1 for i in range(8)]
    np.testing.assert_array_equal(head, [2.0 * b - 1.0 for b in bits])


def test_bad_dimensions_are_refused():
    with pytest.raises(FedtrakError, match="exceeds the model's 100 parameters"):
        make_projector("rademacher", 100, 101, seed=0)
    with pytest.raises(FedtrakError, match="identity projector needs --proj-dim equal"):
        make_projector("identity", 100, 64, seed=0)
    with pytest.raises(FedtrakError, match="unknown projector"):
        make_projector("sparse", 100, 8, seed=0)
    proj = make_projector("gaussian", 100, 8, seed=0)
    with pytest.raises(FedtrakError, match=r"shape \(batch, 100\)"):
        proj.project(torch.zeros(3, 99))
    for kind in ("rademacher", "identity"):  # k is resolved once, before any projector is built
        with pytest.raises(FedtrakError, match="needs a resolved projection dimension k, got None"):
            make_projector(kind, 100, None, seed=0)


def test_k_is_resolved_once_from_the_settings():
    """An unset k is the default for the random projections (at most the parameter count) and the
    parameter count for the identity; a given one stays (the projector checks it). ``auto`` picks
    the factorized projector for the layers it reads from hooks only, and the run builds it once."""
    from torch import nn

    from fedtrak.config.settings import DEFAULT_PROJ_DIM, Settings
    from fedtrak.errors import FedtrakError
    from fedtrak.trak.projectors import Projection, make_projector, resolve_projection

    assert Settings().projection.resolved_dim(100_000) == DEFAULT_PROJ_DIM
    assert Settings().projection.resolved_dim(5) == 5  # a tiny model: no wider than its gradient
    mlp = nn.Sequential(nn.Linear(10, 40), nn.ReLU(), nn.Linear(40, 3))
    tokens = nn.Sequential(nn.Embedding(50, 8), nn.Flatten(), nn.Linear(48, 3))
    normed = nn.Sequential(nn.Linear(10, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))  # BatchNorm: no hooks
    auto = Settings().projection
    assert resolve_projection(auto, mlp, 563) == Projection("factorized", 512)
    assert resolve_projection(auto, tokens, 547) == Projection("factorized", 512)
    assert resolve_projection(auto, normed, 131) == Projection("rademacher", 131)
    assert resolve_projection(Settings().replaced(projector="gaussian").projection, mlp, 563).kind == "gaussian"
    with pytest.raises(FedtrakError, match="projector auto is decided once per run"):
        make_projector("auto", 563, 64, 0, model=mlp)
    assert Settings().replaced(projector="identity").projection.resolved_dim(650) == 650
    assert Settings().replaced(proj_dim=64, projector="factorized").projection.resolved_dim(650) == 64


def test_released_buffer_is_reused_without_changing_results():
    a = make_projector("gaussian", P_DIM, 16, seed=5)
    first = a.project(torch.ones(1, P_DIM)).clone()
    a.release()
    b = make_projector("gaussian", P_DIM, 16, seed=6)
    b.project(torch.ones(1, P_DIM))
    b.release()
    again = make_projector("gaussian", P_DIM, 16, seed=5).project(torch.ones(1, P_DIM))
    torch.testing.assert_close(first, again, rtol=0, atol=0)

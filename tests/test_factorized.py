"""The factorized (per-layer Kronecker) projector: equal to the dense projection it stands for,
hooks and all, with a seed contract like the other projectors'."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fedtrak.data.modelout import ClassificationMargin
from fedtrak.errors import FedtrakError
from fedtrak.trak.featurizer import Featurizer
from fedtrak.trak.projectors import IdentityProjector, make_projector
from fedtrak.trak.projectors.factorized import FactorizedProjector, _signs, fallback_gradient_fn

OUT = ClassificationMargin()


def _exact_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    p = sum(q.numel() for q in model.parameters() if q.requires_grad)
    return Featurizer(model, OUT, IdentityProjector(p)).per_example_grads(x, y)


def _fast(proj: FactorizedProjector, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    fb = fallback_gradient_fn(model, proj.fallback_names, OUT.output) if proj.fallback_names else None
    return proj.features(model, OUT.output, x, y, fb)


def test_single_linear_layer_equals_the_dense_projection_with_the_kronecker_matrix():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(20, 7)).eval()
    k = 40
    proj = FactorizedProjector(model, k, seed=11)
    (layer,) = proj.layers
    assert (layer.k_out, layer.k_in, layer.proj_dim) == (7, 6, 40)
    p_out = _signs(11, 0, 1, 7, 7)
    p_in = _signs(11, 0, 0, 21, 6)  # 20 inputs and the bias column
    kron = torch.kron(p_out, p_in)[:, :k] / math.sqrt(k)  # rows (o, i), columns (a, c) row-major
    rows = torch.arange(7 * 21).reshape(7, 21)
    dense = torch.cat([kron[rows[:, :20].reshape(-1)], kron[rows[:, 20]]])  # weight rows, then bias rows
    torch.testing.assert_close(proj.matrix(), dense, rtol=1e-6, atol=1e-6)
    x, y = torch.randn(16, 20), torch.randint(0, 7, (16,))
    want = _exact_grads(model, x, y) @ dense
    torch.testing.assert_close(_fast(proj, model, x, y), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["mlp", "cnn-batchnorm"])
def test_hooks_equal_the_dense_projection_of_exact_gradients(arch):
    torch.manual_seed(1)
    if arch == "mlp":
        model = nn.Sequential(nn.Flatten(), nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 5))
        x = torch.randn(12, 20)
    else:  # a BatchNorm's parameters take the exact fallback path
        model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 6, 3, padding=1),
                              nn.BatchNorm2d(6), nn.Flatten(), nn.Linear(6 * 3 * 3, 5))
        x = torch.randn(12, 1, 8, 8)
    model.eval()
    y = torch.randint(0, 5, (12,))
    proj = FactorizedProjector(model, 48, seed=5)
    assert sum(layer.proj_dim for layer in proj.layers) + (proj.fallback.proj_dim if proj.fallback else 0) == 48
    assert (proj.fallback_names == ["4.weight", "4.bias"]) == (arch != "mlp")
    want = _exact_grads(model, x, y) @ proj.matrix()
    torch.testing.assert_close(_fast(proj, model, x, y), want, rtol=1e-5, atol=1e-5)
    # the featurizer takes the hooks path and gives the same features
    feats = Featurizer(model, OUT, proj, batch_size=5).featurize(x.numpy(), y.numpy()).features
    torch.testing.assert_close(torch.from_numpy(feats), want, rtol=1e-5, atol=1e-5)


def test_seed_contract_and_bad_settings():
    model = nn.Sequential(nn.Flatten(), nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 5))
    a = FactorizedProjector(model, 48, seed=3).matrix()
    assert torch.equal(a, make_projector("factorized", 421, 48, 3, model=model).matrix())
    assert not torch.equal(a, FactorizedProjector(model, 48, seed=4).matrix())
    # unbiased: E[P P^T] = I, so projected inner products estimate gradient inner products
    assert float((a * a).sum(dim=1).mean()) == pytest.approx(1.0, rel=0.05)
    with pytest.raises(FedtrakError, match="exceeds the 421 parameters"):
        FactorizedProjector(model, 500, seed=0)
    with pytest.raises(FedtrakError, match="below the 2 parameter groups"):
        FactorizedProjector(model, 1, seed=0)
    with pytest.raises(FedtrakError, match="at least one Linear, Conv2d, Embedding or LayerNorm"):
        FactorizedProjector(nn.Sequential(nn.Flatten(), nn.BatchNorm1d(4)), 2, seed=0)
    with pytest.raises(FedtrakError, match="needs the model"):
        make_projector("factorized", 421, 48, 3)


class _TiedLM(nn.Module):
    """A language model with what transformers hold besides Linear layers: a token embedding with a
    padding id, position embeddings looked up with ids the batch shares (``(1, T)``, as Hugging Face
    makes them), an RMSNorm, and an LM head tied to the token embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(30, 8, padding_idx=0), nn.Embedding(12, 8)
        self.norm, self.mix = nn.RMSNorm(8), nn.Linear(8, 8)
        self.head = nn.Linear(8, 30, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.tok(ids) + self.pos(torch.arange(ids.shape[1])[None])
        return self.head(torch.tanh(self.mix(self.norm(h))))


def _gpt2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                     bos_token_id=1, eos_token_id=1)  # the LM head tied to the embedding
    return transformers.GPT2LMHeadModel(config)


@pytest.mark.parametrize("arch", ["byte-transformer", "tied-lm", "gpt2"])
def test_sequence_models_are_read_from_hooks_and_equal_the_dense_projection(arch):
    """Over a sequence each layer's term sums over positions; embeddings (padding included), norms,
    shared position ids, a tied head and Hugging Face's Conv1D are read from hooks, with no fallback,
    and equal the dense projection of the exact gradients (one backward per example where vmap cannot
    run the model, as for GPT-2)."""
    from fedtrak.data.modelout import IGNORE, SequenceMargin
    from fedtrak.data.models import ByteTransformer
    from fedtrak.trak.projectors.layers import factorizes

    torch.manual_seed(0)
    model = {"byte-transformer": lambda: ByteTransformer(257, 16, 16, 2, 2), "tied-lm": _TiedLM,
             "gpt2": _gpt2}[arch]().eval()
    vocab = model.get_output_embeddings().weight.shape[0] if arch == "gpt2" else (257 if arch[0] == "b" else 30)
    ids = torch.randint(1, vocab, (5, 12))
    ids[:, 9:] = 0
    y = ids.masked_fill(ids == 0, IGNORE)
    x = {"input_ids": ids, "attention_mask": (ids != 0).long()} if arch == "gpt2" else ids
    out = SequenceMargin()
    assert factorizes(model)
    proj = FactorizedProjector(model, 96, seed=2)
    assert not proj.fallback_names and {layer.kind for layer in proj.layers} >= {"embedding", "norm", "linear"}
    p = sum(q.numel() for q in model.parameters() if q.requires_grad)
    want = Featurizer(model, out, IdentityProjector(p)).per_example_grads(x, y) @ proj.matrix()
    got = proj.features(model, out.output, x, y)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_a_layer_called_twice_is_refused_by_name():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(self.lin(x))

    model = Twice()
    proj = FactorizedProjector(model, 8, seed=0)
    with pytest.raises(FedtrakError, match="layer lin runs more than once"):
        proj.features(model, OUT.output, torch.randn(3, 4), torch.randint(0, 4, (3,)))

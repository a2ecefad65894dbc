"""A user's own Hugging Face causal LM (GPT-2 from a config) with LoRA adapters (peft), through the
public API: the factorized features of the adapters equal the dense projection of their exact
gradients; fresh copies re-initialize only what trains; the parameter set the user leaves
trainable is what TRAK differentiates, and the run says how many; FedAvg keeps frozen parameters
bit for bit; labels that are token sequences are refused where classes are needed. And
docs/text.md runs as printed: one Flower simulation whose scores equal the centralized ones."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

import fedtrak
from fedtrak.data.modelout import IGNORE
from fedtrak.errors import FedtrakError

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

# peft 0.21 asks transformers 5.25 for a property that transformers deprecates (not fedtrak's call).
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 257


def _gpt2(**config) -> torch.nn.Module:
    """A tiny GPT-2 over byte tokens (0 pads), without dropout, special ids inside the vocabulary."""
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0,
        pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **config))


def _lora(model: torch.nn.Module) -> torch.nn.Module:
    return peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["c_attn"], lora_dropout=0.0,
                                                      fan_in_fan_out=True))


def _texts(n: int, seed: int, length: int = 24) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """``n`` byte-token texts of different lengths (padded), and their labels (-100 on padding)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, size=(n, length))
    mask = (np.arange(length)[None, :] < rng.integers(5, length + 1, size=n)[:, None]).astype(np.int64)
    ids = ids * mask
    return {"input_ids": ids, "attention_mask": mask}, np.where(mask == 1, ids, IGNORE)


def _trained(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_lora_features_equal_the_dense_projection_of_exact_gradients():
    """The adapters (peft's lora_A and lora_B, nn.Linear over every position of a text) are read from
    hooks, summed over positions, with no fallback; they equal the factorized projector's dense
    matrix applied to the per-example gradients of the Featurizer's exact torch.func path."""
    from fedtrak.data.inputs import numeric_array, to_tensors
    from fedtrak.trak.featurizer import Featurizer
    from fedtrak.trak.projectors import FactorizedProjector, IdentityProjector

    torch.manual_seed(0)
    model = _lora(_gpt2(attn_implementation="eager")).eval()  # eager: vmap runs it (the torch.func path)
    with torch.no_grad():  # B != 0, so that lora_A has gradients too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
    x, y = _texts(6, 1)
    out = fedtrak.SequenceMargin()
    proj = FactorizedProjector(model, 48, seed=5)
    assert not proj.fallback_names and len(proj.layers) == 4 and proj.grad_dim == _trained(model) == 1024
    got = Featurizer(model, out, proj, batch_size=3).featurize(numeric_array(x), y).features
    xt, yt = to_tensors(numeric_array(x), y)
    exact = Featurizer(model, out, IdentityProjector(proj.grad_dim)).per_example_grads(xt, yt)
    assert float(exact.abs().max()) > 0 and exact.shape == (6, 1024)
    want = proj.project(exact).numpy()
    rel = float(np.abs(got - want).max() / np.abs(want).max())
    assert rel < 1e-5, rel


def test_a_fresh_copy_reinitializes_what_trains_and_keeps_what_is_frozen():
    """LoRA: the base model is kept exactly, the adapters start as peft starts them (B zero, A drawn
    under the seed). Every parameter trainable: GPT-2's own initialization under the seed (its Conv1D
    has no reset_parameters). The last block alone: only it changes."""
    from fedtrak.data.own_model import FreshCopy

    def fresh(template: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(seed)
        return FreshCopy(template)().state_dict()

    torch.manual_seed(0)
    lora = _lora(_gpt2())
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_" in name:
                p.normal_()
    given, a, b = lora.state_dict(), fresh(lora, 1), fresh(lora, 2)
    assert all(torch.equal(a[k], given[k]) for k in given if "lora_" not in k)
    assert all(float(a[k].abs().max()) == 0 for k in a if "lora_B" in k)
    assert all(not torch.equal(a[k], b[k]) for k in a if "lora_A" in k)

    torch.manual_seed(0)
    full = _gpt2()
    given, a, a2 = full.state_dict(), fresh(full, 1), fresh(full, 1)
    weight = "transformer.h.0.attn.c_attn.weight"  # a Conv1D
    assert not torch.equal(a[weight], given[weight]) and torch.equal(a[weight], a2[weight])
    assert abs(float(a[weight].std()) - 0.02) < 0.005  # GPT-2's initializer_range

    last = _gpt2()
    for name, p in last.named_parameters():
        p.requires_grad = name.startswith("transformer.h.1.")
    given, a = last.state_dict(), fresh(last, 3)
    changed = {k for k in given if not torch.equal(a[k], given[k])}
    assert changed and all(k.startswith("transformer.h.1.") for k in changed)


def test_the_parameters_left_trainable_are_those_attributed_and_the_run_says_how_many(tmp_path):
    """Freezing all but the last block makes TRAK's gradient that block's size: the task's parameter
    count, the projector's input, the run summary's num_params and the Result's repr all say it."""
    torch.manual_seed(0)
    model = _gpt2()
    every = _trained(model)
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith("transformer.h.1.")
    block = sum(p.numel() for n, p in model.named_parameters() if n.startswith("transformer.h.1."))
    assert _trained(model) == block < every
    (x, y), (xq, yq) = _texts(12, 0), _texts(4, 1)
    task = fedtrak.task_from_model("last-block-lm", model, train=(x, y), query=(xq, yq),
                                   output=fedtrak.SequenceMargin(), num_classes=VOCAB)
    assert task.num_params == block
    result = fedtrak.attribute(task, checkpoints=[model], out=tmp_path / "run", proj_dim=32, clients=2)
    assert result.summary.num_params == block and result.scores.shape == (4, 12)
    assert f"k=32 of {block:,} parameters" in repr(result)


def test_fedavg_keeps_frozen_parameters_bit_for_bit():
    """FedAvg over owners of different sizes averages what trains (the adapters) and leaves the
    frozen base exactly as it was, where an average of equal float32 copies would move it."""
    from fedtrak.simulations.evaluation.retrain import fedavg_in_process

    torch.manual_seed(0)
    (x, y), (xq, yq) = _texts(21, 0), _texts(3, 1)
    task = fedtrak.task_from_model("lora-fedavg", _lora(_gpt2()), train=(x, y), query=(xq, yq),
                                   output=fedtrak.SequenceMargin(), num_classes=VOCAB,
                                   training=fedtrak.TrainConfig(batch_size=4, lr=0.5))
    from fedtrak.data.checkpoints import seeded_model

    start = seeded_model(task, 0).state_dict()
    trained = fedavg_in_process(task, [np.arange(0, 4), np.arange(4, 11), np.arange(11, 21)], rounds=2,
                                local_epochs=1, init_seed=0, seed=0, checkpoint=0).state_dict()
    assert all(torch.equal(trained[k], start[k]) for k in start if "lora_" not in k)
    assert all(not torch.equal(trained[k], start[k]) for k in start if "lora_B" in k)


def test_token_labels_are_refused_where_classes_are_needed():
    """A text's labels are a sequence: a classifier's output names SequenceMargin, and a Dirichlet
    partition and label flips refuse them; DP-SGD training of named inputs is refused before a run."""
    from fedtrak.config.settings import FlipSpec, Settings
    from fedtrak.data.corruption import flip_labels
    from fedtrak.data.partition import partition
    from fedtrak.server.preflight import preflight

    (x, y), (xq, yq) = _texts(12, 0), _texts(3, 1)
    with pytest.raises(FedtrakError, match=r"one number per example, got shape \(12, 24\).*SequenceMargin"):
        fedtrak.task_from_model("no-lm", _gpt2(), train=(x, y), query=(xq, yq), num_classes=VOCAB)
    with pytest.raises(FedtrakError, match="token sequences"):
        partition(y, 2, "dirichlet", alpha=0.5, seed=0)
    parts = partition(y, 2, "iid", seed=0)
    with pytest.raises(FedtrakError, match="token sequences"):
        flip_labels(y, VOCAB, parts, FlipSpec(0.5, (0,), 0))
    task = fedtrak.task_from_model("private-lm", _gpt2(), train=(x, y), query=(xq, yq),
                                   output=fedtrak.SequenceMargin(), num_classes=VOCAB)
    fedtrak.register_task(task.name, task)
    with pytest.raises(FedtrakError, match="DP-SGD.*not named inputs \\(input_ids, attention_mask\\)"):
        preflight(Settings().replaced(task=task.name, epsilon=1.0, clip_norm=1.0, clients=2))


@pytest.mark.flower
def test_the_text_page_runs_and_federated_equals_central(tmp_path, monkeypatch, capsys):
    """docs/text.md's blocks, run in order as printed: the parameter counts it states, FedAvg of LoRA
    adapters over three virtual Flower clients (the frozen base kept bit for bit), and federated scores
    equal to the centralized ones on the same checkpoint (relative 1e-4)."""
    page = (ROOT / "docs" / "text.md").read_text()
    blocks = re.findall(r"<!-- tested: text-lm -->\n```python\n(.*?)```", page, re.DOTALL)
    assert len(blocks) == 5, "docs/text.md lost a tested block"
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile("\n".join(blocks), "docs/text.md", "exec"), scope)  # noqa: S102 - the page's own script
    said = capsys.readouterr().out
    stated = re.findall(r'print\("([^"]+)", trained\(\w+\)\)\s+# (\d+)', blocks[2])
    assert len(stated) == 3 and all(f"{label} {count}\n" in said for label, count in stated), (stated, said)
    lora, task, federated, central = scope["lora"], scope["task"], scope["federated"], scope["central"]
    assert task.num_params == 1024 and "largest difference:" in said
    assert federated.summary.projector == "factorized" and federated.summary.num_params == 1024
    assert federated.owners == ["0", "1", "2"] and federated.scores.shape == central.scores.shape == (6, 48)
    rel = float(np.abs(federated.scores - central.scores).max() / np.abs(central.scores).max())
    assert rel <= 1e-4, rel
    state = torch.load(federated.out / "checkpoints" / "ckpt_000.pt", weights_only=True)
    frozen = {k: v for k, v in lora.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(state[k], v) for k, v in frozen.items())  # FedAvg left the base model as it was
    assert any(float(v.abs().max()) > 0 for k, v in state.items() if "lora_B" in k)  # the adapters trained

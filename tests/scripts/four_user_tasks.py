"""Four tasks a user brings, through the documented API only, in one script without a main guard:
a tabular regression, an integer-token sequence model, a private 4-class tabular MLP with public
data, and checkpoints the user trained. Each is attributed centrally and over Flower's virtual
clients (the token model's class, defined here in ``__main__``, reaches the Ray actors by value),
and evaluated; one line per task reports the largest relative difference and the LDS."""

import sys

import numpy as np
import torch
from sklearn.datasets import load_diabetes
from torch import nn

import fedtrak

out = sys.argv[1]
print("script body starts", flush=True)


def compare(name, task, checkpoints, **settings):
    """Central and federated scores of ``task`` on the same checkpoints (``checkpoints``: how many
    fedtrak trains, or the user's models), every score released; their largest relative difference,
    and the central run's LDS on a few retrained subsets."""
    central = fedtrak.attribute(task, out=f"{out}/{name}-central", clients=3, checkpoints=checkpoints, **settings)
    folder = central.out / ("checkpoints" if isinstance(checkpoints, int) else "given-checkpoints")
    federated = fedtrak.simulate(task, out=f"{out}/{name}-federated", clients=3, policy="full",
                                 checkpoints=folder, **settings)
    assert (central.ids == federated.ids).all(), f"{name}: the runs' examples differ"
    scale = np.abs(central.scores).max()
    rel = float(np.abs(federated.scores - central.scores).max() / scale)
    block = fedtrak.evaluate(central, lds=True, subsets=12, workers=2, ceiling=False, cache_dir=f"{out}/cache")
    return central, federated, rel, block["lds"]["lds"]


# 1. Regression on a tabular set: diabetes progression (real-valued targets).
x, y = load_diabetes(return_X_y=True)
x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)
y = ((y - y.mean()) / y.std()).astype(np.float32)
regression = fedtrak.task_from_model(
    "diabetes", nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 1)), train=(x[:240], y[:240]),
    query=(x[240:270], y[240:270]), output=fedtrak.Regression(),
    training=fedtrak.TrainConfig(epochs=20, lr=0.05, batch_size=32))
_, _, rel, lds = compare("regression", regression, checkpoints=2)
print(f"TASK regression rel {rel:.3g} lds {lds:.3f}", flush=True)


# 2. An integer-token sequence model, called as Hugging Face models are: model(input_ids=...,
#    attention_mask=...), on padded sequences (token ids stay integers).
class TokenNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(40, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, input_ids, attention_mask):
        mask = attention_mask.unsqueeze(-1).to(torch.float32)
        return self.out((self.embed(input_ids) * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0))


rng = np.random.default_rng(0)
labels = rng.integers(0, 3, size=220)
tokens = rng.integers(0, 40, size=(220, 8))
tokens[:, :4] = 10 * labels[:, None] + rng.integers(0, 10, size=(220, 4))
mask = (np.arange(8)[None, :] < rng.integers(4, 9, size=220)[:, None]).astype(np.int64)  # padded tails
texts = {"input_ids": tokens * mask, "attention_mask": mask}
sequence = fedtrak.task_from_model("tokens", TokenNet(),
                                   train=({k: v[:180] for k, v in texts.items()}, labels[:180]),
                                   query=({k: v[180:] for k, v in texts.items()}, labels[180:]))
_, _, rel, lds = compare("tokens", sequence, checkpoints=2, proj_dim=64)
print(f"TASK tokens rel {rel:.3g} lds {lds:.3f}", flush=True)

# 3. A 4-class tabular MLP, private at epsilon=1 (a plain int) with public data for the kernel.
x4 = rng.normal(size=(420, 8)).astype(np.float32)
y4 = (x4 @ rng.normal(size=(8, 4))).argmax(1)
mlp = fedtrak.task_from_model("four-class", nn.Sequential(nn.Linear(8, 24), nn.ReLU(), nn.Linear(24, 4)),
                              train=(x4[:300], y4[:300]), query=(x4[300:340], y4[300:340]),
                              public=(x4[340:], y4[340:]))
_, _, rel, lds = compare("four-class", mlp, checkpoints=2)
private = fedtrak.simulate(mlp, out=f"{out}/four-class-private", clients=3, epsilon=1, checkpoints=2)
eps = private.summary.privacy.epsilon
print(f"TASK four-class rel {rel:.3g} lds {lds:.3f} private-epsilon {eps:.3f} "
      f"kernel {private.summary.resolved.kernel_source}", flush=True)


# 4. Checkpoints the user trained with their own loop, then evaluated (retrained with that loop).
def my_training(model, x, y, seed):
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(8):
        for i in range(0, len(yt), 32):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[i:i + 32]), yt[i:i + 32]).backward()
            opt.step()
    return model


own = fedtrak.task_from_model("own-checkpoints", nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)),
                              train=(x4[:300], y4[:300]), query=(x4[300:340], y4[300:340]), train_fn=my_training)
models = []
for seed in (1, 2):
    torch.manual_seed(seed)
    models.append(my_training(own.make_model(), x4[:300], y4[:300], seed))
_, _, rel, lds = compare("own-checkpoints", own, checkpoints=models)
print(f"TASK own-checkpoints rel {rel:.3g} lds {lds:.3f}", flush=True)

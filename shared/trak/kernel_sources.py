"""Where a run's kernel comes from: the clients' Grams, the server's public data, or both.

``K_m`` estimates the training data's (curvature-weighted) second moment of
features, ``sum_i w_i phi_m,i phi_m,i^T``. Three sources:

- ``private``: the clients' summed Grams (noised under DP, with lambda raised
  to the noise floor so the kernel stays positive definite).
- ``public``: the server featurizes a public data set it holds (in
  distribution, disjoint from the training data) under the same checkpoint
  and projection, and scales its Gram to the federation's (noised) example
  count: ``K_pub = (n / n_pub) Phi_pub^T diag(w) Phi_pub``. No Gram is
  released, so none is noised or accounted for.
- ``hybrid``: the noised private Gram, projected to the positive
  semi-definite cone (eigenvalues below 0 set to 0: post-processing), shrunk
  towards the public kernel by the share of the difference the noise explains,
  ``K = a K_pub + (1 - a) PSD(G~)`` with ``a = min(1, E||N||_F^2 / ||G~ - K_pub||_F^2)``
  (a James-Stein weight; ``E||N||_F^2`` is the known noise energy). No lambda
  floor is needed: the result is PSD, and lambda follows its rule.

``auto`` (the default) is ``private`` without noise (exact) and ``public``
under DP when public data exists (with ``secure-agg`` asked for, ``hybrid``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedtrak.config.settings import Settings
from fedtrak.data.inputs import numeric_array
from fedtrak.data.tasks import Task
from fedtrak.errors import FedtrakError
from fedtrak.trak.featurizer import Features
from fedtrak.trak.kernel import Kernel, effective_inverse
from fedtrak.trak.scoring import self_kernel_term

#: The sources that build the kernel (partly) from public data.
USES_PUBLIC = ("public", "hybrid")


def public_data(settings: Settings, task: Task) -> tuple[np.ndarray, np.ndarray] | None:
    """The public inputs and labels the settings name: an ``.npz`` file, the query set, or the
    task's public split (``None`` when the task has none and none is named).

    Raises:
        FedtrakError: on a file that cannot be read or whose arrays do not fit the task.
    """
    spec = settings.kernel.public_data
    if spec is None:
        return None if task.x_public is None else (task.x_public, task.y_public)
    if spec == "queries":
        return task.x_query, task.y_query
    path = Path(spec).expanduser()
    try:
        with np.load(path, allow_pickle=False) as arrays:
            x, y = numeric_array(arrays["x"]), np.asarray(arrays["y"])
    except (OSError, ValueError, KeyError) as exc:
        raise FedtrakError(f"public data {path}: cannot read arrays x and y from an .npz file ({exc})") from exc
    if x.shape[1:] != task.input_shape or y.shape != (len(x),) or len(x) == 0:
        raise FedtrakError(f"public data {path}: x {x.shape} and y {y.shape} do not fit task {task.name} "
                           f"(inputs {task.input_shape}, one label each, at least one example)")
    if not np.all(np.isfinite(x)):
        raise FedtrakError(f"public data {path}: inputs must be finite")
    return x, task.output.labels(y, task.num_classes, f"public data {path}")


def resolve_kernel_source(settings: Settings, task: Task) -> str:
    """The settings' kernel source with ``auto`` decided (see the module docstring).

    Raises:
        FedtrakError: if a public or hybrid kernel is asked for without public data, or a public
            kernel together with secure aggregation (no Gram is released to aggregate).
    """
    source = settings.kernel.kernel_source
    has_public = settings.kernel.public_data is not None or task.x_public is not None
    if source == "auto":
        if not settings.privacy.wants_noise or not has_public or settings.release.mode != "private":
            return "private"
        return "hybrid" if settings.secagg.secure_agg else "public"
    if source in USES_PUBLIC and not has_public:
        raise FedtrakError(f"kernel-source {source} needs public data: task {task.name} has no public split; "
                           "give public-data (an .npz file with x and y, or 'queries')")
    if source == "public" and settings.secagg.secure_agg:
        raise FedtrakError("kernel-source public releases no Gram, so secure-agg has nothing to sum: "
                           "use kernel-source hybrid or private, or drop secure-agg")
    return source


def public_gram(public: Features, weighted: bool, count: float) -> np.ndarray:
    """The public kernel of one checkpoint: the ``public`` features' (weighted) Gram scaled to
    ``count`` training examples.

    Raises:
        FedtrakError: if the count is not positive.
    """
    if not count > 0:
        raise FedtrakError(f"the public kernel is scaled to the training examples' count, got {count}")
    rows = np.asarray(public.features, dtype=np.float64)
    if weighted:
        rows = rows * np.sqrt(np.asarray(public.curvature, dtype=np.float64))[:, None]
    return ledoit_wolf(rows) * float(count)


def ledoit_wolf(rows: np.ndarray) -> np.ndarray:
    """The Ledoit-Wolf estimate of the second moment ``E[x x^T]`` from the ``(n, k)`` sample ``rows``:
    the sample moment ``S`` shrunk towards ``(tr S / k) I`` by the intensity the sample itself implies
    (Ledoit and Wolf 2004), which is well conditioned even when ``n < k``."""
    n, k = rows.shape
    sample = rows.T @ rows / n
    mu = float(np.trace(sample)) / k
    spread = float(np.sum(sample**2)) - 2 * mu * float(np.trace(sample)) + k * mu**2  # ||S - mu I||_F^2
    if not spread > 0:
        return sample
    norms = np.sum(rows**2, axis=1)
    quad = np.einsum("ij,jk,ik->i", rows, sample, rows)
    beta = float(np.sum(norms**2 - 2 * quad + np.sum(sample**2))) / n**2
    rho = min(1.0, beta / spread)
    return (1 - rho) * sample + rho * mu * np.eye(k)


def psd_part(matrix: np.ndarray) -> np.ndarray:
    """The nearest positive semi-definite matrix in Frobenius norm: negative eigenvalues set to 0."""
    sym = (np.asarray(matrix, dtype=np.float64) + np.asarray(matrix, dtype=np.float64).T) / 2
    values, vectors = np.linalg.eigh(sym)
    return (vectors * np.maximum(values, 0.0)) @ vectors.T


def hybrid_gram(noised: np.ndarray, public: np.ndarray, noise_energy: float) -> tuple[np.ndarray, float]:
    """The hybrid kernel ``a K_pub + (1 - a) PSD(G~)`` and its prior weight ``a`` (module docstring);
    ``noise_energy`` is the expected squared Frobenius norm of the noise in ``noised``."""
    gap = float(np.sum((np.asarray(noised, dtype=np.float64) - public) ** 2))
    weight = 1.0 if gap <= 0 else min(1.0, max(0.0, noise_energy / gap))
    return weight * public + (1.0 - weight) * psd_part(noised), weight


def source_gram(source: str, private: np.ndarray | None, count: float, public: Features | None,
                weighted: bool, noise_energy: float = 0.0) -> tuple[np.ndarray, dict]:
    """One checkpoint's kernel (before lambda) from ``source``: the ``private`` summed Gram, the
    ``public`` features' Gram scaled to ``count``, or the ``hybrid`` of both (``noise_energy``: the
    private Gram's expected squared noise norm). Returns it with a record for the run summary.

    Raises:
        FedtrakError: if the source needs a Gram or public data it was not given.
    """
    if source == "private":
        if private is None:
            raise FedtrakError("the private kernel needs the clients' summed Gram")
        return private, {"kernel_source": "private"}
    if public is None:
        raise FedtrakError(f"kernel-source {source} needs public data")
    pub = public_gram(public, weighted, count)
    record = {"kernel_source": source, "num_public": len(public.out_to_loss), "scaled_to": float(count)}
    if source == "public":
        return pub, record
    if private is None:
        raise FedtrakError("the hybrid kernel needs the clients' summed Gram")
    matrix, weight = hybrid_gram(private, pub, noise_energy)
    return matrix, {**record, "prior_weight": weight}


#: Folds of the public set when its examples' self-influence is measured under kernels that did not see them.
PUBLIC_FOLDS = 5


def held_out_self_terms(source: str, public: Features, private: np.ndarray | None, count: float, weighted: bool,
                        noise_energy: float, lam: float, normalize: str, kernel_inverse: np.ndarray) -> np.ndarray:
    """Each public example's self term ``phi^T K^-1 phi`` under a kernel that did not see it, as a
    training example's is (``(n_pub,)``). A private kernel never sees public data: its own
    ``kernel_inverse``. A public or hybrid kernel is rebuilt without each of :data:`PUBLIC_FOLDS`
    folds of the public set (same source, count, ``lam`` and ``normalize``): its own examples'
    terms would be biased low, as its fit includes them."""
    if source == "private":
        return self_kernel_term(public.features, kernel_inverse)
    n = len(public.out_to_loss)
    out = np.empty(n)
    for held in np.array_split(np.arange(n), min(PUBLIC_FOLDS, n)):
        keep = np.setdiff1d(np.arange(n), held)
        rest = Features(public.features[keep], public.out_to_loss[keep],
                        None if public.curvature is None else public.curvature[keep])
        matrix = source_gram(source, private, count, rest, weighted, noise_energy)[0]
        out[held] = self_kernel_term(public.features[held], effective_inverse(Kernel(matrix, lam), normalize))
    return out

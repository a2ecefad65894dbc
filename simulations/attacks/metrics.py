"""How close a reconstruction is to the true example: PSNR and SSIM (scikit-image).

Inputs of the built-in tasks are images with values in [0, 1] (digits: 8x8,
Fashion-MNIST: 28x28). An example counts as *recovered* when its best
reconstruction reaches PSNR >= :data:`RECOGNIZABLE_PSNR` dB (a root-mean-square
pixel error of at most 10% of the range; SSIM is not used for this: on 8x8
digits the class mean alone scores SSIM 0.84). The baseline that
needs no release is the mean image of the example's class over the server's
own query set: an attack is only worth something above it.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import linear_sum_assignment
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from fedtrak.errors import FedtrakError

#: PSNR (dB) at or above which a reconstruction counts as recognizable.
RECOGNIZABLE_PSNR = 20.0

#: PSNR reported for an exact reconstruction (skimage gives infinity).
MAX_PSNR = 100.0


def image_shape(input_shape: tuple[int, ...]) -> tuple[int, int]:
    """The 2-D image an input is (flat squares such as digits' 64 are 8x8).

    Raises:
        FedtrakError: if the inputs are not single-channel square images.
    """
    if len(input_shape) == 1 and math.isqrt(input_shape[0]) ** 2 == input_shape[0]:
        side = math.isqrt(input_shape[0])
        return side, side
    if len(input_shape) == 3 and input_shape[0] == 1:
        return input_shape[1], input_shape[2]
    if len(input_shape) == 2:
        return input_shape[0], input_shape[1]
    raise FedtrakError(f"inputs of shape {input_shape} are not single-channel images: "
                       "reconstruction quality is measured on images only")


def as_images(x: np.ndarray, input_shape: tuple[int, ...]) -> np.ndarray:
    """``(n, H, W)`` float64 images of inputs ``(n, *input_shape)``, clipped to [0, 1]."""
    h, w = image_shape(input_shape)
    return np.clip(np.asarray(x, dtype=np.float64).reshape(len(x), h, w), 0.0, 1.0)


def psnr(true: np.ndarray, rec: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB for images in [0, 1] (capped at :data:`MAX_PSNR`)."""
    if np.array_equal(true, rec):
        return MAX_PSNR
    return min(MAX_PSNR, float(peak_signal_noise_ratio(true, rec, data_range=1.0)))


def ssim(true: np.ndarray, rec: np.ndarray) -> float:
    """Structural similarity of two images in [0, 1] (window 7, or the image side if smaller)."""
    win = min(7, *true.shape)
    win -= 1 - win % 2
    return float(structural_similarity(true, rec, data_range=1.0, win_size=win))


def best_match(true: np.ndarray, recs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pair each true image with a reconstruction, one each where there are enough (the pairing
    with the highest summed SSIM), else the most similar one; return the index, PSNR and SSIM."""
    if not len(recs):
        raise FedtrakError("no reconstructions to compare")
    sim = np.array([[ssim(t, r) for r in recs] for t in true])
    if len(recs) >= len(true):
        rows, cols = linear_sum_assignment(-sim)
        idx = cols[np.argsort(rows)]
    else:
        idx = sim.argmax(axis=1)
    return idx, np.array([psnr(t, recs[j]) for t, j in zip(true, idx)]), sim[np.arange(len(true)), idx]


def class_means(x: np.ndarray, y: np.ndarray, num_classes: int, input_shape: tuple[int, ...]) -> np.ndarray:
    """Mean image of each class ``(C, H, W)`` (zeros for a class with no example)."""
    imgs = as_images(x, input_shape)
    out = np.zeros((num_classes, *imgs.shape[1:]))
    for c in range(num_classes):
        if np.any(y == c):
            out[c] = imgs[y == c].mean(axis=0)
    return out


def quality(true: np.ndarray, psnrs: np.ndarray, ssims: np.ndarray, baseline: np.ndarray) -> dict:
    """Summary numbers of one attack: mean and spread of PSNR/SSIM, the share recognizable, and
    the same for the class-mean baseline (``baseline``: each true image's class mean)."""
    base_p = np.array([psnr(t, b) for t, b in zip(true, baseline)])
    base_s = np.array([ssim(t, b) for t, b in zip(true, baseline)])

    def stats(p: np.ndarray, s: np.ndarray) -> dict:
        return {"psnr_mean": round(float(p.mean()), 2), "psnr_std": round(float(p.std()), 2),
                "ssim_mean": round(float(s.mean()), 3), "ssim_std": round(float(s.std()), 3),
                "recovered": round(float((p >= RECOGNIZABLE_PSNR).mean()), 3)}

    return {"examples": len(true), **stats(psnrs, ssims), "baseline": stats(base_p, base_s),
            "recognizable_psnr": RECOGNIZABLE_PSNR}

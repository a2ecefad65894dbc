"""Image strips of true examples above their reconstructions (for the report and the docs)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from fedtrak.simulations.attacks.metrics import image_shape


def strip_figure(strips: list[tuple[str, np.ndarray, np.ndarray]], input_shape: tuple[int, ...],
                 title: str) -> bytes:
    """A PNG: for each ``(label, true, rebuilt)`` a row of true inputs above a row of rebuilt ones."""
    shape = image_shape(input_shape)
    cols = max(len(t) for _, t, _ in strips)
    fig, axes = plt.subplots(2 * len(strips), cols, figsize=(1.2 * cols, 1.3 * 2 * len(strips)), squeeze=False)
    for i, (label, true, rec) in enumerate(strips):
        for r, (imgs, kind) in enumerate(((true, "true"), (rec, "rebuilt"))):
            for j in range(cols):
                ax = axes[2 * i + r, j]
                ax.set_xticks([])
                ax.set_yticks([])
                if j >= len(imgs):
                    ax.axis("off")
                    continue
                ax.imshow(np.clip(np.asarray(imgs[j], dtype=np.float32).reshape(shape), 0, 1), cmap="gray_r",
                          vmin=0, vmax=1)
                if j == 0:
                    ax.set_ylabel(f"{label}\n{kind}", fontsize=7)
    fig.suptitle(title, fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()

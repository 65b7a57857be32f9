"""Matplotlib figures (Agg backend: no display needed). Each function writes a PNG and returns its path."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def partition_heatmap(counts: np.ndarray, path: str | Path, title: str = "", max_clients: int = 100) -> Path:
    """Client x label heatmap of sample counts (the first ``max_clients`` clients when there are more)."""
    path = Path(path)
    shown = counts[:max_clients]
    height = max(3.0, min(12.0, 0.12 * len(shown) + 1.5))
    fig, ax = plt.subplots(figsize=(6.5, height))
    im = ax.imshow(shown, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("label")
    ax.set_ylabel("client" + (f" (first {max_clients} of {len(counts)})" if len(counts) > max_clients else ""))
    ax.set_xticks(range(counts.shape[1]))
    ax.set_title(title or "samples per client and label")
    fig.colorbar(im, ax=ax, label="samples")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

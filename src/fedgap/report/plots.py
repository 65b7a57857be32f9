"""Matplotlib figures (Agg backend: no display needed). Each ``*_figure`` function returns a Figure;
``save`` writes it as a PNG and ``png_bytes`` gives the bytes for embedding in the HTML report."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

CENTRAL, NAIVE = "#222222", "#d62728"
# one colour per cause group (fedgap.diagnose.variants.CAUSES), the combinations and the tuned-FedAvg reference
CAUSE_COLORS = {"normalization": "#1f77b4", "client drift": "#2ca02c", "label skew (classifier)": "#17becf",
                "swings between rounds": "#e377c2",
                "server optimizer and schedules": "#9467bd", "regularization": "#ff7f0e", "combined": "#8c564b",
                "tuning alone": "#bcbd22", "": "#7f7f7f"}
COLOR_NAMES = {"#1f77b4": "blue", "#2ca02c": "green", "#17becf": "cyan", "#e377c2": "pink", "#9467bd": "purple",
               "#ff7f0e": "orange", "#8c564b": "brown", "#bcbd22": "olive", "#7f7f7f": "grey"}


def colour_legend() -> str:
    """The plots' colours in words, for the caption below them."""
    names = {"combined": "combination", "tuning alone": "tuned FedAvg"}
    return ", ".join(f"{COLOR_NAMES[colour]} = {names.get(cause, cause)}" for cause, colour in CAUSE_COLORS.items()
                     if cause)


def save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def partition_heatmap_figure(counts: np.ndarray, title: str = "", max_clients: int = 100):
    """Client x label heatmap of sample counts (the first ``max_clients`` clients when there are more)."""
    shown = counts[:max_clients]
    height = max(3.0, min(12.0, 0.06 * len(shown) + 1.8))
    fig, ax = plt.subplots(figsize=(6.5, height))
    im = ax.imshow(shown, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("label")
    ax.set_ylabel("client" + (f" (first {max_clients} of {len(counts)})" if len(counts) > max_clients else ""))
    ax.set_xticks(range(0, counts.shape[1], max(1, -(-counts.shape[1] // 20))))  # at most 20 label ticks
    ax.set_title(title or "samples per client and label")
    fig.colorbar(im, ax=ax, label="samples")
    fig.tight_layout()
    return fig


def partition_heatmap(counts: np.ndarray, path: str | Path, title: str = "", max_clients: int = 100) -> Path:
    return save(partition_heatmap_figure(counts, title, max_clients), path)


def _style(key: str, cause: str):
    if key == "naive":
        return dict(color=NAIVE, lw=2.6, zorder=5)
    if key == "central":
        return dict(color=CENTRAL, lw=2.2, ls="--", zorder=6)
    return dict(color=CAUSE_COLORS.get(cause, "#7f7f7f"), lw=1.4, alpha=0.9)


def accuracy_figure(curves: list[tuple[str, str, str, list[tuple[int, float, float]]]], central_final: float | None):
    """Left: test accuracy per round for every variant, the centralized final accuracy as a dashed line.
    Right: the same against training samples processed, with the centralized run's own curve.
    ``curves``: (key, label, cause, [(round, accuracy, cumulative samples), ...]), seed 0 of each."""
    shown = [c for c in curves if c[3]]
    rows = -(-(len(shown) + 1) // 3)  # legend rows below the plots, three entries a row
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.6 + 0.22 * rows))
    dashes = ("-", "--", "-.", ":")
    seen: dict[str, int] = {}  # variants of one colour (a cause, the combinations) get different dashes
    for key, label, cause, pts in shown:
        r, a, s = (np.array(x, dtype=float) for x in zip(*pts, strict=True))
        style = _style(key, cause)
        if key not in ("naive", "central"):
            n = seen[style["color"]] = seen.get(style["color"], -1) + 1
            style["ls"] = dashes[n % len(dashes)]
        if len(r) <= 15:
            style["marker"] = "o"
            style["ms"] = 3.5
        if key != "central":
            ax1.plot(r, 100 * a, label=label, **style)
        ax2.plot(s / 1e3, 100 * a, label=label, **style)
    if central_final is not None:
        ax1.axhline(100 * central_final, **_style("central", ""), label="centralized (final)")
    lows = [100 * a for _, _, _, pts in curves for _, a, _ in pts]
    floor = max(0.0, min(np.percentile(lows, 10) if lows else 0.0, 100 * (central_final or 1) - 15))
    for ax, xlabel in ((ax1, "round"), (ax2, "training samples processed (thousands)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy (%)")
        ax.set_ylim(floor, 100)
        ax.grid(alpha=0.3)
    ax1.set_title("accuracy per round")
    ax2.set_title("accuracy per training sample (centralized = one client)")
    handles, labels = ax1.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.22 * rows / fig.get_figheight() + 0.02, 1, 1))
    return fig


def gap_figure(rows: list[tuple[str, str, float, float | None]]):
    """Horizontal bars: the gap to centralized training (pp) per variant, best at the top.
    ``rows``: (key, label, gap_pp, std_pp or None)."""
    rows = [r for r in rows if r[2] is not None]
    fig, ax = plt.subplots(figsize=(7.5, 0.38 * len(rows) + 1.3))
    y = np.arange(len(rows))[::-1]
    colors = [NAIVE if k == "naive" else "#4c78a8" for k, *_ in rows]
    ax.barh(y, [g for _, _, g, _ in rows], xerr=[s or 0 for *_, s in rows], color=colors, alpha=0.9)
    ax.set_yticks(y, [label for _, label, _, _ in rows])
    for yi, (_, _, g, _) in zip(y, rows, strict=True):
        ax.text(g, yi, f" {g:.2f}", va="center", fontsize=8)
    ax.axvline(0, color="#444", lw=0.8)
    ax.set_xlabel("gap to centralized (percentage points, lower is better)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def diagnostics_figure(series: dict[str, list], layers: list[str]):
    """Four panels over the naive run's evaluation rounds: BN divergence per layer, train- vs eval-mode accuracy,
    client drift, per-client accuracy spread."""
    rounds = np.array(series.get("round", []), dtype=float)

    def col(key):
        return np.array([np.nan if v is None else float(v) for v in series.get(key, [None] * len(rounds))])

    have = ~np.isnan(col("test_accuracy")) if len(rounds) else np.zeros(0, bool)
    r = rounds[have]
    mark = dict(marker="o", ms=3.5) if len(r) <= 15 else {}
    fig, axes = plt.subplots(2, 2, figsize=(12, 7.5))
    ax = axes[0, 0]
    for layer in layers:
        ax.plot(r, col(f"bn_divergence[{layer}]")[have], lw=1.2, label=layer, **mark)
    if layers:
        ax.plot(r, col("bn_running_error")[have], color="k", ls="--", lw=1.6, label="running-stat error (mean)")
        ax.plot(r, col("bn_client_spread")[have], color="k", ls=":", lw=1.6, label="client spread (mean)")
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no BatchNorm layers", ha="center", transform=ax.transAxes)
    ax.set_title("BatchNorm statistics divergence (in std units)")
    ax = axes[0, 1]
    ax.plot(r, 100 * col("test_accuracy")[have], color=NAIVE, lw=2, label="eval mode (running statistics)", **mark)
    if "train_mode_accuracy" in series:
        ax.plot(r, 100 * col("train_mode_accuracy")[have], color="#1f77b4", lw=2, label="train mode (batch statistics)",
                **mark)
    ax.legend(fontsize=8)
    ax.set_title("global model: eval- vs train-mode BatchNorm")
    ax.set_ylabel("test accuracy (%)")
    ax = axes[1, 0]
    ax.plot(r, col("client_drift")[have], color="#2ca02c", lw=2, label="relative spread of client updates", **mark)
    ax2 = ax.twinx()
    ax2.plot(r, col("update_cosine")[have], color="#555", lw=1.2, ls="--", label="mean cosine to the mean")
    ax2.set_ylim(-1, 1)
    ax.set_title("client drift")
    ax.legend(loc="upper left", fontsize=8)
    ax2.legend(loc="upper right", fontsize=8)
    ax = axes[1, 1]
    mean, lo, hi = (100 * col(k)[have] for k in ("client_acc_mean", "client_acc_min", "client_acc_max"))
    ax.fill_between(r, lo, hi, color="#ff7f0e", alpha=0.25, label="min to max over sampled clients")
    ax.plot(r, mean, color="#ff7f0e", lw=2, label="mean", **mark)
    ax.set_title("global model on each client's label mix")
    ax.set_ylabel("accuracy (%)")
    ax.legend(fontsize=8)
    for a in axes.flat:
        a.set_xlabel("round")
        a.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def sweep_figure(curves: list[tuple[str, list[tuple[int, float]]]]):
    fig, ax = plt.subplots(figsize=(8, 4.6))
    for label, pts in curves:
        if pts:
            r, a = zip(*pts, strict=True)
            ax.plot(r, 100 * np.array(a), lw=1.5, label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig

"""eval.png: the loss-by-position curve and the passkey accuracy heatmap, side by side.

Left: held-out loss per position bucket (x: the bucket's end, log2 scale; a falling curve means
later tokens profit from the context before them). Right: passkey accuracy, rows = context
length, columns = depth of the key (0 = start of the filler, 1 = end), 0..100 %.
matplotlib with the Agg backend (no display needed), imported only here.
"""
from __future__ import annotations

import os


def write_png(result: dict, path: str) -> None:
    """Draw `result` (eval.json's content) into `path` (a temporary name, then renamed into
    place by the caller, so a crash never leaves a torn image)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    _loss_curve(left, result.get("loss_by_position") or [])
    _heatmap(fig, right, result.get("passkey") or [])
    title = result.get("checkpoint")
    if title:
        fig.suptitle(os.path.basename(os.path.normpath(title)) or title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def _loss_curve(ax, rows: list[dict]) -> None:
    points = [(r["end"], r["loss"]) for r in rows if r.get("loss") is not None]
    ax.set_title("held-out loss by position")
    if not points:
        ax.text(0.5, 0.5, "no loss_by_position", ha="center", va="center")
        return
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("position (bucket end, tokens)")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(True, alpha=0.3)


def _heatmap(fig, ax, rows: list[dict]) -> None:
    ax.set_title("passkey accuracy")
    if not rows:
        ax.text(0.5, 0.5, "no passkey", ha="center", va="center")
        return
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    grid = [[float("nan")] * len(depths) for _ in lengths]
    for r in rows:
        grid[lengths.index(r["length"])][depths.index(r["depth"])] = 100 * r["accuracy"]
    image = ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto", origin="lower")
    ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_yticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_xlabel("depth of the key")
    ax.set_ylabel("context length (tokens)")
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax, label="accuracy (%)")

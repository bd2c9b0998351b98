"""What a run says about its data mixture (data.sources): token shares, epochs, lengths.

- `token_fields`: metrics.jsonl's `tokens/<name>`, the input tokens each source has given so
  far (its rows x data.seq_len; exact, from the mixture's sample assignment, no sync);
- `epoch_warnings`: one warning per source the run reads more than once over (its windows
  then repeat epoch by epoch, in a new order each time: data/mixture.py's stated rule);
- `write_length_report`: `tokens_by_length.json` and `.png` in the run dir, the input tokens
  the whole run reads from each source by document length (data/lengths.py).
"""
from __future__ import annotations

import json
import os

from ..data.lengths import length_profile
from ..utils.atomic import atomic_write


def announce(data, steps: int, run_dir: str, say, is_main: bool) -> None:
    """At the start of a run: `epoch_warnings`, and (main rank) `write_length_report`."""
    for line in epoch_warnings(data, steps):
        say(line)
    if is_main and write_length_report(data, steps, run_dir):
        say(f"data: input tokens by document length per source: {run_dir}/tokens_by_length.png")


def token_fields(data, steps: int, seq_len: int) -> dict:
    """{"tokens/<name>": tokens of source `name` in the first `steps` global batches}."""
    return {f"tokens/{name}": n * seq_len for name, n in data.source_samples(steps).items()}


def epoch_warnings(data, steps: int) -> list[str]:
    """A warning line per source that `steps` global batches read more than once over."""
    out = []
    for name, n in data.source_samples(steps).items():
        windows = data.sources[name]["train"].n_windows
        if n > windows:
            out.append(f"warning: data: source {name!r} has {windows} training windows but "
                       f"this run reads {n} ({n / windows:.2f} epochs): its windows repeat, "
                       "epoch by epoch, in a new order each time (docs/data.md); add data "
                       "or lower its weight to avoid that")
    return out


def write_length_report(data, steps: int, run_dir: str) -> str | None:
    """Write tokens_by_length.json and .png for a mixture; return the png's path (or None)."""
    profile = length_profile(data, steps)
    if not profile:
        return None
    base = os.path.join(run_dir, "tokens_by_length")
    atomic_write(base + ".json", json.dumps({"steps": steps, **profile}, indent=1))
    atomic_write(base + ".png", lambda tmp: _plot(profile, steps, tmp))
    return base + ".png"


def _plot(profile: dict, steps: int, path: str) -> None:
    """Grouped bars: x = document length bin (log2), y = tokens read, one colour per source."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges, sources = profile["edges"], profile["sources"]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / max(1, len(sources))
    for j, (name, row) in enumerate(sources.items()):
        xs = [k + j * width for k in range(len(edges) - 1)]
        ax.bar(xs, row["tokens"], width=width, label=f"{name} ({row['epochs']:.2f} epochs)")
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(edges) - 1)])
    ax.set_xticklabels([_short(e) for e in edges[:-1]], rotation=45, fontsize=8)
    ax.set_xlabel("document length (tokens, bin start; bins double)")
    ax.set_ylabel("input tokens read")
    ax.set_title(f"tokens by document length over {steps} steps, per source", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def _short(n: int) -> str:
    return f"{n // (1 << 20)}M" if n >= 1 << 20 else f"{n // 1024}k" if n >= 1024 else str(n)

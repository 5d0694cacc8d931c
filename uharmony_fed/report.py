"""Pictures of a run: training curves and per-site Dice, from the run's metrics.jsonl."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from uharmony_fed import REGIONS  # noqa: E402


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of ``metrics.jsonl`` (an empty list if the run wrote none)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_run_report(run_dir: Path) -> list[Path]:
    """Write ``curves.png`` (loss and Dice against round per site) and ``site_dice.png``.

    Returns:
        The pictures written.
    """
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    if not rows:
        return []
    loss: dict[str, list[tuple[int, float]]] = defaultdict(list)
    dice: dict[str, list[tuple[int, float]]] = defaultdict(list)
    last: dict[str, dict] = {}
    for row in rows:
        if row.get("phase") == "train":
            loss[row["site"]].append((row["round"], row["train-loss"]))
        elif row.get("phase") == "eval" and "dice-mean" in row:
            dice[row["site"]].append((row["round"], row["dice-mean"]))
            last[row["site"]] = row
    out = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for site, pts in sorted(loss.items()):
        axes[0].plot(*zip(*pts), marker="o", label=site)
    for site, pts in sorted(dice.items()):
        axes[1].plot(*zip(*pts), marker="o", label=site)
    axes[0].set(title="local training loss", xlabel="round", ylabel="Dice+BCE loss")
    axes[1].set(title="validation Dice (mean of annotated regions)", xlabel="round", ylabel="Dice",
                ylim=(0, 1))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out.append(run_dir / "curves.png")
    fig.savefig(out[-1], dpi=110)
    plt.close(fig)
    if last:
        fig, ax = plt.subplots(figsize=(7, 4))
        sites = sorted(last)
        width = 0.8 / len(REGIONS)
        for j, region in enumerate(REGIONS):
            vals = [last[s].get(f"dice-{region}", 0.0) for s in sites]
            xs = [i + (j - 1) * width for i in range(len(sites))]
            bars = ax.bar(xs, vals, width, label=region)
            for x, s, bar in zip(xs, sites, bars):
                if f"dice-{region}" not in last[s]:
                    ax.text(x, 0.01, "n/a", ha="center", fontsize=7, rotation=90)
                else:
                    ax.text(x, bar.get_height() + 0.01, f"{bar.get_height():.2f}", ha="center", fontsize=7)
        ax.set_xticks(range(len(sites)), sites)
        ax.set(ylim=(0, 1.05), ylabel="Dice", title="final Dice per site (n/a: region not annotated)")
        ax.legend()
        fig.tight_layout()
        out.append(run_dir / "site_dice.png")
        fig.savefig(out[-1], dpi=110)
        plt.close(fig)
    return out

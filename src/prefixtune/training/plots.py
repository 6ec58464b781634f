"""Plots drawn from logs (matplotlib, no display needed)."""

from __future__ import annotations

import json
from pathlib import Path


def plot_log(log_path: str | Path, png_path: str | Path) -> Path | None:
    """Training loss (and dev loss) against step, from a ``log.jsonl``; None if there is nothing to plot."""
    # imported here, on purpose: pyplot takes a second to import and wants its backend chosen first; every
    # CLI command imports this module, only training draws
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    dev = [(r["step"], r["dev_loss"]) for r in records if "dev_loss" in r]
    if not train and not dev:
        return None
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if dev:
        ax.plot(*zip(*dev, strict=True), marker="o", label="dev loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per target token")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = Path(png_path).with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(png_path)
    return Path(png_path)

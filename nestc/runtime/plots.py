"""Training curves as PNG (matplotlib, drawn off-screen)."""

from __future__ import annotations

import json
import math
import os


def training_curves(directory: str, baseline: float | None = None, unit: str = "byte") -> str | None:
    """Plot `metrics.jsonl` of a run directory into `curves.png`, with the unigram `baseline` in
    bits per `unit` (byte, or token with a tokenizer or a task) when given; returns its path (None
    without data)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    path = os.path.join(directory, "metrics.jsonl")
    with open(path, encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    if not records:
        return None
    figure, axis = plt.subplots(figsize=(7, 4))
    axis.plot([r["step"] for r in records], [r["loss"] / math.log(2) for r in records], label=f"train (bits/{unit})",
              linewidth=1)
    for key, label in (("eval_bits_per_byte", f"held-out (bits/{unit})"),
                       ("in_distribution_accuracy", "held-out accuracy, training lengths"),
                       ("longer_accuracy", "held-out accuracy, longer than training")):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            axis.plot(*zip(*points), marker="o", label=label)
    if baseline is not None:
        axis.axhline(baseline, color="gray", linestyle="--", linewidth=1, label=f"unigram baseline {baseline:.2f}")
    axis.set_xlabel("step")
    accuracy = any("in_distribution_accuracy" in r for r in records)
    axis.set_ylabel(f"bits per {unit}" + (", accuracy" if accuracy else ""))
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    axis.grid(alpha=0.3)
    axis.legend()
    axis.set_title(os.path.basename(os.path.normpath(directory)))
    output = os.path.join(directory, "curves.png")
    figure.savefig(output + ".tmp.png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    os.replace(output + ".tmp.png", output)
    return output

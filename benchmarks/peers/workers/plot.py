"""Bar chart of a peers.py results file: one group per workload, one bar per engine.

Run with a Python that has matplotlib (``.peers/plot``; the repository's venv does not):
``PYTHON -m benchmarks.peers.workers.plot RESULTS.json OUT.png`` from the repository root.
Workloads measured in req/s and tok/s share an axis only per group, so each group is labelled
with its unit."""

from __future__ import annotations

import json
import sys
import textwrap

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def plot(results: dict, out: str) -> None:
    workloads = results["workloads"]
    engines = [e for e in results["engines"] if results["engines"][e].get("rates")]
    fig, axes = plt.subplots(1, len(workloads), figsize=(3.2 * len(workloads), 4.2))
    for ax, w in zip(axes if len(workloads) > 1 else [axes], workloads):
        rates = [results["engines"][e]["rates"].get(w["name"], 0.0) for e in engines]
        bars = ax.bar(range(len(engines)), rates, color=[f"C{i}" for i in range(len(engines))])
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.set_title(textwrap.fill(w["title"], 30), fontsize=8)
        ax.set_ylabel(w["unit"])
        ax.set_xticks(range(len(engines)), engines, rotation=45, ha="right", fontsize=7)
    fig.suptitle(results["caption"], fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        plot(json.load(f), sys.argv[2])

"""Plot of a served.py results file: a row per checkpoint kind, columns output tok/s, TTFT p50
and ITL p50 against the request rate, one line per engine.

Run with a Python that has matplotlib (``.peers/plot``; the repository's venv does not):
``PYTHON -m benchmarks.peers.workers.plot_served RESULTS.json OUT.png`` from the repository
root. Rates are categories (``inf`` last), not a numeric axis."""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

PANELS = [
    ("out_tok_s", "output tok/s"),
    ("ttft_p50_ms", "TTFT p50 (ms)"),
    ("itl_p50_ms", "ITL p50 (ms)"),
]


def plot(results: dict, out: str) -> None:
    kinds = [k for k, engines in results["results"].items() if engines]
    rates = results["rates"]
    fig, axes = plt.subplots(
        len(kinds), len(PANELS), figsize=(3.6 * len(PANELS), 2.9 * len(kinds)), squeeze=False
    )
    for row, kind in zip(axes, kinds):
        for ax, (key, title) in zip(row, PANELS):
            for i, (name, cells) in enumerate(results["results"][kind].items()):
                xs = [j for j, r in enumerate(rates) if r in cells]
                ax.plot(xs, [cells[rates[j]][key] for j in xs], "o-", color=f"C{i}", label=name)
            ax.set_xticks(range(len(rates)), rates)
            ax.set_xlabel("request rate (req/s)", fontsize=8)
            ax.set_title(f"{kind}: {title}", fontsize=9)
            if key == "out_tok_s":
                ax.set_ylim(bottom=0)
            else:
                ax.set_yscale("log")
        row[0].legend(fontsize=7)
    fig.suptitle(results["caption"], fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        plot(json.load(f), sys.argv[2])

"""Accuracy-per-step curves of several result files in one PNG.

python -m learner.plot results/cifar10-b0-s5_*.json --out results/curves.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402


def label_of(result: dict[str, Any]) -> str:
    mem = result["memory"]
    memory = "no memory" if mem["mode"] == "none" else f"memory {mem['size']}"
    source = result.get("source", "offline")
    return (
        f"{result['method'].upper()}, {memory} ({source}): "
        f"avg {result['metrics']['avg_incremental_accuracy']:.1f}, last {result['metrics']['last_accuracy']:.1f}"
    )


def plot(results: list[dict[str, Any]], out: Path, title: str | None = None) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for r in results:
        seen = [s["seen_classes"] for s in r["steps"]]
        ax.plot(seen, r["cnn"]["accuracy_per_step"], marker="o", label=label_of(r))
    ax.set_xlabel("classes seen")
    ax.set_ylabel("top-1 accuracy on all seen classes (%)")
    protocols = sorted({r["protocol"] for r in results})
    epochs = sorted({r["config"]["optim"]["epochs"] for r in results})
    devices = sorted({r["machine"]["device"] for r in results})
    ax.set_title(
        title
        or f"{', '.join(protocols)}; {'/'.join(map(str, epochs))} epochs per step; {', '.join(devices)}"
    )
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m learner.plot", description=__doc__)
    p.add_argument("results", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--title", default=None)
    args = p.parse_args(argv)
    results = [json.loads(path.read_text()) for path in args.results]
    plot(results, args.out, args.title)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

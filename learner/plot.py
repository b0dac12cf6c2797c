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


def label_of(result: dict[str, Any], with_run: bool = False) -> str:
    """``with_run`` adds when and with which CPU ISA / threads the run trained, to tell
    apart curves of the same recipe."""
    mem = result["memory"]
    memory = "no memory" if mem["mode"] == "none" else f"memory {mem['size']}"
    source = result.get("source", "offline")
    if with_run:
        m = result.get("machine", {})
        run = [str(m.get("date", ""))[:16].replace("T", " ")]
        run += [m["cpu_capability"]] if "cpu_capability" in m else []
        run += [f"{m['torch_threads']} threads"] if "torch_threads" in m else []
        source += ", " + ", ".join(x for x in run if x)
    return (
        f"{result['method'].upper()}, {memory} ({source}): "
        f"avg {result['metrics']['avg_incremental_accuracy']:.1f}, last {result['metrics']['last_accuracy']:.1f}"
    )


def plot(results: list[dict[str, Any]], out: Path, title: str | None = None) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    recipe = [label_of(r).split(":")[0] for r in results]
    for i, r in enumerate(results):
        seen = [s["seen_classes"] for s in r["steps"]]
        http = r.get("source") == "http"
        # A replay that equals an offline run would hide under it: dashed over a bigger marker.
        ax.plot(
            seen,
            r["cnn"]["accuracy_per_step"],
            marker="x" if http else "o",
            markersize=9 if http else 6,
            linestyle="--" if http else "-",
            zorder=3 if http else 2,
            label=label_of(r, with_run=recipe.count(recipe[i]) > 1 or http),
        )
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

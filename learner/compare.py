"""Compare learning methods under one budget: accuracy against training cost.

    python -m learner.compare --protocol cifar10-b0-s5 --memory 2000 --epochs 3 \\
        [--methods bsce,ce,wa] [--orders 3] [--seeds 1] [--out results/compare] [recipe flags]

Every method runs the same protocol, data, augmentation, schedule, memory and seed with
learner.bench's runner, one result JSON per run (as learner.bench writes it, plus the
classifier the method is read from). Without ``--methods``, every method of the catalogue that
applies to the memory setting runs: those that need exemplars are left out without a memory,
those made for the memory-free setting (LwF) are left out with one; ``--methods`` runs exactly
the ones named. A run whose result file exists is skipped, so a long table can be produced in
parts: rerun the command, or run it again with other methods or more orders into the same
``--out``.

Then, from every result in ``--out`` with this protocol and recipe (any method, order or seed;
runs of another budget are never mixed in), it writes ``<stem>_table.md``: per method the mean
(and standard deviation over runs) of the average incremental accuracy, the last accuracy,
forgetting, the harmonic mean of old and new accuracy at the last step, the training cost
(the training loop plus any second stage, summed over steps) and the run's wall time; and
``<stem>.png``, average incremental accuracy against training cost. iCaRL is read from its
nearest-mean-of-exemplars classifier (the ``classifier`` column), every other method from its
CNN head. ``--table-only`` rebuilds both without training.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from learner import bench
from learner.core.config import StepConfig
from learner.core.machine import resolve_device
from learner.core.methods import METHOD_NAMES
from learner.data import load_dataset
from learner.methods import get_method
from learner.protocols import Protocol, get_protocol, order_names, resolve_class_order


def applicable_methods(memory_size: int) -> list[str]:
    """The catalogue's methods that apply to a memory of ``memory_size`` exemplars."""
    wanted = {"any", "required"} if memory_size > 0 else {"any", "none"}
    return [m for m in METHOD_NAMES if get_method(m).memory in wanted]


def parse_methods(text: str | None, memory_size: int) -> list[str]:
    if not text:
        return applicable_methods(memory_size)
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in METHOD_NAMES]
    if unknown:
        raise SystemExit(
            f"error: unknown method(s) {', '.join(unknown)}; known: {', '.join(METHOD_NAMES)}"
        )
    needs = [n for n in names if get_method(n).memory == "required" and memory_size == 0]
    if needs:
        raise SystemExit(f"error: {', '.join(needs)} need(s) a memory (--memory > 0)")
    return names


def stem(protocol: str, config: StepConfig) -> str:
    """``<protocol>_mem<M>_<backbone>_e<E>_compare``: the table's and the plot's name."""
    return (
        f"{protocol}_mem{config.memory.size}_{config.model.backbone}_e{config.optim.epochs}_compare"
    )


def run_all(args: argparse.Namespace) -> tuple[Protocol, StepConfig, torch.device]:
    """Run every planned run whose result file is missing; returns the table's budget."""
    device = resolve_device(args.device)
    protocol = get_protocol(args.protocol)
    dataset = load_dataset(protocol.dataset, root=args.data_root, download=args.download)
    base = bench.config_from_args(args, protocol, dataset)
    if args.table_only:
        return protocol, base, device
    methods = parse_methods(args.methods, base.memory.size)
    orders = order_names(args.order or protocol.class_order, args.orders)
    seeds = [args.seed + i for i in range(args.seeds)]
    args.out.mkdir(parents=True, exist_ok=True)
    for method in methods:
        config = base.model_copy(update={"method": method})
        for order_name in orders:
            order = resolve_class_order(protocol, dataset.train.class_names, order_name)
            for seed in seeds:
                path = bench.planned_path(args.out, protocol, config, order_name, seed, device)
                if path.exists():
                    _check_existing(path, protocol, config, args.max_train_per_class, device)
                    print(f"exists, skipped: {path}")
                    continue
                result = bench.run_protocol(
                    protocol,
                    config,
                    dataset,
                    order,
                    seed=seed,
                    device=device,
                    max_train_per_class=args.max_train_per_class,
                    progress=not args.no_progress,
                )
                result["order_name"] = order_name
                result["classifier"] = get_method(method).classifier
                path.write_text(json.dumps(result, indent=1) + "\n")
                print(bench.format_table(result))
                print(f"wrote {path}")
    return protocol, base, device


def _check_existing(
    path: Path,
    protocol: Protocol,
    config: StepConfig,
    max_train_per_class: int | None,
    device: torch.device,
) -> None:
    # The file name does not carry every knob: a file of another recipe under the same name
    # must not pass for this one.
    if not bench.same_budget(
        json.loads(path.read_text()),
        protocol,
        config,
        max_train_per_class,
        device,
        with_method=False,
    ):
        raise SystemExit(
            f"error: {path} exists but was run with another recipe or budget; use another --out"
        )


def collect(
    out: Path,
    protocol: Protocol,
    config: StepConfig,
    max_train_per_class: int | None,
    device: torch.device,
) -> list[dict[str, Any]]:
    """Every run result in ``out`` of this protocol and budget."""
    results = []
    for path in sorted(out.glob("*.json")):
        try:
            result = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if (
            isinstance(result, dict)
            and "steps" in result
            and bench.same_budget(
                result, protocol, config, max_train_per_class, device, with_method=False
            )
        ):
            results.append(result)
    return results


def run_figures(result: dict[str, Any]) -> dict[str, Any]:
    """The table's figures of one run, read from the method's own classifier (the CNN head
    where a run has no nearest-mean evaluation: no exemplars)."""
    classifier = result.get("classifier") or (
        get_method(result["method"]).classifier if result["method"] in METHOD_NAMES else "cnn"
    )
    if classifier == "nme" and not result.get("nme"):
        classifier = "cnn"
    metrics = result["nme"] if classifier == "nme" else result["cnn"]
    steps = result["steps"]
    return {
        "classifier": classifier,
        "avg": metrics["avg_incremental_accuracy"],
        "last": metrics["last_accuracy"],
        "forgetting": metrics["forgetting"],
        "hm_last": metrics["harmonic_mean_per_step"][-1],
        "train_seconds": sum(s["train_seconds"] + s.get("stage_seconds", 0.0) for s in steps),
        "stage_seconds": sum(s.get("stage_seconds", 0.0) for s in steps),
        "wall_seconds": result["wall_seconds"],
    }


_FIGURES = (
    "avg",
    "last",
    "forgetting",
    "hm_last",
    "train_seconds",
    "stage_seconds",
    "wall_seconds",
)


def method_rows(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method (catalogue order), the mean and standard deviation over its runs."""
    by_method: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by_method.setdefault(r["method"], []).append(run_figures(r))
    order = {m: i for i, m in enumerate(METHOD_NAMES)}
    rows = []
    for method in sorted(by_method, key=lambda m: (order.get(m, len(order)), m)):
        runs = by_method[method]
        row: dict[str, Any] = {
            "method": method,
            "classifier": runs[0]["classifier"],
            "runs": len(runs),
        }
        for key in _FIGURES:
            values = [r[key] for r in runs]
            row[key] = None if any(v is None for v in values) else _mean_std(values)
        rows.append(row)
    return rows


def paired_runs(results: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """The runs of the (class order, seed) pairs every method ran, and those pairs' names.

    Why: class orders differ by more than methods do (on cifar10-b0-s5 at a small budget the
    average incremental accuracy of one method spans 9 points over three orders), so a
    method with three orders beside methods with one is compared on the orders they share.
    """
    by_method: dict[str, set[tuple[str | None, int]]] = {}
    for r in results:
        by_method.setdefault(r["method"], set()).add((r.get("order_name"), r["seed"]))
    common = set.intersection(*by_method.values()) if by_method else set()
    paired = [r for r in results if (r.get("order_name"), r["seed"]) in common]
    return paired, [f"{o} seed {s}" for o, s in sorted(common, key=str)]


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def _cell(value: tuple[float, float] | None, fmt: str, runs: int) -> str:
    if value is None:
        return "-"
    mean, std = value
    return f"{mean:{fmt}}" + (f" ± {std:{fmt}}" if runs > 1 else "")


def format_markdown(rows: Sequence[dict[str, Any]], title: str) -> str:
    lines = [
        f"### {title}",
        "",
        "| method | classifier | runs | avg incremental | last | forgetting | HM old/new (last) "
        "| train + stage s | of which stage s | wall s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        n = r["runs"]
        lines.append(
            f"| {r['method']} | {r['classifier']} | {n} | {_cell(r['avg'], '.2f', n)} "
            f"| {_cell(r['last'], '.2f', n)} | {_cell(r['forgetting'], '.2f', n)} "
            f"| {_cell(r['hm_last'], '.2f', n)} | {_cell(r['train_seconds'], '.0f', n)} "
            f"| {_cell(r['stage_seconds'], '.1f', n)} | {_cell(r['wall_seconds'], '.0f', n)} |"
        )
    lines += [
        "",
        "Accuracies in percent, mean ± standard deviation over runs (class orders x seeds). "
        "classifier: the CNN head, or iCaRL's nearest mean of exemplars (nme). "
        "Train + stage s: the training loop plus any second stage (bias correction, balanced "
        "fine-tuning), summed over steps; wall s: the whole run, evaluation and exemplar "
        "selection included.",
    ]
    return "\n".join(lines) + "\n"


def table_title(results: Sequence[dict[str, Any]], protocol: Protocol, config: StepConfig) -> str:
    mem = config.memory
    memory = "no memory" if mem.size == 0 else f"memory {mem.size} ({mem.mode})"
    cap = results[0].get("max_train_per_class") if results else None
    devices = sorted({r["machine"]["device"] for r in results}) or ["-"]
    return (
        f"{protocol.name}, {memory}, {config.model.backbone}, {config.optim.epochs} epochs a step"
        f" (at least {config.optim.min_steps} optimizer steps)"
        + (f", at most {cap} training images per class" if cap else "")
        + f", {', '.join(devices)}"
    )


def plot_cost(rows: Sequence[dict[str, Any]], out: Path, title: str) -> None:
    """Average incremental accuracy against training cost, one point per method."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    for r in rows:
        (x, xs), (y, ys) = r["train_seconds"], r["avg"]
        bsce = r["method"].startswith("bsce")
        ax.errorbar(
            x,
            y,
            xerr=xs or None,
            yerr=ys or None,
            marker="*" if bsce else "o",
            markersize=11 if bsce else 7,
            capsize=3,
            linestyle="none",
        )
        label = r["method"] + (" (nme)" if r["classifier"] == "nme" else "")
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("training cost: loop + second stage, seconds summed over steps")
    ax.set_ylabel("average incremental accuracy (%)")
    ax.set_title(title, fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def write_table(
    out: Path,
    protocol: Protocol,
    config: StepConfig,
    max_train_per_class: int | None,
    device: torch.device,
) -> tuple[Path, Path] | None:
    results = collect(out, protocol, config, max_train_per_class, device)
    if not results:
        print(f"no results of this budget in {out}")
        return None
    rows = method_rows(results)
    title = table_title(results, protocol, config)
    name = stem(protocol.name, config)
    md, png = out / f"{name}_table.md", out / f"{name}.png"
    text = format_markdown(rows, title)
    paired, pairs = paired_runs(results)
    if pairs and len(paired) < len(results):
        text += "\n" + format_markdown(
            method_rows(paired), f"The same, on what every method ran: {', '.join(pairs)}"
        )
    md.write_text(text)
    plot_cost(rows, png, title)
    print(md.read_text())
    print(f"wrote {md} and {png}")
    return md, png


def build_parser() -> argparse.ArgumentParser:
    """learner.bench's options (protocol, orders, seeds, device, recipe), plus the methods."""
    p = bench.build_parser()
    p.prog = "python -m learner.compare"
    p.description = __doc__
    p.set_defaults(out=Path("results/compare"))
    p.add_argument(
        "--methods",
        default=None,
        help="comma-separated methods (default: every method that applies to the memory)",
    )
    p.add_argument(
        "--table-only", action="store_true", help="rebuild the table and plot; train nothing"
    )
    return p


def main(argv: list[str] | None = None) -> tuple[Path, Path] | None:
    args = build_parser().parse_args(argv)
    if args.method is not None:
        raise SystemExit("error: learner.compare takes --methods (a list), not --method")
    if getattr(args, "gate", "off") == "on":
        # Result file names and the table's budget do not carry the gate: the published
        # protocols, which the comparison replays, run without it.
        raise SystemExit("error: learner.compare runs without the promotion gate (--gate off)")
    if args.threads:
        torch.set_num_threads(args.threads)
    protocol, config, device = run_all(args)
    return write_table(args.out, protocol, config, args.max_train_per_class, device)


if __name__ == "__main__":
    main()

"""Offline benchmark runner: replay a published protocol as a scripted class stream.

    python -m learner.bench --protocol cifar10-b0-s5 --method bsce --memory 2000 --epochs 3

Writes one results JSON per run (config, class order, seeds, machine, accuracy matrix,
metrics) and prints a per-step table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from learner.cli import add_recipe_arguments, recipe_from_args
from learner.core.config import (
    AugmentConfig,
    ModelConfig,
    StepConfig,
)
from learner.core.evaluate import nme_predict, topk
from learner.core.gate import GateConfig
from learner.core.machine import describe_machine, resolve_device
from learner.core.model import IncrementalNet
from learner.data import Dataset, load_dataset
from learner.distributed import SINGLE, Dist, DistConfig, is_collective_error
from learner.exemplars import ExemplarMemory
from learner.gate import judge, split_holdout
from learner.metrics import IncrementalEvaluation, IncrementalMetrics, balance, harmonic_mean
from learner.protocols import PRESETS, Protocol, get_protocol, order_names, resolve_class_order
from learner.step import StepData, train_step

RESULT_FORMAT = "bsce-serve/result-1"


def step_config_for(protocol: Protocol, dataset: Dataset) -> StepConfig:
    """The protocol's defaults: backbone, memory, data geometry and normalisation."""
    model = ModelConfig(backbone=protocol.backbone, in_channels=dataset.train.images.shape[1])
    augment = AugmentConfig(crop=dataset.crop, pad=dataset.pad, mean=dataset.mean, std=dataset.std)
    return StepConfig(model=model, memory=protocol.memory, augment=augment)


def _eval_test(
    model: IncrementalNet,
    images: torch.Tensor,
    labels: torch.Tensor,
    class_means: torch.Tensor | None,
    config: StepConfig,
    device: torch.device,
    dist: Dist = SINGLE,
) -> dict[str, np.ndarray]:
    logits, feats = dist.infer(
        model, images, config.augment, device=device, batch_size=config.eval_batch_size
    )
    out = {
        "y_true": labels.numpy(),
        "cnn": logits.argmax(1).numpy(),
        "cnn_top5": topk(logits, 5).numpy(),
    }
    if class_means is not None:
        out["nme"] = nme_predict(feats, class_means).numpy()
    return out


def run_protocol(
    protocol: Protocol,
    config: StepConfig,
    dataset: Dataset,
    class_order: Sequence[int],
    *,
    seed: int,
    device: torch.device,
    max_train_per_class: int | None = None,
    progress: bool = True,
    gate: GateConfig | None = None,
    dist: Dist = SINGLE,
) -> dict[str, Any]:
    """Run every step of ``protocol``; return the result record (see ``RESULT_FORMAT``).

    Labels are remapped to learning order (the i-th class of ``class_order`` becomes i), so a
    model's head rows follow the order in which classes arrived, as in the server.

    With ``gate`` (enabled), each step holds out the images the learner worker would and is
    judged as the worker judges a job (learner/gate.py): a rejected step leaves the model,
    memory and random stream where they were, as a rejected version leaves the pointer.
    """
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    steps = protocol.step_classes(class_order)
    step_sizes = [len(s) for s in steps]
    remap = torch.full((len(dataset.train.class_names),), -1, dtype=torch.int64)
    remap[torch.as_tensor(list(class_order))] = torch.arange(len(class_order))
    train_y = remap[dataset.train.labels]
    test_y = remap[dataset.test.labels]

    model = IncrementalNet.create(config.model, generator)
    memory = ExemplarMemory()
    heldout_lineage: dict[int, np.ndarray] = {}
    cnn_eval, nme_eval = IncrementalEvaluation(), IncrementalEvaluation()
    reports: list[dict[str, Any]] = []
    seen = 0
    bar = tqdm(
        total=len(steps) * config.optim.epochs,
        desc=protocol.name,
        unit="epoch",
        disable=not progress,
        file=sys.stderr,
    )
    for t, classes in enumerate(steps):
        lo, hi = seen, seen + len(classes)
        idx = ((train_y >= lo) & (train_y < hi)).nonzero().squeeze(1)
        if max_train_per_class is not None:
            idx = limit_per_class(idx, train_y, max_train_per_class)
        data = StepData(dataset.train.images[idx].clone(), train_y[idx].clone())
        if gate is not None and gate.enabled:
            data, held = _hold_out(data, gate, seed)
            rng_before = generator.get_state()
            parent = model

        def on_epoch(epoch: int, epochs: int, loss: float, t: int = t) -> None:
            bar.set_postfix(step=f"{t + 1}/{len(steps)}", loss=f"{loss:.3f}")
            bar.update(1)

        result = train_step(
            model,
            data,
            memory,
            config,
            device=device,
            generator=generator,
            on_epoch=on_epoch,
            dist=dist,
        )
        verdict = None
        if gate is not None and gate.enabled:
            heldout = {**heldout_lineage}
            for c, x in held.items():
                heldout[c] = np.concatenate([heldout[c], x]) if c in heldout else x
            verdict = judge(
                result.model,
                parent,
                config.augment,
                [str(c) for c in range(result.model.num_classes)],
                heldout,
                list(range(parent.num_classes, result.model.num_classes)),
                gate,
                device,
            )
            # Every rank judges the same network; rank 0's verdict binds them all.
            verdict = dist.broadcast_object(verdict)
        if verdict is not None and verdict.verdict == "rejected":
            generator.set_state(rng_before)
        else:
            model, memory = result.model, result.memory
            if verdict is not None:
                heldout_lineage = heldout
        seen = hi
        test_idx = (test_y >= 0) & (test_y < seen)
        ev = _eval_test(
            model,
            dataset.test.images[test_idx],
            test_y[test_idx],
            result.class_means,
            config,
            device,
            dist,
        )
        cnn_eval.add_step(ev["y_true"], ev["cnn"], step_sizes[: t + 1], topk_pred=ev["cnn_top5"])
        if "nme" in ev:
            nme_eval.add_step(ev["y_true"], ev["nme"], step_sizes[: t + 1])
        report = result.report.model_dump()
        report["gate"] = None if verdict is None else verdict.model_dump(mode="json")
        report["accuracy"] = cnn_eval.result().accuracy_per_step[-1]
        report["memory"] = len(memory)
        reports.append(report)
        bar.set_postfix(step=f"{t + 1}/{len(steps)}", acc=f"{report['accuracy']:.1f}")
    bar.close()

    cnn = cnn_eval.result()
    train_images = sum(r["images_trained"] for r in reports)
    train_seconds = sum(r["train_seconds"] for r in reports)
    return {
        "format": RESULT_FORMAT,
        "protocol": protocol.name,
        "protocol_config": protocol.model_dump(mode="json"),
        "method": config.method,
        "memory": config.memory.model_dump(mode="json"),
        "config": config.model_dump(mode="json"),
        "class_order": [int(c) for c in class_order],
        "class_names": [dataset.train.class_names[c] for c in class_order],
        "seed": seed,
        "order_seed": protocol.class_order,
        "max_train_per_class": max_train_per_class,
        "data_source": dataset.source,
        "machine": describe_machine(device),
        "distributed": dist.describe(),
        **metric_fields(cnn),
        "nme": nme_eval.result().model_dump(mode="json")
        if nme_eval.num_steps == len(steps)
        else None,
        "steps": reports,
        "wall_seconds": time.perf_counter() - start,
        "train_images_per_second": train_images / train_seconds,
    }


def _hold_out(
    data: StepData, gate: GateConfig, seed: int
) -> tuple[StepData, dict[int, np.ndarray]]:
    """The step's images minus the held-out ones (the worker's split), and those by class."""
    keep, held = split_holdout(data.labels, gate, seed)
    images = {c: data.images[idx].numpy() for c, idx in held.items()}
    return StepData(data.images[keep].clone(), data.labels[keep].clone()), images


def metric_fields(cnn: IncrementalMetrics) -> dict[str, Any]:
    """The headline fields of a result file, from the CNN head's metrics."""
    return {
        "accuracy_matrix": cnn.accuracy_matrix,
        "metrics": {
            "avg_incremental_accuracy": cnn.avg_incremental_accuracy,
            "last_accuracy": cnn.last_accuracy,
            "forgetting": cnn.forgetting,
        },
        "cnn": cnn.model_dump(mode="json"),
    }


def lowest_balance(cnn: dict[str, Any]) -> float | None:
    """The lowest over steps of min(old, new) / max(old, new); None with one step."""
    pairs = zip(cnn["old_accuracy_per_step"], cnn["new_accuracy_per_step"], strict=True)
    values = [balance(o, n) for o, n in pairs if o is not None]
    return min(values) if values else None


def limit_per_class(idx: torch.Tensor, labels: torch.Tensor, limit: int) -> torch.Tensor:
    kept = [idx[labels[idx] == c][:limit] for c in labels[idx].unique()]
    return torch.cat(kept)


# An extra table column: header, width, and the cell of one step's report.
Column = tuple[str, int, Callable[[dict[str, Any]], str]]


def _f(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_table(
    result: dict[str, Any], columns: Sequence[Column] = (), header_note: str = ""
) -> str:
    """The per-step table of a result file; ``columns`` and ``header_note`` add to it (the
    HTTP replay adds the version and learning latency). Missing figures print as ``-``."""
    cnn, nme = result["cnn"], result["nme"]
    lines = [
        f"{result['protocol']}  method={result['method']}  memory={result['memory']['size']} ({result['memory']['mode']})"
        f"  epochs={result['config']['optim']['epochs']}  seed={result['seed']}  device={result['machine']['device']}"
        + (f"  {header_note}" if header_note else ""),
        f"{'step':>4} {'classes':>7} {'acc':>6} {'old':>6} {'new':>6} {'hm':>6} {'top5':>6} {'nme':>6} {'img/s':>7} {'train s':>8} {'select s':>8}"
        + "".join(f" {name:>{width}}" for name, width, _ in columns),
    ]
    for t, r in enumerate(result["steps"]):
        nme_acc = nme["accuracy_per_step"][t] if nme else None
        old_acc, new_acc = cnn["old_accuracy_per_step"][t], cnn["new_accuracy_per_step"][t]
        hm = None if old_acc is None else harmonic_mean(old_acc, new_acc)
        lines.append(
            f"{t + 1:>4} {r['seen_classes']:>7} {cnn['accuracy_per_step'][t]:>6.1f} "
            f"{_f(old_acc, '.1f'):>6} {new_acc:>6.1f} {_f(hm, '.1f'):>6} "
            f"{_f(cnn['top5_accuracy_per_step'][t], '.1f'):>6} {_f(nme_acc, '.1f'):>6} "
            f"{_f(r.get('train_images_per_second'), '.0f'):>7} {_f(r.get('train_seconds'), '.1f'):>8} "
            f"{_f(r.get('selection_seconds'), '.1f'):>8}"
            + "".join(f" {cell(r):>{width}}" for _, width, cell in columns)
        )
    m = result["metrics"]
    line = (
        f"avg incremental acc {m['avg_incremental_accuracy']:.2f}  last acc {m['last_accuracy']:.2f}  "
        f"forgetting {_f(m['forgetting'], '.2f')}  lowest old/new balance {_f(lowest_balance(cnn), '.2f')}"
    )
    if nme:
        line += (
            f"  |  NME avg {nme['avg_incremental_accuracy']:.2f} last {nme['last_accuracy']:.2f}"
        )
    lines.append(line)
    lines.append(
        f"wall {result['wall_seconds']:.0f} s, training "
        f"{_f(result.get('train_images_per_second'), '.0f')} images/s"
    )
    return "\n".join(lines)


def run_stem(result: dict[str, Any]) -> str:
    cfg = result["config"]
    return (
        f"{result['protocol']}_{result['method']}_mem{result['memory']['size']}"
        f"_{cfg['model']['backbone']}_e{cfg['optim']['epochs']}"
    )


def result_filename(result: dict[str, Any], default_order: str | None = None) -> str:
    """``<protocol>_<method>_mem<M>_<backbone>_e<E>[_order-<name>]_seed<S>_<device>.json``;
    the order is named when it is not the protocol's own."""
    order = result.get("order_name")
    tag = f"_order-{order}" if order and order != default_order else ""
    device = result["machine"]["device"].split(":")[0]
    return f"{run_stem(result)}{tag}_seed{result['seed']}_{device}.json"


def recorded_config(config: dict[str, Any], *, with_method: bool = True) -> dict[str, Any]:
    """A recorded config read through StepConfig, so that a file recorded before a field was
    added (with the field's default, which is what it ran with) still matches; without the
    method, what every run of one comparison table shares."""
    full = StepConfig.model_validate(config).model_dump(mode="json")
    return full if with_method else {k: v for k, v in full.items() if k != "method"}


def same_budget(
    result: dict[str, Any],
    protocol: Protocol,
    config: StepConfig,
    max_train_per_class: int | None,
    device: torch.device,
    *,
    with_method: bool = True,
) -> bool:
    """Whether a recorded result ran this protocol at this recipe, data cap and device type."""
    return (
        result.get("format") == RESULT_FORMAT
        and result.get("protocol") == protocol.name
        and result.get("max_train_per_class") == max_train_per_class
        and result["machine"]["device"].split(":")[0] == device.type
        and recorded_config(result["config"], with_method=with_method)
        == recorded_config(config.model_dump(mode="json"), with_method=with_method)
    )


def planned_path(
    out: Path,
    protocol: Protocol,
    config: StepConfig,
    order_name: str,
    seed: int,
    device: torch.device,
) -> Path:
    """Where a run's result file will be named, known before the run (for resuming)."""
    planned = {
        "protocol": protocol.name,
        "method": config.method,
        "memory": config.memory.model_dump(mode="json"),
        "config": config.model_dump(mode="json"),
        "order_name": order_name,
        "seed": seed,
        "machine": {"device": str(device)},
    }
    return out / result_filename(planned, default_order=protocol.class_order)


def summary_filename(result: dict[str, Any], orders: int, seeds: int) -> str:
    return f"{run_stem(result)}_orders{orders}_seeds{seeds}_summary.json"


def _mean_std(values: Sequence[float | None]) -> dict[str, float] | None:
    if any(v is None for v in values):
        return None
    arr = np.asarray(values, dtype=float)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if arr.size > 1 else 0.0}


def summarize(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean and standard deviation (over runs: orders x seeds) of the headline metrics and of
    old, new, harmonic mean and balance per step; the lowest balance of any run."""
    cnns = [r["cnn"] for r in results]
    steps = len(cnns[0]["accuracy_per_step"])
    per_step = {}
    for key, fn in (
        ("accuracy", lambda c, t: c["accuracy_per_step"][t]),
        ("old", lambda c, t: c["old_accuracy_per_step"][t]),
        ("new", lambda c, t: c["new_accuracy_per_step"][t]),
        ("harmonic_mean", lambda c, t: _hm(c, t)),
        ("balance", lambda c, t: _bal(c, t)),
    ):
        per_step[key] = [_mean_std([fn(c, t) for c in cnns]) for t in range(steps)]
    return {
        "format": RESULT_FORMAT + "/summary",
        "runs": [
            {"order_name": r.get("order_name"), "seed": r["seed"], "file": result_filename(r)}
            for r in results
        ],
        "protocol": results[0]["protocol"],
        "method": results[0]["method"],
        "memory": results[0]["memory"],
        "config": results[0]["config"],
        "machine": results[0]["machine"],
        "metrics": {
            k: _mean_std([r["metrics"][k] for r in results])
            for k in ("avg_incremental_accuracy", "last_accuracy", "forgetting")
        },
        "per_step": per_step,
        "lowest_balance": min((lowest_balance(c) for c in cnns), default=None, key=_none_last),
    }


def _hm(cnn: dict[str, Any], t: int) -> float | None:
    old, new = cnn["old_accuracy_per_step"][t], cnn["new_accuracy_per_step"][t]
    return None if old is None else harmonic_mean(old, new)


def _bal(cnn: dict[str, Any], t: int) -> float | None:
    old, new = cnn["old_accuracy_per_step"][t], cnn["new_accuracy_per_step"][t]
    return None if old is None else balance(old, new)


def _none_last(value: float | None) -> float:
    return float("inf") if value is None else value


def format_summary(summary: dict[str, Any]) -> str:
    def ms(v: dict[str, float] | None, fmt: str = ".1f") -> str:
        return "-" if v is None else f"{v['mean']:{fmt}}±{v['std']:{fmt}}"

    runs = summary["runs"]
    lines = [
        f"{summary['protocol']}  method={summary['method']}  memory={summary['memory']['size']}"
        f"  {len(runs)} runs (orders x seeds), mean±std",
        f"{'step':>4} {'acc':>11} {'old':>11} {'new':>11} {'hm':>11} {'balance':>11}",
    ]
    ps = summary["per_step"]
    for t in range(len(ps["accuracy"])):
        lines.append(
            f"{t + 1:>4} {ms(ps['accuracy'][t]):>11} {ms(ps['old'][t]):>11} {ms(ps['new'][t]):>11}"
            f" {ms(ps['harmonic_mean'][t]):>11} {ms(ps['balance'][t], '.2f'):>11}"
        )
    m = summary["metrics"]
    lines.append(
        f"avg incremental {ms(m['avg_incremental_accuracy'], '.2f')}  last {ms(m['last_accuracy'], '.2f')}"
        f"  forgetting {ms(m['forgetting'], '.2f')}  lowest balance of any run {_f(summary['lowest_balance'], '.2f')}"
    )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m learner.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--protocol", required=True, choices=sorted(PRESETS))
    p.add_argument(
        "--order",
        default=None,
        help="class order name, or a file (JSON list or one index per line)",
    )
    p.add_argument(
        "--seed", type=int, default=1993, help="training seed (the class order has its own)"
    )
    p.add_argument(
        "--orders",
        type=int,
        default=1,
        help="run over this many class orders (the protocol's first; see protocols.order_names)",
    )
    p.add_argument("--seeds", type=int, default=1, help="run seeds seed, seed+1, ... each")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--data-root", type=Path, default=None)
    p.add_argument(
        "--download",
        action="store_true",
        help="fetch CIFAR with torchvision when missing (needs internet)",
    )
    p.add_argument(
        "--max-train-per-class",
        type=int,
        default=None,
        help="cap training images per class (quick runs)",
    )
    p.add_argument("--out", type=Path, default=Path("results"))
    add_recipe_arguments(p)
    p.add_argument(
        "--gate",
        choices=["on", "off"],
        default="off",
        help="hold out and judge each step as the learner worker's promotion gate does (its "
        "default thresholds); off for the published protocols (default)",
    )
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep an (order, seed) whose result file in --out exists from the same recipe "
        "and budget, and run the rest (a series split over sessions)",
    )
    p.add_argument(
        "--dist-timeout",
        type=float,
        default=DistConfig().timeout_s,
        help="under torchrun: seconds a collective may wait before the run fails (a dead "
        "or hung rank)",
    )
    return p


def config_from_args(args: argparse.Namespace, protocol: Protocol, dataset: Dataset) -> StepConfig:
    return recipe_from_args(args, step_config_for(protocol, dataset))


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """One run, or with ``--orders K --seeds S`` every (order, seed) pair and a summary.

    Under ``torchrun --nproc-per-node N`` every rank runs the protocol data-parallel
    (learner/distributed.py); rank 0 alone prints and writes the files. A rank that dies
    makes the others exit non-zero within ``--dist-timeout`` instead of hanging."""
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    try:
        dist, device = Dist.from_env(device, DistConfig(timeout_s=args.dist_timeout))
        results = _run(args, device, dist)
    except Exception as exc:
        if is_collective_error(exc):  # only a group has collectives
            raise SystemExit(
                f"rank {os.environ.get('RANK')} of {os.environ.get('WORLD_SIZE')}: the process "
                f"group failed: a rank died, or hung past --dist-timeout {args.dist_timeout:g} s "
                f"({type(exc).__name__}: {exc})"
            ) from None
        raise
    dist.close()
    return results


def _run(args: argparse.Namespace, device: torch.device, dist: Dist) -> list[dict[str, Any]]:
    protocol = get_protocol(args.protocol)
    dataset = load_dataset(protocol.dataset, root=args.data_root, download=args.download)
    config = config_from_args(args, protocol, dataset)
    orders = order_names(args.order or protocol.class_order, args.orders)
    seeds = [args.seed + i for i in range(args.seeds)]
    if dist.is_main:
        args.out.mkdir(parents=True, exist_ok=True)
    results = []
    if args.resume and dist.world_size > 1:
        raise SystemExit("error: --resume runs in one process, not under torchrun")
    for order_name in orders:
        order = resolve_class_order(protocol, dataset.train.class_names, order_name)
        for seed in seeds:
            kept = _kept_result(args, protocol, config, order, order_name, seed, device)
            if kept is not None:
                results.append(kept)
                continue
            result = run_protocol(
                protocol,
                config,
                dataset,
                order,
                seed=seed,
                device=device,
                max_train_per_class=args.max_train_per_class,
                progress=not args.no_progress and dist.is_main,
                gate=GateConfig(enabled=args.gate == "on"),
                dist=dist,
            )
            result["order_name"] = order_name
            results.append(result)
            if not dist.is_main:
                continue
            path = args.out / result_filename(result, default_order=protocol.class_order)
            path.write_text(json.dumps(result, indent=1) + "\n")
            print(format_table(result))
            print(f"wrote {path}")
    if len(results) > 1 and dist.is_main:
        summary = summarize(results)
        path = args.out / summary_filename(results[0], len(orders), len(seeds))
        path.write_text(json.dumps(summary, indent=1) + "\n")
        print(format_summary(summary))
        print(f"wrote {path}")
    return results


def _kept_result(
    args: argparse.Namespace,
    protocol: Protocol,
    config: StepConfig,
    order: Sequence[int],
    order_name: str,
    seed: int,
    device: torch.device,
) -> dict[str, Any] | None:
    """With ``--resume``, the result file of this (order, seed) when one exists from the same
    recipe and budget: a series cut short by the end of a session goes on from its last
    finished run. A file of another recipe under the same name is an error, not a result."""
    if not args.resume:
        return None
    path = planned_path(args.out, protocol, config, order_name, seed, device)
    if not path.exists():
        return None
    result = json.loads(path.read_text())
    if not (
        same_budget(result, protocol, config, args.max_train_per_class, device)
        and result.get("class_order") == list(order)
        and result.get("seed") == seed
    ):
        raise SystemExit(
            f"error: {path} exists but was run with another recipe, budget or order; "
            "use another --out"
        )
    print(f"kept {path}")
    return result


if __name__ == "__main__":
    main()

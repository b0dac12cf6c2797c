"""Offline benchmark runner: replay a published protocol as a scripted class stream.

    python -m learner.bench --protocol cifar10-b0-s5 --method bsce --memory 2000 --epochs 3

Writes one results JSON per run (config, class order, seeds, machine, accuracy matrix,
metrics) and prints a per-step table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from learner.core.config import (
    AugmentConfig,
    DistillConfig,
    MemoryConfig,
    ModelConfig,
    OptimConfig,
    StepConfig,
)
from learner.core.evaluate import infer, nme_predict, topk
from learner.core.machine import describe_machine, resolve_device
from learner.core.model import IncrementalNet
from learner.data import Dataset, load_dataset
from learner.exemplars import ExemplarMemory
from learner.metrics import IncrementalEvaluation, IncrementalMetrics
from learner.protocols import PRESETS, Protocol, get_protocol, resolve_class_order
from learner.step import StepData, train_step

RESULT_FORMAT = "bsce-serve/result-1"


def step_config_for(protocol: Protocol, dataset: Dataset) -> StepConfig:
    """The protocol's defaults: backbone, memory, data geometry and normalisation."""
    model = ModelConfig(backbone=protocol.backbone, in_channels=dataset.train.images.shape[1])
    memory = MemoryConfig(
        mode=protocol.memory_mode,
        size=0 if protocol.memory_mode == "none" else protocol.memory_size,
    )
    augment = AugmentConfig(crop=dataset.crop, pad=dataset.pad, mean=dataset.mean, std=dataset.std)
    return StepConfig(model=model, memory=memory, augment=augment)


def _eval_test(
    model: IncrementalNet,
    images: torch.Tensor,
    labels: torch.Tensor,
    class_means: torch.Tensor | None,
    config: StepConfig,
    device: torch.device,
) -> dict[str, np.ndarray]:
    logits, feats = infer(
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
) -> dict[str, Any]:
    """Run every step of ``protocol``; return the result record (see ``RESULT_FORMAT``).

    Labels are remapped to learning order (the i-th class of ``class_order`` becomes i), so a
    model's head rows follow the order in which classes arrived, as in the server.
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

        def on_epoch(epoch: int, epochs: int, loss: float, t: int = t) -> None:
            bar.set_postfix(step=f"{t + 1}/{len(steps)}", loss=f"{loss:.3f}")
            bar.update(1)

        result = train_step(
            model, data, memory, config, device=device, generator=generator, on_epoch=on_epoch
        )
        model, memory = result.model, result.memory
        seen = hi
        test_idx = (test_y >= 0) & (test_y < seen)
        ev = _eval_test(
            model,
            dataset.test.images[test_idx],
            test_y[test_idx],
            result.class_means,
            config,
            device,
        )
        cnn_eval.add_step(ev["y_true"], ev["cnn"], step_sizes[: t + 1], topk_pred=ev["cnn_top5"])
        if "nme" in ev:
            nme_eval.add_step(ev["y_true"], ev["nme"], step_sizes[: t + 1])
        report = result.report.model_dump()
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
        **metric_fields(cnn),
        "nme": nme_eval.result().model_dump(mode="json")
        if nme_eval.num_steps == len(steps)
        else None,
        "steps": reports,
        "wall_seconds": time.perf_counter() - start,
        "train_images_per_second": train_images / train_seconds,
    }


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
        f"{'step':>4} {'classes':>7} {'acc':>6} {'old':>6} {'new':>6} {'top5':>6} {'nme':>6} {'img/s':>7} {'train s':>8} {'select s':>8}"
        + "".join(f" {name:>{width}}" for name, width, _ in columns),
    ]
    for t, r in enumerate(result["steps"]):
        nme_acc = nme["accuracy_per_step"][t] if nme else None
        lines.append(
            f"{t + 1:>4} {r['seen_classes']:>7} {cnn['accuracy_per_step'][t]:>6.1f} "
            f"{_f(cnn['old_accuracy_per_step'][t], '.1f'):>6} {cnn['new_accuracy_per_step'][t]:>6.1f} "
            f"{_f(cnn['top5_accuracy_per_step'][t], '.1f'):>6} {_f(nme_acc, '.1f'):>6} "
            f"{_f(r.get('train_images_per_second'), '.0f'):>7} {_f(r.get('train_seconds'), '.1f'):>8} "
            f"{_f(r.get('selection_seconds'), '.1f'):>8}"
            + "".join(f" {cell(r):>{width}}" for _, width, cell in columns)
        )
    m = result["metrics"]
    line = (
        f"avg incremental acc {m['avg_incremental_accuracy']:.2f}  last acc {m['last_accuracy']:.2f}  "
        f"forgetting {_f(m['forgetting'], '.2f')}"
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


def result_filename(result: dict[str, Any]) -> str:
    cfg = result["config"]
    return (
        f"{result['protocol']}_{result['method']}_mem{result['memory']['size']}"
        f"_{cfg['model']['backbone']}_e{cfg['optim']['epochs']}_seed{result['seed']}_{result['machine']['device'].split(':')[0]}.json"
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m learner.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--protocol", required=True, choices=sorted(PRESETS))
    p.add_argument("--method", choices=["bsce", "ce"], default="bsce")
    p.add_argument(
        "--memory",
        type=int,
        default=None,
        help="exemplar budget; 0 = no memory (default: the protocol's)",
    )
    p.add_argument("--memory-mode", choices=["fixed_total", "fixed_per_class"], default=None)
    p.add_argument("--selection", choices=["herding", "random"], default="herding")
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="epochs per step (default 2; papers use 70-160 on a GPU)",
    )
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--schedule", choices=["cosine", "multistep", "constant"], default=None)
    p.add_argument("--no-distill", action="store_true", help="turn logit distillation off")
    p.add_argument(
        "--distill-weight", default=None, help="a float in [0,1] or 'adaptive' (default)"
    )
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument(
        "--feature-distill", type=float, default=None, help="weight of LUCIR feature distillation"
    )
    p.add_argument("--backbone", choices=["resnet32", "resnet18", "resnet8"], default=None)
    p.add_argument(
        "--order",
        default=None,
        help="class order name, or a file (JSON list or one index per line)",
    )
    p.add_argument(
        "--seed", type=int, default=1993, help="training seed (the class order has its own)"
    )
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
    p.add_argument("--no-progress", action="store_true")
    return p


def config_from_args(args: argparse.Namespace, protocol: Protocol, dataset: Dataset) -> StepConfig:
    base = step_config_for(protocol, dataset)
    optim = {
        k: v
        for k, v in {
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "schedule": args.schedule,
        }.items()
        if v is not None
    }
    distill: dict[str, Any] = {"enabled": not args.no_distill}
    if args.distill_weight is not None:
        distill["weight"] = (
            args.distill_weight if args.distill_weight == "adaptive" else float(args.distill_weight)
        )
    if args.temperature is not None:
        distill["temperature"] = args.temperature
    if args.feature_distill is not None:
        distill["feature_weight"] = args.feature_distill
    memory = base.memory.model_dump()
    if args.memory is not None:
        memory["size"] = args.memory
        memory["mode"] = (
            "none"
            if args.memory == 0
            else (
                args.memory_mode
                or ("fixed_total" if base.memory.mode == "none" else base.memory.mode)
            )
        )
    elif args.memory_mode is not None:
        memory["mode"] = args.memory_mode
    memory["selection"] = args.selection
    model = base.model.model_dump()
    if args.backbone:
        model["backbone"] = args.backbone
    return StepConfig(
        method=args.method,
        model=ModelConfig(**model),
        optim=OptimConfig(**{**base.optim.model_dump(), **optim}),
        distill=DistillConfig(**{**base.distill.model_dump(), **distill}),
        memory=MemoryConfig(**memory),
        augment=base.augment,
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    protocol = get_protocol(args.protocol)
    dataset = load_dataset(protocol.dataset, root=args.data_root, download=args.download)
    order = resolve_class_order(protocol, dataset.train.class_names, args.order)
    config = config_from_args(args, protocol, dataset)
    result = run_protocol(
        protocol,
        config,
        dataset,
        order,
        seed=args.seed,
        device=device,
        max_train_per_class=args.max_train_per_class,
        progress=not args.no_progress,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / result_filename(result)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(format_table(result))
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()

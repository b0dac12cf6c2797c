"""The joint reference of a protocol's per-step balance: at each step, a network trained from
scratch on every class seen so far, all of their training images, at the incremental run's
recipe (same epochs and step minimum, BSCE over the joint counts, which are equal here, so CE),
and its accuracy on the old and the new classes of that step.

    .venv/bin/python scripts/joint_balance.py --protocol cifar10-b0-s5 \\
        --max-train-per-class 1000 --epochs 3 [--order seed1994-permutation] [recipe flags]

Why: the balance target (the lower of old and new accuracy at least half the higher) is about
forgetting and bias, but classes also differ in difficulty. Where even the joint model, which
neither forgets nor is biased toward the newest classes, has old/new balance below one half,
the incremental run cannot be expected to reach it at this budget. Prints a table and writes
``<out>/joint_<protocol>_<order>_pc<N>_e<E>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from learner import bench
from learner.core.machine import describe_machine, resolve_device
from learner.core.model import IncrementalNet
from learner.data import load_dataset
from learner.exemplars import ExemplarMemory
from learner.gate import accuracy_by_class
from learner.metrics import balance, harmonic_mean
from learner.protocols import get_protocol, resolve_class_order
from learner.step import StepData, train_step


def joint_steps(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    protocol = get_protocol(args.protocol)
    dataset = load_dataset(protocol.dataset, root=args.data_root)
    config = bench.config_from_args(args, protocol, dataset)
    config = config.model_copy(update={"memory": config.memory.model_copy(update={"size": 0})})
    order = resolve_class_order(
        protocol, dataset.train.class_names, args.order or protocol.class_order
    )
    remap = torch.full((len(dataset.train.class_names),), -1, dtype=torch.int64)
    remap[torch.as_tensor(list(order))] = torch.arange(len(order))
    train_y, test_y = remap[dataset.train.labels], remap[dataset.test.labels]
    rows, seen = [], 0
    for t, classes in enumerate(protocol.step_classes(order)):
        lo, hi = seen, seen + len(classes)
        seen = hi
        if t == 0:
            continue  # no old classes: nothing to balance
        idx = ((train_y >= 0) & (train_y < hi)).nonzero().squeeze(1)
        if args.max_train_per_class is not None:
            idx = bench.limit_per_class(idx, train_y, args.max_train_per_class)
        generator = torch.Generator().manual_seed(args.seed)
        model = IncrementalNet.create(config.model, generator)
        data = StepData(dataset.train.images[idx].clone(), train_y[idx].clone())
        t0 = time.perf_counter()
        result = train_step(
            model, data, ExemplarMemory(), config, device=device, generator=generator
        )
        seconds = time.perf_counter() - t0
        mask = (test_y >= 0) & (test_y < hi)
        x, y = dataset.test.images[mask], test_y[mask]
        by_class = {c: x[y == c].numpy() for c in range(hi)}
        acc = accuracy_by_class(result.model, config.augment, by_class, device)
        old = sum(acc[c] for c in range(lo)) / lo
        new = sum(acc[c] for c in range(lo, hi)) / (hi - lo)
        rows.append(
            {
                "step": t + 1,
                "classes": hi,
                "old": old,
                "new": new,
                "hm": harmonic_mean(old, new),
                "balance": balance(old, new),
                "per_class": [acc[c] for c in range(hi)],
                "optimizer_steps": result.report.optimizer_steps,
                "train_seconds": seconds,
            }
        )
        print(
            f"step {t + 1}: {hi} classes  old {old:5.1f}  new {new:5.1f}  "
            f"balance {rows[-1]['balance']:.2f}  ({seconds:.0f} s)",
            flush=True,
        )
    return {
        "protocol": protocol.name,
        "order_name": args.order or protocol.class_order,
        "class_names": [dataset.train.class_names[c] for c in order],
        "max_train_per_class": args.max_train_per_class,
        "seed": args.seed,
        "config": config.model_dump(mode="json"),
        "machine": describe_machine(device),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "steps": rows,
    }


def main(argv: list[str] | None = None) -> None:
    p = bench.build_parser()
    p.prog = "scripts/joint_balance.py"
    p.set_defaults(out=Path("results/joint_balance"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = joint_steps(args)
    args.out.mkdir(parents=True, exist_ok=True)
    name = (
        f"joint_{result['protocol']}_{result['order_name']}_pc{args.max_train_per_class}"
        f"_e{result['config']['optim']['epochs']}.json"
    )
    (args.out / name).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out / name}", file=sys.stderr)


if __name__ == "__main__":
    main()

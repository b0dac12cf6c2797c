"""The first step of a protocol alone (its first class order's first classes, trained from
scratch), at any budget or recipe flag of learner.bench; prints per-class test accuracy.

    .venv/bin/python scripts/step1_probe.py --protocol cifar10-b0-s5 --threads 2 \\
        --max-train-per-class 1000 --epochs 3 [--min-steps 600] [--lr 0.02] [--batch-size 32]

Why: on cifar10-b0-s5's own order the first step (deer against bird) decides the old/new
balance of the next; this measures how much training that pair needs without running the
whole protocol."""

import sys
import time

import torch

from learner import bench
from learner.core.machine import resolve_device
from learner.core.model import IncrementalNet
from learner.data import load_dataset
from learner.exemplars import ExemplarMemory
from learner.gate import accuracy_by_class
from learner.protocols import get_protocol, resolve_class_order
from learner.step import StepData, train_step

args = bench.build_parser().parse_args(sys.argv[1:])
torch.set_num_threads(args.threads or 2)
device = resolve_device(args.device)
protocol = get_protocol(args.protocol)
dataset = load_dataset(protocol.dataset, root=args.data_root)
config = bench.config_from_args(args, protocol, dataset)
order = resolve_class_order(protocol, dataset.train.class_names, args.order or protocol.class_order)
remap = torch.full((len(dataset.train.class_names),), -1, dtype=torch.int64)
remap[torch.as_tensor(list(order))] = torch.arange(len(order))
train_y, test_y = remap[dataset.train.labels], remap[dataset.test.labels]
hi = protocol.step_sizes()[0]
idx = ((train_y >= 0) & (train_y < hi)).nonzero().squeeze(1)
if args.max_train_per_class:
    idx = bench.limit_per_class(idx, train_y, args.max_train_per_class)
g = torch.Generator().manual_seed(args.seed)
model = IncrementalNet.create(config.model, g)
t0 = time.perf_counter()
r = train_step(
    model,
    StepData(dataset.train.images[idx].clone(), train_y[idx].clone()),
    ExemplarMemory(),
    config,
    device=device,
    generator=g,
)
mask = (test_y >= 0) & (test_y < hi)
x, y = dataset.test.images[mask], test_y[mask]
acc = accuracy_by_class(r.model, config.augment, {c: x[y == c].numpy() for c in range(hi)}, device)
print(
    sys.argv[1:],
    [dataset.train.class_names[c] for c in order[:hi]],
    {c: round(a, 1) for c, a in acc.items()},
    "steps",
    r.report.optimizer_steps,
    "loss",
    [round(v, 3) for v in r.report.loss_per_epoch][-3:],
    f"{time.perf_counter() - t0:.0f}s",
    flush=True,
)

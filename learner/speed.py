"""Training throughput of the learner's step against bare forward+backward of the same model.

    python -m learner.speed [--device auto|cpu|cuda] [--precision auto|fp32|bf16]
                            [--batches 20] [--repeats 3] [--json OUT]

Both sides see the same uint8 tensors and batch size, and the same arithmetic (the
``precision`` setting resolved on the device, as ``train_step`` resolves it: bf16 autocast on a
CUDA device that supports it under ``auto``, fp32 on CPU). The bare loop is the floor of what
any training loop must do: forward, loss (in fp32), backward, SGD step (plus the teacher's
forward when distilling), on inputs already normalised, in the fastest memory layout
(channels_last). The learner's figure is what ``train_step`` reports: indexing, augmentation
on the device, BSCE prior, distillation, learning-rate schedule included. Also times exemplar
selection of a CIFAR-10 step (10,000 images of 2 new classes).

``measure(...)`` returns the figures as a dict (scripts/gpu_check.py calls it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from learner.core.config import MemoryConfig, ModelConfig, OptimConfig, StepConfig
from learner.core.machine import (
    autocast,
    describe_machine,
    precision_name,
    resolve_device,
    resolve_precision,
)
from learner.core.model import IncrementalNet
from learner.exemplars import ExemplarMemory
from learner.step import StepData, train_step, update_memory

# What the learner / bare ratio should reach (issue 13: at least 0.9 on a GPU).
RATIO_TARGET = 0.9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_images_per_second(
    student: IncrementalNet,
    teacher: IncrementalNet | None,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: StepConfig,
    device: torch.device,
    channels_last: bool,
) -> float:
    """Images/s of forward (autocast as ``config.optim.precision`` resolves on ``device``),
    fp32 cross-entropy, backward and an SGD step, batch after batch."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    student = student.to(device).to(memory_format=fmt).train()
    if teacher is not None:
        teacher = teacher.to(device).to(memory_format=fmt).eval()
    o = config.optim
    amp = resolve_precision(o.precision, device)
    opt = torch.optim.SGD(
        student.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay
    )
    x_all = (images.float() / 255.0).to(device).contiguous(memory_format=fmt)
    y_all = labels.to(device)
    bs = o.batch_size
    batches = [(x_all[i : i + bs], y_all[i : i + bs]) for i in range(0, len(y_all), bs)]

    def one(x: torch.Tensor, y: torch.Tensor) -> None:
        with autocast(device, amp):
            if teacher is not None:
                with torch.no_grad():
                    teacher(x)
            out = student(x)
        loss = F.cross_entropy(out.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for x, y in batches[:3]:
        one(x, y)
    _sync(device)
    t = time.perf_counter()
    for x, y in batches:
        one(x, y)
    _sync(device)
    return len(y_all) / (time.perf_counter() - t)


def measure(
    device: str | torch.device = "auto",
    *,
    precision: str = "auto",
    backbone: str = "resnet32",
    batch_size: int = 128,
    batches: int = 20,
    repeats: int = 3,
    old_classes: int = 8,
    new_classes: int = 2,
    selection_images: int = 10_000,
    default_layout: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """The learner's ``train_step`` and the bare loop on the same ``batches`` batches of
    random CIFAR-shaped images, ``repeats`` times each (medians reported); then exemplar
    selection of ``selection_images`` images (0: skipped). Returns the figures."""
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    g = torch.Generator().manual_seed(seed)
    config = StepConfig(
        model=ModelConfig(backbone=backbone),
        optim=OptimConfig(epochs=1, min_steps=0, batch_size=batch_size, precision=precision),
        memory=MemoryConfig(mode="fixed_total", size=2000),
    )
    amp = resolve_precision(precision, dev)
    old, new = old_classes, new_classes
    teacher = IncrementalNet.create(config.model, g, old)
    n = batches * batch_size
    # Content does not change the arithmetic; random uint8 images of CIFAR's shape.
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    labels = torch.randint(old, old + new, (n,), generator=g)
    data = StepData(images, labels)
    student = IncrementalNet.create(config.model, g, old + new)
    no_memory = ExemplarMemory()
    # Distillation needs a previous version; exemplars would add images to the epoch, so the
    # step gets none and both loops see exactly the same n images.
    step_config = config.model_copy(update={"memory": MemoryConfig(mode="none", size=0)})

    # Kernel selection and the allocator's first blocks: paid once, outside the timings (the
    # bare loop warms up on its first batches too).
    warm = StepData(images[: 2 * batch_size], labels[: 2 * batch_size])
    train_step(teacher, warm, no_memory, step_config, device=dev, generator=g)
    learner, bare_cl, bare_default = [], [], []
    for _ in range(repeats):
        r = train_step(teacher, data, no_memory, step_config, device=dev, generator=g)
        learner.append(r.report.train_images_per_second)
        bare_cl.append(bare_images_per_second(student, teacher, images, labels, config, dev, True))
        if default_layout:
            bare_default.append(
                bare_images_per_second(student, teacher, images, labels, config, dev, False)
            )
    l_med, b_med = statistics.median(learner), statistics.median(bare_cl)
    out: dict[str, Any] = {
        "device": str(dev),
        "precision_setting": precision,
        "precision": precision_name(amp),
        "backbone": backbone,
        "batch_size": batch_size,
        "images_per_measurement": n,
        "old_classes": old,
        "new_classes": new,
        "distillation": True,
        "threads": torch.get_num_threads(),
        "learner_images_per_second": l_med,
        "learner_runs": learner,
        "bare_images_per_second": b_med,
        "bare_runs": bare_cl,
        "bare_default_layout_images_per_second": statistics.median(bare_default)
        if bare_default
        else None,
        "ratio": l_med / b_med,
        "ratio_target": RATIO_TARGET,
    }

    if selection_images > 0:
        # Exemplar selection for a CIFAR-10 step: 2 new classes of 5,000 images each.
        m = selection_images
        sel_images = torch.randint(0, 256, (m, 3, 32, 32), generator=g, dtype=torch.uint8)
        sel_labels = torch.arange(m) % new + old
        model = _fresh(config, g, old + new, dev)
        memory = ExemplarMemory({c: images[:200].clone() for c in range(old)})
        _, _, t = update_memory(
            model, StepData(sel_images, sel_labels), memory, old + new, config, dev, g
        )
        out["selection"] = {"images": m, "quota": 2000 // (old + new), **t}
    out["machine"] = describe_machine(dev)
    return out


def report_lines(f: dict[str, Any]) -> list[str]:
    """The figures of ``measure`` as the lines ``python -m learner.speed`` prints."""
    lines = [
        f"device: {f['device']}  precision: {f['precision']} (setting {f['precision_setting']})  "
        f"threads: {f['threads']}  {f['backbone']}, batch {f['batch_size']}, "
        f"{f['old_classes']} old + {f['new_classes']} new classes, distillation on",
        f"learner train_step          {f['learner_images_per_second']:8.1f} images/s  "
        f"(runs: {', '.join(f'{v:.1f}' for v in f['learner_runs'])})",
        f"bare fwd+bwd, channels_last {f['bare_images_per_second']:8.1f} images/s  "
        f"(runs: {', '.join(f'{v:.1f}' for v in f['bare_runs'])})",
    ]
    if f["bare_default_layout_images_per_second"] is not None:
        lines.append(
            f"bare fwd+bwd, default layout{f['bare_default_layout_images_per_second']:8.1f} images/s"
        )
    lines.append(
        f"ratio learner / bare(channels_last): {f['ratio']:.3f}  (target >= {f['ratio_target']})"
    )
    s = f.get("selection")
    if s is not None:
        lines.append(
            f"exemplar selection, {s['images']} images of {f['new_classes']} classes, quota {s['quota']}: "
            f"{s['selection_seconds']:.2f} s (features {s['feature_seconds']:.2f} s, herding {s['herding_seconds']:.3f} s); "
            f"class means for NME {s['class_mean_seconds']:.2f} s  (target: selection < 2 s)"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    p.add_argument("--backbone", default="resnet32", choices=("resnet32", "resnet18", "resnet8"))
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--batches", type=int, default=20, help="batches per measurement")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--old-classes", type=int, default=8)
    p.add_argument("--new-classes", type=int, default=2)
    p.add_argument("--selection-images", type=int, default=10_000, help="0: skip selection")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)
    figures = measure(
        args.device,
        precision=args.precision,
        backbone=args.backbone,
        batch_size=args.batch_size,
        batches=args.batches,
        repeats=args.repeats,
        old_classes=args.old_classes,
        new_classes=args.new_classes,
        selection_images=args.selection_images,
        seed=args.seed,
    )
    print("\n".join(report_lines(figures)))
    print(json.dumps({"machine": figures["machine"]}))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=1) + "\n")


def _fresh(
    config: StepConfig, g: torch.Generator, classes: int, device: torch.device
) -> IncrementalNet:
    model = IncrementalNet.create(config.model, g, classes).to(device)
    return model.to(memory_format=torch.channels_last).eval()


if __name__ == "__main__":
    main()

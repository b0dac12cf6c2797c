"""Training throughput of the learner's step against bare forward+backward of the same model.

    python -m learner.speed [--device cpu|cuda] [--batches 20] [--repeats 3]

Both sides see the same uint8 tensors and batch size. The bare loop is the floor of what any
training loop must do: forward, loss, backward, SGD step (plus the teacher's forward when
distilling), on inputs already normalised, in the fastest memory layout (channels_last).
The learner's figure is what ``train_step`` reports: indexing, augmentation on the device,
BSCE prior, distillation, learning-rate schedule included. Also times exemplar selection of a
CIFAR-10 step (10,000 images of 2 new classes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from learner.core.config import MemoryConfig, OptimConfig, StepConfig
from learner.core.machine import describe_machine, resolve_device
from learner.core.model import IncrementalNet
from learner.exemplars import ExemplarMemory
from learner.step import StepData, train_step, update_memory


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
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    student = student.to(device).to(memory_format=fmt).train()
    if teacher is not None:
        teacher = teacher.to(device).to(memory_format=fmt).eval()
    o = config.optim
    opt = torch.optim.SGD(
        student.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay
    )
    x_all = (images.float() / 255.0).to(device).contiguous(memory_format=fmt)
    y_all = labels.to(device)
    bs = o.batch_size
    batches = [(x_all[i : i + bs], y_all[i : i + bs]) for i in range(0, len(y_all), bs)]

    def one(x: torch.Tensor, y: torch.Tensor) -> None:
        if teacher is not None:
            with torch.no_grad():
                teacher(x)
        loss = F.cross_entropy(student(x), y)
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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--batches", type=int, default=20, help="batches of 128 per measurement")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--old-classes", type=int, default=8)
    p.add_argument("--new-classes", type=int, default=2)
    p.add_argument("--selection-images", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    g = torch.Generator().manual_seed(args.seed)

    config = StepConfig(
        optim=OptimConfig(epochs=1, min_steps=0), memory=MemoryConfig(mode="fixed_total", size=2000)
    )
    old, new = args.old_classes, args.new_classes
    teacher = IncrementalNet.create(config.model, g, old)
    n = args.batches * config.optim.batch_size
    # Content does not change the arithmetic; random uint8 images of CIFAR's shape.
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    labels = torch.randint(old, old + new, (n,), generator=g)
    data = StepData(images, labels)
    student = IncrementalNet.create(config.model, g, old + new)
    no_memory = ExemplarMemory()
    # Distillation needs a previous version; exemplars would add images to the epoch, so the
    # step gets none and both loops see exactly the same n images.
    step_config = config.model_copy(update={"memory": MemoryConfig(mode="none", size=0)})

    learner, bare_cl, bare_default = [], [], []
    for _ in range(args.repeats):
        r = train_step(teacher, data, no_memory, step_config, device=device, generator=g)
        learner.append(r.report.train_images_per_second)
        bare_cl.append(
            bare_images_per_second(student, teacher, images, labels, config, device, True)
        )
        bare_default.append(
            bare_images_per_second(student, teacher, images, labels, config, device, False)
        )

    l_med, b_med = statistics.median(learner), statistics.median(bare_cl)
    print(
        f"device: {device}  threads: {torch.get_num_threads()}  ResNet-32, batch 128, {old} old + {new} new classes, distillation on"
    )
    print(
        f"learner train_step          {l_med:8.1f} images/s  (runs: {', '.join(f'{v:.1f}' for v in learner)})"
    )
    print(
        f"bare fwd+bwd, channels_last {b_med:8.1f} images/s  (runs: {', '.join(f'{v:.1f}' for v in bare_cl)})"
    )
    print(f"bare fwd+bwd, default layout{statistics.median(bare_default):8.1f} images/s")
    print(f"ratio learner / bare(channels_last): {l_med / b_med:.3f}  (target >= 0.85)")

    # Exemplar selection for a CIFAR-10 step: 2 new classes of 5,000 images each.
    m = args.selection_images
    sel_images = torch.randint(0, 256, (m, 3, 32, 32), generator=g, dtype=torch.uint8)
    sel_labels = torch.arange(m) % new + old
    model = _fresh(config, g, old + new, device)
    memory = ExemplarMemory({c: images[:200].clone() for c in range(old)})
    timings = []
    for seen_memory in (memory,):
        _, _, t = update_memory(
            model, StepData(sel_images, sel_labels), seen_memory, old + new, config, device, g
        )
        timings.append(t)
    t = timings[-1]
    print(
        f"exemplar selection, {m} images of {new} classes, quota {2000 // (old + new)}: "
        f"{t['selection_seconds']:.2f} s (features {t['feature_seconds']:.2f} s, herding {t['herding_seconds']:.3f} s); "
        f"class means for NME {t['class_mean_seconds']:.2f} s  (target: selection < 2 s)"
    )
    print(json.dumps({"machine": describe_machine(device)}))


def _fresh(
    config: StepConfig, g: torch.Generator, classes: int, device: torch.device
) -> IncrementalNet:
    model = IncrementalNet.create(config.model, g, classes).to(device)
    return model.to(memory_format=torch.channels_last).eval()


if __name__ == "__main__":
    main()

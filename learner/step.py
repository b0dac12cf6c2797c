"""One incremental step: train on new data plus exemplars, then select the new memory.

The loop is shared by every method; what differs (the model's head, a held-out split, the
loss, the distillation terms, a stage after training) comes from the step's method
(learner.methods, whose base module lists the hooks in order). BSCE has no stage after
training; the bias-correction methods it is compared with do.
The function is pure in its inputs: the caller's model and memory are left untouched.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel

from learner.core.augment import Normalizer, random_crop_flip
from learner.core.config import OptimConfig, StepConfig
from learner.core.evaluate import class_means_from_features
from learner.core.machine import autocast, resolve_precision
from learner.core.model import IncrementalNet
from learner.distributed import SINGLE, Dist
from learner.exemplars import ExemplarMemory, herding, random_selection
from learner.methods import Method, build_method
from learner.methods.base import HeldOut, Stage

# Below this size a step's training set is copied to an accelerator once, so that batches
# are gathered there instead of crossing the bus every iteration.
_ON_DEVICE_BYTES = 2 << 30


@dataclass(frozen=True)
class TimeBudget:
    """A bound on the seconds of a step's training loop: the worker's latency target, not part
    of the recipe (a benchmark never sets one, so its steps are the same on every machine).

    It trades only what ``optim.min_steps`` added: after each epoch the loop projects the
    epochs left at its pace so far and keeps those that end within the bound, never fewer than
    ``optim.epochs`` (so a large post, or a protocol replayed through the server, trains its
    epochs whatever the bound) nor than ``min_share`` of the budget asked for, nor more than
    that budget; the learning-rate schedule spans the budget as it stands. Why: the project's
    CPUs differ about 2.5x in training speed (README, "Learning latency"), and on the slower
    ones the 150-step minimum of a small post alone took 87-109 s; the bound keeps a post
    served within a minute there, at the price of fewer optimizer steps, which the step's
    report records beside the steps it asked for. Why the share: on a machine whose cores
    were busy the bound cut a one-class post to its 4 epochs (48 of 156 steps) and the class
    was not learned (the gate rejected it, 10% on its held-out images); with 66-72 steps
    (about 45%) every class of the first-hour posts was. ``clock`` is injectable so that a
    test can fix the pace.
    """

    seconds: float
    min_share: float
    clock: Callable[[], float] = time.perf_counter

    def epochs_within(self, planned: Budget, floor: int, epoch_seconds: Sequence[float]) -> int:
        """The epochs to train in all (at least ``floor``, ``min_share`` of the planned epochs
        and those done, at most ``planned.epochs``), after epochs that took ``epoch_seconds``
        each.

        The pace is that of the epochs after the first: the first pays one-time costs (memory,
        the kernels' first runs; 4.3 s against 3.1 s in a first-hour post) that would cut the
        budget for nothing. Each epoch decides afresh, so a slow spell that passes (a burst of
        predictions on the same cores) costs only the time it took.
        """
        done, elapsed = len(epoch_seconds), sum(epoch_seconds)
        paced = epoch_seconds[1:] or epoch_seconds
        pace = sum(paced) / len(paced)
        fit = done + max(0, math.floor((self.seconds - elapsed) / pace))
        kept = min(planned.epochs, max(floor, math.ceil(self.min_share * planned.epochs)))
        return max(done, kept, min(planned.epochs, fit))


@dataclass(frozen=True)
class StepData:
    """The new data of a step: uint8 images (N, C, H, W) and their class indices (label-map
    order). Classes already known to the model may appear: they are trained as old classes with
    new data."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                f"step images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.shape != self.images.shape[:1]:
            raise ValueError("step labels must be int64 with one label per image")
        if self.images.shape[0] == 0:
            raise ValueError("a step needs at least one image")
        if int(self.labels.min()) < 0:
            raise ValueError("class indices must be non-negative")


class StepReport(BaseModel):
    step_classes: list[int]
    old_classes: int
    seen_classes: int
    counts: list[int]
    distill_weight: float
    epochs: int
    # The budget as asked (epochs, min_steps) and as it resolved for this step's data.
    min_steps: int = 0
    batches_per_epoch: int = 0
    optimizer_steps: int = 0
    # A time bound on the training loop (the worker's; None: none) and the optimizer steps the
    # budget asked for before the bound cut it (equal to optimizer_steps when it did not).
    time_budget_seconds: float | None = None
    planned_steps: int = 0
    images_trained: int
    loss_per_epoch: list[float]
    # The training loop; a second stage after it (BiC, WA, EEIL) is timed apart, so that a
    # method's training cost is train_seconds + stage_seconds.
    train_seconds: float
    train_images_per_second: float
    stage_seconds: float = 0.0
    stage: dict[str, Any] | None = None  # what the stage did (None: the method has none)
    feature_seconds: float
    herding_seconds: float
    class_mean_seconds: float
    selection_seconds: float
    wall_seconds: float


@dataclass(frozen=True)
class StepResult:
    model: IncrementalNet
    memory: ExemplarMemory
    counts: torch.Tensor  # int64 (seen,): samples per class trained on this step
    class_means: torch.Tensor | None  # (seen, d), NaN rows for classes without exemplars
    report: StepReport


def _lr_factor(config: StepConfig, progress: float) -> float:
    o = config.optim
    if o.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if o.schedule == "multistep":
        return 0.1 ** sum(progress >= m for m in o.milestones)
    return 1.0


def _prepare(model: IncrementalNet, device: torch.device) -> IncrementalNet:
    model = model.to(device)
    if model.config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def train_step(
    model: IncrementalNet,
    data: StepData,
    memory: ExemplarMemory,
    config: StepConfig,
    *,
    device: torch.device,
    generator: torch.Generator,
    on_epoch: Callable[[int, int, float], None] | None = None,
    dist: Dist = SINGLE,
    time_budget: TimeBudget | None = None,
) -> StepResult:
    """Train ``model`` on ``data`` plus ``memory``; return the next version and its memory.

    ``on_epoch(epoch, epochs, mean_loss)`` reports progress (progress bars, job status).
    ``time_budget`` bounds the training loop's seconds (see `TimeBudget`).
    ``dist``: under torchrun every rank calls this with the same arguments; each trains on
    its slice of every batch and all return the same result (learner/distributed.py).
    """
    start = time.perf_counter()
    old = model.num_classes
    seen = max(old, int(data.labels.max()) + 1)
    step_classes = sorted(int(c) for c in data.labels.unique())
    method = build_method(config)

    student = copy.deepcopy(model).cpu()
    student.grow(seen, generator)
    student = _prepare(student, device)
    method.prepare_model(student, data.images, data.labels, old, device)
    teacher = None
    if method.distills and config.distill.enabled and old > 0:
        teacher = _prepare(copy.deepcopy(model), device).eval().requires_grad_(False)

    images, labels, held_out = _training_set(method, data, memory, old, generator)
    counts = torch.bincount(labels, minlength=seen)
    if device.type != "cpu" and images.numel() < _ON_DEVICE_BYTES:
        images, labels = images.to(device), labels.to(device)

    method.before_training(counts, device)
    lam = method.distill_weight(old, seen) if teacher is not None else 0.0
    planned = resolve_budget(config.optim, int(labels.shape[0]))

    def train(x: torch.Tensor, y: torch.Tensor, optim: OptimConfig) -> list[float]:
        b = resolve_budget(optim, int(y.shape[0]))
        c = config.model_copy(update={"optim": optim})
        return _train(student, teacher, x, y, method, lam, b, c, device, generator, None, dist)[0]

    losses, budget = _train(
        student,
        teacher,
        images,
        labels,
        method,
        lam,
        planned,
        config,
        device,
        generator,
        on_epoch,
        dist,
        time_budget,
    )
    train_seconds = time.perf_counter() - start
    images_trained = budget.epochs * int(labels.shape[0])

    t = time.perf_counter()
    stage = method.after_training(
        Stage(
            student=student,
            teacher=teacher,
            images=images,
            labels=labels,
            held_out=held_out,
            old_classes=old,
            config=config,
            device=device,
            generator=generator,
            train=train,
        )
    )
    stage_seconds = 0.0 if stage is None else time.perf_counter() - t

    new_memory, class_means, timings = update_memory(
        student, data, memory, seen, config, device, generator, dist
    )
    student.eval()
    report = StepReport(
        step_classes=step_classes,
        old_classes=old,
        seen_classes=seen,
        counts=counts.tolist(),
        distill_weight=lam,
        epochs=budget.epochs,
        min_steps=config.optim.min_steps,
        batches_per_epoch=budget.batches,
        optimizer_steps=budget.steps,
        time_budget_seconds=None if time_budget is None else time_budget.seconds,
        planned_steps=planned.steps,
        images_trained=images_trained,
        loss_per_epoch=losses,
        train_seconds=train_seconds,
        train_images_per_second=images_trained / train_seconds,
        stage_seconds=stage_seconds,
        stage=stage,
        wall_seconds=time.perf_counter() - start,
        **timings,
    )
    return StepResult(student, new_memory, counts, class_means, report)


def _training_set(
    method: Method,
    data: StepData,
    memory: ExemplarMemory,
    old: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, HeldOut | None]:
    """The step's new data plus the exemplars, less what the method holds out."""
    replay = memory.training_set()
    if method.memory == "required" and old > 0 and replay is None:
        raise ValueError(
            f"method {method.name!r} needs exemplars of the old classes, and this step has "
            "none (memory size 0?): use a memory, or a method that works without one"
        )
    images, labels = data.images, data.labels
    if replay is not None:
        images, labels = torch.cat([images, replay[0]]), torch.cat([labels, replay[1]])
    return method.split_training_set(images, labels, old, generator)


@dataclass(frozen=True)
class Budget:
    """A step's training budget resolved against its data: whole epochs of ``batches``."""

    epochs: int
    batches: int

    @property
    def steps(self) -> int:
        return self.epochs * self.batches


def resolve_budget(optim: OptimConfig, samples: int) -> Budget:
    """``optim.epochs``, or more whole epochs where that gives fewer than ``optim.min_steps``
    optimizer steps (a small post); the learning-rate schedule spans the resolved budget."""
    batches = math.ceil(samples / optim.batch_size)
    epochs = max(optim.epochs, math.ceil(optim.min_steps / batches))
    return Budget(epochs=epochs, batches=batches)


def _train(
    student: IncrementalNet,
    teacher: IncrementalNet | None,
    images: torch.Tensor,
    labels: torch.Tensor,
    method: Method,
    lam: float,
    budget: Budget,
    config: StepConfig,
    device: torch.device,
    generator: torch.Generator,
    on_epoch: Callable[[int, int, float], None] | None,
    dist: Dist = SINGLE,
    time_budget: TimeBudget | None = None,
) -> tuple[list[float], Budget]:
    """The training loop; returns each epoch's mean loss and the budget it trained (fewer
    epochs than ``budget`` where ``time_budget`` cut it)."""
    o = config.optim
    student.train()
    # Under a group: DDP over the ranks, each on its slice of the same global batch.
    net = dist.wrap(student, device)
    optimizer = torch.optim.SGD(
        student.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay
    )
    n = int(labels.shape[0])
    batches = budget.batches
    # The augmentation draws on the training device; its seed comes from the step's generator
    # so one seed still fixes the whole run.
    aug_gen = torch.Generator(device=device)
    aug_gen.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
    normalize = Normalizer(config.augment, device, student.config.channels_last)
    # Mixed precision: the forward passes under autocast, the loss in fp32 (None: all fp32).
    amp = resolve_precision(o.precision, device)
    losses: list[float] = []
    planned = budget
    epoch_seconds: list[float] = []
    epoch = 0
    while epoch < budget.epochs:
        started = time_budget.clock() if time_budget is not None else 0.0
        total = budget.steps
        order = torch.randperm(n, generator=generator).to(labels.device)
        running = torch.zeros((), device=device)
        for b in range(batches):
            for group in optimizer.param_groups:
                group["lr"] = o.lr * _lr_factor(config, (epoch * batches + b) / total)
            idx = order[b * o.batch_size : (b + 1) * o.batch_size]
            x = images[idx].to(device, non_blocking=True)
            y = labels[idx].to(device, non_blocking=True)
            x = normalize(random_crop_flip(x, config.augment, aug_gen))
            x, y, part = dist.shard_batch(x, y)
            with autocast(device, amp):
                logits, feats = net.forward_with_features(x)
                target = None
                if teacher is not None:
                    with torch.no_grad():
                        target = teacher.forward_with_features(x)
            if amp is not None:
                logits, feats = logits.float(), feats.float()
                if target is not None:
                    target = (target[0].float(), target[1].float())
            loss = method.loss(logits, feats, y, target, lam)
            optimizer.zero_grad(set_to_none=True)
            part.scale(loss).backward()
            optimizer.step()
            running += part.share(loss.detach())
        losses.append(float(dist.sum(running)) / batches)
        epoch += 1
        if time_budget is not None:
            epoch_seconds.append(time_budget.clock() - started)
            fit = time_budget.epochs_within(planned, o.epochs, epoch_seconds)
            # Rank 0's clock decides for every rank, so that all train the same epochs.
            budget = Budget(epochs=dist.broadcast_object(fit), batches=batches)
        dist.report(on_epoch, epoch, budget.epochs, losses[-1])
    dist.sync_module(student)
    return losses, budget


def update_memory(
    student: IncrementalNet,
    data: StepData,
    memory: ExemplarMemory,
    seen: int,
    config: StepConfig,
    device: torch.device,
    generator: torch.Generator,
    dist: Dist = SINGLE,
) -> tuple[ExemplarMemory, torch.Tensor | None, dict[str, float]]:
    """The next memory and the class means; under a group each rank computes the features
    of a shard of the candidates and all get all of them, so every rank selects alike."""
    quota = config.memory.quota(seen)
    timings = {"feature_seconds": 0.0, "herding_seconds": 0.0, "class_mean_seconds": 0.0}
    if quota == 0:
        timings["selection_seconds"] = 0.0
        return ExemplarMemory(), None, timings

    step_classes = sorted(int(c) for c in data.labels.unique())
    # Candidates of a class posted again are its new images plus its current exemplars.
    cand_images, cand_labels = [data.images], [data.labels]
    for c in step_classes:
        if c in memory.images:
            cand_images.append(memory.images[c])
            cand_labels.append(torch.full((memory.images[c].shape[0],), c, dtype=torch.int64))
    cand_x, cand_y = torch.cat(cand_images), torch.cat(cand_labels)

    t = time.perf_counter()
    feats = None
    if config.memory.selection == "herding":
        _, feats = dist.infer(
            student, cand_x, config.augment, device=device, batch_size=config.eval_batch_size
        )
    timings["feature_seconds"] = time.perf_counter() - t

    t = time.perf_counter()
    selected: dict[int, torch.Tensor] = {}
    selected_feats: dict[int, torch.Tensor] = {}
    for c in step_classes:
        members = (cand_y == c).nonzero().squeeze(1)
        if feats is not None:
            pick = members[herding(feats[members], quota)]
            selected_feats[c] = feats[pick]
        else:
            pick = members[random_selection(members.shape[0], quota, generator)]
        selected[c] = cand_x[pick].clone()
    timings["herding_seconds"] = time.perf_counter() - t

    kept = {c: x for c, x in memory.shrink(quota).images.items() if c not in selected}
    new_memory = ExemplarMemory({**kept, **selected})

    t = time.perf_counter()
    means = torch.full((seen, student.feature_dim), float("nan"))
    if kept:
        old_x = torch.cat(list(kept.values()))
        _, old_feats = dist.infer(
            student, old_x, config.augment, device=device, batch_size=config.eval_batch_size
        )
        offset = 0
        for c, x in kept.items():
            means[c] = class_means_from_features(old_feats[offset : offset + x.shape[0]])
            offset += x.shape[0]
    for c, x in selected.items():
        f = selected_feats.get(c)
        if f is None:
            _, f = dist.infer(
                student, x, config.augment, device=device, batch_size=config.eval_batch_size
            )
        means[c] = class_means_from_features(f)
    timings["class_mean_seconds"] = time.perf_counter() - t
    timings["selection_seconds"] = timings["feature_seconds"] + timings["herding_seconds"]
    return new_memory, means, timings

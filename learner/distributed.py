"""Data-parallel training over torch.distributed, and its single-process no-op.

    torchrun --nproc-per-node 2 -m learner.bench --protocol cifar10-b0-s5 --device cpu
    torchrun --nproc-per-node 2 -m learner.worker

``Dist`` is made once per process from torchrun's variables (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) and passed explicitly to what needs it (the
training step, the runner, the worker); without them it is the single-process ``Dist()``,
whose every helper is the identity, so a one-process run computes exactly what it computed
before (``tests/test_step.py`` checks weights and figures bit for bit).

The choices, and why:

- Backend: gloo on CPU, NCCL on CUDA (one GPU a process, ``cuda:LOCAL_RANK``).
- Sharding: every rank holds the whole step's data and the same random stream, so each
  draws the same epoch permutation and the same augmentation of the *global* batch (the
  single-process batch, bit for bit) and trains on its contiguous slice of it
  (``shard_bounds``: disjoint, covering, deterministic). Each rank's loss is weighted by its
  share of the batch so that DDP's gradient average is the gradient of the global batch's
  mean loss, also for an uneven last batch (up to float reduction order).
- BatchNorm: statistics per rank (no SyncBatchNorm: one all-reduce per BN layer per forward
  costs more than it changes at a per-rank batch of 64). The running statistics are averaged
  over ranks after the loop (the EMA of the global batch means; the variances lose only the
  spread between ranks' means), and everything else is broadcast from rank 0, so every rank
  ends the loop with the same network.
- Exemplar selection and evaluation: features and logits are computed on a shard of the
  images per rank and gathered, so every rank holds all of them and runs the same herding
  and metrics on them (no rank waits for another to finish the whole set alone).
- Failure: the process group has a timeout (``DistConfig.timeout_s``), so a rank that dies
  or hangs makes the others' next collective raise instead of blocking forever; the runner
  and the worker turn that into a clean failure (``is_collective_error``).
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as tdist
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from learner.core.config import AugmentConfig
from learner.core.evaluate import infer


class DistConfig(BaseModel):
    """Settings of a multi-process run (ignored in a single process)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # A collective that waits longer than this fails (a dead or hung rank). It must exceed
    # the longest time one rank works alone between two collectives: an epoch's end, or in
    # the worker rank 0's claim, load, fast path, gate and commit.
    timeout_s: float = Field(300.0, gt=0)


class StepAborted(RuntimeError):
    """Another rank stopped the step (its progress callback raised: a job limit, a signal)."""


class RankLostError(RuntimeError):
    """A collective failed: a rank died, hung past the timeout, or the group broke."""


def is_collective_error(exc: BaseException) -> bool:
    """Whether ``exc`` came from the process group rather than from the computation (gloo
    raises plain RuntimeErrors for a peer that closed its connection)."""
    if isinstance(exc, RankLostError | tdist.DistError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        s in text
        for s in ("gloo", "Gloo", "NCCL", "Connection closed", "Connection reset", "imed out")
    )


class FeatureNet(Protocol):
    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass(frozen=True)
class Part:
    """This rank's part of a global batch: ``fraction`` of its samples."""

    fraction: float
    world_size: int

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to back-propagate: DDP averages gradients over ranks, so the local mean
        is weighted by fraction * world size to give the global batch's mean."""
        return loss * (self.fraction * self.world_size)

    def share(self, loss: torch.Tensor) -> torch.Tensor:
        """This rank's contribution to the global batch's mean loss (summed over ranks)."""
        return loss * self.fraction


class _Whole:
    """The whole batch (one process): the loss as it is, no arithmetic added."""

    @staticmethod
    def scale(loss: torch.Tensor) -> torch.Tensor:
        return loss

    @staticmethod
    def share(loss: torch.Tensor) -> torch.Tensor:
        return loss


_WHOLE = _Whole()


def shard_sizes(n: int, world_size: int) -> list[int]:
    """Rows per rank of ``n`` split as ``Tensor.tensor_split`` does (the first ``n % world``
    ranks take one more)."""
    return [n // world_size + (1 if r < n % world_size else 0) for r in range(world_size)]


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of rank ``rank``'s contiguous slice of ``n`` rows."""
    sizes = shard_sizes(n, world_size)
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


class _WithFeatures(nn.Module):
    """DDP hooks ``forward``; the training loop needs logits and features."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net.forward_with_features(x)


class _DDPNet:
    def __init__(self, ddp: nn.Module) -> None:
        self.ddp = ddp

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ddp(x)


@dataclass(frozen=True)
class Dist:
    """This process's place in the group; ``Dist()`` is the single process."""

    rank: int = 0
    world_size: int = 1
    backend: str | None = None
    # Where collectives' tensors live: the CPU for gloo, this rank's GPU for NCCL.
    comm_device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> dict[str, Any]:
        """What a result or a version records of the run's processes."""
        return {"world_size": self.world_size, "backend": self.backend}

    # -- set-up -----------------------------------------------------------------------------

    @classmethod
    def from_env(
        cls,
        device: torch.device,
        config: DistConfig,
        env: Mapping[str, str] | None = None,
    ) -> tuple[Dist, torch.device]:
        """The group torchrun started this process in, and the device this rank trains on
        (``cuda:LOCAL_RANK`` for a CUDA device); ``Dist()`` and ``device`` without torchrun
        (or with one process)."""
        env = os.environ if env is None else env
        world = int(env.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls(), device
        rank = int(env["RANK"])
        if device.type == "cuda":
            device = torch.device("cuda", int(env.get("LOCAL_RANK", rank)))
            torch.cuda.set_device(device)
            backend = "nccl"
        else:
            backend = "gloo"
        tdist.init_process_group(
            backend,
            rank=rank,
            world_size=world,
            timeout=dt.timedelta(seconds=config.timeout_s),
        )
        return cls(rank, world, backend, device if backend == "nccl" else torch.device("cpu")), (
            device
        )

    def close(self) -> None:
        if self.active and tdist.is_initialized():
            tdist.destroy_process_group()

    # -- collectives --------------------------------------------------------------------------

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (pickled: for jobs and verdicts, not for weights)."""
        if not self.active:
            return obj
        box = [obj if self.is_main else None]
        tdist.broadcast_object_list(box, src=0, device=self.comm_device)
        return box[0]

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` summed over ranks (itself in one process)."""
        if not self.active:
            return value
        t = value.detach().to(self.comm_device, torch.float64).clone()
        tdist.all_reduce(t)
        return t.to(value.device, value.dtype)

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank."""
        if not self.active:
            return flag
        t = torch.tensor([int(flag)], device=self.comm_device)
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return bool(t.item())

    def gather_rows(self, part: torch.Tensor) -> torch.Tensor:
        """The concatenation, in rank order, of every rank's ``part`` (rows may differ in
        number by rank; the other dimensions and the dtype may not)."""
        if not self.active:
            return part
        counts = torch.tensor([part.shape[0]], device=self.comm_device)
        all_counts = [torch.zeros_like(counts) for _ in range(self.world_size)]
        tdist.all_gather(all_counts, counts)
        sizes = [int(c.item()) for c in all_counts]
        longest = max(sizes)
        padded = torch.zeros((longest, *part.shape[1:]), dtype=part.dtype, device=self.comm_device)
        padded[: part.shape[0]] = part.to(self.comm_device)
        out = [torch.empty_like(padded) for _ in range(self.world_size)]
        tdist.all_gather(out, padded)
        return torch.cat([o[:s] for o, s in zip(out, sizes, strict=True)]).to(part.device)

    # -- the training loop's helpers ----------------------------------------------------------

    def shard_batch(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, Part | _Whole]:
        """This rank's slice of the global batch ``(x, y)`` and its ``Part``.

        A rank whose slice would be empty (a last batch smaller than the group) takes one
        sample at weight 0: DDP's all-reduce needs every rank's backward, and a zero-weight
        loss adds nothing to the gradient."""
        if not self.active:
            return x, y, _WHOLE
        n = x.shape[0]
        start, stop = shard_bounds(n, self.rank, self.world_size)
        if stop == start:
            return x[:1], y[:1], Part(0.0, self.world_size)
        return x[start:stop], y[start:stop], Part((stop - start) / n, self.world_size)

    def wrap(self, net: nn.Module, device: torch.device) -> FeatureNet:
        """``net`` for the training loop: DistributedDataParallel over the group (its weights
        broadcast from rank 0 at once, gradients averaged in backward), or ``net`` itself."""
        if not self.active:
            return net  # type: ignore[return-value]
        ddp = nn.parallel.DistributedDataParallel(
            _WithFeatures(net),
            device_ids=[device.index] if device.type == "cuda" else None,
            # BN statistics stay per rank during the loop (synced once at construction);
            # `sync_module` reconciles them after it.
            forward_sync_buffers=False,
        )
        return _DDPNet(ddp)

    def sync_module(self, net: nn.Module) -> None:
        """Make ``net`` the same on every rank: BatchNorm running statistics averaged,
        every other parameter and buffer rank 0's."""
        if not self.active:
            return
        averaged: set[int] = set()
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                for buf in (m.running_mean, m.running_var):
                    t = buf.detach().to(self.comm_device, torch.float64)
                    tdist.all_reduce(t)
                    with torch.no_grad():
                        buf.copy_((t / self.world_size).to(buf.device, buf.dtype))
                    averaged.add(id(buf))
        with torch.no_grad():
            for t in [*net.parameters(), *net.buffers()]:
                if id(t) in averaged or t.numel() == 0:
                    continue
                c = t.detach().to(self.comm_device).clone()
                tdist.broadcast(c, src=0)
                t.copy_(c.to(t.device))

    def report(self, callback: Callable[..., None] | None, *args: Any) -> None:
        """Call a progress callback (an epoch's end); under a group, a callback that raises
        on one rank stops the step on all of them (``StepAborted`` on the others)."""
        if not self.active:
            if callback is not None:
                callback(*args)
            return
        error: Exception | None = None
        if callback is not None:
            try:
                callback(*args)
            except Exception as exc:
                error = exc
        stop = self.any(error is not None)
        if error is not None:
            raise error
        if stop:
            raise StepAborted("another rank stopped the step")

    def infer(
        self,
        model: nn.Module,
        images: torch.Tensor,
        augment: AugmentConfig,
        *,
        device: torch.device,
        batch_size: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``learner.core.evaluate.infer`` on all of ``images``: each rank computes its
        shard's logits and features, and every rank gets all of them."""
        if not self.active:
            return infer(model, images, augment, device=device, batch_size=batch_size)
        start, stop = shard_bounds(images.shape[0], self.rank, self.world_size)
        logits, feats = infer(
            model, images[start:stop], augment, device=device, batch_size=batch_size
        )
        return self.gather_rows(logits), self.gather_rows(feats)


# The single process: every helper is the identity (immutable, so a safe default argument).
SINGLE = Dist()

"""Exemplar memory: herding (iCaRL) or random selection under an explicit budget mode."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ExemplarMemory:
    """Per class, uint8 images (n, C, H, W) in priority order: the best exemplar first, so that
    shrinking a class keeps a prefix (as iCaRL's reduction does)."""

    images: Mapping[int, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for c, x in self.images.items():
            if x.dtype != torch.uint8 or x.dim() != 4:
                raise ValueError(
                    f"exemplars of class {c} must be uint8 (n, C, H, W), got {x.dtype} {tuple(x.shape)}"
                )
        object.__setattr__(self, "images", MappingProxyType(dict(sorted(self.images.items()))))

    def counts(self) -> dict[int, int]:
        return {c: int(x.shape[0]) for c, x in self.images.items()}

    def __len__(self) -> int:
        return sum(int(x.shape[0]) for x in self.images.values())

    def shrink(self, quota: int) -> ExemplarMemory:
        return ExemplarMemory({c: x[:quota] for c, x in self.images.items() if quota > 0})

    def training_set(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if len(self) == 0:
            return None
        xs = [x for x in self.images.values() if x.shape[0]]
        ys = [
            torch.full((x.shape[0],), c, dtype=torch.int64)
            for c, x in self.images.items()
            if x.shape[0]
        ]
        return torch.cat(xs), torch.cat(ys)


def herding(features: torch.Tensor, m: int) -> torch.Tensor:
    """Indices of ``m`` samples, in selection order, whose running mean tracks the class mean.

    iCaRL's rule on L2-normalised features: pick, at step k, the sample that brings the mean
    of the k chosen closest to the class mean.
    """
    n = features.shape[0]
    m = min(m, n)
    feats = F.normalize(features.float(), dim=1)
    target = feats.mean(0)
    chosen = torch.empty(m, dtype=torch.int64)
    running = torch.zeros_like(target)
    available = torch.ones(n, dtype=torch.bool, device=feats.device)
    for k in range(m):
        # argmin_f ||target - (running + f)/(k+1)|| = argmax_f <(k+1) target - running, f>,
        # because every f has unit norm: one mat-vec per pick.
        scores = feats @ ((k + 1) * target - running)
        i = int(scores.masked_fill(~available, float("-inf")).argmax())
        chosen[k] = i
        available[i] = False
        running += feats[i]
    return chosen


def random_selection(n: int, m: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randperm(n, generator=generator)[: min(m, n)]

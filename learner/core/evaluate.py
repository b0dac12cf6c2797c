"""Inference helpers shared by evaluation, exemplar selection and the server."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from learner.core.augment import Normalizer, center_crop
from learner.core.config import AugmentConfig
from learner.core.model import IncrementalNet


@torch.inference_mode()
def infer(
    model: IncrementalNet,
    images: torch.Tensor,
    augment: AugmentConfig,
    *,
    device: torch.device,
    batch_size: int = 512,
    flip: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw logits (no prior: BSCE's log-prior is for training only) and features, on CPU."""
    was_training = model.training
    model.eval()
    normalize = Normalizer(augment, device, model.config.channels_last)
    logits, feats = [], []
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size].to(device, non_blocking=True)
        x = center_crop(x, augment.crop)
        if flip:
            x = x.flip(3)
        out, f = model.forward_with_features(normalize(x))
        logits.append(out.float().cpu())
        feats.append(f.float().cpu())
    model.train(was_training)
    if not logits:
        return torch.empty(0, model.num_classes), torch.empty(0, model.feature_dim)
    return torch.cat(logits), torch.cat(feats)


def class_means_from_features(features: torch.Tensor) -> torch.Tensor:
    """iCaRL's class prototype: the normalised mean of normalised features."""
    return F.normalize(F.normalize(features, dim=1).mean(0), dim=0)


def nme_predict(features: torch.Tensor, class_means: torch.Tensor) -> torch.Tensor:
    """Nearest mean of exemplars; classes without a mean (NaN rows) are never predicted."""
    feats = F.normalize(features, dim=1)
    dist = torch.cdist(feats, class_means.nan_to_num(0.0))
    dist[:, torch.isnan(class_means).any(1)] = float("inf")
    return dist.argmin(1)


def topk(logits: torch.Tensor, k: int) -> torch.Tensor:
    return logits.topk(min(k, logits.shape[1]), dim=1).indices

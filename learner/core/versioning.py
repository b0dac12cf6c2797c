"""What a model version holds, shared by the learner worker (which writes versions) and the
server (which loads them): tensors for the safetensors file and JSON-able metadata.

A version is self-describing: the network's config, the class names in head order, the
counts trained on, the input geometry and normalisation, and the NME class means.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from learner.core.config import AugmentConfig, StepConfig
from learner.core.model import IncrementalNet

PAYLOAD_FORMAT = "bsce-serve/version-1"
_MODEL_PREFIX = "model."
_MEANS_KEY = "nme.class_means"
# The learner's random stream where this version left it: the next step continues from it,
# so a lineage of versions draws exactly what one offline run (learner.bench) would.
RNG_KEY = "rng.state"


@dataclass(frozen=True)
class LoadedVersion:
    model: IncrementalNet
    augment: AugmentConfig
    class_names: tuple[str, ...]
    class_means: torch.Tensor | None
    metadata: Mapping[str, Any]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) the network expects."""
        return (self.model.config.in_channels, self.augment.crop, self.augment.crop)


def version_payload(
    model: IncrementalNet,
    *,
    class_names: Sequence[str],
    counts: Sequence[int],
    augment: AugmentConfig,
    class_means: torch.Tensor | None = None,
    config: StepConfig | None = None,
    generator: torch.Generator | None = None,
    extra: Mapping[str, Any] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if len(class_names) != model.num_classes:
        raise ValueError(f"{len(class_names)} class names for a head of {model.num_classes} rows")
    tensors = {_MODEL_PREFIX + k: v for k, v in model.to_tensors().items()}
    if class_means is not None:
        tensors[_MEANS_KEY] = class_means.detach().cpu().float().contiguous()
    if generator is not None:
        tensors[RNG_KEY] = generator.get_state().contiguous()
    metadata: dict[str, Any] = {
        "payload_format": PAYLOAD_FORMAT,
        "model": model.describe(),
        "augment": augment.model_dump(mode="json"),
        "class_names": list(class_names),
        "counts": [int(c) for c in counts],
        **({"config": config.model_dump(mode="json")} if config is not None else {}),
        **dict(extra or {}),
    }
    return tensors, metadata


def load_version(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> LoadedVersion:
    if metadata.get("payload_format") != PAYLOAD_FORMAT:
        raise ValueError(f"unknown version payload format {metadata.get('payload_format')!r}")
    weights = {
        k[len(_MODEL_PREFIX) :]: v for k, v in tensors.items() if k.startswith(_MODEL_PREFIX)
    }
    model = IncrementalNet.from_tensors(weights, metadata["model"]).eval()
    return LoadedVersion(
        model=model,
        augment=AugmentConfig.model_validate(metadata["augment"]),
        class_names=tuple(metadata["class_names"]),
        class_means=tensors.get(_MEANS_KEY),
        metadata=metadata,
    )


def step_generator(tensors: Mapping[str, torch.Tensor], fallback_seed: int) -> torch.Generator:
    """The generator a step on top of this version draws from: the version's saved stream,
    or (a version written before streams were saved) a fresh one from ``fallback_seed``."""
    generator = torch.Generator()
    state = tensors.get(RNG_KEY)
    if state is None:
        return generator.manual_seed(fallback_seed)
    generator.set_state(state.to(torch.uint8).contiguous())
    return generator


def initial_payload(
    config: StepConfig, seed: int
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Version 0: a freshly initialised network with no classes yet.

    As in ``learner.bench.run_protocol``, the weights come first from ``Generator(seed)``
    and the training steps continue the same stream (saved with the version).
    """
    generator = torch.Generator().manual_seed(seed)
    model = IncrementalNet.create(config.model, generator)
    return version_payload(
        model,
        class_names=[],
        counts=[],
        augment=config.augment,
        config=config,
        generator=generator,
        extra={"seed": seed, "rng": "seed"},
    )
